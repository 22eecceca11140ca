"""Benchmark k8s_exporter against Prometheus's own remote-write receiver.

    make bench                              # all of it, ~15-25 min on 2 cores
    make bench-quick                        # small sizes, a smoke run
    .venv/bin/python bench_k8s_exporter.py --pods 1000,10000 --keep-pods 10000 \
        --growth-pods 150000                # the sizes (0 leaves a part out)
    .venv/bin/python bench_k8s_exporter.py --profile 10000   # the kept path, in process

A Prometheus with --web.enable-remote-write-receiver plus /federate is what a
user would run instead of the exporter, so it is the yardstick: both get the
same pre-encoded remote-write bodies, built from a model of kubelet
/metrics/cadvisor output, in the same run. Measured after one warm-up pass
over the same series (steady state), per size:

  1. ingest: samples per second of wall time, and per CPU-second of the
     server process (utime + stime from /proc/PID/stat of the gunicorn worker
     and of prometheus), RW 1.0 and RW 2.0 (Prometheus 2.42 takes RW 1.0 only),
     each server measured while the other is quiet;
  2. scrape: /metrics (median and p99 of 20), plain and gzip, beside
     /federate for the same five metric names over the same data;
  3. memory: the worker's RSS after loading, and bytes per stored input series;
  4. /metrics latency while writes run at full speed;
  5. churn: pods replaced every pass, short TTL and stale markers; input
     series and RSS must stay flat;
  6. pages: /pods rendered (first page, and filtered by namespace), and the
     latency of each write under full write load alone, with a client
     viewing /pods back to back, and with /pods viewed once a second, where
     the writes in flight during a view are set beside the others;
  7. pages in process, without HTTP, at 10,000 and 100,000 pods
     (--pages-pods): each kind of /pods view and the status page, against
     the targets of 50 and 100 ms;
  8. keep-rule traffic (--keep-pods): the five families only, as prometheus1
     sends them with the README's keep rule, every value changed each pass:
     RW1 beside Prometheus on the same bodies, RW2, and values that repeat
     as real kubelets send them;
  9. growth (--growth-pods, the exporter alone: Prometheus needs over 10 GiB
     at 10,000 full pods): ingest per CPU-second against 8, /metrics while
     the pods are first loaded and after every value changed (worst of 5),
     bytes per input series, and from those costs the pods one exporter
     takes at a 15 s scrape interval within 60% of a core.
"""

import argparse
import array
import functools
import http.client
import math
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time

import snappy

from demo_k8s_exporter import PROMETHEUS_BINARY, ExporterProcess, Prometheus
from k8s_exporter import DEFAULT_METRICS as EXPORTED
from k8s_exporter import (
    RECOMMENDED_METRICS,
    Config,
    Exporter,
    PodKey,
    Sample,
    SeriesKey,
    read_process_stat,
)

RW1_HEADERS = {'Content-Type': 'application/x-protobuf;proto=prometheus.WriteRequest',
               'Content-Encoding': 'snappy', 'X-Prometheus-Remote-Write-Version': '0.1.0'}
RW2_HEADERS = {'Content-Type': 'application/x-protobuf;proto=io.prometheus.write.v2.Request',
               'Content-Encoding': 'snappy', 'X-Prometheus-Remote-Write-Version': '2.0.0'}
MAX_SAMPLES_PER_SEND = 2000   # Prometheus's queue_config default
SENDERS = 4                   # concurrent shards, as a queue manager runs a few in steady state
PODS_PER_NODE = 30
STALE_NAN = struct.unpack('<d', struct.pack('<Q', 0x7FF0000000000002))[0]
CLOCK_TICKS = os.sysconf('SC_CLK_TCK')
PAGE_SIZE = os.sysconf('SC_PAGE_SIZE')


###############################################################################
# A kubelet /metrics/cadvisor model ###########################################
###############################################################################

# Families every cgroup reports: (name, counter?, extra label sets).
CGROUP_FAMILIES = [
    ('container_cpu_cfs_periods_total', True, [()]),
    ('container_cpu_cfs_throttled_periods_total', True, [()]),
    ('container_cpu_cfs_throttled_seconds_total', True, [()]),
    ('container_cpu_load_average_10s', False, [()]),
    ('container_cpu_system_seconds_total', True, [()]),
    ('container_cpu_usage_seconds_total', True, [(('cpu', 'total'),)]),
    ('container_cpu_user_seconds_total', True, [()]),
    ('container_file_descriptors', False, [()]),
    ('container_last_seen', False, [()]),
    ('container_memory_cache', False, [()]),
    ('container_memory_failcnt', True, [()]),
    ('container_memory_failures_total', True,
     [(('failure_type', kind), ('scope', scope)) for kind in ('pgfault', 'pgmajfault')
      for scope in ('container', 'hierarchy')]),
    ('container_memory_mapped_file', False, [()]),
    ('container_memory_max_usage_bytes', False, [()]),
    ('container_memory_rss', False, [()]),
    ('container_memory_swap', False, [()]),
    ('container_memory_usage_bytes', False, [()]),
    ('container_memory_working_set_bytes', False, [()]),
    ('container_oom_events_total', True, [()]),
    ('container_processes', False, [()]),
    ('container_sockets', False, [()]),
    ('container_spec_cpu_period', False, [()]),
    ('container_spec_cpu_quota', False, [()]),
    ('container_spec_cpu_shares', False, [()]),
    ('container_spec_memory_limit_bytes', False, [()]),
    ('container_spec_memory_reservation_limit_bytes', False, [()]),
    ('container_spec_memory_swap_limit_bytes', False, [()]),
    ('container_start_time_seconds', False, [()]),
    ('container_tasks_state', False,
     [(('state', state),) for state in ('iowaiting', 'running', 'sleeping', 'stopped',
                                         'uninterruptible')]),
    ('container_threads', False, [()]),
    ('container_threads_max', False, [()]),
]
# Per core, as cAdvisor with per-cpu accounting reports for the pod cgroup.
NODE_CORES = 4
PER_CORE_FAMILY = ('container_cpu_usage_seconds_total', True,
                   [(('cpu', f'cpu{core:02d}'),) for core in range(NODE_CORES)])
BLKIO_OPERATIONS = ('Async', 'Discard', 'Read', 'Sync', 'Total', 'Write')
# Block I/O of the pod cgroup, per device of the node.
POD_IO_FAMILIES = ['container_fs_reads_bytes_total', 'container_fs_reads_total',
                   'container_fs_writes_bytes_total', 'container_fs_writes_total']
# Filesystem of a container's writable layer, per device.
CONTAINER_FS_FAMILIES = [
    ('container_fs_inodes_free', False), ('container_fs_inodes_total', False),
    ('container_fs_io_current', False), ('container_fs_io_time_seconds_total', True),
    ('container_fs_io_time_weighted_seconds_total', True), ('container_fs_limit_bytes', False),
    ('container_fs_read_seconds_total', True), ('container_fs_reads_merged_total', True),
    ('container_fs_reads_total', True), ('container_fs_sector_reads_total', True),
    ('container_fs_sector_writes_total', True), ('container_fs_usage_bytes', False),
    ('container_fs_write_seconds_total', True), ('container_fs_writes_merged_total', True),
    ('container_fs_writes_total', True)]
# The pause container owns the pod's network namespace.
NETWORK_FAMILIES = [f'container_network_{direction}_{what}_total'
                    for direction in ('receive', 'transmit')
                    for what in ('bytes', 'errors', 'packets_dropped', 'packets')]
NODE_CGROUPS = ('/', '/kubepods', '/kubepods/besteffort', '/kubepods/burstable',
                '/system.slice/containerd.service', '/system.slice/docker.service',
                '/system.slice/kubelet.service', '/system.slice/sshd.service')
MACHINE_FAMILIES = ('machine_cpu_cores', 'machine_cpu_physical_cores', 'machine_cpu_sockets',
                    'machine_memory_bytes', 'machine_scrape_error')

