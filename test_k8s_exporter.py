"""The specification of k8s_exporter, as tests.

Sections follow k8s_exporter.py: configuration, remote-write decoding,
cAdvisor-to-pod mapping, the store, exposition, the WSGI app, then a real
gunicorn over HTTP, then the real Prometheus pipeline.

Run with `make test`.
"""

import contextlib
import gzip
import http.client
import io
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from wsgiref.validate import validator

import pytest
import snappy

import k8s_exporter
import remote_pb2
from k8s_exporter import (
    PROTO_RW1,
    PROTO_RW2,
    Config,
    ConfigError,
    Exporter,
    PodKey,
    RequestError,
    SeriesKey,
    decode_write_request,
    escape_label_value,
    format_go_float,
    negotiate_protocol,
    pod_series_identity,
    pod_value,
)

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / 'shared'
SEED_FILE = SHARED / 'seed' / '000_f316f98fa0d5b025.txt'
FIXTURES = SHARED / 'fixtures' / 'cadvisor'
VENV_BIN = Path(sys.executable).parent

STALE_NAN = struct.unpack('<d', struct.pack('<Q', 0x7FF0000000000002))[0]
RW1_TYPE = 'application/x-protobuf;proto=prometheus.WriteRequest'
RW2_TYPE = 'application/x-protobuf;proto=io.prometheus.write.v2.Request'


###############################################################################
# Building requests from tables ###############################################
###############################################################################

def rw1_body(table, compress=True):
    """A snappy RW 1.0 body from [(labels dict, [(value, timestamp_ms), ...]), ...]."""
    request = remote_pb2.WriteRequest()
    for labels, samples in table:
        series = request.timeseries.add()
        for name, value in sorted(labels.items()):
            series.labels.add(name=name, value=value)
        for value, timestamp in samples:
            series.samples.add(value=value, timestamp=timestamp)
    payload = request.SerializeToString()
    return snappy.compress(payload) if compress else payload


def rw2_body(table, compress=True):
    """The same table as a RW 2.0 body: one symbols table, labels as refs."""
    request = remote_pb2.WriteRequestV2()
    symbols = {'': 0}
    request.symbols.append('')

    def ref(text):
        if text not in symbols:
            symbols[text] = len(symbols)
            request.symbols.append(text)
        return symbols[text]

    for labels, samples in table:
        series = request.timeseries.add()
        for name, value in sorted(labels.items()):
            series.labels_refs.extend([ref(name), ref(value)])
        for value, timestamp in samples:
            series.samples.add(value=value, timestamp=timestamp)
    payload = request.SerializeToString()
    return snappy.compress(payload) if compress else payload


def cadvisor(metric, namespace, pod, container='', cgroup='', job='kubernetes-cadvisor',
             **extra):
    """Labels of a kubelet >= 1.16 cAdvisor series."""
    labels = {'__name__': metric, 'namespace': namespace, 'pod': pod, 'container': container,
              'id': cgroup, 'job': job, **extra}
    return {name: value for name, value in labels.items() if value != ''}


# The seed's five pods and values (../shared/seed), as pod cgroup series
# (cpu, memory) and one container's filesystem series each.
SEED_PODS = [
    # namespace, pod, cpu, fs_limit, fs_usage, memory_max, memory
    ('default', 'nginx-deployment-585449566-lnknq', 0, 42090070016, 122880, 4382720, 229376),
    ('default', 'nginx-deployment-585449566-m8mws', 0, 42090070016, 40960, 5836800, 233472),
    ('default', 'nginx-deployment-585449566-n7ltf', 0, 42090070016, 122880, 4681728, 3985408),
    ('default', 'task-pv-pod', 0, 42090070016, 18055168, 69070848, 5111808),
    ('monitoring', 'prometheus-69757bb88f-w98vk', 0, 42090070016, 128868352, 5771784192, 266240),
]


def seed_table(timestamp=1_700_000_000_000, job='hwstaff_beijing4'):
    table = []
    for number, (namespace, pod, cpu, fs_limit, fs_usage, memory_max, memory) in enumerate(
            SEED_PODS):
        pod_cgroup = f'/kubepods/burstable/pod{number:08d}-0000-4000-8000-000000000000'
        container = f'{pod_cgroup}/{number:064x}'
        for metric, value in (('container_cpu_load_average_10s', cpu),
                              ('container_memory_max_usage_bytes', memory_max),
                              ('container_memory_usage_bytes', memory)):
            table.append((cadvisor(metric, namespace, pod, cgroup=pod_cgroup, job=job),
                          [(value, timestamp)]))
        for metric, value in (('container_fs_limit_bytes', fs_limit),
                              ('container_fs_usage_bytes', fs_usage)):
            table.append((cadvisor(metric, namespace, pod, 'app', container, job=job,
                                   device='/dev/vda1'), [(value, timestamp)]))
    # What the exporter must accept and leave out: the node, other metrics.
    table.append(({'__name__': 'container_memory_usage_bytes', 'id': '/', 'job': job},
                  [(8123456512, timestamp)]))
    table.append((cadvisor('container_network_receive_bytes_total', 'default', 'task-pv-pod',
                           job=job, interface='eth0'), [(12345, timestamp)]))
    return table


