"""k8s_exporter: per-pod cAdvisor gauges, from Prometheus remote write to /metrics.

    cAdvisor -> prometheus1 --remote_write--> k8s_exporter -> prometheus2

prometheus1 remote-writes what it scrapes from cAdvisor (the kubelet's
/metrics/cadvisor or a standalone cAdvisor) to POST /write, in Remote Write
1.0 or 2.0. k8s_exporter keeps five container gauges, reduces each to one
value per pod and serves them on GET /metrics, labelled
{cluster, item, job, namespace, pod}, for prometheus2 to scrape. For an
operator, GET / shows what is arriving and what was refused, /pods every
pod's values, and /pod?namespace=NS&pod=P how each of them was made.

Run it:

    gunicorn k8s_exporter:app     # in this folder: gunicorn.conf.py says how
    python3 k8s_exporter.py       # the same, on K8S_EXPORTER_LISTEN, for a drop-in

One worker (-w 1): the store lives in the worker's memory.

Environment, read and checked once at start-up:

    K8S_EXPORTER_CLUSTER                    k8s-cluster   cluster label for series without one
    K8S_EXPORTER_TTL_SECONDS                300           forget a series not received this long
    K8S_EXPORTER_METRICS                    (the five)    comma list of cAdvisor gauges to export
    K8S_EXPORTER_MAX_BODY_BYTES             10485760      largest write body, compressed
    K8S_EXPORTER_MAX_DECODED_BYTES          67108864      largest write body, decompressed
    K8S_EXPORTER_MAX_SERIES                 1000000       most input series held
    K8S_EXPORTER_MAX_CONCURRENT_DECODES     1             write bodies decoded at once
    K8S_EXPORTER_MAX_LABEL_NAME_BYTES       256           longest label name of an exported series
    K8S_EXPORTER_MAX_LABEL_VALUE_BYTES      2048          longest label value of one
    K8S_EXPORTER_MAX_LABELS_PER_SERIES      128           most labels of one
    K8S_EXPORTER_WRITE_BEARER_TOKEN_FILE    (none)        token POST /write requires
    K8S_EXPORTER_WRITE_BASIC_AUTH_FILE      (none)        user:password lines it accepts
    K8S_EXPORTER_METRICS_BEARER_TOKEN_FILE  (none)        the same for GET /metrics and pages
    K8S_EXPORTER_METRICS_BASIC_AUTH_FILE    (none)
    K8S_EXPORTER_LISTEN                     0.0.0.0:9201  address for python3 k8s_exporter.py
"""

import base64
import bisect
import collections
import ctypes
import dataclasses
import errno
import functools
import gc
import hmac
import html
import itertools
import logging
import math
import operator
import os
import re
import selectors
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse
import zlib
from typing import NamedTuple

# A drop-in copy on a host needs these, and says so in one line when they are
# missing: Debian 12's python3-protobuf (3.21) cannot load remote_pb2.py,
# and its pip refuses system-wide installs, hence the venv.
REQUIREMENTS = ('gunicorn>=27', 'protobuf>=6.31', 'python-snappy>=0.7')


def missing_packages_message(error):
    """One line: what is missing, which packages and versions, how to install them."""
    wanted = ' '.join(f"'{requirement}'" for requirement in REQUIREMENTS)
    return (f'k8s_exporter: {error}; it needs {", ".join(REQUIREMENTS)}: python3 -m venv '
            f'venv && venv/bin/pip install {wanted} && venv/bin/python k8s_exporter.py')


try:
    import snappy
    from google.protobuf.message import DecodeError
    from google.protobuf.unknown_fields import UnknownFieldSet
    from gunicorn import http as gunicorn_http
    from gunicorn.errors import AppImportError
    from gunicorn.sock import ssl_context
    from gunicorn.workers.gthread import TConn, ThreadWorker

    import remote_pb2
except Exception as _error:   # ImportError, or protobuf's VersionError for 5.x
    if __name__ == '__main__':
        sys.exit(missing_packages_message(_error))
    raise ImportError(missing_packages_message(_error)) from None

__version__ = '1.0.0'

KiB = 1024
MiB = 1024 * KiB
LOG = logging.getLogger('k8s_exporter')


###############################################################################
# Configuration ###############################################################
###############################################################################

# How a pod's value is made from its input series (see "cAdvisor series to
# pods" below; the README's aggregation section says the same).
RULE_POD_CGROUP = 'pod_cgroup'   # the pod cgroup's series, else the sum over containers
RULE_POD_LIMIT = 'pod_limit'     # the pod cgroup's series only: limits do not add up
RULE_SUM = 'sum'                 # the sum over containers and devices
RULE_DEVICE_LIMIT = 'device'     # the sum over distinct devices of that device's limit
RULE_SANDBOX = 'sandbox'         # the pod's sandbox, whose network namespace all share


class MetricSpec(NamedTuple):
    """What one exported metric is; METRICS below is the one table of them."""
    name: str
    type: str        # the exposition's TYPE: 'gauge' or 'counter'
    rule: str        # how the pod value is made: RULE_*
    part_label: str  # a label that tells apart a cgroup's series of it ('cpu'), or ''
    help: str        # the HELP text (the seed's own for its five)


METRICS = {spec.name: spec for spec in (
    # The seed's five: their HELP texts are part of the output contract.
    MetricSpec('container_cpu_load_average_10s', 'gauge', RULE_POD_CGROUP, '',
               'Average load of container CPU over the past 10 seconds'),
    MetricSpec('container_fs_limit_bytes', 'gauge', RULE_DEVICE_LIMIT, '',
               'The total amount of file system that the container can use (unit: bytes)'),
    MetricSpec('container_fs_usage_bytes', 'gauge', RULE_SUM, '',
               'The usage of the file system in the container (unit: bytes)'),
    MetricSpec('container_memory_max_usage_bytes', 'gauge', RULE_POD_CGROUP, '',
               'The maximum memory usage of the container (unit: bytes)'),
    MetricSpec('container_memory_usage_bytes', 'gauge', RULE_POD_CGROUP, '',
               'The current memory usage of the container (unit: bytes)'),
    # What kubectl top, the HPA, the OOM killer and kubernetes-mixin judge pods by.
    MetricSpec('container_cpu_usage_seconds_total', 'counter', RULE_POD_CGROUP, 'cpu',
               'Cumulative CPU time consumed by the pod (unit: seconds)'),
    MetricSpec('container_memory_working_set_bytes', 'gauge', RULE_POD_CGROUP, '',
               'The working set memory of the pod, as the OOM killer sees it (unit: bytes)'),
    MetricSpec('container_memory_rss', 'gauge', RULE_POD_CGROUP, '',
               'The anonymous and swap cache memory of the pod (unit: bytes)'),
    MetricSpec('container_memory_cache', 'gauge', RULE_POD_CGROUP, '',
               'The page cache memory of the pod (unit: bytes)'),
    MetricSpec('container_spec_memory_limit_bytes', 'gauge', RULE_POD_LIMIT, '',
               'The memory limit of the pod, 0 for none (unit: bytes)'),
    MetricSpec('container_network_receive_bytes_total', 'counter', RULE_SANDBOX, 'interface',
               'Cumulative bytes received by the pod over all its interfaces (unit: bytes)'),
    MetricSpec('container_network_transmit_bytes_total', 'counter', RULE_SANDBOX, 'interface',
               'Cumulative bytes transmitted by the pod over all its interfaces (unit: bytes)'),
)}
DEFAULT_METRICS = ('container_cpu_load_average_10s', 'container_fs_limit_bytes',
                   'container_fs_usage_bytes', 'container_memory_max_usage_bytes',
                   'container_memory_usage_bytes')
# What the README recommends for Kubernetes 1.30 and later, where three of
# the five erode (see its aggregation section).
RECOMMENDED_METRICS = ('container_cpu_usage_seconds_total', 'container_memory_usage_bytes',
                       'container_memory_working_set_bytes',
                       'container_network_receive_bytes_total',
                       'container_network_transmit_bytes_total',
                       'container_spec_memory_limit_bytes')
# The part labels by metric name, for the decoder: one dict lookup per kept series.
PART_LABELS = {name: spec.part_label for name, spec in METRICS.items() if spec.part_label}


def metric_spec(name):
    """The table's entry for name; a name not in it is exported as a gauge,
    with a generic HELP and the rule its name suggests."""
    spec = METRICS.get(name)
    if spec is not None:
        return spec
    rule = RULE_SUM if name.startswith('container_fs_') else RULE_POD_CGROUP
    return MetricSpec(name, 'gauge', rule, '', f'cAdvisor {name}, one value per pod')


METRIC_NAME_RE = re.compile(r'[a-zA-Z_:][a-zA-Z0-9_:]*\Z')


class ConfigError(Exception):
    """A bad environment variable; the message names it."""


@dataclasses.dataclass(frozen=True)
class Config:
    cluster: str = 'k8s-cluster'
    ttl_seconds: float = 300.0
    max_body_bytes: int = 10 * MiB
    max_decoded_bytes: int = 64 * MiB
    max_series: int = 1_000_000
    metrics: tuple = DEFAULT_METRICS
    # Decoding holds the GIL: one at a time is ~10% more samples per CPU-second
    # than two with four senders, and bounds decoding memory to one body.
    max_concurrent_decodes: int = 1
    # Of the series of exported metrics (others are never decoded). The
    # kubelet captures in ../shared/fixtures/ send at most 8 labels, names of
    # 44 bytes and values of 185 (Prometheus adds its target labels, ~7):
    # the defaults leave room many times over and bound what one series holds.
    max_label_name_bytes: int = 256
    max_label_value_bytes: int = 2048
    max_labels_per_series: int = 128
    listen: str = '0.0.0.0:9201'
    # Credentials are read from files at start-up, and again when the files
    # change (CredentialFiles); repr=False keeps them out of logs and tracebacks.
    write_auth: 'Credentials' = dataclasses.field(default=None, repr=False)
    metrics_auth: 'Credentials' = dataclasses.field(default=None, repr=False)
    credential_files: tuple = dataclasses.field(default=(), repr=False)   # (variable, path)

    @classmethod
    def from_environ(cls, environ):
        """Read K8S_EXPORTER_* variables; raise ConfigError on the first bad one."""
        defaults = cls()
        return cls(
            cluster=_env_text(environ, 'K8S_EXPORTER_CLUSTER', defaults.cluster),
            ttl_seconds=_env_number(environ, 'K8S_EXPORTER_TTL_SECONDS',
                                    defaults.ttl_seconds, float, 1, 7 * 86400),
            max_body_bytes=_env_number(environ, 'K8S_EXPORTER_MAX_BODY_BYTES',
                                       defaults.max_body_bytes, int, 100, 1024 * MiB),
            max_decoded_bytes=_env_number(environ, 'K8S_EXPORTER_MAX_DECODED_BYTES',
                                          defaults.max_decoded_bytes, int, 100, 4096 * MiB - 1),
            max_series=_env_number(environ, 'K8S_EXPORTER_MAX_SERIES',
                                   defaults.max_series, int, 1, 10**9),
            metrics=_env_metric_names(environ, 'K8S_EXPORTER_METRICS', defaults.metrics),
            max_concurrent_decodes=_env_number(environ, 'K8S_EXPORTER_MAX_CONCURRENT_DECODES',
                                               defaults.max_concurrent_decodes, int, 1, 64),
            max_label_name_bytes=_env_number(environ, 'K8S_EXPORTER_MAX_LABEL_NAME_BYTES',
                                             defaults.max_label_name_bytes, int, 16, 65536),
            max_label_value_bytes=_env_number(environ, 'K8S_EXPORTER_MAX_LABEL_VALUE_BYTES',
                                              defaults.max_label_value_bytes, int, 64, 1 * MiB),
            max_labels_per_series=_env_number(environ, 'K8S_EXPORTER_MAX_LABELS_PER_SERIES',
                                              defaults.max_labels_per_series, int, 8, 10000),
            listen=_env_listen(environ, 'K8S_EXPORTER_LISTEN', defaults.listen),
            write_auth=Credentials.from_files(environ, 'K8S_EXPORTER_WRITE'),
            metrics_auth=Credentials.from_files(environ, 'K8S_EXPORTER_METRICS'),
            credential_files=tuple((name, environ[name]) for name in CREDENTIAL_FILE_VARIABLES
                                   if environ.get(name, '').strip()),
        )


class Credentials(NamedTuple):
    """What an endpoint accepts: a bearer token and/or basic-auth pairs.

    The forms Prometheus sends from remote_write and scrape configs
    (`authorization` and `basic_auth`).
    """
    bearer_tokens: tuple      # bytes; a line each, so that a rotation can overlap
    basic_pairs: tuple        # b'user:password'

    @classmethod
    def from_files(cls, environ, prefix):
        token_variable = f'{prefix}_BEARER_TOKEN_FILE'
        basic_variable = f'{prefix}_BASIC_AUTH_FILE'
        tokens = tuple(_read_secret_lines(environ, token_variable))
        pairs = tuple(_read_secret_lines(environ, basic_variable))
        for pair in pairs:
            if b':' not in pair:
                raise ConfigError(f'{basic_variable}: every line must be user:password')
        return cls(tokens, pairs) if tokens or pairs else None

    def allow(self, authorization):
        """Whether an Authorization header value matches, in constant time per secret."""
        scheme, _, credential = authorization.strip().partition(' ')
        credential = credential.strip().encode('latin-1', 'replace')
        scheme = scheme.lower()
        if scheme == 'bearer':
            secrets = self.bearer_tokens
        elif scheme == 'basic':
            try:
                credential = base64.b64decode(credential, validate=True)
            except ValueError:
                return False
            secrets = self.basic_pairs
        else:
            return False
        # Compare with every secret, so the time taken does not tell which
        # user exists.
        matched = False
        for secret in secrets:
            matched |= hmac.compare_digest(credential, secret)
        return matched

    def challenge(self):
        """WWW-Authenticate headers for a 401 (RFC 9110, section 11.6.1)."""
        headers = []
        if self.bearer_tokens:
            headers.append(('WWW-Authenticate', 'Bearer realm="k8s_exporter"'))
        if self.basic_pairs:
            headers.append(('WWW-Authenticate', 'Basic realm="k8s_exporter", charset="UTF-8"'))
        return headers


CREDENTIALS_POLL_SECONDS = 5


class CredentialFiles:
    """An endpoint's credentials, read again from their files when these change.

    A Kubernetes Secret volume rotates its files by swapping a `..data`
    symlink: the path stays, the file it leads to is new. So the files are
    read again, on the first request CREDENTIALS_POLL_SECONDS after the last
    reading, and new credentials are in force from that request on. A new
    file that is bad (unreadable, empty, a line without ':') leaves the
    credentials in force and is logged, once.
    """

    def __init__(self, environ, prefix, credentials):
        self.environ = environ          # the variables that name the files
        self.prefix = prefix            # K8S_EXPORTER_WRITE or K8S_EXPORTER_METRICS
        self.credentials = credentials
        self._lock = threading.Lock()
        self._read_at = time.monotonic()
        self._problem = ''

    def current(self, now):
        """The credentials in force at now (time.monotonic())."""
        if now - self._read_at >= CREDENTIALS_POLL_SECONDS and self.environ:
            with self._lock:
                if now - self._read_at >= CREDENTIALS_POLL_SECONDS:
                    self._read_at = now
                    self._read_again()
        return self.credentials

    def _read_again(self):
        try:
            credentials = Credentials.from_files(self.environ, self.prefix)
        except ConfigError as error:
            if str(error) != self._problem:
                LOG.warning('%s; the credentials read before stay in force', error)
            self._problem = str(error)
            return
        self._problem = ''
        if credentials != self.credentials:
            LOG.info('%s_* files changed: the new credentials are in force', self.prefix)
            self.credentials = credentials


CREDENTIAL_FILE_VARIABLES = (
    'K8S_EXPORTER_WRITE_BEARER_TOKEN_FILE', 'K8S_EXPORTER_WRITE_BASIC_AUTH_FILE',
    'K8S_EXPORTER_METRICS_BEARER_TOKEN_FILE', 'K8S_EXPORTER_METRICS_BASIC_AUTH_FILE')

# The variables Config reads. Tests and tools use TEST_K8S_EXPORTER_* for
# their own, so that these stay the exporter's alone.
ENVIRONMENT_VARIABLES = (
    'K8S_EXPORTER_CLUSTER', 'K8S_EXPORTER_TTL_SECONDS', 'K8S_EXPORTER_METRICS',
    'K8S_EXPORTER_MAX_BODY_BYTES', 'K8S_EXPORTER_MAX_DECODED_BYTES', 'K8S_EXPORTER_MAX_SERIES',
    'K8S_EXPORTER_MAX_CONCURRENT_DECODES', 'K8S_EXPORTER_MAX_LABEL_NAME_BYTES',
    'K8S_EXPORTER_MAX_LABEL_VALUE_BYTES', 'K8S_EXPORTER_MAX_LABELS_PER_SERIES',
    'K8S_EXPORTER_LISTEN', *CREDENTIAL_FILE_VARIABLES)

# cAdvisor's container metrics (v0.49, as the kubelet serves them): a name
# in K8S_EXPORTER_METRICS outside these is most likely a typo, which would
# export nothing.
CADVISOR_METRICS = frozenset(f'container_{name}' for name in """
    blkio_device_usage_total cpu_cfs_periods_total cpu_cfs_throttled_periods_total
    cpu_cfs_throttled_seconds_total cpu_load_average_10s cpu_load_d_average_10s
    cpu_schedstat_run_periods_total cpu_schedstat_run_seconds_total
    cpu_schedstat_runqueue_seconds_total cpu_system_seconds_total cpu_usage_seconds_total
    cpu_user_seconds_total file_descriptors fs_inodes_free fs_inodes_total fs_io_current
    fs_io_time_seconds_total fs_io_time_weighted_seconds_total fs_limit_bytes
    fs_read_seconds_total fs_reads_bytes_total fs_reads_merged_total fs_reads_total
    fs_sector_reads_total fs_sector_writes_total fs_usage_bytes fs_write_seconds_total
    fs_writes_bytes_total fs_writes_merged_total fs_writes_total hugetlb_failcnt
    hugetlb_max_usage_bytes hugetlb_usage_bytes last_seen llc_occupancy_bytes memory_bandwidth_bytes
    memory_bandwidth_local_bytes memory_cache memory_failcnt memory_failures_total
    memory_kernel_usage memory_mapped_file memory_max_usage_bytes memory_migrate memory_numa_pages
    memory_rss memory_swap memory_total_active_file_bytes memory_total_inactive_file_bytes
    memory_usage_bytes memory_working_set_bytes network_receive_bytes_total
    network_receive_errors_total network_receive_packets_dropped_total
    network_receive_packets_total network_tcp6_usage_total network_tcp_usage_total
    network_transmit_bytes_total network_transmit_errors_total
    network_transmit_packets_dropped_total network_transmit_packets_total
    network_udp6_usage_total network_udp_usage_total oom_events_total perf_events_total
    perf_events_scaling_ratio processes referenced_bytes scrape_error sockets spec_cpu_period
    spec_cpu_quota spec_cpu_shares spec_memory_limit_bytes spec_memory_reservation_limit_bytes
    spec_memory_swap_limit_bytes start_time_seconds tasks_state threads threads_max
    ulimits_soft""".split())


def configuration_warnings(environ, config):
    """One line for each K8S_EXPORTER_* variable nobody reads and each metric
    name cAdvisor does not have: typos that would otherwise pass in silence."""
    warnings = [f'{name} is not a k8s_exporter variable; ignored'
                for name in sorted(environ)
                if name.startswith('K8S_EXPORTER_') and name not in ENVIRONMENT_VARIABLES]
    for name in config.metrics:
        if name not in CADVISOR_METRICS:
            warnings.append(f'K8S_EXPORTER_METRICS: {name!r} is not a cAdvisor metric; it is '
                            'exported only if a sender writes it')
        elif name not in METRICS:
            warnings.append(f'K8S_EXPORTER_METRICS: {name!r} is not in the table of metrics; '
                            'it is exported as a gauge with a generic HELP, by the rule its '
                            'name suggests')
    return warnings


