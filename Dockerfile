# k8s_exporter's image: Debian's python3, the runtime packages of
# requirements.txt in a venv, the exporter's files; run as a non-root user.
#
#   make image                       # docker if it answers, else podman
#   docker run -p 9201:9201 k8s-exporter
#
# Configured by the K8S_EXPORTER_* variables; credentials are files mounted
# in (K8S_EXPORTER_WRITE_BEARER_TOKEN_FILE=/run/secrets/write-token).
# The root filesystem may be read-only: gunicorn's worker heartbeat file
# goes to /dev/shm, and nothing else is written.

# The venv is built here, with pip; the image below gets only the venv.
FROM debian:bookworm-slim AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY requirements.txt /tmp/requirements.txt
# Empty unless the build mounts a CA bundle of its own for pip (make image
# does with podman, for a network that re-signs TLS).
ARG PIP_CERT=
# Binary wheels for all three (cramjam under python-snappy): no compiler.
RUN python3 -m venv /opt/k8s-exporter \
 && /opt/k8s-exporter/bin/pip install --no-cache-dir --disable-pip-version-check \
      -r /tmp/requirements.txt \
 && /opt/k8s-exporter/bin/pip uninstall -y -q pip setuptools

FROM debian:bookworm-slim
# python3 alone: no pip, no venv module, no compiler. The venv's python is
# a link to /usr/bin/python3, the same path in both stages.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && groupadd --gid 10001 k8s-exporter \
 && useradd --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin k8s-exporter
COPY --from=build /opt/k8s-exporter /opt/k8s-exporter
WORKDIR /app
COPY k8s_exporter.py remote_pb2.py gunicorn.conf.py /app/
ENV PATH=/opt/k8s-exporter/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Numeric, so that Kubernetes' runAsNonRoot can check it without /etc/passwd.
USER 10001:10001
EXPOSE 9201
# The slim image has no curl or wget; podman keeps this only with --format docker.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9201/-/healthy', timeout=4).status != 200)"]
# Last, so that a new commit rebuilds only from here. make image passes the
# commit (git describe) and the origin's URL.
ARG VERSION=dev
ARG SOURCE=
LABEL org.opencontainers.image.title="k8s_exporter" \
      org.opencontainers.image.description="Per-pod cAdvisor gauges, from Prometheus remote write to a /metrics page" \
      org.opencontainers.image.source="$SOURCE" \
      org.opencontainers.image.version="$VERSION"
# `make run`'s command; gunicorn.conf.py beside it holds the rest.
CMD ["gunicorn", "-w", "1", "--threads", "8", "-b", "0.0.0.0:9201", \
     "--worker-tmp-dir", "/dev/shm", "k8s_exporter:app"]
