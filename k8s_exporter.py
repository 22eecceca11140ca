"""k8s_exporter: per-pod cAdvisor gauges, from Prometheus remote write to /metrics.

    cAdvisor -> prometheus1 --remote_write--> k8s_exporter -> prometheus2

prometheus1 remote-writes what it scrapes from cAdvisor (the kubelet's
/metrics/cadvisor or a standalone cAdvisor) to POST /write, in Remote Write
1.0 or 2.0. k8s_exporter keeps five container gauges, reduces each to one
value per pod and serves them on GET /metrics, labelled
{cluster, item, job, namespace, pod}, for prometheus2 to scrape.

Run it:

    gunicorn -w 1 --threads 8 -b 0.0.0.0:9201 k8s_exporter:app
    python3 k8s_exporter.py       # same defaults, for a drop-in on a host

One worker (-w 1): the store lives in the worker's memory.

Environment, read and checked once at start-up:

    K8S_EXPORTER_CLUSTER            k8s-cluster   cluster label for series without one
    K8S_EXPORTER_TTL_SECONDS        300           forget an input series not received for this long
    K8S_EXPORTER_MAX_BODY_BYTES     10485760      largest accepted write body, compressed
    K8S_EXPORTER_MAX_DECODED_BYTES  67108864      largest accepted write body, decompressed
    K8S_EXPORTER_MAX_SERIES         1000000       most input series held; new ones are refused
    K8S_EXPORTER_METRICS            (the five)    comma list of cAdvisor gauges to export
    K8S_EXPORTER_MAX_CONCURRENT_DECODES  2        write bodies decoded at once; others wait
    K8S_EXPORTER_LISTEN             0.0.0.0:9201  address for `python3 k8s_exporter.py`
    K8S_EXPORTER_WRITE_BEARER_TOKEN_FILE          token POST /write must present
    K8S_EXPORTER_WRITE_BASIC_AUTH_FILE            user:password lines POST /write accepts
    K8S_EXPORTER_METRICS_BEARER_TOKEN_FILE        the same for GET /metrics
    K8S_EXPORTER_METRICS_BASIC_AUTH_FILE
"""

import base64
import dataclasses
import hmac
import logging
import math
import os
import re
import struct
import sys
import threading
import time
import zlib
from typing import NamedTuple

import snappy
from google.protobuf.message import DecodeError

import remote_pb2

__version__ = '1.0.0'

MiB = 1024 * 1024
LOG = logging.getLogger('k8s_exporter')


###############################################################################
# Configuration ###############################################################
###############################################################################

# HELP texts of the seed's exposition; they are part of the output contract.
SEED_HELP = {
    'container_cpu_load_average_10s':
        'Average load of container CPU over the past 10 seconds',
    'container_fs_limit_bytes':
        'The total amount of file system that the container can use (unit: bytes)',
    'container_fs_usage_bytes':
        'The usage of the file system in the container (unit: bytes)',
    'container_memory_max_usage_bytes':
        'The maximum memory usage of the container (unit: bytes)',
    'container_memory_usage_bytes':
        'The current memory usage of the container (unit: bytes)',
}
DEFAULT_METRICS = tuple(sorted(SEED_HELP))
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
    max_concurrent_decodes: int = 2
    listen: str = '0.0.0.0:9201'
    # Credentials are read from files at start-up; repr=False keeps them out
    # of logs and tracebacks.
    write_auth: 'Credentials' = dataclasses.field(default=None, repr=False)
    metrics_auth: 'Credentials' = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_environ(cls, environ):
        """Read K8S_EXPORTER_* variables; raise ConfigError on the first bad one."""
        defaults = cls()
        return cls(
            write_auth=Credentials.from_files(environ, 'K8S_EXPORTER_WRITE'),
            metrics_auth=Credentials.from_files(environ, 'K8S_EXPORTER_METRICS'),
            max_concurrent_decodes=_env_number(environ, 'K8S_EXPORTER_MAX_CONCURRENT_DECODES',
                                               defaults.max_concurrent_decodes, int),
            cluster=_env_text(environ, 'K8S_EXPORTER_CLUSTER', defaults.cluster),
            ttl_seconds=_env_number(environ, 'K8S_EXPORTER_TTL_SECONDS',
                                    defaults.ttl_seconds, float),
            max_body_bytes=_env_number(environ, 'K8S_EXPORTER_MAX_BODY_BYTES',
                                       defaults.max_body_bytes, int),
            max_decoded_bytes=_env_number(environ, 'K8S_EXPORTER_MAX_DECODED_BYTES',
                                          defaults.max_decoded_bytes, int),
            max_series=_env_number(environ, 'K8S_EXPORTER_MAX_SERIES',
                                   defaults.max_series, int),
            metrics=_env_metric_names(environ, 'K8S_EXPORTER_METRICS', defaults.metrics),
            listen=_env_listen(environ, 'K8S_EXPORTER_LISTEN', defaults.listen),
        )