def configure_logging():
    """Log lines with time and level, as gunicorn's own: once, at start-up."""
    if not LOG.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(
            '[%(asctime)s] [%(process)d] [%(levelname)s] k8s_exporter: %(message)s',
            '%Y-%m-%d %H:%M:%S %z'))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)


def _read_secret_lines(environ, name):
    path = environ.get(name, '').strip()
    if not path:
        return []
    try:
        with open(path, 'rb') as secret_file:
            lines = [line.strip() for line in secret_file.read().splitlines()]
    except OSError as error:
        raise ConfigError(f'{name}={path!r}: cannot read: {error.strerror}') from None
    lines = [line for line in lines if line]
    if not lines:
        raise ConfigError(f'{name}={path!r}: file is empty')
    return lines


def _env_text(environ, name, default):
    value = environ.get(name, '').strip()
    if name in environ and not value:
        raise ConfigError(f'{name} is set but empty')
    return value or default


def _env_number(environ, name, default, kind, low, high):
    """A number within [low, high]: outside it the exporter would not work
    (a TTL of 1e-9 s shows nothing and burns a third of a core)."""
    raw = environ.get(name, '').strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        expected = 'an integer' if kind is int else 'a number'
        raise ConfigError(f'{name}={raw!r}: not {expected}') from None
    if not low <= value <= high:     # False for NaN too
        raise ConfigError(f'{name}={raw!r}: must be from {low} to {high}')
    return value


def _env_metric_names(environ, name, default):
    raw = environ.get(name, '').strip()
    if not raw:
        return default
    names = [part.strip() for part in raw.split(',') if part.strip()]
    for metric in names:
        if not METRIC_NAME_RE.match(metric):
            raise ConfigError(f'{name}: {metric!r} is not a valid metric name')
    if not names:
        raise ConfigError(f'{name}={raw!r}: names no metric')
    return tuple(sorted(set(names)))


def _env_listen(environ, name, default):
    raw = environ.get(name, '').strip() or default
    host, _, port = raw.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f'{name}={raw!r}: expected HOST:PORT')
    return raw


###############################################################################
# Remote-write decoding #######################################################
###############################################################################

# The two protocols one endpoint speaks, by the proto parameter of the
# Content-Type (remote-write 2.0 spec, "Content-Type").
PROTO_RW1 = 'prometheus.WriteRequest'
PROTO_RW2 = 'io.prometheus.write.v2.Request'

# A Prometheus stale marker is one NaN bit pattern (value.StaleNaN); any other
# NaN is an ordinary value.
STALE_NAN_BITS = 0x7FF0000000000002
_pack_double = struct.Struct('<d').pack
STALE_NAN_BYTES = struct.pack('<Q', STALE_NAN_BITS)


# tuple.__new__ makes a NamedTuple without its Python-level __new__, which
# costs 0.25 us of the ~3 us a kept series takes (in process, 2026-11-25:
# the README's 0.5 ms for the 8% kept of a 2,000-series request).
_new_tuple = tuple.__new__
_intern = sys.intern


class RequestError(Exception):
    """A request the exporter refuses: its HTTP status and a one-line reason."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def negotiate_protocol(content_type, content_encoding):
    """Return PROTO_RW1 or PROTO_RW2, or raise a 415 before any body is read.

    As Prometheus's own receiver: no Content-Type means 1.0, no
    Content-Encoding means snappy.
    """
    if not content_type:
        protocol = PROTO_RW1
    else:
        media_type, *params = content_type.split(';')
        if media_type.strip().lower() != 'application/x-protobuf':
            raise RequestError(415, f'unsupported Content-Type {_clip(content_type)!r}; '
                                    'expected application/x-protobuf')
        protocol = PROTO_RW1
        for param in params:
            key, _, value = param.partition('=')
            if key.strip().lower() == 'proto':
                protocol = value.strip().strip('"')
        if protocol not in (PROTO_RW1, PROTO_RW2):
            raise RequestError(415, f'unsupported proto {_clip(protocol)!r}; '
                                    f'expected {PROTO_RW1} or {PROTO_RW2}')
    encoding = (content_encoding or 'snappy').strip().lower()
    if encoding != 'snappy':
        raise RequestError(415, f'unsupported Content-Encoding {_clip(encoding)!r}; '
                                'expected snappy')
    return protocol


def snappy_decoded_length(body):
    """The uncompressed length a snappy block announces in its varint header."""
    length = shift = 0
    for byte in body[:5]:
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            return length
        shift += 7
    raise RequestError(400, 'corrupt snappy: bad length header')


def decompress_body(body, max_decoded_bytes):
    """Snappy block-decode body; the size limit is checked before allocating."""
    announced = snappy_decoded_length(body)
    if announced > max_decoded_bytes:
        raise RequestError(413, f'decoded body of {announced} bytes exceeds '
                                f'the limit of {max_decoded_bytes}')
    try:
        return snappy.uncompress(body)
    except snappy.UncompressError:   # it carries no message worth echoing
        raise RequestError(400, 'corrupt snappy: not a valid snappy block') from None


class Sample(NamedTuple):
    """One sample of an exported input series, ready to apply to the store."""
    pod: 'PodKey'
    metric: int              # index into the exporter's metric names
    series: 'SeriesKey'
    timestamp_ms: int
    value: float


# Prometheus's own receiver refuses samples this far ahead of its clock
# (maxAheadTime in storage/remote/write_handler.go): one sample stamped days
# ahead would make every real sample after it "older" until the TTL.
MAX_AHEAD_MS = 10 * 60 * 1000


@dataclasses.dataclass
class DecodedWrite:
    """What one write request carried, before it touches the store."""
    samples: list            # Sample, for series of exported metrics with a pod
    samples_in_request: int = 0
    samples_total: int = 0   # accepted: of well-formed series, less those too far ahead
    unexported: int = 0      # samples of metric names not exported
    kept: int = 0            # samples of exported names
    no_pod: int = 0          # of those, samples without pod identity
    invalid: int = 0         # samples of rejected series
    future: int = 0          # samples refused for a timestamp too far ahead
    histograms: int = 0      # native histogram samples accepted (and not exported)
    exemplars: int = 0       # exemplars accepted (and not exported)
    bad_series: int = 0
    oversized: int = 0       # of invalid, samples of series over a label limit
    first_error: str = ''

    def reject_series(self, reason, samples, histograms=(), exemplars=()):
        self.bad_series += 1
        self.invalid += len(samples)
        if isinstance(reason, Oversized):
            self.oversized += len(samples)
        self.histograms -= len(histograms)
        self.exemplars -= len(exemplars)
        if not self.first_error:
            self.first_error = reason

    def counted(self, samples_in_request):
        """Complete the counts from the request's number of samples; return self."""
        self.samples_in_request = samples_in_request
        self.samples_total = self.samples_in_request - self.invalid - self.future
        self.unexported = self.samples_total - self.kept
        return self


class RemoteWriteDecoder:
    """Turns decompressed write bodies into samples, for one configuration.

    Bad series are recorded in the result, not raised, so the good ones of
    the same request still apply. Only 5-10% of cAdvisor samples are
    exported, so each series' raw bytes are looked at first and Python
    objects are built only for the series that may be kept; the patterns
    that do it are built here, once. fast_paths=False reads every series
    in full: the tests check that both give the same result.
    """

    def __init__(self, metrics, default_cluster, fast_paths=True, known_series=None,
                 limits=None):
        self.wanted = {name: index for index, name in enumerate(metrics)}
        self.limits = limits or LabelLimits()
        self.default_cluster = default_cluster
        self.fast_paths = fast_paths
        self._rw1_skip = rw1_skip_pattern(tuple(metrics)) if fast_paths else None
        self.known = (known_series or KnownSeries()) if fast_paths else None

    def decode(self, payload, protocol, now_ms):
        latest_ms = now_ms + MAX_AHEAD_MS
        if self.known is not None:
            self.known.age(now_ms)
        try:
            if protocol == PROTO_RW2:
                return self._decode_rw2(payload, latest_ms)
            return self._decode_rw1(payload, latest_ms)
        except DecodeError:
            # protobuf's message names the receiver's internal view, not the problem.
            version = '2.0' if protocol == PROTO_RW2 else '1.0'
            raise RequestError(400, f'corrupt protobuf: not a remote-write {version} '
                                    'request') from None

    def _decode_rw1(self, payload, latest_ms):
        request = remote_pb2.WriteRequestSeriesBytes.FromString(payload)
        decoded = DecodedWrite(samples=[])
        series_bytes = request.timeseries
        read_in_full = samples_read_in_full = 0
        if self._rw1_skip is not None:
            # filterfalse over a C-level match: a dropped series costs no bytecode.
            series_bytes = itertools.filterfalse(self._rw1_skip, series_bytes)
        # A series seen before, with one sample: its identity by its labels'
        # bytes, its sample read in place (see KnownSeries).
        known = self.known
        lookup = known.newer.get if known is not None else None
        append = decoded.samples.append
        kept = future = no_pod = 0
        stamps = {}
        for raw in series_bytes:
            sample = lookup and single_sample(raw)
            if sample:
                labels_raw = raw[:sample[0]]
                key = hash(labels_raw) << 32 | _crc32(labels_raw)   # KnownSeries.key_of
                kept_series = lookup(key) or known.get(key) or self._learn(labels_raw, key)
                stamp = sample[2]
                timestamp = stamps.get(stamp) or stamps.setdefault(stamp, varint6(stamp))
                if kept_series and timestamp:
                    kept += 1
                    if kept_series[0] is None:
                        no_pod += 1
                    elif timestamp > latest_ms:
                        future += 1
                    else:
                        append(_new_tuple(Sample, (*kept_series, timestamp, sample[1])))
                    continue
            try:
                series = remote_pb2.TimeSeriesLabelMap.FromString(raw)
            except DecodeError:
                # A label that is not UTF-8 (or a corrupt series: then this raises too).
                series = remote_pb2.TimeSeriesLabelBytes.FromString(raw)
                labels = {_text(label.name): _text(label.value) for label in series.labels}
                check_utf8, size_hint = True, None
            else:
                labels = series.labels
                if UnknownFieldSet(series):
                    # protobuf sets a map entry with fields beyond name and value
                    # aside as unknown; a Label may carry them. (Exemplars and
                    # histograms land here too, and take the slow path to no harm.)
                    labels = {label.name: label.value
                              for label in remote_pb2.TimeSeries.FromString(raw).labels}
                check_utf8, size_hint = False, len(raw)
            read_in_full += 1
            samples_read_in_full += len(series.samples)
            self._take_series(decoded, labels, series.samples, latest_ms, check_utf8,
                              size_hint=size_hint)
        decoded.kept += kept - future
        decoded.no_pod += no_pod
        decoded.future += future
        if kept + read_in_full == len(request.timeseries):
            # No series was dropped unread: the request's samples are all
            # counted. Parsing the body again to count them made decoding a
            # kept sample 2.35 us instead of 2.18 (in process, keep-rule
            # bodies, 2026-12-02).
            return decoded.counted(kept + samples_read_in_full)
        tally = remote_pb2.WriteRequestSampleTally.FromString(payload).timeseries
        return decoded.counted(len(tally.samples))

    def _learn(self, labels_raw, key):
        """The KeptSeries of a RW 1.0 series' label bytes, remembered by
        their key; None if the full path must read it (not exported,
        refused, unusual bytes)."""
        try:
            series = remote_pb2.TimeSeriesLabelMap.FromString(labels_raw)
        except DecodeError:
            return None
        if series.samples or UnknownFieldSet(series):
            return None
        kept_series = self._identify(series.labels, size_hint=len(labels_raw))
        if kept_series.__class__ is not KeptSeries:
            return None
        return self.known.put(key, kept_series)

    def _decode_rw2(self, payload, latest_ms):
        check_utf8 = False
        try:
            request = remote_pb2.WriteRequestV2SeriesBytes.FromString(payload)
            symbols = list(request.symbols)
        except DecodeError:
            # A symbol that is not UTF-8 (or a corrupt body: then this raises
            # too). Only the kept series that use such a symbol are refused.
            request = remote_pb2.WriteRequestV2SymbolBytes.FromString(payload)
            symbols = [_text(symbol) for symbol in request.symbols]
            check_utf8 = True
        tally = remote_pb2.WriteRequestV2SampleTally.FromString(payload).timeseries
        decoded = DecodedWrite(samples=[], histograms=len(tally.histograms),
                               exemplars=len(tally.exemplars))
        symbol_count = len(symbols)
        lookup = text_of_ref = None
        if self.known is not None and not check_utf8:
            lookup = self.known.get
            text_of_ref = symbols.__getitem__
        append = decoded.samples.append
        kept = future = no_pod = 0
        stamps = {}
        find_name = None
        # With native histograms in the request every series is read: each
        # histogram is checked (cAdvisor sends none).
        if self.fast_paths and '__name__' in symbols and not decoded.histograms:
            name_ref = symbols.index('__name__')
            find_name = rw2_name_pattern(name_ref)
            name_first = _varint(name_ref)
            value_first = 2 + len(name_first)
            # Value refs the full path reads on: empty (no name) or wanted.
            read = {ref for ref, symbol in enumerate(symbols)
                    if not symbol or symbol in self.wanted}
        for raw in request.timeseries:
            # The labels_refs field first with a one-byte length, as every
            # encoder writes it (others take the full path). The name pair
            # is looked for first where Prometheus puts it, then anywhere.
            if find_name is not None and len(raw) > 2 and raw[0] == 0x0A and raw[1] < 0x80:
                end = 2 + raw[1]
                if raw.startswith(name_first, 2):
                    at = value_first
                else:
                    found = find_name(raw, 2, end)
                    at = end if found is None else found.end()
                if at < end:
                    value = raw[at]
                    if value >= 0x80:     # a ref of two bytes or more (past 127 symbols)
                        value = _varint_at(raw, at, end, symbol_count)
                    if value not in read and value < symbol_count:
                        continue
            # A series of labels and one sample only: known by its label texts
            # joined with NULs; a text with a NUL in it would add one, so with
            # one NUL fewer than texts the join is a key only they make.
            sample = text_of_ref and single_sample(raw)
            if sample and raw[0] == 0x0A and sample[0] == 2 + raw[1]:
                # protobuf's parse of the refs took 0.9 us of a series, a
                # regular expression's 2.2 (keep-rule bodies, 2026-12-02).
                refs = remote_pb2.TimeSeriesV2.FromString(raw).labels_refs
                try:
                    texts = '\0'.join(map(text_of_ref, refs))
                except IndexError:     # a ref past the symbols
                    texts = ''
                timestamp = stamps.get(sample[2]) or stamps.setdefault(sample[2],
                                                                       varint6(sample[2]))
                if (texts and not len(refs) % 2 and texts.count('\0') == len(refs) - 1
                        and timestamp):
                    key = KnownSeries.key_of(texts)
                    kept_series = lookup(key) or self._learn_rw2(key, refs, symbols)
                    if kept_series:
                        kept += 1
                        if kept_series[0] is None:
                            no_pod += 1
                        elif timestamp > latest_ms:
                            future += 1
                        else:
                            append(_new_tuple(Sample, (*kept_series, timestamp, sample[1])))
                        continue
            series = remote_pb2.TimeSeriesV2.FromString(raw)
            refs = series.labels_refs
            if series.histograms:
                problem = next(filter(None, map(histogram_problem, series.histograms)), None)
                if problem is not None:
                    decoded.reject_series(problem, series.samples, series.histograms,
                                          series.exemplars)
                    continue
            if refs and not len(refs) % 2 and max(refs) < symbol_count:
                pairs = iter(refs)
                labels = {symbols[name]: symbols[value] for name, value in zip(pairs, pairs)}
                self._take_series(decoded, labels, series.samples, latest_ms, check_utf8,
                                  series)
                continue
            # Refs that do not pair up or point past the symbols refuse the
            # series, unless, as on the fast path, its name is one not exported.
            name = None
            for at in range(0, len(refs) - 1, 2):
                if refs[at] < symbol_count and symbols[refs[at]] == '__name__':
                    name = refs[at + 1]
            if (name is not None and name < symbol_count and symbols[name]
                    and symbols[name] not in self.wanted):
                continue
            if not refs:
                reason = 'series with no labels'
            elif len(refs) % 2:
                reason = 'series with an odd number of label refs'
            else:
                reason = f'label ref out of range of {symbol_count} symbols'
            decoded.reject_series(reason, series.samples, series.histograms, series.exemplars)
        decoded.kept += kept - future
        decoded.no_pod += no_pod
        decoded.future += future
        return decoded.counted(len(tally.samples))

    def _learn_rw2(self, key, refs, symbols):
        """The KeptSeries of a RW 2.0 series by its label refs, remembered by
        the key of its label texts; None if the full path must read it."""
        pairs = iter(refs)
        labels = {symbols[name]: symbols[value] for name, value in zip(pairs, pairs)}
        kept_series = self._identify(labels)
        if kept_series.__class__ is not KeptSeries:
            return None
        return self.known.put(key, kept_series)

    def _identify(self, labels, check_utf8=False, size_hint=None):
        """The KeptSeries of a fully decoded series, None if its metric is not
        exported, or the reason (a str) it is refused.

        size_hint is the most bytes its labels' texts can have in all, if known.
        """
        name = labels.get('__name__')
        if not labels:
            return 'series with no labels'
        if not name:
            return 'series with no __name__ label'
        metric = self.wanted.get(name)
        if metric is None:
            return None        # not exported: its other labels are not read
        if check_utf8 and not all(map(_is_utf8, itertools.chain(*labels.items()))):
            return f'series of {name} with a label that is not valid UTF-8'
        oversized = self.limits.problem(name, labels, size_hint)
        if oversized is not None:
            return oversized
        identity = pod_series_identity(labels, self.default_cluster, PART_LABELS.get(name, ''))
        if identity is None:
            return _new_tuple(KeptSeries, (None, metric, None))
        return _new_tuple(KeptSeries, (identity[0], metric, identity[1]))

    def _take_series(self, decoded, labels, samples, latest_ms, check_utf8=False,
                     series_v2=None, size_hint=None):
        """Check one fully decoded series; keep its samples if its metric is exported."""
        kept_series = self._identify(labels, check_utf8, size_hint)
        if kept_series is None:
            return
        if kept_series.__class__ is not KeptSeries:
            if series_v2 is None:
                decoded.reject_series(kept_series, samples)
            else:
                decoded.reject_series(kept_series, samples, series_v2.histograms,
                                      series_v2.exemplars)
            return
        count = len(samples)
        if kept_series.pod is None:
            decoded.kept += count
            decoded.no_pod += count
            return
        append = decoded.samples.append
        future = 0
        for sample in samples:
            timestamp = sample.timestamp
            if timestamp > latest_ms:
                future += 1
                continue
            append(_new_tuple(Sample, (*kept_series, timestamp, sample.value)))
        decoded.kept += count - future
        decoded.future += future


class Oversized(str):
    """The reason a series over a label limit is refused: counted apart."""


