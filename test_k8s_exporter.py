"""The specification of k8s_exporter, as tests.

Sections follow k8s_exporter.py: configuration, remote-write decoding,
cAdvisor-to-pod mapping, the store, exposition, the WSGI app, then a real
gunicorn over HTTP, then the real Prometheus pipeline.

Run with `make test`.
"""

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


###############################################################################
# Configuration ###############################################################
###############################################################################

def test_config_defaults_are_the_documented_ones():
    config = Config.from_environ({})
    assert config == Config(cluster='k8s-cluster', ttl_seconds=300.0,
                            max_body_bytes=10 * 1024 * 1024, max_decoded_bytes=64 * 1024 * 1024,
                            max_series=1_000_000, metrics=tuple(sorted(k8s_exporter.SEED_HELP)),
                            listen='0.0.0.0:9201')


def test_config_reads_every_variable():
    config = Config.from_environ({
        'K8S_EXPORTER_CLUSTER': 'prod-eu', 'K8S_EXPORTER_TTL_SECONDS': '2.5',
        'K8S_EXPORTER_MAX_BODY_BYTES': '1000', 'K8S_EXPORTER_MAX_DECODED_BYTES': '2000',
        'K8S_EXPORTER_MAX_SERIES': '30', 'K8S_EXPORTER_LISTEN': '127.0.0.1:9300',
        'K8S_EXPORTER_METRICS': 'container_memory_rss, container_memory_usage_bytes,'})
    assert config == Config(cluster='prod-eu', ttl_seconds=2.5, max_body_bytes=1000,
                            max_decoded_bytes=2000, max_series=30, listen='127.0.0.1:9300',
                            metrics=('container_memory_rss', 'container_memory_usage_bytes'))


@pytest.mark.parametrize('name, value, message', [
    ('K8S_EXPORTER_TTL_SECONDS', 'abc', "K8S_EXPORTER_TTL_SECONDS='abc': not a number"),
    ('K8S_EXPORTER_TTL_SECONDS', '0', "K8S_EXPORTER_TTL_SECONDS='0': must be greater than 0"),
    ('K8S_EXPORTER_TTL_SECONDS', 'nan', "K8S_EXPORTER_TTL_SECONDS='nan': must be greater than 0"),
    ('K8S_EXPORTER_MAX_BODY_BYTES', '1.5', "K8S_EXPORTER_MAX_BODY_BYTES='1.5': not an integer"),
    ('K8S_EXPORTER_MAX_SERIES', '-1', "K8S_EXPORTER_MAX_SERIES='-1': must be greater than 0"),
    ('K8S_EXPORTER_CLUSTER', ' ', 'K8S_EXPORTER_CLUSTER is set but empty'),
    ('K8S_EXPORTER_METRICS', 'container memory', "K8S_EXPORTER_METRICS: 'container memory' is "
                                                 "not a valid metric name"),
    ('K8S_EXPORTER_METRICS', ',', "K8S_EXPORTER_METRICS=',': names no metric"),
    ('K8S_EXPORTER_LISTEN', '9201', "K8S_EXPORTER_LISTEN='9201': expected HOST:PORT"),
])
def test_config_rejects_a_bad_value_naming_the_variable(name, value, message):
    with pytest.raises(ConfigError) as raised:
        Config.from_environ({name: value})
    assert str(raised.value) == message


def test_metrics_variable_replaces_the_five_and_unknown_names_get_a_generic_help():
    app = fresh_app(metrics=('container_memory_rss', 'container_memory_usage_bytes'))
    table = [(cadvisor('container_memory_rss', 'ns', 'p'), [(7, 1)]),
             (cadvisor('container_memory_usage_bytes', 'ns', 'p'), [(8, 1)]),
             (cadvisor('container_fs_usage_bytes', 'ns', 'p', 'c', '/x/pod1/c'), [(9, 1)])]
    assert call_wsgi(app, 'POST', '/write', rw1_body(table))[0] == 204
    assert pod_families(call_wsgi(app, 'GET', '/metrics')[2].decode()) == (
        '# HELP container_memory_rss cAdvisor container_memory_rss, one value per pod\n'
        '# TYPE container_memory_rss gauge\n'
        'container_memory_rss{cluster="k8s-cluster",item="container_memory_rss",'
        'job="kubernetes-cadvisor",namespace="ns",pod="p"} 7\n'
        '# HELP container_memory_usage_bytes The current memory usage of the container '
        '(unit: bytes)\n'
        '# TYPE container_memory_usage_bytes gauge\n'
        'container_memory_usage_bytes{cluster="k8s-cluster",item="container_memory_usage_bytes",'
        'job="kubernetes-cadvisor",namespace="ns",pod="p"} 8\n')


###############################################################################
# Remote-write decoding #######################################################
###############################################################################

@pytest.mark.parametrize('content_type, encoding, protocol', [
    ('', '', PROTO_RW1),
    ('application/x-protobuf', 'snappy', PROTO_RW1),
    ('application/x-protobuf;proto=prometheus.WriteRequest', '', PROTO_RW1),
    ('application/x-protobuf; proto=io.prometheus.write.v2.Request', 'snappy', PROTO_RW2),
    ('Application/X-Protobuf;proto="io.prometheus.write.v2.Request"', 'SNAPPY', PROTO_RW2),
])
def test_protocol_is_negotiated_from_content_type_like_prometheus(content_type, encoding,
                                                                  protocol):
    assert negotiate_protocol(content_type, encoding) == protocol


@pytest.mark.parametrize('content_type, encoding, reason', [
    ('application/json', 'snappy',
     "unsupported Content-Type 'application/json'; expected application/x-protobuf"),
    ('application/x-protobuf;proto=io.prometheus.write.v3.Request', 'snappy',
     "unsupported proto 'io.prometheus.write.v3.Request'; expected prometheus.WriteRequest "
     "or io.prometheus.write.v2.Request"),
    ('application/x-protobuf', 'gzip', "unsupported Content-Encoding 'gzip'; expected snappy"),
    ('application/x-protobuf', 'zstd', "unsupported Content-Encoding 'zstd'; expected snappy"),
])
def test_unsupported_content_type_proto_or_encoding_is_415(content_type, encoding, reason):
    with pytest.raises(RequestError) as raised:
        negotiate_protocol(content_type, encoding)
    assert (raised.value.status, raised.value.reason) == (415, reason)