class Credentials(NamedTuple):
    """What an endpoint accepts: a bearer token and/or basic-auth pairs.

    The forms Prometheus sends from remote_write and scrape configs
    (`authorization` and `basic_auth`).
    """
    bearer_tokens: tuple      # bytes
    basic_pairs: tuple        # b'user:password'

    @classmethod
    def from_files(cls, environ, prefix):
        token_variable = f'{prefix}_BEARER_TOKEN_FILE'
        basic_variable = f'{prefix}_BASIC_AUTH_FILE'
        tokens = tuple(_read_secret_lines(environ, token_variable)[:1])
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


def _env_number(environ, name, default, kind):
    raw = environ.get(name, '').strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        expected = 'an integer' if kind is int else 'a number'
        raise ConfigError(f'{name}={raw!r}: not {expected}') from None
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f'{name}={raw!r}: must be greater than 0')
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


def is_stale_marker(value):
    return value != value and _pack_double(value) == STALE_NAN_BYTES


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


@dataclasses.dataclass
class DecodedWrite:
    """What one write request carried, before it touches the store."""
    samples: list            # Sample, for series of exported metrics with a pod
    samples_total: int = 0   # every sample of every well-formed series
    unexported: int = 0      # samples of metric names not exported
    no_pod: int = 0          # samples of exported names without pod identity
    bad_series: int = 0
    first_error: str = ''

    def reject_series(self, reason):
        self.bad_series += 1
        if not self.first_error:
            self.first_error = reason


def decode_write_request(payload, protocol, wanted, default_cluster):
    """Parse a decompressed body into the samples the store needs.

    wanted maps metric name -> metric index. Bad series are recorded in the
    result, not raised, so the good ones of the same request still apply.
    """
    if protocol == PROTO_RW2:
        return _decode_rw2(payload, wanted, default_cluster)
    return _decode_rw1(payload, wanted, default_cluster)


def _decode_rw1(payload, wanted, default_cluster):
    request = remote_pb2.WriteRequest()
    try:
        request.ParseFromString(payload)
    except DecodeError as error:
        raise RequestError(400, f'corrupt protobuf: {_clip(str(error))}') from None
    decoded = DecodedWrite(samples=[])
    # Most series are dropped (5-10% of cAdvisor samples are exported), so
    # each costs one label read: Prometheus sends labels sorted, which puts
    # __name__ first unless a label name starts with an upper-case letter.
    for series in request.timeseries:
        labels = series.labels
        if not labels:
            decoded.reject_series('series with no labels')
            continue
        first = labels[0]
        if first.name == '__name__':
            name = first.value
        else:
            name = next((label.value for label in labels if label.name == '__name__'), '')
        if not name:
            decoded.reject_series('series with no __name__ label')
            continue
        samples = series.samples
        count = len(samples)
        decoded.samples_total += count
        metric = wanted.get(name)
        if metric is None:
            decoded.unexported += count
            continue
        _collect_samples(decoded, metric, {label.name: label.value for label in labels},
                         samples, count, default_cluster)
    return decoded