class LabelLimits(NamedTuple):
    """Config's bounds on the labels of one exported series, in UTF-8 bytes."""
    name_bytes: int = Config.max_label_name_bytes
    value_bytes: int = Config.max_label_value_bytes
    per_series: int = Config.max_labels_per_series

    @classmethod
    def of(cls, config):
        return cls(config.max_label_name_bytes, config.max_label_value_bytes,
                   config.max_labels_per_series)

    def problem(self, name, labels, size_hint=None):
        """The Oversized reason of labels over a limit, or None.

        Labels whose texts have size_hint bytes in all, no more than either
        length limit, need only be counted: the lengths are read (and the
        texts of a protobuf map built) only for larger ones.
        """
        if len(labels) > self.per_series:
            return Oversized(f'series of {name} with {len(labels)} labels, over '
                             f'K8S_EXPORTER_MAX_LABELS_PER_SERIES={self.per_series}')
        if size_hint is not None and size_hint <= min(self.name_bytes, self.value_bytes):
            return None
        for label, value in labels.items():
            if _utf8_length(label) > self.name_bytes:
                return Oversized(f'series of {name} with a label name of {_utf8_length(label)} '
                                 f'bytes, over K8S_EXPORTER_MAX_LABEL_NAME_BYTES='
                                 f'{self.name_bytes}')
            if _utf8_length(value) > self.value_bytes:
                return Oversized(f'series of {name} with a {_clip(label, 40)} label of '
                                 f'{_utf8_length(value)} bytes, over '
                                 f'K8S_EXPORTER_MAX_LABEL_VALUE_BYTES={self.value_bytes}')
        return None


def _utf8_length(text):
    """Bytes of text on the wire (a surrogate from _text stands for one byte)."""
    return len(text) if text.isascii() else len(text.encode('utf-8', 'surrogateescape'))


class KeptSeries(NamedTuple):
    """What a kept series' labels decide: the first three fields of its Samples."""
    pod: 'PodKey'            # None: the series has no pod identity
    metric: int
    series: 'SeriesKey'


class KnownSeries:
    """The KeptSeries of series seen lately, by a key of their labels' exact
    bytes (RW 1.0) or texts (RW 2.0).

    prometheus1 sends every series again each scrape interval with the same
    labels, so a known series skips label decoding and pod identity: in
    process, on a loaded machine, decoding a kept RW 1.0 sample took 21.3 us
    in full and 5.0 us known; RW 2.0 17.0 and 11.2 (keep-rule bodies,
    2026-12-02; the README's performance section). Only labels the full
    path has read, checked and found exported are remembered, and a sample
    is read in place only when the series is those bytes and one sample
    after them (single_sample), so a known series passes the same checks.

    The key (key_of) is 96 bits: Python's hash of the labels, a SipHash
    keyed at random per process, and their CRC-32. Two label sets share
    one with a chance of 2**-96, far below a memory error's. Keyed by the
    bytes themselves (250-600 in kubelet series), an entry took about 700
    bytes, more than the store holds per series.

    A KeptSeries is a function of the labels alone, so entries never go
    wrong, only old: two generations, the older dropped every ttl_seconds
    (or once the newer holds max_entries); a series found in the older
    moves to the newer. Like ExpositionCache it is derived data: two
    decodes at once may each miss, never mislead.
    """

    @staticmethod
    def key_of(labels):
        """The key of labels' bytes (or of a str: its UTF-8 bytes)."""
        data = labels if labels.__class__ is bytes else labels.encode('utf-8', 'surrogatepass')
        return hash(labels) << 32 | _crc32(data)

    def __init__(self, ttl_seconds=Config.ttl_seconds, max_entries=Config.max_series):
        self.window_ms = ttl_seconds * 1000
        self.max_entries = max_entries
        self.newer, self.older = {}, {}
        self.since_ms = None
        self._shared = {}    # PodKey or SeriesKey -> the equal one put this generation

    def get(self, key):
        """The KeptSeries of this key, or None (then learn and put it)."""
        kept_series = self.newer.get(key)
        if kept_series is None:
            kept_series = self.older.pop(key, None)
            if kept_series is not None:
                self.newer[key] = kept_series
        return kept_series

    def put(self, key, kept_series):
        """Remember kept_series; return it, with the PodKey and SeriesKey of
        the series put before it where they are equal.

        A pod's 18 series of keep-rule traffic would each hold a PodKey of
        their own, and a cgroup's 3 a SeriesKey: shared, so are the store's
        (it keeps the first it is given), and 30,000 pods took 441 bytes of
        RSS per input series instead of 817 (in process, keep-rule traffic,
        2026-12-02). A PodKey has 4 fields and a SeriesKey 6, so the two
        never meet in one dict.
        """
        if len(self.newer) >= self.max_entries:
            self._next_generation()
        shared = self._shared.setdefault
        pod, metric, series = kept_series
        if pod is not None:
            kept_series = _new_tuple(KeptSeries, (shared(pod, pod), metric,
                                                  shared(series, series)))
        self.newer[key] = kept_series
        return kept_series

    def age(self, now_ms):
        """Start a new generation if the newer one is ttl_seconds old."""
        if self.since_ms is None or now_ms - self.since_ms >= self.window_ms:
            if self.since_ms is not None:
                self._next_generation()
            self.since_ms = now_ms

    def _next_generation(self):
        self.newer, self.older = {}, self.newer
        self._shared = {}


_unpack_double = struct.Struct('<d').unpack_from
_crc32 = zlib.crc32


def single_sample(raw, _unpack=_unpack_double):
    """(where the labels end, value, timestamp varint) of a series whose last
    field is its one sample, as Prometheus encodes it; None otherwise.

    The sample is tag 0x12 and a length of 16: the value (tag 0x09, 8
    bytes) and the timestamp (tag 0x10, 6 varint bytes: every millisecond
    from 1971 to 2109); or a length of 7, without the value, for 0.0,
    which proto3 does not write. varint6 checks the timestamp's bytes.
    """
    end = len(raw)
    if end > 18 and raw[-18] == 0x12 and raw[-17] == 0x10 and raw[-16] == 0x09 \
            and raw[-7] == 0x10:
        return end - 18, _unpack(raw, end - 15)[0], raw[-6:]
    if end > 9 and raw[-9] == 0x12 and raw[-8] == 0x07 and raw[-7] == 0x10:
        return end - 9, 0.0, raw[-6:]
    return None


def varint6(raw):
    """The value of a varint of exactly 6 bytes, or 0 if raw is not one."""
    if raw[5] >= 0x80 or min(raw[:5]) < 0x80:
        return 0
    return (raw[0] & 0x7F | (raw[1] & 0x7F) << 7 | (raw[2] & 0x7F) << 14
            | (raw[3] & 0x7F) << 21 | (raw[4] & 0x7F) << 28 | raw[5] << 35)


# Native histogram schemas: exponential -4..8, and custom buckets.
EXPONENTIAL_SCHEMAS = range(-4, 9)
CUSTOM_BUCKETS_SCHEMA = -53


def histogram_problem(encoded):
    """Why a 2.0 native histogram is invalid, as Prometheus's receiver would
    refuse it (its count must equal the observations in its buckets), or None.
    """
    histogram = remote_pb2.Histogram.FromString(encoded)
    floats = histogram.WhichOneof('count') == 'count_float'
    custom = histogram.schema == CUSTOM_BUCKETS_SCHEMA
    if not custom and histogram.schema not in EXPONENTIAL_SCHEMAS:
        return f'native histogram with schema {histogram.schema}'
    if custom:
        bounds = histogram.custom_values
        if any(low >= high for low, high in zip(bounds, bounds[1:])) or any(
                bound != bound for bound in bounds):
            return 'native histogram whose custom bounds do not increase'
        if (histogram.negative_spans or histogram.zero_count_int
                or histogram.zero_count_float):
            return 'native histogram with custom buckets and negative or zero buckets'
        if sum(span.offset + span.length for span in histogram.positive_spans) > len(bounds) + 1:
            return 'native histogram with more custom buckets than bounds'
    elif histogram.custom_values:
        return 'native histogram with custom bounds but an exponential schema'
    observed = histogram.zero_count_float if floats else histogram.zero_count_int
    for spans, deltas, counts in (
            (histogram.negative_spans, histogram.negative_deltas, histogram.negative_counts),
            (histogram.positive_spans, histogram.positive_deltas, histogram.positive_counts)):
        buckets = list(counts) if floats else list(itertools.accumulate(deltas))
        if sum(span.length for span in spans) != len(buckets):
            return 'native histogram whose spans and buckets disagree'
        if any(span.offset < 0 for span in spans[1:]):
            return 'native histogram with a negative span offset after the first'
        if any(count < 0 for count in buckets):
            return 'native histogram with a negative bucket count'
        observed += sum(buckets)
    count = histogram.count_float if floats else histogram.count_int
    # With a NaN sum, NaN observations are counted but in no bucket.
    if observed > count if histogram.sum != histogram.sum else observed != count:
        return f'native histogram with count {count} but {observed} observations in its buckets'
    return None


def decode_write_request(payload, protocol, wanted, default_cluster, now_ms=None,
                         fast_paths=True):
    """decode() of a RemoteWriteDecoder for these metrics (tests and tools)."""
    decoder = RemoteWriteDecoder(sorted(wanted, key=wanted.get), default_cluster, fast_paths)
    return decoder.decode(payload, protocol, time.time_ns() // 10**6 if now_ms is None
                          else now_ms)


def _text(raw):
    """Bytes from the wire as text; bytes that are not UTF-8 become lone surrogates."""
    return raw.decode('utf-8', 'surrogateescape')


def _is_utf8(text):
    try:
        text.encode('utf-8')
    except UnicodeEncodeError:     # a surrogate that _text made of a bad byte
        return False
    return True


@functools.lru_cache(maxsize=8)
def rw1_skip_pattern(wanted_names):
    """match() true for a raw RW 1.0 series that can be dropped unread.

    It finds the series' __name__ Label, wherever it is among the labels:
    tag 0x0a and a one-byte length, then the Label's name field (0x0a 0x08
    "__name__") and its value field (0x12, a one-byte length, the text). A
    series matches if that text is not empty and not a wanted name; one
    without such a Label, or with a long name, takes the full path, which
    refuses it or reads it. Used through filterfalse(), a dropped series
    costs one C-level search and no Python bytecode: over the bench's
    bodies, 0.45 us, as the match that looked at the first label only
    (and found nothing to drop when an uppercase label came first, which
    made decoding 3-4 times slower).

    What it cannot tell from the bytes, and the full path can: a label value
    that itself holds an encoded __name__ Label, ahead of the real one, and
    a series that repeats its __name__ label. Prometheus refuses the latter;
    neither is sent by any client library.
    """
    wanted = b'|'.join(re.escape(bytes([len(name)]) + name)
                       for name in sorted(name.encode() for name in wanted_names)
                       if len(name) < 0x80)
    # Anchored on the first Label, where Prometheus sorts __name__ unless a
    # label name starts in upper case: a wanted name there ends the match at
    # once. Searching every series for another __name__ took 0.67 us per
    # kept series of keep-rule traffic, as long as all the rest of its
    # decoding (bench bodies, 2026-12-02).
    name = rb'\x0a[\x0d-\x7f]\x0a\x08__name__\x12'
    return re.compile(rb'(?:' + name + rb'|(?!' + name + rb').*?' + name + rb')(?!'
                      + (wanted or rb'\A') + rb')[\x01-\x7f]', re.DOTALL).match


@functools.lru_cache(maxsize=16)
def rw2_name_pattern(name_ref):
    """match(raw, start, end) of a RW 2.0 series' labels_refs up to the value
    ref of its __name__ pair, in any place among the pairs and at any width
    of the refs; None without such a pair.

    Made per ref of "__name__" (nearly always 1), not per request: a pattern
    holding the request's wanted refs took ~300 us to compile, a tenth of
    the request.
    """
    varint = rb'[\x80-\xff]*[\x00-\x7f]'
    return re.compile(rb'(?:' + varint + varint + rb')*?' + re.escape(_varint(name_ref)),
                      re.DOTALL).match


def _varint_at(raw, at, end, otherwise):
    """The varint at raw[at:end], or otherwise if it does not end there."""
    value = shift = 0
    while at < end:
        byte = raw[at]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value
        shift += 7
        at += 1
    return otherwise