NAMESPACES = ('default', 'payments', 'checkout-service', 'kube-system', 'monitoring',
              'logging', 'ingress-nginx', 'data-pipeline', 'search-platform', 'ml-serving')
WORKLOADS = [  # (workload, app containers with their images)
    ('api-gateway', [('gateway', 'registry.example.com/platform/api-gateway:v2.31.4'),
                     ('istio-proxy', 'docker.io/istio/proxyv2:1.20.1')]),
    ('orders-worker', [('worker', 'registry.example.com/checkout/orders-worker:2024.06.1')]),
    ('fluent-bit', [('fluent-bit', 'cr.fluentbit.io/fluent/fluent-bit:2.2.2')]),
    ('redis-cache', [('redis', 'docker.io/library/redis:7.2.4-alpine'),
                     ('metrics', 'docker.io/oliver006/redis_exporter:v1.58.0'),
                     ('istio-proxy', 'docker.io/istio/proxyv2:1.20.1')]),
    ('nginx-frontend', [('nginx', 'docker.io/library/nginx:1.25.3-alpine')]),
    ('search-indexer', [('indexer', 'registry.example.com/search/indexer:v0.42.0'),
                        ('istio-proxy', 'docker.io/istio/proxyv2:1.20.1')]),
]
PAUSE_IMAGE = '602401143452.dkr.ecr.eu-west-1.amazonaws.com/eks/pause:3.5'
DEVICES = ('/dev/nvme0n1p1',)


class Series:
    """One input series: its sorted labels, and how its value moves per pass."""
    __slots__ = ('labels', 'base', 'step')

    def __init__(self, labels, base, step):
        self.labels = labels
        self.base = base
        self.step = step


def cluster_model(pods, generation=0, seed=1, keep=None):
    """The series prometheus1 would forward for `pods` pods on 30-pod nodes.

    Labels are what a kube-prometheus-stack kubelet ServiceMonitor attaches
    (endpoint, instance, job, metrics_path, node, service) plus an external
    `cluster` label; empty labels are absent, as Prometheus drops them.
    generation makes every pod name and uid new, for churn. keep, a set of
    family names, is prometheus1's keep rule: only those are sent.
    """
    rng = random.Random(seed * 1_000_003 + generation)
    series = []
    nodes = math.ceil(pods / PODS_PER_NODE)
    for node in range(nodes):
        node_name = f'ip-10-{node // 250}-{node % 250}-{17 + node % 200}.eu-west-1.compute.internal'
        target = [('cluster', 'prod-eu-west-1'), ('endpoint', 'https-metrics'),
                  ('instance', f'10.{node // 250}.{node % 250}.17:10250'), ('job', 'kubelet'),
                  ('metrics_path', '/metrics/cadvisor'), ('node', node_name),
                  ('service', 'kube-prometheus-stack-kubelet')]
        node_pods = min(PODS_PER_NODE, pods - node * PODS_PER_NODE)
        cgroups = []   # (kind, labels without __name__)
        for cgroup in NODE_CGROUPS:
            cgroups.append(('node', target + [('id', cgroup)]))
        for _ in range(node_pods):
            workload, containers = WORKLOADS[rng.randrange(len(WORKLOADS))]
            namespace = NAMESPACES[rng.randrange(len(NAMESPACES))]
            uid = '%08x-%04x-4%03x-%04x-%012x' % (
                rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(12),
                0x8000 | rng.getrandbits(14), rng.getrandbits(48))
            pod = f'{workload}-{rng.getrandbits(40):010x}-{rng.getrandbits(25):05x}'[:60]
            qos = 'burstable' if rng.random() < 0.8 else 'besteffort'
            pod_cgroup = f'/kubepods/{qos}/pod{uid}'
            identity = [('namespace', namespace), ('pod', pod)]
            cgroups.append(('pod', target + identity + [('id', pod_cgroup)]))
            for container, image in [('POD', PAUSE_IMAGE)] + containers:
                cgroups.append(('pause' if container == 'POD' else 'app', target + identity + [
                    ('container', container), ('id', f'{pod_cgroup}/{rng.getrandbits(256):064x}'),
                    ('image', image), ('name', f'k8s_{container}_{pod}_{namespace}_{uid}_0')]))
        for kind, base_labels in cgroups:
            families = list(CGROUP_FAMILIES)
            if kind == 'pod':
                families.append(PER_CORE_FAMILY)
                families += [('container_blkio_device_usage_total', True,
                              [(('device', device), ('major', '259'), ('minor', '0'),
                                ('operation', operation))
                               for device in DEVICES for operation in BLKIO_OPERATIONS])]
                families += [(name, True, [(('device', device),) for device in DEVICES])
                             for name in POD_IO_FAMILIES]
            if kind in ('pause', 'app'):
                families += [(name, counter, [(('device', device),) for device in DEVICES])
                             for name, counter in CONTAINER_FS_FAMILIES]
                families.append(('container_ulimits_soft', False,
                                 [(('ulimit', 'max_open_files'),)]))
            if kind == 'pause':
                families += [(name, True, [(('interface', 'eth0'),)])
                             for name in NETWORK_FAMILIES]
            if keep is not None:
                families = [family for family in families if family[0] in keep]
            for name, counter, extras in families:
                for extra in extras:
                    labels = sorted([('__name__', name), *base_labels, *extra])
                    base = float(rng.randrange(1, 1 << 30))
                    step = float(rng.randrange(1, 5000)) if counter or name in EXPORTED else 0.0
                    series.append(Series(tuple(labels), base, step))
        for name in MACHINE_FAMILIES if keep is None else ():
            labels = sorted([('__name__', name), *target,
                             ('boot_id', f'{rng.getrandbits(128):032x}'),
                             ('machine_id', f'ec2{rng.getrandbits(116):029x}'),
                             ('system_uuid', f'ec2{rng.getrandbits(116):029x}')])
            series.append(Series(tuple(labels), float(rng.randrange(1, 64)), 0.0))
    return series


# As real kubelets send them: a filesystem's limit does not move, the 10 s
# cpu load is 0 unless the kubelet is started to measure it, and the most
# memory a container used moves only when it uses more.
REPEATED_FAMILIES = ('container_fs_limit_bytes', 'container_cpu_load_average_10s',
                     'container_memory_max_usage_bytes')


def with_repeated_values(series):
    """The series with the values of REPEATED_FAMILIES the same every pass."""
    return [Series(item.labels, 0.0 if item.labels[0][1] == 'container_cpu_load_average_10s'
                   else item.base, 0.0) if item.labels[0][1] in REPEATED_FAMILIES else item
            for item in series]


def interleave_like_shards(series, shards):
    """Reorder series as a queue manager's shards would send them.

    Prometheus hashes each series to one shard; a shard's batch holds the
    series of a run of consecutive scrapes, not of one pod.
    """
    queues = [[] for _ in range(shards)]
    for item in series:
        queues[hash(item.labels) % shards].append(item)
    return queues


###############################################################################
# Remote-write encoding, with samples patched in place per pass ###############
###############################################################################

def _varint(value):
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag, payload):
    return tag + _varint(len(payload)) + payload


# A sample message, tag and length included, for a 6-byte-varint timestamp
# (2^35 <= ms < 2^42: years 1971-2109): its bytes have a fixed length, so a
# body built once is re-stamped for every pass by overwriting 16 bytes.
SAMPLE_FIELD_HEADER = b'\x12\x10\x09'
SAMPLE_BYTES = 15


def _sample_bytes(value, timestamp_varint):
    return struct.pack('<d', value) + b'\x10' + timestamp_varint


class EncodedBatch:
    """One request body without compression; offsets of its sample slots."""
    __slots__ = ('body', 'offsets', 'series')

    def __init__(self, body, offsets, series):
        self.body = body
        self.offsets = offsets
        self.series = series


