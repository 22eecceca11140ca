"""The mutation pass: one-line edits of k8s_exporter.py's rules, each of which a test must catch.

    make mutants
    .venv/bin/python mutants_k8s_exporter.py --list           # the mutants, and which apply
    .venv/bin/python mutants_k8s_exporter.py --only store     # those whose rule or section matches
    .venv/bin/python mutants_k8s_exporter.py --numbers 3,60-75   # those numbers of --list

Each mutant is a piece of k8s_exporter.py's text and what it becomes: a
rule broken by a one-line edit (newest wins, stale forgets, an aggregation
rule, a status code, an escape, ...). Mutants are found by their text, not
by line numbers, so they survive code moving about; one whose text is no
longer there (or is there more than once) is reported as not applicable,
and wants rewriting against the new code.

For each mutant a copy of the project, with the edit made, runs only the
tests of the sections that speak of the edited rule (the banner sections of
test_k8s_exporter.py, named in SECTIONS), stopping at the first failure: the
pass takes minutes, not hours. A mutant that no test fails survives: either
a test is missing, or the edit changes nothing a user could see (then say
so in EQUIVALENT, or drop the mutant). Not part of `make test`.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPORTER = HERE / 'k8s_exporter.py'
TESTS = HERE / 'test_k8s_exporter.py'

# Test sections by banner title, as test_k8s_exporter.py names them now and
# as the README's order names them (protocol, pod rules, lifecycle,
# exposition, HTTP, security, operations, end to end). An entry names the
# sections whose title starts with it ('Pages' for 'Pages: the status page,
# ...'); one that starts with test_ names the tests whose names start with it.
CONFIG = ('Configuration', 'Operations')
PROTOCOL = ('Remote-write decoding', 'Protocol')
PODS = ('cAdvisor series to pods', 'Real kubelet captures', 'Pod rules',
        'test_model_pod_cgroup_test_agrees')
STORE = ('The store', "Through a pod's life", 'Lifecycle')
LIFE = ("Through a pod's life",)
JUDGED = ('The metrics pods are judged by',)
SENDERS = ('Every sender',)
PAGES = ('Pages',)
EXPOSITION = ('Exposition',)
HTTP = ('WSGI app', 'HTTP')
SECURITY = ('Authentication', 'Security')
PROPERTIES = ('Bad input, property-based',)
GUNICORN_MALLOC = ('test_the_worker_has_one_malloc_arena', 'test_glibc_takes_every_malloc')
CLIENTS = ('Clients that misbehave',)
WORKERS = ('test_more_than_one_worker', 'test_another_config_file', 'test_started_without',
           'test_another_worker_class', 'test_a_signal_to_the_master', 'test_sighup_to_the_whole')
ROTATION = ('test_a_rotated_secret', 'test_a_bad_new_secret', 'test_credential_files_are_read')
ENTRY_POINT = ('test_importing_the_module', 'test_bad_environment_stops_gunicorn',
               'test_python3_k8s_exporter_py')

# (sections whose tests run, the rule the edit breaks, text, what it becomes)
MUTANTS = [
    # Configuration.
    (CONFIG, 'default cluster label', "cluster: str = 'k8s-cluster'",
     "cluster: str = 'k8s_cluster'"),
    (CONFIG, 'default TTL', 'ttl_seconds: float = 300.0', 'ttl_seconds: float = 600.0'),
    (CONFIG, 'numbers have a lowest value', 'if not low <= value <= high:',
     'if not value <= high:'),
    (CONFIG, 'numbers have a highest value (inf is refused)', 'if not low <= value <= high:',
     'if not low <= value:'),
    (CONFIG, 'a set but empty variable is refused', 'if name in environ and not value:',
     'if False:'),
    (CONFIG, 'metric names sorted and unique', 'return tuple(sorted(set(names)))',
     'return tuple(names)'),
    (CONFIG, 'metric names are checked', 'if not METRIC_NAME_RE.match(metric):',
     'if not metric:'),
    (CONFIG, 'listen port range', 'not 0 < int(port) < 65536', 'not 0 < int(port) < 65537'),
    (SECURITY, 'every secret is compared, any may match',
     'matched |= hmac.compare_digest(credential, secret)',
     'matched = hmac.compare_digest(credential, secret)'),
    (SECURITY, 'auth scheme is case-insensitive', 'scheme = scheme.lower()', 'scheme = scheme'),
    (SECURITY, 'basic auth lines need a colon', "if b':' not in pair:", 'if not pair:'),
    (SECURITY, 'an empty secret file is refused', 'if not lines:', 'if lines is None:'),
    # Protocol: negotiation, limits, decoding.
    (PROTOCOL + HTTP, 'media type is case-insensitive',
     "if media_type.strip().lower() != 'application/x-protobuf':",
     "if media_type.strip() != 'application/x-protobuf':"),
    (PROTOCOL + HTTP, 'no Content-Type means RW 1.0',
     'if not content_type:\n        protocol = PROTO_RW1',
     'if not content_type:\n        protocol = PROTO_RW2'),
    (PROTOCOL + HTTP, 'no Content-Encoding means snappy', "(content_encoding or 'snappy')",
     "(content_encoding or 'identity')"),
    (PROTOCOL + HTTP, 'quoted proto parameter', "protocol = value.strip().strip('\"')",
     'protocol = value.strip()'),
    (PROTOCOL + HTTP, 'unsupported Content-Type is 415',
     "raise RequestError(415, f'unsupported Content-Type",
     "raise RequestError(400, f'unsupported Content-Type"),
    (PROTOCOL + HTTP, 'unsupported encoding is 415',
     "raise RequestError(415, f'unsupported Content-Encoding",
     "raise RequestError(400, f'unsupported Content-Encoding"),
    (PROTOCOL + HTTP, 'decoded size limit is inclusive', 'if announced > max_decoded_bytes:',
     'if announced >= max_decoded_bytes:'),
    (PROTOCOL + HTTP, 'decoded body over the limit is 413',
     "raise RequestError(413, f'decoded body of", "raise RequestError(400, f'decoded body of"),
    (PROTOCOL + HTTP, 'corrupt snappy is 400',
     "raise RequestError(400, 'corrupt snappy: not a valid snappy block')",
     "raise RequestError(500, 'corrupt snappy: not a valid snappy block')"),
    (PROTOCOL + HTTP, 'corrupt protobuf is 400', "raise RequestError(400, f'corrupt protobuf",
     "raise RequestError(422, f'corrupt protobuf"),
    (HTTP, 'body size limit is inclusive',
     'if length > max_body_bytes:\n            raise RequestError(413',
     'if length >= max_body_bytes:\n            raise RequestError(413'),
    (HTTP, 'body over the limit is 413', "raise RequestError(413, f'body of",
     "raise RequestError(400, f'body of"),
    (HTTP, 'chunked body: one byte past the limit tells over from at',
     'body = _read(stream, max_body_bytes + 1)', 'body = _read(stream, max_body_bytes)'),
    (HTTP, 'an empty body is 400', "raise RequestError(400, 'empty body')", 'pass'),
    (HTTP, 'a short body is 400', 'if len(body) < length:', 'if len(body) < 0:'),
    (PROTOCOL + HTTP, 'RW2: odd label refs are rejected', 'if len(refs) % 2:', 'if False:'),
    (PROTOCOL + HTTP, 'RW2: label ref out of range is rejected',
     'and max(refs) < symbol_count:', 'and max(refs) <= symbol_count:'),
    (PROTOCOL + HTTP, 'RW2: unwanted names are skipped, wanted ones kept',
     'if value not in read and value < symbol_count:',
     'if value in read and value < symbol_count:'),
    (PROTOCOL + HTTP, 'RW2: an unwanted name past bad refs is skipped, not refused',
     'and symbols[name] not in self.wanted):', 'and symbols[name] in self.wanted):'),
    (PROTOCOL, 'RW2: two-byte symbol refs', '        shift += 7\n        at += 1',
     '        shift += 8\n        at += 1'),
    (PROTOCOL, 'varint continuation bit', 'out.append(number & 0x7F | 0x80)',
     'out.append(number & 0x7F)'),
    (PROTOCOL + HTTP, 'RW1: a Label with more fields is read whole',
     'if UnknownFieldSet(series):', 'if False:'),
    (PROTOCOL + HTTP, 'a series without __name__ is rejected', 'if not name:',
     'if name is None:'),
    (PROTOCOL + HTTP, 'a series without labels is rejected', 'if not labels:',
     'if labels is None:'),
    (PROTOCOL + HTTP, 'samples of rejected series are not counted as received',
     'self.samples_total = self.samples_in_request - self.invalid - self.future',
     'self.samples_total = self.samples_in_request - self.future'),
    (PROTOCOL + SENDERS, 'samples too far ahead are not counted as received',
     'self.samples_total = self.samples_in_request - self.invalid - self.future',
     'self.samples_total = self.samples_in_request - self.invalid'),
    (PROTOCOL + SENDERS, 'samples over 10 minutes ahead are refused',
     'MAX_AHEAD_MS = 10 * 60 * 1000', 'MAX_AHEAD_MS = 11 * 60 * 1000'),
    (PROTOCOL + SENDERS, 'samples up to 10 minutes ahead are kept',
     'MAX_AHEAD_MS = 10 * 60 * 1000', 'MAX_AHEAD_MS = 9 * 60 * 1000'),
    (PROTOCOL + SENDERS, 'a sample exactly 10 minutes ahead is kept',
     '            if timestamp > latest_ms:\n                future += 1',
     '            if timestamp >= latest_ms:\n                future += 1'),
    (PROTOCOL + SENDERS, 'samples ahead of the clock are refused at all',
     '            if timestamp > latest_ms:\n                future += 1',
     '            if False:\n                future += 1'),
    (PROTOCOL + SENDERS, 'a known RW1 series: samples ahead of the clock are refused',
     '                        no_pod += 1\n                    elif timestamp > latest_ms:',
     '                        no_pod += 1\n                    elif False:'),
    (PROTOCOL + SENDERS + HTTP, 'RW1: a label that is not UTF-8 refuses its series',
     'check_utf8, size_hint = True, None', 'check_utf8, size_hint = False, None'),
    (HTTP, 'a series with more labels than the limit is refused',
     'if len(labels) > self.per_series:', 'if len(labels) >= self.per_series:'),
    (HTTP, 'a series with a label name over the limit is refused',
     'if _utf8_length(label) > self.name_bytes:', 'if _utf8_length(label) >= self.name_bytes:'),
    (HTTP, 'label value limits are in UTF-8 bytes',
     'if _utf8_length(value) > self.value_bytes:', 'if len(value) > self.value_bytes:'),
    (PROTOCOL + SENDERS + HTTP, 'a label that is not UTF-8 refuses its series, kept or not',
     'if check_utf8 and not all(map(_is_utf8, itertools.chain(*labels.items()))):',
     'if False:'),
    (PROTOCOL + SENDERS + HTTP, 'RW1: a label that is not UTF-8 refuses only its series',
     'series = remote_pb2.TimeSeriesLabelBytes.FromString(raw)', 'raise'),
    (PROTOCOL + SENDERS + HTTP, 'RW2: a symbol that is not UTF-8 refuses only the series using it',
     'request = remote_pb2.WriteRequestV2SymbolBytes.FromString(payload)', 'raise'),
    (PROTOCOL + SENDERS + HTTP, 'RW2: a symbol that is not UTF-8 refuses the series using it',
     '            check_utf8 = True\n', '            check_utf8 = False\n'),
    (PROTOCOL + HTTP + STORE, 'stale marker is one NaN bit pattern',
     'if value != value and _pack_double(value) == STALE_NAN_BYTES:\n'
     '                    stale_markers += 1',
     'if value != value:\n                    stale_markers += 1'),
    (HTTP + PROTOCOL, 'long reasons are clipped',
     "return text if len(text) <= limit else text[:limit] + '...'", 'return text'),
    # Pod rules.
    (PODS, 'kubelet >= 1.16 labels', "('namespace', 'pod', 'container'),",
     "('namespace', 'pod', 'container_name'),"),
    (PODS, 'a pod needs a namespace too', 'if pod and namespace:', 'if pod:'),
    (PODS, 'a container series is not the pod cgroup', 'pod_cgroup = not container and (',
     'pod_cgroup = True and ('),
    (PODS, 'no id means the pod cgroup', 'not cgroup or POD_CGROUP_SEGMENT_RE',
     'False or POD_CGROUP_SEGMENT_RE'),
    (PODS, 'pod cgroup segment ends the id', r"(?:^|-)pod[0-9a-fA-F_-]+(?:\.slice)?\Z')",
     r"(?:^|-)pod[0-9a-fA-F_-]+(?:\.slice)?')"),
    (PODS, 'pod cgroup segment starts at a dash', r"(?:^|-)pod[0-9a-fA-F_-]+(?:\.slice)?\Z')",
     r"(?:^|.)pod[0-9a-fA-F_-]+(?:\.slice)?\Z')"),
    (PODS, 'incoming cluster label wins', "labels.get('cluster') or default_cluster",
     'default_cluster'),
    (PODS, 'job is kept', "labels.get('job', ''), namespace, pod", "'', namespace, pod"),
    (PODS + EXPOSITION, 'fs limit: sum over devices of the limit',
     "MetricSpec('container_fs_limit_bytes', 'gauge', RULE_DEVICE_LIMIT, '',",
     "MetricSpec('container_fs_limit_bytes', 'gauge', RULE_SUM, '',"),
    (PODS + EXPOSITION, 'fs usage: sum over containers and devices',
     "MetricSpec('container_fs_usage_bytes', 'gauge', RULE_SUM, '',",
     "MetricSpec('container_fs_usage_bytes', 'gauge', RULE_POD_CGROUP, '',"),
    (PODS + EXPOSITION + ('test_metrics_variable_replaces',),
     'unknown container_fs_ names are summed over containers',
     "rule = RULE_SUM if name.startswith('container_fs_') else RULE_POD_CGROUP",
     'rule = RULE_POD_CGROUP'),
    (JUDGED, 'counters are exposed as TYPE counter', "f'# TYPE {name} {spec.type}\\n'",
     "f'# TYPE {name} gauge\\n'"),
    (PODS, 'a sum of one: -0 is 0', 'return series[0][1] or 0.0', 'return series[0][1]'),
    (PODS, 'a sum of one: not for the pod cgroup of an fs metric',
     'rule == RULE_POD_CGROUP or rule == RULE_SUM and not series[0][0].pod_cgroup)',
     'rule == RULE_POD_CGROUP or rule == RULE_SUM)'),
    (PODS, 'pod cgroup wins over the container sum',
     'if pod_level or rule == RULE_POD_LIMIT:', 'if rule == RULE_POD_LIMIT:'),
    (PODS + JUDGED, 'RULE_POD_LIMIT: no line without a pod cgroup',
     'if pod_level or rule == RULE_POD_LIMIT:', 'if pod_level:'),
    (PODS + JUDGED, 'RULE_POD_LIMIT: one container series is not the pod limit',
     'rule == RULE_POD_CGROUP or rule == RULE_SUM and not series[0][0].pod_cgroup)',
     'rule in (RULE_POD_CGROUP, RULE_POD_LIMIT) or rule == RULE_SUM and not '
     'series[0][0].pod_cgroup)'),
    (PODS + JUDGED, 'the memory limit is the pod limit rule',
     "MetricSpec('container_spec_memory_limit_bytes', 'gauge', RULE_POD_LIMIT, '',",
     "MetricSpec('container_spec_memory_limit_bytes', 'gauge', RULE_POD_CGROUP, '',"),
    (PODS + JUDGED, 'RULE_SANDBOX picks only the sandbox',
     'picked = [value for key, value in series if key.sandbox]',
     'picked = [value for key, value in series if not key.pod_cgroup]'),
    (PODS + JUDGED, "RULE_SANDBOX: containerd's unnamed pause container is the sandbox",
     "return not self.pod_cgroup and self.container in ('POD', '')",
     "return not self.pod_cgroup and self.container == 'POD'"),
    (PODS + JUDGED, 'RULE_SANDBOX: the pod cgroup is not the sandbox',
     "return not self.pod_cgroup and self.container in ('POD', '')",
     "return self.container in ('POD', '')"),
    (PODS + JUDGED, 'network metrics take the sandbox rule',
     "MetricSpec('container_network_receive_bytes_total', 'counter', RULE_SANDBOX, 'interface',",
     "MetricSpec('container_network_receive_bytes_total', 'counter', RULE_SUM, 'interface',"),
    (PODS + JUDGED, 'cpu usage is a counter',
     "MetricSpec('container_cpu_usage_seconds_total', 'counter', RULE_POD_CGROUP, 'cpu',",
     "MetricSpec('container_cpu_usage_seconds_total', 'gauge', RULE_POD_CGROUP, 'cpu',"),
    (PODS + JUDGED, 'part labels enter the identity (per-CPU series apart)',
     "MetricSpec('container_cpu_usage_seconds_total', 'counter', RULE_POD_CGROUP, 'cpu',",
     "MetricSpec('container_cpu_usage_seconds_total', 'counter', RULE_POD_CGROUP, '',"),
    (PODS + JUDGED, 'part labels enter the series key',
     "_intern(labels.get(part_label, '')) if part_label else ''))", "''))"),
    (PODS + JUDGED + SENDERS, 'the decoder passes the part label of the metric',
     "pod_series_identity(labels, self.default_cluster, PART_LABELS.get(name, ''))",
     'pod_series_identity(labels, self.default_cluster)'),
    (PODS, 'pod cgroup series are found',
     'pod_level = [value for key, value in series if key.pod_cgroup]',
     'pod_level = [value for key, value in series if not key.pod_cgroup]'),
    (PODS, 'fs rules leave the pod cgroup out',
     'picked = [value for key, value in series if not key.pod_cgroup]',
     'picked = [value for key, value in series]'),
    (PODS, 'fs limit leaves the pod cgroup out',
     'if key.pod_cgroup:\n                continue', 'if False:\n                continue'),
    (PODS, 'fs rules without containers give no value',
     'if not picked:\n        return None', 'if not picked:\n        return 0.0'),
    (PODS, 'fs limit: the largest per device', 'value > known or known != known',
     'value < known or known != known'),
    (PODS, 'fs limit: NaN loses to a number, as PromQL max', 'value > known or known != known',
     'value > known'),
    (PODS, 'fs limit: devices are summed', 'picked = list(limits.values())',
     'picked = [max(limits.values())] if limits else []'),
    (PODS, 'sums are correctly rounded', 'return math.fsum(values)', 'return sum(values)'),
    (PODS, '+Inf and -Inf sum to NaN', 'except ValueError:        # +Inf and -Inf together\n'
     '        return math.nan', 'except ValueError:        # +Inf and -Inf together\n'
     '        return math.inf'),
    (PODS, 'a sum past 1.8e308 is scaled exactly', '* 2.0 ** -53 for value in values) * 2.0 ** 53',
     '* 2.0 ** -53 for value in values) * 2.0 ** 52'),
    # Lifecycle: the store.
    (STORE, 'newest wins: an equal timestamp is ignored',
     'if held and timestamp_ms <= old_timestamp:', 'if held and timestamp_ms < old_timestamp:'),
    (STORE, 'newest wins: an older sample is ignored',
     'if held and timestamp_ms <= old_timestamp:', 'if False:'),
    (STORE, 'only the stale marker ends a series, not any NaN',
     'if value != value and _pack_double(value) == STALE_NAN_BYTES:', 'if value != value:'),
    (STORE + LIFE, 'a stale marker ends the series',
     'self._end_series(pod, series_key, metric)\n', 'pass\n'),
    (STORE + LIFE + JUDGED + PAGES, 'a stale marker keeps the last value',
     'write_slot(slots, at, timestamp_ms, old_value, arrival)',
     'write_slot(slots, at, timestamp_ms, value, arrival)'),
    (STORE + LIFE, 'an ended series is held: a replay cannot bring it back',
     'held = old_arrival == old_arrival', 'held = old_arrival == old_arrival and not ('
     'pod.ended is not None and (series_key, metric) in pod.ended)'),
    (STORE + LIFE, 'a newer sample brings an ended series back',
     'pod.ended.discard((series_key, metric))\n                    if not pod.ended:',
     'pod.ended.add((series_key, metric))\n                    if not pod.ended:'),
    (STORE, 'series limit: at the limit, new series are refused',
     'if self._live_series + self._ended_series >= max_series:',
     'if self._live_series + self._ended_series > max_series:'),
    (STORE + LIFE, 'series limit: ended series count against it',
     'if self._live_series + self._ended_series >= max_series:',
     'if self._live_series >= max_series:'),
    (STORE, 'a changed value reaches the output',
     'elif (value != old_value or pod.shared_identity) and not (',
     'elif (pod.shared_identity) and not ('),
    (STORE + LIFE, 'with two series of one identity an equal value can change the pod',
     'elif (value != old_value or pod.shared_identity) and not (',
     'elif (value != old_value) and not ('),
    (STORE + JUDGED, 'a container sample skips the render only where the pod cgroup counts',
     'pod.from_pod_cgroup >> metric & 1 and not series_key[0]):',
     'pod.from_pod_cgroup >> metric & 1):'),
    (STORE + JUDGED + LIFE, 'the pod cgroup makes the value only while one of its series counts',
     "if (rule == RULE_POD_CGROUP or rule == RULE_POD_LIMIT) and True in map(\n"
     "                    _is_pod_cgroup, map(_key_of_value, series)):",
     "if (rule == RULE_POD_CGROUP or rule == RULE_POD_LIMIT):"),
    (STORE + EXPOSITION, 'a scrape renders what writes left waiting',
     'self._render_unrendered()\n            unchanged', 'unchanged'),
    (STORE + PAGES, 'a pod page renders the pod a write left waiting',
     'if pod is not None:\n                self._render_pod_now(pod)',
     'if pod is not None:\n                pass'),
    (STORE + PAGES, 'the pods page renders the pods a write left waiting',
     'self._render_pod_now(pod)\n                    if pods.get(key) is pod:',
     'pass\n                    if pods.get(key) is pod:'),
    (STORE, 'pods wait to be rendered at most RENDER_DELAY_SECONDS',
     'self._render_unrendered(received - RENDER_DELAY_SECONDS)', 'pass'),
    (PROTOCOL + HTTP, 'a request with series dropped unread has its samples counted in full',
     'if kept + read_in_full == len(request.timeseries):', 'if True:'),
    (PROTOCOL + HTTP, 'samples read in full are counted',
     'return decoded.counted(kept + samples_read_in_full)', 'return decoded.counted(kept)'),
    (STORE + LIFE, 'a pod is read again once its earliest arrival may have expired',
     'pod.arrivals_since = earliest', 'pod.arrivals_since = math.inf'),
    (STORE + LIFE, "the earliest arrival is of all the pod's series",
     'earliest = min(earliest, earliest_kept)', 'earliest = earliest_kept'),
    (STORE, 'the known series of one pod share its keys',
     'shared(pod, pod), metric,', 'pod, metric,'),
    (STORE + PAGES, 'a pod left empty by refused or stale samples is removed',
     'for pod in created:   # refused or stale-only samples can leave it empty\n'
     '                if not pod.series:',
     'for pod in created:   # refused or stale-only samples can leave it empty\n'
     '                if pod.series is None:'),
    (STORE + LIFE + JUDGED, 'a slot stays while another metric uses it',
     'return any(arrival == arrival for _, _, arrival in cls.SLOT.iter_unpack(slots))',
     'return all(arrival == arrival for _, _, arrival in cls.SLOT.iter_unpack(slots))'),
    (STORE + PAGES, 'a pod without series disappears',
     'if not pod.series:\n            self._remove_pod(pod)\n            return True',
     'if False:\n            self._remove_pod(pod)\n            return True'),
    # Lifecycle: which series of a pod count.
    (LIFE, 'identity: a container by its name, not its id',
     'return self.pod_cgroup, self.container, self.device, self.part',
     'return self.pod_cgroup, self.container, self.id, self.device, self.part'),
    (LIFE, 'identity: containers of other names count apart',
     'return self.pod_cgroup, self.container, self.device, self.part',
     'return self.pod_cgroup, self.device, self.part'),
    (LIFE + PODS + JUDGED + PAGES, 'identity: the pod cgroup is not the unnamed pause container',
     'return self.pod_cgroup, self.container, self.device, self.part',
     'return self.container, self.device, self.part'),
    (LIFE + PODS, 'identity: per device',
     'return self.pod_cgroup, self.container, self.device, self.part',
     'return self.pod_cgroup, self.container, self.part'),
    (LIFE + JUDGED, 'identity: per part (cpu, interface)',
     'return self.pod_cgroup, self.container, self.device, self.part',
     'return self.pod_cgroup, self.container, self.device'),
    (LIFE, 'one identity: the newest sample counts',
     'other = newest.get(identity)\n'
     '            if other is None or (sample[0], sample[2]) > (other[1][0], other[1][2]):',
     'other = newest.get(identity)\n'
     '            if other is None or (sample[0], sample[2]) < (other[1][0], other[1][2]):'),
    (LIFE, 'one identity: on equal timestamps the one that arrived last',
     'other = newest.get(identity)\n'
     '            if other is None or (sample[0], sample[2]) > (other[1][0], other[1][2]):',
     'other = newest.get(identity)\n'
     '            if other is None or (sample[0], -sample[2]) > (other[1][0], -other[1][2]):'),
    (LIFE + JUDGED + PAGES, 'one identity: by timestamp first, arrival second',
     'other = newest.get(identity)\n'
     '            if other is None or (sample[0], sample[2]) > (other[1][0], other[1][2]):',
     'other = newest.get(identity)\n'
     '            if other is None or sample[2] > other[1][2]:'),
    (LIFE, 'a shared identity is noticed when a key is added',
     'self.shared_identity = self.shared_identity or any(',
     'self.shared_identity = False and any('),
    (LIFE, 'a shared identity is forgotten with the key that shared it',
     'self.shared_identity = len(set(identities)) < len(identities)',
     'self.shared_identity = self.shared_identity'),
    (LIFE, 'ended series never count for gauges',
     'if (key, metric) in ended:\n                continue',
     'if False:\n                continue'),
    (LIFE, 'ended series never count, even without a shared identity',
     'if not self.shared_identity and self.ended is None:',
     'if not self.shared_identity:'),
    (LIFE + JUDGED, 'nothing counts when every series has ended',
     'if all((key, metric) in ended for key, _ in held):',
     'if False:'),
    (LIFE, 'one ended series does not end the pod value',
     'if all((key, metric) in ended for key, _ in held):',
     'if any((key, metric) in ended for key, _ in held):'),
    (LIFE + JUDGED, 'counters count every container generation',
     'if cumulative and not key.pod_cgroup:', 'if False:'),
    (LIFE + JUDGED, 'counters: pod cgroups of one identity replace one another',
     'if cumulative and not key.pod_cgroup:', 'if cumulative:'),
    (LIFE + JUDGED, 'carry on forget: the last value of a forgotten container',
     "pod.carried[metric] = sum_values([pod.carried[metric],\n"
     "                                              Slots.get(slots, metric)[1]])",
     "pod.carried[metric] = sum_values([pod.carried[metric],\n"
     "                                              0.0])"),
    (LIFE + JUDGED, 'carry on forget: carried values add up',
     'pod.carried[metric] = sum_values([pod.carried[metric],',
     'pod.carried[metric] = sum_values([0.0,'),
    (LIFE + JUDGED, 'carry on forget: counters only',
     'if self.cumulative[metric] and not series_key.pod_cgroup and (',
     'if not series_key.pod_cgroup and ('),
    (LIFE + JUDGED + PAGES, 'carry on forget: not the pod cgroup',
     'if self.cumulative[metric] and not series_key.pod_cgroup and (',
     'if self.cumulative[metric] and ('),
    (LIFE + JUDGED + PAGES, 'carry on forget: under RULE_SANDBOX only the sandbox',
     'self.rules[metric] != RULE_SANDBOX or series_key.sandbox):', 'True):'),
    (LIFE + JUDGED, 'the carried value adds to the pod value',
     'return sum_values([*picked, carried] if carried else picked)',
     'return sum_values(picked)'),
    (LIFE + JUDGED + PAGES, 'a sum of one: not when something is carried',
     'if len(series) == 1 and not carried and (', 'if len(series) == 1 and ('),
    (LIFE + JUDGED, 'the pod value is made with what was carried',
     'pod_value(rule, series, carried[metric] if carried else 0.0)',
     'pod_value(rule, series, 0.0)'),
    (STORE + EXPOSITION, 'a write that changes the output bumps the version',
     'if changed:\n            self._version += 1', 'if False:\n            pass'),
    (STORE, 'expiry that changes the output bumps the version',
     'if changed:\n                    self._version += 1', 'if False:\n                    pass'),
    (STORE, 'stale forgets after the TTL', 'cutoff = now - self.config.ttl_seconds',
     'cutoff = now - 2 * self.config.ttl_seconds'),
    (STORE, 'expiry forgets the old, not the new', 'if arrival < cutoff:  ',
     'if arrival > cutoff:  '),
    (STORE, 'a repeated value moves the TTL on',
     'write_slot(slots, at, timestamp_ms, value, arrival)\n            self._last_arrival',
     'write_slot(slots, at, timestamp_ms, value, old_arrival if held else arrival)\n'
     '            self._last_arrival'),
    (STORE, 'series limit warning at most once a minute',
     'received >= self._limit_warned_at + LIMIT_WARNING_INTERVAL_SECONDS',
     'received >= self._limit_warned_at'),
    (STORE + EXPOSITION, 'pods in output order',
     'at = bisect.bisect_left(keys, key)\n        keys.insert(at, key)',
     'at = len(keys)\n        keys.insert(at, key)'),
    (STORE, 'pods in output order: a new pod goes to the block of its place',
     'return max(0, bisect.bisect_right(self._firsts, key) - 1)',
     'return max(0, bisect.bisect_left(self._firsts, key) - 1)'),
    (STORE + EXPOSITION, 'a value is redone when its bits change, not only its ==',
     '_pack_double(value) == _pack_double(old)', 'value == old'),
    # Exposition.
    (EXPOSITION, 'label values: backslash escaped first',
     "value = value.replace('\\\\', '\\\\\\\\').replace('\"', '\\\\\"')",
     "value = value.replace('\"', '\\\\\"').replace('\\\\', '\\\\\\\\')"),
    (EXPOSITION, 'label values: a lone newline is escaped',
     "if '\\\\' in value or '\"' in value or '\\n' in value:",
     "if '\\\\' in value or '\"' in value:"),
    (EXPOSITION, 'label values: a lone quote is escaped',
     "if '\\\\' in value or '\"' in value or '\\n' in value:",
     "if '\\\\' in value or '\\n' in value:"),
    (EXPOSITION, 'HELP escapes backslash',
     "return text.replace('\\\\', '\\\\\\\\').replace('\\n', '\\\\n')",
     "return text.replace('\\n', '\\\\n')"),
    (EXPOSITION, 'HELP leaves quotes alone',
     "return text.replace('\\\\', '\\\\\\\\').replace('\\n', '\\\\n')",
     "return text.replace('\\\\', '\\\\\\\\').replace('\\n', '\\\\n').replace('\"', '\\\\\"')"),
    (EXPOSITION, 'HELP text is escaped', '{escape_help(spec.help)}', '{spec.help}'),
    (EXPOSITION, 'pod labels are escaped', 'map(escape_label_value, pod)', 'iter(pod)'),
    (EXPOSITION, 'Go float: exponent form below 1e-4', 'if exp < -4 or exp >= 6:',
     'if exp < -5 or exp >= 6:'),
    (EXPOSITION, 'Go float: exponent form from 1e+06', 'if exp < -4 or exp >= 6:',
     'if exp < -4 or exp > 6:'),
    (EXPOSITION, 'Go float: integers from 1e6 in exponent form', 'if -1e6 < value < 1e6:',
     'if -1e6 < value <= 1e6:'),
    (EXPOSITION, 'Go float: two exponent digits', '{abs(exp):02d}', '{abs(exp)}'),
    (EXPOSITION, 'Go float: -0', "return '-0' if value == 0 and math.copysign(1, value) < 0",
     "return '0' if value == 0 and math.copysign(1, value) < 0"),
    (EXPOSITION, 'Go float: NaN', "return 'NaN'", "return 'nan'"),
    (EXPOSITION, 'a family without series is not shown', 'if not held:      # as Go',
     'if False:      # as Go'),
    (EXPOSITION + ('test_metrics_variable_replaces',), 'unknown metrics get a generic HELP',
     "f'cAdvisor {name}, one value per pod'", "f'cAdvisor {name}'"),
    (EXPOSITION + HTTP, 'gzip only when accepted',
     "return params.replace(' ', '') not in ('q=0',", "return params.replace(' ', '') in ('q=0',"),
    (EXPOSITION + HTTP, 'the gzip cache follows the store',
     'if gzip_version != snapshot.version:', 'if gzip_version is None:'),
    (EXPOSITION + HTTP, 'the plain cache follows the store',
     'unchanged = self._version == known_version', 'unchanged = known_version is not None'),
    (EXPOSITION, 'self-metric: pods', "[('', snapshot.pod_count)]",
     "[('', snapshot.series_count)]"),
    (EXPOSITION + HTTP + STORE, 'self-metric: out-of-order samples',
     "self.counters.ignored['out_of_order'] += ignored",
     "self.counters.ignored['out_of_order'] += 0"),
    (EXPOSITION + HTTP, 'self-metric: samples without a pod',
     "counters.ignored['no_pod'] += decoded.no_pod", "counters.ignored['no_pod'] += 0"),
    (EXPOSITION + HTTP + STORE, 'self-metric: stale markers are one NaN',
     'stale_markers += value != value and _pack_double(value) == STALE_NAN_BYTES',
     'stale_markers += value != value'),
    (EXPOSITION + HTTP + STORE, 'self-metric: stale markers are counted',
     '    stale_markers += 1\n', '    stale_markers += 0\n'),
    (EXPOSITION + HTTP, 'self-metric: last success only for a write applied whole',
     'if not (decoded.bad_series or decoded.future or refused):', 'if not refused:'),
    (EXPOSITION + HTTP, 'self-metric: the +Inf bucket counts every write',
     "buckets.append(('{le=\"+Inf\"}', counters.write_duration_count))",
     "buckets.append(('{le=\"+Inf\"}', 0))"),
    (EXPOSITION + HTTP, 'self-metric: requests by status code',
     'key = (handler, str(status))', "key = (handler, '200')"),
    # HTTP.
    (HTTP, 'a write applied is 204', 'response = (204, [], [])', 'response = (200, [], [])'),
    (HTTP, 'an unknown path is 404', "text_response(404, 'not found",
     "text_response(400, 'not found"),
    (HTTP, 'a wrong method is 405 with Allow', "[('Allow', ', '.join(methods))]", '[]'),
    (HTTP, 'HEAD has no body', "return [] if environ['REQUEST_METHOD'] == 'HEAD' else chunks",
     'return chunks'),
    (HTTP, 'RW2 answers carry the written headers',
     'if protocol == PROTO_RW2:\n            # Remote-write 2.0 spec',
     'if protocol == PROTO_RW1:\n            # Remote-write 2.0 spec'),
    (HTTP, 'RW2 samples written leave out the refused', 'written = decoded.samples_total - refused',
     'written = decoded.samples_total'),
    (HTTP, 'a write applied in part is 400', 'raise RequestError(400, write_refusal_reason(',
     'raise RequestError(422, write_refusal_reason('),
    (HTTP, 'invalid series are 400', 'if decoded.bad_series or decoded.future or refused:',
     'if decoded.future or refused:'),
    (HTTP + STORE, 'samples over the series limit are 400',
     'if decoded.bad_series or decoded.future or refused:',
     'if decoded.bad_series or decoded.future:'),
    (HTTP + SENDERS, 'samples ahead of the clock are 400',
     'if decoded.bad_series or decoded.future or refused:',
     'if decoded.bad_series or refused:'),
    (HTTP + SENDERS + EXPOSITION, 'self-metric: samples ahead of the clock',
     "counters.ignored['future_timestamp'] += decoded.future",
     "counters.ignored['future_timestamp'] += 0"),
    (HTTP, 'a fault of ours is 500', "text_response(500, 'internal error",
     "text_response(503, 'internal error"),
    (HTTP, 'decodes are bounded by the slots', 'with self.decode_slots:',
     'with threading.Lock():'),
    (HTTP, 'as many decode slots as configured',
     'threading.BoundedSemaphore(config.max_concurrent_decodes)',
     'threading.BoundedSemaphore(config.max_concurrent_decodes + 1)'),
    (HTTP + EXPOSITION, 'metrics Content-Length covers every chunk',
     "headers.append(('Content-Length', str(sum(map(len, chunks)))))",
     "headers.append(('Content-Length', str(len(chunks[0]))))"),
    (HTTP, 'reason phrase of 413', "413: 'Content Too Large'", "413: 'Payload Too Large'"),
    (HTTP, 'reason phrase of 204', "204: 'No Content'", "204: 'OK'"),
    (SECURITY, 'wrong credentials are 401',
     "elif credentials and not credentials.allow(environ.get('HTTP_AUTHORIZATION', '')):",
     "elif credentials and not environ.get('HTTP_AUTHORIZATION', ''):"),
    (SECURITY, '401 carries the challenge', 'credentials.challenge())', '[])'),
    # Pages.
    (PAGES, 'pages: text is HTML-escaped', 'return html.escape(str(value), quote=True)',
     'return str(value)'),
    (PAGES, 'pages: quotes are escaped in attribute values',
     'return html.escape(str(value), quote=True)', 'return html.escape(str(value), quote=False)'),
    (PAGES, 'pages: table cells are escaped', "return f'<td{attribute}>{escape_html(value)}</td>'",
     "return f'<td{attribute}>{value}</td>'"),
    (PAGES, 'pages: the pod name of a /pods row is escaped',
     '">{escape_html(key.pod)}</a></td>', '">{key.pod}</a></td>'),
    (PAGES, 'pages: the namespace filter is escaped in its input',
     'value="{escape_html(namespace)}"', 'value="{namespace}"'),
    (PAGES, 'pages: row links quote the pod name',
     'pod={quote(key.pod, safe="")}', 'pod={key.pod}'),
    (PAGES, 'pages: a query that is not UTF-8 is read with replacement characters',
     ".decode('utf-8', 'replace')", ".decode('utf-8')"),
    (PAGES, 'pages: the page title is escaped', '<title>{escape_html(title)} - k8s_exporter',
     '<title>{title} - k8s_exporter'),
    (PAGES, 'pages: refusals are not sniffed as HTML', "[('X-Content-Type-Options', 'nosniff')]",
     '[]'),
    (PAGES, 'pages: a pod name with two matches counts once',
     "re.compile(f'{re.escape(pod)}[^{POD_NAME_SEPARATOR}]*')", 're.compile(re.escape(pod))'),
    (PAGES, "pages: a namespace whose pods changed gets its names joined again",
     'if run is not None and pod_keys[start:end] == previous.pod_keys[run[1]:run[2]]:',
     'if run is not None:'),
    (PAGES, "pages: a sender's live series fall when one ends", 'counts[2] += live',
     'counts[2] += max(live, 0)'),
    # Entry point and serving.
    (GUNICORN_MALLOC, 'one malloc arena', '(_M_ARENA_MAX, MALLOC_ARENAS),',
     '(_M_ARENA_MAX, 8),'),
    (GUNICORN_MALLOC, 'glibc takes the keep-free size',
     'MALLOC_KEEP_FREE_BYTES = 32 * MiB', 'MALLOC_KEEP_FREE_BYTES = 64 * MiB'),
    (CLIENTS, 'headers must be whole by the header deadline',
     'return self.started + HEADER_DEADLINE_SECONDS', 'return self.started + 60'),
    (CLIENTS, 'a body must keep up its rate', '+ received / MIN_BODY_BYTES_PER_SECOND',
     '+ received'),
    (CLIENTS, 'a pool thread gets only whole requests',
     'if length:\n                    break', 'if length or request.head_end:\n'
     '                    break'),
    (CLIENTS, 'bodies held at once are bounded',
     'self.buffered_bytes > self.buffer_budget', 'self.buffered_bytes > 100 * self.buffer_budget'),
    (CLIENTS, 'headers over the limit are 431', 'raise RequestRefused(431, f\'request headers',
     'raise RequestRefused(400, f\'request headers'),
    (CLIENTS, 'a declared body over the limit is refused before it is read',
     'if length > max_body_bytes:\n                raise RequestRefused(413',
     'if False:\n                raise RequestRefused(413'),
    (CLIENTS, 'a chunk is skipped with its CRLF', 'self.chunk_at = line_end + 2 + size + 2',
     'self.chunk_at = line_end + 2 + size'),
    (CLIENTS, 'pipelined requests are kept for later',
     'conn.pipelined = bytes(whole[length:])', "conn.pipelined = b''"),
    (CLIENTS, 'a closing connection lingers without holding the main thread',
     '            self.linger(conn)\n            return\n', '            pass\n'),
    (CLIENTS, 'cut-offs are counted',
     'self.wsgi.store.count(lambda counters: _count_cut_off(counters, reason))', 'pass'),
    (CLIENTS, 'cut-offs are logged once a minute',
     'now - self.cut_offs_logged_at >= CUT_OFF_LOG_INTERVAL_SECONDS', 'now >= 0'),
    (WORKERS, 'more than one worker stops start-up', 'if cfg.workers != 1:', 'if cfg.workers < 1:'),
    (WORKERS, 'another worker class stops start-up', 'if cfg.worker_class is not ExporterWorker:',
     'if False:'),
    (WORKERS, 'kill -TTIN keeps one worker', 'server.num_workers = 1', 'pass'),
    (WORKERS, 'SIGHUP is ignored by the master', 'signal.signal(signal.SIGHUP, hangup)', 'pass'),
    (WORKERS, 'SIGHUP is ignored by the worker', 'signal.signal(signal.SIGHUP, signal.SIG_IGN)',
     'pass'),
    (WORKERS, 'gunicorn without the settings is refused',
     "if 'gunicorn.arbiter' in sys.modules:", 'if False:'),
    (ROTATION, 'changed credential files are in force', 'if credentials != self.credentials:',
     'if False:'),
    (ROTATION, 'credential files are polled, not read on each request',
     'CREDENTIALS_POLL_SECONDS = 5', 'CREDENTIALS_POLL_SECONDS = 0'),
    (ROTATION, 'a bad new credential file is logged once', 'if str(error) != self._problem:',
     'if True:'),
    (ENTRY_POINT, 'a bad environment exits 4', 'sys.exit(EXIT_CONFIG_ERROR)\n    if warn:',
     'sys.exit(1)\n    if warn:'),
    (ENTRY_POINT, 'python3 k8s_exporter.py serves on K8S_EXPORTER_LISTEN',
     "'--bind', config.listen,", "'--bind', '127.0.0.1:9201',"),
]

# Mutants that change nothing a user can see, with the reason: their
# survival does not count against the score.
EQUIVALENT = {
    'pods wait to be rendered at most RENDER_DELAY_SECONDS':
        'every read of the output renders what waits first, so no read sees a value late; '
        'the delay bounds the work a scrape does, which make bench measures',
    'a value is redone when its bits change, not only its ==':
        'pod values are never -0.0 (sums and the one-series path give 0.0), and a NaN '
        'redone prints the same NaN: comparing bits only saves work',
    'glibc takes the keep-free size':
        'glibc 2.36 takes an mmap threshold of 64 MiB; test_glibc_takes_every_malloc_setting '
        'fails where a glibc caps it at 32 MiB',
    'varint continuation bit':
        'only the RW2 fast path encodes with it, the __name__ ref it looks for: a wrong '
        'prefix matches no series, which then take the full path to the same samples',
    'a shared identity is forgotten with the key that shared it':
        'a pod still marked as sharing an identity takes the comparison of counted_series, '
        'which gives what Slots.values gives when no two keys share one, and re-renders '
        'equal values that change no bits: only work is lost',
    'HELP text is escaped':
        'no HELP text written holds a backslash or newline: the seed\'s texts, and metric '
        'names, which K8S_EXPORTER_METRICS checks; escape_help has its own test',
}


###############################################################################
# Running the tests of a mutant ###############################################
###############################################################################

def test_sections(text):
    """{banner title: [test function names]} of the test file, in file order."""
    sections, title = {}, None
    lines = text.splitlines()
    for number, line in enumerate(lines[1:], 1):
        if line.startswith('# ') and line.endswith('###') and lines[number - 1].startswith('###'):
            title = line[2:].rstrip('#').strip()
            sections.setdefault(title, [])
        match = re.match(r'def (test_\w+)\(', line)
        if match and title is not None:
            sections[title].append(match.group(1))
    return sections


def select_tests(sections, wanted):
    """The test names of the wanted sections (title prefixes, case-insensitive,
    or test_ prefixes)."""
    titles = {title.lower(): names for title, names in sections.items()}
    every = [name for names in sections.values() for name in names]
    selected = []
    for entry in wanted:
        if entry.startswith('test_'):
            selected += [name for name in every if name.startswith(entry)]
        else:
            selected += [name for title, names in titles.items()
                         if title.startswith(entry.lower()) for name in names]
    return list(dict.fromkeys(selected))


def apply_mutant(source, text, replacement):
    """The mutated source, or None where text is not there exactly once."""
    if source.count(text) != 1:
        return None
    return source.replace(text, replacement)


class Workspace:
    """A copy of the project beside ../shared, where one k8s_exporter.py is tried at a time."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix='k8s-exporter-mutants-'))
        self.project = self.root / HERE.name
        shutil.copytree(HERE, self.project, symlinks=True, ignore=shutil.ignore_patterns(
            '.venv', '.git', '__pycache__', '.pytest_cache', '.ruff_cache', '.hypothesis'))
        (self.root / 'shared').symlink_to((HERE.parent / 'shared').resolve())

    def run(self, source, tests, timeout):
        """Run the tests against source: ('passed' | 'failed' | 'error' | 'timeout', detail)."""
        (self.project / EXPORTER.name).write_text(source)
        command = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider',
                   '--no-header', '-rf', '--tb=no',
                   *(f'{TESTS.name}::{name}' for name in tests)]
        env = {**os.environ, 'PYTHONDONTWRITEBYTECODE': '1'}
        process = subprocess.Popen(command, cwd=self.project, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=hear_sigint)
        try:
            output, _ = process.communicate(timeout=timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as error:
            stop_group(process)
            if isinstance(error, KeyboardInterrupt):
                raise
            return 'timeout', f'over {timeout:.0f} s'
        failed = re.search(r'^FAILED \S+::(\S+)', output, re.M)
        if process.returncode == 0:
            return 'passed', ''
        if process.returncode == 1 and failed:
            return 'failed', failed.group(1)
        return 'error', (output.strip().splitlines() or [''])[-1][:100]

    def remove(self):
        shutil.rmtree(self.root, ignore_errors=True)


def hear_sigint():
    """Before the tests' Python starts: SIGINT back to its default, which
    Python turns into Ctrl-C, where this pass runs as a background job that
    ignores SIGINT (and would pass that on)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_group(process):
    """SIGINT, so that the tests' finally blocks stop their servers; SIGKILL after a minute."""
    with_signal = [signal.SIGINT, signal.SIGKILL]
    for sig, wait_seconds in zip(with_signal, (60, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_seconds)
            return
        except subprocess.TimeoutExpired:
            pass


###############################################################################
# The pass ####################################################################
###############################################################################

def parse_numbers(text):
    """{1, 4, 5, 6} of '1,4-6': the mutants' numbers as --list shows them."""
    numbers = set()
    for part in filter(None, text.replace(' ', '').split(',')):
        low, _, high = part.partition('-')
        numbers.update(range(int(low), int(high or low) + 1))
    return numbers


def plan(source, sections, only, numbers=None):
    """(number, sections, rule, mutated source or None, tests) per mutant."""
    rows = []
    for number, (wanted, rule, text, replacement) in enumerate(MUTANTS, 1):
        if only and not any(only.lower() in part.lower() for part in (rule, *wanted)):
            continue
        if numbers and number not in numbers:
            continue
        rows.append((number, wanted, rule, apply_mutant(source, text, replacement),
                     select_tests(sections, wanted)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--list', action='store_true', help='list the mutants and exit')
    parser.add_argument('--only', default='', help='mutants whose rule or section holds this')
    parser.add_argument('--numbers', type=parse_numbers, default=None,
                        help="mutants by their --list numbers: '3,4,60-75'")
    parser.add_argument('--timeout', type=float, default=900,
                        help='seconds for the tests of one mutant (default 900)')
    args = parser.parse_args(argv)
    source = EXPORTER.read_text()
    sections = test_sections(TESTS.read_text())
    rows = plan(source, sections, args.only, args.numbers)
    if args.list:
        for number, _, rule, mutated, tests in rows:
            state = 'n/a: text not found once' if mutated is None else f'{len(tests)} tests'
            print(f'{number:3d}  {rule:<60}  {state}')
        return 0
    # SIGTERM takes the way out of Ctrl-C, so the tests' servers are stopped
    # and the copy removed (a background job may ignore SIGINT).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workspace = Workspace()
    results = []
    started = time.monotonic()
    try:
        print('baseline: the selected tests against k8s_exporter.py as it is', flush=True)
        every = list(dict.fromkeys(name for *_, tests in rows for name in tests))
        outcome, detail = workspace.run(source, every, args.timeout)
        if outcome != 'passed':
            print(f'baseline {outcome}: {detail}; fix that first', file=sys.stderr)
            return 1
        print(f'baseline passed ({len(every)} tests, {time.monotonic() - started:.0f} s)\n'
              f'{"#":>3}  {"rule":<60}  {"result":<9}  {"s":>4}  caught by', flush=True)
        for number, wanted, rule, mutated, tests in rows:
            mutant_started = time.monotonic()
            if mutated is None:
                outcome, detail = 'n/a', 'text not found once in k8s_exporter.py'
            elif not tests:
                outcome, detail = 'n/a', f'no test section {" / ".join(wanted)}'
            else:
                outcome, detail = workspace.run(mutated, tests, args.timeout)
            result = {'passed': 'SURVIVED', 'failed': 'killed', 'error': 'killed',
                      'timeout': 'killed'}.get(outcome, outcome)
            if result == 'SURVIVED' and rule in EQUIVALENT:
                result, detail = 'equiv', EQUIVALENT[rule]
            elif outcome in ('error', 'timeout'):
                detail = f'({outcome}) {detail}'
            results.append((number, rule, result, detail))
            print(f'{number:3d}  {rule:<60}  {result:<9}  '
                  f'{time.monotonic() - mutant_started:4.0f}  {detail}', flush=True)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
    finally:
        workspace.remove()
    counted = [row for row in results if row[2] in ('killed', 'SURVIVED')]
    killed = sum(1 for row in counted if row[2] == 'killed')
    survived = [row for row in counted if row[2] == 'SURVIVED']
    not_applicable = sum(1 for row in results if row[2] == 'n/a')
    print(f'\nscore: {killed}/{len(counted)} mutants killed'
          f'{f" ({killed / len(counted):.0%})" if counted else ""}; '
          f'{not_applicable} not applicable, '
          f'{sum(1 for row in results if row[2] == "equiv")} equivalent; '
          f'{time.monotonic() - started:.0f} s')
    for number, rule, *_ in survived:
        print(f'  survived: {number} {rule}')
    return 1 if survived else 0


if __name__ == '__main__':
    sys.exit(main())
