"""gunicorn settings for k8s_exporter: the one place that says how it is served.

gunicorn reads this file when it starts in this folder, so `make run`,
plain `gunicorn k8s_exporter:app`, `python3 k8s_exporter.py` (which runs
gunicorn with it) and the launcher of the tests, the bench and the demo
(demo_k8s_exporter.ExporterProcess) all serve alike. From another folder,
name it: `gunicorn -c /path/to/gunicorn.conf.py k8s_exporter:app`; without
it, k8s_exporter refuses to start. Flags on the command line override these
settings, except the two the exporter needs: one worker, and its worker class.
"""
import os
import sys

bind = ['0.0.0.0:9201']
# One worker: the store is in the worker's memory. Threads let a scrape run
# while writes are applied; the worker class reads each request whole in
# its main thread before a thread takes it, so no client can hold a thread.
workers = 1
worker_class = 'k8s_exporter.ExporterWorker'
threads = 8
# A write of the largest allowed body decodes in well under a second; the
# worker is restarted if its main loop stops for this long.
timeout = 60
graceful_timeout = 30
keepalive = 75   # longer than Prometheus's idle connection reuse
# gunicorn 27's control socket is one path per user: a second gunicorn (a
# test, a shard) would take it over, and its "worker add" would split the
# in-memory store across two workers.
control_socket_disable = True

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def on_starting(server):
    """Check the environment and the serving settings once, before forking;
    say what is wrong in one line."""
    import k8s_exporter
    k8s_exporter.load_config_or_exit(warn=True)
    k8s_exporter.check_serving_or_exit(server.cfg)


def nworkers_changed(server, new_value, old_value):
    """`kill -TTIN` would add a worker with a store of its own: stay at one."""
    import k8s_exporter
    k8s_exporter.keep_one_worker(server, new_value, old_value)


def post_fork(server, worker):
    """Tune malloc in the worker's main thread, before its thread pool
    allocates, and the cycle collector."""
    import k8s_exporter
    k8s_exporter.tune_malloc()
    k8s_exporter.tune_gc()


def when_ready(server):
    """SIGHUP would restart the worker and so empty the store: ignore it."""
    import k8s_exporter
    k8s_exporter.ignore_hangup(server)