def encode_rw1(batch, placeholder):
    label_cache = {}
    parts = []
    offsets = array.array('Q')
    position = 0
    for item in batch:
        encoded = []
        for pair in item.labels:
            label = label_cache.get(pair)
            if label is None:
                name, value = pair
                label = label_cache[pair] = _field(b'\x0a', _field(b'\x0a', name.encode())
                                                   + _field(b'\x12', value.encode()))
            encoded.append(label)
        timeseries = b''.join(encoded) + SAMPLE_FIELD_HEADER + placeholder
        head = b'\x0a' + _varint(len(timeseries))
        parts.append(head)
        parts.append(timeseries)
        offsets.append(position + len(head) + len(timeseries) - SAMPLE_BYTES)
        position += len(head) + len(timeseries)
    return EncodedBatch(bytearray(b''.join(parts)), offsets, batch)


def encode_rw2(batch, placeholder):
    symbols = {'': 0}
    pair_refs = {}
    refs_of = []
    for item in batch:
        refs = []
        for pair in item.labels:
            encoded = pair_refs.get(pair)
            if encoded is None:
                for text in pair:
                    if text not in symbols:
                        symbols[text] = len(symbols)
                encoded = pair_refs[pair] = (_varint(symbols[pair[0]])
                                             + _varint(symbols[pair[1]]))
            refs.append(encoded)
        refs_of.append(b''.join(refs))
    parts = [_field(b'\x22', text.encode()) for text in symbols]
    position = sum(map(len, parts))
    offsets = array.array('Q')
    for refs in refs_of:
        timeseries = _field(b'\x0a', refs) + SAMPLE_FIELD_HEADER + placeholder
        head = b'\x2a' + _varint(len(timeseries))
        parts.append(head)
        parts.append(timeseries)
        offsets.append(position + len(head) + len(timeseries) - SAMPLE_BYTES)
        position += len(head) + len(timeseries)
    return EncodedBatch(bytearray(b''.join(parts)), offsets, batch)


def encode_batches(series, protocol, shards=SENDERS):
    """Batches of at most MAX_SAMPLES_PER_SEND series, interleaved across shards."""
    placeholder = _sample_bytes(0.0, _varint(1 << 40))
    encode = encode_rw1 if protocol == 1 else encode_rw2
    per_shard = []
    for queue in interleave_like_shards(series, shards):
        per_shard.append([encode(queue[start:start + MAX_SAMPLES_PER_SEND], placeholder)
                          for start in range(0, len(queue), MAX_SAMPLES_PER_SEND)])
    batches = []
    for round_ in range(max(map(len, per_shard))):
        batches.extend(shard[round_] for shard in per_shard if round_ < len(shard))
    return batches


def stamp_bodies(batches, pass_number, timestamp_ms, stale=False):
    """Compressed bodies for one pass: every sample at timestamp_ms."""
    timestamp_varint = _varint(timestamp_ms)
    assert len(timestamp_varint) == 6, timestamp_ms
    pack = struct.Struct('<d').pack
    bodies = []
    for batch in batches:
        body = batch.body
        for offset, item in zip(batch.offsets, batch.series):
            value = STALE_NAN if stale else item.base + pass_number * item.step
            body[offset:offset + SAMPLE_BYTES] = pack(value) + b'\x10' + timestamp_varint
        bodies.append(snappy.compress(bytes(body)))
    return bodies


###############################################################################
# Processes under test ########################################################
###############################################################################

def cpu_seconds(pid):
    return read_process_stat(pid).cpu_seconds


def rss_bytes(pid):
    return read_process_stat(pid).resident_bytes


def start_exporter(env=None):
    """k8s_exporter under gunicorn, started exactly as `make run` starts it."""
    return ExporterProcess(env).start()


def start_prometheus():
    """Debian's prometheus as a remote-write receiver with nothing to scrape."""
    return Prometheus({'global': {}, 'scrape_configs': []}, ready_timeout=60,
                      binary=shutil.which('prometheus') or PROMETHEUS_BINARY,
                      extra_args=['--web.enable-remote-write-receiver',
                                  '--log.level=warn']).start()


def self_metric(exporter, name):
    for line in exporter.metrics().splitlines():
        if line.startswith(name + ' '):
            return float(line.split()[1])
    raise RuntimeError(f'{name} not in /metrics')


###############################################################################
# Measurements ################################################################
###############################################################################

def send_pass(port, bodies, headers, senders=SENDERS, latencies=None, spans=None):
    """POST every body over keep-alive connections from concurrent senders.

    Returns (wall seconds, client CPU seconds, failed requests, first error);
    appends each request's seconds to latencies, and (start, end) of
    time.perf_counter() to spans, when given.
    """
    next_index = iter(range(len(bodies)))
    lock = threading.Lock()
    failures = []

    def sender():
        connection = http.client.HTTPConnection('127.0.0.1', port, timeout=120)
        try:
            while True:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    return
                started = time.perf_counter()
                connection.request('POST', '/api/v1/write', body=bodies[index], headers=headers)
                response = connection.getresponse()
                reply = response.read()
                ended = time.perf_counter()
                if latencies is not None:
                    latencies.append(ended - started)
                if spans is not None:
                    spans.append((started, ended))
                if response.status >= 300:
                    failures.append(f'{response.status} {reply[:200]!r}')
        except (OSError, http.client.HTTPException) as error:
            failures.append(repr(error))
        finally:
            connection.close()

    threads = [threading.Thread(target=sender) for _ in range(senders)]
    client_before = sum(os.times()[:2])
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return wall, sum(os.times()[:2]) - client_before, len(failures), (failures or [''])[0]


# A measurement covers at least this many samples: one 1,000-pod pass takes
# well under a second of server CPU, and single passes varied by 20% run to run.
MEASURED_SAMPLES = 1_000_000


def measure_ingest_passes(servers, batches, headers, samples, clock, first_pass,
                          bystanders=()):
    """Send the same freshly stamped bodies to each server, pass after pass.

    Each server is measured alone: first the others (and the bystanders,
    servers not measured here) must have gone quiet. Returns one
    measurement per server over all passes, and the next pass number.
    """
    passes = max(1, math.ceil(MEASURED_SAMPLES / samples))
    parts = {server.name: [] for server in servers}
    for number in range(first_pass, first_pass + passes):
        bodies = stamp_bodies(batches, number, clock.next())
        for server in servers:
            if not wait_until_quiet([other.pid for other in (*servers, *bystanders)
                                     if other is not server]):
                print(f'   measuring {server.name} while another server is busy', file=sys.stderr)
            parts[server.name].append(measure_ingest(server, bodies, headers, samples))
        del bodies
    results = []
    for server in servers:
        runs = parts[server.name]
        wall = sum(run['wall'] for run in runs)
        cpu = sum(run['cpu'] for run in runs)
        results.append({'wall': wall, 'cpu': cpu,
                        'client_cpu': max(run['client_cpu'] for run in runs),
                        'failed': sum(run['failed'] for run in runs),
                        'per_wall': samples * passes / wall,
                        'per_cpu': samples * passes / cpu if cpu else math.inf})
    return results, first_pass + passes


QUIET_CPU_SHARE = 0.05      # of one core
QUIET_WINDOW_SECONDS = 0.5
QUIET_DEADLINE_SECONDS = 30


def wait_until_quiet(pids):
    """Wait until the processes use under 5% of a core between them.

    After a large write Prometheus keeps a core busy for seconds (garbage
    collection, head maintenance): on two cores that work would be billed
    to whichever server is measured next, as slower ingest. Gives up after
    QUIET_DEADLINE_SECONDS and returns False.
    """
    deadline = time.monotonic() + QUIET_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        before = sum(map(cpu_seconds, pids))
        time.sleep(QUIET_WINDOW_SECONDS)
        if sum(map(cpu_seconds, pids)) - before <= QUIET_CPU_SHARE * QUIET_WINDOW_SECONDS:
            return True
    return False


