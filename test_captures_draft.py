"""Real kubelet cAdvisor captures, through the WSGI app (issue 6, unit level).

For every capture in ../shared/fixtures/cadvisor the expected per-pod values
are computed here from the capture's text, by the README's aggregation rules
and without the exporter's mapping code, and compared with what /metrics
serves after the capture is remote-written the way Prometheus sends it.

The helpers in the first section (read_capture, parse_capture,
expected_pod_values, capture_table) are imported by the end-to-end tests too.
"""

import functools
import math

import pytest

import k8s_exporter
from test_k8s_exporter import (
    FIXTURES,
    RW1_TYPE,
    RW2_TYPE,
    call_wsgi,
    fresh_app,
    parse_exposition,
    rw1_body,
    rw2_body,
)

FIVE = ('container_cpu_load_average_10s', 'container_fs_limit_bytes',
        'container_fs_usage_bytes', 'container_memory_max_usage_bytes',
        'container_memory_usage_bytes')


###############################################################################
# Reading captures and computing what the exporter must serve #################
###############################################################################

def read_capture(path):
    """The capture's text; a missing final newline (kind 1.16) is added."""
    with open(path, encoding='utf-8', newline='') as capture:
        text = capture.read()
    return text if not text or text.endswith('\n') else text + '\n'


_LABEL_ESCAPES = {'\\': '\\', '"': '"', 'n': '\n'}


def parse_capture(text):
    """[(metric name, labels dict, value)] for every sample line of text format 0.0.4.

    A reader of the format written for the tests (not the exporter's code):
    escaped label values, an optional timestamp after the value, NaN and
    +/-Inf, comments and blank lines. A malformed line raises ValueError
    naming it, so a broken fixture cannot pass as an empty one.
    """
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith('#'):
            continue
        try:
            samples.append(_parse_sample_line(stripped))
        except (ValueError, IndexError, KeyError) as error:
            raise ValueError(f'line {number}: {error}: {line[:200]!r}') from None
    return samples


def _parse_sample_line(line):
    end = 0
    while end < len(line) and line[end] not in '{ \t':
        end += 1
    name, i = line[:end], end
    if not name:
        raise ValueError('no metric name')
    labels = {}
    if i < len(line) and line[i] == '{':
        i += 1
        while True:
            while line[i] in ' \t':
                i += 1
            if line[i] == '}':
                i += 1
                break
            equals = line.index('=', i)
            label = line[i:equals].strip()
            i = equals + 1
            while line[i] in ' \t':
                i += 1
            if line[i] != '"':
                raise ValueError(f'label {label!r}: value not quoted')
            i += 1
            value = []
            while line[i] != '"':
                if line[i] == '\\':
                    value.append(_LABEL_ESCAPES[line[i + 1]])
                    i += 2
                else:
                    value.append(line[i])
                    i += 1
            i += 1
            if label in labels:
                raise ValueError(f'label {label!r} repeated')
            labels[label] = ''.join(value)
            while line[i] in ' \t':
                i += 1
            if line[i] == ',':
                i += 1
            elif line[i] != '}':
                raise ValueError(f'expected , or }} after label {label!r}')
    fields = line[i:].split()
    if len(fields) not in (1, 2):
        raise ValueError('expected a value and an optional timestamp')
    if len(fields) == 2:
        int(fields[1])
    return name, labels, _parse_go_float(fields[0])


def _parse_go_float(text):
    # Go's ParseFloat spells NaN and the infinities as the format does;
    # Python's float() also takes 'nan'/'infinity', which are equally valid there.
    return float(text)


# (namespace, pod, container) label names, first with a pod and namespace wins.
_POD_CONVENTIONS = (
    ('namespace', 'pod', 'container'),
    ('namespace', 'pod_name', 'container_name'),
    ('container_label_io_kubernetes_pod_namespace', 'container_label_io_kubernetes_pod_name',
     'container_label_io_kubernetes_container_name'),
)
_UID_CHARACTERS = frozenset('0123456789abcdefABCDEF_-')