def _varint(number):
    """Protobuf's base-128 varint encoding of a non-negative integer."""
    out = bytearray()
    while number >= 0x80:
        out.append(number & 0x7F | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


def _clip(text, limit=120):
    """Bound anything from a request that is echoed back or logged."""
    text = ' '.join(str(text).split())
    return text if len(text) <= limit else text[:limit] + '...'


###############################################################################
# cAdvisor series to pods #####################################################
###############################################################################

class PodKey(NamedTuple):
    """One output series per metric: the labels besides item, in output order."""
    cluster: str
    job: str
    namespace: str
    pod: str


class SeriesKey(NamedTuple):
    """A cgroup (and device) within its pod; with the metric, one input series.

    Under containerd the pause container and the pod cgroup carry the same
    labels but for id, so the key keeps every label that tells cgroups and
    filesystems apart.
    """
    pod_cgroup: bool   # the pod-level cgroup, not one of its containers
    container: str
    id: str
    image: str
    device: str
    part: str = ''     # the value of the metric's part label (cpu="cpu00"), if it has one

    @property
    def identity(self):
        """What the series stands for within its pod, whichever cgroup holds it now.

        The pod-level cgroup, whatever the pod's uid; a container by its
        name (the sandbox is docker's "POD", or containerd's unnamed pause
        container); per device for the fs metrics, and per part (one CPU,
        one interface). A restarted container or a re-created pod gets new
        ids and the same identity.
        """
        return self.pod_cgroup, self.container, self.device, self.part

    @property
    def sandbox(self):
        """The pod's sandbox: docker's POD container, containerd's pause container."""
        return not self.pod_cgroup and self.container in ('POD', '')


# (namespace, pod, container) label names, in the order they are tried.
POD_LABEL_CONVENTIONS = (
    ('namespace', 'pod', 'container'),                    # kubelet >= 1.16
    ('namespace', 'pod_name', 'container_name'),          # kubelet < 1.16
    ('container_label_io_kubernetes_pod_namespace',       # standalone cAdvisor
     'container_label_io_kubernetes_pod_name',
     'container_label_io_kubernetes_container_name'),
)

# Last segment of a pod-level cgroup: "pod<uid>" under cgroupfs,
# "kubepods-<qos>-pod<uid_with_underscores>.slice" under systemd. Container
# cgroups sit one level below it (docker-<id>.scope, <id>, ...).
POD_CGROUP_SEGMENT_RE = re.compile(r'(?:^|-)pod[0-9a-fA-F_-]+(?:\.slice)?\Z')


def pod_series_identity(labels, default_cluster, part_label=''):
    """Map a cAdvisor series' labels to (PodKey, SeriesKey), or None without a pod.

    part_label is the metric's (MetricSpec.part_label), if it has one.
    """
    for namespace_label, pod_label, container_label in POD_LABEL_CONVENTIONS:
        pod = labels.get(pod_label)
        namespace = labels.get(namespace_label)
        if pod and namespace:
            container = labels.get(container_label, '')
            break
    else:
        return None
    cgroup = labels.get('id', '')
    pod_cgroup = not container and (
        not cgroup or POD_CGROUP_SEGMENT_RE.search(cgroup.rpartition('/')[2]) is not None)
    pod_key = _new_tuple(PodKey, (labels.get('cluster') or default_cluster,
                                  labels.get('job', ''), namespace, pod))
    series_key = _new_tuple(SeriesKey, (pod_cgroup, _intern(container), _intern(cgroup),
                                        _intern(labels.get('image', '')),
                                        _intern(labels.get('device', '')),
                                        _intern(labels.get(part_label, '')) if part_label else ''))
    return pod_key, series_key


def pod_value(rule, series, carried=0.0):
    """The pod's value from its input series, [(SeriesKey, value), ...], or None.

    carried is what a counter's containers had reached when they were
    forgotten (see PodState); it adds to a sum over containers.
    """
    if len(series) == 1 and not carried and (
            rule == RULE_POD_CGROUP or rule == RULE_SUM and not series[0][0].pod_cgroup):
        return series[0][1] or 0.0     # a sum of one: -0.0 is 0.0, as below
    if rule == RULE_POD_CGROUP or rule == RULE_POD_LIMIT:
        pod_level = [value for key, value in series if key.pod_cgroup]
        if pod_level or rule == RULE_POD_LIMIT:
            return sum_values(pod_level) if pod_level else None
        picked = [value for _, value in series]
    elif rule == RULE_SANDBOX:
        picked = [value for key, value in series if key.sandbox]
    elif rule == RULE_SUM:
        picked = [value for key, value in series if not key.pod_cgroup]
    else:
        # Containers of one pod share the pod's devices: count each device
        # once, at the largest limit reported for it (NaN only if all are
        # NaN, as PromQL's max).
        limits = {}
        for key, value in series:
            if key.pod_cgroup:
                continue
            known = limits.get(key.device)
            if known is None or value > known or known != known:
                limits[key.device] = value
        picked = list(limits.values())
    if not picked:
        return None
    return sum_values([*picked, carried] if carried else picked)


def sum_values(values):
    """The correctly rounded sum, as IEEE addition would end: never raises.

    math.fsum raises where a float sum gives +-Inf or NaN; the input is
    whatever senders wrote, so those cases are answered, not raised.
    """
    values = list(values)
    try:
        return math.fsum(values)
    except ValueError:        # +Inf and -Inf together
        return math.nan
    except OverflowError:     # past 1.8e308; scaling by a power of two is exact
        return math.fsum(value * 2.0 ** -53 for value in values) * 2.0 ** 53


###############################################################################
# The store ###################################################################
###############################################################################

RENDER_DELAY_SECONDS = 0.5   # a write's pods wait at most this long to be rendered
SWEEP_CHUNK_PODS = 500   # pods expired per lock hold: ~4 ms for 500 pods
LIMIT_WARNING_INTERVAL_SECONDS = 60


class Slots:
    """The packing of input series: one bytearray per SeriesKey, a slot per metric.

    A slot holds its series' newest sample, timestamp (ms) and value, and
    when that arrived (the store's arrival clock, in seconds, for the TTL and
    for "arrived last"). Arrival NaN: the key has no series of that metric.
    A series ended by a stale marker keeps its slot (the marker's time, the
    last value) until the TTL; PodState.ended says which those are. Packed,
    a series costs its 24 bytes and no Python objects: about 25
    bytes less than a list of slots and a float.
    """
    SLOT = struct.Struct('<qdd')
    ABSENT = SLOT.pack(0, 0.0, math.nan)

    @classmethod
    def new(cls, metric_count):
        return bytearray(cls.ABSENT * metric_count)

    @staticmethod
    def get(slots, metric, _size=SLOT.size, _unpack=SLOT.unpack_from):
        """(timestamp_ms, value, arrival) of the key's series of metric, or None."""
        sample = _unpack(slots, _size * metric)
        return None if sample[2] != sample[2] else sample

    @staticmethod
    def put(slots, metric, timestamp_ms, value, arrival, _size=SLOT.size,
            _pack=SLOT.pack_into):
        _pack(slots, _size * metric, timestamp_ms, value, arrival)

    @classmethod
    def forget(cls, slots, metric):
        """Drop the series of metric; return whether the key still holds any."""
        at = cls.SLOT.size * metric
        slots[at:at + cls.SLOT.size] = cls.ABSENT
        return any(arrival == arrival for _, _, arrival in cls.SLOT.iter_unpack(slots))

    @classmethod
    def older_than(cls, slots, cutoff):
        """(the metrics whose series arrived before cutoff, the earliest
        arrival of the others, inf for none)."""
        older, earliest = [], math.inf
        for metric, (_, _, arrival) in enumerate(cls.SLOT.iter_unpack(slots)):
            if arrival < cutoff:         # False for NaN: no series
                older.append(metric)
            elif arrival < earliest:
                earliest = arrival
        return older, earliest

    @staticmethod
    def values(series, metric, _size=SLOT.size, _unpack=SLOT.unpack_from):
        """[(SeriesKey, value), ...] of every series of metric held in
        {SeriesKey: slots}: one loop for a pod's render."""
        values = []
        at = _size * metric
        for key, slots in series.items():
            _, value, arrival = _unpack(slots, at)
            if arrival == arrival:
                values.append((key, value))
        return values

    @staticmethod
    def samples(series, metric, _size=SLOT.size, _unpack=SLOT.unpack_from):
        """[(SeriesKey, (timestamp_ms, value, arrival)), ...] of every series of
        metric held in {SeriesKey: slots}, ended ones included."""
        held = []
        at = _size * metric
        for key, slots in series.items():
            sample = _unpack(slots, at)
            if sample[2] == sample[2]:
                held.append((key, sample))
        return held


SLOT_SIZE = Slots.SLOT.size


class PodState:
    """One pod: its input series and its output.

    series maps SeriesKey -> its Slots bytearray: the cpu and memory series
    of one cgroup, and the fs series of one device, share one key.
    live counts the series that have not ended; ended holds those that have,
    as (SeriesKey, metric), until the TTL (None for none: most pods).
    shared_identity says whether two keys stand for the same thing (a
    container restarted, the pod was re-created): only then can a sample
    change which series counts without changing a value. carried holds, per
    counter, what its forgotten containers had reached (None until one is).

    values holds the pod's value per metric (None for none); output holds
    what its lines are made of: (escaped cluster, the labels after item,
    then per metric the line's tail: those labels, the value's text and a
    newline, or b'' for no line; see render_pod_families). Both are tuples,
    replaced whole under the store lock, so a scrape can take the references
    under the lock and join them after releasing it. The tails leave out
    what a family's lines share (the name, the cluster): whole lines would
    take ~25 bytes more per input series.

    from_pod_cgroup has a bit per metric whose value, at its last render,
    was the pod cgroup's under a rule that then ignores the containers
    (RULE_POD_CGROUP, RULE_POD_LIMIT): a new value of a container's series
    cannot change it, and skips the render (see Store.apply).
    arrivals_since is at most the earliest arrival of its series (see
    Store._expire_pod).
    """
    __slots__ = ('key', 'series', 'live', 'ended', 'shared_identity', 'carried', 'values',
                 'output', 'from_pod_cgroup', 'arrivals_since')

    def __init__(self, key, metric_count):
        self.key = key
        self.series = {}
        self.live = 0
        self.ended = None
        self.shared_identity = False
        self.carried = None
        self.values = (None,) * metric_count
        self.output = (*pod_label_text(key), *(b'',) * metric_count)
        self.from_pod_cgroup = 0
        self.arrivals_since = -math.inf   # no series arrived before: see Store._expire_pod

    def add_key(self, series_key, metric_count):
        slots = self.series[series_key] = Slots.new(metric_count)
        identity = series_key.identity
        self.shared_identity = self.shared_identity or any(
            key.identity == identity for key in self.series if key is not series_key)
        return slots

    def remove_key(self, series_key):
        del self.series[series_key]
        identities = [key.identity for key in self.series]
        self.shared_identity = len(set(identities)) < len(identities)

    def has_ended(self, series_key, metric):
        return self.ended is not None and (series_key, metric) in self.ended

    def counted_series(self, metric, cumulative=False):
        """[(SeriesKey, value), ...] of metric: what the pod's value is made of.

        Of the series that stand for one thing (SeriesKey.identity), only the
        one with the newest sample counts, on equal timestamps the one that
        arrived last; ended series never count, and nothing does when every
        series has ended. cumulative (a counter): every container that stood
        for one thing counts, ended or not, at its last value, so that a
        restart does not make the pod's counter fall; pod cgroups as above.
        Most pods have neither two series of one identity nor an ended one,
        and skip the comparison.
        """
        if not self.shared_identity and self.ended is None:
            return Slots.values(self.series, metric)
        ended = self.ended or ()
        held = Slots.samples(self.series, metric)
        if all((key, metric) in ended for key, _ in held):
            return []
        newest = {}
        for key, sample in held:
            if cumulative and not key.pod_cgroup:
                newest[key] = (key, sample)
                continue
            if (key, metric) in ended:
                continue
            identity = key.identity
            other = newest.get(identity)
            if other is None or (sample[0], sample[2]) > (other[1][0], other[1][2]):
                newest[identity] = (key, sample)
        return [(key, sample[1]) for key, sample in newest.values()]


class Store:
    """All mutable state of the exporter, behind one lock.

    Writes are decoded outside the lock and applied under it in one piece,
    so a scrape sees all of a request or none of it. A pod's output lines
    are re-rendered when what counts for it changes, and the pods are kept in
    output order, so a scrape only joins bytes: 10,000 pods in ~15 ms,
    where looking each line up by pod took ~170 ms.
    """

    def __init__(self, config):
        self.config = config
        self.metric_names = config.metrics
        self.specs = [metric_spec(name) for name in config.metrics]
        self.rules = [spec.rule for spec in self.specs]
        self.cumulative = [spec.type == 'counter' for spec in self.specs]
        self._lock = threading.Lock()
        self._pods = {}              # PodKey -> PodState
        self._pod_order = PodOrder()  # the PodStates in output order
        self._live_series = 0        # series that have not ended
        self._ended_series = 0       # ended by a stale marker, held until the TTL
        self._live_pods = 0          # pods with a live series
        # Per sender (cluster, job): [pods held, pods with a live series, live
        # series], kept as the totals above are, for the status page: reading
        # each of 100,000 pods took 30-160 ms a view, and a sender's pods are
        # rarely created or emptied.
        self._sender_pods = {}
        self._pod_set_version = 0    # bumps when a pod is added or removed
        self._last_arrival = -math.inf
        self._version = 0            # bumps on every change of the output lines
        self._unrendered = {}        # PodState -> metrics a write touched since its render
        self._unrendered_since = collections.deque()   # (when touched, PodState), in order
        self._limit_warned_at = -math.inf
        self._sweeper = None
        self.counters = SelfMetrics()
        self.senders = SenderStats(config.ttl_seconds)
        self.refused_writes = collections.deque(maxlen=REFUSED_WRITES_SHOWN)

    # -- writes --------------------------------------------------------------

    def apply(self, samples, received):
        """Apply one request's samples at once; return how many were refused.

        received is when the request arrived (time.monotonic()). Each sample
        gets an arrival of its own, strictly after the one before it, so
        that "arrived last" always has one answer; the steps are ulps, a few
        nanoseconds per thousand samples.
        """
        touched = {}                 # PodState -> metrics whose counted series changed
        created = []
        refused = ignored = stale_markers = 0
        metric_count = len(self.metric_names)
        max_series = self.config.max_series
        # Slots.get and Slots.put, without a Python call per sample:
        # 0.4 us less per kept sample (measured 2026-12-01).
        read_slot, write_slot, slot_size = Slots.SLOT.unpack_from, Slots.SLOT.pack_into, SLOT_SIZE
        next_float, later = math.nextafter, math.inf
        with self._lock:
            pods = self._pods
            arrival = max(received, self._last_arrival)
            for pod_key, metric, series_key, timestamp_ms, value in samples:
                pod = pods.get(pod_key)
                if pod is None:
                    pod = self._add_pod(pod_key)
                    created.append(pod)
                slots = pod.series.get(series_key)
                at = slot_size * metric
                if slots is None:
                    held = ended = False
                else:
                    old_timestamp, old_value, old_arrival = read_slot(slots, at)
                    held = old_arrival == old_arrival
                    ended = held and pod.ended is not None and (series_key, metric) in pod.ended
                # Per series, the newest sample wins.
                if held and timestamp_ms <= old_timestamp:
                    ignored += 1
                    stale_markers += value != value and _pack_double(value) == STALE_NAN_BYTES
                    continue
                arrival = next_float(arrival, later)
                if value != value and _pack_double(value) == STALE_NAN_BYTES:
                    stale_markers += 1
                    # A stale marker ends the series; it is held, ended, so
                    # that a replay of older samples cannot bring it back.
                    if held and not ended:
                        write_slot(slots, at, timestamp_ms, old_value, arrival)
                        self._end_series(pod, series_key, metric)
                        _add_to(touched, pod, metric)
                    continue
                if not held:
                    # The series limit refuses new series; known ones update.
                    if self._live_series + self._ended_series >= max_series:
                        refused += 1
                        continue
                    if slots is None:
                        slots = pod.add_key(series_key, metric_count)
                    self._count_series(pod, live=1)
                    _add_to(touched, pod, metric)
                elif ended:                  # a newer sample brings it back
                    pod.ended.discard((series_key, metric))
                    if not pod.ended:
                        pod.ended = None
                    self._count_series(pod, live=1, ended=-1)
                    _add_to(touched, pod, metric)
                elif (value != old_value or pod.shared_identity) and not (
                        pod.from_pod_cgroup >> metric & 1 and not series_key[0]):
                    # A changed value re-renders. Most cAdvisor values repeat
                    # (fs limits, a cpu load of 0), and an equal one cannot
                    # change the pod's (pod values are sums: -0 counts as 0;
                    # NaN is never equal), unless which series counts can
                    # change with it. Nor can a container's, where the pod
                    # cgroup's series makes the value (PodState.from_pod_cgroup):
                    # half the kept series of a kubelet; apply took 2.4 us
                    # a kept sample instead of 2.8 (bench --profile 10000,
                    # 2026-12-02).
                    _add_to(touched, pod, metric)
                write_slot(slots, at, timestamp_ms, value, arrival)
            self._last_arrival = arrival
            for pod, metrics in touched.items():
                waiting = self._unrendered.get(pod)
                if waiting is None:
                    self._unrendered[pod] = metrics
                    self._unrendered_since.append((received, pod))
                else:
                    waiting |= metrics
            for pod in created:   # refused or stale-only samples can leave it empty
                if not pod.series:
                    self._remove_pod(pod)
            self._render_unrendered(received - RENDER_DELAY_SECONDS)
            self.counters.ignored['out_of_order'] += ignored
            # Counted here, where each sample's value is read anyway: a loop
            # over the samples for them cost 0.06 us a kept sample.
            self.counters.stale_markers += stale_markers
            self.counters.ignored['series_limit'] += refused
            warn = refused and received >= self._limit_warned_at + LIMIT_WARNING_INTERVAL_SECONDS
            if warn:
                self._limit_warned_at = received
        if warn:
            LOG.warning('K8S_EXPORTER_MAX_SERIES=%d reached: %d samples of new series refused '
                        '(this warning repeats at most once a minute)',
                        self.config.max_series, refused)
        return refused

    def _count_series(self, pod, live=0, ended=0):
        """Move the counts of live and ended series (lock held)."""
        was_live = pod.live > 0
        pod.live += live
        self._live_series += live
        self._ended_series += ended
        became_live = (pod.live > 0) - was_live
        self._live_pods += became_live
        if live:
            counts = self._sender_pods[pod.key[:2]]
            counts[1] += became_live
            counts[2] += live

    def _end_series(self, pod, series_key, metric):
        """A stale marker ends a live series: held, not counted (lock held)."""
        if pod.ended is None:
            pod.ended = set()
        pod.ended.add((series_key, metric))
        self._count_series(pod, live=-1, ended=1)

    def _forget(self, pod, series_key, slots, metric):
        """Drop one input series, live or ended (lock held).

        A counter's container carries its last value forward into the pod's
        sum: the CPU seconds a restarted container used stay counted.
        """
        if pod.has_ended(series_key, metric):
            pod.ended.discard((series_key, metric))
            if not pod.ended:
                pod.ended = None
            self._count_series(pod, ended=-1)
        else:
            self._count_series(pod, live=-1)
        if self.cumulative[metric] and not series_key.pod_cgroup and (
                self.rules[metric] != RULE_SANDBOX or series_key.sandbox):
            if pod.carried is None:
                pod.carried = [0.0] * len(self.metric_names)
            pod.carried[metric] = sum_values([pod.carried[metric],
                                              Slots.get(slots, metric)[1]])
        if not Slots.forget(slots, metric):
            pod.remove_key(series_key)

    def _render_unrendered(self, before=math.inf):
        """Render the pods a write touched before `before` (lock held).

        A pod's series come in several requests, one per shard of
        prometheus1's queue, sent within tens of milliseconds of each other
        once the queue is busy: rendered once for all of them, not 3.6
        times a pass, a kept sample's apply took 1.9 us instead of 2.5 (in
        process, keep-rule bodies, 10,000 pods, 2026-12-02). Every read of
        the output (snapshot, the pages) renders what waits first, so no
        read sees a value late. RENDER_DELAY_SECONDS bounds what a scrape
        renders: at 180,000 samples a second, 0.5 s of writes is about
        5,000 pods, 100 ms.
        """
        changed = False
        since = self._unrendered_since
        while since and since[0][0] < before:
            changed |= self._render_waiting(since.popleft()[1])
        if before == math.inf:
            for pod in list(self._unrendered):
                changed |= self._render_waiting(pod)
            since.clear()
        if changed:
            self._version += 1

    def _render_pod_now(self, pod):
        """Render one pod if a write left it waiting (lock held), for a page."""
        if self._render_waiting(pod):
            self._version += 1

    def _render_waiting(self, pod):
        """Render what waits of one pod, if it is still held (lock held);
        return whether the output changed. (A pod rendered for a page keeps
        its place in _unrendered_since, and is skipped there.)"""
        metrics = self._unrendered.pop(pod, None)
        return (metrics is not None and self._pods.get(pod.key) is pod
                and self._render_pod(pod, metrics))

    def _render_pod(self, pod, metrics):
        """Recompute a pod's values for metrics and re-render the lines whose
        value changed (lock held); return whether the output changed.

        Most cAdvisor values repeat from one scrape to the next (cpu load is
        0, fs limits are fixed): skipping their lines halves the cost.
        """
        if not pod.series:
            self._remove_pod(pod)
            return True
        values = list(pod.values)
        output = list(pod.output)
        changed = False
        carried = pod.carried
        from_pod_cgroup = pod.from_pod_cgroup
        for metric in metrics:
            series = pod.counted_series(metric, self.cumulative[metric])
            rule = self.rules[metric]
            value = pod_value(rule, series, carried[metric] if carried else 0.0) \
                if series else None
            if (rule == RULE_POD_CGROUP or rule == RULE_POD_LIMIT) and True in map(
                    _is_pod_cgroup, map(_key_of_value, series)):
                from_pod_cgroup |= 1 << metric
            else:
                from_pod_cgroup &= ~(1 << metric)
            old = values[metric]
            if value is None if old is None else (
                    value is not None and _pack_double(value) == _pack_double(old)):
                continue
            values[metric] = value
            output[OUTPUT_VALUES + metric] = (
                b'' if value is None else output[1] + f'{format_go_float(value)}\n'.encode())
            changed = True
        pod.from_pod_cgroup = from_pod_cgroup
        if changed:
            pod.values = tuple(values)
            pod.output = tuple(output)
        return changed

    def _add_pod(self, pod_key):
        pod = self._pods[pod_key] = PodState(pod_key, len(self.metric_names))
        counts = self._sender_pods.get(pod_key[:2])
        if counts is None:
            counts = self._sender_pods[pod_key[:2]] = [0, 0, 0]
        counts[0] += 1
        self._pod_set_version += 1
        self._pod_order.add(pod_key, pod)
        return pod

    def _remove_pod(self, pod):
        if self._pods.pop(pod.key, None) is None:
            return
        sender = pod.key[:2]
        counts = self._sender_pods[sender]
        counts[0] -= 1
        if not counts[0]:
            del self._sender_pods[sender]
        self._pod_set_version += 1
        self._pod_order.remove(pod.key)

    # -- expiry --------------------------------------------------------------

    def start_sweeper(self):
        """Expire old series from a background thread, once per process.

        Started on the first request, after gunicorn has forked the worker,
        so neither scrapes nor writes wait for a sweep.
        """
        if self._sweeper is not None:
            return
        with self._lock:
            if self._sweeper is not None:
                return
            self._sweeper = threading.Thread(target=self._sweep_forever, daemon=True,
                                             name='k8s_exporter-expiry')
        self._sweeper.start()

    def _sweep_forever(self):
        # Expire at most 10% late, and look at least every 10 s.
        interval = min(self.config.ttl_seconds / 10, 10.0)
        while True:
            time.sleep(interval)
            try:
                self.expire(time.monotonic())
            except Exception:    # keep expiring; a fault here must not end the thread
                LOG.exception('expiry sweep failed')

    def expire(self, now):
        """Forget series not received for ttl_seconds, a bounded slice per lock hold."""
        cutoff = now - self.config.ttl_seconds
        with self._lock:
            pods = self._pod_order.pods()
        for start in range(0, len(pods), SWEEP_CHUNK_PODS):
            with self._lock:
                changed = False
                for pod in pods[start:start + SWEEP_CHUNK_PODS]:
                    changed |= self._expire_pod(pod, cutoff)
                if changed:
                    self._version += 1

    def _expire_pod(self, pod, cutoff):
        # Arrivals only grow, and a new series arrives after every old one,
        # so the earliest arrival found at the last look stays a lower bound:
        # a pod is read again only when that one may have expired, once a
        # TTL, not every sweep. A sweep of 30,000 pods took 230 ms, reading
        # every one, and takes 3-5 ms (in process, keep-rule traffic,
        # 2026-12-02): at 150,000 pods that was 12% of a core.
        if pod.arrivals_since >= cutoff or self._pods.get(pod.key) is not pod:
            return False       # nothing old enough, or removed since the sweep began
        expired = set()
        earliest = math.inf
        for series_key, slots in list(pod.series.items()):
            older, earliest_kept = Slots.older_than(slots, cutoff)
            earliest = min(earliest, earliest_kept)
            for metric in older:
                if not pod.has_ended(series_key, metric):
                    self.counters.expired_series += 1
                self._forget(pod, series_key, slots, metric)
                expired.add(metric)
        pod.arrivals_since = earliest
        return bool(expired) and self._render_pod(pod, expired)

    # -- reads ---------------------------------------------------------------

    def snapshot(self, known_version=None):
        """A consistent copy of what /metrics shows, taken in one lock hold.

        outputs is None when the version is still known_version: the caller
        already has them, and nothing is copied.
        """
        with self._lock:
            self._render_unrendered()
            unchanged = self._version == known_version
            return StoreSnapshot(
                version=self._version,
                outputs=None if unchanged else [pod.output for pod in self._pod_order],
                pod_count=self._live_pods,
                series_count=self._live_series,
                counters=self.counters.copy(),
            )

    def pod_series(self, pod_key):
        """{metric name: [(SeriesKey, (timestamp_ms, value, arrival), counted)]} of one pod.

        Every series held for the pod, and whether it counts; {} for an
        unknown pod. Copied under the lock, for pages and tests.
        """
        with self._lock:
            pod = self._pods.get(pod_key)
            if pod is None:
                return {}
            result = {}
            for metric, name in enumerate(self.metric_names):
                counted = {key for key, _ in pod.counted_series(metric, self.cumulative[metric])}
                held = Slots.samples(pod.series, metric)
                if held:
                    result[name] = [(key, sample, key in counted) for key, sample in held]
            return result

    def count(self, update):
        """Run update(counters) under the lock: the counters live in the store."""
        with self._lock:
            update(self.counters)

    # -- reads for the pages -------------------------------------------------
    # Each holds the lock only to copy references (tuples replaced whole
    # under it) and small counters; the pages are rendered from the copies.

    def pod_keys(self):
        """Every pod held, in output order: a copy of the sorted keys."""
        with self._lock:
            return self._pod_order.keys()

    def pod_keys_since(self, known_version):
        """(version of the set of pods, pod_keys() or None when the version is
        still known_version): a copy of 100,000 keys touches every key, 3-6 ms."""
        with self._lock:
            version = self._pod_set_version
            return version, None if version == known_version else self._pod_order.keys()

    def pod_value_texts(self, pod_keys):
        """{PodKey: its values per metric as /metrics spells them} of those
        still held: the value and a newline, b'' for none."""
        with self._lock:
            pods = self._pods
            outputs = []
            for key in pod_keys:
                pod = pods.get(key)
                if pod is not None:
                    self._render_pod_now(pod)
                    if pods.get(key) is pod:          # not left empty by the render
                        outputs.append((key, pod.output))
        return {key: tuple(tail[len(output[1]):] for tail in output[OUTPUT_VALUES:])
                for key, output in outputs}

    def pod_view(self, pod_key):
        """One pod's PodView, taken in one lock hold so that its series
        explain its values; None for an unknown pod."""
        with self._lock:
            pod = self._pods.get(pod_key)
            if pod is not None:
                self._render_pod_now(pod)
            if pod is None or self._pods.get(pod_key) is not pod:   # or left empty by it
                return None
            held = {}
            for metric, name in enumerate(self.metric_names):
                counted = {key for key, _ in pod.counted_series(metric, self.cumulative[metric])}
                samples = Slots.samples(pod.series, metric)
                if samples:
                    held[name] = [(key, sample, key in counted, pod.has_ended(key, metric))
                                  for key, sample in samples]
            return PodView(pod.values, held, tuple(pod.carried) if pod.carried else None)

    def page_status(self, now):
        """What the status page shows, in one lock hold of a few small copies."""
        with self._lock:
            return PageStatus(
                self._live_pods, self._live_series, self._ended_series,
                {sender: (live_pods, series)
                 for sender, (_, live_pods, series) in self._sender_pods.items()},
                self.senders.copy(now), list(self.refused_writes), self.counters.copy())

    # -- notes for the pages -------------------------------------------------

    def note_write(self, samples_per_sender, now, wall_time):
        """Count a write's exported samples per sender (see samples_by_sender)."""
        with self._lock:
            self.senders.note(samples_per_sender, now, wall_time)

    def note_refused_write(self, wall_time, status, reason, client):
        with self._lock:
            self.refused_writes.append((wall_time, status, reason, client))


class PodOrder:
    """The pods in output order (sorted PodKeys), in sorted blocks.

    In one sorted list every new pod shifted the pointers of all pods after
    it: the first load of 150,000 pods moved about 90 GB of them, holding
    the lock (and so every scrape) for seconds per request. Here a new pod
    shifts at most 2 * BLOCK of them, found by bisecting the blocks' first
    keys; iterating yields the PodStates in order.
    """
    BLOCK = 1000

    def __init__(self):
        # Per block, a PodKey above every key of the blocks before it and at
        # most its own first: a block's first key when it was made.
        self._firsts = []
        self._keys = []       # blocks of sorted PodKeys
        self._pods = []       # the PodStates of those, block by block

    def _block_of(self, key):
        return max(0, bisect.bisect_right(self._firsts, key) - 1)

    def add(self, key, pod):
        if not self._keys:
            self._firsts, self._keys, self._pods = [key], [[key]], [[pod]]
            return
        block = self._block_of(key)
        keys, pods = self._keys[block], self._pods[block]
        at = bisect.bisect_left(keys, key)
        keys.insert(at, key)
        pods.insert(at, pod)
        if len(keys) > 2 * self.BLOCK:
            self._keys[block + 1:block + 1] = [keys[self.BLOCK:]]
            self._pods[block + 1:block + 1] = [pods[self.BLOCK:]]
            self._firsts.insert(block + 1, keys[self.BLOCK])
            del keys[self.BLOCK:], pods[self.BLOCK:]

    def remove(self, key):
        block = self._block_of(key)
        keys = self._keys[block]
        at = bisect.bisect_left(keys, key)
        del keys[at], self._pods[block][at]
        if not keys:
            del self._firsts[block], self._keys[block], self._pods[block]

    def __iter__(self):
        return itertools.chain.from_iterable(self._pods)

    def keys(self):
        return list(itertools.chain.from_iterable(self._keys))

    def pods(self):
        return list(self)


_key_of_value = operator.itemgetter(0)            # of (SeriesKey, value)
_is_pod_cgroup = operator.itemgetter(0)           # SeriesKey.pod_cgroup, C-level


def _add_to(sets, key, item):
    """sets[key].add(item), without building a set for every call as setdefault would."""
    members = sets.get(key)
    if members is None:
        sets[key] = {item}
    else:
        members.add(item)


REFUSED_WRITES_SHOWN = 20


class SenderStats:
    """Per sender (cluster, job): exported samples over the last minute, last write.

    Owned and locked by the Store. Samples are summed per second, so a
    sender costs at most 61 small buckets however often it writes; a sender
    silent for the TTL is forgotten when a new one appears.
    """
    WINDOW_SECONDS = 60

    def __init__(self, ttl_seconds):
        self.ttl_seconds = ttl_seconds
        self._senders = {}    # (cluster, job) -> [last write unix time, last write now, buckets]

    def note(self, samples_per_sender, now, wall_time):
        second = int(now)
        for sender, samples in samples_per_sender.items():
            entry = self._senders.get(sender)
            if entry is None:
                self._forget_silent(now)
                entry = self._senders[sender] = [wall_time, now, collections.deque()]
            entry[0], entry[1] = wall_time, now
            buckets = entry[2]
            if buckets and buckets[-1][0] == second:
                buckets[-1][1] += samples
            else:
                buckets.append([second, samples])
                while buckets[0][0] <= second - self.WINDOW_SECONDS:
                    buckets.popleft()

    def _forget_silent(self, now):
        for sender in [sender for sender, (_, last, _) in self._senders.items()
                       if last < now - self.ttl_seconds]:
            del self._senders[sender]

    def copy(self, now):
        """{(cluster, job): (last write unix time, samples per second of the last minute)}."""
        since = int(now) - self.WINDOW_SECONDS
        return {sender: (wall_time, sum(samples for second, samples in buckets
                                        if second > since) / self.WINDOW_SECONDS)
                for sender, (wall_time, _, buckets) in self._senders.items()}


def samples_by_sender(samples):
    """{(cluster, job): samples} of a decoded write, for SenderStats.

    Counter's C loop over the samples' (cluster, job): ~0.25 us a kept
    sample, 1.5-3% of what its write costs in-process (a Python loop: twice
    that).
    """
    return collections.Counter(map(_sender_of_pod, map(_pod_of_sample, samples)))


_pod_of_sample = operator.itemgetter(0)
_sender_of_pod = operator.itemgetter(slice(2))


class PodView(NamedTuple):
    values: tuple     # the pod's value per metric, None for none
    series: dict      # metric name -> [(SeriesKey, (timestamp_ms, value, arrival), counted, ended)]
    carried: tuple    # per metric, what forgotten containers of a counter reached; or None


class PageStatus(NamedTuple):
    pod_count: int
    series_count: int
    ended_count: int
    sender_pods: dict        # (cluster, job) of pods held -> (pods, input series) live
    senders: dict            # SenderStats.copy()
    refused_writes: list     # (unix time, status, reason, client), oldest first
    counters: 'SelfMetrics'


class StoreSnapshot(NamedTuple):
    version: int
    outputs: list    # per pod in output order: its PodState.output
    pod_count: int
    series_count: int
    counters: 'SelfMetrics'


WRITE_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
IGNORE_REASONS = ('unexported_metric', 'no_pod', 'out_of_order', 'invalid_series',
                  'series_limit', 'future_timestamp', 'label_limit')
WRITE_RESULTS = ('applied', 'partial', 'refused')
CUT_OFF_REASONS = ('silent', 'slow_body', 'slow_headers')   # see ExporterWorker


class SelfMetrics:
    """The exporter's own counters; owned and locked by the Store."""

    def __init__(self):
        self.requests = {}        # (handler, code) -> count
        self.samples_received = 0
        self.stale_markers = 0
        self.ignored = dict.fromkeys(IGNORE_REASONS, 0)
        self.expired_series = 0
        self.last_write_success = 0.0
        self.last_write_applied = 0.0
        self.write_results = dict.fromkeys(WRITE_RESULTS, 0)
        self.write_duration_buckets = [0] * len(WRITE_DURATION_BUCKETS)
        self.write_duration_count = 0
        self.write_duration_sum = 0.0
        self.handler_errors = {'encoding': 0, 'gathering': 0}
        self.cut_off = dict.fromkeys(CUT_OFF_REASONS, 0)

    def copy(self):
        other = SelfMetrics.__new__(SelfMetrics)
        other.__dict__ = {key: value.copy() if isinstance(value, (dict, list)) else value
                          for key, value in self.__dict__.items()}
        return other

    def observe_write(self, seconds):
        self.write_duration_count += 1
        self.write_duration_sum += seconds
        for index, bound in enumerate(WRITE_DURATION_BUCKETS):
            if seconds <= bound:
                self.write_duration_buckets[index] += 1


###############################################################################
# Exposition ##################################################################
###############################################################################

CONTENT_TYPE_TEXT_004 = 'text/plain; version=0.0.4; charset=utf-8'


def format_go_float(value):
    """Spell a float as Go's strconv.FormatFloat(v, 'g', -1, 64) does.

    That is how Prometheus's own exporters print values (and what the seed
    shows): shortest round-trip digits, exponent form below 1e-4 and from
    1e+06 up, at least two exponent digits.
    """
    if value != value:
        return 'NaN'
    if value in (math.inf, -math.inf):
        return '+Inf' if value > 0 else '-Inf'
    if value.is_integer() and -2.0**53 <= value <= 2.0**53:
        # Below 2**53 the integer's digits are the shortest round-trip
        # digits; byte counts take this path (3x faster than parsing repr).
        if -1e6 < value < 1e6:
            return '-0' if value == 0 and math.copysign(1, value) < 0 else str(int(value))
        digits = str(int(value))
        sign = '-' if value < 0 else ''
        exponent = len(digits) - 1 - len(sign)
        mantissa = digits[len(sign):].rstrip('0')
        tail = '.' + mantissa[1:] if len(mantissa) > 1 else ''
        return f'{sign}{mantissa[0]}{tail}e+{exponent:02d}'
    # repr gives the shortest digits that round-trip, as Go's 'g', -1 does;
    # only the layout differs.
    mantissa, _, exponent = repr(value).partition('e')
    sign = '-' if mantissa[0] == '-' else ''
    whole, _, fraction = mantissa.lstrip('-').partition('.')
    if fraction == '0':
        fraction = ''
    digits = (whole + fraction).lstrip('0')
    point = len(whole) + int(exponent or 0) - (len(whole + fraction) - len(digits))
    digits = digits.rstrip('0')
    exp = point - 1
    if exp < -4 or exp >= 6:
        tail = '.' + digits[1:] if len(digits) > 1 else ''
        return f'{sign}{digits[0]}{tail}e{"-" if exp < 0 else "+"}{abs(exp):02d}'
    if point <= 0:
        return f'{sign}0.{"0" * -point}{digits}'
    if point >= len(digits):
        return sign + digits + '0' * (point - len(digits))
    return f'{sign}{digits[:point]}.{digits[point:]}'


def escape_label_value(value):
    """Label values escape backslash, double quote and newline (text format 0.0.4)."""
    if '\\' in value or '"' in value or '\n' in value:
        value = value.replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n')
    return value


def escape_help(text):
    """HELP text escapes backslash and newline only."""
    return text.replace('\\', '\\\\').replace('\n', '\\n')


OUTPUT_VALUES = 2    # PodState.output: cluster, labels after item, then the values


def render_pod_families(metric_names, snapshot):
    """The exported container families, in name order, series in label order.

    A line is name{cluster="C",item="name",job=...,pod="P"} V: the part up
    to item's end is the same for every pod of a cluster, and the pods of
    a cluster are together (PodKeys sort by cluster first); the rest is the
    pod's line tail (PodState.output). So a cluster's lines of a family are
    one bytes.join over its tails, with no bytecode per line. At 60,000
    pods, after passes that changed every value, the families took 130-280
    ms, and 310-390 ms joined from five pieces a line, for 26 bytes more per
    input series (in process, keep-rule traffic, 2026-12-02).
    """
    outputs = snapshot.outputs
    parts = []
    for metric, name in enumerate(metric_names):
        tail_of = operator.itemgetter(OUTPUT_VALUES + metric)
        held = list(itertools.compress(outputs, map(tail_of, outputs)))
        if not held:      # as Go's client: a family without series is not shown
            continue
        spec = metric_spec(name)
        parts.append(f'# HELP {name} {escape_help(spec.help)}\n'
                     f'# TYPE {name} {spec.type}\n'.encode())
        for cluster, pods in itertools.groupby(held, _cluster_of_output):
            head = f'{name}{{cluster="'.encode() + cluster + f'",item="{name}"'.encode()
            parts.append(head)
            parts.append(head.join(map(tail_of, pods)))
    return b''.join(parts)


_cluster_of_output = operator.itemgetter(0)


def pod_label_text(pod):
    """A pod's escaped cluster value, and its labels after item, up to the value."""
    cluster, job, namespace, name = map(escape_label_value, pod)
    return cluster.encode(), f',job="{job}",namespace="{namespace}",pod="{name}"}} '.encode()


def render_self_metrics(snapshot, process):
    """The exporter's own metrics, families in name order after the pod families."""
    counters = snapshot.counters
    out = []

    def family(name, kind, help_text, samples):
        out.append(f'# HELP {name} {escape_help(help_text)}\n# TYPE {name} {kind}\n')
        out.extend(f'{name}{labels} {format_go_float(float(value))}\n'
                   for labels, value in samples)

    family('k8s_exporter_build_info', 'gauge', 'k8s_exporter version and runtime.',
           [(f'{{python="{sys.version.split()[0]}",version="{__version__}"}}', 1)])
    family('k8s_exporter_connections_cut_off_total', 'counter',
           'Connections closed for sending nothing, or their headers or body too slowly.',
           [(f'{{reason="{reason}"}}', count)
            for reason, count in sorted(counters.cut_off.items())])
    family('k8s_exporter_expired_series_total', 'counter',
           'Input series forgotten after K8S_EXPORTER_TTL_SECONDS without a sample.',
           [('', counters.expired_series)])
    family('k8s_exporter_http_requests_total', 'counter',
           'HTTP requests served, by handler and status code.',
           [(f'{{code="{code}",handler="{handler}"}}', count)
            for (handler, code), count in sorted(counters.requests.items())])
    family('k8s_exporter_input_series', 'gauge',
           'Input series held for the exported metrics.',
           [('', snapshot.series_count)])
    family('k8s_exporter_last_write_applied_timestamp_seconds', 'gauge',
           'Unix time of the last write request that was applied, in full or in part.',
           [('', counters.last_write_applied)])
    family('k8s_exporter_last_write_success_timestamp_seconds', 'gauge',
           'Unix time of the last write request that was applied in full.',
           [('', counters.last_write_success)])
    family('k8s_exporter_pods', 'gauge', 'Pods with at least one input series.',
           [('', snapshot.pod_count)])
    family('k8s_exporter_samples_ignored_total', 'counter',
           'Samples received and not stored, by reason.',
           [(f'{{reason="{reason}"}}', count)
            for reason, count in sorted(counters.ignored.items())])
    family('k8s_exporter_samples_received_total', 'counter',
           'Samples received in write requests, of all metrics.',
           [('', counters.samples_received)])
    family('k8s_exporter_stale_markers_total', 'counter',
           'Prometheus stale markers received for exported metrics.',
           [('', counters.stale_markers)])
    buckets = [(f'{{le="{format_go_float(bound)}"}}', count)
               for bound, count in zip(WRITE_DURATION_BUCKETS, counters.write_duration_buckets)]
    buckets.append(('{le="+Inf"}', counters.write_duration_count))
    out.append('# HELP k8s_exporter_write_duration_seconds Time to decode and apply a write '
               'request.\n# TYPE k8s_exporter_write_duration_seconds histogram\n')
    out.extend(f'k8s_exporter_write_duration_seconds_bucket{labels} {count}\n'
               for labels, count in buckets)
    out.append(f'k8s_exporter_write_duration_seconds_sum '
               f'{format_go_float(counters.write_duration_sum)}\n'
               f'k8s_exporter_write_duration_seconds_count {counters.write_duration_count}\n')
    family('k8s_exporter_write_requests_total', 'counter',
           'Write requests by result: applied in full, applied in part (400), refused.',
           [(f'{{result="{result}"}}', count)
            for result, count in sorted(counters.write_results.items())])
    for name, kind, help_text, value in process:
        family(name, kind, help_text, [('', value)])
    family('promhttp_metric_handler_errors_total', 'counter',
           'Total number of internal errors encountered by the promhttp metric handler.',
           [(f'{{cause="{cause}"}}', count)
            for cause, count in sorted(counters.handler_errors.items())])
    return ''.join(out).encode()


_CLOCK_TICKS = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100
_PAGE_SIZE = os.sysconf('SC_PAGE_SIZE') if hasattr(os, 'sysconf') else 4096


class ProcessStat(NamedTuple):
    state: str              # R, S, ..., Z for a zombie
    cpu_seconds: float      # user and system
    start_seconds: float    # since boot
    virtual_bytes: int
    resident_bytes: int


def read_process_stat(pid='self'):
    """What /proc/PID/stat says of a process; OSError once it has gone."""
    with open(f'/proc/{pid}/stat', 'rb') as stat_file:
        stat = stat_file.read().rpartition(b')')[2].split()
    # Fields after the command name, 0-based: state 0, utime 11, stime 12,
    # starttime 19, vsize 20, rss 21 (proc(5), minus the two leading fields).
    return ProcessStat(stat[0].decode(), (int(stat[11]) + int(stat[12])) / _CLOCK_TICKS,
                       int(stat[19]) / _CLOCK_TICKS, int(stat[20]), int(stat[21]) * _PAGE_SIZE)


def read_process_metrics():
    """process_* metrics as the Go and Python clients name them; [] off Linux."""
    try:
        stat = read_process_stat()
        with open('/proc/stat', 'rb') as boot_file:
            boot_time = next(float(line.split()[1]) for line in boot_file
                             if line.startswith(b'btime'))
        open_fds = len(os.listdir('/proc/self/fd'))
    except (OSError, StopIteration, IndexError, ValueError):
        return []
    import resource
    max_fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return [
        ('process_cpu_seconds_total', 'counter', 'Total user and system CPU time spent in seconds.',
         stat.cpu_seconds),
        ('process_max_fds', 'gauge', 'Maximum number of open file descriptors.', max_fds),
        ('process_open_fds', 'gauge', 'Number of open file descriptors.', open_fds),
        ('process_resident_memory_bytes', 'gauge', 'Resident memory size in bytes.',
         stat.resident_bytes),
        ('process_start_time_seconds', 'gauge',
         'Start time of the process since unix epoch in seconds.',
         boot_time + stat.start_seconds),
        ('process_virtual_memory_bytes', 'gauge', 'Virtual memory size in bytes.',
         stat.virtual_bytes),
    ]


class ExpositionCache:
    """The pod families of the last render, plain and as a gzip prefix.

    At 10,000 pods the families are ~9 MB: they are joined again only when
    the store changed. Only the small self-metrics tail is compressed per
    scrape, on a copy of the saved compressor, so the response is still one
    ordinary gzip stream.

    The cache is derived data, replaced whole by one assignment; two scrapes
    at the same moment may both render, and either result is right.
    """

    def __init__(self):
        self._rendered = (None, b'')         # (store version, families)
        self._gzipped = (None, b'', None)    # (store version, prefix, compressor)

    def families(self, store, metric_names, want_gzip):
        """(snapshot, plain families, (gzip prefix, compressor) or None)."""
        version, plain = self._rendered
        snapshot = store.snapshot(known_version=version)
        if snapshot.outputs is not None:
            plain = render_pod_families(metric_names, snapshot)
            self._rendered = (snapshot.version, plain)
        if not want_gzip:
            return snapshot, plain, None
        gzip_version, prefix, compressor = self._gzipped
        if gzip_version != snapshot.version:
            # Level 1 adds about 30 ms to a scrape of 10,000 pods (9 MB; make
            # bench, 2026-11-25, as in the README); the default 6 takes
            # several times longer for output only ~25% smaller.
            compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            prefix = compressor.compress(plain) + compressor.flush(zlib.Z_SYNC_FLUSH)
            self._gzipped = (snapshot.version, prefix, compressor)
        return snapshot, plain, (prefix, compressor.copy())


###############################################################################
# Pages #######################################################################
###############################################################################

# What an operator reads in a browser: /, /pods and /pod, HTML written by
# hand like the exposition. Every text from a request (label values, query
# parameters, refusal reasons) passes escape_html where it is placed; the
# Content-Security-Policy allows no script at all, as a second line.

PAGE_ROWS = 500
PAGE_HEADERS = (('Content-Security-Policy', "default-src 'none'; style-src 'unsafe-inline'"),
                ('X-Content-Type-Options', 'nosniff'), ('Cache-Control', 'no-store'))
PAGE_CSS = '''
body{font:14px/1.45 system-ui,sans-serif;margin:0 1.5em 2em;color:#1d2329}
nav{padding:.7em 0;border-bottom:1px solid #d0d7de;margin-bottom:1em}
nav a{margin-right:1.2em}nav .version{float:right;color:#57606a}
h1{font-size:1.4em;margin:.4em 0}h2{font-size:1.15em;margin:1.4em 0 .3em}
h3{font-size:1em;margin:1.2em 0 .2em;font-family:monospace}
table{border-collapse:collapse;margin:.3em 0 1em}
th,td{padding:.2em .6em;border-bottom:1px solid #e4e8ec;text-align:left;vertical-align:top;
white-space:nowrap}
th{background:#f3f5f7;font-weight:600;white-space:normal}
td.n{text-align:right;font-variant-numeric:tabular-nums;font-family:monospace;font-size:13px}
.mono{font-family:monospace;font-size:12.5px;word-break:break-all;white-space:normal}
.why{white-space:normal}
tr.not td{color:#7d8590}.yes{color:#1a7f37;font-weight:600}
.muted{color:#57606a}form{margin:.5em 0 1em}input{margin-right:1em}
'''

# How each rule reads on /pod; the rule names are MetricSpec.rule's.
RULE_TEXT = {
    RULE_POD_CGROUP: 'the pod cgroup series if there is one, else the sum of the containers',
    RULE_POD_LIMIT: "the pod cgroup series only: the containers' limits do not add up",
    RULE_SUM: 'the sum over the containers and their devices',
    RULE_DEVICE_LIMIT: 'per device, the largest limit its containers report; summed over devices',
    RULE_SANDBOX: "the pod sandbox's series: every container shares its network namespace",
}
COUNTER_TEXT = ('; a counter: every run of a container counts at the last value it reached, '
                'so that a restart does not make the pod go back')


def escape_html(value):
    """Text or attribute value for HTML: the one escaping of the pages."""
    return html.escape(str(value), quote=True)


def query_parameters(environ):
    """{name: value} of the query string, the first value of each, UTF-8 decoded.

    WSGI gives the raw query as latin-1 text (PEP 3333); undecodable bytes
    become U+FFFD rather than an error.
    """
    raw = environ.get('QUERY_STRING', '').encode('latin-1', 'replace').decode('utf-8', 'replace')
    return {name: values[0] for name, values in urllib.parse.parse_qs(
        raw, keep_blank_values=True, errors='replace').items()}


def page_link(path, **parameters):
    """A relative link with its query, for an href (escape it where placed)."""
    query = urllib.parse.urlencode({name: value for name, value in parameters.items() if value},
                                   quote_via=urllib.parse.quote)
    return f'{path}?{query}' if query else path


def html_page(title, body):
    """A whole page around body (HTML already escaped), with the version in its header."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<title>{escape_html(title)} - k8s_exporter</title>'
            f'<style>{PAGE_CSS}</style></head>\n<body><nav><a href="./">status</a>'
            f'<a href="pods">pods</a><a href="metrics">/metrics</a>'
            f'<span class="version">k8s_exporter {escape_html(__version__)}</span></nav>\n'
            f'<h1>{escape_html(title)}</h1>\n{body}</body></html>\n').encode()


def page_refusal(status, reason):
    """A page's 4xx: one line of text/plain, which no browser reads as HTML."""
    return text_response(status, reason, [('X-Content-Type-Options', 'nosniff')])


def html_response(page):
    return 200, [('Content-Type', 'text/html; charset=utf-8'),
                 ('Content-Length', str(len(page))), *PAGE_HEADERS], [page]


def html_table(header, rows):
    """A table of escaped header names and rows of ready cells (<td>...</td>)."""
    # A metric name may break after an underscore: five of them side by side
    # are wider than a laptop's screen.
    head = ''.join(f'<th>{escape_html(name).replace("_", "_<wbr>")}</th>' for name in header)
    return f'<table>{f"<tr>{head}</tr>" if head else ""}\n{"".join(rows)}</table>\n'


def cell(value, numeric=False, css=''):
    """One table cell of escaped text."""
    css = ' '.join(filter(None, ('n' if numeric else '', css)))
    attribute = f' class="{css}"' if css else ''
    return f'<td{attribute}>{escape_html(value)}</td>'


def format_unix_time(seconds):
    """UTC time to the second, or the raw number where it is off the calendar."""
    try:
        return time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):
        return format_go_float(float(seconds))