def _decode_rw2(payload, wanted, default_cluster):
    request = remote_pb2.WriteRequestV2()
    try:
        request.ParseFromString(payload)
    except DecodeError as error:
        raise RequestError(400, f'corrupt protobuf: {_clip(str(error))}') from None
    decoded = DecodedWrite(samples=[])
    symbols = list(request.symbols)
    symbol_count = len(symbols)
    # Resolve names once per request: a series is then kept or dropped by
    # comparing integers, without building its label strings.
    try:
        name_ref = symbols.index('__name__')
    except ValueError:
        name_ref = -1
    wanted_refs = {ref: wanted[symbol] for ref, symbol in enumerate(symbols) if symbol in wanted}
    for series in request.timeseries:
        refs = series.labels_refs
        ref_count = len(refs)
        if not ref_count:
            decoded.reject_series('series with no labels')
            continue
        if ref_count % 2:
            decoded.reject_series('series with an odd number of label refs')
            continue
        if max(refs) >= symbol_count:
            decoded.reject_series(f'label ref out of range of {symbol_count} symbols')
            continue
        if refs[0] == name_ref:
            value_ref = refs[1]
        else:
            pairs = iter(refs)
            value_ref = next((v for n, v in zip(pairs, pairs) if n == name_ref), 0)
        if not symbols[value_ref]:
            decoded.reject_series('series with no __name__ label')
            continue
        samples = series.samples
        count = len(samples)
        decoded.samples_total += count
        metric = wanted_refs.get(value_ref)
        if metric is None:
            decoded.unexported += count
            continue
        pairs = iter(refs)
        labels = {symbols[n]: symbols[v] for n, v in zip(pairs, pairs)}
        _collect_samples(decoded, metric, labels, samples, count, default_cluster)
    return decoded


def _collect_samples(decoded, metric, labels, samples, count, default_cluster):
    identity = pod_series_identity(labels, default_cluster)
    if identity is None:
        decoded.no_pod += count
        return
    pod, series_key = identity
    append = decoded.samples.append
    for sample in samples:
        append(Sample(pod, metric, series_key, sample.timestamp, sample.value))


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
    """An input series within its pod and metric.

    Under containerd the pause container and the pod cgroup carry the same
    labels but for id, so the key keeps every label that tells cgroups and
    filesystems apart.
    """
    pod_cgroup: bool   # the pod-level cgroup, not one of its containers
    container: str
    id: str
    image: str
    device: str


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

_intern = sys.intern


def pod_series_identity(labels, default_cluster):
    """Map a cAdvisor series' labels to (PodKey, SeriesKey), or None without a pod."""
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
    pod_key = PodKey(labels.get('cluster') or default_cluster, labels.get('job', ''),
                     namespace, pod)
    series_key = SeriesKey(pod_cgroup, _intern(container), _intern(cgroup),
                           _intern(labels.get('image', '')), _intern(labels.get('device', '')))
    return pod_key, series_key


# How a pod's value is made from its input series, per metric.
RULE_POD_CGROUP = 'pod_cgroup'   # the pod cgroup series, else the sum of containers
RULE_SUM = 'sum'                 # sum over containers and devices
RULE_DEVICE_LIMIT = 'device'     # sum over distinct devices of that device's limit


def aggregation_rule(metric_name):
    if metric_name == 'container_fs_limit_bytes':
        return RULE_DEVICE_LIMIT
    if metric_name.startswith('container_fs_'):
        return RULE_SUM
    return RULE_POD_CGROUP


def pod_value(rule, series):
    """The pod's value from its input series {SeriesKey: (ts, value, received)}."""
    if not series:
        return None
    if rule == RULE_POD_CGROUP:
        pod_level = [entry[1] for key, entry in series.items() if key.pod_cgroup]
        if pod_level:
            return math.fsum(pod_level)
        return math.fsum(entry[1] for entry in series.values())
    containers = [(key.device, entry[1]) for key, entry in series.items() if not key.pod_cgroup]
    if not containers:
        return None
    if rule == RULE_SUM:
        return math.fsum(value for _, value in containers)
    # Containers of one pod share the pod's devices: count each device once,
    # at the largest limit reported for it.
    limits = {}
    for device, value in containers:
        if device not in limits or value > limits[device]:
            limits[device] = value
    return math.fsum(limits.values())


