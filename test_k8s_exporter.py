"""The specification of k8s_exporter, as tests.

First the harness, which tests nothing of the exporter's: builders of
requests from tables, calling the WSGI app and a real gunicorn, one reader
of the text format and one model of the README's aggregation rules (both
written without the exporter's code, with tests of their own), and reading
the kubelet captures. Then the specification, in the README's order:

- protocol: remote-write decoding, every sender (compliance, bytes that are
  not UTF-8, clocks ahead), bad input (property-based);
- pod rules: cAdvisor series to pods, the real kubelet captures, the
  metrics pods are judged by;
- lifecycle: the store, and a pod's life (restarts, re-created pods, HA
  senders, replays);
- exposition: the seed's bytes, the text format;
- HTTP: the WSGI app, a real gunicorn;
- security: authentication;
- operations: configuration, the pages, deployment (the image, docker
  compose, Kubernetes);
- end to end: the real Prometheus pipeline (skipped, with the reason,
  without /usr/bin/prometheus and promtool; its harness lives in
  demo_k8s_exporter.py).

Run with `make test`. TEST_K8S_EXPORTER_SOAK_SECONDS (8 here, 60 in `make soak`)
sets the length of the soak; TEST_K8S_EXPORTER_PROPERTY_EXAMPLES (200) how long
hypothesis searches.
"""

import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import gzip
import html
import http.client
import importlib.util
import io
import json
import math
import operator
import os
import platform
import random
import re
import selectors
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import zlib
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from wsgiref.validate import validator

import kubernetes_validate
import pytest
import snappy
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import k8s_exporter
import remote_pb2
from demo_k8s_exporter import (
    PROMETHEUS_BINARY,
    PROMTOOL_BINARY,
    CadvisorEndpoint,
    ExporterProcess,
    Prometheus,
    StartStop,
    StartupError,
    free_port,
    keep_exported_metrics_rule,
    process_children,
    prometheus1_config,
    prometheus2_config,
    remote_write_entry,
    wait_for,
)
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
    metric_spec,
    negotiate_protocol,
    pod_series_identity,
    pod_value,
    read_process_stat,
)
from screenshots_k8s_exporter import CHROMIUM_BINARY, run_chromium

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
SHARED = HERE.parent / 'shared'
SEED_FILE = SHARED / 'seed' / '000_f316f98fa0d5b025.txt'
FIXTURES = SHARED / 'fixtures' / 'cadvisor'

# The five cAdvisor gauges the exporter keeps, in output (name) order.
EXPORTED_METRICS = ('container_cpu_load_average_10s', 'container_fs_limit_bytes',
                    'container_fs_usage_bytes', 'container_memory_max_usage_bytes',
                    'container_memory_usage_bytes')
# The three that take the pod cgroup's value, else the sum of containers.
POD_CGROUP_METRICS = ('container_cpu_load_average_10s', 'container_memory_max_usage_bytes',
                      'container_memory_usage_bytes')
# The metrics the README documents beyond the five, by how the README says
# their pod value is made; with the five, every name the exporter knows.
COUNTERS = ('container_cpu_usage_seconds_total', 'container_network_receive_bytes_total',
            'container_network_transmit_bytes_total')
POD_CGROUP_GAUGES = ('container_memory_cache', 'container_memory_rss',
                     'container_memory_working_set_bytes')
POD_LIMIT = 'container_spec_memory_limit_bytes'
KNOWN_METRICS = tuple(sorted((*EXPORTED_METRICS, *COUNTERS, *POD_CGROUP_GAUGES, POD_LIMIT)))
# The label that tells a cgroup's series of a metric apart, where it has one.
PART_LABEL = {'container_cpu_usage_seconds_total': 'cpu',
              'container_network_receive_bytes_total': 'interface',
              'container_network_transmit_bytes_total': 'interface'}
CPU_USAGE = 'container_cpu_usage_seconds_total'
MEMORY = 'container_memory_usage_bytes'
FS_USAGE = 'container_fs_usage_bytes'
DEFAULT_CLUSTER = 'k8s-cluster'
OUTPUT_LABELS = ('cluster', 'item', 'job', 'namespace', 'pod')


def bits_of(value):
    return struct.unpack('<Q', struct.pack('<d', value))[0]


def float_of_bits(bits):
    return struct.unpack('<d', struct.pack('<Q', bits))[0]


# Prometheus's stale marker: one NaN bit pattern (value.StaleNaN).
STALE_NAN_BITS = 0x7FF0000000000002
STALE_NAN = float_of_bits(STALE_NAN_BITS)
RW1_TYPE = 'application/x-protobuf;proto=prometheus.WriteRequest'
RW2_TYPE = 'application/x-protobuf;proto=io.prometheus.write.v2.Request'
# Bounded so the properties take seconds on two shared cores;
# TEST_K8S_EXPORTER_PROPERTY_EXAMPLES=5000 searches longer.
PROPERTY_SETTINGS = settings(
    max_examples=int(os.environ.get('TEST_K8S_EXPORTER_PROPERTY_EXAMPLES', '200')), deadline=None,
    suppress_health_check=[HealthCheck.too_slow])


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


def varint(number):
    """Protobuf's base-128 varint of a number >= 0, for bodies written by hand
    (the test's own: a wrong encoder of the exporter's must not hide itself)."""
    out = bytearray()
    while number > 0x7F:
        out.append(number & 0x7F | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


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


def capture_table(samples, job, timestamp_ms, extra_labels=None):
    """The table of a scrape of samples [(name, labels, value)], as Prometheus stores it.

    Prometheus drops empty-valued labels when it scrapes and adds __name__
    and job. A job (or an extra label such as instance or an external label)
    already on the sample is kept, as with honor_labels: true; the captures
    carry none. Every sample gets timestamp_ms: real captures are years old.
    """
    table = []
    for name, labels, value in samples:
        row = {'__name__': name, 'job': job, **(extra_labels or {})}
        row.update((label, text) for label, text in labels.items() if text)
        row['__name__'] = name
        table.append((row, [(value, timestamp_ms)]))
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
    """The container_* part of an exposition: what the seed specifies.

    Lines end at '\\n' only: a label value may hold a raw '\\r', U+0085 or
    U+2028, which str.splitlines would take for line ends.
    """
    return ''.join(line + '\n' for line in exposition.split('\n')[:-1]
                   if line.startswith(('container_', '# HELP container_', '# TYPE container_')))


###############################################################################
# Calling the WSGI app, and a real gunicorn ###################################
###############################################################################

def call_wsgi(application, method, path, body=b'', headers=None, content_length=True,
              status_line=False):
    """Call a WSGI app under wsgiref's validator; return (status, headers, body).

    status is the code, or with status_line the whole line ('404 Not Found').
    """
    path, _, query = path.partition('?')
    environ = {
        'REQUEST_METHOD': method, 'PATH_INFO': path, 'QUERY_STRING': query, 'SCRIPT_NAME': '',
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
        response['status'] = status if status_line else int(status.split()[0])
        response['headers'] = dict(response_headers)

    chunks = validator(application)(environ, start_response)
    try:
        data = b''.join(chunks)
    finally:
        chunks.close()
    return response['status'], response['headers'], data


def fresh_app(**config):
    return Exporter(Config(**config))


def post(app, table, protocol=1, **headers):
    """Remote-write table to the app as Prometheus sends it."""
    body = rw1_body(table) if protocol == 1 else rw2_body(table)
    return call_wsgi(app, 'POST', '/write', body,
                     {'Content-Type': RW1_TYPE if protocol == 1 else RW2_TYPE,
                      'Content-Encoding': 'snappy', **headers})


def arrivals_apart():
    """A time.monotonic() reading between the writes to an app before and after it.

    The store's arrival clock is time.monotonic() when a write arrives (see
    Store.apply), and Store.expire(now) forgets what arrived before now -
    ttl_seconds: expire(now=arrivals_apart() + ttl) forgets the writes made
    before the call and keeps those made after it.
    """
    time.sleep(0.01)
    between = time.monotonic()
    time.sleep(0.01)
    return between


def scrape(app, gzipped=False):
    """The app's /metrics page as text; asked for and gunzipped if gzipped."""
    headers = {'Accept-Encoding': 'gzip'} if gzipped else {}
    status, response_headers, body = call_wsgi(app, 'GET', '/metrics', headers=headers)
    assert status == 200, (status, body[:300])
    assert response_headers.get('Content-Encoding') == ('gzip' if gzipped else None)
    return (gzip.decompress(body) if gzipped else body).decode()


def value_of(app, metric, pod='p'):
    """The exported value of one pod's metric, or None when the pod has no such line."""
    return {key[4]: value for key, value in pod_values_in(scrape(app)).items()
            if key[0] == metric}.get(pod)


def value_text_of(app, metric, pod='p'):
    """The exported value of one pod's metric as /metrics spells it, or None."""
    for line in pod_families(scrape(app)).split('\n'):
        if line.startswith(f'{metric}{{') and f',pod="{pod}"}} ' in line:
            return line.rpartition(' ')[2]
    return None


def memory_of(app, pod='p'):
    return value_of(app, MEMORY, pod)


def fs_usage_of(app, pod='p'):
    return value_of(app, FS_USAGE, pod)


def one_line_reason(status, headers, body):
    """The reason of a refusal, checked to be one short text/plain line."""
    assert 400 <= status < 500, (status, body)
    assert headers['Content-Type'] == 'text/plain; charset=utf-8'
    text = body.decode('utf-8')
    assert text.endswith('\n') and text.count('\n') == 1 and text.strip(), text
    assert len(text) < 400, text
    return text[:-1]


def rejection(app, body, headers=None, **kwargs):
    """(status, reason) of a write the app refuses."""
    status, response_headers, data = call_wsgi(app, 'POST', '/write', body, headers, **kwargs)
    return status, one_line_reason(status, response_headers, data)


def http_request(url, method='GET', body=None, headers=None, timeout=10, ca_file=None):
    """(status, headers dict with lower-case names, body bytes) of one HTTP(S) request."""
    scheme, _, rest = url.partition('://')
    hostport, _, path = rest.partition('/')
    host, _, port = hostport.rpartition(':')
    if scheme == 'https':
        connection = http.client.HTTPSConnection(
            host, int(port), timeout=timeout, context=ssl.create_default_context(cafile=ca_file))
    else:
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


def scrape_url(url, gzipped=False, timeout=10):
    """(status, text) of GET url/metrics, asking for gzip if gzipped."""
    headers = {'Accept-Encoding': 'gzip'} if gzipped else {}
    status, response_headers, body = http_request(url + '/metrics', headers=headers,
                                                  timeout=timeout)
    if response_headers.get('content-encoding') == 'gzip':
        body = gzip.decompress(body)
    return status, body.decode('utf-8')


def wait_until(predicate, timeout, what='condition', interval=0.1, details=None):
    """Poll predicate until it returns a true value; fail after timeout seconds.

    The polling is demo_k8s_exporter's (it must run without pytest); a
    timeout here fails the test, with details() appended when given.
    """
    try:
        return wait_for(predicate, timeout, what, interval)
    except StartupError as error:
        pytest.fail(f'{error}\n{details() if details else ""}'.rstrip())


class Gunicorn(ExporterProcess):
    """demo_k8s_exporter's launcher (gunicorn.conf.py's settings, as `make run`),
    failing the test, with gunicorn's log, when the exporter does not start."""

    def start(self):
        try:
            return super().start()
        except StartupError as error:
            pytest.fail(str(error))


@pytest.fixture(scope='module')
def server():
    """One gunicorn shared by the HTTP tests that tolerate each other's data."""
    with Gunicorn() as running:
        yield running


###############################################################################
# An independent reader of text format 0.0.4 ##################################
###############################################################################

# Written from the format's description, not from the exporter: lines end at
# '\n' only (a raw '\r' or U+2028 inside a label value is legal), label
# values know exactly three escapes, values are Go float spellings, a
# timestamp is an integer.
_METRIC_NAME_RE = re.compile(r'[a-zA-Z_:][a-zA-Z0-9_:]*')
_LABEL_NAME_RE = re.compile(r'[a-zA-Z_][a-zA-Z0-9_]*')
_VALUE_RE = re.compile(r'(?:[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]Inf|NaN)\Z')
_TIMESTAMP_RE = re.compile(r'-?\d+\Z')
_ESCAPES = {'\\': '\\', '"': '"', 'n': '\n'}


class ExpositionSyntaxError(AssertionError):
    """A line the format does not allow; the message names it."""


def read_samples(text):
    """[(metric name, labels dict, value)] of every sample line, in order.

    Comments and empty lines are passed over; a second TYPE line for one
    name, a missing final newline or any malformed line raises
    ExpositionSyntaxError, so a broken page or fixture cannot pass as an
    empty one. A series may repeat (captures do); read_exposition refuses it.
    """
    if text and not text.endswith('\n'):
        raise ExpositionSyntaxError('text does not end with a newline')
    samples = []
    typed = set()
    for number, line in enumerate(text.split('\n')[:-1], 1):
        if line.startswith('#'):
            parts = line.split(' ', 3)
            if len(parts) >= 3 and parts[1] == 'TYPE':
                if parts[2] in typed:
                    raise ExpositionSyntaxError(f'line {number}: second TYPE for {parts[2]}')
                typed.add(parts[2])
        elif line:
            samples.append(_read_sample_line(line, number))
    return samples


def _read_sample_line(line, number):
    def fail(why):
        raise ExpositionSyntaxError(f'line {number}: {why}: {line[:200]!r}')

    head = _METRIC_NAME_RE.match(line)
    if not head:
        fail('no metric name')
    name, i = head.group(), head.end()
    labels = {}
    if line[i:i + 1] == '{':
        i += 1
        while line[i:i + 1] != '}':
            label = _LABEL_NAME_RE.match(line, i)
            if not label or line[label.end():label.end() + 2] != '="':
                fail('bad label name')
            i = label.end() + 2
            value = []
            while True:
                if i >= len(line):
                    fail('unterminated label value')
                char = line[i]
                if char == '"':
                    break
                if char == '\\':
                    escaped = _ESCAPES.get(line[i + 1:i + 2])
                    if escaped is None:
                        fail('unknown escape')
                    value.append(escaped)
                    i += 2
                else:
                    value.append(char)
                    i += 1
            if label.group() in labels:
                fail('repeated label name')
            labels[label.group()] = ''.join(value)
            i += 1
            if line[i:i + 1] == ',':      # a trailing comma is allowed
                i += 1
            elif line[i:i + 1] != '}':
                fail('expected , or }')
        i += 1
    if line[i:i + 1] != ' ':
        fail('no space before the value')
    fields = line[i + 1:].split(' ')
    if len(fields) not in (1, 2) or not _VALUE_RE.match(fields[0]):
        fail('bad value')
    if len(fields) == 2 and not _TIMESTAMP_RE.match(fields[1]):
        fail('bad timestamp')
    # float() reads NaN, +Inf and -Inf as Go's ParseFloat does.
    return name, labels, float(fields[0])


def read_exposition(text):
    """{(name, ((label, value), ...) sorted): value} of a page; a repeated series raises."""
    samples = {}
    for name, labels, value in read_samples(text):
        key = (name, tuple(sorted(labels.items())))
        if key in samples:
            raise ExpositionSyntaxError(f'series {key} appears twice')
        samples[key] = value
    return samples


def self_metric(text, name, **labels):
    """The value of one series of a page; fails when the page does not show it."""
    key = (name, tuple(sorted(labels.items())))
    samples = read_exposition(text)
    assert key in samples, f'{key} is not on the page'
    return samples[key]


def requests_counted(text, handler, code):
    """k8s_exporter_http_requests_total of one handler and code; a pair not yet seen is 0."""
    return read_exposition(text).get(
        ('k8s_exporter_http_requests_total', (('code', str(code)), ('handler', handler))), 0)


def pod_values_in(text, metrics=KNOWN_METRICS):
    """{(metric, cluster, job, namespace, pod): value} of the pod families of a page.

    Fails on a pod series whose labels are not exactly the five output
    labels, or whose item is not its name.
    """
    values = {}
    for (name, label_items), value in read_exposition(text).items():
        if not name.startswith('container_'):
            continue
        labels = dict(label_items)
        assert name in metrics, name
        assert tuple(labels) == OUTPUT_LABELS, (name, labels)
        assert labels['item'] == name, (name, labels)
        assert labels['namespace'] and labels['pod'], (name, labels)
        values[(name, labels['cluster'], labels['job'], labels['namespace'],
                labels['pod'])] = value
    return values


def same_values(got, expected):
    """Float equality of two mappings where NaN equals NaN (every NaN prints as NaN)."""
    return got.keys() == expected.keys() and all(
        got[key] == expected[key] or (got[key] != got[key] and expected[key] != expected[key])
        for key in got)


def describe_difference(got, expected):
    """How two value mappings differ, for a failure message."""
    keys = [key for key in sorted(got.keys() | expected.keys(), key=repr)
            if key not in got or key not in expected
            or not same_values({0: got[key]}, {0: expected[key]})]
    return f'{len(keys)} differ:\n' + '\n'.join(
        f'{key}: exporter {got.get(key, "absent")!r}, expected {expected.get(key, "absent")!r}'
        for key in keys[:20])


def test_reader_reads_escapes_timestamps_trailing_commas_and_special_values():
    text = ('# HELP m A help line with a "quote"\n'
            '# TYPE m gauge\n'
            '\n'
            'm{a="x\\"y",b="back\\\\slash",c="new\\nline",} 1.5e+09 1572450197572\n'
            'm{a="{}, =",b=""} NaN\n'
            'n +Inf\n'
            'n{a="1"} -Inf 123\n'
            'o{a="q\r\u2028\u0085"} -0.5e-3\n')
    samples = read_samples(text)
    assert [(name, labels) for name, labels, _ in samples] == [
        ('m', {'a': 'x"y', 'b': 'back\\slash', 'c': 'new\nline'}),
        ('m', {'a': '{}, =', 'b': ''}),
        ('n', {}),
        ('n', {'a': '1'}),
        ('o', {'a': 'q\r\u2028\u0085'}),
    ]
    values = [value for _, _, value in samples]
    assert values[0] == 1.5e9 and math.isnan(values[1])
    assert values[2:] == [math.inf, -math.inf, -0.0005]
    assert read_exposition(text)[('o', (('a', 'q\r\u2028\u0085'),))] == -0.0005


@pytest.mark.parametrize('bad', [
    'm{a="x} 1\n', 'm{a="\\t"} 1\n', 'm{a="x"}1\n', 'm 1.2.3\n', 'm 1', 'm{a="x",a="y"} 1\n',
    'm{1a="x"} 1\n', 'm{a="x"} 1 12.5\n', 'm  1\n', 'm{ a="x"} 1\n', 'm inf\n',
    '# TYPE m gauge\n# TYPE m gauge\n', 'ok 1\nbad{a="1"}\n'])
def test_reader_refuses_what_the_format_forbids(bad):
    with pytest.raises(ExpositionSyntaxError, match='line|newline'):
        read_samples(bad)


def test_read_exposition_refuses_a_repeated_series():
    assert len(read_samples('m{a="1"} 1\nm{a="1"} 2\n')) == 2
    with pytest.raises(ExpositionSyntaxError, match='appears twice'):
        read_exposition('m{a="1"} 1\nm{a="1"} 2\n')


###############################################################################
# An independent model of the README's aggregation rules #####################
###############################################################################

# (namespace, pod, container) label names; the first with a pod and a
# namespace wins.
README_POD_CONVENTIONS = (
    ('namespace', 'pod', 'container'),                                    # kubelet >= 1.16
    ('namespace', 'pod_name', 'container_name'),                          # kubelet < 1.16
    ('container_label_io_kubernetes_pod_namespace',                       # standalone cAdvisor
     'container_label_io_kubernetes_pod_name', 'container_label_io_kubernetes_container_name'),
)
# The README's pod-cgroup rule as a regex; \Z because in Go (and the rule)
# '$' ends the text, while Python's '$' also matches before a final newline.
README_POD_CGROUP_RE = re.compile(r'(?:^|-)pod[0-9a-fA-F_-]+(?:\.slice)?\Z')
_UID_CHARACTERS = frozenset('0123456789abcdefABCDEF_-')


def pod_of(labels):
    """(namespace, pod, container) of a series by the README's conventions, or None."""
    for namespace_label, pod_label, container_label in README_POD_CONVENTIONS:
        if labels.get(namespace_label) and labels.get(pod_label):
            return (labels[namespace_label], labels[pod_label],
                    labels.get(container_label) or '')
    return None


def is_pod_cgroup_id(cgroup):
    """True when cgroup's last segment names a pod, as README_POD_CGROUP_RE says.

    Spelled out by hand rather than with the regex, so that a slip in either
    one shows up as a disagreement.
    """
    segment = cgroup.rpartition('/')[2]
    if segment.endswith('.slice'):
        segment = segment[:-len('.slice')]
    start = segment.find('pod')
    while start >= 0:
        uid = segment[start + 3:]
        if (start == 0 or segment[start - 1] == '-') and uid and set(uid) <= _UID_CHARACTERS:
            return True
        start = segment.find('pod', start + 1)
    return False


def is_pod_cgroup_series(labels):
    """The pod-level cgroup: no container name, and an id that is missing or the pod's own."""
    container = (pod_of(labels) or ('', '', ''))[2]
    cgroup = labels.get('id') or ''
    return not container and (not cgroup or is_pod_cgroup_id(cgroup))


def ieee_sum(values):
    """The correctly rounded sum IEEE addition gives: NaN with any NaN or with both
    infinities, an infinity past the largest float."""
    values = list(values)
    if any(value != value for value in values) or {math.inf, -math.inf} <= set(values):
        return math.nan
    if math.inf in values or -math.inf in values:
        return math.inf if math.inf in values else -math.inf
    total = sum((Fraction(value) for value in values), Fraction(0))
    try:
        return float(total)
    except OverflowError:
        return math.inf if total > 0 else -math.inf


def largest_ignoring_nan(values):
    """The largest value, as PromQL's max(): NaN only when every value is NaN."""
    numbers = [value for value in values if value == value]
    return max(numbers) if numbers else math.nan


def is_sandbox(pod_cgroup, container):
    """docker's POD container or containerd's unnamed pause container."""
    return not pod_cgroup and container in ('POD', '')


def pod_value_by_rules(metric, series):
    """A pod's value of metric from its series [(pod cgroup?, container, device, value)],
    or None."""
    if metric in ('container_network_receive_bytes_total',
                  'container_network_transmit_bytes_total'):
        sandbox = [value for pod_cgroup, container, _, value in series
                   if is_sandbox(pod_cgroup, container)]
        return ieee_sum(sandbox) if sandbox else None
    pod_cgroups = [value for pod_cgroup, _, _, value in series if pod_cgroup]
    if metric == POD_LIMIT:
        return ieee_sum(pod_cgroups) if pod_cgroups else None
    containers = [(device, value) for pod_cgroup, _, device, value in series if not pod_cgroup]
    if metric == 'container_fs_usage_bytes':
        return ieee_sum(value for _, value in containers) if containers else None
    if metric == 'container_fs_limit_bytes':
        per_device = {}
        for device, value in containers:
            per_device.setdefault(device, []).append(value)
        return ieee_sum(map(largest_ignoring_nan, per_device.values())) if per_device else None
    return ieee_sum(pod_cgroups or [value for _, value in containers])


def input_series_by_rules(labels, metric=''):
    """((cluster, job, namespace, pod), series key) of one input series of metric, or None.

    The series key holds the labels by which the store tells input series
    of one pod and metric apart (k8s_exporter.SeriesKey); cAdvisor's other
    labels never differ between two series that agree on these.
    """
    owner = pod_of(labels)
    if owner is None:
        return None
    namespace, pod, container = owner
    output = (labels.get('cluster') or DEFAULT_CLUSTER, labels.get('job') or '', namespace, pod)
    part = labels.get(PART_LABEL[metric]) or '' if metric in PART_LABEL else ''
    return output, (is_pod_cgroup_series(labels), container, labels.get('id') or '',
                    labels.get('image') or '', labels.get('device') or '', part)


def expected_pod_values(tables, metrics=EXPORTED_METRICS):
    """{(metric, cluster, job, namespace, pod): value} after writing tables in order.

    Per input series the newest timestamp wins and an older or equal one is
    ignored (of a series written twice at one time, the first wins); a stale
    marker ends the series, and later samples no newer than it cannot bring
    it back. Of the series of one pod and metric that stand for the same
    thing (pod cgroup or not, container, device, part), the one with the
    newest sample counts, on equal timestamps the one written last; for a
    counter every container counts at its last value, ended or not. Nothing
    counts when every series of the pod's metric has ended.
    """
    latest = {}     # (metric, output labels, series key) -> [timestamp, arrival, value, ended]
    arrival = 0
    for table in tables:
        for labels, samples in table:
            metric = labels.get('__name__')
            identity = input_series_by_rules(labels, metric) if metric in metrics else None
            if identity is None:
                continue
            key = (metric, *identity)
            for value, timestamp in samples:
                arrival += 1
                if key in latest and timestamp <= latest[key][0]:
                    continue
                if bits_of(value) == STALE_NAN_BITS:
                    if key in latest and not latest[key][3]:
                        latest[key] = [timestamp, arrival, latest[key][2], True]
                else:
                    latest[key] = [timestamp, arrival, value, False]
    per_pod = {}
    for (metric, output, series_key), entry in latest.items():
        per_pod.setdefault((metric, *output), []).append((series_key, entry))
    values = {}
    for pod_metric, held in per_pod.items():
        metric = pod_metric[0]
        if all(ended for _, (_, _, _, ended) in held):
            continue
        counted = {}
        for (pod_cgroup, container, _, _, device, part), entry in held:
            timestamp, arrival, value, ended = entry
            if metric in COUNTERS and not pod_cgroup:
                counted[len(counted), 'generation'] = (pod_cgroup, container, device, value)
                continue
            if ended:
                continue
            stands_for = (pod_cgroup, container, device, part)
            if stands_for not in counted or (timestamp, arrival) > counted[stands_for][4:]:
                counted[stands_for] = (pod_cgroup, container, device, value, timestamp, arrival)
        values[pod_metric] = pod_value_by_rules(metric, [entry[:4] for entry in counted.values()])
    return {key: value for key, value in values.items() if value is not None}


@pytest.mark.parametrize('cgroup, pod_level', [
    ('/kubepods/burstable/pod3f1c9a52-7c1e-4a55-9f0e-1b2c3d4e5f60', True),
    ('/kubepods/pod5e647fb9-0ea4-4d2c-8d11-108657bf9a62', True),
    ('/kubepods.slice/kubepods-burstable.slice/'
     'kubepods-burstable-pod2822a97d_9b42_490d_a315_4e59f03ebdcf.slice', True),
    ('/kubepods.slice/kubepods-pod2822a97d_9b42_490d_a315_4e59f03ebdcf.slice', True),
    ('/kubepods/burstable/pod3f1c9a52/0123abcd', False),
    ('/kubepods.slice/kubepods-pod2822a97d.slice/docker-e9c37a27.scope', False),
    ('/kubepods/burstable', False),
    ('/kubepods.slice', False),
    ('/system.slice/podman.service', False),
    ('/kubepods/burstable/xpod3f1c9a52', False),
    ('/kubepods/burstable/podzz', False),
    ('pod12\n', False),
    ('/', False),
], ids=['cgroupfs-burstable-pod', 'cgroupfs-guaranteed-pod', 'systemd-burstable-pod',
        'systemd-guaranteed-pod', 'cgroupfs-container', 'systemd-docker-scope', 'qos-class',
        'kubepods-slice', 'podman-service', 'xpod-prefix', 'non-hex-uid', 'trailing-newline',
        'root'])
def test_model_pod_cgroup_test_agrees_with_the_readme_regex_and_the_exporter(cgroup, pod_level):
    segment = cgroup.rpartition('/')[2]
    assert is_pod_cgroup_id(cgroup) is pod_level
    assert (README_POD_CGROUP_RE.search(segment) is not None) is pod_level
    assert (k8s_exporter.POD_CGROUP_SEGMENT_RE.search(segment) is not None) is pod_level


@PROPERTY_SETTINGS
@given(segment=st.text(st.sampled_from('pod-_.slicefAF09xZ/\n'), max_size=14))
def test_model_pod_cgroup_test_agrees_with_the_readme_regex_on_any_text(segment):
    assert is_pod_cgroup_id(segment) is (
        README_POD_CGROUP_RE.search(segment.rpartition('/')[2]) is not None)


def test_model_applies_each_rule_on_a_small_table():
    pod_cgroup = '/kubepods/burstable/pod0a'

    def series(metric, value, **labels):
        return {'__name__': metric, 'job': 'j', **labels}, [(value, 1)]

    table = [
        # a pod cgroup wins over its containers; containers alone are summed
        series(MEMORY, 100, namespace='n', pod='p', id=pod_cgroup),
        series(MEMORY, 30, namespace='n', pod='p', id=pod_cgroup + '/c1'),
        series(MEMORY, 5, namespace='n', pod='q', container='a', id='/x/a'),
        series(MEMORY, 7, namespace='n', pod='q', container='POD', id='/x/b'),
        # of a series written twice at one time, the first wins
        series(MEMORY, 1000, namespace='n', pod='q', container='POD', id='/x/b'),
        # fs: usage summed over devices, limit: largest per device, summed
        series('container_fs_usage_bytes', 1, namespace='n', pod='q', container='a',
               device='/dev/a'),
        series('container_fs_usage_bytes', 2, namespace='n', pod='q', container='b',
               device='/dev/b'),
        series('container_fs_limit_bytes', 10, namespace='n', pod='q', container='a',
               device='/dev/a'),
        series('container_fs_limit_bytes', 30, namespace='n', pod='q', container='b',
               device='/dev/a'),
        series('container_fs_limit_bytes', 4, namespace='n', pod='q', container='b',
               device='/dev/b'),
        series('container_fs_limit_bytes', math.nan, namespace='n', pod='q', container='c',
               device='/dev/b'),
        # a pod-level fs series is not a container: no fs line for p
        series('container_fs_usage_bytes', 9, namespace='n', pod='p', id=pod_cgroup,
               device='/dev/a'),
        # legacy names, an incoming cluster and job, no identity, another metric
        series(MEMORY, 3, namespace='old', pod_name='r', container_name='POD', cluster='c2',
               job='j2'),
        series(MEMORY, 99, pod_name='', id='/kubepods/burstable/pod0b'),
        series('container_memory_cache', 8, namespace='n', pod='p', id=pod_cgroup),
    ]
    assert expected_pod_values([table]) == {
        (MEMORY, 'k8s-cluster', 'j', 'n', 'p'): 100,
        (MEMORY, 'k8s-cluster', 'j', 'n', 'q'): 12,
        ('container_fs_usage_bytes', 'k8s-cluster', 'j', 'n', 'q'): 3,
        ('container_fs_limit_bytes', 'k8s-cluster', 'j', 'n', 'q'): 34,
        (MEMORY, 'c2', 'j2', 'old', 'r'): 3,
    }


def test_model_keeps_the_newest_sample_and_forgets_a_series_at_its_stale_marker():
    labels = {'__name__': MEMORY, 'namespace': 'n', 'pod': 'p', 'container': 'a'}
    other = {**labels, 'container': 'b'}
    assert expected_pod_values([[(labels, [(1, 10), (2, 30), (3, 20)])],
                                [(other, [(5, 1)])]]) == {(MEMORY, 'k8s-cluster', '', 'n', 'p'): 7}
    assert expected_pod_values([[(labels, [(1, 10), (STALE_NAN, 11)])]]) == {}
    assert expected_pod_values([[(labels, [(1, 10), (STALE_NAN, 10)])]]) == {
        (MEMORY, 'k8s-cluster', '', 'n', 'p'): 1}


def test_model_restates_the_seed_written_out_by_hand():
    assert expected_pod_values([seed_table()]) == pod_values_in(SEED_EXPOSITION)


###############################################################################
# Reading the kubelet captures ################################################
###############################################################################

# Every capture in ../shared/fixtures/cadvisor (SOURCES.md and SYNTHETIC.md
# there say where each comes from) is remote-written the way Prometheus
# sends a scrape of it; what /metrics serves must be what the model above
# computes from the capture's text.

CAPTURE_EKS_1_21 = 'kubelet-modern-dockershim-eks-k8s1.21-datadog-integrations-core'
CAPTURE_MINIKUBE_1_22 = 'kubelet-modern-dockershim-systemd-minikube-k8s1.22-nri-kubernetes.part'
CAPTURE_KIND_1_16 = 'kubelet-modern-containerd-kind-k8s1.16-datadog-integrations-core'
CAPTURE_MINIKUBE_1_35 = 'kubelet-modern-containerd-minikube-k8s1.35-nri-kubernetes.part'
CAPTURE_LEGACY_GKE = 'kubelet-legacy-dockershim-gke-datadog-integrations-core'
SYNTHETIC_MODERN = 'synthetic-kubelet-modern'
# The five real captures and the three synthetic ones, one per label convention.
ALL_CAPTURES = (CAPTURE_EKS_1_21, CAPTURE_MINIKUBE_1_22, CAPTURE_KIND_1_16,
                CAPTURE_MINIKUBE_1_35, CAPTURE_LEGACY_GKE, 'synthetic-cadvisor-standalone',
                'synthetic-kubelet-legacy', SYNTHETIC_MODERN)

CAPTURE_JOB = 'kubernetes-cadvisor'
CAPTURE_TIMESTAMP_MS = 1_700_000_000_000
# Prometheus's queue_config.max_samples_per_send default since 2.26.
SAMPLES_PER_REQUEST = 2000


def capture_path(name):
    if not FIXTURES.is_dir():
        pytest.skip(f'{FIXTURES} not present')
    return FIXTURES / f'{name}.txt'


def read_capture(path):
    """The capture's text; a missing final newline (kind 1.16) is added."""
    with open(path, encoding='utf-8', newline='') as capture:
        text = capture.read()
    return text if not text or text.endswith('\n') else text + '\n'


def capture_text(name):
    return read_capture(capture_path(name))


@functools.lru_cache(maxsize=None)
def _parsed_capture(name):
    return tuple(read_samples(capture_text(name)))


def capture_samples(name):
    """The capture's samples; labels are copied so a test may change them."""
    return [(metric, dict(labels), value) for metric, labels, value in _parsed_capture(name)]


def expected_capture_values(samples, job=CAPTURE_JOB, cluster=None, metrics=EXPORTED_METRICS):
    """What the model makes of one scrape of samples, with prometheus1's cluster label."""
    return expected_pod_values([capture_table(samples, job, CAPTURE_TIMESTAMP_MS,
                                              {'cluster': cluster} if cluster else None)],
                               metrics)


def post_samples(app, samples, protocol, timestamp_ms=CAPTURE_TIMESTAMP_MS):
    """Remote-write samples as Prometheus batches them; every request must succeed."""
    table = capture_table(samples, CAPTURE_JOB, timestamp_ms, {'instance': '10.0.0.1:10250'})
    for start in range(0, len(table), SAMPLES_PER_REQUEST):
        batch = table[start:start + SAMPLES_PER_REQUEST]
        status, headers, body = post(app, batch, protocol)
        assert (status, body) == (204, b'')
        if protocol == 2:
            assert headers['X-Prometheus-Remote-Write-Samples-Written'] == str(len(batch))


def by_metric(values, metric):
    """{(namespace, pod): value} of one metric from an expected or served dict."""
    return {(namespace, pod): value for (name, _, _, namespace, pod), value in values.items()
            if name == metric}


def pod_series(samples, metric):
    """{(namespace, pod): [labels with empties dropped, value]} of one metric."""
    series = {}
    for name, labels, value in samples:
        present = {label: text for label, text in labels.items() if text}
        owner = pod_of(present)
        if name == metric and owner:
            series.setdefault(owner[:2], []).append((present, value))
    return series


###############################################################################
# Remote-write decoding #######################################################
###############################################################################

@pytest.mark.parametrize('content_type, encoding, protocol', [
    ('', '', PROTO_RW1),
    ('application/x-protobuf', 'snappy', PROTO_RW1),
    ('application/x-protobuf;proto=prometheus.WriteRequest', '', PROTO_RW1),
    ('application/x-protobuf; proto=io.prometheus.write.v2.Request', 'snappy', PROTO_RW2),
    ('Application/X-Protobuf;proto="io.prometheus.write.v2.Request"', 'SNAPPY', PROTO_RW2),
], ids=['no-headers', 'protobuf-snappy', 'rw1-proto', 'rw2-proto', 'rw2-quoted-mixed-case'])
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
], ids=['json', 'rw3-proto', 'gzip', 'zstd'])
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


def decode_all(table, protocol, metrics=EXPORTED_METRICS):
    """What the decoder makes of table, sent uncompressed in protocol."""
    build = rw1_body if protocol == PROTO_RW1 else rw2_body
    wanted = {name: index for index, name in enumerate(metrics)}
    return decode_write_request(build(table, compress=False), protocol, wanted, 'c')


def rw2_raw(symbols, refs_per_series):
    """A snappy RW 2.0 body with label refs written by hand, one sample a series."""
    request = remote_pb2.WriteRequestV2(symbols=symbols)
    for refs in refs_per_series:
        request.timeseries.add(labels_refs=refs).samples.add(value=1, timestamp=1)
    return snappy.compress(request.SerializeToString())


def test_rw1_decoding_keeps_only_exported_metrics_with_a_pod():
    table = seed_table(timestamp=5)
    decoded = decode_all(table, PROTO_RW1, (MEMORY,))
    assert decoded.samples_total == len(table)
    assert decoded.no_pod == 1            # the node's root cgroup
    assert decoded.unexported == len(table) - len(SEED_PODS) - 1
    assert [(s.pod.pod, s.metric, s.timestamp_ms, s.value) for s in decoded.samples] == [
        (pod, 0, 5, memory) for _, pod, *_, memory in SEED_PODS]


def test_rw2_decoding_gives_the_same_samples_as_rw1():
    table = seed_table(timestamp=5)
    rw1 = decode_all(table, PROTO_RW1)
    assert decode_all(table, PROTO_RW2) == rw1
    assert len(rw1.samples) == 5 * len(SEED_PODS)


@pytest.mark.parametrize('protocol', [PROTO_RW1, PROTO_RW2])
def test_label_named_before___name___is_still_found(protocol):
    # Upper-case label names sort before "__name__".
    labels = {**cadvisor(MEMORY, 'ns', 'p'), 'Zone': 'a'}
    decoded = decode_all([(labels, [(3, 1)])], protocol, (MEMORY,))
    assert [sample.value for sample in decoded.samples] == [3]


@pytest.mark.parametrize('protocol', [PROTO_RW1, PROTO_RW2])
def test_long_metric_names_and_labels_take_the_full_path_and_are_kept(protocol):
    long_name = 'container_' + 'x' * 150           # label longer than 127 bytes
    table = [(cadvisor(long_name, 'ns', 'p'), [(1, 1)]),
             (cadvisor('container_' + 'y' * 150, 'ns', 'p'), [(2, 1)]),
             (cadvisor(MEMORY, 'ns', 'p' * 300), [(3, 1)])]
    decoded = decode_all(table, protocol, (long_name, MEMORY))
    assert [(s.metric, s.value) for s in decoded.samples] == [(0, 1), (1, 3)]
    assert (decoded.samples_total, decoded.unexported) == (3, 1)


@pytest.mark.parametrize('filler', [300, 20000])
def test_rw2_multi_byte_symbol_refs_are_resolved(filler):
    # Hundreds or thousands of symbols before the metric names: their refs
    # are two- and three-byte varints. As many after them, so that a ref
    # misread as a larger one would name another symbol, not none.
    table = [({'__name__': 'filler', 'v': str(n)}, [(0, 1)]) for n in range(filler)]
    table += [(cadvisor(MEMORY, 'ns', 'kept'), [(5, 1)]),
              (cadvisor('container_network_receive_bytes_total', 'ns', 'dropped'), [(6, 1)])]
    table += [({'__name__': 'filler', 'v': f'after-{n}'}, [(0, 1)]) for n in range(filler)]
    decoded = decode_all(table, PROTO_RW2)
    assert [(s.pod.pod, s.value) for s in decoded.samples] == [('kept', 5)]
    assert (decoded.samples_total, decoded.unexported, decoded.bad_series) == (
        2 * filler + 2, 2 * filler + 1, 0)


@pytest.mark.parametrize('protocol', [PROTO_RW1, PROTO_RW2])
def test_a_series_with_only_a_name_counts_as_without_pod(protocol):
    decoded = decode_all([({'__name__': MEMORY}, [(1, 1), (2, 2)])], protocol)
    assert (decoded.samples, decoded.samples_total, decoded.no_pod) == ([], 2, 2)


def test_rw2_without_a___name___symbol_rejects_every_series():
    decoded = decode_write_request(
        snappy.uncompress(rw2_raw(['', 'pod', 'p', 'job', 'j'], [[1, 2], [3, 4, 1, 2]])),
        PROTO_RW2, {MEMORY: 0}, 'c')
    assert (decoded.bad_series, decoded.first_error, decoded.samples_total) == (
        2, 'series with no __name__ label', 0)


###############################################################################
# Every sender: compliance, bytes, clocks #####################################
###############################################################################

# The receiver cases of prometheus/compliance (remotewrite/receiver), as that
# suite builds them: labels in Go map order (so not sorted), one sample a
# series stamped now, 2xx answers carrying exact Written counts.

def compliance_body(series, protocol=2, order=reversed):
    """A snappy body from [(labels, value, extras)], labels in the given order.

    extras: histograms (encoded Histogram messages), exemplars and metadata
    of a 2.0 series, as a dict of lists of bytes.
    """
    now_ms = time.time_ns() // 10**6
    if protocol == 1:
        request = remote_pb2.WriteRequest()
        for labels, value, _ in series:
            item = request.timeseries.add()
            for name in order(list(labels)):
                item.labels.add(name=name, value=labels[name])
            item.samples.add(value=value, timestamp=now_ms)
        return snappy.compress(request.SerializeToString())
    symbols, encoded = [''], []
    refs = {'': 0}

    def ref(text):
        if text not in refs:
            refs[text] = len(symbols)
            symbols.append(text)
        return refs[text]

    for labels, value, extras in series:
        item = remote_pb2.TimeSeriesV2()
        for name in order(list(labels)):
            item.labels_refs.extend([ref(name), ref(labels[name])])
        if value is not None:
            item.samples.add(value=value, timestamp=now_ms)
        item.histograms.extend(extras.get('histograms', []))
        item.exemplars.extend(extras.get('exemplars', []))
        item.metadata = extras.get('metadata', b'')
        encoded.append(item.SerializeToString())
    return snappy.compress(remote_pb2.WriteRequestV2SymbolBytes(
        symbols=[text.encode() for text in symbols], timeseries=encoded).SerializeToString())


UP = {'__name__': 'up', 'job': 'testjob', 'instance': 'localhost:9090'}


def native_histogram(positive=False, negative=False, zero=False, custom=False, count=None):
    """An encoded 2.0 Histogram with the compliance suite's buckets: positive
    1, 3, 4, 7, 8 (23), negative 1, 2 (3), zero 1; custom 2, 3, 5, 8, 7, 5 (30)."""
    histogram = remote_pb2.Histogram(sum=1.0, timestamp=1)
    observed = 0
    if positive:
        histogram.positive_spans.add(offset=0, length=3)
        histogram.positive_spans.add(offset=2, length=2)
        histogram.positive_deltas.extend([1, 2, 1, 3, 1])
        observed += 23
    if negative:
        histogram.negative_spans.add(offset=0, length=2)
        histogram.negative_deltas.extend([1, 1])
        observed += 3
    if zero:
        histogram.zero_count_int = 1
        observed += 1
    if custom:
        del histogram.positive_spans[:]
        histogram.positive_spans.add(offset=0, length=6)
        del histogram.positive_deltas[:]
        histogram.positive_deltas.extend([2, 1, 2, 3, -1, -2])
        histogram.schema = -53
        histogram.custom_values.extend([0.1, 0.5, 1.0, 2.5, 5.0, 10.0])
        observed = 30
    histogram.count_int = observed if count is None else count
    return histogram.SerializeToString()


HISTOGRAM = native_histogram(zero=True)
EXEMPLAR = b'\x11' + struct.pack('<d', 1.0)
SPECIAL_VALUES = {'one': 1.0, 'stale_nan': STALE_NAN, 'nan': math.nan, 'inf': math.inf,
                  '-inf': -math.inf}
NO_EXTRAS = {}

# id, series, headers, status, (samples, histograms, exemplars) written
COMPLIANCE_CASES = [
    ('json', [(UP, 1.0, NO_EXTRAS)], {'Content-Type': 'application/json'}, 415, (0, 0, 0)),
    ('png', [(UP, 1.0, NO_EXTRAS)], {'Content-Type': 'image/png'}, 415, (0, 0, 0)),
    ('gzip', [(UP, 1.0, NO_EXTRAS)], {'Content-Encoding': 'gzip'}, 415, (0, 0, 0)),
    ('deflate', [(UP, 1.0, NO_EXTRAS)], {'Content-Encoding': 'deflate'}, 415, (0, 0, 0)),
    ('simple', [({'__name__': 'up'}, 1.0, NO_EXTRAS)], {}, 204, (1, 0, 0)),
    ('job_instance', [(UP, 1.0, NO_EXTRAS)], {}, 204, (1, 0, 0)),
    ('newlines', [({**UP, 'job': 'test\njob\n'}, 1.0, NO_EXTRAS)], {}, 204, (1, 0, 0)),
    ('dots', [({'__name__': 'resource.cpu.usage', 'job.name': 'testjob',
                'instance.name': 'localhost:9090'}, 1.0, NO_EXTRAS)], {}, 204, (1, 0, 0)),
    ('spaces', [({'__name__': 'resource cpu usage', 'job name': 'testjob',
                  'instance name': 'localhost:9090'}, 1.0, NO_EXTRAS)], {}, 204, (1, 0, 0)),
    *((f'value_{name}', [(UP, value, NO_EXTRAS)], {}, 204, (1, 0, 0))
      for name, value in SPECIAL_VALUES.items()),
    ('no_name', [({'job': 'testjob', 'instance': 'localhost:9090'}, 1.0, NO_EXTRAS)], {},
     400, (0, 0, 0)),
    ('empty_name', [({'__name__': ''}, 1.0, NO_EXTRAS)], {}, 400, (0, 0, 0)),
    ('no_labels', [({}, 1.0, NO_EXTRAS)], {}, 400, (0, 0, 0)),
    ('four', [({**UP, 'instance': f'localhost:909{n}'}, 1.0, NO_EXTRAS) for n in range(4)],
     {}, 204, (4, 0, 0)),
    ('four_without_name', [({'job': 'testjob', 'instance': f'localhost:909{n}'}, 1.0,
                            NO_EXTRAS) for n in range(4)], {}, 400, (0, 0, 0)),
    ('one_of_four_without_name',
     [({'job': 'testjob', 'instance': 'localhost:9090'}, 1.0, NO_EXTRAS)]
     + [({**UP, 'instance': f'localhost:909{n}'}, 1.0, NO_EXTRAS) for n in range(1, 4)],
     {}, 400, (3, 0, 0)),
    ('histogram', [({'__name__': 'test_histogram'}, None, {'histograms': [HISTOGRAM]})], {},
     204, (0, 1, 0)),
    ('histogram_basic', [({'__name__': 'h'}, None, {'histograms': [native_histogram(
        positive=True, negative=True, zero=True)]})], {}, 204, (0, 1, 0)),
    ('histogram_custom_buckets', [({'__name__': 'h'}, None, {'histograms': [native_histogram(
        positive=True, custom=True)]})], {}, 204, (0, 1, 0)),
    ('histogram_positive_only', [({'__name__': 'h', 'job': 'test'}, None, {'histograms': [
        native_histogram(positive=True, zero=True)]})], {}, 204, (0, 1, 0)),
    ('histogram_negative_only', [({'__name__': 'h', 'instance': 'localhost'}, None, {
        'histograms': [native_histogram(negative=True)]})], {}, 204, (0, 1, 0)),
    ('histogram_empty', [({'__name__': 'h'}, None, {'histograms': [native_histogram()]})], {},
     204, (0, 1, 0)),
    ('histogram_bad_count', [({'__name__': 'h'}, None, {'histograms': [native_histogram(
        positive=True, count=99)]})], {}, 400, (0, 0, 0)),
    ('histogram_bad_count_beside_a_good_sample', [
        ({'__name__': 'h'}, None, {'histograms': [native_histogram(positive=True, count=99)]}),
        (UP, 1.0, NO_EXTRAS)], {}, 400, (1, 0, 0)),
    ('two_histograms', [({'__name__': f'hist{n}', 'job': 'test'}, None,
                         {'histograms': [HISTOGRAM]}) for n in (1, 2)], {}, 204, (0, 2, 0)),
    ('histogram_exemplar', [({'__name__': 'h', 'method': 'GET'}, None,
                             {'histograms': [HISTOGRAM], 'exemplars': [EXEMPLAR]})], {},
     204, (0, 1, 1)),
    ('sample_exemplar', [({'__name__': 'http_requests_total', 'job': 'api'}, 1.0,
                          {'exemplars': [EXEMPLAR]})], {}, 204, (1, 0, 1)),
    ('exemplar_without_data', [({'__name__': 'orphan'}, None, {'exemplars': [EXEMPLAR]})],
     {}, 204, (0, 0, 1)),
    ('metadata_without_data', [({'__name__': 'orphan'}, None, {'metadata': b'\x08\x01'})],
     {}, 204, (0, 0, 0)),
    ('exemplar_of_a_series_without_name', [({'job': 'test'}, 1.0, {'exemplars': [EXEMPLAR]})],
     {}, 400, (0, 0, 0)),
    ('exported_and_not', [(cadvisor(MEMORY, 'ns', 'p'), 5.0, {'exemplars': [EXEMPLAR]}),
                          (UP, 1.0, NO_EXTRAS)], {}, 204, (2, 0, 1)),
]


def check_compliance_answer(status, headers, body, expected_status, written):
    headers = {name.lower(): value for name, value in headers.items()}
    assert status == expected_status, body
    if status == 204:
        assert body == b''
    else:
        one_line_reason(status, {'Content-Type': headers['content-type']}, body)
    # Every 2xx carries the three headers, exact; elsewhere a missing one
    # means 0 (the spec's rule for senders), as on a 415 that is not 2.0.
    default = None if status == 204 else '0'
    assert tuple(int(headers.get(f'x-prometheus-remote-write-{kind}-written', default))
                 for kind in ('samples', 'histograms', 'exemplars')) == written


@pytest.mark.parametrize('series, headers, status, written',
                         [case[1:] for case in COMPLIANCE_CASES],
                         ids=[case[0] for case in COMPLIANCE_CASES])
def test_compliance_receiver_cases_in_process(series, headers, status, written):
    response = call_wsgi(fresh_app(), 'POST', '/write', compliance_body(series),
                         {'Content-Type': RW2_TYPE, 'Content-Encoding': 'snappy', **headers})
    check_compliance_answer(*response, status, written)


def test_compliance_receiver_cases_against_gunicorn():
    with Gunicorn() as running:
        for case_id, series, headers, status, written in COMPLIANCE_CASES:
            response = http_request(running.url + '/write', 'POST', compliance_body(series), {
                'Content-Type': RW2_TYPE, 'Content-Encoding': 'snappy',
                'X-Prometheus-Remote-Write-Version': '2.0.0', **headers})
            try:
                check_compliance_answer(*response, status, written)
            except AssertionError as error:
                raise AssertionError(f'{case_id}: {error}') from None


def test_compliance_rw1_sender_gets_204_and_no_written_headers():
    status, headers, body = call_wsgi(fresh_app(), 'POST', '/write', compliance_body(
        [(UP, 1.0, NO_EXTRAS), ({'__name__': 'http_requests_total'}, 100.0, NO_EXTRAS)],
        protocol=1), {'Content-Type': 'application/x-protobuf', 'Content-Encoding': 'snappy'})
    assert (status, body) == (204, b'')
    assert not [name for name in headers if name.startswith('X-Prometheus-Remote-Write')]


def _histogram(**fields):
    spans = {name: fields.pop(name) for name in ('positive_spans', 'negative_spans')
             if name in fields}
    histogram = remote_pb2.Histogram(**fields)
    for name, pairs in spans.items():
        for offset, length in pairs:
            getattr(histogram, name).add(offset=offset, length=length)
    return histogram.SerializeToString()


@pytest.mark.parametrize('encoded, problem', [
    (native_histogram(positive=True, negative=True, zero=True), None),
    (native_histogram(positive=True, custom=True), None),
    (_histogram(count_float=2.5, zero_count_float=0.5, positive_spans=[(0, 1)],
                positive_counts=[2.0]), None),
    (_histogram(count_int=3, sum=math.nan, positive_spans=[(0, 1)], positive_deltas=[1]), None),
    (native_histogram(positive=True, count=99),
     'native histogram with count 99 but 23 observations in its buckets'),
    (_histogram(count_int=1, sum=math.nan, positive_spans=[(0, 1)], positive_deltas=[2]),
     'native histogram with count 1 but 2 observations in its buckets'),
    (_histogram(schema=9), 'native histogram with schema 9'),
    (_histogram(count_int=1, positive_spans=[(0, 2)], positive_deltas=[1]),
     'native histogram whose spans and buckets disagree'),
    (_histogram(count_int=1, positive_spans=[(0, 1), (-1, 1)], positive_deltas=[1, -1]),
     'native histogram with a negative span offset after the first'),
    (_histogram(count_int=0, positive_spans=[(0, 2)], positive_deltas=[1, -2]),
     'native histogram with a negative bucket count'),
    (_histogram(schema=-53, custom_values=[1.0, 1.0]),
     'native histogram whose custom bounds do not increase'),
    (_histogram(schema=-53, custom_values=[1.0], zero_count_int=1, count_int=1),
     'native histogram with custom buckets and negative or zero buckets'),
    (_histogram(schema=-53, custom_values=[1.0], count_int=3, positive_spans=[(0, 3)],
                positive_deltas=[1, 0, 0]),
     'native histogram with more custom buckets than bounds'),
    (_histogram(custom_values=[1.0]),
     'native histogram with custom bounds but an exponential schema'),
], ids=['valid', 'valid_custom', 'valid_float', 'nan_sum_allows_more_count', 'bad_count',
        'nan_sum_fewer_count', 'schema', 'spans', 'span_offset', 'negative_count',
        'custom_bounds', 'custom_zero', 'custom_overflow', 'bounds_without_custom_schema'])
def test_native_histograms_are_checked_as_prometheus_checks_them(encoded, problem):
    assert k8s_exporter.histogram_problem(encoded) == problem


@pytest.mark.parametrize('protocol', [1, 2])
def test_samples_more_than_10_minutes_ahead_are_refused_counted_and_the_rest_applies(protocol):
    now_ms = time.time_ns() // 10**6
    app = fresh_app()
    table = [(cadvisor(MEMORY, 'ns', 'ahead'), [(7, now_ms + 3 * 86_400_000)]),
             (cadvisor(MEMORY, 'ns', 'ok'), [(1, now_ms + 9 * 60_000)]),
             ({'__name__': 'node_load1'}, [(3, now_ms)])]
    status, headers, body = post(app, table, protocol)
    assert (status, one_line_reason(status, headers, body)) == (
        400, "1 samples more than 10 minutes ahead of the exporter's clock refused; "
             'the rest was applied')
    assert headers.get('X-Prometheus-Remote-Write-Samples-Written') == (
        None if protocol == 1 else '2')
    assert (memory_of(app, 'ahead'), memory_of(app, 'ok')) == (None, 1)
    # The real samples that follow are not "older" than the refused one.
    assert post(app, [(cadvisor(MEMORY, 'ns', 'ahead'), [(8, now_ms)])], protocol)[0] == 204
    assert memory_of(app, 'ahead') == 8
    counters = read_exposition(scrape(app))
    assert counters[('k8s_exporter_samples_ignored_total',
                     (('reason', 'future_timestamp'),))] == 1
    assert counters[('k8s_exporter_write_requests_total', (('result', 'partial'),))] == 1


@pytest.mark.parametrize('protocol', [PROTO_RW1, PROTO_RW2], ids=['rw1', 'rw2'])
def test_ten_minutes_ahead_is_the_last_millisecond_kept(protocol):
    # Prometheus's write handler: maxAheadTime of 10 minutes, inclusive.
    now_ms = 1_700_000_000_000
    build = rw1_body if protocol == PROTO_RW1 else rw2_body
    table = [(cadvisor(MEMORY, 'ns', 'edge'), [(1, now_ms + 600_000)]),
             (cadvisor(MEMORY, 'ns', 'past'), [(2, now_ms + 600_001)]),
             # More than one sample: the full path, which checks each.
             (cadvisor(MEMORY, 'ns', 'two'), [(3, now_ms + 1), (4, now_ms + 600_000),
                                              (5, now_ms + 600_001)])]
    decoded = decode_write_request(build(table, compress=False), protocol,
                                   {MEMORY: 0}, 'c', now_ms=now_ms)
    assert [(sample.pod.pod, sample.value) for sample in decoded.samples] == [
        ('edge', 1.0), ('two', 3.0), ('two', 4.0)]


@pytest.mark.parametrize('protocol', [1, 2])
def test_invalid_series_counts_samples_not_series(protocol):
    app = fresh_app()
    post(app, [({'job': 'j'}, [(1, 1), (2, 2), (3, 3)]), (cadvisor(MEMORY, 'n', 'p'), [(1, 1)])],
         protocol)
    counters = read_exposition(scrape(app))
    assert counters[('k8s_exporter_samples_ignored_total', (('reason', 'invalid_series'),))] == 3
    assert counters[('k8s_exporter_samples_received_total', ())] == 4


def test_at_the_series_limit_writes_are_partly_applied_and_the_no_writes_signal_moves():
    app = fresh_app(max_series=1)
    assert post(app, [(cadvisor(MEMORY, 'ns', 'known'), [(1, 1)])])[0] == 204
    before = read_exposition(scrape(app))
    time.sleep(0.01)
    status, _, _ = post(app, [(cadvisor(MEMORY, 'ns', 'known'), [(2, 2)]),
                              (cadvisor(MEMORY, 'ns', 'new'), [(5, 2)])])
    assert status == 400 and memory_of(app, 'known') == 2
    assert post(app, [(cadvisor(MEMORY, 'ns', 'new'), [(5, 3)])])[0] == 400   # nothing applied
    after = read_exposition(scrape(app))
    results = {result: after[('k8s_exporter_write_requests_total', (('result', result),))]
               for result in ('applied', 'partial', 'refused')}
    assert results == {'applied': 1, 'partial': 1, 'refused': 1}
    applied, success = (('k8s_exporter_last_write_applied_timestamp_seconds', ()),
                        ('k8s_exporter_last_write_success_timestamp_seconds', ()))
    assert after[success] == before[success]
    assert after[applied] > before[applied]


def raw_chunked_write_head(content_type=RW1_TYPE):
    return (f'POST /write HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n'
            'Content-Encoding: snappy\r\nTransfer-Encoding: chunked\r\n\r\n').encode()


@pytest.mark.parametrize('body, end_of_input, reason', [
    (b'zz\r\n0123\r\n0\r\n\r\n', False, 'malformed chunked request body'),
    (b'4\r\n0123XX0\r\n\r\n', False, 'malformed chunked request body'),
    (b'64\r\n0123456789', True, 'request body ended early'),
], ids=['bad_chunk_size', 'missing_terminator', 'truncated'])
def test_broken_chunked_bodies_are_400_with_a_reason_and_no_traceback(body, end_of_input,
                                                                      reason):
    with Gunicorn() as running:
        with socket.create_connection(('127.0.0.1', running.port), timeout=30) as client:
            client.sendall(raw_chunked_write_head() + body)
            if end_of_input:
                client.shutdown(socket.SHUT_WR)
            assert read_response(client) == (400, reason.encode() + b'\n')
        page = running.metrics()
        assert (requests_counted(page, 'write', 400), requests_counted(page, 'write', 500)) == (
            1, 0)
    assert 'Traceback' not in running.log, running.log


ALERTS_TEST = '''\
rule_files: [{alerts}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # At the series limit: every write is applied in part, none in full.
      - series: k8s_exporter_last_write_applied_timestamp_seconds{{instance="a"}}
        values: 0+60x30
      - series: k8s_exporter_last_write_success_timestamp_seconds{{instance="a"}}
        values: 0x30
      - series: k8s_exporter_write_requests_total{{instance="a",result="partial"}}
        values: 0+10x30
      - series: k8s_exporter_write_requests_total{{instance="a",result="refused"}}
        values: 0x30
    alert_rule_test:
      - {{eval_time: 25m, alertname: K8sExporterNoWrites, exp_alerts: []}}
      - {{eval_time: 25m, alertname: K8sExporterWritesRefused, exp_alerts: []}}
      - eval_time: 25m
        alertname: K8sExporterWritesPartlyApplied
        exp_alerts:
          - exp_labels: {{instance: a}}
            exp_annotations:
              summary: "k8s_exporter a applies writes only in part; see k8s_exporter_samples_ignored_total"
  - interval: 1m
    input_series:
      # prometheus1 stopped writing at minute 2.
      - series: k8s_exporter_last_write_applied_timestamp_seconds{{instance="a"}}
        values: 0 60 120x30
    alert_rule_test:
      - eval_time: 25m
        alertname: K8sExporterNoWrites
        exp_alerts:
          - exp_labels: {{instance: a}}
            exp_annotations:
              summary: "k8s_exporter a has applied no write for 5 minutes"
  - interval: 1m
    input_series:
      # 200 connections probing the port, cut off every 10 s; a 503 burst.
      - series: k8s_exporter_connections_cut_off_total{{instance="a",reason="silent"}}
        values: 0+1200x30
      - series: k8s_exporter_connections_cut_off_total{{instance="a",reason="slow_body"}}
        values: 0x30
      - series: k8s_exporter_http_requests_total{{instance="a",handler="write",code="503"}}
        values: 0+6x30
    alert_rule_test:
      - eval_time: 25m
        alertname: K8sExporterClientsCutOff
        exp_alerts:
          - exp_labels: {{instance: a}}
            exp_annotations:
              summary: "k8s_exporter a cuts off 20 connections a second that send too slowly or nothing; see its log"
      - eval_time: 25m
        alertname: K8sExporterBusy
        exp_alerts:
          - exp_labels: {{instance: a}}
            exp_annotations:
              summary: "k8s_exporter a answers writes 503: too many request bodies at once"
      - {{eval_time: 25m, alertname: K8sExporterErrors, exp_alerts: []}}
  - interval: 1m
    input_series:
      # Series over a label limit from minute 10 on, series limit never.
      - series: k8s_exporter_samples_ignored_total{{instance="a",reason="label_limit"}}
        values: 0x10 0+5x10
      - series: k8s_exporter_samples_ignored_total{{instance="b",reason="invalid_series"}}
        values: 0+5x20
    alert_rule_test:
      - {{eval_time: 9m, alertname: K8sExporterOversizedSeriesRefused, exp_alerts: []}}
      - eval_time: 15m
        alertname: K8sExporterOversizedSeriesRefused
        exp_alerts:
          - exp_labels: {{instance: a}}
            exp_annotations:
              summary: "k8s_exporter a refuses series over a label limit; see the status page's refused writes"
'''


@pytest.mark.skipif(not os.access(PROMTOOL_BINARY, os.X_OK), reason='promtool not installed')
def test_example_alerts_tell_partial_writes_no_writes_cut_offs_and_503_apart(tmp_path):
    alerts = HERE / 'examples' / 'alerts.yml'
    check = subprocess.run([PROMTOOL_BINARY, 'check', 'rules', str(alerts)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    (tmp_path / 'test.yml').write_text(ALERTS_TEST.format(alerts=alerts))
    result = subprocess.run([PROMTOOL_BINARY, 'test', 'rules', str(tmp_path / 'test.yml')],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# Tables for the fast-path property: label order shuffled, an uppercase
# external label now and then, and symbol tables padded so that refs take
# one, two or three bytes.
FAST_PATH_NAMES = [*EXPORTED_METRICS, 'container_network_receive_bytes_total', 'up', '',
                   'container_memory_usage_bytes_total', 'xcontainer_fs_usage_bytes']


@st.composite
def shuffled_requests(draw):
    series = []
    for _ in range(draw(st.integers(1, 6))):
        labels = {}
        if draw(st.integers(0, 5)):
            labels['__name__'] = draw(st.sampled_from(FAST_PATH_NAMES))
        for name in draw(st.lists(st.sampled_from(['namespace', 'pod', 'container', 'id',
                                                   'Region', 'A', 'job', 'zz', '_']),
                                  max_size=6, unique=True)):
            labels[name] = draw(st.sampled_from(['', 'ns', 'p', '__name__', 'a' * 130,
                                                 *FAST_PATH_NAMES[:2]]))
        order = draw(st.permutations(list(labels)))
        samples = draw(st.lists(st.tuples(st.sampled_from([1.0, 0.0, math.nan, STALE_NAN]),
                                          st.sampled_from([0, 1, 2 ** 35, 2 ** 40,
                                                           2 ** 40 + 600_001])
                                          | st.integers(0, 2 ** 42)), max_size=2))
        # 2.0 refs broken now and then: one too many, or one past the symbols.
        damage = draw(st.sampled_from([None] * 6 + ['odd', 'name_value', 'other_value']))
        series.append(([(name, labels[name]) for name in order], samples, damage))
    return series, draw(st.sampled_from([0, 1, 200, 20_000]))


def encode_in_order(series, protocol, filler):
    """RW1 or RW2 payload keeping each series' label order; filler symbols first;
    2.0 refs damaged as each series says."""
    if protocol == PROTO_RW1:
        request = remote_pb2.WriteRequest()
        for labels, samples, _ in series:
            item = request.timeseries.add()
            for name, value in labels:
                item.labels.add(name=name, value=value)
            for value, timestamp in samples:
                item.samples.add(value=value, timestamp=timestamp)
        return request.SerializeToString()
    request = remote_pb2.WriteRequestV2(symbols=[''] + [f'f{n}' for n in range(filler)])
    refs = {text: ref for ref, text in enumerate(request.symbols)}
    for labels, _, _ in series:
        for pair in labels:
            for text in pair:
                if text not in refs:
                    refs[text] = len(request.symbols)
                    request.symbols.append(text)
    past = len(request.symbols)
    for labels, samples, damage in series:
        item = request.timeseries.add()
        for name, value in labels:
            broken = damage == ('name_value' if name == '__name__' else 'other_value')
            item.labels_refs.extend([refs[name], past if broken else refs[value]])
        if damage == 'odd':
            item.labels_refs.append(1)
        for value, timestamp in samples:
            item.samples.add(value=value, timestamp=timestamp)
    return request.SerializeToString()


def decoded_outcome(payload, protocol, fast_paths):
    """What decoding payload gives; with the fast paths, the same again from
    the series the decoder now knows (KnownSeries), or the test fails."""
    decoder = k8s_exporter.RemoteWriteDecoder(EXPORTED_METRICS, 'c', fast_paths)
    outcomes = []
    for _ in range(2 if fast_paths else 1):
        try:
            decoded = decoder.decode(payload, protocol, 2 ** 40)
        except RequestError as error:
            outcomes.append((error.status, error.reason))
            continue
        fields = dataclasses.asdict(decoded)
        fields['samples'] = [(*sample[:4], bits_of(sample.value)) for sample in decoded.samples]
        outcomes.append(fields)
    assert all(outcome == outcomes[0] for outcome in outcomes)
    return outcomes[0]


@PROPERTY_SETTINGS
@given(request=shuffled_requests(), protocol=st.sampled_from([PROTO_RW1, PROTO_RW2]))
def test_fast_paths_decode_exactly_as_the_full_path_on_random_input(request, protocol):
    series, filler = request
    payload = encode_in_order(series, protocol, filler)
    assert decoded_outcome(payload, protocol, True) == decoded_outcome(payload, protocol, False)


def test_known_label_bytes_in_another_role_are_read_again():
    # The labels after a series' __name__ are a known key for the metrics
    # without a part label, the whole labels for others: the same bytes in
    # the other role, with a second __name__ or none, read as the full path.
    inner = [('A', 'x'), ('__name__', FS_USAGE), ('namespace', 'ns'), ('pod', 'p')]
    rest = [('namespace', 'ns'), ('pod', 'q')]
    sample = [(1.0, 2 ** 40)]
    series = [(inner, sample, None), ([('__name__', MEMORY), *inner], sample, None),
              ([('__name__', MEMORY), *rest], sample, None), (rest, sample, None)]
    payload = encode_in_order(series, PROTO_RW1, 0)
    fast = decoded_outcome(payload, PROTO_RW1, True)
    assert fast == decoded_outcome(payload, PROTO_RW1, False)
    assert [(sample[0].pod, sample[1]) for sample in fast['samples']] == [
        ('p', 2), ('p', 2), ('q', 4)]     # fs usage, fs usage (the last __name__), memory
    assert (fast['bad_series'], fast['first_error']) == (1, 'series with no __name__ label')


@pytest.mark.parametrize('capture', ALL_CAPTURES)
@pytest.mark.parametrize('protocol', [PROTO_RW1, PROTO_RW2])
@pytest.mark.parametrize('external', [None, 'Region'], ids=['sorted', 'uppercase_label'])
def test_fast_paths_decode_exactly_as_the_full_path_on_every_fixture(capture, protocol,
                                                                     external):
    labels = {external: 'eu-west-1'} if external else None
    table = capture_table(capture_samples(capture), 'kubelet', 1_000, labels)
    payload = (rw1_body if protocol == PROTO_RW1 else rw2_body)(table, compress=False)
    fast = decoded_outcome(payload, protocol, True)
    assert fast == decoded_outcome(payload, protocol, False)
    assert fast['samples']


###############################################################################
# Bad input, property-based ###################################################
###############################################################################

# Any NaN but the stale marker is an ordinary value.
NAN_VARIANTS = [float_of_bits(bits) for bits in (
    0x7FF8000000000000, 0x7FF8000000000001, 0xFFF8000000000000, 0x7FF0000000000001,
    0x7FF4000000000000, STALE_NAN_BITS)]
sample_value = st.one_of(
    st.sampled_from([STALE_NAN, STALE_NAN, *NAN_VARIANTS, math.inf, -math.inf, -0.0, 0.0,
                     5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308,
                     -1.7976931348623157e308, 1e300, -1e-300, 0.1, 4096.0]),
    st.floats(),
    st.integers(-2 ** 53, 2 ** 53).map(float))
EXTREME_VALUES = [math.inf, -math.inf, 1.7976931348623157e308, -1.7976931348623157e308, 1e308,
                  math.nan, STALE_NAN]
# Up to 2004: samples stamped ahead of the clock are refused (their own test).
sample_timestamp = st.one_of(st.integers(0, 4), st.integers(-2 ** 63, 2 ** 40))
CGROUPS = ['/', '/kubepods/burstable/pod0a1b-2c3d', '/kubepods/burstable/pod0a1b-2c3d/4e5f',
           '/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b_2c3d.slice',
           '/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b_2c3d.slice/'
           'cri-containerd-4e5f.scope', 'pod12\n', 'xpod12', 'a-podG', 'pod']
MEANINGFUL = {'__name__', 'cluster', 'job', 'id', 'image', 'device',
              *(name for convention in README_POD_CONVENTIONS for name in convention)}


@st.composite
def write_requests(draw):
    """1-3 requests (protocol, table) over 1-3 pods and a few values, so series of
    one pod and metric meet, overwrite each other and sum."""
    def pool(*fixed):
        return list(fixed) + draw(st.lists(label_text, min_size=1, max_size=2))

    def pod_identity():
        labels = {}
        conventions = draw(st.lists(st.sampled_from(README_POD_CONVENTIONS), min_size=1, max_size=2,
                                    unique=True))
        for namespace_label, pod_label, _ in conventions:
            # Now and then an empty or missing name: a series without a pod.
            for name, values in ((namespace_label, namespaces), (pod_label, pods)):
                if draw(st.integers(0, 7)):
                    labels[name] = draw(st.sampled_from(values))
        for name, values in (('cluster', pool('', 'c1')), ('job', pool('', 'kubelet'))):
            if draw(st.booleans()):
                labels[name] = draw(st.sampled_from(values))
        return labels, conventions[0][2]

    namespaces, pods = pool('default'), pool('web-0')
    identities = [pod_identity() for _ in range(draw(st.integers(1, 3)))]
    containers, cgroups, devices = pool('', 'POD', 'app'), pool('', *CGROUPS), pool('', 'sda')
    # A few values per example, often extremes, so sums meet +Inf and -Inf,
    # overflow, and NaN next to numbers.
    values = draw(st.lists(st.one_of(st.sampled_from((math.inf, -math.inf)),
                                     st.sampled_from(EXTREME_VALUES), sample_value),
                           min_size=1, max_size=3))
    # One or two exported metrics per example, so each pod gets several series of one.
    exported = draw(st.lists(st.sampled_from(EXPORTED_METRICS), min_size=1, max_size=2,
                             unique=True))
    metric = st.sampled_from([*exported * 4, 'container_network_receive_bytes_total', '',
                              'Container_memory_usage_bytes'])
    extra_name = label_text.filter(lambda name: name not in MEANINGFUL)

    def one_series():
        if not draw(st.integers(0, 30)):
            return {}, draw(st.lists(st.tuples(sample_value, sample_timestamp), max_size=1))
        identity, container_label = draw(st.sampled_from(identities))
        labels = {'__name__': draw(metric), **identity}
        for name, choices in ((container_label, containers), ('id', cgroups),
                              ('device', devices), ('image', ['', 'pause:3.9'])):
            if draw(st.booleans()):
                labels[name] = draw(st.sampled_from(choices))
        labels.update(draw(st.dictionaries(extra_name, label_text, max_size=2)))
        value = st.one_of(st.sampled_from(values), st.sampled_from(values), sample_value)
        return labels, draw(st.lists(st.tuples(value, sample_timestamp), min_size=1,
                                     max_size=3))

    return [(draw(st.sampled_from((1, 2))), [one_series() for _ in range(draw(st.integers(
        1, 10)))]) for _ in range(draw(st.integers(1, 3)))]


def _two_series(metric, first, second, **labels):
    """One request with two series of one pod and metric, told apart by container."""
    pod = {'__name__': metric, 'namespace': 'default', 'pod': 'web-0', **labels}
    return [(1, [({**pod, 'container': 'app'}, [(first, 1)]),
                 ({**pod, 'container': 'sidecar'}, [(second, 1)])])]


@PROPERTY_SETTINGS
@given(requests=write_requests())
# Found by this property; kept as examples so every run checks them.
@example(_two_series('container_memory_usage_bytes', 1.7976931348623157e308,
                     1.7976931348623157e308))
@example(_two_series('container_fs_usage_bytes', math.inf, -math.inf))
@example(_two_series('container_fs_limit_bytes', math.nan, 5.0, device='/dev/vda1'))
def test_decoder_property_any_labels_and_values_give_the_rules_values_or_a_clean_400(requests):
    """Any labels and float values: 204, or 400 naming the bad series with the
    rest applied; /metrics then reads back exactly what the rules compute."""
    app = fresh_app()
    for protocol, table in requests:
        status, headers, body = post(app, table, protocol)
        bad = sum(1 for labels, _ in table if not labels.get('__name__'))
        if bad:
            reason = one_line_reason(status, headers, body)
            assert status == 400
            assert reason.startswith(f'{bad} invalid series skipped, first: series with')
            assert reason.endswith('; the rest was applied')
        else:
            assert (status, body) == (204, b'')
        if protocol == 2:
            written = sum(len(samples) for labels, samples in table if labels.get('__name__'))
            assert headers['X-Prometheus-Remote-Write-Samples-Written'] == str(written)
    got = pod_values_in(scrape(app))
    expected = expected_pod_values([table for _, table in requests])
    assert same_values(got, expected), describe_difference(got, expected)



@st.composite
def protobuf_ish(draw, depth=0):
    """Bytes shaped like protobuf: real tags and wire types, random contents, odd lengths."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 5))):
        field = draw(st.one_of(st.integers(1, 6), st.integers(1, 2 ** 29 - 1)))
        wire = draw(st.sampled_from((0, 1, 2, 2, 2, 5, 3, 4, 6, 7)))
        out += varint(field << 3 | wire)
        if wire == 0:
            out += varint(draw(st.integers(0, 2 ** 64 - 1)))
        elif wire in (1, 5):
            out += draw(st.binary(min_size=8 if wire == 1 else 4, max_size=8 if wire == 1
                                  else 4))
        elif wire == 2:
            if depth < 3 and draw(st.booleans()):
                inner = draw(protobuf_ish(depth + 1))
            else:
                inner = draw(st.one_of(st.binary(max_size=20),
                                       label_text.map(lambda text: text.encode())))
            length = len(inner) + draw(st.sampled_from((0, 0, 0, 1, -1, 1000)))
            out += varint(max(length, 0)) + inner
    return bytes(out)


# Seed pods with newer timestamps and other values: applying any part of
# such a body would show on /metrics.
SEED_UPDATE = [(labels, [(value + 1, timestamp + 60_000) for value, timestamp in samples])
               for labels, samples in seed_table()]
FUZZ_POD_TABLE = [(dict(labels, namespace='fuzz-namespace', pod=f'fuzz-pod-{number}'), samples)
                  for number, (labels, samples) in enumerate(seed_table())]


def flip_bit(data, position):
    position %= len(data) * 8
    return data[:position // 8] + bytes([data[position // 8] ^ 1 << position % 8]) + data[
        position // 8 + 1:]


random_body = st.one_of(
    st.tuples(st.just('raw'), st.binary(max_size=300)),
    st.tuples(st.just('snappy of random bytes'), st.binary(max_size=300).map(snappy.compress)),
    st.tuples(st.just('snappy of protobuf-ish bytes'), protobuf_ish().map(snappy.compress)),
    st.builds(lambda build, cut: ('truncated seed update', build(SEED_UPDATE)[:cut]),
              st.sampled_from((rw1_body, rw2_body)), st.integers(1, 400)),
    st.builds(lambda build, bit: ('bit-flipped payload', snappy.compress(flip_bit(
        build(FUZZ_POD_TABLE, compress=False), bit))),
        st.sampled_from((rw1_body, rw2_body)), st.integers(0, 2 ** 20)),
    st.builds(lambda build, cut: ('truncated payload', snappy.compress(
        build(FUZZ_POD_TABLE, compress=False)[:cut])),
        st.sampled_from((rw1_body, rw2_body)), st.integers(0, 2000)),
)


def seed_lines(exposition):
    seed_pods = {pod for _, pod, *_ in SEED_PODS}
    return {key: value for key, value in read_exposition(exposition).items()
            if dict(key[1]).get('pod') in seed_pods}


@PROPERTY_SETTINGS
@given(body=random_body, content_type=st.sampled_from((RW1_TYPE, RW2_TYPE)))
def test_random_bodies_never_5xx_and_refused_ones_leave_the_store_as_it_was(body, content_type):
    kind, data = body
    app = fresh_app()
    assert post(app, seed_table())[0] == 204
    before = scrape(app)
    status, headers, response = call_wsgi(app, 'POST', '/write', data, {
        'Content-Type': content_type, 'Content-Encoding': 'snappy'})
    after = scrape(app)
    assert status < 500, (kind, status, response)
    if status == 204:
        assert response == b''
    else:
        one_line_reason(status, headers, response)
    if kind not in ('bit-flipped payload', 'truncated payload'):
        # No fuzz pod inside: nothing may change, whether refused or not.
        assert pod_families(after) == pod_families(before), kind
    assert seed_lines(after) == seed_lines(before), kind
    if kind == 'truncated seed update':
        assert status == 400


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
    # no id: the pod cgroup, when there is no container label either
    ({'namespace': 'ns', 'pod': 'p'}, PodKey('k8s-cluster', '', 'ns', 'p'),
     SeriesKey(True, '', '', '', '')),
    # a container label makes a container, whatever the id says
    ({'namespace': 'ns', 'pod': 'p', 'container': 'app', 'id': '/kubepods/burstable/podab'},
     PodKey('k8s-cluster', '', 'ns', 'p'),
     SeriesKey(False, 'app', '/kubepods/burstable/podab', '', '')),
], ids=['kubelet-pod-cgroup', 'kubelet-container', 'kubelet-legacy', 'standalone-cadvisor',
        'systemd-pod-slice', 'containerd-pause', 'no-id', 'container-on-a-pod-cgroup-id'])
def test_pod_identity_in_each_label_convention(labels, pod, series):
    assert pod_series_identity(labels, 'k8s-cluster') == (pod, series)


@pytest.mark.parametrize('labels', [
    {'id': '/'},
    {'id': '/system.slice/docker.service'},
    {'namespace': '', 'pod_name': '', 'container_name': '', 'id': '/kubepods/burstable/podab'},
    {'name': 'some-docker-container', 'id': '/docker/0f', 'image': 'redis'},
    {'namespace': 'ns', 'pod': ''},
    {'pod': 'p', 'container': 'app', 'id': '/kubepods/podab/0f'},
], ids=['root-cgroup', 'system-service', 'empty-legacy-labels', 'plain-docker', 'empty-pod',
        'no-namespace'])
def test_series_without_pod_identity_are_not_exported(labels):
    assert pod_series_identity(labels, 'k8s-cluster') is None


def series_map(*entries):
    """[(SeriesKey, value), ...] of one pod from (pod_cgroup, container, device, value):
    the keys pod_series_identity makes of those cAdvisor labels."""
    series = []
    for pod_cgroup, container, device, value in entries:
        cgroup = '/kubepods/burstable/podab' + ('' if pod_cgroup else f'/{container}')
        labels = cadvisor(MEMORY, 'ns', 'p', '' if pod_cgroup else container, cgroup,
                          device=device)
        _, series_key = pod_series_identity(labels, DEFAULT_CLUSTER)
        assert series_key.pod_cgroup == pod_cgroup, labels
        series.append((series_key, value))
    return series


def rule_of(metric):
    """The aggregation rule the metrics table gives metric."""
    return metric_spec(metric).rule


FS_LIMIT = 'container_fs_limit_bytes'


def test_pod_cgroup_series_wins_over_container_sum():
    series = series_map((True, '', '', 100.0), (False, 'POD', '', 1.0), (False, 'app', '', 2.0))
    assert pod_value(rule_of(MEMORY), series) == 100.0


def test_without_pod_cgroup_the_containers_are_summed_pause_included():
    series = series_map((False, 'POD', '', 1.0), (False, 'app', '', 2.0), (False, 'b', '', 4.0))
    assert pod_value(rule_of(MEMORY), series) == 7.0


def test_fs_usage_sums_containers_and_devices():
    series = series_map((False, 'POD', '/dev/a', 1.0), (False, 'app', '/dev/a', 2.0),
                        (False, 'app', '/dev/b', 4.0), (True, '', '/dev/a', 100.0))
    assert pod_value(rule_of(FS_USAGE), series) == 7.0


def test_fs_limit_counts_each_device_once():
    series = series_map((False, 'POD', '/dev/a', 10.0), (False, 'app', '/dev/a', 12.0),
                        (False, 'app', '/dev/b', 5.0))
    assert pod_value(rule_of(FS_LIMIT), series) == 17.0   # the largest a device has


def test_fs_limit_of_a_device_ignores_nan_as_promql_max_does():
    series = series_map((False, 'a', '/dev/a', math.nan), (False, 'b', '/dev/a', 10.0),
                        (False, 'c', '/dev/a', math.nan))
    assert pod_value(rule_of(FS_LIMIT), series) == 10.0
    series += series_map((False, 'd', '/dev/b', math.nan))     # NaN on every series
    assert math.isnan(pod_value(rule_of(FS_LIMIT), series))


def test_fs_rules_without_container_series_give_no_value():
    series = series_map((True, '', '/dev/a', 10.0))
    assert pod_value(rule_of(FS_USAGE), series) is None
    assert pod_value(rule_of(FS_LIMIT), series) is None
    assert pod_value(rule_of(MEMORY), []) is None


def test_aggregation_rule_per_metric_name():
    assert [rule_of(name) for name in EXPORTED_METRICS] == [
        'pod_cgroup', 'device', 'sum', 'pod_cgroup', 'pod_cgroup']
    assert rule_of('container_fs_inodes_total') == 'sum'


@pytest.mark.parametrize('values, total', [
    ([1.0, 2.0], 3.0), ([0.1, 0.2, -0.3], 2.7755575615628914e-17),
    ([1.7976931348623157e308, 1.7976931348623157e308], math.inf),
    ([1.7976931348623157e308, 1.7976931348623157e308, -1.7976931348623157e308],
     1.7976931348623157e308),
    ([-1.7976931348623157e308, -1e308], -math.inf), ([math.inf, 1.0], math.inf),
    ([math.inf, -math.inf], math.nan), ([math.nan, 1.0], math.nan), ([], 0.0),
], ids=['plain', 'correctly-rounded', 'overflow-to-inf', 'overflow-and-back',
        'overflow-to-minus-inf', 'inf-plus-one', 'inf-minus-inf', 'nan', 'empty'])
def test_sums_are_correctly_rounded_and_end_as_ieee_addition_would(values, total):
    # Senders may write any float: a sum never raises, it ends as IEEE
    # addition would (and the model agrees).
    assert same_values({0: ieee_sum(values)}, {0: total})
    assert same_values({0: k8s_exporter.sum_values(values)}, {0: total})


def test_a_pod_value_of_minus_zero_is_written_0():
    app = fresh_app()
    post(app, [(cadvisor(MEMORY, 'ns', 'p', cgroup='/kubepods/podab'), [(-0.0, 1)]),
               (cadvisor('container_fs_usage_bytes', 'ns', 'p', 'app', '/kubepods/podab/cc',
                         device='/dev/a'), [(-0.0, 1)])])
    assert [line.rpartition(' ')[2] for line in pod_families(scrape(app)).splitlines()
            if not line.startswith('#')] == ['0', '0']


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
    assert post(app, table)[0] == 204
    values = {(key[0], key[4]): value for key, value in pod_values_in(scrape(app)).items()}
    assert values == {('container_memory_usage_bytes', 'with-cgroup'): 1000,
                      ('container_memory_usage_bytes', 'no-cgroup'): 30,
                      ('container_fs_usage_bytes', 'with-cgroup'): 7,
                      ('container_fs_limit_bytes', 'with-cgroup'): 150}


def test_incoming_cluster_label_wins_and_job_is_kept():
    app = fresh_app(cluster='default-cluster')
    table = [(cadvisor('container_memory_usage_bytes', 'ns', 'a', job='kubelet',
                       cluster='east'), [(1, 1)]),
             (cadvisor('container_memory_usage_bytes', 'ns', 'b', job='kubelet'), [(2, 1)])]
    assert post(app, table)[0] == 204
    assert pod_families(scrape(app)).split('\n')[2:-1] == [
        'container_memory_usage_bytes{cluster="default-cluster",item="container_memory_usage_'
        'bytes",job="kubelet",namespace="ns",pod="b"} 2',
        'container_memory_usage_bytes{cluster="east",item="container_memory_usage_bytes",'
        'job="kubelet",namespace="ns",pod="a"} 1']


###############################################################################
# Real kubelet captures #######################################################
###############################################################################

def test_read_capture_adds_only_a_missing_final_newline(tmp_path):
    without, with_newline = tmp_path / 'without.txt', tmp_path / 'with.txt'
    without.write_bytes(b'a 1\nb 2')
    with_newline.write_bytes(b'a 1\nb 2\n')
    assert read_capture(without) == read_capture(with_newline) == 'a 1\nb 2\n'


def test_capture_table_drops_empty_labels_and_adds_name_and_job():
    samples = [('m', {'container': '', 'id': '/a', 'pod': 'p'}, 2.5),
               ('m', {'job': 'own'}, 1)]
    assert capture_table(samples, 'cadvisor', 1234, {'instance': 'node:10250'}) == [
        ({'__name__': 'm', 'job': 'cadvisor', 'instance': 'node:10250', 'id': '/a', 'pod': 'p'},
         [(2.5, 1234)]),
        ({'__name__': 'm', 'job': 'own', 'instance': 'node:10250'}, [(1, 1234)]),
    ]


@pytest.mark.parametrize('protocol', [1, 2], ids=['rw1', 'rw2'])
@pytest.mark.parametrize('capture', ALL_CAPTURES)
def test_capture_pod_values_match_the_readme_rules(capture, protocol):
    samples = capture_samples(capture)
    expected = expected_capture_values(samples)
    app = fresh_app()
    post_samples(app, samples, protocol)
    served = pod_values_in(scrape(app))
    assert served == expected
    # Every pod of the capture is there, and only pods: the node's own
    # cgroups (id="/", qos and system slices) carry no pod identity.
    pods = {owner[:2] for _, labels, _ in samples
            if (owner := pod_of(labels))}
    assert {(namespace, pod) for _, _, _, namespace, pod in served} == pods
    # Each input series of a pod is held apart: none overwrote another.
    held = {(name, frozenset((k, v) for k, v in labels.items() if v))
            for name, labels, _ in samples if name in EXPORTED_METRICS and pod_of(labels)}
    assert self_metric(scrape(app), 'k8s_exporter_input_series') == len(held)


@pytest.mark.parametrize('capture', ALL_CAPTURES)
def test_capture_series_are_classified_as_the_readme_says(capture):
    """The exporter's pod-cgroup/container split agrees with ours on every series."""
    for _, labels, _ in capture_samples(capture):
        present = {label: text for label, text in labels.items() if text}
        identity = k8s_exporter.pod_series_identity(present, 'k8s-cluster')
        owner = pod_of(present)
        assert (identity is None) == (owner is None), present
        if identity:
            pod, series = identity
            assert (pod.namespace, pod.pod) == owner[:2]
            assert series.pod_cgroup == is_pod_cgroup_series(present), present


# The traps of issue 6, each on the capture that shows it.

def containerd_pod_cgroup_and_pause(samples, metric):
    """{(namespace, pod): (pod cgroup value, pause value)}; each pod has exactly one of each."""
    pairs = {}
    for pod, series in pod_series(samples, metric).items():
        pod_level = [(labels, value) for labels, value in series if is_pod_cgroup_series(labels)]
        pause = [(labels, value) for labels, value in series
                 if 'container' not in labels and not is_pod_cgroup_series(labels)]
        assert len(pod_level) == 1 and len(pause) == 1, (pod, series)
        (cgroup_labels, cgroup_value), (pause_labels, pause_value) = pod_level[0], pause[0]
        # Same labels but for id (and image, name): only the id tells them apart.
        assert pause_labels['id'].rpartition('/')[0] == cgroup_labels['id']
        assert 'pause' in pause_labels['image'] and 'image' not in cgroup_labels
        pairs[pod] = (cgroup_value, pause_value)
    return pairs


@pytest.mark.parametrize('capture', [CAPTURE_KIND_1_16, CAPTURE_MINIKUBE_1_35])
def test_containerd_pod_value_is_the_pod_cgroup_not_the_pause_container(capture):
    samples = capture_samples(capture)
    app = fresh_app()
    post_samples(app, samples, 1)
    served = pod_values_in(scrape(app))
    for metric in ('container_memory_usage_bytes', 'container_memory_max_usage_bytes'):
        pairs = containerd_pod_cgroup_and_pause(samples, metric)
        assert by_metric(served, metric) == {pod: cgroup for pod, (cgroup, _) in pairs.items()}
        # The pause containers use memory, so a sum of the two would differ.
        assert all(pause > 0 for _, pause in pairs.values()), metric


@pytest.mark.parametrize('pause_first', [True, False], ids=['pause-first', 'pod-cgroup-first'])
@pytest.mark.parametrize('capture', [CAPTURE_KIND_1_16, CAPTURE_MINIKUBE_1_35])
def test_containerd_pause_and_pod_cgroup_never_overwrite_each_other(capture, pause_first):
    """Sent apart, in either order and with equal or later timestamps, both series are kept.

    Keyed by (metric, namespace, pod) alone, the second write would either be
    ignored (equal timestamp) or replace the first (later timestamp).
    """
    metric = 'container_memory_usage_bytes'
    samples = [(name, labels, value) for name, labels, value in capture_samples(capture)
               if name == metric and pod_of(labels)]
    pause = [sample for sample in samples
             if not is_pod_cgroup_series(sample[1]) and not sample[1].get('container')]
    pod_level = [sample for sample in samples if is_pod_cgroup_series(sample[1])]
    first, second = (pause, pod_level) if pause_first else (pod_level, pause)
    app = fresh_app()
    post_samples(app, first, 2, CAPTURE_TIMESTAMP_MS)
    post_samples(app, second, 2, CAPTURE_TIMESTAMP_MS + (0 if pause_first else 15_000))
    pairs = containerd_pod_cgroup_and_pause(samples, metric)
    assert by_metric(pod_values_in(scrape(app)), metric) == {
        pod: cgroup for pod, (cgroup, _) in pairs.items()}
    assert any(cgroup != pause for cgroup, pause in pairs.values())
    assert self_metric(scrape(app), 'k8s_exporter_input_series') == len(pause) + len(pod_level)


def test_systemd_slice_pod_cgroup_wins_over_docker_scopes():
    samples = capture_samples(CAPTURE_MINIKUBE_1_22)
    app = fresh_app()
    post_samples(app, samples, 1)
    served = pod_values_in(scrape(app))
    differs = 0
    for metric in POD_CGROUP_METRICS:
        expected = {}
        for pod, series in pod_series(samples, metric).items():
            slices = [(labels, value) for labels, value in series
                      if labels['id'].endswith('.slice')]
            scopes = [(labels, value) for labels, value in series
                      if labels['id'].endswith('.scope')]
            assert len(slices) == 1 and len(scopes) == len(series) - 1, series
            labels, value = slices[0]
            assert 'container' not in labels and '-pod' in labels['id'].rpartition('/')[2]
            assert all(labels['id'].startswith(slices[0][0]['id'] + '/docker-')
                       for labels, _ in scopes)
            expected[pod] = value
            differs += value != math.fsum(value for _, value in scopes)
        assert by_metric(served, metric) == expected
    # On some pods the slice is not the sum of its scopes: a sum would show.
    assert differs > 0


def legacy_pod_uid(cgroup):
    """The pod uid of a cgroupfs id, from its pod<uid> segment."""
    return next(segment[3:] for segment in cgroup.split('/')
                if segment.startswith('pod') and is_pod_cgroup_id(segment))


def test_legacy_unlabelled_pod_cgroup_is_not_linked_pods_use_the_sum_of_containers():
    samples = capture_samples(CAPTURE_LEGACY_GKE)
    app = fresh_app()
    post_samples(app, samples, 2)
    served = pod_values_in(scrape(app))
    differs_from_pod_cgroup = differs_without_pause = 0
    for metric in POD_CGROUP_METRICS:
        unlabelled = {legacy_pod_uid(labels['id']): value for name, labels, value in samples
                      if name == metric and is_pod_cgroup_id(labels['id'])
                      and not labels['pod_name'] and not labels['namespace']}
        assert len(unlabelled) == 5
        expected = {}
        for pod, series in pod_series(samples, metric).items():
            assert all(labels['container_name'] for labels, _ in series)
            assert sum(labels['container_name'] == 'POD' for labels, _ in series) == 1
            uids = {legacy_pod_uid(labels['id']) for labels, _ in series}
            assert len(uids) == 1
            expected[pod] = math.fsum(value for _, value in series)
            differs_from_pod_cgroup += expected[pod] != unlabelled[uids.pop()]
            differs_without_pause += expected[pod] != math.fsum(
                value for labels, value in series if labels['container_name'] != 'POD')
        assert by_metric(served, metric) == expected
    # A link through the uid would give other values on some pods, and
    # leaving out the pause container would too.
    assert differs_from_pod_cgroup > 0
    assert differs_without_pause > 0


@pytest.mark.parametrize('capture', [CAPTURE_KIND_1_16, CAPTURE_MINIKUBE_1_35])
def test_containerd_pods_have_no_fs_lines_not_zero_not_the_nodes(capture):
    samples = capture_samples(capture)
    node_fs = [labels for name, labels, _ in samples if name.startswith('container_fs_')
               and name in EXPORTED_METRICS]
    assert node_fs and all(labels['id'] == '/' and not pod_of(labels) for labels in node_fs)
    app = fresh_app()
    post_samples(app, samples, 1)
    status, _, body = call_wsgi(app, 'GET', '/metrics')
    assert status == 200
    assert b'container_fs_' not in body
    served = pod_values_in(scrape(app))
    pods = {(namespace, pod) for _, _, _, namespace, pod in served}
    assert len(pods) == len({pod_of(labels)[:2] for _, labels, _ in samples if pod_of(labels)})
    assert {metric for metric, *_ in served} == set(POD_CGROUP_METRICS)


@pytest.mark.parametrize('capture', [CAPTURE_MINIKUBE_1_22, CAPTURE_MINIKUBE_1_35])
def test_pod_with_only_a_cgroup_and_a_pause_container_is_exported(capture):
    samples = capture_samples(capture)
    own = [(name, labels, value) for name, labels, value in samples
           if labels.get('pod') == 'e2e-container-creating']
    containers = {labels.get('container', '') for name, labels, _ in own
                  if not is_pod_cgroup_series(labels)}
    assert containers == ({'POD'} if capture == CAPTURE_MINIKUBE_1_22 else {''})
    app = fresh_app()
    post_samples(app, samples, 2)
    served = {metric: value for (metric, _, _, _, pod), value in pod_values_in(scrape(app)).items()
              if pod == 'e2e-container-creating'}
    expected = {name: value for name, labels, value in own
                if name in POD_CGROUP_METRICS and is_pod_cgroup_series(labels)}
    if capture == CAPTURE_MINIKUBE_1_22:
        # docker gives the pause container fs series, one device each; they are the pod's.
        fs = [(name, value) for name, labels, value in own
              if name in ('container_fs_limit_bytes', 'container_fs_usage_bytes')]
        assert len(fs) == 2
        expected.update(fs)
    assert len(expected) == (5 if capture == CAPTURE_MINIKUBE_1_22 else 3)
    assert served == expected


def test_cpu_load_d_average_is_not_taken_for_cpu_load_average():
    samples = capture_samples(CAPTURE_MINIKUBE_1_35)
    load_d = [(name, labels, value) for name, labels, value in samples
              if name == 'container_cpu_load_d_average_10s' and pod_of(labels)]
    assert load_d
    app = fresh_app()
    post_samples(app, load_d, 1)
    assert pod_values_in(scrape(app)) == {}
    assert self_metric(scrape(app), 'k8s_exporter_samples_ignored_total',
                              reason='unexported_metric') == len(load_d)
    # In the whole capture both families are 0; make the impostor's values
    # visible so that taking it would change the served cpu load.
    marked = [(name, labels, 1e9 + number if name == 'container_cpu_load_d_average_10s'
               else value) for number, (name, labels, value) in enumerate(samples)]
    app = fresh_app()
    post_samples(app, marked, 2)
    served = by_metric(pod_values_in(scrape(app)), 'container_cpu_load_average_10s')
    assert len(served) == 18 and set(served.values()) == {0}


def test_capture_without_final_newline_is_read_whole():
    path = capture_path(CAPTURE_KIND_1_16)
    raw = path.read_bytes()
    assert not raw.endswith(b'\n')
    text = read_capture(path)
    assert text.encode() == raw + b'\n'
    assert read_samples(text)[-1] == ('machine_memory_bytes', {}, 5718659072.0)
    # Read as it is, the capture is refused rather than cut short.
    with pytest.raises(ExpositionSyntaxError, match='newline'):
        read_samples(raw.decode())


# pod_series_identity on real ids.

def first_labels(capture, metric, predicate):
    """The first series of metric in capture matching predicate, empty labels dropped."""
    for name, labels, _ in _parsed_capture(capture):
        present = {label: text for label, text in labels.items() if text}
        if name == metric and predicate(present):
            return present
    raise AssertionError(f'no such series of {metric} in {capture}')


def identity_of(labels):
    return k8s_exporter.pod_series_identity(labels, 'k8s-cluster')


def _id_matches(pattern):
    compiled = re.compile(pattern)
    return lambda labels: compiled.fullmatch(labels.get('id', '')) is not None


UID = r'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'
SYSTEMD_UID = r'[0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12}'


@pytest.mark.parametrize('capture, cgroup_pattern, container, pod_level', [
    (CAPTURE_EKS_1_21, rf'/kubepods/burstable/pod{UID}', '', True),
    (CAPTURE_EKS_1_21, rf'/kubepods/besteffort/pod{UID}', '', True),
    (CAPTURE_EKS_1_21, rf'/kubepods/burstable/pod{UID}/[0-9a-f]{{64}}', 'POD', False),
    (CAPTURE_EKS_1_21, rf'/kubepods/burstable/pod{UID}/[0-9a-f]{{64}}', 'aws-node', False),
    (CAPTURE_MINIKUBE_1_22,
     rf'/kubepods\.slice/kubepods-burstable\.slice/kubepods-burstable-pod{SYSTEMD_UID}\.slice',
     '', True),
    (CAPTURE_MINIKUBE_1_22, rf'/kubepods\.slice/kubepods-pod{SYSTEMD_UID}\.slice', '', True),
    (CAPTURE_MINIKUBE_1_22, rf'/kubepods\.slice/kubepods-pod{SYSTEMD_UID}\.slice'
                            r'/docker-[0-9a-f]{64}\.scope', 'POD', False),
    (CAPTURE_KIND_1_16, rf'/kubepods/pod{UID}', '', True),
    (CAPTURE_KIND_1_16, rf'/kubepods/pod{UID}/[0-9a-f]{{64}}', '', False),
    (CAPTURE_MINIKUBE_1_35, rf'/kubepods/besteffort/pod{UID}/[0-9a-f]{{64}}', '', False),
    (CAPTURE_MINIKUBE_1_35, rf'/kubepods/pod{UID}', '', True),
    (CAPTURE_LEGACY_GKE, rf'/kubepods/burstable/pod{UID}/[0-9a-f]{{64}}', 'POD', False),
], ids=['eks-burstable-pod', 'eks-besteffort-pod', 'eks-pause', 'eks-container',
        'minikube-systemd-burstable-pod', 'minikube-systemd-guaranteed-pod',
        'minikube-systemd-pause', 'kind-pod', 'kind-containerd-pause',
        'minikube-1.35-containerd-pause', 'minikube-1.35-pod', 'gke-legacy-pause'])
def test_pod_series_identity_tells_pod_cgroups_by_real_ids(capture, cgroup_pattern, container,
                                                           pod_level):
    matches_id = _id_matches(cgroup_pattern)
    convention = ('container_name', 'pod_name') if capture == CAPTURE_LEGACY_GKE else (
        'container', 'pod')
    labels = first_labels(capture, 'container_memory_usage_bytes',
                          lambda labels: matches_id(labels) and labels.get(convention[1])
                          and labels.get(convention[0], '') == container)
    pod, series = identity_of(labels)
    assert (pod.namespace, pod.pod) == (labels['namespace'], labels[convention[1]])
    assert series.pod_cgroup is pod_level
    assert (series.container, series.id) == (container, labels['id'])


def test_pod_series_identity_keeps_containerd_pause_apart_from_its_pod_cgroup():
    pause = first_labels(CAPTURE_KIND_1_16, 'container_memory_usage_bytes',
                         lambda labels: 'pause' in labels.get('image', ''))
    cgroup = pause['id'].rpartition('/')[0]
    pod_level = first_labels(CAPTURE_KIND_1_16, 'container_memory_usage_bytes',
                             lambda labels: labels.get('id') == cgroup)
    # The same labels but for id, image and name: only id says which is the pod's cgroup.
    assert ({k: v for k, v in pause.items() if k not in ('id', 'image', 'name')}
            == {k: v for k, v in pod_level.items() if k != 'id'})
    (pause_pod, pause_series), (cgroup_pod, cgroup_series) = map(identity_of, (pause, pod_level))
    assert pause_pod == cgroup_pod
    assert pause_series != cgroup_series
    assert (pause_series.pod_cgroup, cgroup_series.pod_cgroup) == (False, True)


def test_pod_series_identity_gives_legacy_unlabelled_pod_cgroup_no_pod():
    unlabelled = first_labels(CAPTURE_LEGACY_GKE, 'container_memory_usage_bytes',
                              _id_matches(rf'/kubepods/burstable/pod{UID}'))
    assert not {'pod_name', 'namespace', 'container_name'} & set(unlabelled)
    assert identity_of(unlabelled) is None


###############################################################################
# The metrics pods are judged by: CPU usage, working set, network #############
###############################################################################

REAL_CAPTURES = (CAPTURE_EKS_1_21, CAPTURE_MINIKUBE_1_22, CAPTURE_KIND_1_16,
                 CAPTURE_MINIKUBE_1_35, CAPTURE_LEGACY_GKE)
# Which of them carry each metric beyond the five, read off the captures
# with grep: every capture has CPU usage (the legacy GKE node per CPU, with
# one CPU); the minikube extracts carry no working set and no network.
CAPTURES_WITH = {
    CPU_USAGE: set(REAL_CAPTURES),
    'container_memory_working_set_bytes': {CAPTURE_EKS_1_21, CAPTURE_KIND_1_16,
                                           CAPTURE_LEGACY_GKE},
    'container_network_receive_bytes_total': {CAPTURE_EKS_1_21, CAPTURE_KIND_1_16,
                                              CAPTURE_LEGACY_GKE},
}


@pytest.mark.parametrize('capture', REAL_CAPTURES)
def test_every_known_metric_of_a_real_capture_is_made_by_the_readme_rules(capture):
    samples = capture_samples(capture)
    app = fresh_app(metrics=KNOWN_METRICS)
    post_samples(app, samples, 1)
    served = pod_values_in(scrape(app))
    assert served == expected_capture_values(samples, metrics=KNOWN_METRICS)
    for metric, captures in CAPTURES_WITH.items():
        # Where a capture lacks a metric, its pods have no line for it.
        assert any(key[0] == metric for key in served) == (capture in captures), metric


def test_the_default_output_is_the_five_whatever_else_arrives():
    app = fresh_app()
    samples = capture_samples(CAPTURE_EKS_1_21)
    post_samples(app, samples, 1)
    assert {key[0] for key in pod_values_in(scrape(app))} == set(EXPORTED_METRICS)


def test_cpu_usage_is_a_counter_and_every_family_keeps_the_five_labels():
    app = fresh_app(metrics=KNOWN_METRICS)
    post_samples(app, capture_samples(CAPTURE_EKS_1_21), 1)
    page = scrape(app)
    types = dict(re.findall(r'^# TYPE (\S+) (\S+)$', page, re.M))
    assert {name: kind for name, kind in types.items() if name.startswith('container_')} == {
        name: 'counter' if name in COUNTERS else 'gauge' for name in KNOWN_METRICS}
    names = [name for name in types if name.startswith('container_')]
    assert names == sorted(names)
    pod_values_in(page)      # every line has exactly the five output labels


def test_cpu_usage_of_a_pod_cgroup_is_the_sum_over_its_cpus():
    # Old kubelets give one series per CPU; modern ones one with cpu="total".
    app = fresh_app(metrics=(CPU_USAGE,))
    post(app, [(cadvisor(CPU_USAGE, 'ns', 'p', cgroup=POD_UID_OLD, cpu=f'cpu{n:02d}'),
                [(value, 1000)]) for n, value in enumerate((1.5, 2.25, 0.125, 4.0))]
         + [(cadvisor(CPU_USAGE, 'ns', 'p', 'app', f'{POD_UID_OLD}/c1', cpu='cpu00'),
             [(99.0, 1000)])])
    assert value_of(app, CPU_USAGE) == 7.875


def test_cpu_usage_without_a_pod_cgroup_sums_containers_over_their_cpus():
    app = fresh_app(metrics=(CPU_USAGE,))
    post(app, [(cadvisor(CPU_USAGE, 'ns', 'p', container, f'{POD_UID_OLD}/{container}',
                         cpu=cpu), [(value, 1000)])
               for container, cpu, value in (('POD', 'cpu00', 0.5), ('POD', 'cpu01', 0.25),
                                             ('app', 'cpu00', 10.0), ('app', 'cpu01', 20.0))])
    assert value_of(app, CPU_USAGE) == 30.75


def test_a_restarted_containers_cpu_seconds_stay_in_the_pods_counter():
    # No pod cgroup series (kubelet < 1.16, CRI stats): the pod is the sum
    # of its containers, and a counter must not fall when one restarts.
    app = fresh_app(metrics=(CPU_USAGE,), ttl_seconds=10)
    old = cadvisor(CPU_USAGE, 'ns', 'p', 'app', f'{POD_UID_OLD}/c1', cpu='total')
    new = cadvisor(CPU_USAGE, 'ns', 'p', 'app', f'{POD_UID_OLD}/c2', cpu='total')
    sidecar = cadvisor(CPU_USAGE, 'ns', 'p', 'sidecar', f'{POD_UID_OLD}/s1', cpu='total')
    post(app, [(old, [(100.0, 1000)]), (sidecar, [(1.0, 1000)])])
    assert value_of(app, CPU_USAGE) == 101.0
    post(app, [(new, [(2.0, 2000)]), (sidecar, [(1.5, 2000)])])
    assert value_of(app, CPU_USAGE) == 103.5
    between = time.monotonic()
    time.sleep(0.01)
    post(app, [(new, [(5.0, 3000)]), (sidecar, [(2.0, 3000)])])
    app.store.expire(now=between + 10)          # the old container is forgotten
    assert counted_ids(app, CPU_USAGE) == {f'{POD_UID_OLD}/c2': True, f'{POD_UID_OLD}/s1': True}
    assert value_of(app, CPU_USAGE) == 107.0    # its 100 s are carried
    # It restarts again: both earlier containers' seconds stay.
    newest = cadvisor(CPU_USAGE, 'ns', 'p', 'app', f'{POD_UID_OLD}/c3', cpu='total')
    between = time.monotonic()
    time.sleep(0.01)
    post(app, [(newest, [(0.5, 4000)]), (sidecar, [(2.5, 4000)])])
    app.store.expire(now=between + 10)
    assert value_of(app, CPU_USAGE) == 108.0    # 100 + 5 carried, 0.5 + 2.5 live


def test_a_counters_container_ended_by_a_stale_marker_counts_once_when_it_comes_back():
    # A failed scrape sends stale markers for every series of the target;
    # the next scrape brings them back.
    app = fresh_app(metrics=(CPU_USAGE,))
    app_container = cadvisor(CPU_USAGE, 'ns', 'p', 'app', f'{POD_UID_OLD}/c1', cpu='total')
    sidecar = cadvisor(CPU_USAGE, 'ns', 'p', 'sidecar', f'{POD_UID_OLD}/s1', cpu='total')
    post(app, [(app_container, [(100.0, 1000)]), (sidecar, [(1.0, 1000)])])
    post(app, [(app_container, [(STALE_NAN, 2000)])])
    assert value_of(app, CPU_USAGE) == 101.0     # ended at its last value
    post(app, [(app_container, [(103.0, 3000)])])
    assert value_of(app, CPU_USAGE) == 104.0
    post(app, [(app_container, [(STALE_NAN, 4000)]), (sidecar, [(STALE_NAN, 4000)])])
    assert value_of(app, CPU_USAGE) is None      # every series ended: the pod leaves


def test_a_recreated_pods_cpu_counter_starts_again_from_its_new_pod_cgroup():
    app = fresh_app(metrics=(CPU_USAGE,))
    post(app, [(cadvisor(CPU_USAGE, 'ns', 'p', cgroup=POD_UID_OLD, cpu='total'),
                [(500.0, 1000)])])
    post(app, [(cadvisor(CPU_USAGE, 'ns', 'p', cgroup=POD_UID_NEW, cpu='total'),
                [(3.0, 2000)])])
    assert value_of(app, CPU_USAGE) == 3.0


NETWORK_RX = 'container_network_receive_bytes_total'


@pytest.mark.parametrize('sandbox', ['POD', ''], ids=['docker-POD', 'containerd-pause'])
def test_network_counters_come_from_the_sandbox_summed_over_interfaces(sandbox):
    app = fresh_app(metrics=(NETWORK_RX,))
    post(app, [(cadvisor(NETWORK_RX, 'ns', 'p', sandbox, f'{POD_UID_OLD}/p1', interface=name),
                [(value, 1000)]) for name, value in (('eth0', 1000.0), ('tunl0', 24.0))]
         + [(cadvisor(NETWORK_RX, 'ns', 'p', 'app', f'{POD_UID_OLD}/c1', interface='eth0'),
             [(1000.0, 1000)]),
            (cadvisor(NETWORK_RX, 'ns', 'p', cgroup=POD_UID_OLD, interface='eth0'),
             [(5000.0, 1000)])])
    assert value_of(app, NETWORK_RX) == 1024.0


def test_the_memory_limit_is_the_pod_cgroups_and_0_means_none():
    app = fresh_app(metrics=(POD_LIMIT,))
    post(app, [(cadvisor(POD_LIMIT, 'ns', 'limited', cgroup=POD_UID_OLD), [(268435456, 1)]),
               (cadvisor(POD_LIMIT, 'ns', 'limited', 'app', f'{POD_UID_OLD}/c1'),
                [(134217728, 1)]),
               (cadvisor(POD_LIMIT, 'ns', 'unlimited', cgroup=POD_UID_NEW), [(0, 1)]),
               (cadvisor(POD_LIMIT, 'ns', 'containers-only', 'app', f'{POD_UID_NEW}ab/c1'),
                [(134217728, 1)])])
    assert {key[4]: value for key, value in pod_values_in(scrape(app)).items()} == {
        'limited': 268435456, 'unlimited': 0}


def test_a_single_containers_counter_keeps_its_carry_after_a_restart():
    app = fresh_app(metrics=(CPU_USAGE,), ttl_seconds=10)
    post(app, [(cadvisor(CPU_USAGE, 'ns', 'p', 'app', f'{POD_UID_OLD}/c1', cpu='total'),
                [(100.0, 1000)])])
    expire_all_but_the_last_write(app, lambda: post(app, [(cadvisor(
        CPU_USAGE, 'ns', 'p', 'app', f'{POD_UID_OLD}/c2', cpu='total'), [(2.0, 2000)])]))
    assert value_of(app, CPU_USAGE) == 102.0


def test_a_forgotten_pod_cgroup_carries_nothing_into_the_containers_sum():
    # The pod cgroup's counter is the pod's, not a container's: when it goes,
    # the pod falls back to its containers alone.
    app = fresh_app(metrics=(CPU_USAGE,), ttl_seconds=10)
    container = cadvisor(CPU_USAGE, 'ns', 'p', 'app', f'{POD_UID_OLD}/c1', cpu='total')
    post(app, [(cadvisor(CPU_USAGE, 'ns', 'p', cgroup=POD_UID_OLD, cpu='total'), [(50.0, 1000)]),
               (container, [(40.0, 1000)])])
    assert value_of(app, CPU_USAGE) == 50.0
    expire_all_but_the_last_write(app, lambda: post(app, [(container, [(41.0, 2000)])]))
    assert value_of(app, CPU_USAGE) == 41.0


def test_network_counters_carry_only_the_sandbox_across_a_restart():
    app = fresh_app(metrics=(NETWORK_RX,), ttl_seconds=10)
    sandbox = cadvisor(NETWORK_RX, 'ns', 'p', 'POD', f'{POD_UID_OLD}/p1', interface='eth0')
    post(app, [(sandbox, [(1000.0, 1000)]),
               (cadvisor(NETWORK_RX, 'ns', 'p', 'app', f'{POD_UID_OLD}/c1', interface='eth0'),
                [(700.0, 1000)])])
    expire_all_but_the_last_write(app, lambda: post(app, [
        (sandbox, [(1100.0, 2000)]),
        (cadvisor(NETWORK_RX, 'ns', 'p', 'app', f'{POD_UID_OLD}/c2', interface='eth0'),
         [(5.0, 2000)])]))
    assert value_of(app, NETWORK_RX) == 1100.0


@pytest.mark.parametrize('name', ['container_memory_swap', 'container_fs_inodes_free'])
def test_an_unknown_metric_name_is_a_gauge_with_a_generic_help_and_its_prefix_rule(name):
    app = fresh_app(metrics=(name,))
    post(app, [(cadvisor(name, 'ns', 'p', 'app', f'{POD_UID_OLD}/c1', device='/dev/vda1'),
                [(4, 1)]), (cadvisor(name, 'ns', 'p', cgroup=POD_UID_OLD), [(10, 1)])])
    page = scrape(app)
    assert f'# HELP {name} cAdvisor {name}, one value per pod\n# TYPE {name} gauge\n' in page
    # fs names sum containers; others take the pod cgroup.
    assert pod_values_in(page, metrics=(name,)) == {
        (name, DEFAULT_CLUSTER, 'kubernetes-cadvisor', 'ns', 'p'):
            4 if name.startswith('container_fs_') else 10}


###############################################################################
# The store ###################################################################
###############################################################################

def test_newer_sample_replaces_older_and_older_or_equal_is_ignored():
    app = fresh_app()
    labels = cadvisor(MEMORY, 'ns', 'p')
    post(app, [(labels, [(10, 2000)])])
    post(app, [(labels, [(20, 3000)])])
    assert memory_of(app) == 20
    post(app, [(labels, [(30, 3000)])])     # equal timestamp
    post(app, [(labels, [(40, 1000)])])     # older
    assert memory_of(app) == 20
    assert self_metric(scrape(app), 'k8s_exporter_samples_ignored_total',
                       reason='out_of_order') == 2


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
    page = scrape(app)
    assert pod_families(page) == ''
    assert [self_metric(page, name) for name in (
        'k8s_exporter_pods', 'k8s_exporter_input_series', 'k8s_exporter_stale_markers_total')] == [
        0, 0, 2]
    post(app, [(pod_cgroup, [(STALE_NAN, 2)])], protocol)    # replayed: ignored, still counted
    assert self_metric(scrape(app), 'k8s_exporter_stale_markers_total') == 3


def test_a_new_pod_whose_only_sample_is_a_stale_marker_or_refused_is_not_held():
    app = fresh_app(max_series=1)
    post(app, [(cadvisor(MEMORY, 'ns', 'held'), [(1, 1)])])
    post(app, [(cadvisor(MEMORY, 'ns', 'stale'), [(STALE_NAN, 1)]),
               (cadvisor(MEMORY, 'ns', 'refused'), [(5, 1)])])
    page = scrape(app)
    assert [self_metric(page, name) for name in ('k8s_exporter_pods', 'k8s_exporter_input_series')
            ] == [1, 1]
    assert set(pod_values_in(page)) == {(MEMORY, 'k8s-cluster', 'kubernetes-cadvisor', 'ns',
                                         'held')}


def test_forgetting_one_metric_of_a_cgroup_keeps_its_other_metrics():
    app = fresh_app()
    cpu = 'container_cpu_load_average_10s'
    post(app, [(cadvisor(cpu, 'ns', 'p', cgroup='/kubepods/podab'), [(2, 1)]),
               (cadvisor(MEMORY, 'ns', 'p', cgroup='/kubepods/podab'), [(100, 1)])])
    post(app, [(cadvisor(MEMORY, 'ns', 'p', cgroup='/kubepods/podab'), [(STALE_NAN, 2)])])
    page = scrape(app)
    assert pod_values_in(page) == {(cpu, 'k8s-cluster', 'kubernetes-cadvisor', 'ns', 'p'): 2}
    assert self_metric(page, 'k8s_exporter_input_series') == 1
    post(app, [(cadvisor(MEMORY, 'ns', 'p', cgroup='/kubepods/podab'), [(50, 3)]),
               (cadvisor(cpu, 'ns', 'p', cgroup='/kubepods/podab'), [(9, 1)])])   # not newer
    assert pod_values_in(scrape(app)) == {
        (cpu, 'k8s-cluster', 'kubernetes-cadvisor', 'ns', 'p'): 2,
        (MEMORY, 'k8s-cluster', 'kubernetes-cadvisor', 'ns', 'p'): 50}


def test_nan_and_infinities_other_than_stale_markers_are_stored_and_printed():
    app = fresh_app()
    post(app, [(cadvisor(MEMORY, 'ns', 'nan'), [(math.nan, 1)]),
               (cadvisor(MEMORY, 'ns', 'inf'), [(math.inf, 1)]),
               (cadvisor(MEMORY, 'ns', 'ninf'), [(-math.inf, 1)])])
    page = scrape(app)
    assert [line.rpartition(' ')[2] for line in pod_families(page).split('\n')[2:-1]] == [
        '+Inf', 'NaN', '-Inf']    # pods inf, nan, ninf in label order
    assert self_metric(page, 'k8s_exporter_stale_markers_total') == 0
    post(app, [(cadvisor(MEMORY, 'ns', 'nan'), [(math.nan, 1)])])   # replayed: ignored
    assert self_metric(scrape(app), 'k8s_exporter_stale_markers_total') == 0


def test_pods_stay_in_label_order_as_thousands_come_and_go():
    # More pods than two of PodOrder's blocks, in random order; then the
    # first, the last and a random half expire.
    store = k8s_exporter.Store(Config(ttl_seconds=10))
    rng = random.Random(16)
    names = [f'p{number:05d}' for number in range(5000)]
    rng.shuffle(names)
    series = SeriesKey(True, '', '', '', '')
    keys = [PodKey('c', 'j', rng.choice(['a', 'b']), name) for name in names]
    for start in range(0, len(keys), 700):
        store.apply([k8s_exporter.Sample(key, 0, series, 1, 1.0)
                     for key in keys[start:start + 700]], received=100.0)
    assert store.pod_keys() == sorted(keys)
    kept = set(rng.sample(keys, 2500)) - {min(keys), max(keys)}
    store.apply([k8s_exporter.Sample(key, 0, series, 2, 2.0) for key in kept], received=105.0)
    store.expire(now=111.0)
    assert store.pod_keys() == sorted(kept)
    assert len(store.snapshot().outputs) == len(kept)


def known_pod_series(pod, container='app', metric=0):
    """A KeptSeries of pod (a name) built anew, as each learned series' is."""
    pod_key = k8s_exporter.PodKey(*(text + '' for text in ('c', 'job', 'ns', pod)))
    return k8s_exporter.KeptSeries(pod_key, metric, k8s_exporter.SeriesKey(
        False, container, f'/kubepods/pod1/{container}', 'image', ''))


def test_known_series_are_forgotten_two_ttls_after_they_were_last_seen():
    known = k8s_exporter.KnownSeries(ttl_seconds=10, max_entries=3)
    series = {name: known_pod_series(name) for name in 'abcde'}
    known.age(0)
    known.put(b'a', series['a'])
    known.put(b'b', series['b'])
    known.age(10_000)                  # a new generation: a and b are kept, as older
    assert known.get(b'a') == series['a']      # seen again: moved to the newer one
    known.age(20_000)
    assert (known.get(b'a'), known.get(b'b')) == (series['a'], None)
    known.put(b'c', series['c'])
    known.put(b'd', series['d'])
    known.put(b'e', series['e'])       # the newer one holds 3 (a, c, d): it becomes the older
    assert [known.get(b'a'), known.get(b'e')] == [series['a'], series['e']]
    known.age(30_000)
    assert [known.get(b'c'), known.get(b'e')] == [None, series['e']]


def test_known_series_of_one_pod_share_its_keys():
    known = k8s_exporter.KnownSeries()
    known.age(0)
    first = known.put(1, known_pod_series('p', 'app', metric=0))
    same_cgroup = known.put(2, known_pod_series('p', 'app', metric=1))
    sidecar = known.put(3, known_pod_series('p', 'sidecar'))
    other_pod = known.put(4, known_pod_series('q'))
    assert same_cgroup == known_pod_series('p', 'app', metric=1)   # equal, as put
    assert same_cgroup.pod is first.pod and sidecar.pod is first.pod
    assert same_cgroup.series is first.series and sidecar.series is not first.series
    assert other_pod.pod is not first.pod and other_pod.pod == known_pod_series('q').pod
    assert known.put(5, k8s_exporter.KeptSeries(None, 0, None)).pod is None
    known.age(k8s_exporter.Config.ttl_seconds * 1000)   # a new generation shares anew
    assert known.put(6, known_pod_series('p')).pod is not first.pod


def test_series_not_received_for_the_ttl_are_forgotten():
    app = fresh_app(ttl_seconds=10)
    first = time.monotonic()
    post(app, [(cadvisor(MEMORY, 'ns', 'p', 'a', '/a'), [(5, 1)])])
    between = arrivals_apart()
    post(app, [(cadvisor(MEMORY, 'ns', 'p', 'b', '/b'), [(6, 1)])])
    app.store.expire(now=first + 10)       # both arrived under 10 s before
    assert memory_of(app) == 11
    app.store.expire(now=between + 10)     # 'a' arrived over 10 s before, 'b' under
    page = scrape(app)
    assert (memory_of(app), self_metric(page, 'k8s_exporter_input_series')) == (6, 1)
    assert call_wsgi(app, 'GET', '/pod?namespace=ns&pod=p')[0] == 200
    app.store.expire(now=time.monotonic() + 10)
    page = scrape(app)
    assert pod_families(page) == ''
    assert [self_metric(page, name) for name in (
        'k8s_exporter_pods', 'k8s_exporter_input_series',
        'k8s_exporter_expired_series_total')] == [0, 0, 2]
    assert call_wsgi(app, 'GET', '/pod?namespace=ns&pod=p')[0] == 404    # not held at all


def test_a_repeated_value_changes_no_output_but_moves_its_timestamp_and_ttl_on():
    app = fresh_app(ttl_seconds=10)

    def write(timestamp, value):
        """The store's output version after writing one sample of pod p's memory."""
        post(app, [(cadvisor(MEMORY, 'ns', 'p', 'a', '/a'), [(value, timestamp)])])
        return app.store.snapshot().version

    version = write(1, 5.0)
    between = arrivals_apart()
    assert write(2, 5.0) == version                      # nothing to re-render
    assert (write(2, 6.0), memory_of(app)) == (version, 5)   # not newer: ignored
    app.store.expire(now=between + 10)   # the first write is over 10 s old, the repeat under
    assert memory_of(app) == 5
    # A pod's value is a sum, where -0 counts as 0.
    version = write(3, -0.0)
    assert (write(4, 0.0), value_text_of(app, MEMORY)) == (version, '0')
    write(5, math.nan)
    assert value_text_of(app, MEMORY) == 'NaN'
    write(6, 7.0)
    assert value_text_of(app, MEMORY) == '7'


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
    assert self_metric(scrape(app), 'k8s_exporter_samples_ignored_total',
                       reason='series_limit') == 1


def test_series_limit_warning_is_logged_at_most_once_a_minute(caplog):
    # The store's arrival clock, as receive_write passes it, drives the minute.
    store = k8s_exporter.Store(Config(max_series=1))

    def new_series(container, received):
        table = [(cadvisor(MEMORY, 'ns', 'p', container, f'/{container}'), [(1, 1)])]
        return store.apply(decode_all(table, PROTO_RW1, store.config.metrics).samples, received)

    with caplog.at_level('WARNING', logger='k8s_exporter'):
        assert [new_series(container, received) for container, received in (
            ('a', 100.0), ('b', 100.0), ('c', 130.0), ('d', 161.0))] == [0, 1, 1, 1]
    assert [record.getMessage() for record in caplog.records] == [
        'K8S_EXPORTER_MAX_SERIES=1 reached: 1 samples of new series refused (this warning '
        'repeats at most once a minute)'] * 2


def test_series_that_stand_for_different_things_never_overwrite_each_other():
    # containerd: the pause container and the pod cgroup differ only by id;
    # one container's fs series differ only by device.
    app = fresh_app(metrics=(FS_USAGE,))
    pause = cadvisor(FS_USAGE, 'ns', 'p', cgroup='/kubepods/podab/p1', device='/dev/vda1')
    app_container = cadvisor(FS_USAGE, 'ns', 'p', 'app', '/kubepods/podab/c1',
                             device='/dev/vda1')
    post(app, [(pause, [(1, 1)]), (app_container, [(2, 1)]),
               ({**app_container, 'device': '/dev/vdb'}, [(4, 1)])])
    assert fs_usage_of(app) == 7


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

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while thread.is_alive() and time.monotonic() < stop:
            values = {value for key, value in pod_values_in(scrape(app)).items()
                      if key[0] == MEMORY}
            if len(values) > 1:
                errors.append(values)
    finally:
        thread.join(timeout=30)
    assert errors == []
    assert memory_of(app, 'pod-000') == 39


###############################################################################
# Through a pod's life: restarts, re-created pods, HA senders, replays ########
###############################################################################

MEMORY_MAX = 'container_memory_max_usage_bytes'
POD_UID_OLD = '/kubepods/burstable/pod0e5c1d2a-0000-4000-8000-000000000001'
POD_UID_NEW = '/kubepods/burstable/pod0e5c1d2a-0000-4000-8000-000000000002'


def container_series(metric, container, cgroup_id, pod='p', **extra):
    return cadvisor(metric, 'ns', pod, container, cgroup_id, **extra)


def counted_ids(app, metric, pod='p', namespace='ns'):
    """{id: counted?} of every input series the store holds for one pod's metric."""
    held = app.store.pod_series(PodKey(DEFAULT_CLUSTER, 'kubernetes-cadvisor', namespace, pod))
    return {key.id: counted for key, _, counted in held.get(metric, [])}


@pytest.mark.parametrize('protocol', [1, 2], ids=['rw1', 'rw2'])
def test_a_restarted_container_replaces_its_old_series_for_every_metric(protocol):
    # New cgroup id, same container name. The old series get no stale marker
    # (kubelet timestamps) and stay until the TTL, but no longer count.
    app = fresh_app()
    old = f'{POD_UID_OLD}/aaaa'
    new = f'{POD_UID_OLD}/bbbb'
    post(app, [(container_series(FS_USAGE, 'app', old, device='/dev/vda1'), [(300, 1000)]),
               (container_series(MEMORY, 'app', old), [(7000, 1000)])], protocol)
    assert (fs_usage_of(app), memory_of(app)) == (300, 7000)
    post(app, [(container_series(FS_USAGE, 'app', new, device='/dev/vda1'), [(20, 2000)]),
               (container_series(MEMORY, 'app', new), [(1200, 2000)])], protocol)
    assert (fs_usage_of(app), memory_of(app)) == (20, 1200)
    assert counted_ids(app, FS_USAGE) == {old: False, new: True}
    assert self_metric(scrape(app), 'k8s_exporter_input_series') == 4


@pytest.mark.parametrize('protocol', [1, 2], ids=['rw1', 'rw2'])
def test_a_recreated_pod_counts_only_its_new_pod_cgroup(protocol):
    # A StatefulSet pod keeps its namespace and name and gets a new uid.
    app = fresh_app()
    post(app, [(cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD), [(7000, 1000)])], protocol)
    post(app, [(cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_NEW), [(1200, 2000)])], protocol)
    assert memory_of(app) == 1200
    assert counted_ids(app, MEMORY) == {POD_UID_OLD: False, POD_UID_NEW: True}


@pytest.mark.parametrize('protocol', [1, 2], ids=['rw1', 'rw2'])
def test_the_pause_container_is_replaced_by_the_new_sandbox(protocol):
    # docker's POD container and containerd's unnamed pause container are
    # the pod's sandbox; a new sandbox replaces the old one.
    app = fresh_app(metrics=(FS_USAGE,))
    post(app, [(container_series(FS_USAGE, 'POD', '/docker/p1', device='/dev/vda1'), [(8, 1)]),
               (container_series(FS_USAGE, '', f'{POD_UID_OLD}/p1', device='/dev/vda1'),
                [(16, 1)])], protocol)
    post(app, [(container_series(FS_USAGE, 'POD', '/docker/p2', device='/dev/vda1'), [(1, 2)]),
               (container_series(FS_USAGE, '', f'{POD_UID_OLD}/p2', device='/dev/vda1'),
                [(2, 2)])], protocol)
    assert fs_usage_of(app) == 3


def test_an_old_series_with_a_newer_sample_counts_again():
    # Which one counts is decided by sample time, not by which id is newer.
    app = fresh_app()
    post(app, [(cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD), [(7000, 1000)]),
               (cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_NEW), [(1200, 2000)])])
    post(app, [(cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD), [(7100, 3000)])])
    assert memory_of(app) == 7100


@pytest.mark.parametrize('order', ['old-first', 'new-first'])
def test_on_equal_timestamps_the_series_that_arrived_last_counts(order):
    app = fresh_app()
    rows = [(cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD), [(7000, 1000)]),
            (cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_NEW), [(1200, 1000)])]
    if order == 'new-first':
        rows.reverse()
    post(app, rows)
    assert memory_of(app) == rows[-1][1][0][0]
    post(app, [rows[0]])          # the same sample again: ignored, changes nothing
    assert memory_of(app) == rows[-1][1][0][0]


def test_a_repeated_value_of_a_replaced_series_that_becomes_newest_re_renders():
    # The value repeats, but the series it belongs to now counts.
    app = fresh_app()
    post(app, [(cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD), [(7000, 1000)]),
               (cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_NEW), [(1200, 2000)])])
    assert memory_of(app) == 1200          # rendered: nothing of the pod waits
    post(app, [(cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD), [(7000, 3000)])])
    assert memory_of(app) == 7000


@pytest.mark.parametrize('protocol', [1, 2], ids=['rw1', 'rw2'])
def test_ha_senders_interleaved_and_one_lagging_the_newest_sample_wins(protocol):
    # Two prometheus1 replicas write the same series; they differ only by
    # an external replica label, which the exporter does not export.
    app = fresh_app()
    series = {replica: cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD, replica=replica)
              for replica in ('a', 'b')}
    shown = []
    for replica, value, timestamp in [('a', 10, 1000), ('b', 10, 1000), ('a', 20, 2000),
                                      ('b', 20, 2000), ('a', 30, 3000), ('b', 15, 1500),
                                      ('b', 30, 3000), ('a', 40, 4000), ('b', 35, 3500)]:
        post(app, [(series[replica], [(value, timestamp)])], protocol)
        shown.append(memory_of(app))
    assert shown == [10, 10, 20, 20, 30, 30, 30, 40, 40]


@pytest.mark.parametrize('protocol', [1, 2], ids=['rw1', 'rw2'])
def test_a_replayed_wal_never_moves_a_value_back(protocol):
    # prometheus1 restarts and sends what it had sent before, in order:
    # across a container restart and a re-created pod.
    app = fresh_app()
    history = [
        [(cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD), [(100, 1000)]),
         (container_series(FS_USAGE, 'app', f'{POD_UID_OLD}/aaaa', device='/dev/vda1'),
          [(300, 1000)])],
        [(cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD), [(110, 2000)]),
         (container_series(FS_USAGE, 'app', f'{POD_UID_OLD}/bbbb', device='/dev/vda1'),
          [(20, 2000)])],
        [(cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_NEW), [(50, 3000)]),
         (container_series(FS_USAGE, 'app', f'{POD_UID_NEW}/cccc', device='/dev/vda1'),
          [(5, 3000)])],
    ]
    for table in history:
        post(app, table, protocol)
    for table in history:      # the replay
        post(app, table, protocol)
        assert (memory_of(app), fs_usage_of(app)) == (50, 5)


@pytest.mark.parametrize('protocol', [1, 2], ids=['rw1', 'rw2'])
def test_a_series_ended_by_a_stale_marker_is_not_brought_back_by_older_samples(protocol):
    app = fresh_app()
    labels = cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD)
    post(app, [(labels, [(100, 1000), (110, 2000)])], protocol)
    post(app, [(labels, [(STALE_NAN, 3000)])], protocol)
    assert memory_of(app) is None
    post(app, [(labels, [(100, 1000), (110, 2000), (120, 3000)])], protocol)   # a replay
    assert memory_of(app) is None
    page = scrape(app)
    assert [self_metric(page, name) for name in ('k8s_exporter_pods',
                                                 'k8s_exporter_input_series')] == [0, 0]
    post(app, [(labels, [(130, 4000)])], protocol)    # newer than the marker: it is back
    assert memory_of(app) == 130


def test_a_stale_marker_of_the_old_container_leaves_the_new_one_counting():
    # With track_timestamps_staleness the old container's end arrives after
    # the new container's first sample, in the same scrape.
    app = fresh_app(metrics=(FS_USAGE,))
    old = container_series(FS_USAGE, 'app', f'{POD_UID_OLD}/aaaa', device='/dev/vda1')
    new = container_series(FS_USAGE, 'app', f'{POD_UID_OLD}/bbbb', device='/dev/vda1')
    post(app, [(old, [(300, 1000)])])
    post(app, [(new, [(20, 2000)]), (old, [(STALE_NAN, 2000)])])
    assert fs_usage_of(app) == 20
    assert counted_ids(app, FS_USAGE) == {f'{POD_UID_OLD}/aaaa': False,
                                          f'{POD_UID_OLD}/bbbb': True}


def test_replaced_series_are_held_until_the_ttl_then_forgotten_without_changing_the_value():
    app = fresh_app(ttl_seconds=10)
    store = app.store
    old = container_series(MEMORY, 'app', f'{POD_UID_OLD}/aaaa')
    new = container_series(MEMORY, 'app', f'{POD_UID_OLD}/bbbb')
    post(app, [(old, [(300, 1000)])])
    post(app, [(new, [(20, 2000)])])
    assert self_metric(scrape(app), 'k8s_exporter_input_series') == 2
    between = time.monotonic()
    store.expire(now=between + 5)       # both arrived under 10 s before
    assert counted_ids(app, MEMORY) == {f'{POD_UID_OLD}/aaaa': False,
                                        f'{POD_UID_OLD}/bbbb': True}
    time.sleep(0.01)
    post(app, [(new, [(21, 3000)])])
    store.expire(now=between + 10)      # old arrived more than 10 s before, new less
    assert counted_ids(app, MEMORY) == {f'{POD_UID_OLD}/bbbb': True}
    assert memory_of(app) == 21
    assert self_metric(scrape(app), 'k8s_exporter_expired_series_total') == 1


def test_a_deleted_pod_leaves_at_its_stale_markers_and_its_ended_series_at_the_ttl():
    app = fresh_app(ttl_seconds=10)
    labels = cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD)
    post(app, [(labels, [(100, 1000)])])
    post(app, [(labels, [(STALE_NAN, 2000)])])
    assert memory_of(app) is None
    assert counted_ids(app, MEMORY) == {POD_UID_OLD: False}    # held, ended
    app.store.expire(now=time.monotonic() + 11)
    assert counted_ids(app, MEMORY) == {}
    assert app.store.pod_series(PodKey(DEFAULT_CLUSTER, 'kubernetes-cadvisor', 'ns', 'p')) == {}


def test_ended_series_count_towards_the_series_limit_until_the_ttl():
    # They hold memory, so the limit that bounds memory counts them.
    app = fresh_app(max_series=1)
    first = cadvisor(MEMORY, 'ns', 'a', cgroup=POD_UID_OLD)
    post(app, [(first, [(1, 1000)])])
    post(app, [(first, [(STALE_NAN, 2000)])])
    status, _, body = post(app, [(cadvisor(MEMORY, 'ns', 'b', cgroup=POD_UID_NEW), [(2, 3000)])])
    assert (status, memory_of(app, 'b')) == (400, None)
    assert b'K8S_EXPORTER_MAX_SERIES=1 reached' in body


def expire_all_but_the_last_write(app, write):
    """Write, then expire everything that arrived before that write (TTL 10 s)."""
    before = time.monotonic()
    time.sleep(0.01)
    write()
    app.store.expire(now=before + 10)


def test_a_series_of_one_cgroup_outlives_its_sibling_metric_expiring():
    # cpu load and memory of one cgroup share a key: forgetting one keeps the other.
    app = fresh_app(ttl_seconds=10)
    cpu = 'container_cpu_load_average_10s'
    post(app, [(cadvisor(cpu, 'ns', 'p', cgroup=POD_UID_OLD), [(3, 1000)]),
               (cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD), [(100, 1000)])])
    expire_all_but_the_last_write(app, lambda: post(
        app, [(cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD), [(110, 2000)])]))
    assert (value_of(app, cpu), memory_of(app)) == (None, 110)


@pytest.mark.parametrize('why', ['stale-marker-only', 'series-limit'])
def test_a_new_pod_left_empty_by_its_samples_is_not_held(why):
    app = fresh_app(max_series=1)
    post(app, [(cadvisor(MEMORY, 'ns', 'held', cgroup=POD_UID_OLD), [(1, 1000)])])
    value = STALE_NAN if why == 'stale-marker-only' else 5.0
    post(app, [(cadvisor(MEMORY, 'ns', 'empty', cgroup=POD_UID_NEW), [(value, 1000)])])
    assert [key.pod for key in app.store.pod_keys()] == ['held']


def test_a_later_arrival_of_an_older_generation_does_not_take_over():
    # c1's sample at 2000 is newer than c1's own last, older than c2's 3000.
    app = fresh_app()
    old = container_series(MEMORY, 'app', f'{POD_UID_OLD}/c1')
    new = container_series(MEMORY, 'app', f'{POD_UID_OLD}/c2')
    post(app, [(old, [(300, 1000)]), (new, [(20, 3000)])])
    post(app, [(old, [(310, 2000)])])
    assert memory_of(app) == 20


# Kubernetes' CRI stats mode (KEP-2371, feature gate PodAndContainerStatsFromCRI):
# the kubelet asks the runtime (containerd 2.x, CRI-O) for container stats, and
# /metrics/cadvisor carries per-container series only: no pod-level cgroup
# series, no pause container, and `id` is the container's id rather than a
# cgroup path. Written for these tests from that description (the KEP, and
# CRI-O's ListPodSandboxMetrics labels: container, id, image, name,
# namespace, pod); no public capture of a 1.37 kubelet in this mode exists
# yet. web-0's "app" container restarted once: its old id is still reported
# with an older timestamp.
CRI_STATS_CAPTURE = '''\
# HELP container_fs_usage_bytes Number of bytes that are consumed by the container on this filesystem.
# TYPE container_fs_usage_bytes gauge
container_fs_usage_bytes{container="app",device="/dev/vda1",id="3b1f0c9e5d2a",image="registry.k8s.io/app:1.2",name="3b1f0c9e5d2a",namespace="default",pod="web-0"} 90112 1764600000000
container_fs_usage_bytes{container="app",device="/dev/vda1",id="9f2e7a1b4c3d",image="registry.k8s.io/app:1.2",name="9f2e7a1b4c3d",namespace="default",pod="web-0"} 16384 1764600015000
container_fs_usage_bytes{container="sidecar",device="/dev/vda1",id="5a6b7c8d9e0f",image="registry.k8s.io/sidecar:0.9",name="5a6b7c8d9e0f",namespace="default",pod="web-0"} 8192 1764600015000
container_fs_usage_bytes{container="worker",device="/dev/vda1",id="77aa88bb99cc",image="registry.k8s.io/worker:3",name="77aa88bb99cc",namespace="jobs",pod="batch-7x2kq"} 40960 1764600015000
# HELP container_memory_usage_bytes Current memory usage in bytes, including all memory regardless of when it was accessed
# TYPE container_memory_usage_bytes gauge
container_memory_usage_bytes{container="app",id="3b1f0c9e5d2a",image="registry.k8s.io/app:1.2",name="3b1f0c9e5d2a",namespace="default",pod="web-0"} 7.340032e+07 1764600000000
container_memory_usage_bytes{container="app",id="9f2e7a1b4c3d",image="registry.k8s.io/app:1.2",name="9f2e7a1b4c3d",namespace="default",pod="web-0"} 2.097152e+07 1764600015000
container_memory_usage_bytes{container="sidecar",id="5a6b7c8d9e0f",image="registry.k8s.io/sidecar:0.9",name="5a6b7c8d9e0f",namespace="default",pod="web-0"} 4.194304e+06 1764600015000
container_memory_usage_bytes{container="worker",id="77aa88bb99cc",image="registry.k8s.io/worker:3",name="77aa88bb99cc",namespace="jobs",pod="batch-7x2kq"} 1.048576e+08 1764600015000
'''


def cri_stats_table():
    """The capture as prometheus1 forwards it, with the capture's own timestamps."""
    table = []
    for line in CRI_STATS_CAPTURE.splitlines():
        if line.startswith('#'):
            continue
        name, _, rest = line.partition('{')
        label_text, _, value_and_time = rest.partition('} ')
        labels = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        value, timestamp = value_and_time.split()
        table.append(({'__name__': name, 'job': 'kubernetes-cadvisor', **labels},
                      [(float(value), int(timestamp))]))
    return table


@pytest.mark.parametrize('protocol', [1, 2], ids=['rw1', 'rw2'])
def test_cri_stats_mode_pods_get_the_sum_of_their_current_containers(protocol):
    app = fresh_app()
    post(app, cri_stats_table(), protocol)
    values = pod_values_in(scrape(app))
    job = 'kubernetes-cadvisor'
    assert values == {
        (FS_USAGE, DEFAULT_CLUSTER, job, 'default', 'web-0'): 16384 + 8192,
        (FS_USAGE, DEFAULT_CLUSTER, job, 'jobs', 'batch-7x2kq'): 40960,
        (MEMORY, DEFAULT_CLUSTER, job, 'default', 'web-0'): 20971520 + 4194304,
        (MEMORY, DEFAULT_CLUSTER, job, 'jobs', 'batch-7x2kq'): 104857600,
    }
    assert counted_ids(app, MEMORY, 'web-0', 'default') == {
        '3b1f0c9e5d2a': False, '9f2e7a1b4c3d': True, '5a6b7c8d9e0f': True}


###############################################################################
# The seed ####################################################################
###############################################################################

@pytest.mark.parametrize('protocol', [1, 2])
def test_seed_exposition_is_reproduced_byte_for_byte(protocol):
    app = fresh_app()
    status, headers, body = post(app, seed_table(), protocol)
    assert (status, body) == (204, b'')
    if protocol == 2:
        assert headers['X-Prometheus-Remote-Write-Samples-Written'] == str(len(seed_table()))
    status, headers, body = call_wsgi(app, 'GET', '/metrics')
    assert (status, headers['Content-Type']) == (200, 'text/plain; version=0.0.4; charset=utf-8')
    assert pod_families(body.decode()) == SEED_EXPOSITION


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
# Exposition ##################################################################
###############################################################################

# Spellings printed by Go's strconv.FormatFloat(v, 'g', -1, 64): the seed's
# own values, both sides of each layout switch, the extremes.
GO_FLOAT_SPELLINGS = [
    (0.0, '0'), (-0.0, '-0'), (1.0, '1'), (-7.0, '-7'), (100.0, '100'), (122880.0, '122880'),
    (266240.0, '266240'), (123456.7, '123456.7'), (999999.0, '999999'), (1e6, '1e+06'),
    (3985408.0, '3.985408e+06'), (42090070016.0, '4.2090070016e+10'),
    (5771784192.0, '5.771784192e+09'), (0.5, '0.5'), (0.25, '0.25'), (0.1, '0.1'),
    (123.456, '123.456'), (0.0001, '0.0001'), (0.00001, '1e-05'), (1.5e-07, '1.5e-07'),
    (-2.5e-07, '-2.5e-07'), (1e21, '1e+21'), (1e100, '1e+100'), (2.5e-300, '2.5e-300'),
    (5e-324, '5e-324'), (1.7976931348623157e308, '1.7976931348623157e+308'),
    (9007199254740993.0, '9.007199254740992e+15'), (-1234567.5, '-1.2345675e+06'),
    (math.nan, 'NaN'), (math.inf, '+Inf'), (-math.inf, '-Inf'),
]


def go_format_g_shortest(value):
    """strconv.FormatFloat(value, 'g', -1, 64), from Go's layout rules.

    The shortest round-trip digits come from repr (Python and Go both pick
    the shortest string that reads back, nearest the value), without
    trailing zeros; the layout is Go's: %e iff the decimal exponent is < -4
    or >= 6 (eprec is 6 for the shortest form), with at least two exponent
    digits, else plain decimal digits. Written apart from format_go_float,
    on decimal.Decimal, so that the two do not share a slip.
    """
    if value != value:
        return 'NaN'
    if math.isinf(value):
        return '+Inf' if value > 0 else '-Inf'
    decimal = Decimal(repr(value)).normalize()
    negative, digits, exponent = decimal.as_tuple()
    if value == 0:
        return '-0' if negative else '0'
    decimal_exponent = len(digits) + exponent - 1
    if -4 <= decimal_exponent < 6:
        return format(decimal, 'f')
    first, rest = str(digits[0]), ''.join(map(str, digits[1:]))
    mantissa = f'{first}.{rest}' if rest else first
    return f'{"-" if negative else ""}{mantissa}e{decimal_exponent:+03d}'


@pytest.mark.parametrize('value, text', GO_FLOAT_SPELLINGS)
def test_floats_are_spelled_as_go_formatfloat_g_minus_one(value, text):
    assert format_go_float(value) == text


@pytest.mark.parametrize('value, text', GO_FLOAT_SPELLINGS)
def test_go_float_oracle_agrees_with_go(value, text):
    assert go_format_g_shortest(value) == text


@PROPERTY_SETTINGS
@given(value=st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                       st.floats(min_value=-1e-300, max_value=1e-300),
                       st.integers(-2 ** 63, 2 ** 63).map(float),
                       st.builds(lambda m, e: m * 10.0 ** e, st.integers(-999, 999),
                                 st.integers(-8, 8))))
def test_format_go_float_round_trips_in_go_layout(value):
    spelled = format_go_float(value)
    assert float(spelled) == value
    assert math.copysign(1.0, float(spelled)) == math.copysign(1.0, value)
    assert spelled == go_format_g_shortest(value)
    mantissa, _, exponent = spelled.partition('e')
    assert not re.search(r'\.\d*0\Z|\.\Z', mantissa), spelled
    assert not exponent or re.fullmatch(r'[+-]\d{2,3}', exponent), spelled


# Characters that break a naive writer or reader: the three escapes, raw
# line ends of other kinds, the format's punctuation, multi-byte UTF-8.
SPECIAL_CHARACTERS = '"\\\n\r\t\x00 {}=,#\u0085\u2028é☃\U0001f600'
label_text = st.text(st.one_of(st.sampled_from(SPECIAL_CHARACTERS), st.characters(codec='utf-8')),
                     max_size=6)


@PROPERTY_SETTINGS
@given(value=st.text(st.one_of(st.sampled_from(SPECIAL_CHARACTERS), st.characters(codec='utf-8')),
                     max_size=30))
def test_escape_label_value_round_trips_through_an_independent_reader(value):
    escaped = escape_label_value(value)
    assert '\n' not in escaped
    assert read_exposition(f'm{{l="{escaped}"}} 1\n') == {('m', (('l', value),)): 1.0}


def test_each_scrape_shows_the_values_of_the_latest_write_plain_and_gzip():
    # Lines and compressed output are cached between scrapes; a write must
    # reach the next scrape all the same.
    app = fresh_app()
    labels = cadvisor(MEMORY, 'ns', 'p')
    for step, value in enumerate((1.0, 2.0, 2.0, 0.0, math.nan, 5e6, 0.25)):
        post(app, [(labels, [(value, step + 1)])])
        plain, zipped = scrape(app), scrape(app, gzipped=True)
        expected = format_go_float(value)
        assert pod_families(plain).split('\n')[2].rpartition(' ')[2] == expected
        assert pod_families(zipped) == pod_families(plain)


def test_label_values_escape_backslash_quote_and_newline():
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    app = fresh_app()
    post(app, [(cadvisor(MEMORY, 'n"s', 'p\\o\nd'), [(1, 1)])])
    assert pod_families(scrape(app)).split('\n')[2] == (
        'container_memory_usage_bytes{cluster="k8s-cluster",item="container_memory_usage_bytes",'
        'job="kubernetes-cadvisor",namespace="n\\"s",pod="p\\\\o\\nd"} 1')


def test_other_line_breaks_in_a_label_value_are_written_raw():
    # The format escapes '\n' only: '\r', U+0085 and U+2028 are ordinary
    # characters of a value, and a reader that splits lines on them breaks.
    pod = 'a\rb\x85c\u2028d'
    app = fresh_app()
    post(app, [(cadvisor(MEMORY, 'ns', pod), [(1, 1)])])
    page = scrape(app)
    assert pod_families(page).split('\n')[2:-1] == [
        'container_memory_usage_bytes{cluster="k8s-cluster",item="container_memory_usage_bytes",'
        f'job="kubernetes-cadvisor",namespace="ns",pod="{pod}"}} 1']
    assert pod_values_in(page) == {(MEMORY, 'k8s-cluster', 'kubernetes-cadvisor', 'ns', pod): 1}


def test_help_text_escapes_only_backslash_and_newline():
    assert k8s_exporter.escape_help('a\\b"c\nd') == 'a\\\\b"c\\nd'


def test_families_are_in_name_order_and_series_in_label_order():
    app = fresh_app()
    table = [(cadvisor(name, namespace, pod), [(1, 1)])
             for name in reversed(EXPORTED_METRICS)
             for namespace, pod in (('b', 'a'), ('a', 'z'), ('a', 'b'))
             if not name.startswith('container_fs')]
    post(app, table)
    lines = scrape(app).split('\n')
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
    assert requests_counted(second, 'metrics', 200) == 1
    assert 'Content-Encoding' not in call_wsgi(app, 'GET', '/metrics', headers={
        'Accept-Encoding': 'gzip;q=0'})[1]


def test_self_metrics_follow_the_pod_families_as_the_seed_shows():
    app = fresh_app()
    post(app, seed_table())
    post(app, [({'job': 'j'}, [(1, 1)])])            # a series without __name__
    call_wsgi(app, 'GET', '/nope')
    page = scrape(app)
    assert page.startswith(SEED_EXPOSITION)
    assert page.endswith(
        '# HELP promhttp_metric_handler_errors_total Total number of internal errors '
        'encountered by the promhttp metric handler.\n'
        '# TYPE promhttp_metric_handler_errors_total counter\n'
        'promhttp_metric_handler_errors_total{cause="encoding"} 0\n'
        'promhttp_metric_handler_errors_total{cause="gathering"} 0\n')
    samples = read_exposition(page)
    expected = {
        ('k8s_exporter_http_requests_total', (('code', '204'), ('handler', 'write'))): 1,
        ('k8s_exporter_http_requests_total', (('code', '400'), ('handler', 'write'))): 1,
        ('k8s_exporter_http_requests_total', (('code', '404'), ('handler', 'unknown'))): 1,
        ('k8s_exporter_samples_received_total', ()): len(seed_table()) + 1,
        ('k8s_exporter_samples_ignored_total', (('reason', 'unexported_metric'),)): 1,
        ('k8s_exporter_samples_ignored_total', (('reason', 'no_pod'),)): 1,
        ('k8s_exporter_samples_ignored_total', (('reason', 'invalid_series'),)): 1,
        ('k8s_exporter_samples_ignored_total', (('reason', 'future_timestamp'),)): 0,
        ('k8s_exporter_input_series', ()): 25,
        ('k8s_exporter_pods', ()): 5,
        ('k8s_exporter_write_duration_seconds_bucket', (('le', '+Inf'),)): 2,
        ('k8s_exporter_write_duration_seconds_count', ()): 2,
        ('k8s_exporter_write_requests_total', (('result', 'applied'),)): 1,
        ('k8s_exporter_write_requests_total', (('result', 'partial'),)): 0,
        ('k8s_exporter_write_requests_total', (('result', 'refused'),)): 1,
    }
    assert {key: samples[key] for key in expected} == expected
    assert samples[('k8s_exporter_last_write_success_timestamp_seconds', ())] == (
        pytest.approx(time.time(), abs=5))
    for name in ('process_resident_memory_bytes', 'process_cpu_seconds_total',
                 'process_start_time_seconds', 'process_open_fds'):
        assert samples[(name, ())] > 0


def test_last_write_success_is_the_time_of_the_last_write_applied_whole():
    app = fresh_app(max_series=1)
    post(app, [(cadvisor(MEMORY, 'ns', 'p'), [(1, 1)]), ({'job': 'j'}, [(1, 1)])])
    post(app, [(cadvisor(MEMORY, 'ns', 'p'), [(2, 2)]), (cadvisor(MEMORY, 'ns', 'q'), [(1, 1)])])
    success = 'k8s_exporter_last_write_success_timestamp_seconds'
    assert self_metric(scrape(app), success) == 0     # one series invalid, then one refused
    post(app, [(cadvisor(MEMORY, 'ns', 'p'), [(3, 3)])])
    assert self_metric(scrape(app), success) == pytest.approx(time.time(), abs=5)


@pytest.mark.skipif(not os.access(PROMTOOL_BINARY, os.X_OK), reason='promtool not installed')
def test_promtool_check_metrics_is_silent_on_the_whole_page():
    app = fresh_app()
    post(app, seed_table())
    post(app, [(cadvisor(MEMORY, 'n"s', 'p\\o\nd'), [(math.nan, 1)])])
    page = call_wsgi(app, 'GET', '/metrics')[2]
    result = subprocess.run([PROMTOOL_BINARY, 'check', 'metrics'], input=page,
                            capture_output=True, timeout=30)
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


def test_rw2_samples_written_leave_out_those_the_series_limit_refused():
    app = fresh_app(max_series=1)
    status, headers, _ = post(app, [(cadvisor(MEMORY, 'ns', 'p'), [(1, 1)]),
                                    (cadvisor(MEMORY, 'ns', 'q'), [(1, 1), (2, 2)])], protocol=2)
    assert (status, headers['X-Prometheus-Remote-Write-Samples-Written']) == (400, '1')


def test_rw2_histograms_and_exemplars_are_accepted_ignored_and_counted_as_written():
    request = remote_pb2.WriteRequestV2()
    request.MergeFromString(snappy.uncompress(rw2_body(seed_table()[:1])))
    # Field 3 (histograms: count 1, in the zero bucket) and 4 (exemplars).
    request.timeseries[0].MergeFromString(b'\x1a\x04\x08\x01\x30\x01' + b'\x22\x02\x11\x00')
    status, headers, _ = call_wsgi(fresh_app(), 'POST', '/write',
                                   snappy.compress(request.SerializeToString()),
                                   {'Content-Type': RW2_TYPE})
    assert status == 204
    assert headers['X-Prometheus-Remote-Write-Samples-Written'] == '1'
    assert headers['X-Prometheus-Remote-Write-Histograms-Written'] == '1'
    assert headers['X-Prometheus-Remote-Write-Exemplars-Written'] == '1'


def test_metadata_only_rw1_request_is_accepted():
    request = remote_pb2.WriteRequest()
    request.metadata.add(type=1, metric_family_name=MEMORY, help='Current memory usage.')
    assert call_wsgi(fresh_app(), 'POST', '/write', snappy.compress(
        request.SerializeToString()), {'Content-Type': RW1_TYPE})[0] == 204


def test_empty_write_request_is_accepted():
    assert call_wsgi(fresh_app(), 'POST', '/write', snappy.compress(b''))[0] == 204


@pytest.mark.parametrize('body, headers, expected', [
    (b'junk', {'Content-Type': 'text/plain'}, (415, "unsupported Content-Type 'text/plain'; "
                                                    "expected application/x-protobuf")),
    (b'junk', {'Content-Encoding': 'gzip'}, (415, "unsupported Content-Encoding 'gzip'; "
                                                  "expected snappy")),
    (b'\x05junk', {}, (400, 'corrupt snappy: not a valid snappy block')),
    (snappy.compress(b'\xff\xff\xff'), {},
     (400, 'corrupt protobuf: not a remote-write 1.0 request')),
    (snappy.compress(b'\x0a\x02\x0a\x00\x0a\x02'), {'Content-Type': RW2_TYPE},
     (400, 'corrupt protobuf: not a remote-write 2.0 request')),
    (b'', {}, (400, 'empty body')),
], ids=['text/plain', 'gzip', 'not-snappy', 'not-protobuf', 'rw2-truncated-series', 'empty'])
def test_bad_bodies_get_a_4xx_with_a_one_line_reason(body, headers, expected):
    status, reason = rejection(fresh_app(), body, headers)
    assert (status, reason[:len(expected[1])]) == expected


@pytest.mark.parametrize('protocol', [1, 2], ids=['rw1', 'rw2'])
def test_bytes_that_are_not_utf8_refuse_only_their_series(protocol):
    """A sender's bad bytes cost that series alone: the request is 400 with
    the rest applied, and an unexported series never fails at all."""
    table = [(cadvisor(MEMORY, 'ns', 'pod-xxxx'), [(1, 1)]),       # exported, bad bytes
             (cadvisor(MEMORY, 'ns', 'good'), [(2, 1)]),
             ({'__name__': 'node_load1', 'host': 'host-yyyy'}, [(3, 1)])]   # unexported
    payload = (rw1_body if protocol == 1 else rw2_body)(table, compress=False)
    for text in (b'pod-xxxx', b'host-yyyy'):
        payload = payload.replace(text, text[:-4] + b'\xff\xfe\xfd\xfc')
    app = fresh_app()
    status, headers, body = call_wsgi(app, 'POST', '/write', snappy.compress(payload),
                                      {'Content-Type': RW1_TYPE if protocol == 1 else RW2_TYPE})
    assert (status, one_line_reason(status, headers, body)) == (
        400, '1 invalid series skipped, first: series of container_memory_usage_bytes with a '
             'label that is not valid UTF-8; the rest was applied')
    assert headers.get('X-Prometheus-Remote-Write-Samples-Written') == (
        None if protocol == 1 else '2')
    assert memory_of(app, 'good') == 2
    assert memory_of(app, 'pod-xxxx') is None
    status, headers, _ = call_wsgi(app, 'POST', '/write', snappy.compress(
        (rw1_body if protocol == 1 else rw2_body)(table[2:], compress=False).replace(
            b'host-yyyy', b'host-\xff\xfe\xfd\xfc')),
        {'Content-Type': RW1_TYPE if protocol == 1 else RW2_TYPE})
    assert status == 204


LABEL_LIMITS = {'max_label_name_bytes': 20, 'max_label_value_bytes': 70,
                'max_labels_per_series': 12}


def labels_at_limit(limit, over):
    """cAdvisor labels of pod 'big' at one of LABEL_LIMITS, or one past it."""
    labels = cadvisor(MEMORY, 'ns', 'big')
    extra = int(over)
    if limit == 'max_label_name_bytes':
        labels['n' * (20 + extra)] = 'v'
    elif limit == 'max_label_value_bytes':
        labels['image'] = 'é' * 35 + 'x' * extra      # 70 bytes in UTF-8, 35 characters
    else:
        labels.update((f'l{n}', 'v') for n in range(12 + extra - len(labels)))
    return labels


@pytest.mark.parametrize('protocol', [1, 2], ids=['rw1', 'rw2'])
@pytest.mark.parametrize('limit, reason', [
    ('max_label_name_bytes', 'series of container_memory_usage_bytes with a label name of 21 '
                             'bytes, over K8S_EXPORTER_MAX_LABEL_NAME_BYTES=20'),
    ('max_label_value_bytes', 'series of container_memory_usage_bytes with a image label of 71 '
                              'bytes, over K8S_EXPORTER_MAX_LABEL_VALUE_BYTES=70'),
    ('max_labels_per_series', 'series of container_memory_usage_bytes with 13 labels, over '
                              'K8S_EXPORTER_MAX_LABELS_PER_SERIES=12'),
], ids=['name', 'value', 'count'])
def test_a_series_over_a_label_limit_is_refused_alone_and_counted(protocol, limit, reason):
    app = fresh_app(**LABEL_LIMITS)
    table = [(labels_at_limit(limit, over=True), [(5, 1)]),
             (labels_at_limit(limit, over=False) | {'pod': 'at-limit'}, [(6, 1)]),
             (cadvisor(MEMORY, 'ns', 'good'), [(7, 1)]),
             ({'__name__': 'node_load1', 'n' * 300: 'v' * 300}, [(8, 1)])]    # not exported
    for _ in range(2):      # the second time, from the series the decoder knows
        status, headers, body = post(app, table, protocol)
        assert (status, one_line_reason(status, headers, body)) == (
            400, f'1 invalid series skipped, first: {reason}; the rest was applied')
        assert headers.get('X-Prometheus-Remote-Write-Samples-Written') == (
            None if protocol == 1 else '3')
    assert (memory_of(app, 'big'), memory_of(app, 'at-limit'), memory_of(app, 'good')) == (
        None, 6, 7)
    counters = read_exposition(scrape(app))
    assert [counters[('k8s_exporter_samples_ignored_total', (('reason', reason),))]
            for reason in ('label_limit', 'invalid_series')] == [2, 0]
    assert counters[('k8s_exporter_write_requests_total', (('result', 'partial'),))] == 2


def test_a_series_known_by_its_bytes_still_has_each_sample_checked():
    """The series the decoder remembers skip label decoding, not the sample's checks."""
    app = fresh_app()
    now_ms = time.time_ns() // 10**6
    labels = cadvisor(MEMORY, 'ns', 'known')
    assert post(app, [(labels, [(1, now_ms - 2000)])])[0] == 204
    status, headers, body = post(app, [(labels, [(2, now_ms + 3 * 86_400_000)])])
    assert (status, one_line_reason(status, headers, body)) == (
        400, "1 samples more than 10 minutes ahead of the exporter's clock refused; "
             'the rest was applied')
    # Older than the one held, then two samples in one series (not the known
    # bytes and one sample: read in full), then 0.0, which proto3 leaves out.
    assert post(app, [(labels, [(3, now_ms - 3000)])])[0] == 204
    assert memory_of(app, 'known') == 1
    assert post(app, [(labels, [(4, now_ms - 1000), (5, now_ms - 500)])])[0] == 204
    assert memory_of(app, 'known') == 5
    assert post(app, [(labels, [(0.0, now_ms)])])[0] == 204
    assert memory_of(app, 'known') == 0
    counters = read_exposition(scrape(app))
    assert [counters[('k8s_exporter_samples_ignored_total', (('reason', reason),))]
            for reason in ('future_timestamp', 'out_of_order')] == [1, 1]


def test_a_label_with_fields_beyond_name_and_value_is_still_read():
    # A Label with an unknown field 3: protobuf keeps it out of the label
    # map the decoder reads, so the pod label would be lost.
    def record(field, payload):
        return bytes([field << 3 | 2]) + varint(len(payload)) + payload

    labels = sorted(cadvisor(MEMORY, 'ns', 'pod-xxxx').items())
    series = b''.join(record(1, record(1, name.encode()) + record(2, value.encode())
                                + (b'\x18\x05' if name == 'pod' else b''))
                      for name, value in labels)
    series += record(2, remote_pb2.Sample(value=4096.0, timestamp=1).SerializeToString())
    assert remote_pb2.TimeSeries.FromString(series).labels[-1].name == 'pod'
    app = fresh_app()
    assert call_wsgi(app, 'POST', '/write', snappy.compress(record(1, series)))[0] == 204
    assert memory_of(app, 'pod-xxxx') == 4096


def test_dropped_series_are_read_only_as_far_as_their_name():
    # Their other labels are never decoded: a series the exporter does not
    # keep cannot make it refuse the request.
    payload = rw1_body([(cadvisor('container_network_receive_bytes_total', 'ns', 'pod-xxxx'),
                         [(1, 1)])], compress=False)
    raw = payload.replace(b'pod-xxxx', b'pod-\xff\xfe\xfd\xfc')
    assert call_wsgi(fresh_app(), 'POST', '/write', snappy.compress(raw))[0] == 204


@pytest.mark.parametrize('protocol, bad_series, reason', [
    (1, ({}, [(1, 1)]), 'series with no labels'),
    (1, ({'pod': 'p'}, [(1, 1)]), 'series with no __name__ label'),
    (2, ({}, [(1, 1)]), 'series with no labels'),
    (2, ({'pod': 'p'}, [(1, 1)]), 'series with no __name__ label'),
    (1, ({'__name__': '', 'pod': 'p'}, [(1, 1)]), 'series with no __name__ label'),
    (2, ({'__name__': '', 'pod': 'p'}, [(1, 1)]), 'series with no __name__ label'),
], ids=['rw1-no-labels', 'rw1-no-name', 'rw2-no-labels', 'rw2-no-name', 'rw1-empty-name',
        'rw2-empty-name'])
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


@pytest.mark.parametrize('refs, reason', [
    ([1, 2, 3], 'series with an odd number of label refs'),
    ([1, 2, 3, 9], 'label ref out of range of 8 symbols'),
    ([1, 99], 'label ref out of range of 8 symbols'),
    ([1, 8], 'label ref out of range of 8 symbols'),
], ids=['odd-count', 'one-out-of-range', 'value-out-of-range', 'ref-at-symbol-count'])
def test_rw2_bad_label_refs_are_400(refs, reason):
    symbols = ['', '__name__', MEMORY, 'namespace', 'ns', 'pod', 'p', 'job']
    app = fresh_app()
    status, text = rejection(app, rw2_raw(symbols, [refs, [1, 2, 3, 4, 5, 6]]),
                             {'Content-Type': RW2_TYPE})
    assert (status, text) == (400, f'1 invalid series skipped, first: {reason}; '
                                   'the rest was applied')
    assert memory_of(app) == 1


def test_body_over_the_limit_is_413():
    app = fresh_app(max_body_bytes=100)
    body = rw1_body(seed_table())
    assert rejection(app, body) == (413, f'body of {len(body)} bytes exceeds the limit of 100')
    # Without Content-Length (chunked), one byte over the limit is enough.
    assert rejection(app, b'x' * 101, content_length=False) == (
        413, 'body exceeds the limit of 100 bytes')


def test_a_body_at_either_limit_is_accepted():
    payload = rw1_body(seed_table(), compress=False)
    body = snappy.compress(payload)
    app = fresh_app(max_body_bytes=len(body), max_decoded_bytes=len(payload))
    assert call_wsgi(app, 'POST', '/write', body)[0] == 204
    assert call_wsgi(app, 'POST', '/write', body, content_length=False)[0] == 204


def test_a_body_shorter_than_its_content_length_is_400():
    body = rw1_body(seed_table())
    assert rejection(fresh_app(), body, {'Content-Length': str(len(body) + 10)}) == (
        400, f'body ended after {len(body)} of {len(body) + 10} bytes')


def test_a_refusal_echoes_at_most_120_characters_of_the_request():
    content_type = 'application/' + 'x' * 300
    assert rejection(fresh_app(), b'junk', {'Content-Type': content_type}) == (
        415, f'unsupported Content-Type {content_type[:120] + "..."!r}; '
             'expected application/x-protobuf')


def test_decoded_body_over_the_limit_is_413():
    app = fresh_app(max_decoded_bytes=100)
    payload = rw1_body(seed_table(), compress=False)
    assert rejection(app, snappy.compress(payload)) == (
        413, f'decoded body of {len(payload)} bytes exceeds the limit of 100')


def test_rejected_requests_never_cost_stored_data():
    app = fresh_app(max_body_bytes=5000)
    post(app, seed_table())
    before = pod_families(scrape(app))
    statuses = [call_wsgi(app, 'POST', '/write', body, headers)[0] for body, headers in (
        (b'junk', {}), (b'x' * 6000, {}), (snappy.compress(b'\xff'), {}),
        (b'junk', {'Content-Type': 'application/json'}))]
    assert statuses == [400, 413, 400, 415]
    assert pod_families(scrape(app)) == before == SEED_EXPOSITION


@pytest.mark.parametrize('method, path, allow', [
    ('GET', '/write', 'POST'), ('PUT', '/api/v1/write', 'POST'),
    ('POST', '/metrics', 'GET, HEAD'), ('DELETE', '/-/healthy', 'GET, HEAD'),
])
def test_wrong_method_is_405_with_allow(method, path, allow):
    status, headers, body = call_wsgi(fresh_app(), method, path)
    assert (status, headers['Allow'], body) == (405, allow,
                                                f'method {method} not allowed\n'.encode())


def test_each_status_line_carries_its_rfc_9110_reason_phrase():
    app = fresh_app(max_body_bytes=1000)
    requests = [('GET', '/metrics', b'', {}), ('POST', '/write', rw1_body(seed_table()), {}),
                ('POST', '/write', b'', {}), ('GET', '/nope', b'', {}), ('GET', '/write', b'', {}),
                ('POST', '/write', b'x' * 1001, {}),
                ('POST', '/write', b'junk', {'Content-Type': 'text/plain'})]
    assert [call_wsgi(app, *request, status_line=True)[0] for request in requests] == [
        '200 OK', '204 No Content', '400 Bad Request', '404 Not Found',
        '405 Method Not Allowed', '413 Content Too Large', '415 Unsupported Media Type']


def test_a_fault_of_ours_is_500_logged_and_counted(monkeypatch, caplog):
    def fail(*args):
        raise RuntimeError('a fault of ours')

    app = fresh_app()
    monkeypatch.setattr(k8s_exporter, 'render_self_metrics', fail)
    status, _, body = call_wsgi(app, 'GET', '/metrics', status_line=True)
    assert (status, body) == ('500 Internal Server Error',
                              b'internal error; see the exporter log\n')
    assert 'RuntimeError: a fault of ours' in caplog.text
    monkeypatch.undo()
    page = scrape(app)
    assert (self_metric(page, 'promhttp_metric_handler_errors_total', cause='gathering'),
            requests_counted(page, 'metrics', 500)) == (1, 1)


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


@pytest.mark.parametrize('slots, second_waits', [(1, True), (2, False)],
                         ids=['one-slot-the-second-waits', 'two-slots-both-decode'])
def test_concurrent_decodes_are_bounded_by_the_configured_slots(slots, second_waits):
    # A write paused in the middle of its decoding, as it enters snappy's
    # uncompress (a profile hook of its own thread: nothing of the app is
    # replaced), holds a decode slot; a second write waits for a free slot,
    # and does not fail.
    app = fresh_app(max_concurrent_decodes=slots)
    decoding, resume = threading.Event(), threading.Event()
    statuses = {}

    def pause_in_uncompress(frame, event, arg):
        if event == 'call' and frame.f_code is snappy.uncompress.__code__:
            decoding.set()
            resume.wait(30)

    def first_write():
        sys.setprofile(pause_in_uncompress)
        try:
            statuses['first'] = post(app, seed_table())[0]
        finally:
            sys.setprofile(None)

    first = threading.Thread(target=first_write)
    second = threading.Thread(target=lambda: statuses.update(second=post(app, SEED_UPDATE)[0]))
    first.start()
    try:
        assert decoding.wait(10), 'the first write never reached snappy.uncompress'
        second.start()
        second.join(timeout=0.3 if second_waits else 10)
        assert (second.is_alive(), statuses) == (
            (True, {}) if second_waits else (False, {'second': 204}))
    finally:
        resume.set()
        first.join(timeout=10)
        if second.ident is not None:
            second.join(timeout=10)
    assert statuses == {'first': 204, 'second': 204}


###############################################################################
# A real gunicorn over HTTP ###################################################
###############################################################################

def test_importing_the_module_only_defines_things():
    """No app, no exit on a bad variable, no thread: those wait for gunicorn's hooks."""
    result = subprocess.run(
        [sys.executable, '-c', 'import threading, k8s_exporter; '
                               'print("app" in vars(k8s_exporter), threading.active_count())'],
        cwd=HERE, env={**os.environ, 'K8S_EXPORTER_TTL_SECONDS': 'soon'},
        capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, 'False 1\n', '')


needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='mallopt is glibc\'s')


@needs_glibc
def test_glibc_takes_every_malloc_setting():
    # mallopt returns 0 for a value it refuses (glibc has capped the mmap
    # threshold at 32 MiB on 64-bit; 2.36 takes more), which would leave the
    # default in place.
    result = subprocess.run(
        [sys.executable, '-c', 'import k8s_exporter; print(k8s_exporter.tune_malloc())'],
        cwd=HERE, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, 'True\n'), result.stderr


# Loaded by every Python started with its folder on PYTHONPATH: at exit,
# glibc's malloc_info() of that process goes to malloc-info-PID.xml there.
MALLOC_INFO_AT_EXIT = """\
import atexit, ctypes, os

def _write_malloc_info():
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
    libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
    libc.fclose.argtypes = (ctypes.c_void_p,)
    path = os.path.join(os.path.dirname(__file__), f'malloc-info-{os.getpid()}.xml')
    stream = libc.fopen(path.encode(), b'w')
    libc.malloc_info(0, stream)
    libc.fclose(stream)

atexit.register(_write_malloc_info)
"""


@needs_glibc
def test_the_worker_has_one_malloc_arena_after_concurrent_writes(tmp_path):
    """Without tuning, each of gunicorn's threads that allocates gets an arena (10 here)."""
    (tmp_path / 'sitecustomize.py').write_text(MALLOC_INFO_AT_EXIT)
    table = large_cadvisor_table(100, 1_700_000_000_000)
    with Gunicorn(env={'PYTHONPATH': os.pathsep.join(
            [str(tmp_path), *filter(None, [os.environ.get('PYTHONPATH')])])}) as server:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: write(server.url, table)[0], range(24)))
        assert statuses == [204] * 24
    malloc_info = (tmp_path / f'malloc-info-{server.pid}.xml').read_text()
    assert malloc_info.count('<heap nr=') == 1, malloc_info


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


def test_gunicorn_refuses_a_series_over_a_label_limit_and_applies_the_rest():
    env = {'K8S_EXPORTER_MAX_LABEL_VALUE_BYTES': '70', 'K8S_EXPORTER_CLUSTER': 'c'}
    with Gunicorn(env=env) as exporter:
        oversized = cadvisor(MEMORY, 'ns', 'big') | {'image': 'x' * (1 * 1024 * 1024)}
        status, headers, body = write(exporter.url, [(oversized, [(5, 1)]),
                                                     (cadvisor(MEMORY, 'ns', 'good'), [(7, 1)])])
        assert (status, headers['content-type'], body) == (
            400, 'text/plain; charset=utf-8',
            b'1 invalid series skipped, first: series of container_memory_usage_bytes with a '
            b'image label of 1048576 bytes, over K8S_EXPORTER_MAX_LABEL_VALUE_BYTES=70; '
            b'the rest was applied\n')
        _, text = scrape_url(exporter.url)
        assert [line for line in pod_families(text).splitlines() if '{' in line] == [
            'container_memory_usage_bytes{cluster="c",item="container_memory_usage_bytes",'
            'job="kubernetes-cadvisor",namespace="ns",pod="good"} 7']
        assert self_metric(text, 'k8s_exporter_samples_ignored_total', reason='label_limit') == 1
        assert self_metric(text, 'k8s_exporter_input_series') == 1


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
    gunicorn = ExporterProcess(env={'K8S_EXPORTER_TTL_SECONDS': 'soon'})
    result = subprocess.run(gunicorn.command(), cwd=HERE, env=gunicorn.env,
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


@pytest.mark.parametrize('missing', ['snappy', 'gunicorn'])
def test_python3_k8s_exporter_py_without_a_package_says_what_to_install_in_one_line(
        tmp_path, missing):
    # A package that fails to import, first on the path: as on a host without it.
    (tmp_path / missing).mkdir()
    (tmp_path / missing / '__init__.py').write_text(
        f'raise ImportError("No module named {missing!r}")\n')
    result = subprocess.run([sys.executable, 'k8s_exporter.py'], cwd=HERE,
                            env={**os.environ, 'PYTHONPATH': str(tmp_path),
                                 'K8S_EXPORTER_LISTEN': f'127.0.0.1:{free_port()}'},
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (1, (
        f"k8s_exporter: No module named '{missing}'; it needs gunicorn>=27, protobuf>=6.31, "
        "python-snappy>=0.7: python3 -m venv venv && venv/bin/pip install 'gunicorn>=27' "
        "'protobuf>=6.31' 'python-snappy>=0.7' && venv/bin/python k8s_exporter.py\n"))


def test_python3_k8s_exporter_py_with_debians_protobuf_3_21_says_what_to_install(tmp_path):
    # What Debian 12's python3-protobuf offers: no runtime_version, which
    # remote_pb2.py (generated for 6.31) needs.
    package = tmp_path / 'google' / 'protobuf'
    package.mkdir(parents=True)
    (tmp_path / 'google' / '__init__.py').write_text('')
    (package / '__init__.py').write_text("__version__ = '3.21.12'\n")
    (package / 'message.py').write_text('class DecodeError(Exception):\n    pass\n')
    (package / 'unknown_fields.py').write_text('class UnknownFieldSet:\n    pass\n')
    for name in ('descriptor', 'descriptor_pool'):
        (package / f'{name}.py').write_text('')
    result = subprocess.run([sys.executable, 'k8s_exporter.py'], cwd=HERE,
                            env={**os.environ, 'PYTHONPATH': str(tmp_path)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.count('\n') == 1, result.stderr
    assert result.stderr.startswith(
        "k8s_exporter: cannot import name 'runtime_version' from 'google.protobuf'")
    assert result.stderr.endswith(
        "; it needs gunicorn>=27, protobuf>=6.31, python-snappy>=0.7: python3 -m venv venv && "
        "venv/bin/pip install 'gunicorn>=27' 'protobuf>=6.31' 'python-snappy>=0.7' && "
        "venv/bin/python k8s_exporter.py\n")


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
    assert 'tok' not in exp.log and 'scraper:pw' not in exp.log


SOAK_TTL_SECONDS = 3.0
SOAK_CHURN_SECONDS = 1.0
SOAK_WRITERS, SOAK_PODS_PER_WRITER, SOAK_SCRAPERS = 3, 4, 3
SOAK_JOB = 'kubernetes-cadvisor'

# (metric, container, cgroup suffix, device, value per request counter c).
# Every series of a pod is written by each request, with values from one
# counter, so a scrape can tell whether it shows one request whole.
SOAK_SERIES = [
    ('container_cpu_load_average_10s', '', '', '', lambda c: c * 0.25),
    ('container_cpu_load_average_10s', 'app', '/app', '', lambda c: 7.0),   # under the pod's
    ('container_memory_usage_bytes', '', '', '', lambda c: c * 4096.0),
    ('container_memory_usage_bytes', 'app', '/app', '', lambda c: 1.0),     # under the pod's
    ('container_memory_max_usage_bytes', '', '', '', lambda c: c * 8192.0),
    ('container_fs_usage_bytes', 'app', '/app', '/dev/vda1', lambda c: c * 4096.0),
    ('container_fs_usage_bytes', 'sidecar', '/sidecar', '/dev/vda1', lambda c: c * 8192.0),
    ('container_fs_limit_bytes', 'app', '/app', '/dev/vda1', lambda c: c * 1000.0),
    ('container_fs_limit_bytes', 'sidecar', '/sidecar', '/dev/vda1', lambda c: c * 2000.0),
    ('container_fs_limit_bytes', 'app', '/app', '/dev/vdb', lambda c: c * 3000.0),
    ('container_network_receive_bytes_total', '', '', '', lambda c: c * 1.0),   # not exported
]
SOAK_SERIES_PER_POD = sum(1 for metric, *_ in SOAK_SERIES if metric in EXPORTED_METRICS)
# What one request with counter c makes of a pod, by the aggregation rules.
SOAK_POD_VALUES = {'container_cpu_load_average_10s': 0.25,
                   'container_memory_usage_bytes': 4096.0,
                   'container_memory_max_usage_bytes': 8192.0,
                   'container_fs_usage_bytes': 12288.0,
                   'container_fs_limit_bytes': 5000.0}


def soak_pod_table(pod, counter, timestamp_ms, stale=False):
    pod_cgroup = f'/kubepods/burstable/pod{zlib.crc32(pod.encode()):08x}-0000-4000'
    table = [(cadvisor(metric, 'soak', pod, container, pod_cgroup + suffix, job=SOAK_JOB,
                       device=device), [(STALE_NAN if stale else value(counter), timestamp_ms)])
             for metric, container, suffix, device, value in SOAK_SERIES]
    table.append(({'__name__': 'container_memory_usage_bytes', 'id': '/', 'job': SOAK_JOB},
                  [(8e9 + counter, timestamp_ms)]))
    return table


def soak_pods_in(text):
    """{pod: {metric: value}} of the soak pods on a page."""
    pods = {}
    for (metric, _, _, namespace, pod), value in pod_values_in(text).items():
        if namespace == 'soak':
            pods.setdefault(pod, {})[metric] = value
    return pods


def soak_pod_problem(pod, values):
    """Why a scraped pod is not exactly one request's values, or ''."""
    counter = values.get('container_memory_usage_bytes', 0.0) / 4096.0
    if counter < 1 or counter != int(counter):
        return f'{pod}: memory {values.get("container_memory_usage_bytes")} is no request\'s'
    expected = {metric: factor * counter for metric, factor in SOAK_POD_VALUES.items()}
    if values != expected:
        return f'{pod}: {values} is not one request (counter {counter:g}): {expected}'
    return ''


class SoakRun:
    """Writers with pod churn and scrapers against one gunicorn, for a deadline."""

    def __init__(self, url, seconds):
        self.url = url
        self.seconds = seconds
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.problems = []          # every 5xx, connection error, bad scrape
        self.writes = [0] * SOAK_WRITERS
        self.scrapes = [0] * SOAK_SCRAPERS
        self.pods_checked = 0
        self.stale_ended = {}       # pod -> monotonic time its stale markers were answered
        self.abandoned = {}         # pod -> monotonic time of its last answered write
        self.self_metrics = []      # (seconds since start, input series, rss bytes)

    def problem(self, text):
        with self.lock:
            self.problems.append(f'{time.monotonic() - self.started:.2f}s {text}'[:500])

    def post(self, writer, table, protocol):
        try:
            status, _, body = write(self.url, table, protocol)
        except (OSError, http.client.HTTPException) as error:
            self.problem(f'writer {writer}: {error!r}')
            return False
        if status != 204:
            self.problem(f'writer {writer}: {status} {body[:200]!r}')
            return False
        self.writes[writer] += 1
        return True

    def writer(self, writer):
        counters, generation, request = {}, 0, 0
        timestamp_ms = int(time.time() * 1000)
        while not self.stop.is_set():
            pods = [f'w{writer}-g{generation}-p{slot}' for slot in range(SOAK_PODS_PER_WRITER)]
            churn_at = time.monotonic() + SOAK_CHURN_SECONDS
            while not self.stop.is_set() and time.monotonic() < churn_at:
                pod = pods[request % len(pods)]
                request += 1
                timestamp_ms += 1
                counters[pod] = counters.get(pod, 0) + 1
                if self.post(writer, soak_pod_table(pod, counters[pod], timestamp_ms),
                             1 + request % 2):
                    self.abandoned[pod] = time.monotonic()
                time.sleep(0.01)
            # Half the pods end as Prometheus ends them (stale markers), the
            # other half just stop and are left to the TTL.
            for pod in pods[::2]:
                timestamp_ms += 1
                self.abandoned.pop(pod, None)
                if self.post(writer, soak_pod_table(pod, 0, timestamp_ms, stale=True),
                             1 + request % 2):
                    self.stale_ended[pod] = time.monotonic()
            generation += 1

    def scraper(self, scraper):
        last_counter = {}
        while not self.stop.is_set():
            asked = time.monotonic()
            try:
                status, text = scrape_url(self.url, gzipped=scraper == 0)
            except (OSError, http.client.HTTPException) as error:
                self.problem(f'scraper {scraper}: {error!r}')
                continue
            if status != 200:
                self.problem(f'scraper {scraper}: status {status}')
                continue
            try:
                samples, pods = read_exposition(text), soak_pods_in(text)
            except AssertionError as error:     # a malformed page or pod series
                self.problem(f'scraper {scraper}: {error}')
                continue
            self.scrapes[scraper] += 1
            self.self_metrics.append((asked - self.started,
                                      samples[('k8s_exporter_input_series', ())],
                                      samples[('process_resident_memory_bytes', ())]))
            expire_by = asked - SOAK_TTL_SECONDS * 1.1 - 1.0
            for pod, values in pods.items():
                self.pods_checked += 1
                why = soak_pod_problem(pod, values)
                counter = values.get('container_memory_usage_bytes', 0) / 4096
                if not why and counter < last_counter.get(pod, 0):
                    why = f'{pod}: counter went back from {last_counter[pod]} to {counter}'
                if not why and self.stale_ended.get(pod, asked) < asked:
                    why = f'{pod}: shown after its stale markers were answered'
                if not why and self.abandoned.get(pod, asked) < expire_by:
                    why = f'{pod}: shown {asked - self.abandoned[pod]:.1f}s after its last write'
                if why:
                    self.problem(f'scraper {scraper}: {why}')
                last_counter[pod] = counter
            time.sleep(0.05)

    def run(self):
        threads = [threading.Thread(target=self.writer, args=(n,), daemon=True)
                   for n in range(SOAK_WRITERS)]
        threads += [threading.Thread(target=self.scraper, args=(n,), daemon=True)
                    for n in range(SOAK_SCRAPERS)]
        for thread in threads:
            thread.start()
        try:
            self.stop.wait(self.seconds)
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in threads), 'a soak thread hung'


def window_max(samples, start, end, column):
    values = [row[column] for row in samples if start <= row[0] < end]
    assert values, f'no scrape between {start:.1f}s and {end:.1f}s'
    return max(values)


def test_soak_writers_and_scrapers_see_no_5xx_no_half_applied_pod_and_flat_memory():
    # Warm-up: the first abandoned pods must have outlived the TTL before
    # the series count can be flat.
    warmup = SOAK_TTL_SECONDS + 2 * SOAK_CHURN_SECONDS
    seconds = max(float(os.environ.get('TEST_K8S_EXPORTER_SOAK_SECONDS', '8')), warmup + 3)
    with Gunicorn(env={'K8S_EXPORTER_TTL_SECONDS': str(SOAK_TTL_SECONDS)}) as server:
        soak = SoakRun(server.url, seconds)
        soak.run()
        assert soak.problems == [], '\n'.join(soak.problems[:20])
        assert min(soak.writes) >= 10 * seconds, soak.writes
        assert min(soak.scrapes) >= 2 * seconds, soak.scrapes
        assert soak.pods_checked >= 100, soak.pods_checked
        assert len(soak.stale_ended) >= SOAK_WRITERS * 2

        # Live pods, plus abandoned ones until the TTL (and a sweep, at most
        # 10% late) forgets them.
        generations_held = math.ceil(SOAK_TTL_SECONDS * 1.1 / SOAK_CHURN_SECONDS) + 1
        most_series = SOAK_WRITERS * SOAK_SERIES_PER_POD * SOAK_PODS_PER_WRITER * (
            1 + generations_held / 2)
        middle = (warmup + seconds) / 2
        series = [window_max(soak.self_metrics, start, end, 1)
                  for start, end in ((warmup, middle), (middle, seconds))]
        rss = [window_max(soak.self_metrics, start, end, 2)
               for start, end in ((warmup, middle), (middle, seconds))]
        assert max(row[1] for row in soak.self_metrics) <= most_series, soak.self_metrics
        assert series[1] <= 1.2 * series[0] + SOAK_WRITERS * SOAK_SERIES_PER_POD, series
        assert rss[1] <= 1.2 * rss[0] + 8 * 1024 * 1024, rss

        # Once the writers stop, everything they left goes with the TTL.
        wait_until(lambda: self_metric(server.metrics(), 'k8s_exporter_input_series') == 0,
                   timeout=SOAK_TTL_SECONDS * 1.1 + 5, what='the soak series to expire')
        assert soak_pods_in(server.metrics()) == {}
        print(f'soak {seconds:.0f}s: writes {soak.writes}, scrapes {soak.scrapes}, '
              f'pods checked {soak.pods_checked}, series max {series}, '
              f'rss max MiB {[round(r / 2 ** 20, 1) for r in rss]}')


def test_soak_consistency_check_refuses_half_applied_and_foreign_values():
    whole = {metric: factor * 3 for metric, factor in SOAK_POD_VALUES.items()}
    assert soak_pod_problem('p', whole) == ''
    assert soak_pod_problem('p', {**whole, 'container_fs_usage_bytes': 12288.0 * 2})
    assert soak_pod_problem('p', {k: v for k, v in whole.items()
                                  if k != 'container_fs_limit_bytes'})
    assert soak_pod_problem('p', {**whole, 'container_memory_usage_bytes': 4096.5})


def peak_rss_bytes(pid):
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) * 1024
    raise AssertionError(f'no VmHWM in /proc/{pid}/status')


def large_cadvisor_table(pods, timestamp_ms):
    """About 10 kB of decoded RW 1.0 per pod: its five gauges among 21 cAdvisor series."""
    unexported = [f'container_{name}' for name in (
        'cpu_usage_seconds_total', 'cpu_user_seconds_total', 'cpu_system_seconds_total',
        'memory_cache', 'memory_rss', 'memory_swap', 'memory_working_set_bytes',
        'memory_failcnt', 'network_receive_bytes_total', 'network_transmit_bytes_total',
        'network_receive_packets_total', 'network_transmit_packets_total',
        'fs_reads_total', 'fs_writes_total', 'spec_memory_limit_bytes', 'last_seen')]
    table = []
    for number in range(pods):
        pod = f'large-{number:05d}-7c9d8f6b5-{number * 7919 % 100000:05x}'
        container_id = f'/kubepods/burstable/pod{number:08x}-1111-4222-8333-444455556666/' \
                       f'{number:064x}'
        for metric in (*EXPORTED_METRICS, *unexported):
            labels = cadvisor(metric, 'large', pod, 'app', container_id, device='/dev/vda1',
                              image='registry.example.com/team/app:1.2.3',
                              name=f'k8s_app_{pod}_large_{number:032x}_0',
                              instance='node-17.example.com:10250')
            table.append((labels, [(float(number), timestamp_ms)]))
    return table


def test_many_large_writes_at_once_are_each_applied_with_204():
    """16 writes of ~5 MB decoded each at once: they wait their turn to decode, none is refused."""
    table = large_cadvisor_table(500, int(time.time() * 1000))
    body = rw1_body(table)
    decoded_bytes = len(rw1_body(table, compress=False))
    assert 4.5e6 < decoded_bytes < 5.5e6, decoded_bytes
    with Gunicorn() as server:
        rss_before = peak_rss_bytes(server.pid)
        headers = {'Content-Type': RW1_TYPE, 'Content-Encoding': 'snappy'}
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _: http_request(
                server.url + '/write', 'POST', body, headers, timeout=60)[::2], range(16)))
        seconds = time.monotonic() - started
        rss_peak = peak_rss_bytes(server.pid)
        assert results == [(204, b'')] * 16
        page = server.metrics()
        assert (requests_counted(page, 'write', 204),
                self_metric(page, 'k8s_exporter_input_series')) == (16, 500 * len(EXPORTED_METRICS))
        assert server.process.poll() is None
        print(f'16 x {len(body)} B bodies ({decoded_bytes} B decoded) in {seconds:.1f}s; '
              f'worker peak RSS {rss_before / 2 ** 20:.0f} MiB before, '
              f'{rss_peak / 2 ** 20:.0f} MiB after')


def test_sigterm_lets_an_in_flight_write_finish_then_gunicorn_exits_0():
    body = rw1_body(seed_table())
    chunks = [body[i:i + len(body) // 10 + 1] for i in range(0, len(body), len(body) // 10 + 1)]
    server = Gunicorn().start()
    try:
        client = socket.create_connection(('127.0.0.1', server.port), timeout=30)
        with client:
            client.sendall(raw_write_head(len(body)) + chunks[0])
            time.sleep(0.3)   # the request is in a worker thread, reading its body
            server.process.send_signal(signal.SIGTERM)
            for chunk in chunks[1:]:
                time.sleep(0.1)
                client.sendall(chunk)
            assert read_response(client) == (204, b'')
        assert server.process.wait(timeout=35) == 0
    finally:
        server.stop()
    assert 'Traceback' not in server.log, server.log


###############################################################################
# Clients that misbehave: slow, silent, oversized #############################
###############################################################################

# ExporterWorker reads requests whole in gunicorn's main thread; a pool
# thread only ever serves a whole one. These talk to a real gunicorn.
HEADER_DEADLINE_SECONDS = k8s_exporter.HEADER_DEADLINE_SECONDS
BODY_GRACE_SECONDS = k8s_exporter.BODY_GRACE_SECONDS
MIN_BODY_BYTES_PER_SECOND = k8s_exporter.MIN_BODY_BYTES_PER_SECOND
MAX_HEADER_BYTES = k8s_exporter.MAX_HEADER_BYTES


def raw_write_head(length, content_type=RW1_TYPE, extra=''):
    return (f'POST /write HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n'
            f'Content-Encoding: snappy\r\n{extra}Content-Length: {length}\r\n\r\n').encode()


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def read_response(client):
    """(status, body) of the HTTP response on a raw client socket."""
    response = http.client.HTTPResponse(client)
    response.begin()
    return response.status, response.read()


def nothing_received(client):
    """Whether the server has neither answered nor closed this connection yet."""
    client.setblocking(False)
    try:
        client.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        client.setblocking(True)
    return False


def cut_offs_counted(page):
    return {reason: self_metric(page, 'k8s_exporter_connections_cut_off_total', reason=reason)
            for reason in ('silent', 'slow_body', 'slow_headers')}


def cut_off_log_lines(log):
    return [line for line in log.splitlines() if 'k8s_exporter: cut off ' in line]


def test_a_client_that_stalls_in_its_body_holds_no_thread_and_gets_408_at_its_deadline():
    with Gunicorn() as server:
        with socket.create_connection(('127.0.0.1', server.port),
                                      timeout=BODY_GRACE_SECONDS + 10) as stalled:
            stalled.sendall(raw_write_head(100_000) + b'\0' * 50_000)
            stalled_at = time.monotonic()
            time.sleep(0.5)
            for number in range(3):
                assert scrape_url(server.url)[0] == 200
                assert write(server.url, seed_table(1_700_000_000_000 + number))[:3:2] == (
                    204, b'')
            # All of that while the stalled request was still being waited for.
            assert nothing_received(stalled)
            assert read_response(stalled) == (408, b'request body not received in time\n')
            waited = time.monotonic() - stalled_at
            # 50,000 bytes bought 0.19 s beyond the grace; the check runs once a second.
            allowed = BODY_GRACE_SECONDS + 50_000 / MIN_BODY_BYTES_PER_SECOND
            assert allowed - 0.5 <= waited <= allowed + 3, waited
            assert stalled.recv(100) == b''      # and the connection is closed
        page = server.metrics()
        assert cut_offs_counted(page) == {'silent': 0, 'slow_body': 1, 'slow_headers': 0}
        assert (requests_counted(page, 'write', 408), requests_counted(page, 'write', 204)) == (
            1, 3)
        assert self_metric(page, 'k8s_exporter_write_requests_total', result='refused') == 1
        assert 'request body not received in time' in http_request(server.url + '/')[2].decode()
    assert len(cut_off_log_lines(server.log)) == 1, server.log


def test_headers_that_trickle_get_408_at_the_header_deadline_whatever_their_pace():
    with Gunicorn() as server:
        with socket.create_connection(('127.0.0.1', server.port),
                                      timeout=HEADER_DEADLINE_SECONDS + 10) as trickler:
            connected = time.monotonic()
            head = b'GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ' + b'a' * 100
            for byte in head:
                if (not nothing_received(trickler)
                        or time.monotonic() - connected > HEADER_DEADLINE_SECONDS + 5):
                    break
                trickler.sendall(bytes([byte]))
                time.sleep(0.5)
            assert read_response(trickler) == (408, b'request headers not received in time\n')
            waited = time.monotonic() - connected
            assert HEADER_DEADLINE_SECONDS - 0.5 <= waited <= HEADER_DEADLINE_SECONDS + 3, waited
        page = server.metrics()
        assert cut_offs_counted(page) == {'silent': 0, 'slow_body': 0, 'slow_headers': 1}
        # No request arrived, so none is counted as one.
        assert requests_counted(page, 'metrics', 408) == 0


def test_silent_connections_hold_no_thread_and_are_closed_at_the_header_deadline():
    with Gunicorn() as server, contextlib.ExitStack() as stack:
        silent = [stack.enter_context(socket.create_connection(('127.0.0.1', server.port),
                                                               timeout=60))
                  for _ in range(50)]
        opened = time.monotonic()
        time.sleep(0.5)
        for number in range(10):
            assert write(server.url, seed_table(1_700_000_000_000 + number))[0] == 204
            assert scrape_url(server.url)[0] == 200
        assert all(nothing_received(client) for client in silent)
        for client in silent:
            assert client.recv(100) == b''       # closed, with nothing said
        waited = time.monotonic() - opened
        assert HEADER_DEADLINE_SECONDS - 0.5 <= waited <= HEADER_DEADLINE_SECONDS + 3, waited
        assert cut_offs_counted(server.metrics()) == {'silent': 50, 'slow_body': 0,
                                                      'slow_headers': 0}
    lines = cut_off_log_lines(server.log)
    assert len(lines) == 1 and lines[0].endswith(
        'cut off 50 connections that sent too slowly or nothing: 50 silent (logged at most '
        'once a minute; see k8s_exporter_connections_cut_off_total)'), lines


def test_a_kept_alive_connection_may_idle_between_requests_but_not_inside_one():
    """The header deadline runs from a request's first byte, not from the last response."""
    with Gunicorn() as server:
        connection = http.client.HTTPConnection('127.0.0.1', server.port, timeout=60)
        try:
            for pause in (0, HEADER_DEADLINE_SECONDS + 2):
                time.sleep(pause)
                connection.request('GET', '/-/healthy')
                response = connection.getresponse()
                assert (response.status, response.read()) == (200, b'k8s_exporter is Healthy.\n')
        finally:
            connection.close()
        assert cut_offs_counted(server.metrics()) == {'silent': 0, 'slow_body': 0,
                                                      'slow_headers': 0}


@pytest.mark.parametrize('head, status, reason', [
    (raw_write_head(10 * 2 ** 20 + 1), 413, f'body of {10 * 2 ** 20 + 1} bytes exceeds the '
                                            f'limit of {10 * 2 ** 20}'),
    (b'GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ' + b'a' * MAX_HEADER_BYTES + b'\r\n\r\n',
     431, f'request headers exceed {MAX_HEADER_BYTES} bytes'),
    (raw_write_head(10, extra='Transfer-Encoding: chunked\r\n'), 400,
     'cannot tell where the body ends: Transfer-Encoding must end in chunked, without '
     'Content-Length'),
    (raw_write_head('1e3'), 400, "cannot tell where the body ends: bad Content-Length '1e3'"),
    (raw_write_head(5, extra='Content-Length: 6\r\n'), 400,
     "cannot tell where the body ends: bad Content-Length '6,5'"),
    (raw_chunked_write_head() + b'%x\r\n' % (10 * 2 ** 20 + 1), 413,
     f'body exceeds the limit of {10 * 2 ** 20} bytes'),
], ids=['content_length_over_the_limit', 'headers_over_32_KiB', 'chunked_and_length',
        'bad_length', 'two_lengths', 'chunk_over_the_limit'])
def test_a_request_whose_size_or_end_is_wrong_is_refused_before_its_body_is_read(
        server, head, status, reason):
    before = server.metrics()
    with socket.create_connection(('127.0.0.1', server.port), timeout=30) as client:
        client.sendall(head)
        response = http.client.HTTPResponse(client)
        response.begin()
        assert (response.status, response.getheader('Connection'), response.read()) == (
            status, 'close', reason.encode() + b'\n')
        assert client.recv(100) == b''
    handler = 'write' if head.startswith(b'POST /write') else 'index'
    assert requests_counted(server.metrics(), handler, status) == requests_counted(
        before, handler, status) + 1


def test_a_chunked_write_that_arrives_in_pieces_is_applied_whole():
    body = rw1_body(seed_table())
    with Gunicorn() as server:
        with socket.create_connection(('127.0.0.1', server.port), timeout=30) as client:
            client.sendall(raw_chunked_write_head())
            for start in range(0, len(body), 40):
                piece = body[start:start + 40]
                client.sendall(b'%x;ext=1\r\n' % len(piece) + piece + b'\r\n')
                time.sleep(0.01)
            client.sendall(b'0\r\nX-Trailer: t\r\n\r\n')
            assert read_response(client) == (204, b'')
        assert pod_families(scrape_url(server.url)[1]) == SEED_EXPOSITION


def test_expect_100_continue_is_answered_before_the_body_is_sent(server):
    body = rw1_body(seed_table(1_700_000_060_000))
    with socket.create_connection(('127.0.0.1', server.port), timeout=30) as client:
        client.sendall(raw_write_head(len(body), extra='Expect: 100-continue\r\n'))
        assert client.recv(100) == b'HTTP/1.1 100 Continue\r\n\r\n'
        client.sendall(body)
        # http.client skips the 100 gunicorn sends too, as any client must (RFC 9110, 15.2).
        assert read_response(client) == (204, b'')


def test_clients_that_never_close_after_connection_close_hold_no_one_up():
    """The connection of a closing response lingers without the main thread waiting."""
    with Gunicorn() as server, contextlib.ExitStack() as stack:
        holders = []
        for _ in range(20):
            client = stack.enter_context(socket.create_connection(('127.0.0.1', server.port),
                                                                  timeout=30))
            client.sendall(b'GET /-/healthy HTTP/1.1\r\nHost: 127.0.0.1\r\n'
                           b'Connection: close\r\n\r\n')
            holders.append(client)
        started = time.monotonic()
        for number in range(5):
            assert write(server.url, seed_table(1_700_000_000_000 + number))[0] == 204
        # Before, each holder kept gunicorn's main thread for 2 s: 40 s in all.
        assert time.monotonic() - started < 5
        for client in holders:
            assert read_response(client) == (200, b'k8s_exporter is Healthy.\n')
            assert client.recv(100) == b''


class SharedReader:
    """A connection's one buffered reader, for responses read one after another:
    each http.client.HTTPResponse would otherwise buffer, and lose, the next."""

    def __init__(self, client):
        self.file = client.makefile('rb')

    def makefile(self, mode):
        return self

    def close(self):
        pass

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_pipelined_requests_are_answered_in_order_each_read_whole(server):
    body = rw1_body(seed_table(1_700_000_070_000))
    with socket.create_connection(('127.0.0.1', server.port), timeout=30) as client:
        client.sendall(raw_write_head(len(body)) + body + b'GET /-/healthy HTTP/1.1\r\n'
                       b'Host: 127.0.0.1\r\n\r\nGET /-/ready HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n')
        reader = SharedReader(client)
        assert [read_response(reader) for _ in range(3)] == [
            (204, b''), (200, b'k8s_exporter is Healthy.\n'), (200, b'k8s_exporter is Healthy.\n')]


def test_bodies_beyond_what_the_worker_may_hold_are_answered_503_for_prometheus_to_retry():
    """threads x K8S_EXPORTER_MAX_BODY_BYTES of requests being read at once, and no more."""
    limit, threads = 1000, 8
    with Gunicorn(env={'K8S_EXPORTER_MAX_BODY_BYTES': str(limit)}) as server, \
            contextlib.ExitStack() as stack:
        head = raw_write_head(limit)
        per_request = len(head) + limit - 1          # all but the body's last byte
        fitting = threads * limit // per_request     # then one byte more is too many
        clients = []
        for _ in range(fitting + 2):
            client = stack.enter_context(socket.create_connection(('127.0.0.1', server.port),
                                                                  timeout=60))
            client.sendall(head + b'\0' * (limit - 1))
            clients.append(client)
            time.sleep(0.1)
        assert all(nothing_received(client) for client in clients[:fitting])
        for client in clients[fitting:]:
            assert read_response(client) == (
                503, b'the exporter holds too many request bodies at once; retry\n')
        assert requests_counted(server.metrics(), 'write', 503) == 2
        # The held ones finish, and what they held is free again.
        for client in clients[:fitting]:
            client.sendall(b'\0')
            assert read_response(client)[0] == 400      # zeros are no snappy body
        for client in clients[:fitting + 1]:
            client.close()
        with socket.create_connection(('127.0.0.1', server.port), timeout=30) as client:
            client.sendall(head + b'\0' * limit)
            assert read_response(client)[0] == 400


class MisbehavingClients:
    """Bad connections, from one thread, that reconnect whenever they are cut off.

    Per kind, `each` connections: silent (never send), slow_headers (a
    header byte a second), slow_body (whole headers, then a body byte a
    second). Runs for `seconds`, then closes everything; bounded in count
    and time, on 127.0.0.1 only.
    """

    KINDS = ('silent', 'slow_headers', 'slow_body')

    def __init__(self, port, each, seconds):
        self.port, self.each, self.seconds = port, each, seconds
        self.cut_off = collections.Counter()     # kind -> times the server let one go
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.thread.join(self.seconds + 30)

    def connect(self, kind):
        client = socket.create_connection(('127.0.0.1', self.port), timeout=5)
        if kind == 'slow_body':
            client.sendall(raw_write_head(100_000))
        client.setblocking(False)
        return client

    def run(self):
        selector = selectors.DefaultSelector()
        for kind in self.KINDS:
            for _ in range(self.each):
                selector.register(self.connect(kind), selectors.EVENT_READ, kind)
        stop_at = time.monotonic() + self.seconds
        next_byte = time.monotonic() + 1
        try:
            while time.monotonic() < stop_at:
                for key, _ in selector.select(timeout=0.2):
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
                    self.cut_off[key.data] += 1
                    selector.register(self.connect(key.data), selectors.EVENT_READ, key.data)
                if time.monotonic() >= next_byte:
                    next_byte += 1
                    for key in list(selector.get_map().values()):
                        if key.data != 'silent':
                            with contextlib.suppress(OSError):
                                key.fileobj.send(b'X' if key.data == 'slow_headers' else b'\0')
        finally:
            for key in list(selector.get_map().values()):
                key.fileobj.close()
            selector.close()


def good_client_latencies(url, seconds, start_timestamp):
    """Write and scrape in turn for seconds: [(what, status, seconds taken)]."""
    results, timestamp = [], start_timestamp
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        timestamp += 1000
        (status, _, _), taken = timed(functools.partial(write, url, seed_table(timestamp)))
        results.append(('write', status, taken))
        (status, _), taken = timed(lambda: scrape_url(url))
        results.append(('scrape', status, taken))
        time.sleep(0.1)
    return results


def test_200_misbehaving_connections_leave_writes_and_scrapes_at_their_usual_latency():
    """Silent, trickling headers, trickling bodies, each reconnecting when cut off."""
    each, seconds = 67, 25
    with Gunicorn() as server:
        usual = good_client_latencies(server.url, 5, 1_700_000_000_000)
        with MisbehavingClients(server.port, each, seconds) as bad:
            under_attack = good_client_latencies(server.url, seconds, 1_700_000_100_000)
        counted = cut_offs_counted(server.metrics())
    assert {(what, status) for what, status, _ in usual + under_attack} == {
        ('write', 204), ('scrape', 200)}
    slowest_usual = max(taken for _, _, taken in usual)
    slowest = max(taken for _, _, taken in under_attack)
    assert slowest <= slowest_usual + 1.0, (slowest_usual, slowest)
    # Each bad connection was cut off at each deadline of the run, and the
    # exporter counted every one (and those the run ended before they saw it).
    for kind in MisbehavingClients.KINDS:
        assert bad.cut_off[kind] >= 2 * each, bad.cut_off
        assert bad.cut_off[kind] <= counted[kind] <= bad.cut_off[kind] + each, (bad.cut_off,
                                                                              counted)
    assert len(cut_off_log_lines(server.log)) == 1, server.log


###############################################################################
# Authentication ##############################################################
###############################################################################

def basic(user_password):
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
    'Bearer s3cret-write', 'bearer s3cret-write', basic('prometheus1:pw1'), basic('backup:pw2')],
    ids=['bearer', 'bearer-lower-case', 'basic-first-user', 'basic-second-user'])
def test_write_accepts_the_configured_bearer_token_or_basic_auth(secured_app, authorization):
    assert post(secured_app, seed_table(), Authorization=authorization)[0] == 204


@pytest.mark.parametrize('authorization', [
    None, 'Bearer wrong', 'Bearer s3cret-read', basic('prometheus1:pw2'), basic('nobody:pw1'),
    'Basic !!notbase64', 'Digest s3cret-write', 'Bearer', ''],
    ids=['no-header', 'wrong-token', 'the-metrics-token', 'wrong-password', 'unknown-user',
         'bad-base64', 'digest', 'bearer-without-token', 'empty-header'])
def test_write_with_missing_or_wrong_credentials_is_401_with_a_challenge(secured_app,
                                                                        authorization):
    headers = {'Authorization': authorization} if authorization is not None else {}
    status, response_headers, body = call_wsgi(secured_app, 'POST', '/write',
                                               rw1_body(seed_table()), headers)
    assert (status, body) == (401, b'missing or wrong credentials\n')
    status, _, page = call_wsgi(secured_app, 'GET', '/metrics',
                                headers={'Authorization': 'Bearer s3cret-read'})
    assert status == 200
    assert pod_families(page.decode()) == ''
    assert self_metric(page.decode(), 'k8s_exporter_input_series') == 0


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
], ids=['missing-file', 'blank-lines'])
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


# Rotation: a Kubernetes Secret volume holds `..data -> ..TIMESTAMP/` and
# one symlink per key, `token -> ..data/token`; an update writes a new
# timestamped directory and swaps ..data with one rename.

def secret_volume(directory, files):
    """Make or update a Secret-like volume in directory; return it."""
    directory.mkdir(exist_ok=True)
    version = directory / f'..{time.monotonic_ns()}'
    version.mkdir()
    for name, text in files.items():
        (version / name).write_text(text)
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(Path('..data') / name)
    swap = directory / '..data_tmp'
    swap.symlink_to(version.name)
    os.replace(swap, directory / '..data')
    return directory


def wait_for_credentials(url, authorization, status, what):
    """Poll a write with authorization until it answers status (the files are polled)."""
    wait_until(lambda: write(url, seed_table(), headers={'Authorization': authorization})[0]
               == status, timeout=k8s_exporter.CREDENTIALS_POLL_SECONDS + 5, what=what)


def test_a_rotated_secret_is_in_force_within_the_poll_and_the_store_is_kept(tmp_path):
    secrets = secret_volume(tmp_path / 'secrets', {'token': 'old-token\n'})
    with Gunicorn(env={'K8S_EXPORTER_WRITE_BEARER_TOKEN_FILE': str(secrets / 'token')}) as server:
        worker = server.pid
        assert write(server.url, seed_table(), headers={'Authorization': 'Bearer old-token'})[
            0] == 204
        # An overlap first (a token a line), as a rotation without lost writes does it.
        secret_volume(secrets, {'token': 'old-token\nnew-token\n'})
        wait_for_credentials(server.url, 'Bearer new-token', 204, 'the added token')
        assert write(server.url, seed_table(), headers={'Authorization': 'Bearer old-token'})[
            0] == 204
        secret_volume(secrets, {'token': 'new-token\n'})
        wait_for_credentials(server.url, 'Bearer old-token', 401, 'the old token to go')
        assert pod_families(scrape_url(server.url)[1]) == SEED_EXPOSITION
        assert process_children(server.process.pid) == [worker]
    assert server.log.count('K8S_EXPORTER_WRITE_* files changed: the new credentials are in '
                            'force') == 2, server.log


@pytest.mark.parametrize('bad_files, problem', [
    ({'token': '\n'}, "K8S_EXPORTER_WRITE_BEARER_TOKEN_FILE='{path}': file is empty"),
    ({}, "K8S_EXPORTER_WRITE_BEARER_TOKEN_FILE='{path}': cannot read: No such file or "
         "directory"),
], ids=['empty', 'gone'])
def test_a_bad_new_secret_keeps_the_credentials_in_force_and_is_logged_once(
        tmp_path, bad_files, problem):
    secrets = secret_volume(tmp_path / 'secrets', {'token': 'the-token\n'})
    path = secrets / 'token'
    with Gunicorn(env={'K8S_EXPORTER_WRITE_BEARER_TOKEN_FILE': str(path)}) as server:
        secret_volume(secrets, bad_files)
        stop_at = time.monotonic() + 2.5 * k8s_exporter.CREDENTIALS_POLL_SECONDS
        while time.monotonic() < stop_at:
            assert write(server.url, seed_table(),
                         headers={'Authorization': 'Bearer the-token'})[0] == 204
            time.sleep(0.5)
        secret_volume(secrets, {'token': 'next-token\n'})
        wait_for_credentials(server.url, 'Bearer next-token', 204, 'the good file after')
    warnings = [line for line in server.log.splitlines() if 'stay in force' in line]
    assert len(warnings) == 1, server.log
    assert warnings[0].endswith(f'k8s_exporter: {problem.format(path=path)}; the credentials '
                                'read before stay in force')


def test_credential_files_are_read_again_only_once_a_poll(tmp_path, monkeypatch):
    (tmp_path / 'token').write_text('first\n')
    config = Config.from_environ({'K8S_EXPORTER_WRITE_BEARER_TOKEN_FILE': str(tmp_path / 'token')})
    files = k8s_exporter.CredentialFiles(dict(config.credential_files), 'K8S_EXPORTER_WRITE',
                                         config.write_auth)
    started = time.monotonic()
    (tmp_path / 'token').write_text('second\n')
    assert files.current(started).bearer_tokens == (b'first',)
    poll = k8s_exporter.CREDENTIALS_POLL_SECONDS
    assert files.current(started + poll + 1).bearer_tokens == (b'second',)
    (tmp_path / 'token').write_text('third\n')
    assert files.current(started + poll + 2).bearer_tokens == (b'second',)
    assert files.current(started + 2 * poll + 2).bearer_tokens == (b'third',)


###############################################################################
# Configuration ###############################################################
###############################################################################

def test_config_defaults_are_the_documented_ones():
    config = Config.from_environ({})
    assert config == Config(cluster='k8s-cluster', ttl_seconds=300.0,
                            max_body_bytes=10 * 1024 * 1024, max_decoded_bytes=64 * 1024 * 1024,
                            max_series=1_000_000, metrics=EXPORTED_METRICS,
                            max_label_name_bytes=256, max_label_value_bytes=2048,
                            max_labels_per_series=128, listen='0.0.0.0:9201')


def test_config_reads_every_variable():
    config = Config.from_environ({
        'K8S_EXPORTER_CLUSTER': 'prod-eu', 'K8S_EXPORTER_TTL_SECONDS': '2.5',
        'K8S_EXPORTER_MAX_BODY_BYTES': '1000', 'K8S_EXPORTER_MAX_DECODED_BYTES': '2000',
        'K8S_EXPORTER_MAX_SERIES': '30', 'K8S_EXPORTER_LISTEN': '127.0.0.1:9300',
        'K8S_EXPORTER_MAX_LABEL_NAME_BYTES': '100', 'K8S_EXPORTER_MAX_LABEL_VALUE_BYTES': '200',
        'K8S_EXPORTER_MAX_LABELS_PER_SERIES': '20',
        'K8S_EXPORTER_METRICS': 'container_memory_rss, container_memory_usage_bytes,'})
    assert config == Config(cluster='prod-eu', ttl_seconds=2.5, max_body_bytes=1000,
                            max_decoded_bytes=2000, max_series=30, listen='127.0.0.1:9300',
                            max_label_name_bytes=100, max_label_value_bytes=200,
                            max_labels_per_series=20,
                            metrics=('container_memory_rss', 'container_memory_usage_bytes'))


@pytest.mark.parametrize('name, value, message', [
    ('K8S_EXPORTER_TTL_SECONDS', 'abc', "K8S_EXPORTER_TTL_SECONDS='abc': not a number"),
    ('K8S_EXPORTER_TTL_SECONDS', '0', "K8S_EXPORTER_TTL_SECONDS='0': must be from 1 to 604800"),
    ('K8S_EXPORTER_TTL_SECONDS', '1e-9', "K8S_EXPORTER_TTL_SECONDS='1e-9': must be from 1 to "
                                         "604800"),
    ('K8S_EXPORTER_TTL_SECONDS', 'nan', "K8S_EXPORTER_TTL_SECONDS='nan': must be from 1 to "
                                        "604800"),
    ('K8S_EXPORTER_TTL_SECONDS', '1e9', "K8S_EXPORTER_TTL_SECONDS='1e9': must be from 1 to "
                                        "604800"),
    ('K8S_EXPORTER_MAX_BODY_BYTES', '1.5', "K8S_EXPORTER_MAX_BODY_BYTES='1.5': not an integer"),
    ('K8S_EXPORTER_MAX_BODY_BYTES', '99', "K8S_EXPORTER_MAX_BODY_BYTES='99': must be from 100 "
                                          "to 1073741824"),
    ('K8S_EXPORTER_MAX_DECODED_BYTES', str(2 ** 32), "K8S_EXPORTER_MAX_DECODED_BYTES="
                                                     "'4294967296': must be from 100 to "
                                                     "4294967295"),
    ('K8S_EXPORTER_MAX_SERIES', '-1', "K8S_EXPORTER_MAX_SERIES='-1': must be from 1 to "
                                      "1000000000"),
    ('K8S_EXPORTER_MAX_LABEL_NAME_BYTES', '15', "K8S_EXPORTER_MAX_LABEL_NAME_BYTES='15': "
                                                 "must be from 16 to 65536"),
    ('K8S_EXPORTER_MAX_LABEL_VALUE_BYTES', '2k', "K8S_EXPORTER_MAX_LABEL_VALUE_BYTES='2k': "
                                                  "not an integer"),
    ('K8S_EXPORTER_MAX_LABELS_PER_SERIES', '7', "K8S_EXPORTER_MAX_LABELS_PER_SERIES='7': "
                                                 "must be from 8 to 10000"),
    ('K8S_EXPORTER_MAX_CONCURRENT_DECODES', '0', "K8S_EXPORTER_MAX_CONCURRENT_DECODES='0': "
                                                 "must be from 1 to 64"),
    ('K8S_EXPORTER_CLUSTER', ' ', 'K8S_EXPORTER_CLUSTER is set but empty'),
    ('K8S_EXPORTER_METRICS', 'container memory', "K8S_EXPORTER_METRICS: 'container memory' is "
                                                 "not a valid metric name"),
    ('K8S_EXPORTER_METRICS', ',', "K8S_EXPORTER_METRICS=',': names no metric"),
    ('K8S_EXPORTER_LISTEN', '9201', "K8S_EXPORTER_LISTEN='9201': expected HOST:PORT"),
    ('K8S_EXPORTER_TTL_SECONDS', 'inf', "K8S_EXPORTER_TTL_SECONDS='inf': must be from 1 to "
                                        "604800"),
    ('K8S_EXPORTER_LISTEN', '127.0.0.1:65536',
     "K8S_EXPORTER_LISTEN='127.0.0.1:65536': expected HOST:PORT"),
], ids=['ttl-not-a-number', 'ttl-zero', 'ttl-tiny', 'ttl-nan', 'ttl-too-long',
        'max-body-not-an-integer', 'max-body-too-small', 'max-decoded-too-large',
        'max-series-negative', 'max-label-name-too-small', 'max-label-value-not-an-integer',
        'max-labels-too-few', 'max-decodes-zero', 'cluster-blank', 'metrics-bad-name',
        'metrics-none', 'listen-without-host', 'ttl-inf', 'listen-port-too-large'])
def test_config_rejects_a_bad_value_naming_the_variable(name, value, message):
    with pytest.raises(ConfigError) as raised:
        Config.from_environ({name: value})
    assert str(raised.value) == message


def test_metrics_variable_is_read_as_a_sorted_set_of_names():
    config = Config.from_environ({'K8S_EXPORTER_METRICS': ' container_b , container_a,container_b'})
    assert config.metrics == ('container_a', 'container_b')


def test_metrics_variable_replaces_the_five_and_unknown_names_get_a_generic_help():
    app = fresh_app(metrics=('container_memory_swap', 'container_memory_usage_bytes'))
    table = [(cadvisor('container_memory_swap', 'ns', 'p'), [(7, 1)]),
             (cadvisor('container_memory_usage_bytes', 'ns', 'p'), [(8, 1)]),
             (cadvisor('container_fs_usage_bytes', 'ns', 'p', 'c', '/x/pod1/c'), [(9, 1)])]
    assert call_wsgi(app, 'POST', '/write', rw1_body(table))[0] == 204
    assert pod_families(scrape(app)) == (
        '# HELP container_memory_swap cAdvisor container_memory_swap, one value per pod\n'
        '# TYPE container_memory_swap gauge\n'
        'container_memory_swap{cluster="k8s-cluster",item="container_memory_swap",'
        'job="kubernetes-cadvisor",namespace="ns",pod="p"} 7\n'
        '# HELP container_memory_usage_bytes The current memory usage of the container '
        '(unit: bytes)\n'
        '# TYPE container_memory_usage_bytes gauge\n'
        'container_memory_usage_bytes{cluster="k8s-cluster",item="container_memory_usage_bytes",'
        'job="kubernetes-cadvisor",namespace="ns",pod="p"} 8\n')


def test_unknown_variables_and_metric_names_get_one_warning_line_each():
    environ = {'K8S_EXPORTER_TTL_SECOND': '60', 'K8S_EXPORTER_CLUSTER': 'c',
               'TEST_K8S_EXPORTER_SOAK_SECONDS': '8', 'OTHER': 'x',
               'K8S_EXPORTER_METRICS': 'container_memory_usage_bytes,container_memory_usage_byte,'
                                       'container_memory_swap,container_memory_rss'}
    config = Config.from_environ(environ)
    assert k8s_exporter.configuration_warnings(environ, config) == [
        'K8S_EXPORTER_TTL_SECOND is not a k8s_exporter variable; ignored',
        "K8S_EXPORTER_METRICS: 'container_memory_swap' is not in the table of metrics; it is "
        'exported as a gauge with a generic HELP, by the rule its name suggests',
        "K8S_EXPORTER_METRICS: 'container_memory_usage_byte' is not a cAdvisor metric; it is "
        'exported only if a sender writes it']
    assert k8s_exporter.configuration_warnings({}, Config()) == []


def test_the_tests_and_tools_set_no_variable_the_exporter_would_warn_about():
    for name in ('test_k8s_exporter.py', 'bench_k8s_exporter.py', 'demo_k8s_exporter.py',
                 'Makefile', 'gunicorn.conf.py'):
        text = (HERE / name).read_text()
        used = set(re.findall(r'(?<![A-Z_])K8S_EXPORTER_[A-Z_]*[A-Z]', text))
        # The typo the warning tests use on purpose, and the prefix of the
        # write credentials' variables, which their log line names.
        used -= {'K8S_EXPORTER_TTL_SECOND', 'K8S_EXPORTER_WRITE'}
        assert used <= set(k8s_exporter.ENVIRONMENT_VARIABLES), (name, sorted(used))


def test_gunicorn_logs_each_warning_once_with_time_and_level():
    with Gunicorn(env={'K8S_EXPORTER_TTL_SECOND': '60'}) as running:
        assert running.metrics()
    lines = [line for line in running.log.splitlines() if 'TTL_SECOND' in line]
    assert len(lines) == 1, lines
    assert re.fullmatch(r'\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\] \[WARNING\] '
                        r'k8s_exporter: K8S_EXPORTER_TTL_SECOND is not a k8s_exporter '
                        r'variable; ignored', lines[0]), lines[0]


# One worker, whatever the command line: each worker would hold a part of
# the pods, and /metrics would show whichever part answered.

def gunicorn_refusal(args, cwd=HERE, env=None):
    """(exit code, output) of a gunicorn that must refuse to start."""
    result = subprocess.run([sys.executable, '-m', 'gunicorn', '-b', f'127.0.0.1:{free_port()}',
                             *args, 'k8s_exporter:app'], cwd=cwd,
                            env={**os.environ, **(env or {})}, capture_output=True, text=True,
                            timeout=60)
    return result.returncode, result.stdout + result.stderr


SPLIT_STORE = ("k8s_exporter: gunicorn is set to start {0} workers; k8s_exporter's store lives "
               "in its one worker, so each would hold part of the pods: run one (-w 1) and "
               "shard by cluster instead (see README, Operations)")


@pytest.mark.parametrize('args, env, workers', [
    (['-w', '4'], {}, 4),
    ([], {'GUNICORN_CMD_ARGS': '--workers=3'}, 3),
], ids=['dash_w_4', 'gunicorn_cmd_args'])
def test_more_than_one_worker_stops_start_up_with_one_line(args, env, workers):
    code, output = gunicorn_refusal(args, env=env)
    assert code == k8s_exporter.EXIT_CONFIG_ERROR, output
    assert [line for line in output.splitlines() if 'k8s_exporter' in line] == [
        SPLIT_STORE.format(workers)], output
    assert 'Booting worker' not in output


def test_another_config_file_with_workers_is_refused_by_the_worker_class_itself(tmp_path):
    (tmp_path / 'mine.conf.py').write_text(
        "worker_class = 'k8s_exporter.ExporterWorker'\nworkers = 2\n")
    code, output = gunicorn_refusal(['-c', str(tmp_path / 'mine.conf.py')])
    assert code == k8s_exporter.EXIT_CONFIG_ERROR, output
    assert [line for line in output.splitlines() if line.startswith('k8s_exporter')] == [
        SPLIT_STORE.format(2)], output
    assert 'Booting worker' not in output


@pytest.mark.parametrize('where', ['another_folder', 'another_config_file'])
def test_started_without_its_settings_it_refuses_saying_how_to_start(tmp_path, where):
    if where == 'another_folder':
        args, cwd = [], tmp_path
    else:
        (tmp_path / 'other.conf.py').write_text('threads = 4\n')
        args, cwd = ['-c', str(tmp_path / 'other.conf.py')], HERE
    code, output = gunicorn_refusal(args, cwd=cwd, env={'PYTHONPATH': str(HERE)})
    assert code == k8s_exporter.EXIT_CONFIG_ERROR, output
    assert [line for line in output.splitlines() if line.startswith('k8s_exporter:')] == [
        "k8s_exporter: gunicorn was started without k8s_exporter's gunicorn.conf.py (or with "
        f"--preload), so with none of its settings: start it as gunicorn -c {HERE}/"
        f"gunicorn.conf.py k8s_exporter:app, or python3 {HERE}/k8s_exporter.py"], output


def test_another_worker_class_is_refused_with_one_line():
    code, output = gunicorn_refusal(['-k', 'sync', '--threads', '1'])
    assert code == k8s_exporter.EXIT_CONFIG_ERROR, output
    assert [line for line in output.splitlines() if 'k8s_exporter' in line] == [
        "k8s_exporter: gunicorn's worker class is 'sync'; k8s_exporter needs "
        "'k8s_exporter.ExporterWorker', as its gunicorn.conf.py says, which reads requests "
        "whole before a thread takes them"], output


@pytest.mark.parametrize('sig, line', [
    (signal.SIGTTIN, 'k8s_exporter: asked for 2 workers (kill -TTIN?); staying at one, whose '
                     'store holds every pod'),
    (signal.SIGHUP, 'k8s_exporter: SIGHUP ignored: reloading would restart the worker and '
                    'empty the store; credential files are re-read by themselves, other '
                    'settings need a restart'),
], ids=['ttin', 'hup'])
def test_a_signal_to_the_master_leaves_the_one_worker_and_its_store(sig, line):
    with Gunicorn() as server:
        worker = server.pid
        assert write(server.url, seed_table())[0] == 204
        os.kill(server.process.pid, sig)
        wait_until(lambda: line in server.log_text(), timeout=10, what='the log line')
        time.sleep(2)      # what gunicorn would do next (spawn, restart) has had its time
        assert process_children(server.process.pid) == [worker]
        assert pod_families(scrape_url(server.url)[1]) == SEED_EXPOSITION
    assert server.log.count(line) == 1, server.log
    assert 'Booting worker' not in server.log.split(line)[1]


def test_sighup_to_the_whole_process_group_leaves_the_worker_too():
    with Gunicorn() as server:
        worker = server.pid
        assert write(server.url, seed_table())[0] == 204
        os.killpg(os.getpgid(server.process.pid), signal.SIGHUP)
        wait_until(lambda: 'SIGHUP ignored' in server.log_text(), timeout=10, what='the log')
        time.sleep(2)
        assert process_children(server.process.pid) == [worker]
        assert pod_families(scrape_url(server.url)[1]) == SEED_EXPOSITION


###############################################################################
# Pages: the status page, /pods, and how one pod's value was made #############
###############################################################################

# Label values that break a page written without escaping: a script that
# would retitle the page, and quotes and an ampersand that would end an
# attribute early.
INJECTED_POD = '<script>document.title="INJECTED"</script>'
INJECTED_NAMESPACE = 'ns" onclick="x&y\''


def page(app, path, status=200, **headers):
    """The text of an HTML page of the app, checked to be one."""
    code, response_headers, body = call_wsgi(app, 'GET', path, headers=headers)
    assert code == status, (code, body[:300])
    assert response_headers['Content-Type'] == 'text/html; charset=utf-8'
    assert response_headers['Content-Security-Policy'] == (
        "default-src 'none'; style-src 'unsafe-inline'")
    text = body.decode()
    assert f'<span class="version">k8s_exporter {k8s_exporter.__version__}</span>' in text
    return text


def table_rows(text):
    """The cells' text of every table row with cells, as a reader sees it."""
    return [[html.unescape(re.sub(r'<[^>]*>', '', cell_html)) for cell_html in re.findall(
                r'<td[^>]*>(.*?)</td>', row)]
            for row in re.findall(r'<tr[^>]*>(.*?)</tr>', text) if '<td' in row]


def pod_rows(text):
    """(cluster, job, namespace, pod) of each row of a /pods page."""
    return [tuple(cells[:4]) for cells in table_rows(text)]


def test_status_page_shows_version_store_and_the_configuration_in_force():
    app = fresh_app(max_series=100, cluster='east')
    post(app, seed_table())
    text = page(app, '/')
    assert '<title>Status - k8s_exporter</title>' in text
    rows = table_rows(text)
    assert ['pods', '5'] in rows and ['input series', '25'] in rows
    assert ['series limit (K8S_EXPORTER_MAX_SERIES)', '25 of 100 held (25.0%)'] in rows
    assert ['K8S_EXPORTER_CLUSTER', 'east'] in rows
    assert ['write authentication', 'off'] in rows
    assert any(row[0] == 'resident memory' and row[1].endswith(' MiB') for row in rows)
    assert '<a href="metrics">/metrics</a>' in text and '<a href="pods">' in text
    assert '<a href="-/healthy">/-/healthy</a>' in text


def test_status_page_says_whether_authentication_is_on_never_the_secret(secured_app):
    text = page(secured_app, '/', Authorization='Bearer s3cret-read')
    rows = table_rows(text)
    assert ['write authentication', 'on'] in rows
    assert ['/metrics and pages authentication', 'on'] in rows
    assert 's3cret' not in text and 'pw1' not in text


def test_status_page_has_a_row_per_sender_with_pods_series_rate_and_last_write():
    app = fresh_app()
    post(app, seed_table(job='a'))                       # 25 kept samples of 5 pods
    post(app, [(cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD, job='b', cluster='west'),
                [(1.0, 1000), (2.0, 2000), (3.0, 3000)])])
    rows = [row for row in table_rows(page(app, '/')) if len(row) == 6]
    # Exported samples per second: those of the last minute over 60 s.
    assert [row[:5] for row in rows] == [['k8s-cluster', 'a', '5', '25', '0.4'],
                                         ['west', 'b', '1', '1', '0.1']]
    assert all(re.fullmatch(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ \(\d+ s ago\)', row[5])
               for row in rows), rows


def test_status_page_sender_rows_follow_ended_revived_and_expired_series():
    app = fresh_app(ttl_seconds=10)
    post(app, seed_table(job='a'))                        # 5 pods, 25 series
    post(app, [(cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD, job='b'), [(1.0, 1000)]),
               (cadvisor(MEMORY, 'ns', 'q', cgroup=POD_UID_OLD, job='b'), [(1.0, 1000)])])

    def sender_rows():
        return [row[1:4] for row in table_rows(page(app, '/')) if len(row) == 6]

    assert sender_rows() == [['a', '5', '25'], ['b', '2', '2']]
    post(app, [(cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD, job='b'), [(STALE_NAN, 2000)])])
    assert sender_rows() == [['a', '5', '25'], ['b', '1', '1']]      # ended: held, not live
    post(app, [(cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD, job='b'), [(2.0, 3000)])])
    assert sender_rows() == [['a', '5', '25'], ['b', '2', '2']]      # a newer sample revives it
    app.store.expire(now=time.monotonic() + 11)
    # Every pod gone; the senders stay listed by their last write.
    assert sender_rows() == [['a', '0', '0'], ['b', '0', '0']]
    assert ['pods', '0'] in table_rows(page(app, '/'))


def test_status_page_counts_what_no_sender_row_can_hold_in_total():
    app = fresh_app()
    post(app, seed_table())
    text = page(app, '/')
    assert ('All senders: 27 samples received of every metric; not kept: future_timestamp 0, '
            'invalid_series 0, label_limit 0, no_pod 1, out_of_order 0, series_limit 0, '
            'unexported_metric 1;') in text


def test_status_page_lists_the_last_20_refused_writes_newest_first():
    app = fresh_app()
    for number in range(22):
        assert call_wsgi(app, 'POST', '/write', b'x',
                         {'Content-Type': f'text/x-{number}'})[0] == 415
    assert post(app, [({'__name__': MEMORY, 'pod': 'p'}, [(1, 1)])])[0] == 204
    rows = [row for row in table_rows(page(app, '/')) if len(row) == 4]
    assert len(rows) == 20
    assert [row[2:] for row in rows[:2]] == [
        ['', "unsupported Content-Type 'text/x-21'; expected application/x-protobuf"],
        ['', "unsupported Content-Type 'text/x-20'; expected application/x-protobuf"]]
    assert rows[-1][3].startswith("unsupported Content-Type 'text/x-2'")
    assert {row[1] for row in rows} == {'415'}


def test_status_page_lists_a_401_and_a_400_with_its_reason(secured_app):
    call_wsgi(secured_app, 'POST', '/write', rw1_body(seed_table()))
    post(secured_app, [({'job': 'j'}, [(1, 1)])], Authorization='Bearer s3cret-write')
    rows = [row for row in table_rows(page(secured_app, '/', Authorization='Bearer s3cret-read'))
            if len(row) == 4]
    assert [row[1:] for row in rows] == [
        ['400', '', '1 invalid series skipped, first: series with no __name__ label; '
                    'the rest was applied'],
        ['401', '', 'missing or wrong credentials']]


def test_pods_page_lists_every_pod_in_output_order_with_its_values():
    app = fresh_app()
    post(app, seed_table(job='b'))
    post(app, seed_table(job='a')[:3])
    text = page(app, '/pods')
    assert pod_rows(text) == [('k8s-cluster', 'a', 'default', SEED_PODS[0][1])] + [
        ('k8s-cluster', 'b', namespace, pod) for namespace, pod, *_ in SEED_PODS]
    assert table_rows(text)[-1][4:] == ['0', '4.2090070016e+10', '1.28868352e+08',
                                        '5.771784192e+09', '266240']
    assert table_rows(text)[0][4:] == ['0', '-', '-', '4.38272e+06', '229376']
    assert ('<a href="pod?namespace=monitoring&amp;pod=prometheus-69757bb88f-w98vk">'
            'prometheus-69757bb88f-w98vk</a>') in text
    assert '<p>6 pods held, 6 match; 1 to 6 shown.</p>' in text


@pytest.mark.parametrize('query, pods', [
    ('namespace=monitor', ['prometheus-69757bb88f-w98vk']),
    ('pod=nginx', ['nginx-deployment-585449566-lnknq', 'nginx-deployment-585449566-m8mws',
                   'nginx-deployment-585449566-n7ltf']),
    ('namespace=default&pod=task', ['task-pv-pod']),
    ('namespace=default&pod=prometheus', []),
    ('namespace=&pod=', [pod for _, pod, *_ in SEED_PODS]),
], ids=['namespace', 'pod', 'both', 'no-match', 'empty'])
def test_pods_page_filters_by_namespace_and_pod_substring(query, pods):
    app = fresh_app()
    post(app, seed_table())
    assert [row[3] for row in pod_rows(page(app, '/pods?' + query))] == pods


def many_pods_table(count, namespace='ns'):
    return [(cadvisor(MEMORY, namespace, f'pod-{number:05d}', cgroup=POD_UID_OLD), [(number, 1)])
            for number in range(count)]


def test_pods_page_shows_500_rows_a_page_with_links_to_the_others():
    app = fresh_app()
    post(app, many_pods_table(1201))
    first = page(app, '/pods')
    assert [row[3] for row in pod_rows(first)] == [f'pod-{n:05d}' for n in range(500)]
    assert ('<p>page 1 of 3: <span class="muted">first</span> <span class="muted">previous'
            '</span> <a href="pods?page=2">next</a> <a href="pods?page=3">last</a></p>') in first
    second = page(app, '/pods?page=2')
    assert [row[3] for row in pod_rows(second)] == [f'pod-{n:05d}' for n in range(500, 1000)]
    assert '<a href="pods">first</a> <a href="pods">previous</a>' in second
    assert [row[3] for row in pod_rows(page(app, '/pods?page=3'))] == [
        f'pod-{n:05d}' for n in range(1000, 1201)]
    # Past the end: the last page.
    assert '<p>page 3 of 3:' in page(app, '/pods?page=9')


def test_pods_page_filters_and_pages_across_namespaces_counting_each_pod_once():
    app = fresh_app()
    for namespace in ('a', 'b', 'c'):
        post(app, [(cadvisor(MEMORY, namespace, name, cgroup=POD_UID_OLD), [(1, 1)])
                   for number in range(300) for name in (f'x-x-{number:03d}', f'y{number:03d}')])
    first = page(app, '/pods?pod=x-')                    # two matches in every name
    assert '<p>1,800 pods held, 900 match; 1 to 500 shown.</p>' in first
    assert pod_rows(first)[299:301] == [('k8s-cluster', 'kubernetes-cadvisor', 'a', 'x-x-299'),
                                        ('k8s-cluster', 'kubernetes-cadvisor', 'b', 'x-x-000')]
    second = page(app, '/pods?pod=x-&page=7')            # past the end: the last page
    assert [row[2:] for row in pod_rows(second)] == (
        [('b', f'x-x-{number:03d}') for number in range(200, 300)]
        + [('c', f'x-x-{number:03d}') for number in range(300)])
    assert '<p>page 2 of 2:' in second
    assert len(pod_rows(page(app, '/pods?namespace=b&pod=x-x-1'))) == 100
    # A pod added after a view is found by the next one; the other
    # namespaces' names are kept from the view before.
    post(app, [(cadvisor(MEMORY, 'b', 'x-x-new', cgroup=POD_UID_OLD), [(1, 1)])])
    assert [row[2:] for row in pod_rows(page(app, '/pods?pod=new'))] == [('b', 'x-x-new')]
    assert '901 match' in page(app, '/pods?pod=x-')


def test_pods_page_links_keep_the_filter():
    app = fresh_app()
    post(app, many_pods_table(600, namespace='a b&c'))
    text = page(app, '/pods?namespace=a%20b%26c&pod=pod-')
    assert '<a href="pods?namespace=a%20b%26c&amp;pod=pod-&amp;page=2">next</a>' in text
    assert '<input name="namespace" value="a b&amp;c">' in text


@pytest.mark.parametrize('number', ['0', '-1', 'two', '1.5', ''])
def test_pods_page_number_must_be_a_positive_integer(number):
    status, headers, body = call_wsgi(fresh_app(), 'GET', f'/pods?page={number}')
    assert one_line_reason(status, headers, body) == (
        f'page must be a positive integer, not {number!r}')
    assert headers['X-Content-Type-Options'] == 'nosniff'


def explained(text):
    """{h3 heading: [(kind, container, id, device, value, counted)]} of a /pod page."""
    sections = {}
    for heading, table in re.findall(r'<h3>(.*?)</h3>.*?<table>(.*?)</table>', text, re.S):
        sections[heading] = [(kind, container, cgroup, device, value, counted)
                             for kind, container, cgroup, _, device, value, _, _, counted
                             in table_rows(table)]
    return sections


def test_pod_page_shows_per_metric_the_value_the_rule_and_why_each_series_counts_or_not():
    app = fresh_app()
    pod_cgroup = POD_UID_OLD
    post(app, [(cadvisor(MEMORY, 'ns', 'p', cgroup=pod_cgroup), [(7000, 1000)]),
               (cadvisor(MEMORY, 'ns', 'p', 'app', f'{pod_cgroup}/c1'), [(5000, 1000)]),
               (cadvisor(MEMORY, 'ns', 'p', '', f'{pod_cgroup}/pause'), [(500, 1000)]),
               (cadvisor(FS_USAGE, 'ns', 'p', 'app', f'{pod_cgroup}/c1', device='/dev/a'),
                [(300, 1000)]),
               (cadvisor(FS_USAGE, 'ns', 'p', 'log', f'{pod_cgroup}/l1', device='/dev/a'),
                [(40, 1000)])])
    # app restarts as c2; log ends at its stale marker.
    post(app, [(cadvisor(FS_USAGE, 'ns', 'p', 'app', f'{pod_cgroup}/c2', device='/dev/a'),
                [(20, 2000)]),
               (cadvisor(FS_USAGE, 'ns', 'p', 'log', f'{pod_cgroup}/l1', device='/dev/a'),
                [(STALE_NAN, 2000)])])
    text = page(app, '/pod?namespace=ns&pod=p')
    assert '<title>Pod ns/p - k8s_exporter</title>' in text
    assert '<h2>cluster k8s-cluster, job kubernetes-cadvisor</h2>' in text
    assert explained(text) == {
        f'{FS_USAGE} = 20': [
            ('container', 'app', f'{pod_cgroup}/c2', '/dev/a', '20', 'counted'),
            ('container', 'app', f'{pod_cgroup}/c1', '/dev/a', '300',
             'no: replaced by a newer series of the same container'),
            ('container', 'log', f'{pod_cgroup}/l1', '/dev/a', '40', 'no: ended by a stale marker'),
        ],
        f'{MEMORY} = 7000': [
            ('pod cgroup', '', pod_cgroup, '', '7000', 'counted'),
            ('pause container', '', f'{pod_cgroup}/pause', '', '500', 'no: pod cgroup preferred'),
            ('container', 'app', f'{pod_cgroup}/c1', '', '5000', 'no: pod cgroup preferred'),
        ],
    }
    assert ('<p class="muted">rule: the pod cgroup series if there is one, else the sum of the '
            'containers</p>') in text
    assert '<td>1970-01-01 00:00:02Z</td>' in text


def test_pod_page_without_a_pod_cgroup_counts_the_sum_pause_included():
    app = fresh_app(metrics=(MEMORY,))
    post(app, [(cadvisor(MEMORY, 'ns', 'p', 'app', f'{POD_UID_OLD}/c1'), [(5000, 1000)]),
               (cadvisor(MEMORY, 'ns', 'p', 'POD', f'{POD_UID_OLD}/pause'), [(500, 1000)])])
    assert explained(page(app, '/pod?namespace=ns&pod=p')) == {f'{MEMORY} = 5500': [
        ('pause container', 'POD', f'{POD_UID_OLD}/pause', '', '500', 'counted'),
        ('container', 'app', f'{POD_UID_OLD}/c1', '', '5000', 'counted')]}


def test_pod_page_counts_each_fs_device_once_at_its_largest_limit():
    limit = 'container_fs_limit_bytes'
    app = fresh_app(metrics=(limit,))
    post(app, [(cadvisor(limit, 'ns', 'p', 'app', f'{POD_UID_OLD}/c1', device='/dev/a'),
                [(100, 1000)]),
               (cadvisor(limit, 'ns', 'p', 'log', f'{POD_UID_OLD}/l1', device='/dev/a'),
                [(90, 1000)]),
               (cadvisor(limit, 'ns', 'p', 'app', f'{POD_UID_OLD}/c1', device='/dev/b'),
                [(7, 1000)])])
    assert explained(page(app, '/pod?namespace=ns&pod=p')) == {f'{limit} = 107': [
        ('container', 'app', f'{POD_UID_OLD}/c1', '/dev/a', '100', 'counted'),
        ('container', 'app', f'{POD_UID_OLD}/c1', '/dev/b', '7', 'counted'),
        ('container', 'log', f'{POD_UID_OLD}/l1', '/dev/a', '90',
         'no: its device counts once, at the largest limit reported for it')]}


def test_pod_page_explains_a_counter_across_a_restart_the_sandbox_network_and_the_pod_limit():
    cpu, network = 'container_cpu_usage_seconds_total', 'container_network_receive_bytes_total'
    limit = 'container_spec_memory_limit_bytes'
    app = fresh_app(metrics=(cpu, network, limit))
    c1, c2, pause = f'{POD_UID_OLD}/c1', f'{POD_UID_OLD}/c2', f'{POD_UID_OLD}/pause'
    post(app, [(cadvisor(cpu, 'ns', 'p', 'app', c1, cpu='total'), [(10, 1000)]),
               (cadvisor(network, 'ns', 'p', 'POD', pause, interface='eth0'), [(500, 1000)]),
               (cadvisor(network, 'ns', 'p', 'app', c1, interface='eth0'), [(500, 1000)]),
               (cadvisor(limit, 'ns', 'p', cgroup=POD_UID_OLD), [(2**30, 1000)]),
               (cadvisor(limit, 'ns', 'p', 'app', c1), [(2**29, 1000)])])
    post(app, [(cadvisor(cpu, 'ns', 'p', 'app', c2, cpu='total'), [(3, 2000)])])
    text = page(app, '/pod?namespace=ns&pod=p')
    assert explained(text) == {
        f'{cpu} = 13': [
            ('container', 'app', c1, 'total', '10',
             'counted: an earlier run of the container; a counter keeps its last value'),
            ('container', 'app', c2, 'total', '3', 'counted')],
        f'{network} = 500': [
            ('pause container', 'POD', pause, 'eth0', '500', 'counted'),
            ('container', 'app', c1, 'eth0', '500', "no: the network is the sandbox's")],
        f'{limit} = 1.073741824e+09': [
            ('pod cgroup', '', POD_UID_OLD, '', '1.073741824e+09', 'counted'),
            ('container', 'app', c1, '', '5.36870912e+08', 'no: pod cgroup preferred')],
    }
    assert k8s_exporter.COUNTER_TEXT in html.unescape(text)


def test_pod_page_shows_a_re_created_pod_and_every_job_holding_it():
    app = fresh_app(metrics=(MEMORY,))
    post(app, [(cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD), [(7000, 1000)]),
               (cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_NEW), [(1200, 2000)]),
               (cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_NEW, job='other'), [(9, 2000)]),
               (cadvisor(MEMORY, 'ns', 'q', cgroup=POD_UID_NEW), [(1, 2000)])])
    text = page(app, '/pod?namespace=ns&pod=p')
    assert re.findall(r'<h2>(.*?)</h2>', text) == ['cluster k8s-cluster, job kubernetes-cadvisor',
                                                   'cluster k8s-cluster, job other']
    assert list(explained(text)) == [f'{MEMORY} = 1200', f'{MEMORY} = 9']
    assert explained(text)[f'{MEMORY} = 1200'][1] == (
        'pod cgroup', '', POD_UID_OLD, '', '7000',
        'no: replaced by a newer pod cgroup (the pod was re-created)')


@pytest.mark.parametrize('query, status, reason', [
    ('namespace=ns&pod=nope', 404, "no pod ns/nope is held; see /pods"),
    ('namespace=n&pod=p', 404, "no pod n/p is held; see /pods"),
    ('namespace=ns', 400, 'namespace and pod are both required, as in /pod?namespace=NS&pod=P'),
    ('', 400, 'namespace and pod are both required, as in /pod?namespace=NS&pod=P'),
], ids=['unknown-pod', 'namespace-is-exact', 'no-pod', 'nothing'])
def test_pod_page_of_an_unknown_pod_is_404_and_without_a_name_400(query, status, reason):
    app = fresh_app()
    post(app, [(cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD), [(7000, 1000)])])
    code, headers, body = call_wsgi(app, 'GET', '/pod?' + query)
    assert (code, one_line_reason(code, headers, body)) == (status, reason)


def test_pod_page_shows_any_timestamp_a_sender_can_write():
    app = fresh_app(metrics=(MEMORY,))
    # Samples far ahead of the clock are refused; any time before it is kept.
    post(app, [(cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD), [(1, -2**63)]),
               (cadvisor(MEMORY, 'ns', 'p', 'b', f'{POD_UID_OLD}/b'), [(3, -5000)])])
    rows = table_rows(page(app, '/pod?namespace=ns&pod=p'))
    assert [row[6] for row in rows] == ['-292275055-05-16 16:47:04Z', '1969-12-31 23:59:55Z']


def test_every_page_escapes_script_and_quotes_in_label_values_and_the_query():
    app = fresh_app()
    post(app, [(cadvisor(MEMORY, INJECTED_NAMESPACE, INJECTED_POD, '<b>c</b>',
                         '/kubepods/pod1"/x', image='img"><script>x()</script>'), [(1, 1000)])])
    escaped_pod = '&lt;script&gt;document.title=&quot;INJECTED&quot;&lt;/script&gt;'
    escaped_namespace = 'ns&quot; onclick=&quot;x&amp;y&#x27;'
    pods = page(app, '/pods')
    assert pod_rows(pods) == [('k8s-cluster', 'kubernetes-cadvisor', INJECTED_NAMESPACE,
                               INJECTED_POD)]
    query = urllib.parse.urlencode({'namespace': INJECTED_NAMESPACE, 'pod': INJECTED_POD},
                                   quote_via=urllib.parse.quote)
    assert f'<a href="pod?{query.replace("&", "&amp;")}">{escaped_pod}</a>' in pods
    one = page(app, '/pod?' + query)
    assert f'<title>Pod {escaped_namespace}/{escaped_pod} - k8s_exporter</title>' in one
    assert '<td>&lt;b&gt;c&lt;/b&gt;</td>' in one
    assert 'img&quot;&gt;&lt;script&gt;x()&lt;/script&gt;' in one
    # The filter is shown back in its inputs.
    filtered = page(app, '/pods?' + query)
    assert f'<input name="namespace" value="{escaped_namespace}">' in filtered
    assert f'<input name="pod" value="{escaped_pod}">' in filtered
    for text in (pods, one, filtered, page(app, '/')):
        assert '<script' not in text and 'INJECTED"' not in text and '<b>' not in text


def test_a_refusal_reason_on_the_status_page_is_escaped():
    app = fresh_app()
    call_wsgi(app, 'POST', '/write', b'x', {'Content-Type': '<script>x()</script>'})
    text = page(app, '/')
    assert ("unsupported Content-Type &#x27;&lt;script&gt;x()&lt;/script&gt;&#x27;; "
            "expected application/x-protobuf") in text
    assert '<script' not in text


@pytest.mark.parametrize('path', ['/', '/pods', '/pod?namespace=default&pod=task-pv-pod'])
def test_pages_sit_behind_the_metrics_credentials(secured_app, path):
    post(secured_app, seed_table(), Authorization='Bearer s3cret-write')
    for authorization in (None, 'Bearer s3cret-write', 'Bearer wrong'):
        headers = {'Authorization': authorization} if authorization else {}
        assert call_wsgi(secured_app, 'GET', path, headers=headers)[:3:2] == (
            401, b'missing or wrong credentials\n')
    page(secured_app, path, Authorization='Bearer s3cret-read')


@pytest.mark.parametrize('path', ['/', '/pods', '/pod?namespace=ns&pod=p'])
def test_a_page_is_rendered_with_the_store_unlocked(path, monkeypatch):
    # A write started from inside the rendering must finish: the store's
    # lock is not reentrant, so it would wait for ever if the page held it.
    app = fresh_app()
    post(app, [(cadvisor(MEMORY, 'ns', 'p', cgroup=POD_UID_OLD), [(1, 1000)])])
    finished = []

    def write_while_rendering(render):
        def rendering(*args, **kwargs):
            writer = threading.Thread(target=lambda: finished.append(
                post(app, [(cadvisor(MEMORY, 'ns', 'w', cgroup=POD_UID_NEW), [(2, 1000)])])[0]))
            writer.start()
            writer.join(timeout=10)
            return render(*args, **kwargs)
        return rendering

    for name in ('render_status_page', 'render_pods_page', 'render_pod_page'):
        monkeypatch.setattr(k8s_exporter, name,
                            write_while_rendering(getattr(k8s_exporter, name)))
    page(app, path)
    assert finished == [204]


@pytest.mark.parametrize('path, status', [('/', 200), ('/pods', 200), ('/pod', 400)])
def test_pages_answer_head_without_a_body_and_refuse_post(path, status):
    app = fresh_app()
    code, headers, body = call_wsgi(app, 'HEAD', path)
    assert (code, body) == (status, b'') and int(headers['Content-Length']) > 0
    assert call_wsgi(app, 'POST', path)[0] == 405


@PROPERTY_SETTINGS
@given(path=st.sampled_from(['/', '/pods', '/pod']),
       query=st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=60))
def test_any_query_string_gets_a_page_or_a_one_line_refusal(path, query):
    app = fresh_app()
    post(app, seed_table())
    status, headers, body = call_wsgi(app, 'GET', f'{path}?{query}')
    if status == 200:
        assert headers['Content-Type'] == 'text/html; charset=utf-8'
    else:
        assert status in (400, 404) and one_line_reason(status, headers, body)


def test_a_query_that_is_not_utf8_filters_by_its_replacement_character():
    app = fresh_app()
    post(app, [(cadvisor(MEMORY, 'ns\ufffd', 'p', cgroup=POD_UID_OLD), [(1, 1000)]),
               (cadvisor(MEMORY, 'ns', 'q', cgroup=POD_UID_OLD), [(1, 1000)])])
    text = page(app, '/pods?namespace=ns%FF')
    assert [row[2:4] for row in pod_rows(text)] == [('ns\ufffd', 'p')]


###############################################################################
# Deployment: the image, docker compose, Kubernetes ###########################
###############################################################################

# The Dockerfile is built with podman (this machine has no Docker daemon),
# and the image's own filesystem is run: with `podman run` where the OCI
# runtime works, else by chroot into `podman image mount`, as the image's
# user, in its working directory, with its command and environment. The
# manifests and the compose file are checked offline against the Kubernetes
# API schemas (kubernetes-validate), prometheus-operator's CRD schemas (npm
# @kubernetes-models/prometheus-operator) and the Compose specification
# (check-jsonschema); the Prometheus configs beside them with promtool. The
# sharded StatefulSet's remote_write and the compose pipeline then run with
# real Prometheus servers on 127.0.0.1.

IMAGE_UNDER_TEST = 'localhost/k8s-exporter:test'
IMAGE_BASE = 'docker.io/library/debian:bookworm-slim'
IMAGE_USER = '10001:10001'
EXAMPLES = HERE / 'examples'
KUBERNETES_EXAMPLES = EXAMPLES / 'kubernetes'


@pytest.fixture
def prometheus_installed():
    """Skips as needs_prometheus does (the pipeline section below defines it)."""
    if needs_prometheus.args[0]:
        pytest.skip(needs_prometheus.kwargs['reason'])


def podman(*args, timeout=60, check=True):
    return subprocess.run(['podman', *args], capture_output=True, text=True, timeout=timeout,
                          check=check)


@pytest.fixture(scope='module')
def built_image():
    """The Dockerfile built by `make image` with podman, from the local base image only."""
    if shutil.which('podman') is None:
        pytest.skip('podman not installed: the image tests need Debian\'s podman '
                    '(`make podman` as root)')
    if podman('image', 'exists', IMAGE_BASE, check=False).returncode != 0:
        pytest.skip(f'no {IMAGE_BASE} in podman\'s store (`make base-image` as root)')
    built = subprocess.run(
        ['make', '-s', 'image', 'CONTAINER_TOOL=podman', f'IMAGE={IMAGE_UNDER_TEST}',
         'IMAGE_BUILD_ARGS=--pull=never --quiet'],
        cwd=HERE, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    # The images this tag named before, so that runs do not pile them up.
    podman('image', 'prune', '--force', '--filter',
           'label=org.opencontainers.image.title=k8s_exporter', check=False)
    return IMAGE_UNDER_TEST


@pytest.fixture(scope='module')
def image_config(built_image):
    """The image's Config; podman reports the healthcheck beside it."""
    inspected = json.loads(podman('image', 'inspect', built_image).stdout)[0]
    return {**inspected['Config'], 'Healthcheck': inspected.get('Healthcheck')}


@pytest.fixture(scope='module')
def image_root(built_image):
    """The image's filesystem, mounted read-only, as a container's root would be."""
    root = Path(podman('image', 'mount', built_image).stdout.strip())
    try:
        yield root
    finally:
        podman('image', 'unmount', built_image, check=False)


def image_environment(config, **extra):
    """The image's ENV, plus extra: what a container of it starts with."""
    return dict(line.split('=', 1) for line in config['Env']) | extra


def podman_run_works(image):
    """'' when `podman run` can start a container here, else why not (its error)."""
    probe = podman('run', '--rm', '--network=host', image, 'python3', '-c', 'print(6 * 7)',
                   check=False, timeout=120)
    if probe.returncode == 0 and probe.stdout.strip() == '42':
        return ''
    return (probe.stderr.strip().splitlines() or ['exit %d' % probe.returncode])[-1]


# Run as a shell in a mount namespace of its own: the mounts vanish with it,
# and the image's root stays read-only, as readOnlyRootFilesystem has it.
CHROOT_LAUNCHER = '''
set -e
root=$1; secrets=$2; user=$3; workdir=$4; shift 4
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
mount --bind "$secrets" "$root/run"
exec chroot --userspec="$user" "$root" /usr/bin/env -i -C "$workdir" "$@"
'''


class ImageExporter(StartStop):
    """The image's command, run from the image's filesystem on a free loopback port.

    `podman run --network=host` where it works; else chroot (how is set to
    say which). secrets is a host folder that appears as /run in the
    container, where docker and compose mount their secrets.
    """

    def __init__(self, image, config, root, secrets, env=None):
        self.image, self.config, self.root, self.secrets = image, config, root, secrets
        self.env = image_environment(config, **(env or {}))
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.how = None
        self.process = None
        self.log = b''

    def command(self):
        """The image's CMD with its listen address moved to this test's port."""
        command = list(self.config['Cmd'])
        command[command.index('-b') + 1] = f'127.0.0.1:{self.port}'
        return command

    def start(self):
        refused = podman_run_works(self.image)
        if not refused:
            self.how = 'podman run'
            argv = ['podman', 'run', '--rm', '--network=host', '--read-only',
                    '--tmpfs', '/dev/shm', '--tmpfs', '/tmp',
                    '--volume', f'{self.secrets}:/run:ro',
                    *[f'--env={name}={value}' for name, value in self.env.items()],
                    self.image, *self.command()]
        else:
            self.how = f'chroot into podman image mount (podman run: {refused})'
            argv = ['unshare', '--mount', '--propagation', 'private', '--', 'sh', '-c',
                    CHROOT_LAUNCHER, 'launcher', str(self.root), str(self.secrets),
                    self.config['User'], self.config['WorkingDir'],
                    *[f'{name}={value}' for name, value in self.env.items()],
                    *self.command()]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_until(lambda: self.process.poll() is not None or http_request(
                       self.url + '/-/healthy', timeout=1)[0] == 200,
                   timeout=60, what='the image\'s exporter to answer /-/healthy')
        if self.process.poll() is not None:
            self.stop()
            pytest.fail(f'the image\'s exporter exited at start-up ({self.how}):\n'
                        f'{self.log.decode(errors="replace")}')
        return self

    def stop(self):
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.log, _ = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.log, _ = self.process.communicate()
        self.process = None

    def metrics(self):
        status, text = scrape_url(self.url)
        assert status == 200
        return text


def processes_serving(port):
    """{pid: (real uid, effective uid, root folder)} of the processes started with
    127.0.0.1:port in their command line: a gunicorn master and its worker."""
    found = {}
    for entry in Path('/proc').iterdir():
        try:
            cmdline = (entry / 'cmdline').read_bytes().split(b'\0')
            if f'127.0.0.1:{port}'.encode() not in cmdline or b'k8s_exporter:app' not in cmdline:
                continue
            with open(entry / 'status') as status_file:
                uids = next(line.split()[1:3] for line in status_file if line.startswith('Uid:'))
            found[int(entry.name)] = (int(uids[0]), int(uids[1]), os.readlink(entry / 'root'))
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError, PermissionError):
            continue
    return found


@pytest.mark.parametrize('docker_answers, tool', [(True, 'docker'), (False, 'podman')],
                         ids=['docker-daemon', 'no-docker-daemon'])
def test_make_image_builds_with_docker_when_its_daemon_answers_else_podman(tmp_path,
                                                                           docker_answers, tool):
    # A docker client that answers `docker info` as a daemon would, or as
    # this machine's does without one.
    (tmp_path / 'docker').write_text(f'#!/bin/sh\nexit {0 if docker_answers else 1}\n')
    (tmp_path / 'docker').chmod(0o755)
    planned = subprocess.run(['make', '-s', '-n', 'image'], cwd=HERE, capture_output=True,
                             text=True, timeout=60,
                             env={**os.environ, 'PATH': f'{tmp_path}:{os.environ["PATH"]}'})
    command = ' '.join(planned.stdout.replace('\\\n', ' ').split())
    assert command.startswith(f'{tool} build '), command
    assert ('--isolation chroot --format docker' in command) == (tool == 'podman'), command
    assert command.endswith(' -t k8s-exporter:latest .'), command


def test_image_is_configured_as_the_readme_says(image_config):
    assert image_config['User'] == IMAGE_USER
    assert image_config['WorkingDir'] == '/app'
    assert set(image_config['ExposedPorts']) == {'9201/tcp'}
    # make run's command; the worker's heartbeat file off the root filesystem.
    assert image_config['Cmd'] == ['gunicorn', '-w', '1', '--threads', '8', '-b', '0.0.0.0:9201',
                                   '--worker-tmp-dir', '/dev/shm', 'k8s_exporter:app']
    assert image_config['Healthcheck'], 'no HEALTHCHECK: podman keeps it only with --format docker'
    assert image_config['Healthcheck']['Test'][:2] == ['CMD', 'python3']
    assert '/-/healthy' in image_config['Healthcheck']['Test'][-1]
    # make image labels the build with the commit ('dev' outside a git checkout).
    described = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=HERE,
                               capture_output=True, text=True, timeout=30)
    labels = image_config['Labels']
    assert labels['org.opencontainers.image.version'] == (described.stdout.strip() or 'dev')
    assert 'org.opencontainers.image.source' in labels


def test_image_holds_python3_the_venv_and_the_exporter_and_nothing_to_build_with(image_root):
    assert sorted(path.name for path in (image_root / 'app').iterdir()) == [
        'gunicorn.conf.py', 'k8s_exporter.py', 'remote_pb2.py']
    assert (image_root / 'app' / 'k8s_exporter.py').read_bytes() == \
        (HERE / 'k8s_exporter.py').read_bytes()
    site = next((image_root / 'opt' / 'k8s-exporter' / 'lib').glob('python3*')) / 'site-packages'
    installed = {path.name.split('-')[0].lower() for path in site.glob('*.dist-info')}
    wanted = {line.split('==')[0].lower().replace('-', '_') for line in
              (HERE / 'requirements.txt').read_text().splitlines()
              if line and not line.startswith('#')}
    # The three, and cramjam, python-snappy's codec.
    assert installed == wanted | {'cramjam'}
    for absent in ('opt/k8s-exporter/bin/pip', 'usr/bin/pip3', 'usr/bin/gcc', 'usr/bin/cc',
                   'usr/lib/python3.11/ensurepip', 'root/.cache/pip'):
        assert not (image_root / absent).exists(), absent
    assert not list((image_root / 'var' / 'lib' / 'apt' / 'lists').glob('*_Packages'))


def test_image_serves_a_real_prometheus1_write_as_its_non_root_user_on_a_read_only_root(
        built_image, image_config, image_root, tmp_path, prometheus_installed, capsys):
    text = capture_text(SYNTHETIC_MODERN)
    expected = e2e_expected_values(text, 'kubelet')
    secrets = tmp_path / 'secrets'
    secrets.mkdir()
    (secrets / 'write-token').write_text('image-test-token\n')
    with pytest.raises(OSError, match='Read-only file system'):
        (image_root / 'app' / 'written').write_text('')
    with contextlib.ExitStack() as stack:
        exporter = ImageExporter(built_image, image_config, image_root, secrets, {
            'K8S_EXPORTER_WRITE_BEARER_TOKEN_FILE': '/run/write-token'})
        stack.enter_context(exporter)
        with capsys.disabled():
            print(f'\n  image {built_image} run by {exporter.how}', flush=True)
        # Master and worker, as the image's numeric user; by chroot, in the image's root.
        served_by = wait_until(lambda: len(processes_serving(exporter.port)) == 2 and
                               processes_serving(exporter.port), 20, 'gunicorn and its worker')
        for uid, euid, root in served_by.values():
            assert (uid, euid) == (10001, 10001)
            assert root == str(image_root) or exporter.how == 'podman run'
        endpoint = stack.enter_context(CadvisorEndpoint(text))
        entry = remote_write_entry(exporter.url + '/write')
        entry['authorization'] = {'credentials_file': str(secrets / 'write-token')}
        prometheus1 = start_prometheus(stack, prometheus1_config(
            {'kubelet': endpoint.address}, [entry], E2E_CLUSTER), 'prometheus1')
        wait_in_pipeline(lambda: exporter_pod_values(exporter) == expected, 40,
                         f'the image\'s exporter to hold {len(expected)} pod series',
                         [prometheus1])
        assert_remote_write_failed_nothing(prometheus1)
        # The credential is a file mounted in: without it, writes are refused.
        assert write(exporter.url, seed_table())[0] == 401
        # The image's healthcheck, pointed at this test's port.
        healthcheck = [word.replace('9201', str(exporter.port))
                       for word in image_config['Healthcheck']['Test'][1:]]
        checked = subprocess.run(['chroot', f'--userspec={IMAGE_USER}', str(image_root),
                                  *healthcheck], capture_output=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
    healthcheck_when_down = subprocess.run(['chroot', f'--userspec={IMAGE_USER}', str(image_root),
                                            *healthcheck], capture_output=True, timeout=30)
    assert healthcheck_when_down.returncode != 0


# Kubernetes manifests.

NPM_MODULES = VENV_BIN.parent / 'npm'
SHARDS_SCRIPT = KUBERNETES_EXAMPLES / 'shards.py'
OPERATOR_EXAMPLES = KUBERNETES_EXAMPLES / 'prometheus-operator'


def yaml_documents(path):
    return [document for document in yaml.safe_load_all(path.read_text(encoding='utf-8'))
            if document is not None]


def kubernetes_objects(path):
    """{kind: object} of one manifest file."""
    return {document['kind']: document for document in yaml_documents(path)}


def render_shards(shards, out):
    """Run shards.py as `make shards` does; {file name: Path} of what it wrote."""
    made = subprocess.run([sys.executable, str(SHARDS_SCRIPT), str(shards), '--out', str(out)],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    return {Path(line).name: Path(line) for line in made.stdout.split()}


def kubernetes_schema_errors(document):
    """'' if document passes the Kubernetes API schema of its kind (strict: no
    unknown fields), else the validator's message."""
    try:
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as error:
        return str(error)
    return ''


def core_manifests(tmp_path):
    paths = sorted(KUBERNETES_EXAMPLES.glob('*.yaml'))
    return paths + [render_shards(3, tmp_path)['k8s-exporter-shards.yaml']]


def test_kubernetes_manifests_pass_the_kubernetes_api_schemas(tmp_path):
    checked = []
    for path in core_manifests(tmp_path):
        for document in yaml_documents(path):
            assert kubernetes_schema_errors(document) == '', (path.name, document['kind'])
            checked.append(document['kind'])
    assert sorted(checked) == ['Deployment', 'NetworkPolicy', 'Secret', 'Service', 'Service',
                               'StatefulSet']


def test_kubernetes_schema_check_refuses_a_misspelt_field():
    deployment = kubernetes_objects(KUBERNETES_EXAMPLES / 'deployment.yaml')['Deployment']
    container = deployment['spec']['template']['spec']['containers'][0]
    container['securityContext']['readOnlyRootFilesytem'] = True
    assert 'readOnlyRootFilesytem' in kubernetes_schema_errors(deployment)


def test_kubernetes_deployment_runs_one_locked_down_exporter_of_the_image():
    deployment = kubernetes_objects(KUBERNETES_EXAMPLES / 'deployment.yaml')['Deployment']
    assert 'namespace' not in deployment['metadata']
    assert deployment['spec']['replicas'] == 1
    assert deployment['spec']['strategy'] == {'type': 'Recreate'}
    pod = deployment['spec']['template']['spec']
    assert pod['securityContext']['runAsNonRoot'] is True
    assert f'{pod["securityContext"]["runAsUser"]}:{pod["securityContext"]["runAsGroup"]}' == \
        IMAGE_USER
    (container,) = pod['containers']
    assert container['securityContext'] == {
        'allowPrivilegeEscalation': False, 'readOnlyRootFilesystem': True, 'privileged': False,
        'capabilities': {'drop': ['ALL']}}
    assert container['ports'] == [{'name': 'http', 'containerPort': 9201}]
    probes = {probe: container[probe]['httpGet'] for probe in ('readinessProbe', 'livenessProbe')}
    assert probes == {'readinessProbe': {'path': '/-/ready', 'port': 'http'},
                      'livenessProbe': {'path': '/-/healthy', 'port': 'http'}}
    for probe in probes.values():
        assert call_wsgi(fresh_app(), 'GET', probe['path'])[0] == 200
    # Sized from the bench: 64 MiB held 10,000 pods.
    assert container['resources'] == {'requests': {'cpu': '100m', 'memory': '64Mi'},
                                      'limits': {'cpu': '1', 'memory': '256Mi'}}
    assert pod['volumes'] == [{'name': 'credentials', 'secret': {
        'secretName': kubernetes_objects(KUBERNETES_EXAMPLES / 'secret.yaml')['Secret'][
            'metadata']['name'], 'optional': True}}]
    service = kubernetes_objects(KUBERNETES_EXAMPLES / 'service.yaml')['Service']
    assert service['spec']['selector'] == deployment['spec']['selector']['matchLabels'] == \
        deployment['spec']['template']['metadata']['labels']
    assert service['spec']['ports'] == [{'name': 'http', 'port': 9201, 'targetPort': 'http'}]


def test_kubernetes_network_policy_admits_only_the_two_prometheus_servers_on_9201():
    policy = kubernetes_objects(KUBERNETES_EXAMPLES / 'networkpolicy.yaml')['NetworkPolicy']
    assert policy['spec']['podSelector']['matchLabels'] == {'app.kubernetes.io/name':
                                                            'k8s-exporter'}
    assert policy['spec']['policyTypes'] == ['Ingress']
    (rule,) = policy['spec']['ingress']
    assert rule['ports'] == [{'port': 9201, 'protocol': 'TCP'}]
    assert [peer['podSelector']['matchLabels'] for peer in rule['from']] == [
        {'app.kubernetes.io/name': 'prometheus1'}, {'app.kubernetes.io/name': 'prometheus2'}]
    text = (KUBERNETES_EXAMPLES / 'networkpolicy.yaml').read_text()
    assert text.count('# ADAPT') == 4


def test_shards_statefulset_runs_the_deployments_pod_on_a_headless_service(tmp_path):
    deployment = kubernetes_objects(KUBERNETES_EXAMPLES / 'deployment.yaml')['Deployment']
    shards = kubernetes_objects(render_shards(3, tmp_path)['k8s-exporter-shards.yaml'])
    statefulset, service = shards['StatefulSet'], shards['Service']
    # Everything but the commented-out credential variables, which YAML drops.
    assert statefulset['spec']['template']['spec'] == deployment['spec']['template']['spec']
    assert statefulset['spec']['replicas'] == 3
    assert statefulset['spec']['serviceName'] == service['metadata']['name']
    assert service['spec']['clusterIP'] == 'None'
    assert service['spec']['selector'] == statefulset['spec']['selector']['matchLabels'] == \
        statefulset['spec']['template']['metadata']['labels']
    # Not the single exporter's pods: both may run while moving from one to the other.
    assert service['spec']['selector'] != deployment['spec']['selector']['matchLabels']


def test_shards_script_refuses_fewer_than_two(tmp_path):
    made = subprocess.run([sys.executable, str(SHARDS_SCRIPT), '1', '--out', str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 2
    assert 'shards: 2 or more' in made.stderr.splitlines()[-1]


def shards_prometheus1_config(files, cadvisor_address, exporter_urls):
    """The rendered remote_write entries in a prometheus1 config, each URL replaced by
    a test exporter's and the queue made to ship within a second; nothing else changed."""
    (remote_write_text,) = yaml_documents(files['prometheus1-remote-write.yaml'])
    entries = remote_write_text['remote_write']
    assert len(entries) == len(exporter_urls)
    for entry, url in zip(entries, exporter_urls):
        entry['url'] = url + '/write'
        entry['queue_config'] = remote_write_entry(url)['queue_config']
    return prometheus1_config({'kubelet': cadvisor_address}, entries, E2E_CLUSTER)


def test_shards_remote_write_for_three_passes_promtool(tmp_path, prometheus_installed):
    files = render_shards(3, tmp_path / 'shards')
    for name in ('prometheus1-remote-write.yaml', 'prometheus2-scrape.yaml'):
        path = tmp_path / name
        path.write_text(json.dumps({'global': {'scrape_interval': '15s'},
                                    **yaml_documents(files[name])[0]}))
        status, output = promtool_check_config(path)
        assert (status, 'SUCCESS' in output) == (0, True), output
    (scrape,) = yaml_documents(files['prometheus2-scrape.yaml'])[0]['scrape_configs']
    assert scrape['honor_labels'] is True
    assert scrape['static_configs'][0]['targets'] == [
        f'k8s-exporter-{shard}.k8s-exporter-shards.monitoring.svc:9201' for shard in range(3)]


def test_shards_for_three_put_each_pod_on_exactly_one_of_three_exporters(tmp_path,
                                                                          prometheus_installed):
    files = render_shards(3, tmp_path)
    text = capture_text(CAPTURE_EKS_1_21)
    expected = e2e_expected_values(text, 'kubelet')
    with contextlib.ExitStack() as stack:
        endpoint = stack.enter_context(CadvisorEndpoint(text, stamp_now=True))
        exporters = [stack.enter_context(Gunicorn()) for _ in range(3)]
        prometheus1 = start_prometheus(stack, shards_prometheus1_config(
            files, endpoint.address, [exporter.url for exporter in exporters]), 'prometheus1')
        def together():
            return functools.reduce(operator.or_, map(exporter_pod_values, exporters))

        wait_in_pipeline(lambda: together() == expected, 40,
                         'the three shards to hold every pod series together', [prometheus1])
        held = [exporter_pod_values(exporter) for exporter in exporters]
        assert all(held), [len(values) for values in held]
        for one, other in ((0, 1), (0, 2), (1, 2)):
            assert not pods_of(held[one]) & pods_of(held[other]), (one, other)
        assert sum(map(len, held)) == len(expected)
        for exporter in exporters:
            assert_remote_write_failed_nothing(prometheus1, relabelled=True,
                                               url=exporter.url + '/write')


# prometheus-operator objects: against the CRD schemas that
# @kubernetes-models/prometheus-operator ships (installed by make test with
# npm), and for the fields that matter.

OPERATOR_VALIDATOR = '''
import * as models from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1';
import { readFileSync } from 'node:fs';
for (const object of JSON.parse(readFileSync(0, 'utf8'))) {
  try {
    new models[object.kind](object).validate();
    console.log('valid');
  } catch (error) {
    console.log(error.message.split('\\n')[0]);
  }
}
'''


def operator_schema_verdicts(objects):
    """'valid' or the first line of the schema error, for each object."""
    if not (NPM_MODULES / 'node_modules' / '@kubernetes-models' / 'prometheus-operator').is_dir():
        pytest.skip(f'@kubernetes-models/prometheus-operator not in {NPM_MODULES} (make test '
                    'installs it with npm)')
    checked = subprocess.run(['node', '--input-type=module', '-e', OPERATOR_VALIDATOR],
                             input=json.dumps(objects), cwd=NPM_MODULES, capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    return checked.stdout.splitlines()


def operator_objects():
    return [document for path in sorted(OPERATOR_EXAMPLES.glob('*.yaml'))
            for document in yaml_documents(path)]


def test_prometheus_operator_objects_pass_their_crd_schemas():
    objects = operator_objects()
    assert sorted(document['kind'] for document in objects) == ['Prometheus', 'ServiceMonitor']
    assert operator_schema_verdicts(objects) == ['valid', 'valid']
    broken = [document for document in objects if document['kind'] == 'ServiceMonitor']
    broken[0]['spec']['endpoints'][0]['honorLabels'] = 'yes'
    assert operator_schema_verdicts(broken) == [
        'data/spec/endpoints/0/honorLabels must be boolean']


def test_prometheus_operator_objects_keep_labels_and_write_to_the_service():
    objects = {document['kind']: document for document in operator_objects()}
    service = kubernetes_objects(KUBERNETES_EXAMPLES / 'service.yaml')['Service']
    monitor = objects['ServiceMonitor']['spec']
    assert monitor['endpoints'] == [{'port': 'http', 'path': '/metrics', 'interval': '15s',
                                     'honorLabels': True}]
    assert monitor['selector']['matchLabels'].items() <= service['metadata']['labels'].items()
    (remote_write,) = objects['Prometheus']['spec']['remoteWrite']
    assert remote_write['url'] == f'http://{service["metadata"]["name"]}.monitoring.svc:9201/write'
    (keep,) = remote_write['writeRelabelConfigs']
    assert keep['action'] == 'keep' and keep['sourceLabels'] == ['__name__']
    names = set(EXPORTED_METRICS) | {'container_cpu_load_d_average_10s',
                                     'container_memory_working_set_bytes'}
    assert {name for name in names if re.fullmatch(keep['regex'], name)} == set(EXPORTED_METRICS)


# docker compose: the seed's pipeline on one docker host.

COMPOSE_FILE = EXAMPLES / 'docker-compose.yml'


def check_compose_schema(path):
    checked = subprocess.run([str(VENV_BIN / 'check-jsonschema'), '--builtin-schema',
                              'vendor.compose-spec', str(path)],
                             capture_output=True, text=True, timeout=120)
    return checked.returncode, checked.stdout + checked.stderr


def test_compose_file_passes_the_compose_specification_schema(tmp_path):
    if not (VENV_BIN / 'check-jsonschema').exists():
        pytest.skip('check-jsonschema (requirements-dev.txt) is not installed')
    assert check_compose_schema(COMPOSE_FILE) == (0, 'ok -- validation done\n')
    misspelt = tmp_path / 'docker-compose.yml'
    misspelt.write_text(COMPOSE_FILE.read_text().replace('    read_only: true\n',
                                                         '    readonly: true\n', 1))
    status, output = check_compose_schema(misspelt)
    assert status == 1 and "'readonly' was unexpected" in output, output


def test_compose_prometheus_configs_pass_promtool_check_config(prometheus_installed):
    mounted = [volume.split(':')[0] for service in
               yaml_documents(COMPOSE_FILE)[0]['services'].values()
               for volume in service.get('volumes', []) if volume.endswith('prometheus.yml:ro')]
    assert mounted == ['./docker-prometheus1.yml', './docker-prometheus2.yml']
    for name in mounted:
        status, output = promtool_check_config(EXAMPLES / name)
        assert (status, 'SUCCESS' in output) == (0, True), output


def test_compose_capture_is_the_standalone_capture_of_the_fixtures():
    assert (EXAMPLES / 'cadvisor-standalone.txt').read_bytes() == \
        capture_path('synthetic-cadvisor-standalone').read_bytes()


def compose_service_config(compose, service):
    """A Prometheus config that compose mounts into service, as a dict."""
    (volume,) = [volume for volume in compose['services'][service]['volumes']
                 if volume.endswith(':/etc/prometheus/prometheus.yml:ro')]
    (config,) = yaml_documents(EXAMPLES / volume.split(':')[0])
    return config


def on_loopback(config, addresses):
    """config with every scrape target and write URL moved from its compose service
    (host:port) to a loopback address, and 1 s intervals; nothing else changed."""
    text = json.dumps(config)
    for service_address, address in addresses.items():
        text = text.replace(service_address, address)
    config = json.loads(text)
    config['global']['scrape_interval'] = config['global']['evaluation_interval'] = '1s'
    for job in config['scrape_configs']:
        job['scrape_timeout'] = '1s'
    for entry in config.get('remote_write', []):
        entry['queue_config'] = remote_write_entry(entry['url'])['queue_config']
    return config


def test_compose_pipeline_on_loopback_shows_the_captures_pods_and_no_plain_containers(
        prometheus_installed):
    """The compose file's services, each run here as compose runs it but on 127.0.0.1:
    the capture service's command, the exporter, prometheus1 and prometheus2 with the
    mounted configs. cAdvisor is a page of plain docker containers, as on a host
    without Kubernetes."""
    compose = yaml_documents(COMPOSE_FILE)[0]
    command = compose['services']['capture']['command']
    assert command[:2] == ['python3', 'demo_k8s_exporter.py']
    capture_file = EXAMPLES / 'cadvisor-standalone.txt'
    plain_containers = ''.join(line + '\n' for line in capture_text(
        'synthetic-cadvisor-standalone').splitlines()
        if 'container_label_io_kubernetes' not in line)
    cluster = compose_service_config(compose, 'prometheus1')['global']['external_labels'][
        'cluster']
    capture_port = free_port()
    arguments = [argument.replace('0.0.0.0:8081', f'127.0.0.1:{capture_port}').replace(
                 '/capture/cadvisor-standalone.txt', str(capture_file)) for argument in command[2:]]
    with contextlib.ExitStack() as stack:
        capture = subprocess.Popen([sys.executable, str(HERE / command[1]), *arguments],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=HERE)
        stack.callback(lambda: (capture.terminate(), capture.communicate(timeout=30)))
        wait_until(lambda: http_request(
            f'http://127.0.0.1:{capture_port}/metrics/cadvisor', timeout=1)[0] == 200, 20,
            'the capture service')
        cadvisor = CadvisorEndpoint(plain_containers)
        cadvisor.path = '/metrics'   # a standalone cAdvisor's, prometheus1's default
        stack.enter_context(cadvisor)
        exporter = Gunicorn(env={'K8S_EXPORTER_CLUSTER': 'docker-host'}).start()
        stack.callback(exporter.stop)
        addresses = {'capture:8081': f'127.0.0.1:{capture_port}',
                     'cadvisor:8080': cadvisor.address,
                     'exporter:9201': f'127.0.0.1:{exporter.port}'}
        prometheus1 = start_prometheus(stack, on_loopback(
            compose_service_config(compose, 'prometheus1'), addresses), 'prometheus1')
        prometheus2 = start_prometheus(stack, on_loopback(
            compose_service_config(compose, 'prometheus2'), addresses), 'prometheus2')
        expected = expected_capture_values(read_samples(capture_file.read_text()),
                                           'cadvisor-capture', cluster)
        wait_in_pipeline(lambda: exporter_pod_values(exporter) == expected and
                         prometheus2_pod_values(prometheus2, {addresses['exporter:9201']}) ==
                         expected, 40, 'the capture\'s pods in the exporter and prometheus2',
                         [prometheus1, prometheus2])
        # cAdvisor's plain containers were scraped and written too, and show as no pod.
        assert cadvisor.requests and prometheus1.query('up{job="cadvisor"} == 1')
        assert exporter_pod_values(exporter) == expected
        assert_remote_write_failed_nothing(prometheus1, relabelled=True)
        capture.terminate()
        assert capture.wait(30) == 0   # SIGTERM ends it cleanly, as `docker compose down` does


###############################################################################
# The real Prometheus pipeline ################################################
###############################################################################

# cAdvisor endpoint -> prometheus1 --remote_write--> k8s_exporter -> prometheus2
#
# Debian's prometheus and promtool on both sides, the exporter under a real
# gunicorn, every port picked at run time on 127.0.0.1. Expected values are
# the model's, applied to the text each cAdvisor endpoint serves; what
# arrives is read back through prometheus2's query API and the exporter's
# /metrics. CadvisorEndpoint and Prometheus come from demo_k8s_exporter.py.

E2E_CLUSTER = 'e2e-cluster'          # anything but the exporter's default k8s-cluster

_missing = [binary for binary in (PROMETHEUS_BINARY, PROMTOOL_BINARY)
            if not os.access(binary, os.X_OK)]
needs_prometheus = pytest.mark.skipif(
    bool(_missing), reason=f'{" and ".join(_missing)} not installed: the end-to-end tests '
                           'need Debian\'s prometheus package (`make prometheus` as root)')


def e2e_expected_values(text, job):
    """The model's values for one scrape of text, with prometheus1's cluster label."""
    return expected_capture_values(read_samples(text), job, E2E_CLUSTER)


def without_pod(text, pod):
    """The text with every sample line of one pod removed, whatever its convention."""
    marks = (f'pod="{pod}"', f'pod_name="{pod}"', f'container_label_io_kubernetes_pod_name="{pod}"')
    return ''.join(line + '\n' for line in text.split('\n')[:-1]
                   if line.startswith('#') or not any(mark in line for mark in marks))


def exporter_pod_values(exporter):
    return pod_values_in(exporter.metrics())


def prometheus2_pod_values(prometheus2, exporter_instances, selector='{__name__=~"container_.+"}'):
    """{(metric, cluster, job, namespace, pod): value} from prometheus2's query API.

    Each series must carry exactly the exporter's labels plus the instance
    prometheus2 gives its target (honor_labels keeps job and cluster as the
    exporter wrote them; instance is not in the exporter's output).
    """
    values = {}
    for series in prometheus2.query(selector):
        labels = dict(series['metric'])
        instance = labels.pop('instance', None)
        assert sorted(labels) == sorted(('__name__', *OUTPUT_LABELS)), labels
        assert instance in exporter_instances, labels
        assert labels['item'] == labels['__name__'], labels
        key = (labels['__name__'], labels['cluster'], labels['job'], labels['namespace'],
               labels['pod'])
        assert key not in values, f'{key} arrives twice'
        values[key] = float(series['value'][1])
    return values


def pods_of(values):
    return {key[1:] for key in values}


def wait_in_pipeline(predicate, timeout, what, prometheuses):
    """wait_until with the Prometheus logs in the failure message."""
    return wait_until(predicate, timeout, what, interval=0.2, details=lambda: '\n'.join(
        f'--- {prometheus.name} log ---\n{prometheus.log_tail()}' for prometheus in prometheuses))


def start_prometheus(stack, config, name):
    try:
        return stack.enter_context(Prometheus(config, name=name))
    except StartupError as error:
        pytest.fail(str(error))


def remote_storage_counters(prometheus1, **labels):
    """prometheus1's remote-write outcome counters, summed over its remote_write entries."""
    return {name: prometheus1.self_metric(f'prometheus_remote_storage_{name}', **labels)
            for name in ('samples_total', 'samples_failed_total', 'samples_dropped_total',
                         'samples_retried_total', 'metadata_failed_total')}


def assert_remote_write_failed_nothing(prometheus1, retries_allowed=False, relabelled=False,
                                       **labels):
    """prometheus1 sent samples and none failed; none dropped unless relabelled.

    In Prometheus 2.42 samples_dropped_total also counts what
    write_relabel_configs drops on purpose.
    """
    counters = remote_storage_counters(prometheus1, **labels)
    assert counters['samples_total'] > 0, counters
    assert counters['samples_failed_total'] == 0, counters
    if not relabelled:
        assert counters['samples_dropped_total'] == 0, counters
    assert counters['metadata_failed_total'] == 0, counters
    if not retries_allowed:
        assert counters['samples_retried_total'] == 0, counters
    return counters


class SmallPipeline:
    """One cAdvisor endpoint, prometheus1, one exporter, prometheus2."""

    def __init__(self, stack, text, job, stamp_now=False, exporter_env=None):
        self.job = job
        self.endpoint = stack.enter_context(CadvisorEndpoint(text, stamp_now=stamp_now))
        self.exporter = Gunicorn(env=exporter_env).start()
        # Whichever exporter runs at the end stops after prometheus1: a
        # Prometheus stopping with samples it cannot deliver waits out its
        # flush deadline (one minute).
        stack.callback(lambda: self.exporter.stop())
        self.prometheus1 = start_prometheus(stack, prometheus1_config(
            {job: self.endpoint.address}, [remote_write_entry(self.exporter.url + '/write')],
            E2E_CLUSTER), 'prometheus1')
        self.instance = f'127.0.0.1:{self.exporter.port}'
        self.prometheus2 = start_prometheus(stack, prometheus2_config([self.instance]),
                                            'prometheus2')
        self.prometheuses = (self.prometheus1, self.prometheus2)

    def wait(self, predicate, timeout, what):
        return wait_in_pipeline(predicate, timeout, what, self.prometheuses)

    def wait_for_values(self, expected, timeout=40):
        """Wait until the exporter and prometheus2 both hold exactly expected."""
        self.wait(lambda: exporter_pod_values(self.exporter) == expected, timeout,
                  f'the exporter to hold {len(expected)} expected pod series')
        self.wait(lambda: prometheus2_pod_values(self.prometheus2, {self.instance}) == expected,
                  timeout, f'prometheus2 to hold {len(expected)} expected pod series')


def make_certificates(directory):
    """A CA and a server certificate for 127.0.0.1 signed by it, made with openssl now."""
    def openssl(*args):
        subprocess.run(['openssl', *args], cwd=directory, check=True, capture_output=True,
                       timeout=60)

    openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj',
            '/CN=k8s_exporter test CA', '-keyout', 'ca.key', '-out', 'ca.crt')
    openssl('req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=127.0.0.1',
            '-keyout', 'server.key', '-out', 'server.csr')
    (directory / 'san.cnf').write_text('subjectAltName=IP:127.0.0.1\n')
    openssl('x509', '-req', '-in', 'server.csr', '-CA', 'ca.crt', '-CAkey', 'ca.key',
            '-CAcreateserial', '-days', '1', '-extfile', 'san.cnf', '-out', 'server.crt')
    return directory / 'server.crt', directory / 'server.key', directory / 'ca.crt'


@needs_prometheus
@pytest.mark.skipif(shutil.which('openssl') is None, reason='openssl not installed')
def test_prometheus_writes_and_scrapes_over_tls_with_credentials(tmp_path):
    certificate, key, ca_file = make_certificates(tmp_path)
    (tmp_path / 'write-token').write_text('write-secret\n')
    (tmp_path / 'scrape-users').write_text('prometheus2:scrape-secret\n')
    (tmp_path / 'scrape-password').write_text('scrape-secret')
    text = capture_text(SYNTHETIC_MODERN)
    expected = e2e_expected_values(text, 'kubelet')
    with contextlib.ExitStack() as stack:
        endpoint = stack.enter_context(CadvisorEndpoint(text))
        exporter = Gunicorn(tls=(certificate, key, ca_file), env={
            'K8S_EXPORTER_WRITE_BEARER_TOKEN_FILE': str(tmp_path / 'write-token'),
            'K8S_EXPORTER_METRICS_BASIC_AUTH_FILE': str(tmp_path / 'scrape-users')}).start()
        stack.callback(exporter.stop)
        remote = remote_write_entry(exporter.url + '/write')
        remote.update(tls_config={'ca_file': str(ca_file)},
                      authorization={'credentials_file': str(tmp_path / 'write-token')})
        prometheus1 = start_prometheus(stack, prometheus1_config(
            {'kubelet': endpoint.address}, [remote], E2E_CLUSTER), 'prometheus1')
        instance = f'127.0.0.1:{exporter.port}'
        scraping = prometheus2_config([instance])
        scraping['scrape_configs'][0].update(
            scheme='https', tls_config={'ca_file': str(ca_file)},
            basic_auth={'username': 'prometheus2',
                        'password_file': str(tmp_path / 'scrape-password')})
        prometheus2 = start_prometheus(stack, scraping, 'prometheus2')
        wait_in_pipeline(lambda: prometheus2_pod_values(prometheus2, {instance}) == expected,
                         40, f'prometheus2 to hold {len(expected)} pod series over TLS',
                         (prometheus1, prometheus2))
        assert_remote_write_failed_nothing(prometheus1)
        assert http_request(exporter.url + '/metrics', ca_file=exporter.ca_file)[0] == 401
        with pytest.raises(ssl.SSLCertVerificationError):
            http_request(exporter.url + '/-/healthy')      # not signed by a system CA


# A pod's life through the pipeline: a container restarts, the pod is
# re-created, another pod is deleted, while prometheus2 scrapes.

def kubelet_text(pods):
    """cAdvisor text of pods {name: (pod cgroup id, container id, memory, fs usage)}."""
    lines = []
    for name, (pod_cgroup, container_id, memory, fs_usage) in sorted(pods.items()):
        lines.append(f'container_memory_usage_bytes{{container="",id="{pod_cgroup}",'
                     f'namespace="ns",pod="{name}"}} {memory}')
        lines.append(f'container_fs_usage_bytes{{container="app",device="/dev/vda1",'
                     f'id="{pod_cgroup}/{container_id}",image="app:1",namespace="ns",'
                     f'pod="{name}"}} {fs_usage}')
    return '\n'.join(lines) + '\n'


@needs_prometheus
@pytest.mark.parametrize('stamp_now', [True, False],
                         ids=['kubelet-stamped-ttl', 'scrape-stamped-stale-markers'])
def test_pipeline_restarts_and_recreated_pods_never_show_a_doubled_value(stamp_now):
    interval = 1.0          # prometheus1's scrape interval in this pipeline
    job = 'kubernetes-cadvisor'
    web = {'web-0': (POD_UID_OLD, 'c1', 7000, 300), 'gone-1': (POD_UID_NEW + 'ff', 'd1', 500, 5)}
    # Kubelet-stamped samples get no stale markers: a short TTL ends them.
    env = {'K8S_EXPORTER_TTL_SECONDS': '3'} if stamp_now else {}
    with contextlib.ExitStack() as stack:
        pipeline = SmallPipeline(stack, kubelet_text(web), job, stamp_now=stamp_now,
                                 exporter_env=env)
        key = functools.partial(lambda metric, pod: (metric, E2E_CLUSTER, job, 'ns', pod))
        shown = []        # every exporter page's web-0 values, polled while things change

        def web_values():
            values = exporter_pod_values(pipeline.exporter)
            shown.append((values.get(key(MEMORY, 'web-0')), values.get(key(FS_USAGE, 'web-0'))))
            return values

        def switch_to(pods, memory, fs_usage):
            pipeline.endpoint.set_text(kubelet_text(pods))
            changed_at = time.monotonic()
            pipeline.wait(lambda: (web_values().get(key(MEMORY, 'web-0')),
                                   web_values().get(key(FS_USAGE, 'web-0'))) == (memory, fs_usage),
                          30, f'web-0 to show memory {memory} and fs usage {fs_usage}')
            return time.monotonic() - changed_at

        pipeline.wait(lambda: web_values().get(key(FS_USAGE, 'web-0')) == 300, 40,
                      'the first values')
        # The container restarts: new id, same name.
        restart = {**web, 'web-0': (POD_UID_OLD, 'c2', 7000, 20)}
        restart_delay = switch_to(restart, 7000, 20)
        # The pod is re-created: a new uid, so a new pod cgroup and container ids.
        recreated = {**restart, 'web-0': (POD_UID_NEW, 'c3', 1200, 25)}
        recreate_delay = switch_to(recreated, 1200, 25)
        # gone-1 is deleted.
        deleted_at = time.monotonic()
        pipeline.endpoint.set_text(kubelet_text({'web-0': recreated['web-0']}))
        pipeline.wait(lambda: key(MEMORY, 'gone-1') not in web_values(), 30, 'gone-1 to leave')
        gone_after = time.monotonic() - deleted_at
        # Two more scrapes of prometheus2 after the last change.
        time.sleep(3)
        ranges = {metric: prometheus2_range(pipeline.prometheus2, metric, 'web-0')
                  for metric in (MEMORY, FS_USAGE)}
        assert_remote_write_failed_nothing(pipeline.prometheus1)

    # Never old + new, at the exporter or in any sample prometheus2 stored.
    shown = shown[shown.index((7000, 300)):]
    assert set(shown) <= {(7000, 300), (7000, 20), (1200, 20), (7000, 25), (1200, 25)}, shown
    assert set(ranges[MEMORY]) == {7000, 1200}, ranges
    assert set(ranges[FS_USAGE]) == {300, 20, 25}, ranges
    # The new value shows as soon as prometheus1 has scraped and sent it:
    # two scrape intervals, plus the one second remote_write_entry waits
    # before it sends a batch.
    assert restart_delay <= 2 * interval + 1 + 1, restart_delay
    assert recreate_delay <= 2 * interval + 1 + 1, recreate_delay
    if stamp_now:
        # The TTL (3 s) counts from the pod's last sample, which may have
        # arrived up to a scrape interval and a send before the change.
        assert 3 - (interval + 1) <= gone_after <= 3 + 2 * interval + 1 + 3, gone_after
    else:
        assert gone_after <= 2 * interval + 1 + 1, gone_after      # at its stale markers


def prometheus2_range(prometheus2, metric, pod):
    """Every value prometheus2 stored for one pod's metric over the last 5 minutes."""
    result = prometheus2.query(f'{metric}{{pod="{pod}"}}[5m]')
    assert len(result) == 1, result
    return [float(value) for _, value in result[0]['values']]



RECOMMENDED_METRICS = k8s_exporter.RECOMMENDED_METRICS


def test_the_recommended_metrics_are_known_and_the_readme_and_example_agree():
    readme = (HERE / 'README.md').read_text(encoding='utf-8')
    assert f'K8S_EXPORTER_METRICS={",".join(RECOMMENDED_METRICS)}\n' in readme
    assert set(RECOMMENDED_METRICS) <= set(k8s_exporter.METRICS)
    example = (HERE / 'examples' / 'prometheus1.yml').read_text(encoding='utf-8')
    regex = re.search(r'# regex: (container_\(cpu_usage\S+)', example).group(1)
    assert {name for name in KNOWN_METRICS if re.fullmatch(regex, name)} == set(
        RECOMMENDED_METRICS)


@needs_prometheus
def test_pipeline_cpu_counter_rate_in_prometheus2_survives_a_container_restart():
    # Containers only (CRI stats mode): the pod's counter is the sum of its
    # containers, and the restarted one's seconds must stay in it.
    job = 'kubernetes-cadvisor'

    def text(containers):
        return ''.join(f'container_cpu_usage_seconds_total{{container="app",cpu="total",'
                       f'id="{container_id}",namespace="ns",pod="web-0"}} {seconds}\n'
                       for container_id, seconds in containers)

    with contextlib.ExitStack() as stack:
        pipeline = SmallPipeline(stack, text([('c1', 100.0)]), job, exporter_env={
            'K8S_EXPORTER_METRICS': ','.join(RECOMMENDED_METRICS)})
        started = time.monotonic()
        deadline = started + 16
        restarted_at = started + 8
        while time.monotonic() < deadline:      # 0.5 CPU-seconds per second
            elapsed = time.monotonic() - started
            if elapsed < restarted_at - started:
                pipeline.endpoint.set_text(text([('c1', 100.0 + 0.5 * elapsed)]))
            else:         # c1 is gone (a stale marker follows), c2 counts from 0
                pipeline.endpoint.set_text(
                    text([('c2', 0.5 * (elapsed - (restarted_at - started)))]))
            time.sleep(0.1)
        time.sleep(2)
        rate = pipeline.prometheus2.query('rate(container_cpu_usage_seconds_total[6s])')
        resets = pipeline.prometheus2.query('resets(container_cpu_usage_seconds_total[1m])')
        stored = prometheus2_range(pipeline.prometheus2, CPU_USAGE, 'web-0')
        assert_remote_write_failed_nothing(pipeline.prometheus1)
    assert [series['metric']['pod'] for series in rate] == ['web-0']
    # 0.5 CPU-seconds a second; the endpoint's updates and the scrapes jitter
    # on a loaded machine. A reset would show in resets() and as a spike here.
    assert 0.25 <= float(rate[0]['value'][1]) <= 0.75, rate
    assert float(resets[0]['value'][1]) == 0, stored
    assert stored == sorted(stored) and stored[-1] >= 100 + 0.5 * 8, stored



# Every fixture through one prometheus1.

@pytest.fixture(scope='module')
def fixtures_pipeline():
    """All fixtures at once: one scrape job per fixture on one prometheus1.

    Real captures are stamped with the time of each scrape, as a kubelet
    stamps its samples; the synthetic ones are served without timestamps.
    Both ways reach the exporter as Prometheus sends them.
    """
    with contextlib.ExitStack() as stack:
        texts = {name: capture_text(name) for name in ALL_CAPTURES}
        endpoints = {name: stack.enter_context(CadvisorEndpoint(
            text, stamp_now=not name.startswith('synthetic-'))) for name, text in texts.items()}
        exporter = stack.enter_context(Gunicorn())
        prometheus1 = start_prometheus(stack, prometheus1_config(
            {name: endpoint.address for name, endpoint in endpoints.items()},
            [remote_write_entry(exporter.url + '/write')], E2E_CLUSTER), 'prometheus1')
        instance = f'127.0.0.1:{exporter.port}'
        prometheus2 = start_prometheus(stack, prometheus2_config([instance]), 'prometheus2')
        expected = {name: e2e_expected_values(text, job=name) for name, text in texts.items()}
        everything = {key: value for values in expected.values() for key, value in values.items()}
        wait_in_pipeline(
            lambda: prometheus2_pod_values(prometheus2, {instance}) == everything, 60,
            f'prometheus2 to hold the {len(everything)} expected pod series of '
            f'{len(texts)} fixtures', (prometheus1, prometheus2))
        yield {'exporter': exporter, 'prometheus1': prometheus1, 'prometheus2': prometheus2,
               'instance': instance, 'expected': expected, 'everything': everything}


@needs_prometheus
@pytest.mark.parametrize('fixture_name', ALL_CAPTURES)
def test_every_pod_reaches_prometheus2_with_the_readme_value_for_all_five_metrics(
        fixtures_pipeline, fixture_name):
    expected = fixtures_pipeline['expected'][fixture_name]
    assert expected, f'{fixture_name}: the rules give no pod at all'
    assert {key[0] for key in expected} >= {'container_cpu_load_average_10s',
                                            'container_memory_usage_bytes',
                                            'container_memory_max_usage_bytes'}
    arrived = prometheus2_pod_values(
        fixtures_pipeline['prometheus2'], {fixtures_pipeline['instance']},
        f'{{__name__=~"container_.+",job="{fixture_name}"}}')
    assert arrived == expected, describe_difference(arrived, expected)
    # cluster is prometheus1's external label and job its job name, unchanged.
    assert {(key[1], key[2]) for key in arrived} == {(E2E_CLUSTER, fixture_name)}


@needs_prometheus
def test_no_node_level_or_unexported_series_leaks_through_the_pipeline(fixtures_pipeline):
    everything = fixtures_pipeline['everything']
    arrived = prometheus2_pod_values(fixtures_pipeline['prometheus2'],
                                     {fixtures_pipeline['instance']})
    assert arrived == everything, describe_difference(arrived, everything)
    assert {key[0] for key in arrived} == set(EXPORTED_METRICS)
    assert all(namespace and pod for _, _, _, namespace, pod in arrived)
    # The node's own cgroups reach the exporter too; it holds none of them.
    assert exporter_pod_values(fixtures_pipeline['exporter']) == everything


@needs_prometheus
def test_promtool_check_metrics_finds_nothing_on_the_exporters_whole_page(fixtures_pipeline):
    status, _, page = http_request(fixtures_pipeline['exporter'].url + '/metrics')
    assert status == 200
    assert page.count(b'\ncontainer_') >= len(fixtures_pipeline['everything'])
    checked = subprocess.run([PROMTOOL_BINARY, 'check', 'metrics'], input=page,
                             capture_output=True, timeout=60)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, b'', b'')


@needs_prometheus
def test_prometheus1_remote_write_fails_drops_and_retries_nothing(fixtures_pipeline):
    exporter = fixtures_pipeline['exporter']
    counters = assert_remote_write_failed_nothing(fixtures_pipeline['prometheus1'])
    # Every sample prometheus1 sent was received, and every write answered 204.
    assert self_metric(exporter.metrics(), 'k8s_exporter_samples_received_total') >= \
        counters['samples_total']
    writes = {labels: value for (name, labels), value in read_exposition(
        exporter.metrics()).items() if name == 'k8s_exporter_http_requests_total'
        and ('handler', 'write') in labels}
    assert set(writes) == {(('code', '204'), ('handler', 'write'))}, writes


# The port reachable by anyone: bad connections and rotated credentials,
# while a real prometheus1 writes and prometheus2 scrapes.

def remote_write_lag_seconds(prometheus1):
    """How far prometheus1's remote write is behind what it has scraped."""
    newest = prometheus1.self_metric('prometheus_remote_storage_highest_timestamp_in_seconds')
    sent = prometheus1.self_metric(
        'prometheus_remote_storage_queue_highest_sent_timestamp_seconds')
    return newest - sent


@needs_prometheus
def test_prometheus1_lags_no_further_and_every_scrape_succeeds_with_200_bad_connections():
    text = capture_text(SYNTHETIC_MODERN)
    expected = e2e_expected_values(text, 'kubelet')
    each, seconds = 67, 25

    def lags(duration):
        samples, stop_at = [], time.monotonic() + duration
        while time.monotonic() < stop_at:
            samples.append(remote_write_lag_seconds(pipeline.prometheus1))
            time.sleep(0.5)
        return samples

    with contextlib.ExitStack() as stack:
        pipeline = SmallPipeline(stack, text, 'kubelet')
        pipeline.wait_for_values(expected)
        usual = lags(8)
        with MisbehavingClients(pipeline.exporter.port, each, seconds) as bad:
            under_attack = lags(seconds)
        # A stall of one header deadline would show as a lag of 10 s.
        assert max(under_attack) <= max(usual) + 2, (usual, under_attack)
        assert min(bad.cut_off.values()) >= 2 * each, bad.cut_off
        # prometheus2's scrapes (1 s timeout) all succeeded meanwhile.
        up = pipeline.prometheus2.query(f'min_over_time(up[{seconds}s])')
        assert [float(series['value'][1]) for series in up] == [1.0], up
        pipeline.wait_for_values(expected, timeout=10)
        assert_remote_write_failed_nothing(pipeline.prometheus1)


@needs_prometheus
def test_prometheus1_writes_on_through_a_rotation_of_both_secrets(tmp_path):
    """The exporter takes both tokens, prometheus1 moves to the new one, the old one goes."""
    text = capture_text(SYNTHETIC_MODERN)
    expected = e2e_expected_values(text, 'kubelet')
    exporter_secret = secret_volume(tmp_path / 'exporter', {'token': 'first\n'})
    sender_secret = secret_volume(tmp_path / 'prometheus1', {'token': 'first\n'})
    refused_probes = 0

    def probe_status(token):
        nonlocal refused_probes
        status = http_request(exporter.url + '/write', 'POST', b'',
                              {'Authorization': f'Bearer {token}'})[0]
        refused_probes += status == 401
        return status

    with contextlib.ExitStack() as stack:
        endpoint = stack.enter_context(CadvisorEndpoint(text))
        exporter = Gunicorn(env={
            'K8S_EXPORTER_WRITE_BEARER_TOKEN_FILE': str(exporter_secret / 'token')}).start()
        stack.callback(exporter.stop)
        remote = remote_write_entry(exporter.url + '/write')
        remote['authorization'] = {'credentials_file': str(sender_secret / 'token')}
        prometheus1 = start_prometheus(stack, prometheus1_config(
            {'kubelet': endpoint.address}, [remote], E2E_CLUSTER), 'prometheus1')
        wait_in_pipeline(lambda: exporter_pod_values(exporter) == expected, 40,
                         'the exporter to hold the pods', (prometheus1,))
        poll = k8s_exporter.CREDENTIALS_POLL_SECONDS + 5
        secret_volume(exporter_secret, {'token': 'first\nsecond\n'})
        wait_until(lambda: probe_status('second') != 401, poll, 'the second token')
        secret_volume(sender_secret, {'token': 'second\n'})   # read on each request
        time.sleep(3)
        secret_volume(exporter_secret, {'token': 'second\n'})
        wait_until(lambda: probe_status('first') == 401, poll, 'the first token to go')
        rotated_at = time.time()
        wait_until(lambda: self_metric(exporter.metrics(),
                                       'k8s_exporter_last_write_applied_timestamp_seconds')
                   > rotated_at + 2, 10, 'writes after the rotation')
        assert exporter_pod_values(exporter) == expected
        assert requests_counted(exporter.metrics(), 'write', 401) == refused_probes
        assert_remote_write_failed_nothing(prometheus1)


# Pods that go away.

@needs_prometheus
def test_stale_markers_remove_a_deleted_pod_from_the_exporter_and_prometheus2():
    text = capture_text(SYNTHETIC_MODERN)
    gone = 'task-pv-pod'
    with contextlib.ExitStack() as stack:
        # No timestamps on the page: prometheus1 marks vanished series stale.
        pipeline = SmallPipeline(stack, text, 'kubelet')
        pipeline.wait_for_values(e2e_expected_values(text, 'kubelet'))
        remaining = e2e_expected_values(without_pod(text, gone), 'kubelet')
        assert gone not in {key[4] for key in remaining} and remaining
        pipeline.endpoint.set_text(without_pod(text, gone))
        # A few 1 s scrape intervals of each Prometheus plus a 1 s send deadline.
        pipeline.wait_for_values(remaining, timeout=10)
        exporter = pipeline.exporter
        assert self_metric(exporter.metrics(), 'k8s_exporter_stale_markers_total') > 0
        assert self_metric(exporter.metrics(), 'k8s_exporter_expired_series_total') == 0
        assert_remote_write_failed_nothing(pipeline.prometheus1)


@needs_prometheus
def test_ttl_forgets_a_deleted_pod_when_the_kubelet_stamps_its_samples():
    text = capture_text(SYNTHETIC_MODERN)
    gone = 'task-pv-pod'
    ttl_seconds = 3
    # The input series of the pod that will vanish, as the exporter keys them.
    gone_series = {(name, frozenset((k, v) for k, v in labels.items() if v))
                   for name, labels, _ in read_samples(text)
                   if name in EXPORTED_METRICS and labels.get('pod') == gone}
    with contextlib.ExitStack() as stack:
        # Samples stamped by the endpoint: Prometheus honours the timestamps
        # and, as with a real kubelet, sends no stale marker when they stop.
        pipeline = SmallPipeline(stack, text, 'kubelet', stamp_now=True,
                                 exporter_env={'K8S_EXPORTER_TTL_SECONDS': str(ttl_seconds)})
        pipeline.wait_for_values(e2e_expected_values(text, 'kubelet'))
        remaining = e2e_expected_values(without_pod(text, gone), 'kubelet')
        pipeline.endpoint.set_text(without_pod(text, gone))
        removed_at = time.monotonic()
        pipeline.wait_for_values(remaining, timeout=ttl_seconds + 10)
        assert time.monotonic() - removed_at >= ttl_seconds - 1.5
        exporter = pipeline.exporter
        assert self_metric(exporter.metrics(), 'k8s_exporter_stale_markers_total') == 0
        assert self_metric(exporter.metrics(), 'k8s_exporter_expired_series_total') == \
            len(gone_series)
        assert_remote_write_failed_nothing(pipeline.prometheus1)


# Scale out, and a crash.

def hashmod_shard_rules(shard, shards):
    """write_relabel_configs that keep one shard of the pods, as examples/ shows."""
    return [
        keep_exported_metrics_rule(),
        {'source_labels': ['namespace', 'pod'], 'modulus': shards,
         'target_label': '__tmp_pod_shard', 'action': 'hashmod'},
        {'source_labels': ['__tmp_pod_shard'], 'regex': str(shard), 'action': 'keep'},
        {'regex': '__tmp_pod_shard', 'action': 'labeldrop'},
    ]


@needs_prometheus
def test_hashmod_split_exporters_together_hold_exactly_what_one_exporter_holds():
    text = capture_text(CAPTURE_EKS_1_21)
    expected = e2e_expected_values(text, 'kubelet')
    with contextlib.ExitStack() as stack:
        endpoint = stack.enter_context(CadvisorEndpoint(text, stamp_now=True))
        shards = [stack.enter_context(Gunicorn()), stack.enter_context(Gunicorn())]
        whole = stack.enter_context(Gunicorn())
        prometheus1 = start_prometheus(stack, prometheus1_config(
            {'kubelet': endpoint.address},
            [remote_write_entry(shard.url + '/write', hashmod_shard_rules(number, 2))
             for number, shard in enumerate(shards)]
            + [remote_write_entry(whole.url + '/write')], E2E_CLUSTER), 'prometheus1')
        wait_in_pipeline(lambda: exporter_pod_values(whole) == expected and sum(
            len(exporter_pod_values(shard)) for shard in shards) == len(expected), 40,
            'the whole exporter and both shards to hold every pod', [prometheus1])
        first, second = (exporter_pod_values(shard) for shard in shards)
        assert first and second
        assert not pods_of(first) & pods_of(second)
        assert {**first, **second} == exporter_pod_values(whole) == expected
        for shard in shards:
            assert_remote_write_failed_nothing(prometheus1, relabelled=True,
                                               url=shard.url + '/write')
        assert_remote_write_failed_nothing(prometheus1, url=whole.url + '/write')


def process_alive(pid, started_at=None):
    """True while pid runs (not a zombie) and, if given, is the process started at started_at."""
    try:
        stat = read_process_stat(pid)
    except OSError:
        return False
    return stat.state != 'Z' and started_at in (None, stat.start_seconds)


@needs_prometheus
def test_exporter_killed_and_restarted_gets_every_pod_back_and_prometheus1_loses_nothing():
    text = capture_text(SYNTHETIC_MODERN)
    expected = e2e_expected_values(text, 'kubelet')
    with contextlib.ExitStack() as stack:
        pipeline = SmallPipeline(stack, text, 'kubelet')
        pipeline.wait_for_values(expected)
        crashed = pipeline.exporter
        master = crashed.process
        worker_pids = process_children(master.pid)
        assert worker_pids, 'gunicorn has no worker'
        for pid in [master.pid, *worker_pids]:
            os.kill(pid, signal.SIGKILL)
        master.wait(10)
        crashed.process = None
        wait_until(lambda: not any(process_alive(pid) for pid in worker_pids), 10,
                   what='the gunicorn worker to die')
        # prometheus1 keeps scraping and must hold the samples and retry them.
        pipeline.wait(lambda: pipeline.prometheus1.self_metric(
            'prometheus_remote_storage_samples_retried_total'), 20,
            'prometheus1 to retry sends to the dead exporter')
        restarted = pipeline.exporter = Gunicorn(port=crashed.port).start()
        pipeline.wait(lambda: exporter_pod_values(restarted) == expected, 10,
                      'every pod back on the restarted exporter')
        pipeline.wait_for_values(expected, timeout=10)
        assert_remote_write_failed_nothing(pipeline.prometheus1, retries_allowed=True)


# The pages in a real browser: Debian's chromium, headless, loads each page
# from the exporter after prometheus1 has written to it. Its --dump-dom is
# the DOM after the page has loaded: an injected element would show in it,
# and an injected script would have changed the title.

needs_chromium = pytest.mark.skipif(
    not os.access(CHROMIUM_BINARY, os.X_OK),
    reason=f'{CHROMIUM_BINARY} not installed: the browser tests need Debian\'s chromium '
           'package (`make chromium` as root)')


def text_format_label(value):
    return value.replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n')


def browser_kubelet_text():
    """web-0: a pod cgroup, a container and a pause container; and a pod named to inject."""
    web = 'namespace="shop",pod="web-0"'
    injected = (f'namespace="{text_format_label(INJECTED_NAMESPACE)}",'
                f'pod="{text_format_label(INJECTED_POD)}"')
    return '\n'.join([
        f'container_memory_usage_bytes{{container="",id="{POD_UID_OLD}",{web}}} 7000',
        f'container_memory_usage_bytes{{container="app",id="{POD_UID_OLD}/c1",image="app:1",'
        f'{web}}} 5000',
        f'container_memory_usage_bytes{{container="",id="{POD_UID_OLD}/pause",{web}}} 500',
        f'container_fs_usage_bytes{{container="app",device="/dev/vda1",id="{POD_UID_OLD}/c1",'
        f'image="app:1",{web}}} 300',
        f'container_memory_usage_bytes{{container="",id="{POD_UID_NEW}",{injected}}} 42',
    ]) + '\n'


def browser_dom(url):
    """The DOM chromium made of url, and its title as the browser shows it."""
    dom = run_chromium(url, '--dump-dom')
    titles = re.findall(r'<title>(.*?)</title>', dom, re.S)
    assert len(titles) == 1, dom[:2000]
    return dom, html.unescape(titles[0])


@needs_chromium
@needs_prometheus
def test_chromium_shows_every_page_after_a_real_write_and_runs_nothing_injected():
    job = 'kubernetes-cadvisor'
    with contextlib.ExitStack() as stack:
        pipeline = SmallPipeline(stack, browser_kubelet_text(), job)
        url = pipeline.exporter.url
        pipeline.wait(lambda: {key[3:] for key in exporter_pod_values(pipeline.exporter)} == {
                          ('shop', 'web-0'), (INJECTED_NAMESPACE, INJECTED_POD)},
                      40, 'both pods at the exporter')
        refused = '<script>document.title="REFUSED"</script>'
        assert http_request(url + '/write', 'POST', b'x', {'Content-Type': refused})[0] == 415
        injected_query = urllib.parse.urlencode(
            {'namespace': INJECTED_NAMESPACE, 'pod': INJECTED_POD}, quote_via=urllib.parse.quote)
        pages = {path: browser_dom(url + path) for path in (
            '/', '/pods', '/pod?namespace=shop&pod=web-0', '/pod?' + injected_query)}
        assert_remote_write_failed_nothing(pipeline.prometheus1)

    for path, (dom, title) in pages.items():
        assert '<script' not in dom and '<img' not in dom, (path, dom)
        assert title not in ('INJECTED', 'REFUSED'), path     # what the scripts would set
        assert f'k8s_exporter {k8s_exporter.__version__}' in dom, path
    dom, title = pages['/']
    assert title == 'Status - k8s_exporter'
    senders = [row[:4] for row in table_rows(dom) if len(row) == 6]
    assert senders == [[E2E_CLUSTER, job, '2', '5']]
    reasons = [row[3] for row in table_rows(dom) if len(row) == 4]
    assert reasons == [f"unsupported Content-Type '{refused}'; expected application/x-protobuf"]
    dom, title = pages['/pods']
    assert title == 'Pods - k8s_exporter'
    assert [row[:4] + row[-1:] for row in table_rows(dom)] == [
        [E2E_CLUSTER, job, INJECTED_NAMESPACE, INJECTED_POD, '42'],
        [E2E_CLUSTER, job, 'shop', 'web-0', '7000']]
    dom, title = pages['/pod?namespace=shop&pod=web-0']
    assert title == 'Pod shop/web-0 - k8s_exporter'
    assert explained(dom)[f'{MEMORY} = 7000'] == [
        ('pod cgroup', '', POD_UID_OLD, '', '7000', 'counted'),
        ('pause container', '', f'{POD_UID_OLD}/pause', '', '500', 'no: pod cgroup preferred'),
        ('container', 'app', f'{POD_UID_OLD}/c1', '', '5000', 'no: pod cgroup preferred')]
    dom, title = pages['/pod?' + injected_query]
    assert title == f'Pod {INJECTED_NAMESPACE}/{INJECTED_POD} - k8s_exporter'
    assert list(explained(dom)) == [f'{MEMORY} = 42']


# examples/.

SERVICE_ACCOUNT = '/var/run/secrets/kubernetes.io/serviceaccount/'


def promtool_check_config(path):
    checked = subprocess.run([PROMTOOL_BINARY, 'check', 'config', str(path)],
                             capture_output=True, text=True, timeout=60)
    return checked.returncode, checked.stdout + checked.stderr


def example_prometheus1_for_promtool(tmp_path, sharded=False):
    """examples/prometheus1.yml, made checkable on a machine outside Kubernetes.

    promtool stats the service account's token and CA: they become dummy
    files. Debian's build leaves Kubernetes discovery out ("field
    kubernetes_sd_configs not found"), so there the node discovery becomes a
    static target; everything else is checked as written. sharded=True
    uncomments the two-exporter remote_write entry shown at the end.
    """
    text = (HERE / 'examples' / 'prometheus1.yml').read_text(encoding='utf-8')
    for name in ('token', 'ca.crt'):
        (tmp_path / name).write_text('dummy\n')
        text = text.replace(SERVICE_ACCOUNT + name, str(tmp_path / name))
    if sharded:
        head, marker, tail = text.partition('#  - url: http://k8s-exporter-0')
        assert marker, 'the sharded example is gone from examples/prometheus1.yml'
        text = head + '\n'.join(line[1:] for line in (marker + tail).splitlines()) + '\n'
    path = tmp_path / 'prometheus1.yml'
    path.write_text(text)
    status, output = promtool_check_config(path)
    if 'field kubernetes_sd_configs not found' in output:
        text = text.replace('    kubernetes_sd_configs:\n      - role: node\n',
                            '    static_configs:\n      - targets: [node-1:10250]\n')
        path.write_text(text)
    return path


@needs_prometheus
@pytest.mark.parametrize('sharded', [False, True], ids=['one-exporter', 'two-shards'])
def test_example_prometheus1_passes_promtool_check_config(tmp_path, sharded):
    path = example_prometheus1_for_promtool(tmp_path, sharded)
    text = path.read_text()
    assert len(re.findall(r'^  - url: http://k8s-exporter', text, re.M)) == (2 if sharded else 1)
    # The keep rule passes the five names and nothing else; Prometheus
    # anchors the regex at both ends, as fullmatch does.
    keep_regexes = set(re.findall(r'^ +regex: (container_\S+)$', text, re.M))
    assert len(keep_regexes) == 1, keep_regexes
    keep = re.compile(keep_regexes.pop())
    names = set(EXPORTED_METRICS) | {'container_cpu_load_d_average_10s',
                                     'container_memory_usage_bytes_total',
                                     'container_memory_working_set_bytes', 'machine_memory_bytes'}
    assert {name for name in names if keep.fullmatch(name)} == set(EXPORTED_METRICS)
    status, output = promtool_check_config(path)
    assert (status, 'SUCCESS' in output) == (0, True), output


@needs_prometheus
def test_example_prometheus2_passes_promtool_check_config():
    status, output = promtool_check_config(HERE / 'examples' / 'prometheus2.yml')
    assert (status, 'SUCCESS' in output) == (0, True), output


# A second sender: OpenTelemetry's remote-write exporter.

def test_opentelemetry_remote_write_exporter_is_a_sender_too():
    # In this process: remote.proto's package (k8s_exporter.remote) no longer
    # clashes with the "prometheus" package the sender registers.
    if importlib.util.find_spec('opentelemetry.exporter.prometheus_remote_write') is None:
        pytest.skip('opentelemetry-exporter-prometheus-remote-write (requirements-dev.txt) '
                    'is not installed')
    from opentelemetry.exporter.prometheus_remote_write import (
        PrometheusRemoteWriteMetricsExporter,
    )
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    pod_a = '/kubepods/burstable/pod0a0a0a0a-1111-4222-8333-444444444444'
    pod_b = '/kubepods/besteffort/pod0b0b0b0b-1111-4222-8333-444444444444'
    modern = {'job': 'otel', 'namespace': 'shop', 'pod': 'cart-0'}
    legacy = {'job': 'otel', 'namespace': 'shop', 'pod_name': 'cart-1'}
    gauges = {
        'container_memory_usage_bytes': [
            ({**modern, 'id': pod_a}, 1000),                                    # pod cgroup
            ({**modern, 'container': 'app', 'id': pod_a + '/c1'}, 600),
            ({**modern, 'container': 'POD', 'id': pod_a + '/c0'}, 100),
            ({**legacy, 'container_name': 'app', 'id': pod_b + '/c1'}, 300),    # no pod cgroup
            ({**legacy, 'container_name': 'POD', 'id': pod_b + '/c0'}, 200),
            ({'job': 'otel', 'id': '/'}, 8e9),                                  # the node
        ],
        'container_fs_usage_bytes': [
            ({**modern, 'container': 'app', 'id': pod_a + '/c1', 'device': '/dev/sda1'}, 123),
            ({**modern, 'container': 'log', 'id': pod_a + '/c2', 'device': '/dev/sda1'}, 7),
        ],
        'container_fs_limit_bytes': [
            ({**modern, 'container': 'app', 'id': pod_a + '/c1', 'device': '/dev/sda1'}, 5e10),
            ({**modern, 'container': 'log', 'id': pod_a + '/c2', 'device': '/dev/sda1'}, 5e10),
        ],
        'container_network_receive_bytes_total': [({**modern, 'interface': 'eth0'}, 5)],
    }
    with Gunicorn() as exporter:
        # Its period never comes: the reader exports once, at shutdown.
        reader = PeriodicExportingMetricReader(
            PrometheusRemoteWriteMetricsExporter(endpoint=exporter.url + '/write'),
            export_interval_millis=3_600_000)
        provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False,
                                 resource=Resource.create({'cluster': 'otel-cluster'}))
        meter = provider.get_meter('k8s-exporter-test')
        for name, points in gauges.items():
            gauge = meter.create_gauge(name)
            for attributes, value in points:
                gauge.set(value, attributes)
        provider.shutdown()
        assert exporter_pod_values(exporter) == {
            ('container_memory_usage_bytes', 'otel-cluster', 'otel', 'shop', 'cart-0'): 1000,
            ('container_memory_usage_bytes', 'otel-cluster', 'otel', 'shop', 'cart-1'): 500,
            ('container_fs_usage_bytes', 'otel-cluster', 'otel', 'shop', 'cart-0'): 130,
            ('container_fs_limit_bytes', 'otel-cluster', 'otel', 'shop', 'cart-0'): 5e10,
        }
        page = exporter.metrics()
        assert requests_counted(page, 'write', 204) == 1
        assert self_metric(page, 'k8s_exporter_samples_received_total') == 11


# make demo.

def process_descendants(pid):
    found, pending = [], [pid]
    while pending:
        for child in process_children(pending.pop()):
            found.append(child)
            pending.append(child)
    return found


@needs_prometheus
def test_demo_prints_working_urls_and_ctrl_c_stops_every_process_it_started(tmp_path):
    stderr_path = tmp_path / 'demo.stderr'
    lines = []
    with open(stderr_path, 'wb') as stderr_file:
        demo = subprocess.Popen(
            [sys.executable, str(HERE / 'demo_k8s_exporter.py'), '--fixture', SYNTHETIC_MODERN],
            cwd=HERE, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr_file,
            text=True)

    def read_stdout():
        for line in demo.stdout:
            lines.append(line)

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    try:
        wait_until(lambda: demo.poll() is not None or any('Ctrl-C' in line for line in lines),
                   60, what='the demo to print its URLs')
        assert demo.poll() is None, f'demo exited: {lines}\n{stderr_path.read_text()}'
        urls = dict(re.findall(r'^(exporter /metrics|prometheus2 graph) +(http\S+)$',
                               ''.join(lines), re.M))
        assert set(urls) == {'exporter /metrics', 'prometheus2 graph'}, lines
        status, _, page = http_request(urls['exporter /metrics'])
        assert status == 200
        pods = {key[3:] for key in pod_values_in(page.decode()) if key[0] == MEMORY}
        assert pods == {key[3:] for key in e2e_expected_values(capture_text(SYNTHETIC_MODERN), 'x')}
        # Debian's build redirects /graph to its classic UI, query string kept.
        with urllib.request.urlopen(urls['prometheus2 graph'], timeout=10) as graph:
            assert graph.status == 200
            assert '/classic/graph?g0.expr=container_memory_usage_bytes&' in graph.url or \
                '/graph?g0.expr=container_memory_usage_bytes&' in graph.url
            assert b'<title>Prometheus' in graph.read()
        children = {pid: read_process_stat(pid).start_seconds
                    for pid in process_descendants(demo.pid)}
        # endpoint thread aside: gunicorn master and worker, two Prometheus.
        assert len(children) == 4, children
        demo.send_signal(signal.SIGINT)
        assert demo.wait(40) == 0
        reader.join(5)
        assert lines[-1] == 'stopped.\n'
        assert [pid for pid, started in children.items() if process_alive(pid, started)] == []
    finally:
        if demo.poll() is None:
            for pid in process_descendants(demo.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            demo.kill()
            demo.wait()
        demo.stdout.close()