def format_age(seconds):
    """12 s, 3.5 min, 2.0 h, 4.1 d; negative ages (clocks ahead) keep their sign."""
    sign, seconds = ('-' if seconds < 0 else ''), abs(seconds)
    if seconds < 120:
        return f'{sign}{seconds:.0f} s'
    for unit, size in (('min', 60), ('h', 3600), ('d', 86400)):
        if seconds < 120 * size or unit == 'd':
            return f'{sign}{seconds / size:.1f} {unit}'


def format_bytes(count):
    return f'{count / MiB:,.1f} MiB'


def format_value(value):
    """A pod value as /metrics spells it; a dash where the pod has none."""
    return '-' if value is None else format_go_float(value)


def metric_rule(name):
    """(the rule that makes a pod's value of metric name, whether it is a counter)."""
    spec = metric_spec(name)
    return spec.rule, spec.type == 'counter'


# -- the status page -----------------------------------------------------------

def render_status_page(config, status, process, started_at, now):
    """/: version, uptime, the store, each sender, refused writes, configuration."""
    counters = status.counters
    process = {name: value for name, _, _, value in process}
    held = status.series_count + status.ended_count
    store_rows = [
        ('pods', f'{status.pod_count:,}'),
        ('input series', f'{status.series_count:,}'),
        ('ended series, held until the TTL', f'{status.ended_count:,}'),
        ('series limit (K8S_EXPORTER_MAX_SERIES)',
         f'{held:,} of {config.max_series:,} held ({held / config.max_series:.1%})'),
        ('resident memory', format_bytes(process['process_resident_memory_bytes'])
         if 'process_resident_memory_bytes' in process else 'unknown'),
    ]
    parts = [f'<p>Per-pod cAdvisor gauges from Prometheus remote write. Version '
             f'{escape_html(__version__)}, up {escape_html(format_age(now - started_at))} '
             f'(since {escape_html(format_unix_time(started_at))}).</p>\n',
             '<h2>Store</h2>\n',
             html_table((), [f'<tr>{cell(name)}{cell(value, numeric=True)}</tr>\n'
                                   for name, value in store_rows])]
    parts.append('<h2>Senders</h2>\n')
    parts.append(render_senders(status, now))
    parts.append(f'<p class="muted">All senders: {counters.samples_received:,} samples received '
                 f'of every metric; not kept: '
                 + ', '.join(f'{escape_html(reason)} {count:,}'
                             for reason, count in sorted(counters.ignored.items()))
                 + f'; {counters.stale_markers:,} stale markers; {counters.expired_series:,} '
                 'series expired. Series of other metrics are never decoded, so they are '
                 'counted here and not per sender.</p>\n')
    parts.append(f'<h2>Refused writes (the last {REFUSED_WRITES_SHOWN})</h2>\n')
    if status.refused_writes:
        parts.append(html_table(('time', 'status', 'from', 'reason'), [
            f'<tr>{cell(format_unix_time(at))}{cell(code, numeric=True)}{cell(client)}'
            f'{cell(reason, css="mono")}</tr>\n'
            for at, code, reason, client in reversed(status.refused_writes)]))
    else:
        parts.append('<p class="muted">None since start-up.</p>\n')
    parts.append('<h2>Configuration</h2>\n')
    parts.append(html_table(('variable', 'value'), [
        f'<tr>{cell(name)}{cell(value, css="mono")}</tr>\n'
        for name, value in configuration_shown(config)]))
    parts.append('<h2>Endpoints</h2>\n<ul><li><a href="metrics">/metrics</a></li>'
                 '<li><a href="pods">/pods</a>: every pod and its values</li>'
                 '<li>POST /write (remote write 1.0 and 2.0)</li>'
                 '<li><a href="-/healthy">/-/healthy</a>, <a href="-/ready">/-/ready</a></li>'
                 '</ul>\n')
    return html_page('Status', ''.join(parts))