def pod_of(labels):
    """(namespace, pod, container) of a series by the README's conventions, or None."""
    for namespace_label, pod_label, container_label in _POD_CONVENTIONS:
        if labels.get(namespace_label) and labels.get(pod_label):
            return (labels[namespace_label], labels[pod_label],
                    labels.get(container_label, ''))
    return None


def is_pod_cgroup_id(cgroup):
    """True when cgroup's last segment names a pod, as in (?:^|-)pod[0-9a-fA-F_-]+(?:\\.slice)?$.

    Spelled out by hand rather than with the README's regex, so that a slip in
    either one shows up as a disagreement.
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
    identity = pod_of(labels)
    container = identity[2] if identity else ''
    cgroup = labels.get('id', '')
    return not container and (not cgroup or is_pod_cgroup_id(cgroup))


def expected_pod_values(samples, cluster='k8s-cluster', job='kubernetes-cadvisor', metrics=FIVE):
    """{(metric, cluster, job, namespace, pod): value} by the README's aggregation rules.

    samples as parse_capture returns them. A series listed twice counts once,
    at its first value (the later line has an equal or missing timestamp, so
    the exporter ignores it).
    """
    wanted = set(metrics)
    seen = set()
    # (metric, cluster, job, namespace, pod) -> [(pod cgroup?, device, value)]
    series_by_pod = {}
    for name, labels, value in samples:
        if name not in wanted:
            continue
        present = {label: text for label, text in labels.items() if text}
        identity = frozenset(present.items()) | {('__name__', name)}
        if identity in seen:
            continue
        seen.add(identity)
        owner = pod_of(present)
        if owner is None:
            continue
        key = (name, present.get('cluster') or cluster, present.get('job') or job,
               owner[0], owner[1])
        series_by_pod.setdefault(key, []).append(
            (is_pod_cgroup_series(present), present.get('device', ''), value))
    expected = {}
    for key, series in series_by_pod.items():
        value = _aggregate(key[0], series)
        if value is not None:
            expected[key] = value
    return expected


def _aggregate(metric, series):
    containers = [(device, value) for pod_level, device, value in series if not pod_level]
    if metric == 'container_fs_limit_bytes':
        largest = {}
        for device, value in containers:
            largest[device] = max(value, largest.get(device, value))
        return math.fsum(largest.values()) if largest else None
    if metric == 'container_fs_usage_bytes':
        return math.fsum(value for _, value in containers) if containers else None
    pod_level = [value for is_pod_level, _, value in series if is_pod_level]
    return math.fsum(pod_level or [value for _, value in containers])


def capture_table(samples, job, timestamp_ms, extra_labels=None):
    """The table rw1_body/rw2_body take, as Prometheus would store a scrape of samples.

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


###############################################################################
# The helpers themselves ######################################################
###############################################################################

def test_parse_capture_reads_escapes_timestamps_and_special_values():
    text = ('# HELP m A help line with a "quote"\n'
            '# TYPE m gauge\n'
            '\n'
            'm{a="x\\"y",b="back\\\\slash",c="new\\nline",} 1.5e+09 1572450197572\n'
            'm{a="{}, =",b=""} NaN\n'
            'n +Inf\n'
            'n{a="1"} -Inf 123\n')
    samples = parse_capture(text)
    assert [(name, labels) for name, labels, _ in samples] == [
        ('m', {'a': 'x"y', 'b': 'back\\slash', 'c': 'new\nline'}),
        ('m', {'a': '{}, =', 'b': ''}),
        ('n', {}),
        ('n', {'a': '1'}),
    ]
    values = [value for _, _, value in samples]
    assert values[0] == 1.5e9 and math.isnan(values[1])
    assert values[2:] == [math.inf, -math.inf]


def test_parse_capture_refuses_a_malformed_line():
    with pytest.raises(ValueError, match='line 2'):
        parse_capture('ok 1\nbad{a="1"}\n')