# The seed's exposition block, written out: these bytes are the contract.
SEED_EXPOSITION = '''\
# HELP container_cpu_load_average_10s Average load of container CPU over the past 10 seconds
# TYPE container_cpu_load_average_10s gauge
container_cpu_load_average_10s{cluster="k8s-cluster",item="container_cpu_load_average_10s",job="hwstaff_beijing4",namespace="default",pod="nginx-deployment-585449566-lnknq"} 0
container_cpu_load_average_10s{cluster="k8s-cluster",item="container_cpu_load_average_10s",job="hwstaff_beijing4",namespace="default",pod="nginx-deployment-585449566-m8mws"} 0
container_cpu_load_average_10s{cluster="k8s-cluster",item="container_cpu_load_average_10s",job="hwstaff_beijing4",namespace="default",pod="nginx-deployment-585449566-n7ltf"} 0
container_cpu_load_average_10s{cluster="k8s-cluster",item="container_cpu_load_average_10s",job="hwstaff_beijing4",namespace="default",pod="task-pv-pod"} 0
container_cpu_load_average_10s{cluster="k8s-cluster",item="container_cpu_load_average_10s",job="hwstaff_beijing4",namespace="monitoring",pod="prometheus-69757bb88f-w98vk"} 0
# HELP container_fs_limit_bytes The total amount of file system that the container can use (unit: bytes)
# TYPE container_fs_limit_bytes gauge
container_fs_limit_bytes{cluster="k8s-cluster",item="container_fs_limit_bytes",job="hwstaff_beijing4",namespace="default",pod="nginx-deployment-585449566-lnknq"} 4.2090070016e+10
container_fs_limit_bytes{cluster="k8s-cluster",item="container_fs_limit_bytes",job="hwstaff_beijing4",namespace="default",pod="nginx-deployment-585449566-m8mws"} 4.2090070016e+10
container_fs_limit_bytes{cluster="k8s-cluster",item="container_fs_limit_bytes",job="hwstaff_beijing4",namespace="default",pod="nginx-deployment-585449566-n7ltf"} 4.2090070016e+10
container_fs_limit_bytes{cluster="k8s-cluster",item="container_fs_limit_bytes",job="hwstaff_beijing4",namespace="default",pod="task-pv-pod"} 4.2090070016e+10
container_fs_limit_bytes{cluster="k8s-cluster",item="container_fs_limit_bytes",job="hwstaff_beijing4",namespace="monitoring",pod="prometheus-69757bb88f-w98vk"} 4.2090070016e+10
# HELP container_fs_usage_bytes The usage of the file system in the container (unit: bytes)
# TYPE container_fs_usage_bytes gauge
container_fs_usage_bytes{cluster="k8s-cluster",item="container_fs_usage_bytes",job="hwstaff_beijing4",namespace="default",pod="nginx-deployment-585449566-lnknq"} 122880
container_fs_usage_bytes{cluster="k8s-cluster",item="container_fs_usage_bytes",job="hwstaff_beijing4",namespace="default",pod="nginx-deployment-585449566-m8mws"} 40960
container_fs_usage_bytes{cluster="k8s-cluster",item="container_fs_usage_bytes",job="hwstaff_beijing4",namespace="default",pod="nginx-deployment-585449566-n7ltf"} 122880
container_fs_usage_bytes{cluster="k8s-cluster",item="container_fs_usage_bytes",job="hwstaff_beijing4",namespace="default",pod="task-pv-pod"} 1.8055168e+07
container_fs_usage_bytes{cluster="k8s-cluster",item="container_fs_usage_bytes",job="hwstaff_beijing4",namespace="monitoring",pod="prometheus-69757bb88f-w98vk"} 1.28868352e+08
# HELP container_memory_max_usage_bytes The maximum memory usage of the container (unit: bytes)
# TYPE container_memory_max_usage_bytes gauge
container_memory_max_usage_bytes{cluster="k8s-cluster",item="container_memory_max_usage_bytes",job="hwstaff_beijing4",namespace="default",pod="nginx-deployment-585449566-lnknq"} 4.38272e+06
container_memory_max_usage_bytes{cluster="k8s-cluster",item="container_memory_max_usage_bytes",job="hwstaff_beijing4",namespace="default",pod="nginx-deployment-585449566-m8mws"} 5.8368e+06
container_memory_max_usage_bytes{cluster="k8s-cluster",item="container_memory_max_usage_bytes",job="hwstaff_beijing4",namespace="default",pod="nginx-deployment-585449566-n7ltf"} 4.681728e+06
container_memory_max_usage_bytes{cluster="k8s-cluster",item="container_memory_max_usage_bytes",job="hwstaff_beijing4",namespace="default",pod="task-pv-pod"} 6.9070848e+07
container_memory_max_usage_bytes{cluster="k8s-cluster",item="container_memory_max_usage_bytes",job="hwstaff_beijing4",namespace="monitoring",pod="prometheus-69757bb88f-w98vk"} 5.771784192e+09
# HELP container_memory_usage_bytes The current memory usage of the container (unit: bytes)
# TYPE container_memory_usage_bytes gauge
container_memory_usage_bytes{cluster="k8s-cluster",item="container_memory_usage_bytes",job="hwstaff_beijing4",namespace="default",pod="nginx-deployment-585449566-lnknq"} 229376
container_memory_usage_bytes{cluster="k8s-cluster",item="container_memory_usage_bytes",job="hwstaff_beijing4",namespace="default",pod="nginx-deployment-585449566-m8mws"} 233472
container_memory_usage_bytes{cluster="k8s-cluster",item="container_memory_usage_bytes",job="hwstaff_beijing4",namespace="default",pod="nginx-deployment-585449566-n7ltf"} 3.985408e+06
container_memory_usage_bytes{cluster="k8s-cluster",item="container_memory_usage_bytes",job="hwstaff_beijing4",namespace="default",pod="task-pv-pod"} 5.111808e+06
container_memory_usage_bytes{cluster="k8s-cluster",item="container_memory_usage_bytes",job="hwstaff_beijing4",namespace="monitoring",pod="prometheus-69757bb88f-w98vk"} 266240
'''


