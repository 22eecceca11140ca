"""gunicorn settings for k8s_exporter: the one place that says how it is served.

gunicorn reads this file when it starts in this folder, so `make run`,
plain `gunicorn k8s_exporter:app`, `python3 k8s_exporter.py` (which runs
gunicorn with it) and the launcher of the tests, the bench and the demo
(demo_k8s_exporter.ExporterProcess) all serve alike; flags on the command
line override these.
"""
import os
import sys

bind = ['0.0.0.0:9201']
# One worker: the store is in the worker's memory. Threads let a scrape run
# while writes are applied and keep one slow client from holding the worker.
workers = 1
worker_class = 'gthread'
threads = 8
# A write of the largest allowed body decodes in well under a second; a
# client that stalls longer than this is cut off.
timeout = 60
graceful_timeout = 30
keepalive = 75   # longer than Prometheus's idle connection reuse
# gunicorn 27's control socket is one path per user: a second gunicorn (a
# test, a shard) would take it over, and its "worker add" would split the
# in-memory store across two workers.
control_socket_disable = True

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def on_starting(server):
    """Check the environment once, before forking, and say what is wrong in one line."""
    import k8s_exporter
    k8s_exporter.load_config_or_exit(warn=True)


def post_fork(server, worker):
    """Tune malloc in the worker's main thread, before its thread pool allocates."""
    import k8s_exporter
    k8s_exporter.tune_malloc()


def when_ready(server):
    """Cut off clients that stall mid-request (see k8s_exporter.set_receive_timeout)."""
    import k8s_exporter
    k8s_exporter.set_receive_timeout(listener.sock for listener in server.LISTENERS)