def test_read_capture_adds_only_a_missing_final_newline(tmp_path):
    without, with_newline = tmp_path / 'without.txt', tmp_path / 'with.txt'
    without.write_bytes(b'a 1\nb 2')
    with_newline.write_bytes(b'a 1\nb 2\n')
    assert read_capture(without) == read_capture(with_newline) == 'a 1\nb 2\n'


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
    ('/', False),
])
def test_is_pod_cgroup_id_agrees_with_the_readme_regex(cgroup, pod_level):
    assert is_pod_cgroup_id(cgroup) is pod_level
    regex_says = k8s_exporter.POD_CGROUP_SEGMENT_RE.search(cgroup.rpartition('/')[2])
    assert (regex_says is not None) is pod_level


def test_expected_pod_values_applies_each_rule_on_a_small_table():
    pod_cgroup = '/kubepods/burstable/pod0a'
    samples = [
        # a pod cgroup wins over its containers; containers alone are summed
        ('container_memory_usage_bytes', {'namespace': 'n', 'pod': 'p', 'id': pod_cgroup}, 100),
        ('container_memory_usage_bytes', {'namespace': 'n', 'pod': 'p', 'id': pod_cgroup + '/c1',
                                          'container': ''}, 30),
        ('container_memory_usage_bytes', {'namespace': 'n', 'pod': 'q', 'container': 'a',
                                          'id': '/x/a'}, 5),
        ('container_memory_usage_bytes', {'namespace': 'n', 'pod': 'q', 'container': 'POD',
                                          'id': '/x/b'}, 7),
        # first of a duplicated series wins
        ('container_memory_usage_bytes', {'namespace': 'n', 'pod': 'q', 'container': 'POD',
                                          'id': '/x/b'}, 1000),
        # fs: usage summed over devices, limit: largest per device, summed
        ('container_fs_usage_bytes', {'namespace': 'n', 'pod': 'q', 'container': 'a',
                                      'device': '/dev/a'}, 1),
        ('container_fs_usage_bytes', {'namespace': 'n', 'pod': 'q', 'container': 'b',
                                      'device': '/dev/b'}, 2),
        ('container_fs_limit_bytes', {'namespace': 'n', 'pod': 'q', 'container': 'a',
                                      'device': '/dev/a'}, 10),
        ('container_fs_limit_bytes', {'namespace': 'n', 'pod': 'q', 'container': 'b',
                                      'device': '/dev/a'}, 30),
        ('container_fs_limit_bytes', {'namespace': 'n', 'pod': 'q', 'container': 'b',
                                      'device': '/dev/b'}, 4),
        # a pod-level fs series is not a container: no fs line for p
        ('container_fs_usage_bytes', {'namespace': 'n', 'pod': 'p', 'id': pod_cgroup,
                                      'device': '/dev/a'}, 9),
        # legacy names, an incoming cluster and job, no identity, another metric
        ('container_memory_usage_bytes', {'namespace': 'old', 'pod_name': 'r',
                                          'container_name': 'POD', 'cluster': 'c2',
                                          'job': 'j2'}, 3),
        ('container_memory_usage_bytes', {'namespace': '', 'pod_name': '',
                                          'id': '/kubepods/burstable/pod0b'}, 99),
        ('container_memory_cache', {'namespace': 'n', 'pod': 'p', 'id': pod_cgroup}, 8),
    ]
    assert expected_pod_values(samples, job='j') == {
        ('container_memory_usage_bytes', 'k8s-cluster', 'j', 'n', 'p'): 100,
        ('container_memory_usage_bytes', 'k8s-cluster', 'j', 'n', 'q'): 12,
        ('container_fs_usage_bytes', 'k8s-cluster', 'j', 'n', 'q'): 3,
        ('container_fs_limit_bytes', 'k8s-cluster', 'j', 'n', 'q'): 34,
        ('container_memory_usage_bytes', 'c2', 'j2', 'old', 'r'): 3,
    }