def pod_families(exposition):
    """The container_* part of an exposition: what the seed specifies."""
    return ''.join(line for line in exposition.splitlines(keepends=True)
                   if line.startswith(('container_', '# HELP container_', '# TYPE container_')))


def parse_exposition(text):
    """{(name, frozenset(labels.items())): value} from text format 0.0.4.

    Written independently of the exporter: a small reader of the format,
    handling escaped label values, for checking what the exporter wrote.
    """
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith('#'):
            continue
        name_end = min(i for i in (line.find('{'), line.find(' ')) if i >= 0)
        name, rest = line[:name_end], line[name_end:]
        labels = {}
        if rest.startswith('{'):
            i = 1
            while rest[i] != '}':
                eq = rest.index('=', i)
                label = rest[i:eq]
                assert rest[eq + 1] == '"', line
                j, value = eq + 2, []
                while rest[j] != '"':
                    if rest[j] == '\\':
                        value.append({'\\': '\\', '"': '"', 'n': '\n'}[rest[j + 1]])
                        j += 2
                    else:
                        value.append(rest[j])
                        j += 1
                labels[label] = ''.join(value)
                i = j + 1
                if rest[i] == ',':
                    i += 1
            rest = rest[i + 1:]
        samples[(name, frozenset(labels.items()))] = float(rest.split()[0])
    return samples


###############################################################################
# Calling the WSGI app, and a real gunicorn ###################################
###############################################################################

def call_wsgi(application, method, path, body=b'', headers=None, content_length=True):
    """Call a WSGI app under wsgiref's validator; return (status, headers, body)."""
    environ = {
        'REQUEST_METHOD': method, 'PATH_INFO': path, 'QUERY_STRING': '', 'SCRIPT_NAME': '',
        'SERVER_NAME': 'localhost', 'SERVER_PORT': '9201', 'SERVER_PROTOCOL': 'HTTP/1.1',
        'wsgi.version': (1, 0), 'wsgi.url_scheme': 'http', 'wsgi.input': io.BytesIO(body),
        'wsgi.errors': io.StringIO(), 'wsgi.multithread': True, 'wsgi.multiprocess': False,
        'wsgi.run_once': False,
    }
    if content_length:
        environ['CONTENT_LENGTH'] = str(len(body))
    for name, value in (headers or {}).items():
        key = name.upper().replace('-', '_')
        environ[key if key in ('CONTENT_TYPE', 'CONTENT_LENGTH') else 'HTTP_' + key] = value
    response = {}

    def start_response(status, response_headers, exc_info=None):
        response['status'] = int(status.split()[0])
        response['headers'] = dict(response_headers)

    chunks = validator(application)(environ, start_response)
    try:
        data = b''.join(chunks)
    finally:
        chunks.close()
    return response['status'], response['headers'], data


