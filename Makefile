# k8s_exporter: `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
LISTEN ?= 0.0.0.0:9201
# Extra gunicorn flags, e.g. GUNICORN_ARGS='--certfile cert.pem --keyfile key.pem' for TLS.
GUNICORN_ARGS ?=
PYTEST_ARGS ?= -rs

.PHONY: help run test bench demo soak proto lint clean prometheus

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 10

run: $(VENV)/.runtime ## serve on $(LISTEN) (default 0.0.0.0:9201) as in production
	$(BIN)/gunicorn -w 1 --threads 8 -b $(LISTEN) $(GUNICORN_ARGS) k8s_exporter:app

test: $(VENV)/.dev prometheus ## run every test, end to end with a real Prometheus
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) test_k8s_exporter.py

bench: $(VENV)/.dev prometheus ## compare ingest, scrape and memory with Prometheus itself
	$(BIN)/python bench_k8s_exporter.py

demo: $(VENV)/.runtime prometheus ## cAdvisor fixture -> prometheus1 -> exporter -> prometheus2, until Ctrl-C
	$(BIN)/python demo_k8s_exporter.py

soak: $(VENV)/.dev ## writers and scrapers against gunicorn for about 60 s
	TEST_K8S_EXPORTER_SOAK_SECONDS=60 $(BIN)/python -m pytest -q -k soak test_k8s_exporter.py

proto: $(VENV)/.dev ## regenerate remote_pb2.py from remote.proto
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. remote.proto

lint: $(VENV)/.dev ## ruff
	$(BIN)/ruff check .

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis __pycache__

$(VENV)/.runtime: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

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