def test_capture_table_drops_empty_labels_and_adds_name_and_job():
    samples = [('m', {'container': '', 'id': '/a', 'pod': 'p'}, 2.5),
               ('m', {'job': 'own'}, 1)]
    assert capture_table(samples, 'cadvisor', 1234, {'instance': 'node:10250'}) == [
        ({'__name__': 'm', 'job': 'cadvisor', 'instance': 'node:10250', 'id': '/a', 'pod': 'p'},
         [(2.5, 1234)]),
        ({'__name__': 'm', 'job': 'own', 'instance': 'node:10250'}, [(1, 1234)]),
    ]


###############################################################################
# Feeding a capture to the WSGI app ###########################################
###############################################################################

CAPTURE_EKS_1_21 = 'kubelet-modern-dockershim-eks-k8s1.21-datadog-integrations-core.txt'
CAPTURE_MINIKUBE_1_22 = 'kubelet-modern-dockershim-systemd-minikube-k8s1.22-nri-kubernetes.part.txt'
CAPTURE_KIND_1_16 = 'kubelet-modern-containerd-kind-k8s1.16-datadog-integrations-core.txt'
CAPTURE_MINIKUBE_1_35 = 'kubelet-modern-containerd-minikube-k8s1.35-nri-kubernetes.part.txt'
CAPTURE_LEGACY_GKE = 'kubelet-legacy-dockershim-gke-datadog-integrations-core.txt'
ALL_CAPTURES = (CAPTURE_EKS_1_21, CAPTURE_MINIKUBE_1_22, CAPTURE_KIND_1_16,
                CAPTURE_MINIKUBE_1_35, CAPTURE_LEGACY_GKE, 'synthetic-cadvisor-standalone.txt',
                'synthetic-kubelet-legacy.txt', 'synthetic-kubelet-modern.txt')

CAPTURE_JOB = 'kubernetes-cadvisor'
CAPTURE_TIMESTAMP_MS = 1_700_000_000_000
# Prometheus's queue_config.max_samples_per_send default since 2.26.
SAMPLES_PER_REQUEST = 2000
MEMORY_METRICS = ('container_cpu_load_average_10s', 'container_memory_max_usage_bytes',
                  'container_memory_usage_bytes')


def capture_path(name):
    if not FIXTURES.is_dir():
        pytest.skip(f'{FIXTURES} not present')
    return FIXTURES / name


@functools.lru_cache(maxsize=None)
def _parsed_capture(name):
    return tuple(parse_capture(read_capture(capture_path(name))))


def capture_samples(name):
    """The capture's samples; labels are copied so a test may change them."""
    return [(metric, dict(labels), value) for metric, labels, value in _parsed_capture(name)]


def post_samples(app, samples, protocol, timestamp_ms=CAPTURE_TIMESTAMP_MS):
    """Remote-write samples as Prometheus batches them; every request must succeed."""
    table = capture_table(samples, CAPTURE_JOB, timestamp_ms, {'instance': '10.0.0.1:10250'})
    build, content_type = (rw1_body, RW1_TYPE) if protocol == 1 else (rw2_body, RW2_TYPE)
    for start in range(0, len(table), SAMPLES_PER_REQUEST):
        batch = table[start:start + SAMPLES_PER_REQUEST]
        status, headers, body = call_wsgi(app, 'POST', '/write', build(batch),
                                          {'Content-Type': content_type,
                                           'Content-Encoding': 'snappy'})
        assert (status, body) == (204, b'')
        if protocol == 2:
            assert headers['X-Prometheus-Remote-Write-Samples-Written'] == str(len(batch))


def served_metrics(app):
    status, _, body = call_wsgi(app, 'GET', '/metrics')
    assert status == 200
    return parse_exposition(body.decode())


def served_pod_values(app):
    """{(metric, cluster, job, namespace, pod): value} of the pod families on /metrics."""
    values = {}
    for (name, label_items), value in served_metrics(app).items():
        if not name.startswith('container_'):
            continue
        labels = dict(label_items)
        assert name in FIVE, name
        assert set(labels) == {'cluster', 'item', 'job', 'namespace', 'pod'}, labels
        assert labels['item'] == name
        assert labels['namespace'] and labels['pod'], labels
        values[(name, labels['cluster'], labels['job'], labels['namespace'],
                labels['pod'])] = value
    return values