def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def http_request(url, method='GET', body=None, headers=None, timeout=10):
    """(status, headers dict with lower-case names, body bytes) of one HTTP request."""
    scheme, _, rest = url.partition('://')
    hostport, _, path = rest.partition('/')
    host, _, port = hostport.rpartition(':')
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(method, '/' + path, body=body, headers=headers or {})
        response = connection.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        connection.close()


def write(url, table, protocol=1, headers=None):
    body = rw1_body(table) if protocol == 1 else rw2_body(table)
    content_type = RW1_TYPE if protocol == 1 else RW2_TYPE
    return http_request(url + '/write', 'POST', body, {
        'Content-Type': content_type, 'Content-Encoding': 'snappy',
        'X-Prometheus-Remote-Write-Version': '0.1.0' if protocol == 1 else '2.0.0',
        **(headers or {})})


def wait_until(predicate, timeout, interval=0.1, what='condition'):
    """Poll predicate until it returns a true value; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (OSError, http.client.HTTPException) as error:
            last = error
        else:
            if last:
                return last
        time.sleep(interval)
    pytest.fail(f'timed out after {timeout} s waiting for {what}; last: {last!r}'[:2000])


class Gunicorn:
    """k8s_exporter under a real gunicorn, started as `make run` starts it."""

    def __init__(self, env=None, port=None, extra_args=()):
        self.port = port or free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.env = {**os.environ, **(env or {})}
        self.extra_args = list(extra_args)
        self.process = None
        self.log = b''

    def start(self):
        self.process = subprocess.Popen(
            [str(VENV_BIN / 'gunicorn'), '-w', '1', '--threads', '8',
             '-b', f'127.0.0.1:{self.port}', *self.extra_args, 'k8s_exporter:app'],
            cwd=HERE, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_until(lambda: self.process.poll() is not None or
                   http_request(self.url + '/-/healthy', timeout=1)[0] == 200,
                   timeout=20, what='gunicorn to answer /-/healthy')
        if self.process.poll() is not None:
            self.stop()
            pytest.fail(f'gunicorn exited at start-up:\n{self.log.decode(errors="replace")}')
        return self

    def stop(self, sig=signal.SIGTERM):
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.log, _ = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.log, _ = self.process.communicate()
        self.process = None

    def metrics(self):
        status, _, body = http_request(self.url + '/metrics')
        assert status == 200
        return body.decode()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


@pytest.fixture(scope='module')
def server():
    """One gunicorn shared by the HTTP tests that tolerate each other's data."""
    with Gunicorn() as running:
        yield running


def fresh_app(**config):
    return Exporter(Config(**config))


###############################################################################
# The seed ####################################################################
###############################################################################

def test_seed_exposition_is_reproduced_byte_for_byte_from_rw1():
    app = fresh_app()
    status, _, _ = call_wsgi(app, 'POST', '/write', rw1_body(seed_table()),
                             {'Content-Type': RW1_TYPE, 'Content-Encoding': 'snappy'})
    assert status == 204
    status, headers, body = call_wsgi(app, 'GET', '/metrics')
    assert status == 200
    assert headers['Content-Type'] == 'text/plain; version=0.0.4; charset=utf-8'
    assert pod_families(body.decode()) == SEED_EXPOSITION


def test_seed_exposition_is_reproduced_byte_for_byte_from_rw2():
    app = fresh_app()
    status, headers, _ = call_wsgi(app, 'POST', '/write', rw2_body(seed_table()),
                                   {'Content-Type': RW2_TYPE, 'Content-Encoding': 'snappy'})
    assert status == 204
    assert headers['X-Prometheus-Remote-Write-Samples-Written'] == str(len(seed_table()))
    assert pod_families(call_wsgi(app, 'GET', '/metrics')[2].decode()) == SEED_EXPOSITION


def test_seed_exposition_in_this_file_is_the_seeds_own_block():
    if not SEED_FILE.exists():
        pytest.skip(f'{SEED_FILE} not present')
    seed_lines = [line.strip() for line in SEED_FILE.read_text(encoding='utf-8').splitlines()]
    start = seed_lines.index('# HELP container_cpu_load_average_10s Average load of '
                             'container CPU over the past 10 seconds')
    block = [line for line in seed_lines[start:] if line.startswith(
        ('container_', '# HELP container_', '# TYPE container_'))]
    assert '\n'.join(block) + '\n' == SEED_EXPOSITION