def test_decoded_size_over_the_limit_is_413_before_decompressing():
    # A 5-byte header announcing 2**32-1 bytes and no data: decompressing
    # would fail or allocate; the limit must answer first.
    with pytest.raises(RequestError) as raised:
        k8s_exporter.decompress_body(b'\xff\xff\xff\xff\x0f', 1000)
    assert (raised.value.status, raised.value.reason) == (
        413, 'decoded body of 4294967295 bytes exceeds the limit of 1000')


def test_rw1_decoding_keeps_only_exported_metrics_with_a_pod():
    table = seed_table(timestamp=5)
    decoded = decode_write_request(rw1_body(table, compress=False), PROTO_RW1,
                                   {'container_memory_usage_bytes': 0}, 'k8s-cluster')
    assert decoded.samples_total == len(table)
    assert decoded.no_pod == 1            # the node's root cgroup
    assert decoded.unexported == len(table) - len(SEED_PODS) - 1
    assert [(s.pod.pod, s.metric, s.timestamp_ms, s.value) for s in decoded.samples] == [
        (pod, 0, 5, memory) for _, pod, *_, memory in SEED_PODS]


def test_rw2_decoding_gives_the_same_samples_as_rw1():
    table = seed_table(timestamp=5)
    wanted = {name: index for index, name in enumerate(k8s_exporter.DEFAULT_METRICS)}
    rw1 = decode_write_request(rw1_body(table, compress=False), PROTO_RW1, wanted, 'c')
    rw2 = decode_write_request(rw2_body(table, compress=False), PROTO_RW2, wanted, 'c')
    assert rw2 == rw1
    assert len(rw1.samples) == 5 * len(SEED_PODS)


def test_label_named_before___name___is_still_found():
    # Upper-case label names sort before "__name__".
    labels = {**cadvisor('container_memory_usage_bytes', 'ns', 'p'), 'Zone': 'a'}
    for build, protocol in ((rw1_body, PROTO_RW1), (rw2_body, PROTO_RW2)):
        decoded = decode_write_request(build([(labels, [(3, 1)])], compress=False), protocol,
                                       {'container_memory_usage_bytes': 0}, 'c')
        assert [sample.value for sample in decoded.samples] == [3]


###############################################################################
# cAdvisor series to pods #####################################################
###############################################################################

@pytest.mark.parametrize('labels, pod, series', [
    # kubelet >= 1.16, pod cgroup and a container
    ({'namespace': 'ns', 'pod': 'p', 'container': '', 'id': '/kubepods/burstable/podab-12'},
     PodKey('k8s-cluster', '', 'ns', 'p'),
     SeriesKey(True, '', '/kubepods/burstable/podab-12', '', '')),
    ({'namespace': 'ns', 'pod': 'p', 'container': 'app', 'id': '/kubepods/podab/0f',
      'image': 'nginx', 'device': '/dev/sda', 'job': 'j', 'cluster': 'east'},
     PodKey('east', 'j', 'ns', 'p'), SeriesKey(False, 'app', '/kubepods/podab/0f', 'nginx',
                                               '/dev/sda')),
    # kubelet < 1.16
    ({'namespace': 'ns', 'pod_name': 'p', 'container_name': 'POD', 'id': '/kubepods/podab/1'},
     PodKey('k8s-cluster', '', 'ns', 'p'), SeriesKey(False, 'POD', '/kubepods/podab/1', '', '')),
    # standalone cAdvisor
    ({'container_label_io_kubernetes_pod_namespace': 'ns',
      'container_label_io_kubernetes_pod_name': 'p',
      'container_label_io_kubernetes_container_name': 'app', 'id': '/docker/0f'},
     PodKey('k8s-cluster', '', 'ns', 'p'), SeriesKey(False, 'app', '/docker/0f', '', '')),
    # systemd driver: the pod slice is the pod cgroup, a scope below it is a container
    ({'namespace': 'ns', 'pod': 'p',
      'id': '/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podab_12.slice'},
     PodKey('k8s-cluster', '', 'ns', 'p'),
     SeriesKey(True, '', '/kubepods.slice/kubepods-besteffort.slice/'
                         'kubepods-besteffort-podab_12.slice', '', '')),
    # containerd pause: no container label, but an id one level below the pod
    ({'namespace': 'ns', 'pod': 'p', 'id': '/kubepods/besteffort/podab/0f0f', 'image': 'pause'},
     PodKey('k8s-cluster', '', 'ns', 'p'),
     SeriesKey(False, '', '/kubepods/besteffort/podab/0f0f', 'pause', '')),
])
def test_pod_identity_in_each_label_convention(labels, pod, series):
    assert pod_series_identity(labels, 'k8s-cluster') == (pod, series)


@pytest.mark.parametrize('labels', [
    {'id': '/'},
    {'id': '/system.slice/docker.service'},
    {'namespace': '', 'pod_name': '', 'container_name': '', 'id': '/kubepods/burstable/podab'},
    {'name': 'some-docker-container', 'id': '/docker/0f', 'image': 'redis'},
    {'namespace': 'ns', 'pod': ''},
])
def test_series_without_pod_identity_are_not_exported(labels):
    assert pod_series_identity(labels, 'k8s-cluster') is None


def series_map(*entries):
    """{SeriesKey: (ts, value, received)} from (pod_cgroup, container, device, value)."""
    return {SeriesKey(pod_cgroup, container, f'/{container}', '', device): (1, value, 0.0)
            for pod_cgroup, container, device, value in entries}


def test_pod_cgroup_series_wins_over_container_sum():
    series = series_map((True, '', '', 100.0), (False, 'POD', '', 1.0), (False, 'app', '', 2.0))
    assert pod_value(k8s_exporter.RULE_POD_CGROUP, series) == 100.0


def test_without_pod_cgroup_the_containers_are_summed_pause_included():
    series = series_map((False, 'POD', '', 1.0), (False, 'app', '', 2.0), (False, 'b', '', 4.0))
    assert pod_value(k8s_exporter.RULE_POD_CGROUP, series) == 7.0


