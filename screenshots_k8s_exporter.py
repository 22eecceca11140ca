"""screenshots_k8s_exporter: the pages of a demo store, as PNGs for the README.

    make screenshots                                  # docs/status.png, pods.png, pod.png
    .venv/bin/python screenshots_k8s_exporter.py DIR

It fills an exporter in this process with a fixed demo cluster (two senders,
a pod whose container restarted, a pause container, a stale marker, two
refused writes), serves it with wsgiref on a free loopback port and has
Debian's headless chromium take a screenshot of /, /pods and /pod. The data
is the same on every run; only the clock (uptime, ages, last write) moves.

run_chromium is also what the browser tests in test_k8s_exporter.py use.
This file needs only the standard library and the exporter's runtime
packages.
"""

import argparse
import io
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import snappy

import k8s_exporter
import remote_pb2

CHROMIUM_BINARY = shutil.which('chromium') or '/usr/bin/chromium'
# Headless, as root in a container (no sandbox), and quiet: nothing that
# reaches out to Google's services, no first-run pages, a fresh profile per run.
CHROMIUM_FLAGS = ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
                  '--no-first-run', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync', '--hide-scrollbars')
CHROMIUM_TIMEOUT_SECONDS = 90


def run_chromium(url, *options, timeout=CHROMIUM_TIMEOUT_SECONDS):
    """Run headless chromium once on url with a fresh profile; return its stdout.

    options: --dump-dom (the DOM after the page has loaded, on stdout) or
    --screenshot=PATH. Raises RuntimeError with chromium's last words when
    it fails.
    """
    with tempfile.TemporaryDirectory(prefix='k8s_exporter-chromium-') as profile:
        result = subprocess.run(
            [CHROMIUM_BINARY, *CHROMIUM_FLAGS, f'--user-data-dir={profile}', *options, url],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    if result.returncode != 0:
        tail = result.stderr.decode(errors='replace').strip().splitlines()[-5:]
        raise RuntimeError(f'chromium exited {result.returncode} on {url}: ' + ' | '.join(tail))
    return result.stdout.decode()


###############################################################################
# A demo cluster ##############################################################
###############################################################################

PAUSE_IMAGE = 'registry.k8s.io/pause:3.9'
WORKLOADS = [  # (namespace, workload, [(container, image)])
    ('payments', 'checkout', [('app', 'registry.example.com/payments/checkout:v2.31.4'),
                              ('istio-proxy', 'docker.io/istio/proxyv2:1.20.1')]),
    ('payments', 'ledger', [('ledger', 'registry.example.com/payments/ledger:2024.06.1')]),
    ('search', 'indexer', [('indexer', 'registry.example.com/search/indexer:v0.42.0')]),
    ('logging', 'fluent-bit', [('fluent-bit', 'cr.fluentbit.io/fluent/fluent-bit:2.2.2')]),
    ('web', 'frontend', [('nginx', 'docker.io/library/nginx:1.25.3-alpine')]),
    ('web', 'redis-cache', [('redis', 'docker.io/library/redis:7.2.4-alpine'),
                            ('metrics', 'docker.io/oliver006/redis_exporter:v1.58.0')]),
]
SENDERS = (('eu-west-1', 'kubernetes-cadvisor', 4), ('us-east-1', 'kubelet', 2))
DEVICE = '/dev/nvme0n1p1'
STALE_NAN = struct.unpack('<d', struct.pack('<Q', k8s_exporter.STALE_NAN_BITS))[0]
# The pod that /pod shows: its app container restarted once.
FOCUS = ('payments', 'checkout-7d9f8c6b5-x2k4q')


def pod_name(random_source, workload):
    suffix = ''.join(random_source.choice('bcdfghjklmnpqrstvwxz2456789') for _ in range(5))
    return f'{workload}-{random_source.randrange(16**9):09x}-{suffix}'


def pod_table(random_source, namespace, pod, containers, uid, timestamp_ms, restarted=False):
    """[(labels, [(value, timestamp)])] of one pod as a kubelet's cAdvisor shows it.

    restarted: the first container ran before under another id, last seen
    40 s ago; the stale marker of its memory series is sent later.
    """
    pod_cgroup = f'/kubepods/burstable/pod{uid}'
    table = []

    def series(metric, container, cgroup, value, at=timestamp_ms, **extra):
        labels = {'__name__': metric, 'namespace': namespace, 'pod': pod, 'id': cgroup,
                  'container': container, **extra}
        table.append(({name: text for name, text in labels.items() if text}, [(value, at)]))

    memory = 0
    for number, (container, image) in enumerate(containers):
        cgroup = f'{pod_cgroup}/{random_source.randrange(16**12):012x}'
        used = random_source.randrange(20, 600) * 2**20
        memory += used
        if restarted and number == 0:
            old = f'{pod_cgroup}/{random_source.randrange(16**12):012x}'
            series('container_memory_usage_bytes', container, old, used * 3,
                   at=timestamp_ms - 40_000, image=image)
            series('container_fs_usage_bytes', container, old, 2.5e8, at=timestamp_ms - 40_000,
                   image=image, device=DEVICE)
        series('container_memory_usage_bytes', container, cgroup, used, image=image)
        series('container_memory_max_usage_bytes', container, cgroup, used * 1.5, image=image)
        series('container_cpu_load_average_10s', container, cgroup, 0, image=image)
        series('container_fs_usage_bytes', container, cgroup,
               random_source.randrange(1, 400) * 4096 * 64, image=image, device=DEVICE)
        series('container_fs_limit_bytes', container, cgroup, 1.07374182e11, image=image,
               device=DEVICE)
    pause = f'{pod_cgroup}/{random_source.randrange(16**12):012x}'
    series('container_memory_usage_bytes', '', pause, 573440, image=PAUSE_IMAGE)
    series('container_memory_usage_bytes', '', pod_cgroup, memory + 573440 + 2**20)
    series('container_memory_max_usage_bytes', '', pod_cgroup, (memory + 2**20) * 1.5)
    series('container_cpu_load_average_10s', '', pod_cgroup, 0)
    return table


def demo_tables(now_ms):
    """{(cluster, job): table} of the demo cluster; the same on every run but the clock."""
    random_source = random.Random(14)
    tables = {}
    for cluster, job, replicas in SENDERS:
        table = []
        for namespace, workload, containers in WORKLOADS:
            for replica in range(replicas):
                focus = (namespace, workload, replica, cluster) == (
                    FOCUS[0], 'checkout', 0, SENDERS[0][0])
                pod = FOCUS[1] if focus else pod_name(random_source, workload)
                uid = '%08x-%04x-4%03x-8%03x-%012x' % (
                    random_source.randrange(16**8), random_source.randrange(16**4),
                    random_source.randrange(16**3), random_source.randrange(16**3),
                    random_source.randrange(16**12))
                table += pod_table(random_source, namespace, pod, containers, uid,
                                   now_ms - random_source.randrange(1000, 9000), focus)
        for labels, _ in table:
            labels['job'] = job
            labels['cluster'] = cluster
        tables[(cluster, job)] = table
    return tables


def rw1_body(table):
    request = remote_pb2.WriteRequest()
    for labels, samples in table:
        series = request.timeseries.add()
        for name, value in sorted(labels.items()):
            series.labels.add(name=name, value=value)
        for value, timestamp in samples:
            series.samples.add(value=value, timestamp=timestamp)
    return snappy.compress(request.SerializeToString())


def call(app, method, path, body=b'', content_type='', client='10.0.3.17'):
    environ = {'REQUEST_METHOD': method, 'PATH_INFO': path, 'QUERY_STRING': '',
               'CONTENT_TYPE': content_type, 'CONTENT_LENGTH': str(len(body)),
               'HTTP_CONTENT_ENCODING': 'snappy', 'REMOTE_ADDR': client,
               'wsgi.input': io.BytesIO(body)}
    statuses = []
    app(environ, lambda status, headers, exc_info=None: statuses.append(status))
    return statuses[0]


def demo_exporter():
    """An exporter holding the demo cluster, with two refused writes on record."""
    app = k8s_exporter.Exporter(k8s_exporter.Config(max_series=20_000))
    rw1 = 'application/x-protobuf;proto=prometheus.WriteRequest'
    now_ms = int(time.time() * 1000)
    for number, table in enumerate(demo_tables(now_ms).values()):
        status = call(app, 'POST', '/write', rw1_body(table), rw1, client=f'10.0.3.{17 + number}')
        assert status.startswith('204'), status
        if number == 0:
            # The restarted container's old memory series ends at its stale marker.
            old_memory = [(labels, [(STALE_NAN, now_ms - 35_000)]) for labels, samples in table
                          if labels['pod'] == FOCUS[1] and samples[0][1] < now_ms - 30_000
                          and labels['__name__'] == 'container_memory_usage_bytes']
            assert call(app, 'POST', '/write', rw1_body(old_memory), rw1).startswith('204')
    call(app, 'POST', '/write', b'{"series": []}', 'application/json', client='10.0.9.4')
    call(app, 'POST', '/write', b'\xff\x00', rw1, client='10.0.3.18')
    return app


###############################################################################
# Screenshots #################################################################
###############################################################################

class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


PAGES = (('status.png', '/', (1280, 1000)),
         ('pods.png', '/pods', (1280, 800)),
         ('pod.png', f'/pod?namespace={FOCUS[0]}&pod={FOCUS[1]}', (1280, 1800)))


def take_screenshots(directory):
    app = demo_exporter()
    server = make_server('127.0.0.1', 0, app, handler_class=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f'http://127.0.0.1:{server.server_address[1]}'
        for name, path, (width, height) in PAGES:
            target = Path(directory) / name
            run_chromium(base + path, f'--screenshot={target}', f'--window-size={width},{height}')
            print(f'{target}  {path}')
    finally:
        server.shutdown()
        server.server_close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('directory', nargs='?', default='docs', help='where the PNGs go')
    args = parser.parse_args(argv)
    if not shutil.which(CHROMIUM_BINARY):
        sys.exit(f'screenshots: {CHROMIUM_BINARY} not found; `make chromium` installs it')
    Path(args.directory).mkdir(parents=True, exist_ok=True)
    take_screenshots(args.directory)


if __name__ == '__main__':
    main()