def render_senders(status, now):
    senders = sorted(set(status.sender_pods) | set(status.senders))
    if not senders:
        return '<p class="muted">No writes since start-up.</p>\n'
    rows = []
    for sender in senders:
        last_write, rate = status.senders.get(sender, (None, 0.0))
        last = ('-' if last_write is None else
                f'{format_unix_time(last_write)} ({format_age(now - last_write)} ago)')
        pods, series = status.sender_pods.get(sender, (0, 0))
        rows.append(f'<tr>{cell(sender[0])}{cell(sender[1])}'
                    f'{cell(f"{pods:,}", numeric=True)}{cell(f"{series:,}", numeric=True)}'
                    f'{cell(f"{rate:,.1f}", numeric=True)}{cell(last)}</tr>\n')
    return html_table(('cluster', 'job', 'pods', 'input series',
                       'exported samples/s, last minute', 'last write'), rows)


def configuration_shown(config):
    """(variable, value) of the configuration in force; of credentials only whether set."""
    return [
        ('K8S_EXPORTER_CLUSTER', config.cluster),
        ('K8S_EXPORTER_TTL_SECONDS', format_go_float(float(config.ttl_seconds))),
        ('K8S_EXPORTER_METRICS', ','.join(config.metrics)),
        ('K8S_EXPORTER_MAX_BODY_BYTES', str(config.max_body_bytes)),
        ('K8S_EXPORTER_MAX_DECODED_BYTES', str(config.max_decoded_bytes)),
        ('K8S_EXPORTER_MAX_SERIES', str(config.max_series)),
        ('K8S_EXPORTER_MAX_CONCURRENT_DECODES', str(config.max_concurrent_decodes)),
        ('K8S_EXPORTER_MAX_LABEL_NAME_BYTES', str(config.max_label_name_bytes)),
        ('K8S_EXPORTER_MAX_LABEL_VALUE_BYTES', str(config.max_label_value_bytes)),
        ('K8S_EXPORTER_MAX_LABELS_PER_SERIES', str(config.max_labels_per_series)),
        ('K8S_EXPORTER_LISTEN', config.listen),
        ('write authentication', 'on' if config.write_auth else 'off'),
        ('/metrics and pages authentication', 'on' if config.metrics_auth else 'off'),
    ]


# -- /pods ---------------------------------------------------------------------

def parse_page_number(text):
    """The 1-based page number of a /pods query; 400 for anything else."""
    if not text.isdigit() or int(text) < 1:
        raise RequestError(400, f'page must be a positive integer, not {_clip(text, 20)!r}')
    return int(text)


# Joins the pod names of a PodIndex: a lone high surrogate, which no label
# value holds (the decoder's surrogateescape makes only U+DC80-U+DCFF) and
# no query does (read with replacement characters), so a match never spans
# two names.
POD_NAME_SEPARATOR = '\ud800'


class PodIndex:
    """The sorted pod keys of one store state, with each run of one (cluster,
    job, namespace) and the pod names of the run joined into one text.

    /pods filters on these texts with str.split, in C over a few contiguous
    strings: at 100,000 pods, reading each key's name (a walk over 100,000
    objects scattered in the heap) took 45-80 ms a view, the texts take
    2-8 ms. Built when the set of pods changed since the last view, from
    the previous index: a run whose keys are the same objects keeps its
    text (joining every name again took 60-140 ms at 100,000 pods, the
    comparison 5-10). Derived data, replaced whole by one assignment, like
    ExpositionCache.
    """
    __slots__ = ('version', 'pod_keys', 'runs')

    def __init__(self, version, pod_keys, previous=None):
        self.version = version     # Store.pod_keys_since's
        self.pod_keys = pod_keys
        self.runs = []        # ((cluster, job, namespace), start, end, the pod names joined)
        known = {} if previous is None else {run[0]: run for run in previous.runs}
        start = 0
        while start < len(pod_keys):
            group = pod_keys[start][:3]
            end = bisect.bisect_right(pod_keys, group, lo=start, key=_group_of_pod)
            run = known.get(group)
            if run is not None and pod_keys[start:end] == previous.pod_keys[run[1]:run[2]]:
                names = run[3]
            else:
                names = POD_NAME_SEPARATOR.join(map(_name_of_pod, pod_keys[start:end]))
            self.runs.append((group, start, end, names))
            start = end

    def matching(self, namespace, pod, first, count):
        """(how many pods have a namespace and a name that contain the given
        texts, the indices into pod_keys of the matches first to first+count-1)."""
        total, shown = 0, []
        # Each match takes the rest of its name, so that a name matches once.
        pattern = pod and re.compile(f'{re.escape(pod)}[^{POD_NAME_SEPARATOR}]*')
        searched = 0
        for group, start, end, names in self.runs:
            if namespace not in group[2]:
                continue
            if not pod:
                matches = end - start
                low, high = max(first - total, 0), min(first + count - total, matches)
                shown.extend(range(start + low, start + max(low, high)))
                total += matches
                continue
            if searched >= PAGE_YIELD_ROWS * 100:
                yield_to_writes()
                searched = 0
            searched += end - start
            pieces = pattern.split(names)
            matches = len(pieces) - 1
            low, high = max(first - total, 0), min(first + count - total, matches)
            if low < high:
                # The name of a match is the number of separators before it.
                names_before = itertools.accumulate(
                    map(str.count, pieces[:high], itertools.repeat(POD_NAME_SEPARATOR)),
                    initial=start)
                shown.extend(itertools.islice(names_before, low + 1, high + 1))
            total += matches
        return total, shown


_group_of_pod = operator.itemgetter(slice(3))
_name_of_pod = operator.itemgetter(3)