def measure_ingest(server, bodies, headers, samples, latencies=None, spans=None):
    cpu_before = cpu_seconds(server.pid)
    wall, client_cpu, failed, first = send_pass(server.port, bodies, headers,
                                                latencies=latencies, spans=spans)
    cpu = cpu_seconds(server.pid) - cpu_before
    if failed:
        print(f'  {server.name}: {failed} requests failed, first: {first}', file=sys.stderr)
    return {'wall': wall, 'cpu': cpu, 'client_cpu': client_cpu, 'failed': failed,
            'per_wall': samples / wall, 'per_cpu': samples / cpu if cpu else math.inf}


def percentile(values, fraction):
    """Nearest rank: of 20 values, p99 is the largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def scrape_latencies(port, path, gzip_encoding, count, budget_seconds=math.inf):
    """Latency of count scrapes; fewer (at least 3) if they overrun budget_seconds."""
    headers = {'Accept-Encoding': 'gzip'} if gzip_encoding else {'Accept-Encoding': 'identity'}
    connection = http.client.HTTPConnection('127.0.0.1', port, timeout=120)
    seconds, size = [], 0
    deadline = time.monotonic() + budget_seconds
    try:
        for number in range(count):
            if number >= 3 and time.monotonic() > deadline:
                break
            started = time.perf_counter()
            connection.request('GET', path, headers=headers)
            response = connection.getresponse()
            size = len(response.read())
            seconds.append(time.perf_counter() - started)
            if response.status != 200:
                raise RuntimeError(f'GET {path}: {response.status}')
    finally:
        connection.close()
    return {'median': statistics.median(seconds), 'p99': percentile(seconds, 0.99),
            'bytes': size, 'count': len(seconds)}


PODS_FILTERED_PATH = '/pods?namespace=payments'   # a tenth of the model's pods
PACED_VIEW_SECONDS = 1.0     # an operator clicking through the pages, quickly
FEDERATE_PATH = '/federate?' + '&'.join(f'match%5B%5D={name}' for name in EXPORTED)


def scrapes_during(port, path, action, every_seconds=0.0, spans=None):
    """Run action() while one client scrapes path back to back, or one
    scrape every every_seconds; return (result, seconds). Appends (start,
    end) of time.perf_counter() of each scrape to spans when given."""
    done = threading.Event()
    seconds = []

    def scraper():
        connection = http.client.HTTPConnection('127.0.0.1', port, timeout=120)
        try:
            while not done.is_set():
                started = time.perf_counter()
                connection.request('GET', path)
                response = connection.getresponse()
                response.read()
                ended = time.perf_counter()
                seconds.append(ended - started)
                if spans is not None:
                    spans.append((started, ended))
                done.wait(max(0.0, every_seconds - (ended - started)))
        finally:
            connection.close()

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        result = action()
    finally:
        done.set()
        thread.join(timeout=120)
    return result, seconds


class PassClock:
    """One timestamp per pass: now, and later than the last pass.

    Never ahead of the clock: /federate only sees samples up to now.
    """

    def __init__(self):
        self.last = 0

    def next(self):
        self.last = max(int(time.time() * 1000), self.last + 1)
        return self.last


def bench_size(pods, clock, results, scrape_count):
    print(f'== {pods} pods: building payloads', file=sys.stderr)
    built = time.perf_counter()
    series = cluster_model(pods)
    samples = len(series)
    exported = sum(1 for item in series if item.labels[0][1] in EXPORTED)
    rw1 = encode_batches(series, 1)
    rw2 = encode_batches(series, 2)
    print(f'   {samples} series/pass, {exported / samples:.1%} exported, {len(rw1)} requests, '
          f'built in {time.perf_counter() - built:.1f} s', file=sys.stderr)
    row = results.setdefault(pods, {'samples': samples, 'exported_share': exported / samples,
                                    'requests': len(rw1)})
    exporter = prometheus = None
    try:
        exporter = start_exporter()
        prometheus = start_prometheus()
        time.sleep(1.0)
        idle_rss = rss_bytes(exporter.pid)
        warm = stamp_bodies(rw1, 0, clock.next())
        row['rw1_body_bytes'] = sum(map(len, warm)) / len(warm)
        for server in (exporter, prometheus):
            measure_ingest(server, warm, RW1_HEADERS, samples)
        del warm
        print('   ingest RW1', file=sys.stderr)
        (row['exporter_rw1'], row['prometheus_rw1']), next_pass = measure_ingest_passes(
            (exporter, prometheus), rw1, RW1_HEADERS, samples, clock, first_pass=1)
        bodies = stamp_bodies(rw2, next_pass, clock.next())
        row['rw2_body_bytes'] = sum(map(len, bodies)) / len(bodies)
        del bodies
        print('   ingest RW2', file=sys.stderr)
        (row['exporter_rw2'],), next_pass = measure_ingest_passes(
            (exporter,), rw2, RW2_HEADERS, samples, clock, first_pass=next_pass,
            bystanders=(prometheus,))
        # An uppercase external label (Region) sorts before __name__: the
        # decoder must find the name elsewhere than first, at little cost.
        print('   ingest with an uppercase external label', file=sys.stderr)
        region = [Series(tuple(sorted((*item.labels, ('Region', 'eu-west-1')))), item.base,
                         item.step) for item in series]
        for protocol, headers in ((1, RW1_HEADERS), (2, RW2_HEADERS)):
            (row[f'exporter_rw{protocol}_region'],), next_pass = measure_ingest_passes(
                (exporter,), encode_batches(region, protocol), headers, samples, clock,
                first_pass=next_pass, bystanders=(prometheus,))
        del region
        # The README's recommended metrics for Kubernetes 1.30+, on the same
        # bodies: more of them are kept, and two are counters.
        print('   ingest RW1 with the recommended metrics', file=sys.stderr)
        recommended = start_exporter({'K8S_EXPORTER_METRICS': ','.join(RECOMMENDED_METRICS)})
        try:
            measure_ingest(recommended, stamp_bodies(rw1, next_pass, clock.next()),
                           RW1_HEADERS, samples)
            (row['recommended_rw1'],), next_pass = measure_ingest_passes(
                (recommended,), rw1, RW1_HEADERS, samples, clock, first_pass=next_pass + 1,
                bystanders=(exporter, prometheus))
        finally:
            recommended.stop()
        row['exported'] = exported
        row['recommended_exported'] = sum(1 for item in series
                                          if item.labels[0][1] in RECOMMENDED_METRICS)
        # Every later pass changes every value again.
        pass_numbers = iter(range(next_pass, 1 << 30))
        row['exporter_rss'] = rss_bytes(exporter.pid)
        row['exporter_idle_rss'] = idle_rss
        row['input_series'] = self_metric(exporter, 'k8s_exporter_input_series')
        row['prometheus_rss'] = rss_bytes(prometheus.pid)
        print('   scrape', file=sys.stderr)
        wait_until_quiet([exporter.pid, prometheus.pid])
        for gzip_encoding in (False, True):
            kind = 'gzip' if gzip_encoding else 'plain'
            row[f'exporter_scrape_{kind}'] = scrape_latencies(
                exporter.port, '/metrics', gzip_encoding, scrape_count)
            # /federate of 10,000 pods takes seconds a call: bounded so
            # that a full run stays within minutes.
            row[f'prometheus_scrape_{kind}'] = scrape_latencies(
                prometheus.port, FEDERATE_PATH, gzip_encoding, scrape_count, budget_seconds=10)
        row['exporter_rss_scraped'] = rss_bytes(exporter.pid)
        # prometheus1 writes all the time and every value changes each
        # scrape interval, so the scrape that matters follows a write of
        # every exported series, not an unchanged store.
        print('   scrape after every exported value changed', file=sys.stderr)
        hot = encode_batches([item for item in series if item.labels[0][1] in EXPORTED], 1)
        for gzip_encoding in (False, True):
            seconds = []
            for _ in range(scrape_count):
                send_pass(exporter.port, stamp_bodies(hot, next(pass_numbers), clock.next()),
                          RW1_HEADERS)
                seconds.append(scrape_latencies(exporter.port, '/metrics', gzip_encoding,
                                                1)['median'])
            row[f'exporter_fresh_{"gzip" if gzip_encoding else "plain"}'] = seconds
        del hot
        print('   scrape under write load', file=sys.stderr)
        bodies = stamp_bodies(rw1, next(pass_numbers), clock.next())
        row['exporter_loaded'], row['exporter_scrapes_loaded'] = scrapes_during(
            exporter.port, '/metrics',
            lambda: measure_ingest(exporter, bodies, RW1_HEADERS, samples))
        print('   pages', file=sys.stderr)
        wait_until_quiet([exporter.pid, prometheus.pid])
        for kind, path in (('pods_page', '/pods'), ('pods_filtered', PODS_FILTERED_PATH)):
            row[kind] = scrape_latencies(exporter.port, path, False, scrape_count)
        # Each write's latency at full write load: alone, while one client
        # views /pods back to back (a stress: ~20 views a second), and while
        # an operator views it every PACED_VIEW_SECONDS, where the writes in
        # flight during a view are compared with the others of the same pass.
        # Passes alternate, twice each, so that a drift of the machine's
        # load falls on every kind.
        for kind in ('writes_alone', 'writes_viewed', 'writes_paced') * 2:
            latencies, spans, views = row.setdefault(kind, []), [], []
            bodies = stamp_bodies(rw1, next(pass_numbers), clock.next())
            measure = functools.partial(measure_ingest, exporter, bodies, RW1_HEADERS, samples,
                                        latencies, spans)
            if kind == 'writes_alone':
                measure()
            else:
                scrapes_during(exporter.port, '/pods', measure, spans=views,
                               every_seconds=PACED_VIEW_SECONDS if kind == 'writes_paced' else 0)
            row.setdefault(f'{kind}_views', []).extend(end - start for start, end in views)
            if kind == 'writes_paced':
                # The control: windows as long as the views, half a pace
                # after each, when no view runs. A long write is likelier to
                # overlap any window, so both groups lean to the long ones.
                shift = PACED_VIEW_SECONDS / 2
                controls = [(start + shift, end + shift) for start, end in views]
                for started, ended in spans:
                    if any(start < ended and started < end for start, end in views):
                        group = 'writes_during_a_view'
                    elif any(start < ended and started < end for start, end in controls):
                        group = 'writes_during_a_control'
                    else:
                        continue
                    row.setdefault(group, []).append(ended - started)
    finally:
        for server in (exporter, prometheus):
            if server is not None:
                server.stop()


def keep_rule_model(pods):
    """The series prometheus1 sends with the README's keep rule: the five only."""
    return cluster_model(pods, keep=set(EXPORTED))


