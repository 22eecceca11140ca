"""N exporters that share a cluster's pods: the manifests and the Prometheus configs.

    python3 examples/kubernetes/shards.py 3 --namespace monitoring --out shards-3
    make shards SHARDS=3

writes, in place of deployment.yaml and service.yaml,

    k8s-exporter-shards.yaml        a headless Service and a StatefulSet of N
                                    exporters, k8s-exporter-0 .. k8s-exporter-(N-1)
    prometheus1-remote-write.yaml   prometheus1's remote_write: one entry per
                                    exporter, each keeping one hashmod share of
                                    the pods (by namespace and pod)
    prometheus2-scrape.yaml         prometheus2's scrape job for all N

Each pod then lives on exactly one exporter. The pod template is
deployment.yaml's (the tests hold them equal). Standard library only.
"""

import argparse
import json
import re
import sys
from pathlib import Path

NAME = 'k8s-exporter'
SERVICE = 'k8s-exporter-shards'
PORT = 9201
EXPORTED_METRICS_REGEX = ('container_(cpu_load_average_10s|fs_limit_bytes|fs_usage_bytes'
                          '|memory_max_usage_bytes|memory_usage_bytes)')
LABELS = {'app.kubernetes.io/name': NAME, 'app.kubernetes.io/instance': SERVICE}


def pod_spec():
    """deployment.yaml's pod spec."""
    return {
        'automountServiceAccountToken': False,
        'terminationGracePeriodSeconds': 40,
        'securityContext': {'runAsNonRoot': True, 'runAsUser': 10001, 'runAsGroup': 10001,
                            'seccompProfile': {'type': 'RuntimeDefault'}},
        'containers': [{
            'name': NAME,
            'image': 'k8s-exporter:latest',
            'ports': [{'name': 'http', 'containerPort': PORT}],
            'env': [{'name': 'K8S_EXPORTER_CLUSTER', 'value': 'k8s-cluster'}],
            'readinessProbe': {'httpGet': {'path': '/-/ready', 'port': 'http'},
                               'periodSeconds': 10},
            'livenessProbe': {'httpGet': {'path': '/-/healthy', 'port': 'http'},
                              'periodSeconds': 10, 'timeoutSeconds': 5, 'failureThreshold': 3},
            'resources': {'requests': {'cpu': '100m', 'memory': '64Mi'},
                          'limits': {'cpu': '1', 'memory': '256Mi'}},
            'securityContext': {'allowPrivilegeEscalation': False,
                                'readOnlyRootFilesystem': True, 'privileged': False,
                                'capabilities': {'drop': ['ALL']}},
            'volumeMounts': [{'name': 'credentials', 'mountPath': '/run/secrets/k8s-exporter',
                              'readOnly': True}],
        }],
        'volumes': [{'name': 'credentials',
                     'secret': {'secretName': 'k8s-exporter-credentials', 'optional': True}}],
    }


def manifests(shards):
    service = {
        'apiVersion': 'v1', 'kind': 'Service',
        'metadata': {'name': SERVICE, 'labels': LABELS},
        # Headless: a DNS name per pod, k8s-exporter-0.k8s-exporter-shards.NAMESPACE.svc.
        'spec': {'clusterIP': 'None', 'selector': LABELS,
                 'ports': [{'name': 'http', 'port': PORT, 'targetPort': 'http'}]},
    }
    statefulset = {
        'apiVersion': 'apps/v1', 'kind': 'StatefulSet',
        'metadata': {'name': NAME, 'labels': LABELS},
        'spec': {
            'serviceName': SERVICE,
            'replicas': shards,
            # The shards do not depend on each other: start and replace them at once.
            'podManagementPolicy': 'Parallel',
            'selector': {'matchLabels': LABELS},
            'template': {'metadata': {'labels': LABELS}, 'spec': pod_spec()},
        },
    }
    return [service, statefulset]


def shard_url(shard, namespace):
    return f'http://{NAME}-{shard}.{SERVICE}.{namespace}.svc:{PORT}/write'