def test_fs_usage_sums_containers_and_devices():
    series = series_map((False, 'POD', '/dev/a', 1.0), (False, 'app', '/dev/a', 2.0),
                        (False, 'app', '/dev/b', 4.0), (True, '', '/dev/a', 100.0))
    assert pod_value(k8s_exporter.RULE_SUM, series) == 7.0


def test_fs_limit_counts_each_device_once():
    series = series_map((False, 'POD', '/dev/a', 10.0), (False, 'app', '/dev/a', 10.0),
                        (False, 'app', '/dev/b', 5.0))
    assert pod_value(k8s_exporter.RULE_DEVICE_LIMIT, series) == 15.0


def test_fs_rules_without_container_series_give_no_value():
    series = series_map((True, '', '/dev/a', 10.0))
    assert pod_value(k8s_exporter.RULE_SUM, series) is None
    assert pod_value(k8s_exporter.RULE_DEVICE_LIMIT, series) is None
    assert pod_value(k8s_exporter.RULE_POD_CGROUP, {}) is None


def test_aggregation_rule_per_metric_name():
    assert [k8s_exporter.aggregation_rule(name) for name in k8s_exporter.DEFAULT_METRICS] == [
        'pod_cgroup', 'device', 'sum', 'pod_cgroup', 'pod_cgroup']
    assert k8s_exporter.aggregation_rule('container_fs_inodes_total') == 'sum'


def test_pod_value_through_the_app_pod_cgroup_container_sum_and_fs():
    app = fresh_app()
    pod_cgroup = '/kubepods/burstable/pod11111111-2222'
    table = [
        (cadvisor('container_memory_usage_bytes', 'ns', 'with-cgroup', cgroup=pod_cgroup),
         [(1000, 1)]),
        (cadvisor('container_memory_usage_bytes', 'ns', 'with-cgroup', 'POD',
                  pod_cgroup + '/aa'), [(10, 1)]),
        (cadvisor('container_memory_usage_bytes', 'ns', 'with-cgroup', 'app',
                  pod_cgroup + '/bb'), [(20, 1)]),
        (cadvisor('container_memory_usage_bytes', 'ns', 'no-cgroup', 'POD', '/x/pod9/aa'),
         [(10, 1)]),
        (cadvisor('container_memory_usage_bytes', 'ns', 'no-cgroup', 'app', '/x/pod9/bb'),
         [(20, 1)]),
    ]
    for device, container, usage, limit in (('/dev/a', 'POD', 1, 100), ('/dev/a', 'app', 2, 100),
                                            ('/dev/b', 'app', 4, 50)):
        cgroup = f'{pod_cgroup}/{container}'
        table += [(cadvisor('container_fs_usage_bytes', 'ns', 'with-cgroup', container, cgroup,
                            device=device), [(usage, 1)]),
                  (cadvisor('container_fs_limit_bytes', 'ns', 'with-cgroup', container, cgroup,
                            device=device), [(limit, 1)])]
    assert call_wsgi(app, 'POST', '/write', rw1_body(table))[0] == 204
    values = {(name, dict(labels)['pod']): value for (name, labels), value in
              parse_exposition(call_wsgi(app, 'GET', '/metrics')[2].decode()).items()
              if name.startswith('container_')}
    assert values == {('container_memory_usage_bytes', 'with-cgroup'): 1000,
                      ('container_memory_usage_bytes', 'no-cgroup'): 30,
                      ('container_fs_usage_bytes', 'with-cgroup'): 7,
                      ('container_fs_limit_bytes', 'with-cgroup'): 150}


def test_incoming_cluster_label_wins_and_job_is_kept():
    app = fresh_app(cluster='default-cluster')
    table = [(cadvisor('container_memory_usage_bytes', 'ns', 'a', job='kubelet',
                       cluster='east'), [(1, 1)]),
             (cadvisor('container_memory_usage_bytes', 'ns', 'b', job='kubelet'), [(2, 1)])]
    call_wsgi(app, 'POST', '/write', rw1_body(table))
    assert pod_families(call_wsgi(app, 'GET', '/metrics')[2].decode()).splitlines()[2:] == [
        'container_memory_usage_bytes{cluster="default-cluster",item="container_memory_usage_'
        'bytes",job="kubelet",namespace="ns",pod="b"} 2',
        'container_memory_usage_bytes{cluster="east",item="container_memory_usage_bytes",'
        'job="kubelet",namespace="ns",pod="a"} 1']


###############################################################################
# The store ###################################################################
###############################################################################

MEMORY = 'container_memory_usage_bytes'


def memory_of(app, pod='p'):
    """The exported memory value of one pod, or None when the pod is not shown."""
    for (name, labels), value in parse_exposition(
            call_wsgi(app, 'GET', '/metrics')[2].decode()).items():
        if name == MEMORY and dict(labels)['pod'] == pod:
            return value
    return None


def post(app, table, protocol=1, **headers):
    body = rw1_body(table) if protocol == 1 else rw2_body(table)
    return call_wsgi(app, 'POST', '/write', body,
                     {'Content-Type': RW1_TYPE if protocol == 1 else RW2_TYPE, **headers})


def test_newer_sample_replaces_older_and_older_or_equal_is_ignored():
    app = fresh_app()
    labels = cadvisor(MEMORY, 'ns', 'p')
    post(app, [(labels, [(10, 2000)])])
    post(app, [(labels, [(20, 3000)])])
    assert memory_of(app) == 20
    post(app, [(labels, [(30, 3000)])])     # equal timestamp
    post(app, [(labels, [(40, 1000)])])     # older
    assert memory_of(app) == 20
    assert 'k8s_exporter_samples_ignored_total{reason="out_of_order"} 2\n' in (
        call_wsgi(app, 'GET', '/metrics')[2].decode())


def test_of_several_samples_in_one_series_the_newest_wins():
    app = fresh_app()
    post(app, [(cadvisor(MEMORY, 'ns', 'p'), [(1, 100), (3, 300), (2, 200)])])
    assert memory_of(app) == 3