def served_self_metric(app, name, **labels):
    return served_metrics(app)[(name, frozenset(labels.items()))]


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
# Every capture, every pod, every metric ######################################
###############################################################################

@pytest.mark.parametrize('protocol', [1, 2], ids=['rw1', 'rw2'])
@pytest.mark.parametrize('capture', ALL_CAPTURES)
def test_capture_pod_values_match_the_readme_rules(capture, protocol):
    samples = capture_samples(capture)
    expected = expected_pod_values(samples, job=CAPTURE_JOB)
    app = fresh_app()
    post_samples(app, samples, protocol)
    served = served_pod_values(app)
    assert served == expected
    # Every pod of the capture is there, and only pods: the node's own
    # cgroups (id="/", qos and system slices) carry no pod identity.
    pods = {owner[:2] for _, labels, _ in samples
            if (owner := pod_of(labels))}
    assert {(namespace, pod) for _, _, _, namespace, pod in served} == pods
    # Each input series of a pod is held apart: none overwrote another.
    held = {(name, frozenset((k, v) for k, v in labels.items() if v))
            for name, labels, _ in samples if name in FIVE and pod_of(labels)}
    assert served_self_metric(app, 'k8s_exporter_input_series') == len(held)


@pytest.mark.parametrize('capture', ALL_CAPTURES)
def test_capture_series_are_classified_as_the_readme_says(capture):
    """The exporter's pod-cgroup/container split agrees with ours on every series."""
    for name, labels, _ in capture_samples(capture):
        present = {label: text for label, text in labels.items() if text}
        identity = k8s_exporter.pod_series_identity(present, 'k8s-cluster')
        owner = pod_of(present)
        assert (identity is None) == (owner is None), present
        if identity:
            pod, series = identity
            assert (pod.namespace, pod.pod) == owner[:2]
            assert series.pod_cgroup == is_pod_cgroup_series(present), present


###############################################################################
# The traps of issue 6, each on the capture that shows it #####################
###############################################################################

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
    served = served_pod_values(app)
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
    assert by_metric(served_pod_values(app), metric) == {
        pod: cgroup for pod, (cgroup, _) in pairs.items()}
    assert any(cgroup != pause for cgroup, pause in pairs.values())
    assert served_self_metric(app, 'k8s_exporter_input_series') == len(pause) + len(pod_level)


def test_systemd_slice_pod_cgroup_wins_over_docker_scopes():
    samples = capture_samples(CAPTURE_MINIKUBE_1_22)
    app = fresh_app()
    post_samples(app, samples, 1)
    served = served_pod_values(app)
    differs = 0
    for metric in MEMORY_METRICS:
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
    served = served_pod_values(app)
    differs_from_pod_cgroup = differs_without_pause = 0
    for metric in MEMORY_METRICS:
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
               and name in FIVE]
    assert node_fs and all(labels['id'] == '/' and not pod_of(labels) for labels in node_fs)
    app = fresh_app()
    post_samples(app, samples, 1)
    status, _, body = call_wsgi(app, 'GET', '/metrics')
    assert status == 200
    assert b'container_fs_' not in body
    served = served_pod_values(app)
    pods = {(namespace, pod) for _, _, _, namespace, pod in served}
    assert len(pods) == len({pod_of(labels)[:2] for _, labels, _ in samples if pod_of(labels)})
    assert {metric for metric, *_ in served} == set(MEMORY_METRICS)