def filter_pods(index, namespace, pod, page):
    """(pods matching, that page's keys, pages, the page shown) of a PodIndex:
    the keys whose namespace and pod name contain the given texts; a page
    past the end is the last one."""
    matching, shown = index.matching(namespace, pod, (page - 1) * PAGE_ROWS, PAGE_ROWS)
    pages = max(1, -(-matching // PAGE_ROWS))
    if page > pages:
        page = pages
        matching, shown = index.matching(namespace, pod, (page - 1) * PAGE_ROWS, PAGE_ROWS)
    return matching, list(map(index.pod_keys.__getitem__, shown)), pages, page


def render_pods_page(metric_names, held, matching, shown, values, namespace, pod, page, pages):
    """/pods: one page of the pods in output order, with each exported value."""
    first = (page - 1) * PAGE_ROWS
    parts = [f'<form action="pods" method="get">'
             f'<label>namespace <input name="namespace" value="{escape_html(namespace)}"></label>'
             f'<label>pod <input name="pod" value="{escape_html(pod)}"></label>'
             f'<button type="submit">filter</button></form>\n',
             f'<p>{held:,} pods held, {matching:,} match'
             + (f'; {first + 1:,} to {first + len(shown):,} shown' if shown else '')
             + '.</p>\n']
    header = ('cluster', 'job', 'namespace', 'pod',
              *(name.removeprefix('container_') for name in metric_names))
    rows = []
    quote = urllib.parse.quote
    groups = {}      # (cluster, job, namespace) -> its cells and quoted namespace
    gone = f'<td colspan="{len(metric_names)}" class="muted">gone</td>'
    for number, key in enumerate(shown):
        if number % PAGE_YIELD_ROWS == 0:
            yield_to_writes()
        group = groups.get(key[:3])
        if group is None:
            group = groups[key[:3]] = (f'<tr>{cell(key.cluster)}{cell(key.job)}'
                                       f'{cell(key.namespace)}', quote(key.namespace, safe=''))
        # quote, not page_link's urlencode: 500 links in 2.4 ms, not 8.8.
        link = f'pod?namespace={group[1]}&pod={quote(key.pod, safe="")}'
        texts = values.get(key)
        rows.append(f'{group[0]}<td><a href="{escape_html(link)}">{escape_html(key.pod)}</a></td>'
                    + (gone if texts is None else value_cells(texts)) + '</tr>\n')
    parts.append(html_table(header, rows))
    parts.append(render_paging(namespace, pod, page, pages))
    return html_page('Pods', ''.join(parts))


def value_cells(texts):
    """The cells of a pod's values, from the texts /metrics shows them with
    (Store.pod_value_texts: b'' for none, else the value and a newline).

    A Go float's text is digits, '.', 'e', '+', '-', NaN or Inf, which HTML
    leaves as they are: 500 rows in ~1 ms, where formatting and escaping
    each value again took ~9 ms.
    """
    return ''.join([f'<td class="n">{text[:-1].decode()}</td>' if text else
                    '<td class="n">-</td>' for text in texts])


def yield_to_writes():
    """Let a waiting thread have the GIL: a page renders in pieces, so that
    decoding a write does not wait for a whole page.

    A sleep, not sleep(0): a thread that gives the GIL up for no time takes
    it straight back. Under write load the page then waits up to one switch
    interval (5 ms) per piece. With /pods viewed back to back at 10,000
    pods, the median write at full load rose 14% with the pieces, 20-34%
    without (paired runs on a loaded machine); idle, the sleeps add ~1 ms.
    """
    time.sleep(PAGE_YIELD_SECONDS)


PAGE_YIELD_ROWS = 100
PAGE_YIELD_SECONDS = 0.0001


def render_paging(namespace, pod, page, pages):
    links = []
    for label, number in (('first', 1), ('previous', page - 1), ('next', page + 1),
                          ('last', pages)):
        if 1 <= number <= pages and number != page:
            href = page_link('pods', namespace=namespace, pod=pod,
                             page=str(number) if number > 1 else '')
            links.append(f'<a href="{escape_html(href)}">{label}</a>')
        else:
            links.append(f'<span class="muted">{label}</span>')
    return f'<p>page {page:,} of {pages:,}: {" ".join(links)}</p>\n'


# -- /pod ----------------------------------------------------------------------

def series_kind(key):
    """What a series' cgroup is in its pod: the pod cgroup, the pause container or a container."""
    if key.pod_cgroup:
        return 'pod cgroup'
    return 'pause container' if key.sandbox else 'container'


def series_verdicts(rule, cumulative, held):
    """[(SeriesKey, sample, counts, why)] of one metric of one pod, from
    PodView.series and the metric's rule; counted series first.

    Which series the store counts is its own answer (counted, ended); the
    rest is read from the series' keys as pod_value reads them, so that the
    page can say why: pod_value is the one place to change with it.
    """
    counted = [(key, sample) for key, sample, is_counted, _ in held if is_counted]
    newest = {}          # identity -> the counted key with the newest sample
    for key, sample in counted:
        other = newest.get(key.identity)
        if other is None or (sample[0], sample[2]) > (other[1][0], other[1][2]):
            newest[key.identity] = (key, sample)
    pod_cgroup_counts = any(key.pod_cgroup for key, _ in counted)
    device_limit = {}       # device -> the key whose limit counts, as pod_value picks it
    if rule == RULE_DEVICE_LIMIT:
        for key, (_, value, _) in counted:
            if not key.pod_cgroup:
                known = device_limit.get(key.device)
                if known is None or value > known[1] or known[1] != known[1]:
                    device_limit[key.device] = (key, value)
    verdicts = []
    for key, sample, is_counted, ended in held:
        counts = False
        if not is_counted:
            if ended:
                why = 'ended by a stale marker'
            elif key.identity in newest:
                why = ('replaced by a newer pod cgroup (the pod was re-created)' if key.pod_cgroup
                       else 'replaced by a newer series of the same container')
            else:
                why = 'not counted'
        elif rule in (RULE_POD_CGROUP, RULE_POD_LIMIT) and not key.pod_cgroup and (
                pod_cgroup_counts):
            why = 'pod cgroup preferred'
        elif rule == RULE_POD_LIMIT and not key.pod_cgroup:
            why = "a container's limit is not the pod's"
        elif rule == RULE_SANDBOX and not key.sandbox:
            why = "the network is the sandbox's"
        elif rule in (RULE_SUM, RULE_DEVICE_LIMIT) and key.pod_cgroup:
            why = 'the sum is over the containers'
        elif rule == RULE_DEVICE_LIMIT and device_limit[key.device][0] != key:
            why = 'its device counts once, at the largest limit reported for it'
        else:
            counts = True
            why = ''
            if cumulative and ended:
                why = 'ended; a counter keeps its last value'
            elif cumulative and newest[key.identity][0] != key:
                why = 'an earlier run of the container; a counter keeps its last value'
        verdicts.append((key, sample, counts, why))
    verdicts.sort(key=lambda verdict: (not verdict[2], not verdict[0].pod_cgroup,
                                       verdict[0].container, verdict[0].device,
                                       verdict[0].part, verdict[0].id))
    return verdicts


def render_pod_page(metric_names, namespace, pod, views, now):
    """/pod: per (cluster, job) holding the pod, per metric its value, its
    rule and every input series held, each counted or not and why."""
    parts = []
    for key, view in views:
        parts.append(f'<h2>cluster {escape_html(key.cluster)}, job {escape_html(key.job)}</h2>\n')
        for metric, name in enumerate(metric_names):
            series = view.series.get(name)
            value = view.values[metric]
            if series is None and value is None:
                continue
            rule, cumulative = metric_rule(name)
            carried = view.carried[metric] if view.carried else 0.0
            parts.append(
                f'<h3>{escape_html(name)} = {escape_html(format_value(value))}</h3>\n'
                f'<p class="muted">rule: {escape_html(RULE_TEXT.get(rule, rule))}'
                f'{escape_html(COUNTER_TEXT) if cumulative else ""}'
                + (f'; {escape_html(format_go_float(carried))} carried from containers '
                   'forgotten after the TTL' if carried else '') + '</p>\n')
            rows = []
            for series_key, (timestamp_ms, sample_value, _), counts, why in series_verdicts(
                    rule, cumulative, series or []):
                verdict = (cell(f'counted: {why}' if why else 'counted', css='yes why')
                           if counts else cell(f'no: {why}', css='why'))
                rows.append(
                    f'<tr class="{"counted" if counts else "not"}">{cell(series_kind(series_key))}'
                    f'{cell(series_key.container)}{cell(series_key.id, css="mono")}'
                    f'{cell(series_key.image, css="mono")}'
                    f'{cell(" ".join(filter(None, (series_key.device, series_key.part))))}'
                    f'{cell(format_go_float(sample_value), numeric=True)}'
                    f'{cell(format_unix_time(timestamp_ms / 1000))}'
                    f'{cell(format_age(now - timestamp_ms / 1000))}{verdict}</tr>\n')
            parts.append(html_table(('kind', 'container', 'id', 'image', 'device or part',
                                     'value', 'sample time', 'age', 'counted'), rows))
    return html_page(f'Pod {namespace}/{pod}', ''.join(parts))


###############################################################################
# WSGI application ############################################################
###############################################################################

WRITE_PATHS = ('/write', '/api/v1/write')
# The statuses the exporter sends, with their RFC 9110 reason phrases.
HTTP_REASONS = {200: 'OK', 204: 'No Content', 400: 'Bad Request', 401: 'Unauthorized',
                404: 'Not Found', 405: 'Method Not Allowed', 408: 'Request Timeout',
                413: 'Content Too Large', 415: 'Unsupported Media Type',
                431: 'Request Header Fields Too Large', 500: 'Internal Server Error',
                503: 'Service Unavailable'}


class Exporter:
    """The WSGI application: routes requests to the store and back."""

    def __init__(self, config):
        self.config = config
        self.started_at = time.time()
        self.store = Store(config)
        self.exposition = ExpositionCache()
        self.pod_index = PodIndex(None, [])
        self.decoder = RemoteWriteDecoder(
            config.metrics, config.cluster, known_series=KnownSeries(config.ttl_seconds,
                                                                     config.max_series),
            limits=LabelLimits.of(config))
        # Bounds the memory of decoding: each decode holds up to
        # max_decoded_bytes of payload plus its parsed messages.
        self.decode_slots = threading.BoundedSemaphore(config.max_concurrent_decodes)
        files = dict(config.credential_files)
        write_auth = config.write_auth and CredentialFiles(files, 'K8S_EXPORTER_WRITE',
                                                           config.write_auth)
        metrics_auth = config.metrics_auth and CredentialFiles(files, 'K8S_EXPORTER_METRICS',
                                                               config.metrics_auth)
        # path -> (handler name for self-metrics, allowed methods, method, CredentialFiles)
        self.routes = {
            '/metrics': ('metrics', ('GET', 'HEAD'), self.serve_metrics, metrics_auth),
            '/-/healthy': ('health', ('GET', 'HEAD'), self.serve_health, None),
            '/-/ready': ('health', ('GET', 'HEAD'), self.serve_health, None),
            # The pages show what /metrics shows, and more: behind its credentials.
            '/': ('index', ('GET', 'HEAD'), self.serve_index, metrics_auth),
            '/pods': ('pods', ('GET', 'HEAD'), self.serve_pods, metrics_auth),
            '/pod': ('pod', ('GET', 'HEAD'), self.serve_pod, metrics_auth),
        }
        for path in WRITE_PATHS:
            self.routes[path] = ('write', ('POST',), self.receive_write, write_auth)

    def __call__(self, environ, start_response):
        self.store.start_sweeper()
        route = self.routes.get(environ.get('PATH_INFO') or '/')
        if route is None:
            handler, response = 'unknown', text_response(404, 'not found; see / for the endpoints')
        else:
            handler, methods, serve, credential_files = route
            credentials = credential_files and credential_files.current(time.monotonic())
            if environ['REQUEST_METHOD'] not in methods:
                response = text_response(405, f'method {_clip(environ["REQUEST_METHOD"], 20)} '
                                              'not allowed', [('Allow', ', '.join(methods))])
            elif credentials and not credentials.allow(environ.get('HTTP_AUTHORIZATION', '')):
                # The credential itself is never logged or echoed.
                response = text_response(401, 'missing or wrong credentials',
                                         credentials.challenge())
            else:
                try:
                    response = serve(environ)
                except Exception:
                    # A fault of ours, not of the request: 500 makes Prometheus
                    # retry, and the traceback goes to gunicorn's error log.
                    LOG.exception('%s request failed', handler)
                    response = text_response(500, 'internal error; see the exporter log')
                    if handler == 'metrics':
                        self.store.count(_count_gathering_error)
        status, headers, chunks = response
        self.store.count(lambda counters: _count_request(counters, handler, status))
        if handler == 'write' and status >= 400:
            # Every refusal is a one-line text_response: its line is the reason.
            self.store.note_refused_write(time.time(), status, chunks[0].decode().strip(),
                                          environ.get('REMOTE_ADDR', ''))
        start_response(f'{status} {HTTP_REASONS.get(status, "")}'.rstrip(), headers)
        return [] if environ['REQUEST_METHOD'] == 'HEAD' else chunks

    def refuse_unread(self, method, path, status, reason, client):
        """The response to a request ExporterWorker refuses before the app reads it.

        Counted as the app counts its own refusals once its head has come
        (method is '' before); client is gunicorn's peer address.
        """
        if method:
            handler = self.routes.get(path, ('unknown',))[0]
            self.store.count(lambda counters: _count_refused_unread(counters, handler, status))
            if handler == 'write':
                address = client[0] if isinstance(client, tuple) else str(client or '')
                self.store.note_refused_write(time.time(), status, reason, address)
        return text_response(status, reason)

    # -- POST /write ---------------------------------------------------------

    def receive_write(self, environ):
        started = time.monotonic()
        protocol = decoded = None
        written = refused = 0
        try:
            protocol = negotiate_protocol(environ.get('CONTENT_TYPE', ''),
                                          environ.get('HTTP_CONTENT_ENCODING', ''))
            body = read_body(environ, self.config.max_body_bytes)
            with self.decode_slots:
                payload = decompress_body(body, self.config.max_decoded_bytes)
                del body
                decoded = self.decoder.decode(payload, protocol, time.time_ns() // 10**6)
                del payload
            refused = self.store.apply(decoded.samples, started)
            written = decoded.samples_total - refused
            self.store.note_write(samples_by_sender(decoded.samples), time.monotonic(),
                                  time.time())
            if decoded.bad_series or decoded.future or refused:
                raise RequestError(400, write_refusal_reason(decoded, refused,
                                                             self.config.max_series))
            response = (204, [], [])
        except RequestError as error:
            response = text_response(error.status, error.reason)
        self.store.count(lambda counters: _count_write(counters, decoded, refused,
                                                       time.monotonic() - started))
        if protocol == PROTO_RW2:
            # Remote-write 2.0 spec, "Required Written Response Headers": what
            # was accepted, exported or deliberately not; Prometheus 3 takes
            # a shortfall on a 2xx for lost data.
            response[1].extend([
                ('X-Prometheus-Remote-Write-Samples-Written', str(written)),
                ('X-Prometheus-Remote-Write-Histograms-Written',
                 str(decoded.histograms if decoded else 0)),
                ('X-Prometheus-Remote-Write-Exemplars-Written',
                 str(decoded.exemplars if decoded else 0))])
        return response

    # -- GET /metrics --------------------------------------------------------

    def serve_metrics(self, environ):
        want_gzip = accepts_gzip(environ.get('HTTP_ACCEPT_ENCODING', ''))
        snapshot, plain, gzip_part = self.exposition.families(self.store, self.config.metrics,
                                                              want_gzip)
        tail = render_self_metrics(snapshot, read_process_metrics())
        headers = [('Content-Type', CONTENT_TYPE_TEXT_004)]
        # Sent as chunks: joining would copy the ~9 MB families per scrape.
        if gzip_part:
            prefix, compressor = gzip_part
            chunks = [prefix, compressor.compress(tail) + compressor.flush()]
            headers.append(('Content-Encoding', 'gzip'))
        else:
            chunks = [plain, tail]
        headers.append(('Content-Length', str(sum(map(len, chunks)))))
        return 200, headers, chunks

    def serve_health(self, environ):
        return text_response(200, 'k8s_exporter is Healthy.')

    # -- the pages ----------------------------------------------------------

    def serve_index(self, environ):
        now = time.time()
        status = self.store.page_status(time.monotonic())
        return html_response(render_status_page(self.config, status, read_process_metrics(),
                                                self.started_at, now))

    def serve_pods(self, environ):
        query = query_parameters(environ)
        namespace, pod = query.get('namespace', ''), query.get('pod', '')
        try:
            page = parse_page_number(query.get('page', '1'))
        except RequestError as error:
            return page_refusal(error.status, error.reason)
        index = self.pod_index
        version, pod_keys = self.store.pod_keys_since(index.version)
        if pod_keys is not None:
            index = self.pod_index = PodIndex(version, pod_keys, index)
        matching, shown, pages, page = filter_pods(index, namespace, pod, page)
        return html_response(render_pods_page(
            self.config.metrics, len(index.pod_keys), matching, shown,
            self.store.pod_value_texts(shown), namespace, pod, page, pages))

    def serve_pod(self, environ):
        query = query_parameters(environ)
        namespace, pod = query.get('namespace', ''), query.get('pod', '')
        if not namespace or not pod:
            return page_refusal(400, 'namespace and pod are both required, '
                                      'as in /pod?namespace=NS&pod=P')
        views = [(key, view) for key in self.store.pod_keys()
                 if key.namespace == namespace and key.pod == pod
                 for view in [self.store.pod_view(key)] if view is not None]
        if not views:
            return page_refusal(404, f'no pod {_clip(namespace)}/{_clip(pod)} is held; '
                                      'see /pods')
        return html_response(render_pod_page(self.config.metrics, namespace, pod, views,
                                             time.time()))


def _count_cut_off(counters, reason):
    counters.cut_off[reason] += 1


def _count_refused_unread(counters, handler, status):
    _count_request(counters, handler, status)
    if handler == 'write':
        counters.write_results['refused'] += 1


def _count_gathering_error(counters):
    counters.handler_errors['gathering'] += 1


def _count_request(counters, handler, status):
    key = (handler, str(status))
    counters.requests[key] = counters.requests.get(key, 0) + 1


def _count_write(counters, decoded, refused, seconds):
    """Count one write request: result applied, partial or refused, and its samples."""
    if decoded is None:
        counters.write_results['refused'] += 1
        return
    counters.samples_received += decoded.samples_in_request
    counters.ignored['unexported_metric'] += decoded.unexported
    counters.ignored['no_pod'] += decoded.no_pod
    counters.ignored['invalid_series'] += decoded.invalid - decoded.oversized
    counters.ignored['label_limit'] += decoded.oversized
    counters.ignored['future_timestamp'] += decoded.future
    now = time.time()
    if not (decoded.bad_series or decoded.future or refused):
        counters.write_results['applied'] += 1
        counters.last_write_success = counters.last_write_applied = now
    elif decoded.samples_total - refused + decoded.histograms + decoded.exemplars > 0:
        # Some of it was applied: at K8S_EXPORTER_MAX_SERIES, known series
        # still update while new ones are refused.
        counters.write_results['partial'] += 1
        counters.last_write_applied = now
    else:
        counters.write_results['refused'] += 1
    counters.observe_write(seconds)


def write_refusal_reason(decoded, refused, max_series):
    """The one-line reason of a write applied only in part."""
    parts = []
    if decoded.bad_series or decoded.future:
        if decoded.bad_series:
            parts.append(f'{decoded.bad_series} invalid series skipped, first: '
                         f'{decoded.first_error}')
        if decoded.future:
            parts.append(f'{decoded.future} samples more than 10 minutes ahead of the '
                         'exporter\'s clock refused')
        parts.append('the rest was applied')
    if refused:
        parts.append(f'{refused} samples of new series refused: K8S_EXPORTER_MAX_SERIES='
                     f'{max_series} reached; known series still update')
    return '; '.join(parts)


def read_body(environ, max_body_bytes):
    """Read the request body, refusing one over the limit with 413."""
    length_header = environ.get('CONTENT_LENGTH') or ''
    stream = environ['wsgi.input']
    if length_header:
        try:
            length = int(length_header)
        except ValueError:
            raise RequestError(400, f'bad Content-Length {_clip(length_header, 20)!r}') from None
        if length > max_body_bytes:
            raise RequestError(413, f'body of {length} bytes exceeds the limit of '
                                    f'{max_body_bytes}')
        body = _read(stream, length)
        if len(body) < length:
            raise RequestError(400, f'body ended after {len(body)} of {length} bytes')
    else:
        # Chunked: read one byte past the limit to tell "at" from "over".
        body = _read(stream, max_body_bytes + 1)
        if len(body) > max_body_bytes:
            raise RequestError(413, f'body exceeds the limit of {max_body_bytes} bytes')
    if not body:
        raise RequestError(400, 'empty body')
    return body


def _read(stream, size):
    try:
        return stream.read(size)
    except OSError:
        # gunicorn's NoMoreData: the body ended before its length.
        raise RequestError(400, 'request body ended early') from None
    except Exception:
        # The server's own parse errors (gunicorn.http.errors.InvalidChunkSize,
        # ChunkMissingTerminator, ...) are the client's fault: a 400, not a
        # traceback and a 500.
        raise RequestError(400, 'malformed chunked request body') from None


def accepts_gzip(accept_encoding):
    for part in accept_encoding.split(','):
        coding, _, params = part.partition(';')
        if coding.strip().lower() == 'gzip':
            return params.replace(' ', '') not in ('q=0', 'q=0.0', 'q=0.00', 'q=0.000')
    return False


def text_response(status, reason, headers=()):
    """A one-line text/plain response, as every refusal is."""
    body = (reason + '\n').encode()
    return status, [('Content-Type', 'text/plain; charset=utf-8'),
                    ('Content-Length', str(len(body))), *headers], [body]


def load_config():
    """The configuration from os.environ: the one place the environment is read."""
    return Config.from_environ(os.environ)


EXIT_CONFIG_ERROR = 4   # gunicorn's "app failed to load": its master stops, not respawns


def load_config_or_exit(warn=False):
    """load_config(), or its one-line reason on stderr and exit 4.

    gunicorn.conf.py's on_starting calls it in gunicorn's master, before
    any worker is forked, with warn: the warnings are logged there, once;
    python3 k8s_exporter.py calls it first thing, and the worker when it
    makes the app.
    """
    configure_logging()
    try:
        config = load_config()
    except ConfigError as error:
        print(f'k8s_exporter: {error}', file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    if warn:
        for warning in configuration_warnings(os.environ, config):
            LOG.warning('%s', warning)
    return config


def __getattr__(name):
    """`k8s_exporter:app`: the Exporter, made from the environment when first asked for.

    Importing the module only defines things. Under gunicorn, the app is
    made by ExporterWorker, which gunicorn.conf.py names and which never asks
    for `app`: a gunicorn that asks was started without that file (from
    another folder, with another config file, or with --preload) and would
    serve with none of the exporter's settings, so it is refused with the
    line that says how to start.
    """
    if name != 'app':
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    if 'gunicorn.arbiter' in sys.modules:
        raise AppImportError(f'k8s_exporter: gunicorn was started without k8s_exporter\'s '
                             'gunicorn.conf.py (or with --preload), so with none of its '
                             f'settings: start it as {start_command()}')
    global app
    app = Exporter(load_config_or_exit())
    return app


# glibc's malloc gives every thread that allocates an arena of its own, and
# hands freed memory back to the kernel once 128 KiB lie free at the top of
# one. gunicorn's eight threads take turns decoding bodies of a megabyte and
# more, so each arena kept its own high-water mark, and every request paid
# page faults to map its buffers again. One arena that keeps what a few
# requests use took ingest at 10,000 pods from 309k to 434k samples per
# CPU-second, and the worker's RSS from 91 to 74 MiB (make bench,
# 2026-11-25, before later changes; the README has today's figures).
MALLOC_ARENAS = 1
MALLOC_KEEP_FREE_BYTES = 32 * MiB    # also the size from which a block is mmap()ed
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def tune_malloc():
    """Set glibc's malloc up for the worker; return False where there is no glibc.

    Call it in the process's main thread before any other thread allocates
    (gunicorn.conf.py's post_fork): an arena, once a thread has one, stays
    its own.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):    # no libc to load, or one without mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # Setting the trim threshold fixes the mmap threshold at its default of
    # 128 KiB too, so both are set.
    return all(mallopt(option, value) == 1 for option, value in (
        (_M_ARENA_MAX, MALLOC_ARENAS),
        (_M_MMAP_THRESHOLD, MALLOC_KEEP_FREE_BYTES),
        (_M_TRIM_THRESHOLD, MALLOC_KEEP_FREE_BYTES)))


# CPython looks for reference cycles after every 700 new container objects.
# A write makes thousands (a Sample per kept series) that live until the
# request ends, so each was scanned and promoted before it died: 1.1 us of a
# kept sample's 5.2 (in process, keep-rule bodies, 10,000 pods, 2026-12-02).
# Nothing on the write path makes cycles; a young generation of 50,000 lets
# a request's objects die unscanned, for 0.07 us over no collection at all.
GC_YOUNG_THRESHOLD = 50_000


def tune_gc():
    """Set the cycle collector up for the worker: a larger young generation."""
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


###############################################################################
# Serving #####################################################################
###############################################################################

# gunicorn's threaded worker gives a connection to a pool thread as soon as
# it is accepted, and the thread reads the request from the socket itself:
# eight clients that sent a byte every 4 s held all eight threads, and with
# them every write and scrape, for 35 s; 50 that sent nothing, for 28 s.
# ExporterWorker reads every request in the worker's main thread, from one
# selector over all connections, and hands a pool thread only a request that
# has arrived whole, so a thread never waits for a client. One that does not
# keep up is cut off:
HEADER_DEADLINE_SECONDS = 10        # from accept, or a kept-alive request's first byte
BODY_GRACE_SECONDS = 10             # then the body may start slowly, but must keep up
MIN_BODY_BYTES_PER_SECOND = 256 * KiB   # a mean of this much: 10 MiB within 50 s
# Prometheus sends ~300 bytes of headers; gunicorn's own limits allow ~800 KiB.
MAX_HEADER_BYTES = 32 * KiB
LINGER_SECONDS = 2                  # a refused client's unread bytes are read and dropped
READ_SIZE = 256 * KiB
CUT_OFF_LOG_INTERVAL_SECONDS = 60
WORKER_CLASS = 'k8s_exporter.ExporterWorker'


class RequestRefused(Exception):
    """A request the worker answers itself, before a thread would read it."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status, self.reason = status, reason


class IncomingRequest:
    """One request's bytes as they arrive, and where the request ends.

    It frames HTTP/1.1 only as far as finding the end takes (RFC 9112,
    section 6: Content-Length or chunked); gunicorn's parser reads the
    request from these bytes in a pool thread and judges the rest. A request
    whose end cannot be told (two lengths, an unknown coding, a bad chunk
    size) is refused here with 400: handed over, its parser would wait on
    the socket for bytes that may never come.
    """

    def __init__(self, started, data=b'', handshaking=False):
        self.started = started          # time.monotonic()
        self.data = bytearray(data)
        self.handshaking = handshaking  # TLS, before its handshake is done
        self.head_end = 0               # offset after the blank line, once it came
        self.body_started = 0.0
        self.end = 0                    # offset after the request, once known
        self.chunk_at = 0               # chunked: where the next size line starts
        self.chunked_size = 0
        self.method = self.path = ''
        self.expects_continue = False

    def deadline(self):
        """When it is cut off if it is not whole by then."""
        if not self.head_end:
            return self.started + HEADER_DEADLINE_SECONDS
        received = len(self.data) - self.head_end
        return self.body_started + BODY_GRACE_SECONDS + received / MIN_BODY_BYTES_PER_SECOND

    def whole_length(self, now, max_body_bytes):
        """The request's length in self.data once all of it is there, else 0.

        Raises RequestRefused for headers over MAX_HEADER_BYTES and bodies
        over max_body_bytes, as soon as either shows.
        """
        if not self.head_end:
            blank_line = self.data.find(b'\r\n\r\n', 0, MAX_HEADER_BYTES)
            if blank_line < 0:
                if len(self.data) >= MAX_HEADER_BYTES:
                    self._read_request_line(bytes(self.data.partition(b'\r\n')[0]))
                    raise RequestRefused(431, f'request headers exceed {MAX_HEADER_BYTES} bytes')
                return 0
            self.head_end, self.body_started = blank_line + 4, now
            self._read_head(bytes(self.data[:blank_line]), max_body_bytes)
        if self.chunk_at:
            self._find_last_chunk(max_body_bytes)
        return self.end if self.end and len(self.data) >= self.end else 0

    def _read_request_line(self, request_line):
        method, _, rest = request_line.partition(b' ')
        self.method = method.decode('latin-1')
        self.path = rest.partition(b' ')[0].partition(b'?')[0].decode('latin-1')

    def _read_head(self, head, max_body_bytes):
        request_line, *fields = head.split(b'\r\n')
        self._read_request_line(request_line)
        lengths, codings = [], []
        for field in fields:
            name, _, value = field.partition(b':')
            name, value = name.strip().lower(), value.strip()
            if name == b'content-length':
                lengths.append(value)
            elif name == b'transfer-encoding':
                codings.extend(coding.strip().lower() for coding in value.split(b','))
            elif name == b'expect':
                self.expects_continue = value.lower() == b'100-continue'
        if codings:
            if lengths or codings[-1] != b'chunked':
                raise RequestRefused(400, 'cannot tell where the body ends: Transfer-Encoding '
                                          'must end in chunked, without Content-Length')
            self.chunk_at = self.head_end
        elif lengths:
            if len(set(lengths)) != 1 or not lengths[0].isdigit():
                raise RequestRefused(400, 'cannot tell where the body ends: bad Content-Length '
                                          f'{_clip(b",".join(lengths).decode("latin-1"), 20)!r}')
            length = int(lengths[0])
            if length > max_body_bytes:
                raise RequestRefused(413, f'body of {length} bytes exceeds the limit of '
                                          f'{max_body_bytes}')
            self.end = self.head_end + length
        else:
            self.end = self.head_end

    def _find_last_chunk(self, max_body_bytes):
        data = self.data
        while self.chunk_at and len(data) > self.chunk_at:
            line_end = data.find(b'\r\n', self.chunk_at, self.chunk_at + 1024)
            if line_end < 0:
                if len(data) - self.chunk_at >= 1024:    # no size line is that long
                    raise RequestRefused(400, 'malformed chunked request body')
                return
            size_text = bytes(data[self.chunk_at:line_end]).partition(b';')[0].strip()
            if not size_text or size_text.strip(b'0123456789abcdefABCDEF'):
                raise RequestRefused(400, 'malformed chunked request body')
            size = int(size_text, 16)
            if size:
                self.chunked_size += size
                if self.chunked_size > max_body_bytes:
                    raise RequestRefused(413, f'body exceeds the limit of {max_body_bytes} '
                                              'bytes')
                self.chunk_at = line_end + 2 + size + 2
                continue
            # The last chunk, then trailer fields up to a blank line.
            if data[line_end:line_end + 4] == b'\r\n\r\n':
                self.chunk_at, self.end = 0, line_end + 4
                return
            blank_line = data.find(b'\r\n\r\n', line_end + 2, line_end + 2 + MAX_HEADER_BYTES)
            if blank_line >= 0:
                self.chunk_at, self.end = 0, blank_line + 4
            elif len(data) - line_end > MAX_HEADER_BYTES:
                raise RequestRefused(431, f'request trailers exceed {MAX_HEADER_BYTES} bytes')
            return


def http_response_bytes(status, headers, chunks):
    """A whole HTTP/1.1 response that closes its connection, for the worker to send."""
    lines = [f'HTTP/1.1 {status} {HTTP_REASONS[status]}']
    lines.extend(f'{name}: {value}' for name, value in headers)
    lines.append('Connection: close')
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1') + b''.join(chunks)


def serving_problem(cfg):
    """Why gunicorn's settings (its Config) cannot serve the exporter, in a line, or ''."""
    if cfg.workers != 1:
        return (f'gunicorn is set to start {cfg.workers} workers; k8s_exporter\'s store lives '
                'in its one worker, so each would hold part of the pods: run one (-w 1) '
                'and shard by cluster instead (see README, Operations)')
    if cfg.worker_class is not ExporterWorker:
        return (f'gunicorn\'s worker class is {cfg.worker_class_str!r}; k8s_exporter needs '
                f'{WORKER_CLASS!r}, as its gunicorn.conf.py says, which reads requests '
                'whole before a thread takes them')
    return ''


def start_command():
    """How to start the exporter with its settings, for the lines that refuse."""
    return (f'gunicorn -c {GUNICORN_CONF} k8s_exporter:app, or python3 '
            f'{os.path.abspath(__file__)}')


def check_serving_or_exit(cfg):
    """gunicorn.conf.py's on_starting, and ExporterWorker.check_config in
    gunicorn's master for another config file: refuse settings (gunicorn's
    Config) that would split or expose the store, before any worker starts."""
    problem = serving_problem(cfg)
    if problem:
        print(f'k8s_exporter: {problem}', file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)


def keep_one_worker(server, new_value, old_value):
    """gunicorn.conf.py's nworkers_changed: `kill -TTIN` on the master adds no worker.

    The running worker and its store are left alone. At start-up
    (old_value None) check_serving_or_exit has the say.
    """
    if old_value is not None and new_value > 1:
        LOG.warning('asked for %d workers (kill -TTIN?); staying at one, whose store holds '
                    'every pod', new_value)
        server.num_workers = 1


def ignore_hangup(server):
    """gunicorn.conf.py's when_ready: SIGHUP would restart the worker and empty the store.

    Nothing it would reload can change: the environment is the master's,
    and credential files are read again when they change.
    """
    def hangup(signal_number, frame):
        LOG.warning('SIGHUP ignored: reloading would restart the worker and empty the store; '
                    'credential files are re-read by themselves, other settings need a '
                    'restart')
    signal.signal(signal.SIGHUP, hangup)


class ExporterWorker(ThreadWorker):
    """gunicorn's threaded worker, given only requests that have arrived whole.

    The main thread reads every connection without blocking until its
    request is whole, then a pool thread parses and serves it from those
    bytes; after a response a kept-alive connection is read again by the
    main thread. Reading is bounded in time (the deadlines above) and in
    memory: all requests being read or served hold at most
    threads x K8S_EXPORTER_MAX_BODY_BYTES, past which a write is answered
    503 (Prometheus retries it) rather than buffered.
    """

    def init_process(self):
        self.incoming = {}          # TConn -> IncomingRequest, being read
        self.lingering = {}         # TConn -> when it is closed
        self.buffered_bytes = 0     # of every request being read or served
        self.cut_offs = collections.Counter()      # by reason, since the last log line
        self.cut_offs_logged_at = -math.inf
        super().init_process()

    def init_signals(self):
        super().init_signals()
        # The master ignores SIGHUP (ignore_hangup); the worker too, for a
        # SIGHUP sent to the whole process group: it would end the worker.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    @classmethod
    def check_config(cls, cfg, log):
        super().check_config(cfg, log)
        check_serving_or_exit(cfg)

    def load_wsgi(self):
        # The exporter's worker serves the exporter: the app is made here,
        # not looked up, because `k8s_exporter:app` refuses to load under
        # any other worker (see __getattr__).
        self.wsgi = Exporter(load_config_or_exit())
        self.buffer_budget = self.cfg.threads * self.wsgi.config.max_body_bytes

    # -- connections in the main thread --------------------------------------

    def accept(self, listener):
        try:
            client, address = listener.accept()
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return
            raise
        self.nr_conns += 1
        conn = TConn(self.cfg, client, address, listener.getsockname())   # non-blocking
        conn.held_bytes, conn.pipelined = 0, b''
        if self.cfg.is_ssl:
            conn.sock = ssl_context(self.cfg).wrap_socket(
                conn.sock, server_side=True, do_handshake_on_connect=False,
                suppress_ragged_eofs=self.cfg.suppress_ragged_eofs)
        self.incoming[conn] = IncomingRequest(time.monotonic(), handshaking=self.cfg.is_ssl)
        self.poller.register(conn.sock, selectors.EVENT_READ,
                             functools.partial(self.on_request_bytes, conn))

    def on_client_socket_readable(self, conn, client):
        self.read_next_request(conn)

    def read_next_request(self, conn, data=b''):
        """A kept-alive connection's next request has begun: on its socket,
        or in data, the bytes that came after the last one (pipelined)."""
        self.keepalived_conns.remove(conn)
        self.incoming[conn] = request = IncomingRequest(time.monotonic(), data)
        self.buffered_bytes += len(data)
        self.poller.modify(conn.sock, selectors.EVENT_READ,
                           functools.partial(self.on_request_bytes, conn))
        return request

    def on_request_bytes(self, conn, client):
        request = self.incoming[conn]
        try:
            if request.handshaking:
                conn.sock.do_handshake()
                request.handshaking = False
            # Until the socket has no more: TLS may hold decrypted bytes that
            # no longer make the socket readable.
            while True:
                chunk = conn.sock.recv(READ_SIZE)
                if not chunk:
                    if not request.head_end:
                        self.close(conn)      # gone, or done with a kept-alive connection
                        return
                    # Half-closed in its body: it may still read why.
                    raise RequestRefused(400, 'request body ended early')
                request.data += chunk
                self.buffered_bytes += len(chunk)
                length = request.whole_length(time.monotonic(), self.wsgi.config.max_body_bytes)
                if length:
                    break
                if request.head_end and self.buffered_bytes > self.buffer_budget:
                    raise RequestRefused(503, 'the exporter holds too many request bodies '
                                              'at once; retry')
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            if request.expects_continue and request.head_end:
                # curl waits a second for this before it sends a body.
                request.expects_continue = False
                self.send_quietly(conn, b'HTTP/1.1 100 Continue\r\n\r\n')
            return
        except RequestRefused as refusal:
            self.refuse(conn, request, refusal.status, refusal.reason)
            return
        except OSError:         # a reset, a broken TLS handshake (ssl.SSLError)
            self.close(conn)
            return
        self.hand_over(conn, request, length)

    def hand_over(self, conn, request, length):
        """Give a pool thread the whole request: it reads it from memory, never the socket."""
        del self.incoming[conn]
        self.poller.unregister(conn.sock)
        if conn.parser is None:
            conn.parser = gunicorn_http.get_parser(self.cfg, conn.sock, conn.client)
        conn.initialized = conn.data_ready = True    # no wait for data, no second TLS wrap
        whole = memoryview(request.data)
        conn.parser.unreader.unread(whole[:length])      # one copy, into gunicorn's buffer
        conn.pipelined = bytes(whole[length:])
        whole.release()
        conn.held_bytes = len(request.data)
        self.enqueue_req(conn)

    def finish_request(self, conn, fs):
        self.buffered_bytes -= conn.held_bytes
        conn.held_bytes = 0
        pipelined, conn.pipelined = conn.pipelined, b''
        try:
            keep_alive = not fs.cancelled() and fs.result()
        except Exception:
            keep_alive = False
        if not keep_alive:
            # gunicorn would close it gracefully here, waiting up to 2 s in
            # this thread for the client to close its side: 20 clients that
            # never did held every connection up for 40 s.
            self.linger(conn)
            return
        super().finish_request(conn, fs)
        if pipelined and conn in self.keepalived_conns:
            # The next request came with this one: read on from its bytes.
            request = self.read_next_request(conn, pipelined)
            try:
                length = request.whole_length(time.monotonic(), self.wsgi.config.max_body_bytes)
            except RequestRefused as refusal:
                self.refuse(conn, request, refusal.status, refusal.reason)
                return
            if length:
                self.hand_over(conn, request, length)

    # -- cutting off ---------------------------------------------------------

    def murder_pending(self):
        """Each turn of the main loop: cut off requests past their deadline."""
        super().murder_pending()
        now = time.monotonic()
        for conn, request in list(self.incoming.items()):
            if not self.alive and not request.data:
                self.close(conn)       # stopping: no request begun, none to finish
            elif now >= request.deadline():
                self.cut_off(conn, request)
        for conn, closing_at in list(self.lingering.items()):
            if now >= closing_at:
                self.close(conn)
        if self.cut_offs and now - self.cut_offs_logged_at >= CUT_OFF_LOG_INTERVAL_SECONDS:
            LOG.warning('cut off %d connections that sent too slowly or nothing: %s (logged '
                        'at most once a minute; see k8s_exporter_connections_cut_off_total)',
                        sum(self.cut_offs.values()),
                        ', '.join(f'{count} {reason}'
                                  for reason, count in sorted(self.cut_offs.items())))
            self.cut_offs.clear()
            self.cut_offs_logged_at = now

    def cut_off(self, conn, request):
        if not request.data:
            reason = 'silent'
        elif not request.head_end:
            reason = 'slow_headers'
        else:
            reason = 'slow_body'
        self.cut_offs[reason] += 1
        self.wsgi.store.count(lambda counters: _count_cut_off(counters, reason))
        if reason == 'silent':
            self.close(conn)
        elif reason == 'slow_headers':
            self.refuse(conn, request, 408, 'request headers not received in time')
        else:
            self.refuse(conn, request, 408, 'request body not received in time')

    def refuse(self, conn, request, status, reason):
        """Answer a request the app never sees, then read and drop what still comes."""
        self.incoming.pop(conn, None)
        self.buffered_bytes -= len(request.data)
        response = self.wsgi.refuse_unread(request.method, request.path, status, reason,
                                           conn.client)
        self.send_quietly(conn, http_response_bytes(*response))
        self.linger(conn)

    def linger(self, conn):
        """Close a connection after its response, without waiting in this thread.

        Closing with bytes unread would reset the connection, and the client
        might not read its response: what it still sends is read and dropped
        for LINGER_SECONDS, or until it closes.
        """
        try:
            conn.sock.setblocking(False)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.lingering[conn] = time.monotonic() + LINGER_SECONDS
        callback = functools.partial(self.on_lingering_bytes, conn)
        try:
            self.poller.modify(conn.sock, selectors.EVENT_READ, callback)
        except KeyError:     # served by a thread: no longer registered
            self.poller.register(conn.sock, selectors.EVENT_READ, callback)

    def on_lingering_bytes(self, conn, client):
        try:
            if conn.sock.recv(READ_SIZE):
                return
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError:
            pass
        self.close(conn)

    def send_quietly(self, conn, data):
        """Send a short response without blocking; a client that cannot take it misses it."""
        try:
            conn.sock.send(data)
        except OSError:          # BlockingIOError and ssl.SSLError among them
            pass

    def close(self, conn):
        request = self.incoming.pop(conn, None)
        if request is not None:
            self.buffered_bytes -= len(request.data)
        self.lingering.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        self.nr_conns -= 1
        conn.close()


###############################################################################
# Entry point #################################################################
###############################################################################

GUNICORN_CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gunicorn.conf.py')


def main():
    """Serve like `make run`: gunicorn with gunicorn.conf.py, on K8S_EXPORTER_LISTEN."""
    config = load_config_or_exit()
    try:
        from gunicorn.app.wsgiapp import run as run_gunicorn
    except ImportError as error:
        # No fallback to wsgiref: it has none of gunicorn's limits and
        # deadlines (it hung on chunked writes and stalled bodies).
        sys.exit(missing_packages_message(error))
    if not os.path.exists(GUNICORN_CONF):
        sys.exit(f'k8s_exporter: {GUNICORN_CONF} is missing; it holds the serving '
                 'settings: copy gunicorn.conf.py beside k8s_exporter.py')
    # The command line gunicorn would get: the settings are the file's.
    sys.argv = ['gunicorn', '--config', GUNICORN_CONF, '--bind', config.listen,
                'k8s_exporter:app']
    run_gunicorn()


if __name__ == '__main__':
    main()