@pytest.mark.parametrize('protocol', [1, 2])
def test_stale_marker_removes_the_series_and_an_empty_pod_disappears(protocol):
    app = fresh_app()
    pod_cgroup = cadvisor(MEMORY, 'ns', 'p', cgroup='/kubepods/podab')
    container = cadvisor(MEMORY, 'ns', 'p', 'app', '/kubepods/podab/cc')
    post(app, [(pod_cgroup, [(100, 1)]), (container, [(7, 1)])], protocol)
    assert memory_of(app) == 100
    post(app, [(pod_cgroup, [(STALE_NAN, 2)])], protocol)
    assert memory_of(app) == 7          # back to the sum of containers
    post(app, [(container, [(STALE_NAN, 2)])], protocol)
    page = call_wsgi(app, 'GET', '/metrics')[2].decode()
    assert pod_families(page) == ''
    assert 'k8s_exporter_pods 0\n' in page and 'k8s_exporter_input_series 0\n' in page
    assert 'k8s_exporter_stale_markers_total 2\n' in page


def test_nan_and_infinities_other_than_stale_markers_are_stored_and_printed():
    app = fresh_app()
    post(app, [(cadvisor(MEMORY, 'ns', 'nan'), [(math.nan, 1)]),
               (cadvisor(MEMORY, 'ns', 'inf'), [(math.inf, 1)]),
               (cadvisor(MEMORY, 'ns', 'ninf'), [(-math.inf, 1)])])
    assert [line.rpartition(' ')[2] for line in pod_families(
        call_wsgi(app, 'GET', '/metrics')[2].decode()).splitlines()[2:]] == [
        '+Inf', 'NaN', '-Inf']    # pods inf, nan, ninf in label order


def test_series_not_received_for_the_ttl_are_forgotten():
    store = k8s_exporter.Store(Config(ttl_seconds=10))
    pod = PodKey('c', 'j', 'ns', 'p')
    old = k8s_exporter.Sample(pod, 0, SeriesKey(False, 'a', '/a', '', ''), 1, 5.0)
    new = k8s_exporter.Sample(pod, 0, SeriesKey(False, 'b', '/b', '', ''), 1, 6.0)
    store.apply([old], received=100.0)
    store.apply([new], received=105.0)
    store.expire(now=109.0)
    assert store.snapshot().lines[0][pod].endswith('} 11\n')
    store.expire(now=111.0)     # 'a' is 11 s old
    snapshot = store.snapshot()
    assert snapshot.lines[0][pod].endswith('} 6\n') and snapshot.series_count == 1
    store.expire(now=200.0)
    snapshot = store.snapshot()
    assert snapshot.pods == [] and snapshot.lines[0] == {} and snapshot.series_count == 0
    assert snapshot.counters.expired_series == 2


def test_ttl_expiry_reaches_the_metrics_page_without_writes():
    app = fresh_app(ttl_seconds=0.3)
    post(app, [(cadvisor(MEMORY, 'ns', 'p'), [(1, 1)])])
    assert memory_of(app) == 1
    time.sleep(0.4)
    assert memory_of(app) is None


def test_series_limit_refuses_new_series_and_keeps_updating_known_ones():
    app = fresh_app(max_series=2)
    a, b, c = (cadvisor(MEMORY, 'ns', pod) for pod in 'abc')
    assert post(app, [(a, [(1, 1)]), (b, [(2, 1)])])[0] == 204
    status, headers, body = post(app, [(a, [(10, 2)]), (c, [(30, 2)])], protocol=2)
    assert status == 400
    assert body == (b'1 samples of new series refused: K8S_EXPORTER_MAX_SERIES=2 reached; '
                    b'known series still update\n')
    assert headers['X-Prometheus-Remote-Write-Samples-Written'] == '1'
    assert (memory_of(app, 'a'), memory_of(app, 'c')) == (10, None)
    assert 'k8s_exporter_samples_ignored_total{reason="series_limit"} 1\n' in (
        call_wsgi(app, 'GET', '/metrics')[2].decode())


def test_two_series_of_one_pod_never_overwrite_each_other():
    # containerd: pause and pod cgroup differ only by id.
    app = fresh_app(metrics=('container_cpu_usage_seconds_total',))
    base = cadvisor('container_cpu_usage_seconds_total', 'ns', 'p')
    table = [({**base, 'id': '/kubepods/podab/p1'}, [(1, 1)]),
             ({**base, 'id': '/kubepods/podab/p2'}, [(2, 1)]),
             ({**base, 'id': '/kubepods/podab/p2', 'image': 'x'}, [(4, 1)])]
    post(app, table)
    assert 'job="kubernetes-cadvisor",namespace="ns",pod="p"} 7\n' in (
        call_wsgi(app, 'GET', '/metrics')[2].decode())


def test_a_scrape_sees_all_of_a_write_request_or_none_of_it():
    # Each request sets all 200 pods to the same value; a torn scrape would
    # show two different values at once.
    app = fresh_app()
    stop = time.monotonic() + 1.5
    bodies = [rw1_body([(cadvisor(MEMORY, 'ns', f'pod-{n:03d}'), [(value, value)])
                        for n in range(200)]) for value in range(1, 40)]
    errors = []

    def writer():
        for body in bodies:
            app(dict(REQUEST_METHOD='POST', PATH_INFO='/write', CONTENT_LENGTH=str(len(body)),
                     CONTENT_TYPE=RW1_TYPE, **{'wsgi.input': io.BytesIO(body)}),
                lambda status, headers: None)

    import threading
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while thread.is_alive() and time.monotonic() < stop:
            values = {value for (name, _), value in parse_exposition(
                call_wsgi(app, 'GET', '/metrics')[2].decode()).items() if name == MEMORY}
            if len(values) > 1:
                errors.append(values)
    finally:
        thread.join(timeout=30)
    assert errors == []
    assert memory_of(app, 'pod-000') == 39


###############################################################################
# Exposition ##################################################################
###############################################################################

@pytest.mark.parametrize('value, text', [
    (0.0, '0'), (-0.0, '-0'), (1.0, '1'), (-7.0, '-7'), (122880.0, '122880'),
    (999999.0, '999999'), (1e6, '1e+06'), (3985408.0, '3.985408e+06'),
    (42090070016.0, '4.2090070016e+10'), (5771784192.0, '5.771784192e+09'),
    (0.5, '0.5'), (123.456, '123.456'), (0.0001, '0.0001'), (0.00001, '1e-05'),
    (1.5e-07, '1.5e-07'), (1e21, '1e+21'), (1e100, '1e+100'), (2.5e-300, '2.5e-300'),
    (5e-324, '5e-324'), (1.7976931348623157e308, '1.7976931348623157e+308'),
    (9007199254740993.0, '9.007199254740992e+15'), (-1234567.5, '-1.2345675e+06'),
    (math.nan, 'NaN'), (math.inf, '+Inf'), (-math.inf, '-Inf'),
])
def test_floats_are_spelled_as_go_formatfloat_g_minus_one(value, text):
    assert format_go_float(value) == text