def remote_write(shards, namespace):
    """prometheus1's remote_write entries: exporter i keeps the pods whose hash is i."""
    return {'remote_write': [{
        'url': shard_url(shard, namespace),
        'write_relabel_configs': [
            {'source_labels': ['__name__'], 'regex': EXPORTED_METRICS_REGEX, 'action': 'keep'},
            # Kubelets older than 1.16 name the label pod_name.
            {'source_labels': ['namespace', 'pod'], 'modulus': shards,
             'target_label': '__tmp_pod_shard', 'action': 'hashmod'},
            {'source_labels': ['__tmp_pod_shard'], 'regex': str(shard), 'action': 'keep'},
            {'regex': '__tmp_pod_shard', 'action': 'labeldrop'},
        ],
        'metadata_config': {'send': False},
    } for shard in range(shards)]}


def prometheus2_scrape(shards, namespace):
    return {'scrape_configs': [{
        'job_name': NAME,
        'honor_labels': True,
        'static_configs': [{'targets': [f'{NAME}-{shard}.{SERVICE}.{namespace}.svc:{PORT}'
                                        for shard in range(shards)]}],
    }]}


###############################################################################
# YAML, block style ###########################################################
###############################################################################

PLAIN_SCALAR = re.compile(r'[A-Za-z_/][A-Za-z0-9_./-]*\Z')
YAML_WORDS = {'true', 'false', 'yes', 'no', 'on', 'off', 'null', 'y', 'n', '~'}


def yaml_scalar(value):
    if isinstance(value, str):
        plain = PLAIN_SCALAR.match(value) and value.lower() not in YAML_WORDS
        return value if plain else json.dumps(value)
    return json.dumps(value)   # numbers, true, false: the same in YAML


def yaml_lines(value, indent=''):
    """Block-style YAML of dicts, lists and scalars; strings quoted only when needed."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                yield f'{indent}{key}:'
                yield from yaml_lines(item, indent + '  ' if isinstance(item, dict) else indent)
            else:
                yield f'{indent}{key}: {yaml_scalar(item) if item != {} else "{}"}'
    else:
        for item in value:
            if isinstance(item, (dict, list)) and item:
                first, *rest = yaml_lines(item, indent + '  ')
                yield f'{indent}- {first.lstrip()}'
                yield from rest
            else:
                yield f'{indent}- {yaml_scalar(item)}'


def yaml_documents(documents, header):
    body = '---\n'.join('\n'.join(yaml_lines(document)) + '\n' for document in documents)
    return ''.join(f'# {line}\n'.rstrip() + '\n' for line in header.splitlines()) + body


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('shards', type=int, help='number of exporters, 2 or more')
    parser.add_argument('--namespace', default='monitoring',
                        help='the namespace the exporters run in (default: monitoring)')
    parser.add_argument('--out', type=Path, help='folder to write to (default: shards-N)')
    args = parser.parse_args(argv)
    if args.shards < 2:
        parser.error('shards: 2 or more (one exporter is deployment.yaml)')
    out = args.out or Path(f'shards-{args.shards}')
    out.mkdir(parents=True, exist_ok=True)
    made = f'made by examples/kubernetes/shards.py {args.shards} --namespace {args.namespace}'
    files = {
        'k8s-exporter-shards.yaml': yaml_documents(
            manifests(args.shards),
            f'{made}\nkubectl apply -n {args.namespace} -f k8s-exporter-shards.yaml'),
        'prometheus1-remote-write.yaml': yaml_documents(
            [remote_write(args.shards, args.namespace)],
            f'{made}\nprometheus1: in place of its remote_write to a single exporter'),
        'prometheus2-scrape.yaml': yaml_documents(
            [prometheus2_scrape(args.shards, args.namespace)],
            f'{made}\nprometheus2: every shard, with honor_labels'),
    }
    for name, text in files.items():
        (out / name).write_text(text, encoding='utf-8')
        print(out / name)
    return 0


if __name__ == '__main__':
    sys.exit(main())