def bench_keep_rule(pods, clock):
    """Keep-rule traffic at `pods` pods: RW1 beside Prometheus, RW2, repeated values."""
    print(f'== keep-rule traffic, {pods} pods: building payloads', file=sys.stderr)
    series = keep_rule_model(pods)
    repeated = with_repeated_values(series)
    samples = len(series)
    row = {'pods': pods, 'samples': samples,
           'repeated_share': sum(1 for item in repeated if not item.step) / samples}
    rw1, rw2 = encode_batches(series, 1), encode_batches(series, 2)
    rw1_repeated = encode_batches(repeated, 1)
    row['requests'] = len(rw1)
    exporter = prometheus = None
    try:
        exporter = start_exporter()
        prometheus = start_prometheus()
        warm = stamp_bodies(rw1, 0, clock.next())
        for server in (exporter, prometheus):
            measure_ingest(server, warm, RW1_HEADERS, samples)
        del warm
        print('   ingest RW1, both servers', file=sys.stderr)
        (row['exporter_rw1'], row['prometheus_rw1']), next_pass = measure_ingest_passes(
            (exporter, prometheus), rw1, RW1_HEADERS, samples, clock, first_pass=1)
        print('   ingest RW2', file=sys.stderr)
        (row['exporter_rw2'],), next_pass = measure_ingest_passes(
            (exporter,), rw2, RW2_HEADERS, samples, clock, first_pass=next_pass,
            bystanders=(prometheus,))
        print('   ingest RW1 with repeated values', file=sys.stderr)
        (row['exporter_repeated'],), next_pass = measure_ingest_passes(
            (exporter,), rw1_repeated, RW1_HEADERS, samples, clock, first_pass=next_pass,
            bystanders=(prometheus,))
    finally:
        for server in (exporter, prometheus):
            if server is not None:
                server.stop()
    return row


GROWTH_SCRAPES = 5


def bench_growth(pods, clock):
    """The exporter alone at `pods` pods of keep-rule traffic.

    Prometheus is not run beside it: at 10,000 full pods it needs over
    10 GiB already. Measured: scrapes during the first load (new pods must
    not stall them), ingest per CPU-second, /metrics after every value
    changed, bytes per input series, and the CPU of one scrape.
    """
    print(f'== growth: keep-rule traffic, {pods} pods: building payloads', file=sys.stderr)
    built = time.perf_counter()
    series = keep_rule_model(pods)
    samples = len(series)
    rw1 = encode_batches(series, 1)
    del series
    print(f'   {samples} series/pass, {len(rw1)} requests, built in '
          f'{time.perf_counter() - built:.0f} s', file=sys.stderr)
    row = {'pods': pods, 'samples': samples}
    exporter = None
    try:
        exporter = start_exporter({'K8S_EXPORTER_MAX_SERIES': str(max(samples * 2, 10**6))})
        time.sleep(1.0)
        idle_rss = rss_bytes(exporter.pid)
        print('   first load, scraped back to back', file=sys.stderr)
        first = stamp_bodies(rw1, 0, clock.next())
        row['load'], row['load_scrapes'] = scrapes_during(
            exporter.port, '/metrics', functools.partial(measure_ingest, exporter, first,
                                                         RW1_HEADERS, samples))
        del first
        row['input_series'] = self_metric(exporter, 'k8s_exporter_input_series')
        row['rss'] = rss_bytes(exporter.pid)
        row['bytes_per_series'] = (row['rss'] - idle_rss) / max(row['input_series'], 1)
        print('   ingest RW1', file=sys.stderr)
        wait_until_quiet([exporter.pid])
        (row['ingest'],), next_pass = measure_ingest_passes(
            (exporter,), rw1, RW1_HEADERS, samples, clock, first_pass=1)
        print(f'   /metrics after every value changed, {GROWTH_SCRAPES} of each', file=sys.stderr)
        for gzip_encoding in (False, True):
            seconds, cpu = [], []
            for _ in range(GROWTH_SCRAPES):
                bodies = stamp_bodies(rw1, next_pass, clock.next())
                next_pass += 1
                send_pass(exporter.port, bodies, RW1_HEADERS)
                del bodies
                wait_until_quiet([exporter.pid])
                before = cpu_seconds(exporter.pid)
                seconds.append(scrape_latencies(exporter.port, '/metrics', gzip_encoding,
                                                1)['median'])
                cpu.append(cpu_seconds(exporter.pid) - before)
            kind = 'gzip' if gzip_encoding else 'plain'
            row[f'fresh_{kind}'], row[f'fresh_{kind}_cpu'] = seconds, cpu
        row['rss_scraped'] = rss_bytes(exporter.pid)
    finally:
        if exporter is not None:
            exporter.stop()
    return row


