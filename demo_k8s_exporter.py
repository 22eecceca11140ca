"""demo_k8s_exporter: the whole pipeline on one machine, until Ctrl-C.

    cAdvisor fixture -> prometheus1 --remote_write--> k8s_exporter -> prometheus2

Run it:

    make demo
    .venv/bin/python demo_k8s_exporter.py --fixture synthetic-kubelet-modern
    .venv/bin/python demo_k8s_exporter.py --list

It serves a cAdvisor capture from ../shared/fixtures/cadvisor/ as a kubelet
would, starts Debian's prometheus twice and the exporter under gunicorn, all
on free loopback ports, waits until the pods reach prometheus2 and prints the
URLs to open. Ctrl-C (or SIGTERM) stops everything it started.

This file is also the harness of test_k8s_exporter.py and
bench_k8s_exporter.py: ExporterProcess, the one launcher of the exporter
under gunicorn; CadvisorEndpoint; Prometheus and its config builders; the
process and HTTP helpers. It needs what the exporter needs (requirements.txt:
gunicorn, protobuf, python-snappy), not the test dependencies: it imports
k8s_exporter, which only defines things on import.
"""

import argparse
import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import k8s_exporter

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / 'shared' / 'fixtures' / 'cadvisor'
DEFAULT_FIXTURE = 'kubelet-modern-dockershim-systemd-minikube-k8s1.22-nri-kubernetes.part'
PROMETHEUS_BINARY = '/usr/bin/prometheus'
PROMTOOL_BINARY = '/usr/bin/promtool'
# The only metric names prometheus1 needs to ship: the rest of a kubelet's
# cAdvisor page is 90-95% of its samples and the exporter would drop them.
EXPORTED_METRICS_REGEX = '|'.join(k8s_exporter.DEFAULT_METRICS)


###############################################################################
# Small HTTP and process helpers ##############################################
###############################################################################

class StartupError(Exception):
    """A process or endpoint of the pipeline did not come up in time."""


class StartStop:
    """A part of the pipeline: start() brings it up, stop() takes it down;
    `with` does both, stopping whatever happens."""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def wait_until_serving(self, url, timeout, ca_file=None):
        """Wait until self.process answers url with 200; if it exits or the
        wait times out, stop it and raise StartupError with its log."""
        try:
            wait_for(lambda: self.process.poll() is not None or
                     http_get(url, timeout=1, ca_file=ca_file)[0] == 200,
                     timeout, f'{self.name} to answer {url}')
            if self.process.poll() is not None:
                raise StartupError(f'{self.name} exited with {self.process.returncode}')
        except BaseException as error:
            self.stop()
            if isinstance(error, StartupError):
                raise StartupError(f'{error}\n--- {self.name} log ---\n{self.log}') from None
            raise


def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def http_get(url, timeout=5, ca_file=None):
    """(status, body bytes) of one GET; an https url is checked against ca_file."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == 'https':
        connection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout,
            context=ssl.create_default_context(cafile=ca_file))
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request('GET', parts.path + ('?' + parts.query if parts.query else ''))
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_for(predicate, timeout, what, interval=0.2):
    """Poll predicate until it returns a true value; StartupError after timeout seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (OSError, http.client.HTTPException, ValueError) as error:
            last = error
        else:
            if last:
                return last
        time.sleep(interval)
    raise StartupError(f'timed out after {timeout} s waiting for {what}; last: {last!r}'[:2000])


def stop_process(process, timeout=20, sig=signal.SIGTERM):
    """sig (SIGTERM), then SIGKILL after timeout; always reaps the child."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


def process_children(pid):
    """The pids of a process's children; [] once it has gone."""
    try:
        with open(f'/proc/{pid}/task/{pid}/children') as children:
            return [int(child) for child in children.read().split()]
    except FileNotFoundError:
        return []


###############################################################################
# A cAdvisor-shaped endpoint ##################################################
###############################################################################