###############################################################################
# The store ###################################################################
###############################################################################

SWEEP_CHUNK_PODS = 500   # pods expired per lock hold: ~2 ms for 500 pods


class PodState:
    """The input series of one pod, one dict per exported metric."""
    __slots__ = ('series', 'series_count')

    def __init__(self, metric_count):
        self.series = [{} for _ in range(metric_count)]
        self.series_count = 0


class Store:
    """All mutable state of the exporter, behind one lock.

    Writes are decoded outside the lock and applied under it in one piece,
    so a scrape sees all of a request or none of it. Each pod's output lines
    are rendered when its value changes, so a scrape only joins strings.
    """

    def __init__(self, config):
        self.config = config
        self.metric_names = config.metrics
        self.rules = [aggregation_rule(name) for name in config.metrics]
        self._lock = threading.Lock()
        self._pods = {}                                         # PodKey -> PodState
        self._lines = [{} for _ in config.metrics]              # per metric: PodKey -> line
        self._label_text = {}                                   # PodKey -> (prefix, suffix)
        self._series_count = 0
        self._version = 0            # bumps on every change of the exported lines
        self._sorted_pods = None     # cached sort of self._pods, None when stale
        self._next_sweep = 0.0
        self._sweeping = False
        self.counters = SelfMetrics()

    # -- writes --------------------------------------------------------------

    def apply(self, samples, received):
        """Apply one request's samples at once; return how many were refused."""
        touched = set()
        refused = 0
        ignored = 0
        with self._lock:
            pods = self._pods
            for pod_key, metric, series_key, timestamp_ms, value in samples:
                pod = pods.get(pod_key)
                if pod is None:
                    pod = pods[pod_key] = PodState(len(self.metric_names))
                    self._sorted_pods = None
                series = pod.series[metric]
                old = series.get(series_key)
                if old is not None and timestamp_ms <= old[0]:
                    ignored += 1
                    continue
                if value != value and _pack_double(value) == STALE_NAN_BYTES:
                    if old is not None:
                        del series[series_key]
                        pod.series_count -= 1
                        self._series_count -= 1
                        touched.add((pod_key, metric))
                    continue
                if old is None:
                    if self._series_count >= self.config.max_series:
                        refused += 1
                        continue
                    pod.series_count += 1
                    self._series_count += 1
                series[series_key] = (timestamp_ms, value, received)
                touched.add((pod_key, metric))
            for pod_key, metric in touched:
                self._refresh_line(pod_key, metric)
            if touched:
                self._version += 1
            self.counters.ignored['out_of_order'] += ignored
            self.counters.ignored['series_limit'] += refused
        return refused

    def _refresh_line(self, pod_key, metric):
        """Re-render one output line after its input series changed (lock held)."""
        pod = self._pods.get(pod_key)
        lines = self._lines[metric]
        value = pod_value(self.rules[metric], pod.series[metric]) if pod else None
        if value is None:
            lines.pop(pod_key, None)
        else:
            prefix, suffix = self._label_text_for(pod_key)
            name = self.metric_names[metric]
            lines[pod_key] = f'{name}{prefix}{name}{suffix}{format_go_float(value)}\n'
        if pod is not None and pod.series_count == 0:
            del self._pods[pod_key]
            self._label_text.pop(pod_key, None)
            self._sorted_pods = None

    def _label_text_for(self, pod_key):
        text = self._label_text.get(pod_key)
        if text is None:
            cluster, job, namespace, pod = map(escape_label_value, pod_key)
            text = self._label_text[pod_key] = (
                f'{{cluster="{cluster}",item="',
                f'",job="{job}",namespace="{namespace}",pod="{pod}"}} ')
        return text

    # -- expiry --------------------------------------------------------------

    def expire(self, now):
        """Forget series not received for ttl_seconds, a bounded slice per lock hold.

        Called from requests; one thread sweeps at a time and the others go on.
        """
        cutoff = now - self.config.ttl_seconds
        with self._lock:
            if self._sweeping or now < self._next_sweep:
                return
            self._sweeping = True
            pod_keys = list(self._pods)
        try:
            for start in range(0, len(pod_keys), SWEEP_CHUNK_PODS):
                with self._lock:
                    changed = False
                    for pod_key in pod_keys[start:start + SWEEP_CHUNK_PODS]:
                        changed |= self._expire_pod(pod_key, cutoff)
                    if changed:
                        self._version += 1
        finally:
            with self._lock:
                self._sweeping = False
                # Expire at most 10% late, and look at least every 10 s.
                self._next_sweep = now + min(self.config.ttl_seconds / 10, 10.0)

    def _expire_pod(self, pod_key, cutoff):
        pod = self._pods.get(pod_key)
        if pod is None:
            return False
        changed = False
        for metric, series in enumerate(pod.series):
            expired = [key for key, entry in series.items() if entry[2] < cutoff]
            if not expired:
                continue
            for key in expired:
                del series[key]
            pod.series_count -= len(expired)
            self._series_count -= len(expired)
            self.counters.expired_series += len(expired)
            self._refresh_line(pod_key, metric)
            changed = True
        return changed

    # -- reads ---------------------------------------------------------------

    def snapshot(self):
        """A consistent copy of what /metrics shows, taken in one lock hold."""
        with self._lock:
            if self._sorted_pods is None:
                self._sorted_pods = sorted(self._pods)
            return StoreSnapshot(
                version=self._version,
                pods=self._sorted_pods,
                lines=[lines.copy() for lines in self._lines],
                series_count=self._series_count,
                counters=self.counters.copy(),
            )

    def count(self, update):
        """Run update(counters) under the lock: the counters live in the store."""
        with self._lock:
            update(self.counters)