def profile_kept_path(pods, passes=3):
    """Where a kept sample's CPU goes, in process (no HTTP, no threads):
    keep-rule bodies decoded and applied to a Store, pass after pass, under
    cProfile. Prints microseconds per sample by stage and the top functions.
    """
    import cProfile
    import pstats

    import k8s_exporter
    print(f'== profile of the kept path, keep-rule traffic, {pods} pods, in process',
          file=sys.stderr)
    series = keep_rule_model(pods)
    batches = encode_batches(series, 1)
    config = k8s_exporter.Config()
    exporter = k8s_exporter.Exporter(config)
    k8s_exporter.tune_gc()      # as gunicorn.conf.py's post_fork does in the worker
    store, decoder = exporter.store, exporter.decoder
    now_ms = int(time.time() * 1000)
    stages = {'snappy': 0.0, 'decode': 0.0, 'apply': 0.0}
    profile = cProfile.Profile()
    # The first pass loads the store; the next are timed; the last is profiled.
    for number in range(passes + 2):
        bodies = stamp_bodies(batches, number, now_ms - 60_000 + number)
        timed = 0 < number <= passes
        if number > passes:
            profile.enable()
        for body in bodies:
            started = time.process_time()
            payload = k8s_exporter.decompress_body(body, config.max_decoded_bytes)
            decoded_at = time.process_time()
            decoded = decoder.decode(payload, k8s_exporter.PROTO_RW1, now_ms)
            applied_at = time.process_time()
            store.apply(decoded.samples, time.monotonic())
            if timed:
                stages['snappy'] += decoded_at - started
                stages['decode'] += applied_at - decoded_at
                stages['apply'] += time.process_time() - applied_at
        profile.disable()
    samples = len(series) * passes
    stats = pstats.Stats(profile)
    cumulative = {function[2]: entry[3] for function, entry in stats.stats.items()}
    render_share = cumulative.get('_render_pod', 0.0) / cumulative['apply']
    total = sum(stages.values())
    print(f'kept path, {pods:,} pods, {len(series):,} samples a pass, {passes} passes: '
          f'{total / samples * 1e6:.2f} us a sample, {samples / total / 1000:,.0f}k '
          'samples/CPU-s')
    print('  ' + ', '.join(f'{stage} {seconds / samples * 1e6:.2f} us'
                           for stage, seconds in stages.items())
          + f' (of which re-rendering the pods: {render_share:.0%}, from cProfile)')
    stats.sort_stats('tottime').print_stats(12)


# The pods one exporter takes: each pod's samples once per scrape interval,
# and one scrape of /metrics (gzip, every value changed) per interval, on
# at most this share of a core.
SCRAPE_INTERVAL_SECONDS = 15
CORE_SHARE = 0.6


def pods_per_core(growth):
    """Pods at SCRAPE_INTERVAL_SECONDS within CORE_SHARE of a core, from growth's costs."""
    pods, samples = growth['pods'], growth['samples']
    per_sample = 1 / growth['ingest']['per_cpu']
    per_pod_scrape = max(growth['fresh_gzip_cpu']) / pods
    per_pod = samples / pods * per_sample + per_pod_scrape
    return CORE_SHARE * SCRAPE_INTERVAL_SECONDS / per_pod, per_sample, per_pod_scrape


def bench_churn(pods, passes, clock):
    """Pods replaced every pass: half end with stale markers, half by TTL (5 s)."""
    print(f'== churn: {pods} pods replaced on each of {passes} passes', file=sys.stderr)
    # Bodies are built before the exporter starts, so that passes come every
    # 1.5 s and a generation's stale markers arrive one pass after it, as
    # Prometheus sends them one scrape interval after a target is gone.
    passes_bodies = []
    previous = None
    for generation in range(passes):
        series = cluster_model(pods, generation=generation, seed=2)
        bodies = stamp_bodies(encode_batches(series, 1), generation, clock.next())
        if previous is not None:
            # Stale markers for the pods of every other node of the
            # previous generation; the rest must expire by TTL.
            nodes = sorted({dict(item.labels)['node'] for item in previous})
            staled = set(nodes[::2])
            gone = [item for item in previous if dict(item.labels)['node'] in staled]
            bodies += stamp_bodies(encode_batches(gone, 1), generation, clock.next(),
                                   stale=True)
        passes_bodies.append(bodies)
        previous = series
    rows = []
    exporter = None
    try:
        exporter = start_exporter({'K8S_EXPORTER_TTL_SECONDS': '5'})
        for generation, bodies in enumerate(passes_bodies):
            started = time.monotonic()
            send_pass(exporter.port, bodies, RW1_HEADERS)
            time.sleep(max(0.0, 1.5 - (time.monotonic() - started)))
            rows.append((generation, self_metric(exporter, 'k8s_exporter_input_series'),
                         self_metric(exporter, 'k8s_exporter_pods'), rss_bytes(exporter.pid)))
    finally:
        if exporter is not None:
            exporter.stop()
    return rows


PAGES_IN_PROCESS = [  # (path and query, what it shows)
    ('/pods', 'the first 500 rows'),
    ('/pods?page=100', 'page 100'),
    ('/pods?namespace=payments', 'a tenth of the pods'),
    ('/pods?pod=redis', 'a sixth'),
    ('/pods?pod=-', 'every pod (each name has three matches)'),
    ('/pods?namespace=payments&pod=cache&page=3', 'both filters, page 3'),
    ('/pods?namespace=nothing', 'no pod'),
    ('/', 'the status page'),
]


def pod_samples(pods, timestamp_ms, seed=3):
    """The five exported metrics' samples of `pods` pods of cluster_model's
    names, as the decoder hands them to the store: a pod cgroup, the pause
    container and the workload's containers, one sample per metric each.

    For pages at sizes whose remote-write bodies would take minutes to
    build; the store's state is what the model's writes leave.
    """
    rng = random.Random(seed)
    for number in range(pods):
        workload, containers = WORKLOADS[rng.randrange(len(WORKLOADS))]
        namespace = NAMESPACES[rng.randrange(len(NAMESPACES))]
        pod = f'{workload}-{rng.getrandbits(40):010x}-{rng.getrandbits(25):05x}'
        pod_key = PodKey('prod-eu-west-1', 'kubelet', namespace, pod)
        cgroup = f'/kubepods/burstable/pod{number:08x}'
        series_keys = [SeriesKey(True, '', cgroup, '', '')] + [
            SeriesKey(False, container, f'{cgroup}/{rng.getrandbits(64):016x}', image, '')
            for container, image in [('POD', PAUSE_IMAGE), *containers]]
        for metric in range(len(EXPORTED)):
            for series_key in series_keys:
                yield Sample(pod_key, metric, series_key, timestamp_ms,
                             float(rng.randrange(1, 1 << 30)))


def get_in_process(app, path):
    """GET path from the WSGI app in this process; the body's length."""
    path, _, query = path.partition('?')
    environ = {'REQUEST_METHOD': 'GET', 'PATH_INFO': path, 'QUERY_STRING': query,
               'REMOTE_ADDR': '127.0.0.1'}
    statuses = []
    body = b''.join(app(environ, lambda status, headers: statuses.append(status)))
    if not statuses[0].startswith('200'):
        raise RuntimeError(f'GET {path}?{query}: {statuses[0]}')
    return len(body)


def bench_pages_in_process(pods, count):
    """Each page of PAGES_IN_PROCESS rendered by an Exporter in this process,
    without HTTP: median and max seconds of count; and /pods once more after
    the set of pods changed, which rebuilds its index."""
    print(f'== pages in process at {pods} pods', file=sys.stderr)
    app = Exporter(Config(max_series=pods * 50))
    batch = []
    for sample in pod_samples(pods, int(time.time() * 1000)):
        batch.append(sample)
        if len(batch) == MAX_SAMPLES_PER_SEND:
            app.store.apply(batch, time.monotonic())
            batch = []
    app.store.apply(batch, time.monotonic())
    results = {}
    for path, _ in PAGES_IN_PROCESS:
        get_in_process(app, path)
        seconds = []
        for _ in range(count):
            started = time.perf_counter()
            get_in_process(app, path)
            seconds.append(time.perf_counter() - started)
        results[path] = seconds
    seconds = []
    for number in range(count):
        app.store.apply([Sample(PodKey('prod-eu-west-1', 'kubelet', 'payments', f'new-{number}'),
                                0, SeriesKey(True, '', '/kubepods/new', '', ''), 1, 1.0)],
                        time.monotonic())
        started = time.perf_counter()
        get_in_process(app, '/pods?pod=redis')
        seconds.append(time.perf_counter() - started)
    results['new pod'] = seconds
    return results


