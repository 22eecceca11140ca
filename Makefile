# k8s_exporter: `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The variables a person may set, e.g. `make run LISTEN=127.0.0.1:9300`;
# `make help` shows each with the comment line above it.
#: where `make run` serves
LISTEN ?= 0.0.0.0:9201
#: more gunicorn flags for `make run`, e.g. '--certfile cert.pem --keyfile key.pem' for TLS
GUNICORN_ARGS ?=
#: pytest flags for `make test`, e.g. '-x -k gunicorn'
PYTEST_ARGS ?= -rs
# `make image`: the tag, and the tool (docker when its daemon answers, else podman).
IMAGE ?= k8s-exporter:latest
CONTAINER_TOOL ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)
IMAGE_BUILD_ARGS ?=
# `make shards`: how many exporters share the pods.
SHARDS ?= 3

.PHONY: help run test bench bench-quick mutants demo soak screenshots proto lint clean image shards \
  prometheus podman base-image chromium

help: ## list the targets and the variables
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14
	@echo 'variables (make TARGET NAME=value), with their defaults:'
	@awk '/^#: / { doc = substr($$0, 4); next } \
	     /^[A-Z_]+ \?=/ && doc { value = $$0; sub(/^[^=]*= */, "", value); \
	                             printf "  %s=%s\t%s\n", $$1, value, doc; doc = "" }' \
	    $(MAKEFILE_LIST) | expand -t 30

# The serving settings are gunicorn.conf.py's, which gunicorn reads here.
run: $(VENV)/.runtime ## serve on $(LISTEN) as in production
	$(BIN)/gunicorn -b $(LISTEN) $(GUNICORN_ARGS) k8s_exporter:app

test: $(VENV)/.dev $(VENV)/.npm prometheus podman base-image chromium ## run every test, end to end with a real Prometheus
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) test_k8s_exporter.py

bench: $(VENV)/.dev prometheus ## compare ingest, scrape and memory with Prometheus itself, up to 150,000 pods (~13 min)
	$(BIN)/python bench_k8s_exporter.py

bench-quick: $(VENV)/.dev prometheus ## the bench at small sizes, a smoke run (~10 min)
	$(BIN)/python bench_k8s_exporter.py --quick

mutants: $(VENV)/.dev prometheus ## one-line edits of each rule, each of which a test must catch
	$(BIN)/python mutants_k8s_exporter.py

demo: $(VENV)/.runtime prometheus ## cAdvisor fixture -> prometheus1 -> exporter -> prometheus2, until Ctrl-C
	$(BIN)/python demo_k8s_exporter.py

soak: $(VENV)/.dev ## writers and scrapers against gunicorn for about 60 s
	TEST_K8S_EXPORTER_SOAK_SECONDS=60 $(BIN)/python -m pytest -q -k soak test_k8s_exporter.py

screenshots: $(VENV)/.runtime chromium ## render /, /pods and /pod of a demo store to docs/*.png
	$(BIN)/python screenshots_k8s_exporter.py docs

proto: $(VENV)/.dev ## regenerate remote_pb2.py from remote.proto
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. remote.proto

lint: $(VENV)/.dev ## ruff
	$(BIN)/ruff check .

# The labels are given on the command line too: podman's layer cache keeps
# a LABEL made from an ARG as it was first built, whatever VERSION is now.
image: ## build the container image $(IMAGE) from the Dockerfile
	$(CONTAINER_TOOL) build $(if $(filter podman,$(CONTAINER_TOOL)),$(PODMAN_BUILD_ARGS)) \
	  --build-arg VERSION=$(VERSION) --build-arg SOURCE=$(SOURCE) \
	  --label org.opencontainers.image.version=$(VERSION) \
	  --label org.opencontainers.image.source=$(SOURCE) $(IMAGE_BUILD_ARGS) -t $(IMAGE) .

shards: ## write shards-$(SHARDS)/: a StatefulSet of SHARDS exporters and both Prometheus configs
	@$(PYTHON) examples/kubernetes/shards.py $(SHARDS)

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis __pycache__

$(VENV)/.runtime: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

# prometheus-operator's CRD schemas, for the tests of its example objects; in
# the venv, so that clean removes them. Skipped (and said) without npm.
$(VENV)/.npm: | $(VENV)/.runtime
	@if command -v npm >/dev/null; then \
	  npm install --prefix $(VENV)/npm --no-audit --no-fund --silent \
	    @kubernetes-models/prometheus-operator@6.0.0 && touch $@; \
	else echo "npm not installed: the prometheus-operator objects are checked without their schemas"; fi

# Debian's prometheus package brings prometheus and promtool for the
# end-to-end tests and the benchmark. Without root the tests that need it
# are skipped, and say why.
prometheus:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's prometheus package"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else echo "prometheus not installed and not root: end-to-end tests will be skipped"; fi

# podman builds without a daemon; chroot isolation also where OCI runtimes are
# refused (here crun cannot set rlimits). pip in the build trusts what this
# host trusts: its CA bundle is mounted in, for networks that re-sign TLS.
HOST_CA_FILE = $(shell $(PYTHON) -c 'import ssl; print(ssl.get_default_verify_paths().openssl_cafile)')
PODMAN_BUILD_ARGS = --isolation chroot --format docker \
  $(if $(wildcard $(HOST_CA_FILE)),--volume $(HOST_CA_FILE):/run/k8s-exporter-build-ca.pem:ro \
    --build-arg PIP_CERT=/run/k8s-exporter-build-ca.pem)
VERSION = $(shell git describe --always --dirty 2>/dev/null || echo dev)
SOURCE = $(shell git config --get remote.origin.url)

# The image tests build with podman and run the image's filesystem; the base
# image comes from Debian's mirror by debootstrap (no container registry is
# needed), once: it stays in podman's store for the next runs.
BASE_IMAGE := docker.io/library/debian:bookworm-slim
podman:
	@if command -v podman >/dev/null && command -v debootstrap >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's podman and debootstrap packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends podman debootstrap >/dev/null; \
	else echo "podman or debootstrap not installed and not root: the image tests will be skipped"; fi

base-image: podman
	@if ! command -v podman >/dev/null || podman image exists $(BASE_IMAGE); then :; \
	elif [ "$$(id -u)" != 0 ]; then echo "not root: no base image, the image tests will be skipped"; \
	else echo "making $(BASE_IMAGE) with debootstrap (a minute or two, once)"; \
	  root=$$(mktemp -d) && trap 'rm -rf "$$root"' EXIT && \
	  debootstrap --variant=minbase bookworm "$$root" >/dev/null && \
	  tar -C "$$root" -c . | podman import -q - $(BASE_IMAGE) >/dev/null; fi

# Debian's chromium, headless, for the tests that load the pages in a real
# browser and for `make screenshots`; installed the same way.
chromium:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium package"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	else echo "chromium not installed and not root: browser tests will be skipped"; fi