class StoreSnapshot(NamedTuple):
    version: int
    pods: list       # sorted PodKeys; never mutated after it is published
    lines: list      # per metric: PodKey -> rendered line
    series_count: int
    counters: 'SelfMetrics'


WRITE_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
IGNORE_REASONS = ('unexported_metric', 'no_pod', 'out_of_order', 'invalid_series',
                  'series_limit')


class SelfMetrics:
    """The exporter's own counters; owned and locked by the Store."""

    def __init__(self):
        self.requests = {}        # (handler, code) -> count
        self.samples_received = 0
        self.stale_markers = 0
        self.ignored = dict.fromkeys(IGNORE_REASONS, 0)
        self.expired_series = 0
        self.last_write_success = 0.0
        self.write_duration_buckets = [0] * len(WRITE_DURATION_BUCKETS)
        self.write_duration_count = 0
        self.write_duration_sum = 0.0
        self.handler_errors = {'encoding': 0, 'gathering': 0}

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
    if value.is_integer() and -1e6 < value < 1e6:
        return '-0' if value == 0 and math.copysign(1, value) < 0 else str(int(value))
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


def metric_help(name):
    return SEED_HELP.get(name) or f'cAdvisor {name}, one value per pod'


def render_pod_families(metric_names, snapshot):
    """The exported container families, in name order, series in label order."""
    parts = []
    for metric, name in enumerate(metric_names):
        lines = snapshot.lines[metric]
        if not lines:
            continue   # as Go's client: a family without series is not shown
        parts.append(f'# HELP {name} {escape_help(metric_help(name))}\n# TYPE {name} gauge\n')
        parts.extend(lines[pod] for pod in snapshot.pods if pod in lines)
    return ''.join(parts).encode()


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
    family('k8s_exporter_last_write_success_timestamp_seconds', 'gauge',
           'Unix time of the last write request that was applied.',
           [('', counters.last_write_success)])
    family('k8s_exporter_pods', 'gauge', 'Pods with at least one input series.',
           [('', len(snapshot.pods))])
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
    for name, kind, help_text, value in process:
        family(name, kind, help_text, [('', value)])
    family('promhttp_metric_handler_errors_total', 'counter',
           'Total number of internal errors encountered by the promhttp metric handler.',
           [(f'{{cause="{cause}"}}', count)
            for cause, count in sorted(counters.handler_errors.items())])
    return ''.join(out).encode()