###############################################################################
# Report ######################################################################
###############################################################################

def _rate(value):
    return f'{value / 1000:,.0f}k' if value < 1e6 else f'{value / 1e6:,.2f}M'


def _ms(seconds):
    return f'{seconds * 1000:,.1f} ms'


def _ratio(ours, theirs, higher_is_better=True):
    if not ours or not theirs or math.isinf(ours) or math.isinf(theirs):
        return '-'
    return f'{(ours / theirs if higher_is_better else theirs / ours):.1f}x'


def machine_description():
    from google.protobuf.internal import api_implementation
    load = os.getloadavg()
    return (f'{os.cpu_count()} cores, Python {sys.version.split()[0]}, '
            f'protobuf {api_implementation.Type()} backend, prometheus '
            f'{prometheus_version()}, loadavg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}')


def prometheus_version():
    try:
        output = subprocess.run([shutil.which('prometheus') or 'prometheus', '--version'],
                                capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return '?'
    return output.split()[2] if output.startswith('prometheus, version') else '?'


def keep_rule_rows(keep, growth):
    """The report's lines for keep-rule traffic, growth and pods per core."""
    rows = []
    if keep:
        rows.append((f'keep-rule traffic, {keep["pods"]:,} pods: the five only, '
                     f'{keep["samples"]:,} samples per pass ({keep["samples"] / keep["pods"]:.1f} '
                     f'per pod), {keep["requests"]} requests, every value changed each pass',
                     '', '', ''))
        ours, theirs = keep['exporter_rw1'], keep['prometheus_rw1']
        rows.append(('  ingest RW1, samples/CPU-s of the server', _rate(ours['per_cpu']),
                     _rate(theirs['per_cpu']), _ratio(ours['per_cpu'], theirs['per_cpu'])))
        rows.append(('  ingest RW1, samples/s wall', _rate(ours['per_wall']),
                     _rate(theirs['per_wall']), _ratio(ours['per_wall'], theirs['per_wall'])))
        rw2 = keep['exporter_rw2']
        rows.append(('  ingest RW2, samples/CPU-s of the server', _rate(rw2['per_cpu']), 'n/a',
                     _ratio(rw2['per_cpu'], theirs['per_cpu'])))
        repeated = keep['exporter_repeated']
        rows.append((f'  ingest RW1, {keep["repeated_share"]:.0%} of values repeated '
                     f'({", ".join(name[10:] for name in REPEATED_FAMILIES)}), samples/CPU-s',
                     _rate(repeated['per_cpu']), '', _ratio(repeated['per_cpu'],
                                                            theirs['per_cpu'])))
    if growth:
        pods = growth['pods']
        rows.append((f'growth: keep-rule traffic, {pods:,} pods, {growth["samples"]:,} input '
                     'series, the exporter alone', '', '', ''))
        cost = 1 / growth['ingest']['per_cpu']
        ratio = ''
        if keep:
            ratio = f'{cost * keep["exporter_rw1"]["per_cpu"]:.2f}x of {keep["pods"]:,} pods'
        rows.append(('  ingest RW1, samples/CPU-s (CPU per sample)',
                     f'{_rate(growth["ingest"]["per_cpu"])} ({cost * 1e6:.1f} us)', '', ratio))
        load = growth['load_scrapes']
        if load:
            rows.append((f'  first load ({_rate(growth["load"]["per_wall"])} samples/s wall): '
                         f'/metrics back to back, median/max of {len(load)}',
                         f'{_ms(statistics.median(load))}/{_ms(max(load))}', '', ''))
        for kind in ('plain', 'gzip'):
            fresh = growth[f'fresh_{kind}']
            rows.append((f'  /metrics {kind} after every value changed, median/worst of '
                         f'{len(fresh)}', f'{_ms(statistics.median(fresh))}/{_ms(max(fresh))}',
                         '', ''))
        rows.append((f'  bytes per input series ({growth["input_series"]:,.0f} series, RSS '
                     f'{growth["rss"] / 2**20:,.0f} MiB; after the scrapes '
                     f'{growth["rss_scraped"] / 2**20:,.0f} MiB)',
                     f'{growth["bytes_per_series"]:,.0f}', '', ''))
        taken, per_sample, per_pod_scrape = pods_per_core(growth)
        rows.append((f'  pods at a {SCRAPE_INTERVAL_SECONDS} s scrape interval within '
                     f'{CORE_SHARE:.0%} of a core ({growth["samples"] / pods:.1f} samples '
                     f'x {per_sample * 1e6:.1f} us + a scrape\'s {per_pod_scrape * 1e6:.1f} us '
                     'per pod)', f'{taken:,.0f}', '', ''))
    return rows


def print_report(results, churn, pages, keep=None, growth=None):
    rows = []
    for pods, row in results.items():
        rows.append((f'{pods:,} pods: {row["samples"]:,} samples per pass, '
                     f'{row["exported_share"]:.1%} exported, {row["requests"]} requests, '
                     f'{row["rw1_body_bytes"] / 1024:.0f}/{row["rw2_body_bytes"] / 1024:.0f} KiB '
                     'per RW1/RW2 body', '', '', ''))
        for protocol in ('rw1', 'rw2'):
            ours = row[f'exporter_{protocol}']
            theirs = row.get(f'prometheus_{protocol}')
            rows.append((f'  ingest {protocol.upper()}, samples/s wall',
                         _rate(ours['per_wall']),
                         _rate(theirs['per_wall']) if theirs else 'n/a',
                         _ratio(ours['per_wall'], theirs and theirs['per_wall'])))
            rows.append((f'  ingest {protocol.upper()}, samples/CPU-s of the server',
                         _rate(ours['per_cpu']),
                         _rate(theirs['per_cpu']) if theirs else 'n/a',
                         _ratio(ours['per_cpu'], theirs and theirs['per_cpu'])))
        for protocol in ('rw1', 'rw2'):
            ours = row[f'exporter_{protocol}_region']
            rows.append((f'  ingest {protocol.upper()} with label Region (sorts before __name__), '
                         'samples/CPU-s', _rate(ours['per_cpu']), '',
                         f'{ours["per_cpu"] / row[f"exporter_{protocol}"]["per_cpu"]:.2f}x '
                         'of without'))
        # CPU per exported sample: a server CPU-second over what it exported.
        five = row['samples'] / row['exporter_rw1']['per_cpu'] / row['exported']
        recommended = (row['samples'] / row['recommended_rw1']['per_cpu']
                       / row['recommended_exported'])
        for label, share, cost, ratio in (
                ('the five', row['exported'], five, ''),
                ('the recommended metrics', row['recommended_exported'], recommended,
                 f'{recommended / five:.2f}x of the five')):
            rows.append((f'  ingest RW1, {label} ({share / row["samples"]:.1%} exported), '
                         'CPU per exported sample', f'{cost * 1e6:.2f} us', '', ratio))
        for kind in ('plain', 'gzip'):
            ours, theirs = row[f'exporter_scrape_{kind}'], row[f'prometheus_scrape_{kind}']
            rows.append((f'  scrape {kind}, unchanged store, median (/metrics | /federate)',
                         _ms(ours['median']),
                         _ms(theirs['median']),
                         _ratio(ours['median'], theirs['median'], higher_is_better=False)))
            rows.append((f'  scrape {kind}, p99 of {ours["count"]} | {theirs["count"]}',
                         _ms(ours['p99']),
                         _ms(theirs['p99']),
                         _ratio(ours['p99'], theirs['p99'], higher_is_better=False)))
            rows.append((f'  scrape {kind}, body', f'{ours["bytes"] / 1024:,.0f} KiB',
                         f'{theirs["bytes"] / 1024:,.0f} KiB', ''))
        for kind in ('plain', 'gzip'):
            fresh = row[f'exporter_fresh_{kind}']
            rows.append((f'  scrape {kind} after all values changed, median/p99 of {len(fresh)}',
                         f'{_ms(statistics.median(fresh))}/{_ms(percentile(fresh, 0.99))}',
                         '', ''))
        per_series = (row['exporter_rss'] - row['exporter_idle_rss']) / max(row['input_series'], 1)
        rows.append(('  RSS after loading (idle exporter: '
                     f'{row["exporter_idle_rss"] / 2**20:.0f} MiB)',
                     f'{row["exporter_rss"] / 2**20:,.0f} MiB',
                     f'{row["prometheus_rss"] / 2**20:,.0f} MiB',
                     _ratio(row['exporter_rss'], row['prometheus_rss'], higher_is_better=False)))
        rows.append((f'  bytes per stored input series ({row["input_series"]:,.0f} series)',
                     f'{per_series:,.0f}', '', ''))
        rows.append(('  RSS after the scrapes', f'{row["exporter_rss_scraped"] / 2**20:,.0f} MiB',
                     '', ''))
        loaded, scrapes = row['exporter_loaded'], row['exporter_scrapes_loaded']
        if scrapes:
            rows.append((f'  /metrics during RW1 writes, median/p99 of {len(scrapes)}',
                         f'{_ms(statistics.median(scrapes))}/{_ms(percentile(scrapes, 0.99))}',
                         '', ''))
        rows.append(('  ingest RW1 while scraped, samples/s wall', _rate(loaded['per_wall']),
                     '', ''))
        target = ' (target at 10,000 pods: 50 ms)' if pods == 10_000 else ''
        for kind, label in (('pods_page', '/pods, first 500 rows'),
                            ('pods_filtered', f'{PODS_FILTERED_PATH}, first 500 rows')):
            page = row[kind]
            rows.append((f'  {label}, median/p99 of {page["count"]}{target}',
                         f'{_ms(page["median"])}/{_ms(page["p99"])}', '', ''))
        alone = statistics.median(row['writes_alone'])
        control = statistics.median(row.get('writes_during_a_control') or [math.nan])
        for kind, label, base, base_name in (
                ('writes_alone', 'write latency at full RW1 load', None, ''),
                ('writes_viewed', 'the same while /pods is viewed back to back', alone, 'alone'),
                ('writes_paced', f'the same, /pods viewed every {PACED_VIEW_SECONDS:g} s',
                 alone, 'alone'),
                ('writes_during_a_control', '  of these, the writes in flight during a window '
                 'as long as a view, between views', alone, 'alone'),
                ('writes_during_a_view', '  and those in flight during a view '
                 '(target: no more than noise)', control, 'the control')):
            latencies = row.get(kind) or [math.nan]
            views = (f', {len(row[kind + "_views"])} views of median '
                     f'{_ms(statistics.median(row[kind + "_views"]))}'
                     if row.get(kind + '_views') else '')
            rows.append((f'  {label}, median/p99 of {len(latencies)}{views}',
                         f'{_ms(statistics.median(latencies))}/'
                         f'{_ms(percentile(latencies, 0.99))}', '',
                         f'{statistics.median(latencies) / base:.2f}x {base_name}' if base
                         else ''))
        client = max(row[key]['client_cpu'] / row[key]['wall']
                     for key in ('exporter_rw1', 'exporter_rw2', 'prometheus_rw1'))
        rows.append(('  client CPU per wall second while sending (max)', f'{client:.2f}', '', ''))
    for pods, seconds in pages.items():
        target = {10_000: 50, 100_000: 100}.get(pods)
        rows.append((f'pages in process (no HTTP) at {pods:,} pods, median/max of '
                     f'{len(seconds["/"])}' + (f'; target {target} ms' if target else ''),
                     '', '', ''))
        for path, label in [*PAGES_IN_PROCESS, ('new pod', '')]:
            label = ('/pods?pod=redis after a pod was added (the index is built again)'
                     if path == 'new pod' else f'{path}: {label}')
            rows.append((f'  {label}', f'{_ms(statistics.median(seconds[path]))}/'
                                       f'{_ms(max(seconds[path]))}', '', ''))
    if churn:
        # TTL 5 s at a pass every 1.5 s: steady state from the 5th pass on.
        early, late = churn[:len(churn) // 2], churn[len(churn) // 2:]
        rows.append((f'churn: pods replaced on each of {len(churn)} passes, TTL 5 s, '
                     f'{churn[0][1]:,.0f} series per generation', '', '', ''))
        for label, column, unit in (('input series', 1, 1), ('RSS, MiB', 3, 2**20)):
            rows.append((f'  {label}, max of passes 1-{len(early)} / '
                         f'{len(early) + 1}-{len(churn)}',
                         f'{max(row[column] for row in early) / unit:,.0f} / '
                         f'{max(row[column] for row in late) / unit:,.0f}', '', ''))
    rows += keep_rule_rows(keep, growth)
    header = ('', 'k8s_exporter', 'prometheus', 'ratio')
    widths = [max(len(str(line[i])) for line in rows + [header]) for i in range(4)]
    print(f'machine: {machine_description()}')
    print('  '.join(text.ljust(widths[i]) if i == 0 else text.rjust(widths[i])
                    for i, text in enumerate(header)).rstrip())
    for line in rows:
        if not line[1] and not line[2]:
            print(line[0])
            continue
        print('  '.join(str(text).ljust(widths[i]) if i == 0 else str(text).rjust(widths[i])
                        for i, text in enumerate(line)).rstrip())
    if churn:
        print('churn passes (pass, input series, pods, RSS MiB): ' + ', '.join(
            f'({number + 1}, {series:,.0f}, {pods:,.0f}, {rss / 2**20:.0f})'
            for number, series, pods, rss in churn))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='small sizes, for a smoke run')
    parser.add_argument('--pods', default='1000,10000',
                        help='comma list of cluster sizes in pods, full payloads '
                             '(default 1000,10000; 0 for none)')
    parser.add_argument('--pages-pods', default='10000,100000',
                        help='comma list of sizes in pods for the pages rendered in process '
                             '(default 10000,100000; empty for none)')
    parser.add_argument('--keep-pods', type=int, default=10_000,
                        help='pods of keep-rule traffic beside Prometheus (default 10000; 0: none)')
    parser.add_argument('--growth-pods', type=int, default=150_000,
                        help='pods of keep-rule traffic, the exporter alone (default 150000; '
                             '0: none)')
    parser.add_argument('--no-churn', action='store_true', help='leave out the churn run')
    parser.add_argument('--profile', type=int, metavar='PODS',
                        help='only profile the kept path in process at PODS pods')
    args = parser.parse_args(argv)
    if args.profile:
        profile_kept_path(args.profile)
        return
    sizes = [100, 300] if args.quick else [int(part) for part in args.pods.split(',')
                                           if int(part)]
    keep_pods = 300 if args.quick else args.keep_pods
    growth_pods = 1_000 if args.quick else args.growth_pods
    clock = PassClock()
    results = {}
    started = time.monotonic()
    for pods in sizes:
        bench_size(pods, clock, results, 5 if args.quick else 20)
    keep = bench_keep_rule(keep_pods, clock) if keep_pods else None
    growth = bench_growth(growth_pods, clock) if growth_pods else None
    churn = None if args.no_churn else bench_churn(100 if args.quick else 500,
                                                   6 if args.quick else 12, clock)
    pages = {pods: bench_pages_in_process(pods, 5 if args.quick else 20)
             for pods in ([1000] if args.quick else
                          [int(part) for part in args.pages_pods.split(',') if part])}
    print_report(results, churn, pages, keep, growth)
    print(f'total {time.monotonic() - started:.0f} s; command: {" ".join(sys.argv)}')


if __name__ == '__main__':
    main()