def test_label_values_escape_backslash_quote_and_newline():
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    app = fresh_app()
    post(app, [(cadvisor(MEMORY, 'n"s', 'p\\o\nd'), [(1, 1)])])
    assert pod_families(call_wsgi(app, 'GET', '/metrics')[2].decode()).splitlines()[2] == (
        'container_memory_usage_bytes{cluster="k8s-cluster",item="container_memory_usage_bytes",'
        'job="kubernetes-cadvisor",namespace="n\\"s",pod="p\\\\o\\nd"} 1')


def test_help_text_escapes_only_backslash_and_newline():
    assert k8s_exporter.escape_help('a\\b"c\nd') == 'a\\\\b"c\\nd'


def test_families_are_in_name_order_and_series_in_label_order():
    app = fresh_app()
    table = [(cadvisor(name, namespace, pod), [(1, 1)])
             for name in reversed(k8s_exporter.DEFAULT_METRICS)
             for namespace, pod in (('b', 'a'), ('a', 'z'), ('a', 'b'))
             if not name.startswith('container_fs')]
    post(app, table)
    lines = call_wsgi(app, 'GET', '/metrics')[2].decode().splitlines()
    types = [line.split()[2] for line in lines if line.startswith('# TYPE')]
    assert types == sorted(types)
    cpu = [line.split(',namespace=')[1].split('}')[0] for line in lines
           if line.startswith('container_cpu_load_average_10s{')]
    assert cpu == ['"a",pod="b"', '"a",pod="z"', '"b",pod="a"']


def test_metrics_are_gzipped_when_the_scraper_accepts_it():
    app = fresh_app()
    post(app, seed_table())
    status, headers, body = call_wsgi(app, 'GET', '/metrics', headers={
        'Accept-Encoding': 'gzip'})
    assert (status, headers['Content-Encoding']) == (200, 'gzip')
    assert int(headers['Content-Length']) == len(body)
    assert pod_families(gzip.decompress(body).decode()) == SEED_EXPOSITION
    # The cached compressed families are reused with a fresh tail.
    second = gzip.decompress(call_wsgi(app, 'GET', '/metrics', headers={
        'Accept-Encoding': 'deflate, gzip;q=0.5'})[2]).decode()
    assert pod_families(second) == SEED_EXPOSITION
    assert 'k8s_exporter_http_requests_total{code="200",handler="metrics"} 1\n' in second
    assert 'Content-Encoding' not in call_wsgi(app, 'GET', '/metrics', headers={
        'Accept-Encoding': 'gzip;q=0'})[1]


def test_self_metrics_follow_the_pod_families_as_the_seed_shows():
    app = fresh_app()
    post(app, seed_table())
    post(app, [({'job': 'j'}, [(1, 1)])])            # a series without __name__
    call_wsgi(app, 'GET', '/nope')
    page = call_wsgi(app, 'GET', '/metrics')[2].decode()
    assert page.startswith(SEED_EXPOSITION)
    assert page.endswith(
        '# HELP promhttp_metric_handler_errors_total Total number of internal errors '
        'encountered by the promhttp metric handler.\n'
        '# TYPE promhttp_metric_handler_errors_total counter\n'
        'promhttp_metric_handler_errors_total{cause="encoding"} 0\n'
        'promhttp_metric_handler_errors_total{cause="gathering"} 0\n')
    samples = parse_exposition(page)
    expected = {
        ('k8s_exporter_http_requests_total', (('code', '204'), ('handler', 'write'))): 1,
        ('k8s_exporter_http_requests_total', (('code', '400'), ('handler', 'write'))): 1,
        ('k8s_exporter_http_requests_total', (('code', '404'), ('handler', 'unknown'))): 1,
        ('k8s_exporter_samples_received_total', ()): len(seed_table()),
        ('k8s_exporter_samples_ignored_total', (('reason', 'unexported_metric'),)): 1,
        ('k8s_exporter_samples_ignored_total', (('reason', 'no_pod'),)): 1,
        ('k8s_exporter_samples_ignored_total', (('reason', 'invalid_series'),)): 1,
        ('k8s_exporter_input_series', ()): 25,
        ('k8s_exporter_pods', ()): 5,
        ('k8s_exporter_write_duration_seconds_count', ()): 2,
    }
    assert {key: samples[(key[0], frozenset(key[1]))] for key in expected} == expected
    assert samples[('k8s_exporter_last_write_success_timestamp_seconds', frozenset())] == (
        pytest.approx(time.time(), abs=5))
    for name in ('process_resident_memory_bytes', 'process_cpu_seconds_total',
                 'process_start_time_seconds', 'process_open_fds'):
        assert samples[(name, frozenset())] > 0