_CLOCK_TICKS = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100
_PAGE_SIZE = os.sysconf('SC_PAGE_SIZE') if hasattr(os, 'sysconf') else 4096


def read_process_metrics():
    """process_* metrics as the Go and Python clients name them; [] off Linux."""
    try:
        with open('/proc/self/stat', 'rb') as stat_file:
            stat = stat_file.read().rpartition(b')')[2].split()
        with open('/proc/stat', 'rb') as boot_file:
            boot_time = next(float(line.split()[1]) for line in boot_file
                             if line.startswith(b'btime'))
        open_fds = len(os.listdir('/proc/self/fd'))
    except (OSError, StopIteration, IndexError, ValueError):
        return []
    import resource
    max_fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    # Fields after the command name, 0-based: utime 11, stime 12, starttime 19,
    # vsize 20, rss 21 (proc(5), minus the two leading fields).
    return [
        ('process_cpu_seconds_total', 'counter', 'Total user and system CPU time spent in seconds.',
         (int(stat[11]) + int(stat[12])) / _CLOCK_TICKS),
        ('process_max_fds', 'gauge', 'Maximum number of open file descriptors.', max_fds),
        ('process_open_fds', 'gauge', 'Number of open file descriptors.', open_fds),
        ('process_resident_memory_bytes', 'gauge', 'Resident memory size in bytes.',
         int(stat[21]) * _PAGE_SIZE),
        ('process_start_time_seconds', 'gauge',
         'Start time of the process since unix epoch in seconds.',
         boot_time + int(stat[19]) / _CLOCK_TICKS),
        ('process_virtual_memory_bytes', 'gauge', 'Virtual memory size in bytes.', int(stat[20])),
    ]