def split_sample_line(line):
    """(series and value, timestamp or '') of one sample line of the text format.

    Label values may hold spaces and braces, but nothing after the closing
    brace does, so the value and timestamp are the words after the last '}'.
    """
    brace = line.rfind('}')
    head, tail = (line[:brace + 1], line[brace + 1:]) if brace >= 0 else ('', line)
    words = tail.split()
    if brace < 0:
        head, words = words[0], words[1:]
    timestamp = words[1] if len(words) > 1 else ''
    return f'{head} {words[0]}', timestamp


class CadvisorEndpoint(StartStop):
    """A kubelet's /metrics/cadvisor on a loopback port, serving a replaceable text.

    Captures carry the timestamps of the day they were taken, which
    Prometheus rejects as out of bounds. stamp_now=False strips them, so
    prometheus1 stamps samples with the scrape time and sends stale markers
    when a series goes away; stamp_now=True stamps every sample with the
    time of the request, as a live kubelet does, and then Prometheus sends
    no stale markers (the exporter's TTL is what forgets a vanished pod).
    """

    name = 'the cAdvisor endpoint'
    path = '/metrics/cadvisor'

    def __init__(self, text='', stamp_now=False, listen=('127.0.0.1', 0)):
        """listen: the (host, port) to bind; port 0 lets the kernel pick a free one."""
        self.stamp_now = stamp_now
        self.listen = listen
        self.requests = 0
        self._lock = threading.Lock()
        self._server = None
        self._thread = None
        self.set_text(text)

    def set_text(self, text):
        """Serve text from the next request on; it need not end in a newline."""
        comments_and_samples = []
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith('#'):
                comments_and_samples.append((line, False))
            else:
                comments_and_samples.append((split_sample_line(line)[0], True))
        plain = ''.join(line + '\n' for line, _ in comments_and_samples).encode()
        with self._lock:
            self._lines = comments_and_samples
            self._plain = plain

    def body(self):
        with self._lock:
            lines, plain = self._lines, self._plain
        if not self.stamp_now:
            return plain
        now_ms = f' {int(time.time() * 1000)}\n'
        return ''.join(line + now_ms if is_sample else line + '\n'
                       for line, is_sample in lines).encode()

    @property
    def address(self):
        host, port = self._server.server_address[:2]
        return f'{host}:{port}'

    @property
    def url(self):
        return f'http://{self.address}{self.path}'

    def start(self):
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def do_GET(self):
                if self.path.split('?')[0] != endpoint.path:
                    self.send_error(404)
                    return
                body = endpoint.body()
                endpoint.requests += 1
                self.send_response(200)
                self.send_header('Content-Type', 'text/plain; version=0.0.4; charset=utf-8')
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass   # one line per scrape per second would bury the demo's output

        # Binding port 0 lets the kernel pick the port: no race with other tests.
        self._server = http.server.ThreadingHTTPServer(self.listen, Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name='cadvisor-endpoint', daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(10)
            self._server = None


###############################################################################
# Prometheus ##################################################################
###############################################################################

def remote_write_entry(url, write_relabel_configs=()):
    """A remote_write entry that ships within about a second and retries quickly."""
    entry = {
        'url': url,
        # Defaults (5 s deadline, up to 5 s backoff) are tuned for throughput;
        # a test or a demo wants to see each scrape arrive within a second.
        'queue_config': {'batch_send_deadline': '1s', 'min_backoff': '50ms',
                         'max_backoff': '1s'},
    }
    if write_relabel_configs:
        entry['write_relabel_configs'] = list(write_relabel_configs)
    return entry


def keep_exported_metrics_rule():
    return {'source_labels': ['__name__'], 'regex': EXPORTED_METRICS_REGEX, 'action': 'keep'}


def scrape_job(job_name, addresses, metrics_path='/metrics', interval='1s', **options):
    return {'job_name': job_name, 'scrape_interval': interval, 'scrape_timeout': interval,
            'metrics_path': metrics_path,
            'static_configs': [{'targets': list(addresses)}], **options}


def prometheus1_config(cadvisor_jobs, remote_writes, cluster):
    """Scrape each {job name: cAdvisor address} and remote-write it, as a cluster's Prometheus."""
    return {
        'global': {'scrape_interval': '1s', 'evaluation_interval': '1s',
                   'external_labels': {'cluster': cluster}},
        'scrape_configs': [scrape_job(job, [address], CadvisorEndpoint.path)
                           for job, address in cadvisor_jobs.items()],
        'remote_write': list(remote_writes),
    }


def prometheus2_config(exporter_addresses, job_name='k8s-exporter'):
    """Scrape the exporters; honor_labels keeps the job and cluster they report."""
    return {
        'global': {'scrape_interval': '1s', 'evaluation_interval': '1s'},
        'scrape_configs': [scrape_job(job_name, exporter_addresses, honor_labels=True)],
    }


class Prometheus(StartStop):
    """Debian's prometheus with a generated config, storage in a temp dir, on a free port.

    The config is written as JSON, which is YAML too, so no YAML library is
    needed. The log is kept in self.log after stop(), to print on failure.
    """

    def __init__(self, config, name='prometheus', binary=PROMETHEUS_BINARY, ready_timeout=30,
                 extra_args=()):
        self.config = config
        self.name = name
        self.binary = binary
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.port = None
        self.process = None
        self.log = ''
        self._dir = None
        self._log_file = None

    @property
    def address(self):
        return f'127.0.0.1:{self.port}'

    @property
    def url(self):
        return f'http://{self.address}'

    @property
    def pid(self):
        return self.process.pid

    def start(self):
        self._dir = tempfile.mkdtemp(prefix=f'k8s-exporter-{self.name}-')
        config_path = os.path.join(self._dir, 'prometheus.yml')
        with open(config_path, 'w', encoding='utf-8') as config_file:
            json.dump(self.config, config_file, indent=1)
        self.port = free_port()
        self._log_file = open(os.path.join(self._dir, 'prometheus.log'), 'wb')
        self.process = subprocess.Popen(
            [self.binary, f'--config.file={config_path}',
             f'--storage.tsdb.path={os.path.join(self._dir, "data")}',
             f'--web.listen-address={self.address}', '--web.enable-lifecycle',
             *self.extra_args],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True)   # a Ctrl-C reaches the harness, which stops it in order
        self.wait_until_serving(self.url + '/-/ready', self.ready_timeout)
        return self

    def stop(self):
        if self.process is not None:
            stop_process(self.process)
            self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
            with open(os.path.join(self._dir, 'prometheus.log'), 'rb') as log_file:
                self.log = log_file.read().decode(errors='replace')
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def log_tail(self, lines=30):
        """The last lines of the log so far, running or stopped, to show on failure."""
        text = self.log
        if self._dir is not None:
            with open(os.path.join(self._dir, 'prometheus.log'), 'rb') as log_file:
                text = log_file.read().decode(errors='replace')
        return '\n'.join(text.splitlines()[-lines:])

    def query(self, promql):
        """The result list of an instant query at the current time."""
        status, body = http_get(f'{self.url}/api/v1/query?'
                                + urllib.parse.urlencode({'query': promql}))
        answer = json.loads(body)
        if status != 200 or answer.get('status') != 'success':
            raise ValueError(f'{self.name} query {promql!r}: {status} {body[:500]!r}')
        return answer['data']['result']

    def self_metric(self, name, **labels):
        """Sum of the series named name (with these label values) on this Prometheus's
        own /metrics; None if there is none."""
        status, body = http_get(self.url + '/metrics')
        if status != 200:
            raise ValueError(f'{self.name} /metrics: {status}')
        total = None
        for line in body.decode().splitlines():
            if line.startswith('#'):
                continue
            series, _, value = line.rpartition(' ')
            if (series == name or series.startswith(name + '{')) and all(
                    f'{label}="{value}"' in series for label, value in labels.items()):
                total = (total or 0.0) + float(value)
        return total


###############################################################################
# The exporter under gunicorn #################################################
###############################################################################

class ExporterProcess(StartStop):
    """k8s_exporter under gunicorn on 127.0.0.1, started as `make run` starts it.

    gunicorn runs in this folder, so it reads gunicorn.conf.py, the one
    source of the serving settings (workers, threads, timeouts, the hooks
    that check the environment and the serving settings, tune malloc and
    ignore SIGHUP, and the worker class that reads requests whole);
    only the address is given here, plus gunicorn_args. tls: (certificate,
    key, CA) files to serve HTTPS with gunicorn's own TLS. The output of
    gunicorn and the exporter is kept in self.log after stop().
    """

    name = 'k8s_exporter'

    def __init__(self, env=None, port=None, tls=None, gunicorn_args=(), start_timeout=30):
        self.port = port or free_port()
        self.env = {**os.environ, **(env or {})}
        self.gunicorn_args = list(gunicorn_args)
        if tls:
            self.gunicorn_args += ['--certfile', str(tls[0]), '--keyfile', str(tls[1])]
        self.ca_file = str(tls[2]) if tls else None
        self.url = f'{"https" if tls else "http"}://127.0.0.1:{self.port}'
        self.start_timeout = start_timeout
        self.process = None
        self.pid = None
        self.log = ''
        self._log_file = None

    def command(self):
        return [sys.executable, '-m', 'gunicorn', '-b', f'127.0.0.1:{self.port}',
                *self.gunicorn_args, 'k8s_exporter:app']

    def start(self):
        self._log_file = tempfile.TemporaryFile()
        # In a session of its own, as Prometheus: a Ctrl-C reaches only the harness.
        self.process = subprocess.Popen(self.command(), cwd=HERE, env=self.env,
                                        stdin=subprocess.DEVNULL, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_until_serving(self.url + '/-/healthy', self.start_timeout, self.ca_file)
        # The one worker, which has just answered: the process that serves,
        # whose CPU and memory count.
        self.pid, = process_children(self.process.pid)
        return self

    def stop(self, sig=signal.SIGTERM):
        """Stop gunicorn with sig (SIGTERM: in-flight requests finish, then it exits)."""
        if self.process is not None:
            stop_process(self.process, timeout=40, sig=sig)
            self.process = None
        if self._log_file is not None:
            self.log = self.log_text()
            self._log_file.close()
            self._log_file = None

    def log_text(self):
        """gunicorn's output so far; pread leaves the offset gunicorn writes at alone."""
        descriptor = self._log_file.fileno()
        return os.pread(descriptor, os.fstat(descriptor).st_size, 0).decode(errors='replace')

    def metrics(self):
        """The text of /metrics."""
        status, body = http_get(self.url + '/metrics', timeout=30, ca_file=self.ca_file)
        if status != 200:
            raise ValueError(f'{self.url}/metrics: {status} {body[:200]!r}')
        return body.decode()


###############################################################################
# The demo ####################################################################
###############################################################################

def fixture_names():
    return sorted(path.name[:-len('.txt')] for path in FIXTURES.glob('*.txt'))


def read_fixture(name):
    path = Path(name) if name.endswith('.txt') else FIXTURES / f'{name}.txt'
    return path.read_text(encoding='utf-8')


def pod_lines(metrics_text):
    return [line for line in metrics_text.splitlines() if line.startswith('container_')]


def run_demo(fixture, cluster, ready_timeout):
    text = read_fixture(fixture)
    started = []   # stopped in reverse order, whatever happens

    def start(component):
        started.append(component)
        return component.start()

    try:
        endpoint = start(CadvisorEndpoint(text))
        exporter = start(ExporterProcess())
        prometheus1 = start(Prometheus(prometheus1_config(
            {'kubernetes-cadvisor': endpoint.address},
            [remote_write_entry(exporter.url + '/write', [keep_exported_metrics_rule()])],
            cluster), name='prometheus1'))
        prometheus2 = start(Prometheus(prometheus2_config([f'127.0.0.1:{exporter.port}']),
                                       name='prometheus2'))
        print(f'cAdvisor endpoint  {endpoint.url}  ({fixture})\n'
              f'prometheus1        {prometheus1.url}\n'
              f'prometheus2        {prometheus2.url}\n'
              'waiting for the pods to arrive...', flush=True)
        lines = wait_for(lambda: pod_lines(http_get(exporter.url + '/metrics')[1].decode()),
                         ready_timeout, 'pods on the exporter\'s /metrics')
        wait_for(lambda: prometheus2.query('container_memory_usage_bytes'), ready_timeout,
                 'pods in prometheus2')
        graph = urllib.parse.urlencode({'g0.expr': 'container_memory_usage_bytes',
                                        'g0.tab': '1'})
        pods = {line.split('pod="', 1)[1].split('"', 1)[0] for line in lines}
        print(f'{len(pods)} pods arrive.\n'
              f'exporter /metrics   {exporter.url}/metrics\n'
              f'prometheus2 graph   {prometheus2.url}/graph?{graph}\n'
              'Ctrl-C stops everything.', flush=True)
        while True:
            time.sleep(3600)
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_in_order(started)


def stop_in_order(started):
    """Stop the Prometheus servers together, then the rest together, saying what it waits for.

    The children run in sessions of their own, so a Ctrl-C reaches only
    this process. Each Prometheus may wait up to 20 s on SIGTERM: prometheus1
    first sends the exporter what its remote-write queue still holds, so
    the exporter goes only after it; stopping one at a time would add up.
    """
    prometheuses = [part for part in started if isinstance(part, Prometheus)]
    rest = [part for part in started if not isinstance(part, Prometheus)]
    for parts, why in ((prometheuses, 'prometheus1 flushes its remote-write queue'),
                       (rest, 'gunicorn lets in-flight requests finish')):
        if parts:
            names = ', '.join(getattr(part, 'name', type(part).__name__) for part in parts)
            print(f'stopping {names} ({why})...', flush=True)
            threads = [threading.Thread(target=part.stop) for part in parts]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()


def serve_capture(fixture, listen):
    """Serve only the capture, as a kubelet's /metrics/cadvisor, until Ctrl-C or SIGTERM."""
    host, _, port = listen.rpartition(':')
    with CadvisorEndpoint(read_fixture(fixture), listen=(host, int(port))) as endpoint:
        print(f'cAdvisor endpoint  http://{endpoint.address}{endpoint.path}  ({fixture})',
              flush=True)
        while True:
            time.sleep(3600)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--fixture', default=DEFAULT_FIXTURE,
                        help='a name from --list, or a path to a .txt capture '
                             f'(default: {DEFAULT_FIXTURE})')
    parser.add_argument('--cluster', default='demo-cluster',
                        help='prometheus1\'s external cluster label')
    parser.add_argument('--ready-timeout', type=float, default=60,
                        help='seconds to wait for the pods to arrive')
    parser.add_argument('--list', action='store_true', help='list the fixtures and exit')
    parser.add_argument('--serve-capture', metavar='HOST:PORT',
                        help='serve only the fixture, as a kubelet would, on HOST:PORT '
                             '(the capture service of examples/docker-compose.yml)')
    args = parser.parse_args(argv)
    if args.list:
        print('\n'.join(fixture_names()))
        return 0
    if not args.fixture.endswith('.txt') and args.fixture not in fixture_names():
        parser.error(f'no fixture {args.fixture!r}; --list shows them')
    # SIGTERM takes the same way out as Ctrl-C: through the finally clauses.
    # SIGINT is set too: started from a background job, Python would inherit
    # it ignored, and Ctrl-C would do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.serve_capture:
        try:
            serve_capture(args.fixture, args.serve_capture)
        except KeyboardInterrupt:
            return 0
    if not os.access(PROMETHEUS_BINARY, os.X_OK):
        print(f'demo: {PROMETHEUS_BINARY} not found; install Debian\'s prometheus package '
              '(make prometheus does, as root)', file=sys.stderr)
        return 2
    try:
        run_demo(args.fixture, args.cluster, args.ready_timeout)
    except KeyboardInterrupt:
        print('stopped.', flush=True)
        return 0
    except StartupError as error:
        print(f'demo: {error}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