@pytest.mark.skipif(not Path('/usr/bin/promtool').exists(), reason='promtool not installed')
def test_promtool_check_metrics_is_silent_on_the_whole_page():
    app = fresh_app()
    post(app, seed_table())
    post(app, [(cadvisor(MEMORY, 'n"s', 'p\\o\nd'), [(math.nan, 1)])])
    page = call_wsgi(app, 'GET', '/metrics')[2]
    result = subprocess.run(['promtool', 'check', 'metrics'], input=page, capture_output=True,
                            timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (0, b'', b'')


###############################################################################
# WSGI app ####################################################################
###############################################################################

def test_write_answers_204_without_body_or_content_type():
    status, headers, body = post(fresh_app(), seed_table())
    assert (status, headers, body) == (204, {}, b'')


def test_write_is_also_served_at_api_v1_write():
    app = fresh_app()
    assert call_wsgi(app, 'POST', '/api/v1/write', rw1_body(seed_table()))[0] == 204
    assert memory_of(app, 'task-pv-pod') == 5111808


def test_rw2_success_always_sends_the_written_headers_counting_unexported_samples():
    app = fresh_app()
    status, headers, _ = post(app, seed_table(), protocol=2)
    assert status == 204
    assert {name: value for name, value in headers.items() if name.startswith('X-')} == {
        'X-Prometheus-Remote-Write-Samples-Written': str(len(seed_table())),
        'X-Prometheus-Remote-Write-Histograms-Written': '0',
        'X-Prometheus-Remote-Write-Exemplars-Written': '0'}


def test_rw2_histograms_and_exemplars_are_accepted_and_ignored():
    request = remote_pb2.WriteRequestV2()
    request.MergeFromString(snappy.uncompress(rw2_body(seed_table()[:1])))
    # Field 3 (histograms) and 4 (exemplars) of TimeSeries: unknown here.
    request.timeseries[0].MergeFromString(b'\x1a\x02\x08\x01' + b'\x22\x02\x11\x00')
    status, headers, _ = call_wsgi(fresh_app(), 'POST', '/write',
                                   snappy.compress(request.SerializeToString()),
                                   {'Content-Type': RW2_TYPE})
    assert status == 204
    assert headers['X-Prometheus-Remote-Write-Samples-Written'] == '1'
    assert headers['X-Prometheus-Remote-Write-Histograms-Written'] == '0'


def test_metadata_only_rw1_request_is_accepted():
    request = remote_pb2.WriteRequest()
    request.metadata.add(type=1, metric_family_name=MEMORY, help='Current memory usage.')
    assert call_wsgi(fresh_app(), 'POST', '/write', snappy.compress(
        request.SerializeToString()), {'Content-Type': RW1_TYPE})[0] == 204


def test_empty_write_request_is_accepted():
    assert call_wsgi(fresh_app(), 'POST', '/write', snappy.compress(b''))[0] == 204


def rejection(app, body, headers=None, **kwargs):
    """(status, content type, body text) of a refused request; checks it is one line."""
    status, response_headers, data = call_wsgi(app, 'POST', '/write', body, headers, **kwargs)
    text = data.decode()
    assert text.endswith('\n') and '\n' not in text[:-1]
    return status, response_headers.get('Content-Type'), text[:-1]


@pytest.mark.parametrize('body, headers, expected', [
    (b'junk', {'Content-Type': 'text/plain'}, (415, "unsupported Content-Type 'text/plain'; "
                                                    "expected application/x-protobuf")),
    (b'junk', {'Content-Encoding': 'gzip'}, (415, "unsupported Content-Encoding 'gzip'; "
                                                  "expected snappy")),
    (b'\x05junk', {}, (400, 'corrupt snappy: not a valid snappy block')),
    (snappy.compress(b'\xff\xff\xff'), {}, (400, 'corrupt protobuf: Error parsing message')),
    (snappy.compress(b'\x0a\x02\x0a\x00\x0a\x02'), {'Content-Type': RW2_TYPE},
     (400, 'corrupt protobuf: Error parsing message')),
    (b'', {}, (400, 'empty body')),
])
def test_bad_bodies_get_a_4xx_with_a_one_line_reason(body, headers, expected):
    status, content_type, reason = rejection(fresh_app(), body, headers)
    assert content_type == 'text/plain; charset=utf-8'
    assert (status, reason[:len(expected[1])]) == expected


def test_invalid_utf8_label_is_corrupt_protobuf():
    payload = remote_pb2.WriteRequest()
    payload.timeseries.add().labels.add(name='__name__', value=MEMORY)
    raw = payload.SerializeToString().replace(MEMORY.encode(), b'\xff' * len(MEMORY))
    assert rejection(fresh_app(), snappy.compress(raw))[0] == 400


@pytest.mark.parametrize('protocol, bad_series, reason', [
    (1, ({}, [(1, 1)]), 'series with no labels'),
    (1, ({'pod': 'p'}, [(1, 1)]), 'series with no __name__ label'),
    (2, ({}, [(1, 1)]), 'series with no labels'),
    (2, ({'pod': 'p'}, [(1, 1)]), 'series with no __name__ label'),
])
def test_bad_series_are_400_and_the_good_ones_of_the_request_still_apply(protocol, bad_series,
                                                                          reason):
    app = fresh_app()
    good = (cadvisor(MEMORY, 'ns', 'p'), [(42, 1), (43, 2)])
    status, headers, text = post(app, [good, bad_series, bad_series], protocol)
    assert (status, text.decode()) == (
        400, f'2 invalid series skipped, first: {reason}; the rest was applied\n')
    assert memory_of(app) == 43
    if protocol == 2:
        assert headers['X-Prometheus-Remote-Write-Samples-Written'] == '2'


def rw2_raw(symbols, refs_per_series):
    request = remote_pb2.WriteRequestV2(symbols=symbols)
    for refs in refs_per_series:
        request.timeseries.add(labels_refs=refs).samples.add(value=1, timestamp=1)
    return snappy.compress(request.SerializeToString())


@pytest.mark.parametrize('refs, reason', [
    ([1, 2, 3], 'series with an odd number of label refs'),
    ([1, 2, 3, 9], 'label ref out of range of 8 symbols'),
    ([1, 99], 'label ref out of range of 8 symbols'),
])
def test_rw2_bad_label_refs_are_400(refs, reason):
    symbols = ['', '__name__', MEMORY, 'namespace', 'ns', 'pod', 'p', 'job']
    app = fresh_app()
    status, content_type, text = rejection(app, rw2_raw(symbols, [refs, [1, 2, 3, 4, 5, 6]]),
                                           {'Content-Type': RW2_TYPE})
    assert (status, text) == (400, f'1 invalid series skipped, first: {reason}; '
                                   'the rest was applied')
    assert memory_of(app) == 1


def test_body_over_the_limit_is_413():
    app = fresh_app(max_body_bytes=100)
    body = rw1_body(seed_table())
    assert rejection(app, body) == (413, 'text/plain; charset=utf-8',
                                    f'body of {len(body)} bytes exceeds the limit of 100')
    # Without Content-Length (chunked), one byte over the limit is enough.
    assert rejection(app, b'x' * 101, content_length=False)[::2] == (
        413, 'body exceeds the limit of 100 bytes')


def test_decoded_body_over_the_limit_is_413():
    app = fresh_app(max_decoded_bytes=100)
    payload = rw1_body(seed_table(), compress=False)
    assert rejection(app, snappy.compress(payload))[::2] == (
        413, f'decoded body of {len(payload)} bytes exceeds the limit of 100')


def test_rejected_requests_never_cost_stored_data():
    app = fresh_app(max_body_bytes=5000)
    post(app, seed_table())
    before = pod_families(call_wsgi(app, 'GET', '/metrics')[2].decode())
    for body, headers in ((b'junk', {}), (b'x' * 6000, {}), (snappy.compress(b'\xff'), {}),
                          (b'junk', {'Content-Type': 'application/json'})):
        assert 400 <= call_wsgi(app, 'POST', '/write', body, headers)[0] < 500
    assert pod_families(call_wsgi(app, 'GET', '/metrics')[2].decode()) == before == (
        SEED_EXPOSITION)


@pytest.mark.parametrize('method, path, allow', [
    ('GET', '/write', 'POST'), ('PUT', '/api/v1/write', 'POST'),
    ('POST', '/metrics', 'GET, HEAD'), ('DELETE', '/-/healthy', 'GET, HEAD'),
])
def test_wrong_method_is_405_with_allow(method, path, allow):
    status, headers, body = call_wsgi(fresh_app(), method, path)
    assert (status, headers['Allow'], body) == (405, allow,
                                                f'method {method} not allowed\n'.encode())


def test_unknown_path_is_404():
    status, headers, body = call_wsgi(fresh_app(), 'GET', '/federate')
    assert (status, headers['Content-Type'], body) == (
        404, 'text/plain; charset=utf-8', b'not found; see / for the endpoints\n')


@pytest.mark.parametrize('path', ['/-/healthy', '/-/ready'])
def test_health_endpoints_answer_200(path):
    assert call_wsgi(fresh_app(), 'GET', path)[::2] == (200, b'k8s_exporter is Healthy.\n')


def test_index_page_links_metrics():
    status, headers, body = call_wsgi(fresh_app(), 'GET', '/')
    assert (status, headers['Content-Type']) == (200, 'text/html; charset=utf-8')
    assert b'<a href="metrics">/metrics</a>' in body


def test_head_metrics_has_headers_and_no_body():
    status, headers, body = call_wsgi(fresh_app(), 'HEAD', '/metrics')
    assert (status, headers['Content-Type'], body) == (200, k8s_exporter.CONTENT_TYPE_TEXT_004,
                                                       b'')


###############################################################################
# A real gunicorn over HTTP ###################################################
###############################################################################

@pytest.mark.parametrize('protocol', [1, 2])
def test_gunicorn_serves_the_seed_exposition_from_a_real_write(protocol):
    with Gunicorn(env={'K8S_EXPORTER_CLUSTER': 'k8s-cluster'}) as exporter:
        status, headers, body = write(exporter.url, seed_table(), protocol)
        assert (status, body) == (204, b'')
        if protocol == 2:
            assert headers['x-prometheus-remote-write-samples-written'] == str(len(seed_table()))
        status, headers, body = http_request(exporter.url + '/metrics')
        assert headers['content-type'] == 'text/plain; version=0.0.4; charset=utf-8'
        assert pod_families(body.decode()) == SEED_EXPOSITION
        status, headers, body = http_request(exporter.url + '/metrics',
                                             headers={'Accept-Encoding': 'gzip'})
        assert headers['content-encoding'] == 'gzip'
        assert pod_families(gzip.decompress(body).decode()) == SEED_EXPOSITION


def test_gunicorn_answers_bad_requests_with_4xx_and_keeps_serving(server):
    write(server.url, [(cadvisor(MEMORY, 'ns', 'keep-me'), [(5, 1)])])
    cases = [
        (('POST', b'junk', {'Content-Type': 'application/json'}), 415),
        (('POST', b'\x05junk', {'Content-Type': RW1_TYPE}), 400),
        (('POST', snappy.compress(b'\xff\xff'), {'Content-Type': RW1_TYPE}), 400),
        (('GET', None, {}), 405),
    ]
    for (method, body, headers), expected in cases:
        status, response_headers, text = http_request(server.url + '/write', method, body,
                                                      headers)
        assert status == expected
        assert response_headers['content-type'] == 'text/plain; charset=utf-8'
    assert http_request(server.url + '/nowhere')[0] == 404
    assert 'namespace="ns",pod="keep-me"} 5\n' in server.metrics()


def test_gunicorn_refuses_an_oversized_body_with_413():
    with Gunicorn(env={'K8S_EXPORTER_MAX_BODY_BYTES': '1000'}) as exporter:
        status, _, text = http_request(exporter.url + '/write', 'POST', b'\0' * 5000,
                                       {'Content-Type': RW1_TYPE})
        assert (status, text) == (413, b'body of 5000 bytes exceeds the limit of 1000\n')
        assert http_request(exporter.url + '/-/ready')[0] == 200


def test_bad_environment_stops_gunicorn_with_one_line_naming_the_variable():
    result = subprocess.run(
        [str(VENV_BIN / 'gunicorn'), '-b', f'127.0.0.1:{free_port()}', 'k8s_exporter:app'],
        cwd=HERE, env={**os.environ, 'K8S_EXPORTER_TTL_SECONDS': 'soon'},
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "k8s_exporter: K8S_EXPORTER_TTL_SECONDS='soon': not a number\n" in result.stderr
    assert 'Traceback' not in result.stderr


def test_python3_k8s_exporter_py_serves_on_the_configured_address():
    port = free_port()
    process = subprocess.Popen([sys.executable, 'k8s_exporter.py'], cwd=HERE,
                               env={**os.environ, 'K8S_EXPORTER_LISTEN': f'127.0.0.1:{port}'},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: http_request(f'http://127.0.0.1:{port}/-/healthy', timeout=1)[0] == 200,
                   timeout=20, what='python3 k8s_exporter.py to serve')
        assert write(f'http://127.0.0.1:{port}', seed_table())[0] == 204
        assert pod_families(http_request(f'http://127.0.0.1:{port}/metrics')[2].decode()) == (
            SEED_EXPOSITION)
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_python3_k8s_exporter_py_with_bad_environment_says_one_line():
    result = subprocess.run([sys.executable, 'k8s_exporter.py'], cwd=HERE,
                            env={**os.environ, 'K8S_EXPORTER_METRICS': 'bad name'},
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (
        4, "k8s_exporter: K8S_EXPORTER_METRICS: 'bad name' is not a valid metric name\n")


###############################################################################
# Authentication ##############################################################
###############################################################################

def basic(user_password):
    import base64
    return 'Basic ' + base64.b64encode(user_password.encode()).decode()


@pytest.fixture
def secured_app(tmp_path):
    (tmp_path / 'write-token').write_text('s3cret-write\n')
    (tmp_path / 'write-users').write_text('prometheus1:pw1\nbackup:pw2\n')
    (tmp_path / 'metrics-token').write_text('s3cret-read')
    config = Config.from_environ({
        'K8S_EXPORTER_WRITE_BEARER_TOKEN_FILE': str(tmp_path / 'write-token'),
        'K8S_EXPORTER_WRITE_BASIC_AUTH_FILE': str(tmp_path / 'write-users'),
        'K8S_EXPORTER_METRICS_BEARER_TOKEN_FILE': str(tmp_path / 'metrics-token')})
    return Exporter(config)


@pytest.mark.parametrize('authorization', [
    'Bearer s3cret-write', 'bearer s3cret-write', basic('prometheus1:pw1'), basic('backup:pw2')])
def test_write_accepts_the_configured_bearer_token_or_basic_auth(secured_app, authorization):
    assert post(secured_app, seed_table(), Authorization=authorization)[0] == 204


@pytest.mark.parametrize('authorization', [
    None, 'Bearer wrong', 'Bearer s3cret-read', basic('prometheus1:pw2'), basic('nobody:pw1'),
    'Basic !!notbase64', 'Digest s3cret-write', 'Bearer', ''])
def test_write_with_missing_or_wrong_credentials_is_401_with_a_challenge(secured_app,
                                                                        authorization):
    headers = {'Authorization': authorization} if authorization is not None else {}
    status, response_headers, body = call_wsgi(secured_app, 'POST', '/write',
                                               rw1_body(seed_table()), headers)
    assert (status, body) == (401, b'missing or wrong credentials\n')
    assert secured_app.store.snapshot().series_count == 0


def test_401_lists_every_accepted_scheme_and_is_counted(secured_app):
    environ_headers = []

    def start_response(status, headers, exc_info=None):
        environ_headers.extend(headers)

    secured_app({'REQUEST_METHOD': 'POST', 'PATH_INFO': '/write', 'wsgi.input': io.BytesIO()},
                start_response)
    assert [value for name, value in environ_headers if name == 'WWW-Authenticate'] == [
        'Bearer realm="k8s_exporter"', 'Basic realm="k8s_exporter", charset="UTF-8"']
    page = call_wsgi(secured_app, 'GET', '/metrics',
                     headers={'Authorization': 'Bearer s3cret-read'})[2].decode()
    assert 'k8s_exporter_http_requests_total{code="401",handler="write"} 1\n' in page


def test_metrics_auth_is_separate_and_health_stays_open(secured_app):
    assert call_wsgi(secured_app, 'GET', '/metrics')[0] == 401
    assert call_wsgi(secured_app, 'GET', '/metrics',
                     headers={'Authorization': 'Bearer s3cret-write'})[0] == 401
    assert call_wsgi(secured_app, 'GET', '/metrics',
                     headers={'Authorization': 'Bearer s3cret-read'})[0] == 200
    assert call_wsgi(secured_app, 'GET', '/-/healthy')[0] == 200
    assert call_wsgi(secured_app, 'GET', '/-/ready')[0] == 200


def test_credentials_never_appear_in_the_config_repr(secured_app):
    assert 's3cret' not in repr(secured_app.config) and 'pw1' not in repr(secured_app.config)


@pytest.mark.parametrize('content, message', [
    (None, "K8S_EXPORTER_WRITE_BEARER_TOKEN_FILE='{path}': cannot read: "
           "No such file or directory"),
    ('\n\n', "K8S_EXPORTER_WRITE_BEARER_TOKEN_FILE='{path}': file is empty"),
])
def test_unreadable_or_empty_secret_file_stops_start_up(tmp_path, content, message):
    path = tmp_path / 'token'
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as raised:
        Config.from_environ({'K8S_EXPORTER_WRITE_BEARER_TOKEN_FILE': str(path)})
    assert str(raised.value) == message.format(path=path)


def test_basic_auth_file_lines_must_be_user_colon_password(tmp_path):
    (tmp_path / 'users').write_text('just-a-user\n')
    with pytest.raises(ConfigError) as raised:
        Config.from_environ({'K8S_EXPORTER_METRICS_BASIC_AUTH_FILE': str(tmp_path / 'users')})
    assert str(raised.value) == ('K8S_EXPORTER_METRICS_BASIC_AUTH_FILE: every line must be '
                                 'user:password')


def test_gunicorn_enforces_write_and_scrape_credentials(tmp_path):
    (tmp_path / 'token').write_text('tok\n')
    (tmp_path / 'users').write_text('scraper:pw\n')
    with Gunicorn(env={'K8S_EXPORTER_WRITE_BEARER_TOKEN_FILE': str(tmp_path / 'token'),
                       'K8S_EXPORTER_METRICS_BASIC_AUTH_FILE': str(tmp_path / 'users')}) as exp:
        status, headers, _ = write(exp.url, seed_table())
        assert (status, headers['www-authenticate']) == (401, 'Bearer realm="k8s_exporter"')
        assert write(exp.url, seed_table(), headers={'Authorization': 'Bearer tok'})[0] == 204
        assert http_request(exp.url + '/metrics')[0] == 401
        status, _, body = http_request(exp.url + '/metrics',
                                       headers={'Authorization': basic('scraper:pw')})
        assert status == 200 and pod_families(body.decode()) == SEED_EXPOSITION
    assert b'tok' not in exp.log and b'scraper:pw' not in exp.log


def test_concurrent_decodes_are_bounded_by_the_configured_slots():
    app = fresh_app(max_concurrent_decodes=1)
    assert app.decode_slots.acquire(timeout=1)
    import threading
    result = []
    thread = threading.Thread(target=lambda: result.append(post(app, seed_table())[0]))
    thread.start()
    thread.join(timeout=0.3)
    assert thread.is_alive() and result == []      # waits for the slot, does not fail
    app.decode_slots.release()
    thread.join(timeout=10)
    assert result == [204]