class ExpositionCache:
    """The pod families of the last snapshot, plain and as a gzip prefix.

    At 10,000 pods the families are ~9 MB; rendering and compressing them
    again only when the store changed keeps repeated scrapes cheap. Only the
    small self-metrics tail is compressed per scrape, on a copy of the saved
    compressor, so the response is still one ordinary gzip stream.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._version = None
        self._plain = b''
        self._gzip_prefix = None
        self._gzip_state = None

    def families(self, metric_names, snapshot, want_gzip):
        """Return (plain bytes, (gzip prefix, compressor) or None) for snapshot."""
        with self._lock:
            if self._version != snapshot.version:
                self._plain = render_pod_families(metric_names, snapshot)
                self._gzip_prefix = self._gzip_state = None
                self._version = snapshot.version
            if want_gzip and self._gzip_state is None:
                compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
                self._gzip_prefix = (compressor.compress(self._plain)
                                     + compressor.flush(zlib.Z_SYNC_FLUSH))
                self._gzip_state = compressor
            gzip_part = (self._gzip_prefix, self._gzip_state.copy()) if want_gzip else None
            return self._plain, gzip_part


###############################################################################
# WSGI application ############################################################
###############################################################################

WRITE_PATHS = ('/write', '/api/v1/write')
INDEX_HTML = b'''<!DOCTYPE html>
<html><head><title>k8s_exporter</title></head>
<body><h1>k8s_exporter</h1>
<p>Per-pod cAdvisor gauges from Prometheus remote write.</p>
<ul><li><a href="metrics">/metrics</a></li>
<li>POST /write (remote write 1.0 and 2.0)</li>
<li><a href="-/healthy">/-/healthy</a>, <a href="-/ready">/-/ready</a></li></ul>
</body></html>
'''
HTTP_REASONS = {200: 'OK', 204: 'No Content', 400: 'Bad Request', 401: 'Unauthorized',
                404: 'Not Found', 405: 'Method Not Allowed', 411: 'Length Required',
                413: 'Content Too Large', 415: 'Unsupported Media Type',
                500: 'Internal Server Error', 503: 'Service Unavailable'}


class Exporter:
    """The WSGI application: routes requests to the store and back."""

    def __init__(self, config):
        self.config = config
        self.store = Store(config)
        self.exposition = ExpositionCache()
        self.wanted = {name: index for index, name in enumerate(config.metrics)}
        # Bounds the memory of decoding: each decode holds up to
        # max_decoded_bytes of payload plus its parsed messages.
        self.decode_slots = threading.BoundedSemaphore(config.max_concurrent_decodes)
        # path -> (handler name for self-metrics, allowed methods, method, credentials)
        self.routes = {
            '/metrics': ('metrics', ('GET', 'HEAD'), self.serve_metrics, config.metrics_auth),
            '/-/healthy': ('health', ('GET', 'HEAD'), self.serve_health, None),
            '/-/ready': ('health', ('GET', 'HEAD'), self.serve_health, None),
            '/': ('index', ('GET', 'HEAD'), self.serve_index, None),
        }
        for path in WRITE_PATHS:
            self.routes[path] = ('write', ('POST',), self.receive_write, config.write_auth)

    def __call__(self, environ, start_response):
        route = self.routes.get(environ.get('PATH_INFO') or '/')
        if route is None:
            handler, response = 'unknown', text_response(404, 'not found; see / for the endpoints')
        else:
            handler, methods, serve, credentials = route
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
        status, headers, body = response
        self.store.count(lambda counters: _count_request(counters, handler, status))
        start_response(f'{status} {HTTP_REASONS.get(status, "")}'.rstrip(), headers)
        return [] if environ['REQUEST_METHOD'] == 'HEAD' or status == 204 else [body]

    # -- POST /write ---------------------------------------------------------

    def receive_write(self, environ):
        started = time.monotonic()
        protocol = None
        written = 0
        try:
            protocol = negotiate_protocol(environ.get('CONTENT_TYPE', ''),
                                          environ.get('HTTP_CONTENT_ENCODING', ''))
            body = read_body(environ, self.config.max_body_bytes)
            with self.decode_slots:
                payload = decompress_body(body, self.config.max_decoded_bytes)
                del body
                decoded = decode_write_request(payload, protocol, self.wanted,
                                               self.config.cluster)
                del payload
            self.store.expire(started)
            refused = self.store.apply(decoded.samples, started)
            written = decoded.samples_total - refused
            self.store.count(lambda counters: _count_write(counters, decoded, refused,
                                                           time.monotonic() - started))
            if decoded.bad_series:
                raise RequestError(400, f'{decoded.bad_series} invalid series skipped, first: '
                                        f'{decoded.first_error}; the rest was applied')
            if refused:
                raise RequestError(400, f'{refused} samples of new series refused: '
                                        f'K8S_EXPORTER_MAX_SERIES={self.config.max_series} '
                                        'reached; known series still update')
            response = (204, [], b'')
        except RequestError as error:
            response = text_response(error.status, error.reason)
        if protocol == PROTO_RW2:
            # Remote-write 2.0 spec, "Required Written Response Headers".
            response[1].extend([('X-Prometheus-Remote-Write-Samples-Written', str(written)),
                                ('X-Prometheus-Remote-Write-Histograms-Written', '0'),
                                ('X-Prometheus-Remote-Write-Exemplars-Written', '0')])
        return response

    # -- GET /metrics --------------------------------------------------------

    def serve_metrics(self, environ):
        self.store.expire(time.monotonic())
        snapshot = self.store.snapshot()
        want_gzip = accepts_gzip(environ.get('HTTP_ACCEPT_ENCODING', ''))
        plain, gzip_part = self.exposition.families(self.config.metrics, snapshot, want_gzip)
        tail = render_self_metrics(snapshot, read_process_metrics())
        headers = [('Content-Type', CONTENT_TYPE_TEXT_004)]
        if gzip_part:
            prefix, compressor = gzip_part
            body = prefix + compressor.compress(tail) + compressor.flush()
            headers.append(('Content-Encoding', 'gzip'))
        else:
            body = plain + tail
        headers.append(('Content-Length', str(len(body))))
        return 200, headers, body

    def serve_health(self, environ):
        return text_response(200, 'k8s_exporter is Healthy.')

    def serve_index(self, environ):
        return 200, [('Content-Type', 'text/html; charset=utf-8'),
                     ('Content-Length', str(len(INDEX_HTML)))], INDEX_HTML


def _count_gathering_error(counters):
    counters.handler_errors['gathering'] += 1


def _count_request(counters, handler, status):
    key = (handler, str(status))
    counters.requests[key] = counters.requests.get(key, 0) + 1


def _count_write(counters, decoded, refused, seconds):
    counters.samples_received += decoded.samples_total
    counters.ignored['unexported_metric'] += decoded.unexported
    counters.ignored['no_pod'] += decoded.no_pod
    counters.ignored['invalid_series'] += decoded.bad_series
    counters.stale_markers += sum(1 for sample in decoded.samples
                                  if is_stale_marker(sample.value))
    if not decoded.bad_series and not refused:
        counters.last_write_success = time.time()
    counters.observe_write(seconds)


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
        body = stream.read(length)
        if len(body) < length:
            raise RequestError(400, f'body ended after {len(body)} of {length} bytes')
    else:
        # Chunked: read one byte past the limit to tell "at" from "over".
        body = stream.read(max_body_bytes + 1)
        if len(body) > max_body_bytes:
            raise RequestError(413, f'body exceeds the limit of {max_body_bytes} bytes')
    if not body:
        raise RequestError(400, 'empty body')
    return body


def accepts_gzip(accept_encoding):
    for part in accept_encoding.split(','):
        coding, _, params = part.partition(';')
        if coding.strip().lower() == 'gzip':
            return params.replace(' ', '') not in ('q=0', 'q=0.0', 'q=0.00', 'q=0.000')
    return False


def text_response(status, reason, headers=()):
    body = (reason + '\n').encode()
    return status, [('Content-Type', 'text/plain; charset=utf-8'),
                    ('Content-Length', str(len(body))), *headers], body


def load_config():
    """The configuration from os.environ: the one place the environment is read."""
    return Config.from_environ(os.environ)


EXIT_CONFIG_ERROR = 4   # gunicorn's "app failed to load": its master stops, not respawns

try:
    app = Exporter(load_config())
except ConfigError as error:
    print(f'k8s_exporter: {error}', file=sys.stderr)
    sys.exit(EXIT_CONFIG_ERROR)


###############################################################################
# Entry point #################################################################
###############################################################################

def main():
    """Serve like `make run`: gunicorn, one worker, eight threads."""
    config = app.config
    try:
        from gunicorn.app.base import BaseApplication
    except ImportError:
        BaseApplication = None
    if BaseApplication is None:
        from socketserver import ThreadingMixIn
        from wsgiref.simple_server import WSGIServer, make_server

        class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
            daemon_threads = True

        host, _, port = config.listen.rpartition(':')
        print(f'k8s_exporter: gunicorn not installed, serving with wsgiref on {config.listen}',
              file=sys.stderr)
        make_server(host.strip('[]'), int(port), app, ThreadingWSGIServer).serve_forever()
        return

    class ExporterServer(BaseApplication):
        def load_config(self):
            for key, value in (('bind', config.listen), ('workers', 1), ('threads', 8),
                               ('timeout', 60), ('graceful_timeout', 30)):
                self.cfg.set(key, value)

        def load(self):
            return app

    ExporterServer().run()


if __name__ == '__main__':
    main()