@pytest.mark.parametrize('capture', [CAPTURE_MINIKUBE_1_22, CAPTURE_MINIKUBE_1_35])
def test_pod_with_only_a_cgroup_and_a_pause_container_is_exported(capture):
    samples = capture_samples(capture)
    own = [(name, labels, value) for name, labels, value in samples
           if (pod_of(labels) or ())[1:2] == ('e2e-container-creating',)]
    containers = {labels.get('container', '') for name, labels, _ in own
                  if not is_pod_cgroup_series(labels)}
    assert containers == ({'POD'} if capture == CAPTURE_MINIKUBE_1_22 else {''})
    app = fresh_app()
    post_samples(app, samples, 2)
    served = {metric: value for (metric, _, _, _, pod), value in served_pod_values(app).items()
              if pod == 'e2e-container-creating'}
    expected = {name: value for name, labels, value in own
                if name in MEMORY_METRICS and is_pod_cgroup_series(labels)}
    if capture == CAPTURE_MINIKUBE_1_22:
        # docker gives the pause container fs series; they are the pod's.
        expected.update((name, value) for name, labels, value in own
                        if name.startswith('container_fs_') and name in FIVE)
    assert len(expected) == (5 if capture == CAPTURE_MINIKUBE_1_22 else 3)
    assert served == expected


def test_cpu_load_d_average_is_not_taken_for_cpu_load_average():
    samples = capture_samples(CAPTURE_MINIKUBE_1_35)
    load_d = [(name, labels, value) for name, labels, value in samples
              if name == 'container_cpu_load_d_average_10s' and pod_of(labels)]
    assert load_d
    app = fresh_app()
    post_samples(app, load_d, 1)
    assert served_pod_values(app) == {}
    assert served_self_metric(app, 'k8s_exporter_samples_ignored_total',
                              reason='unexported_metric') == len(load_d)
    # In the whole capture both families are 0; make the impostor's values
    # visible so that taking it would change the served cpu load.
    marked = [(name, labels, 1e9 + number if name == 'container_cpu_load_d_average_10s'
               else value) for number, (name, labels, value) in enumerate(samples)]
    app = fresh_app()
    post_samples(app, marked, 2)
    served = by_metric(served_pod_values(app), 'container_cpu_load_average_10s')
    assert len(served) == 18 and set(served.values()) == {0}


def test_capture_without_final_newline_is_read_whole():
    path = capture_path(CAPTURE_KIND_1_16)
    raw = path.read_bytes()
    assert not raw.endswith(b'\n')
    text = read_capture(path)
    assert text.encode() == raw + b'\n'
    samples = parse_capture(text)
    assert samples[-1] == ('machine_memory_bytes', {}, 5718659072.0)
    assert samples == parse_capture(raw.decode())


###############################################################################
# pod_series_identity on real ids #############################################
###############################################################################

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
    import re
    compiled = re.compile(pattern)
    return lambda labels: compiled.fullmatch(labels.get('id', '')) is not None


UID = r'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'
SYSTEMD_UID = UID.replace('-', '_')


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
])
def test_pod_series_identity_tells_pod_cgroups_by_real_ids(capture, cgroup_pattern, container,
                                                           pod_level):
    matches_id = _id_matches(cgroup_pattern)
    convention = ('container_name', 'pod_name') if capture == CAPTURE_LEGACY_GKE else (
        'container', 'pod')
    labels = first_labels(capture, 'container_memory_usage_bytes',
                          lambda labels: matches_id(labels) and labels.get(convention[1])
                          and labels.get(convention[0], '') == (container or '')
                          and (container != 'aws-node' or True))
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
    assert {k: v for k, v in pause.items() if k not in ('id', 'image', 'name')} == pod_level
    (pause_pod, pause_series), (cgroup_pod, cgroup_series) = map(identity_of, (pause, pod_level))
    assert pause_pod == cgroup_pod
    assert pause_series != cgroup_series
    assert (pause_series.pod_cgroup, cgroup_series.pod_cgroup) == (False, True)


def test_pod_series_identity_gives_legacy_unlabelled_pod_cgroup_no_pod():
    unlabelled = first_labels(CAPTURE_LEGACY_GKE, 'container_memory_usage_bytes',
                              _id_matches(rf'/kubepods/burstable/pod{UID}'))
    assert not {'pod_name', 'namespace', 'container_name'} & set(unlabelled)
    assert identity_of(unlabelled) is None
