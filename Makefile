# sparseserve — developer entry points. Everything runs inside .venv, which
# `make` builds on first use from pyproject.toml (Python 3.11, pip only).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_REPOSITORY ?= demo-models

.PHONY: help venv prometheus demo report-screenshot minilm bench-minilm test test-fast protos check-protos helm-schema lint bench clean

help:
	@echo "make demo    build demo models + sparse variants, serve them, query them, compare"
	@echo "make report-screenshot  compare digits-mlp on the demo models, screenshot report.html (headless Chromium)"
	@echo "make minilm  build the minilm family (real all-MiniLM-L6-v2; slow: ~10-40 min on CPU)"
	@echo "make bench-minilm  latency, size and fidelity of the minilm variants (after make minilm)"
	@echo "make test    the whole test suite"
	@echo "make bench   server overhead benchmark (writes bench/results/)"
	@echo "make protos  regenerate the gRPC stubs from protos/"
	@echo "make lint    ruff (the generated stubs are checked by a test)"
	@echo "make helm-schema  regenerate the chart's settings schema from the server's settings"

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 (CPU) comes from the machine's wheel cache; see pyproject.toml.
	$(BIN)/pip install --quiet -e ".[dev,sparsify,compare]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m sparseserve.demo --repository $(DEMO_REPOSITORY)

# A person's view of a compare report: a comparison of one demo family (the demo models
# are built first if missing), then report.html in headless Chromium ->
# $(REPORT)/report-screenshot.png. Needs a Chromium on PATH (Debian: apt-get install chromium).
REPORT_FAMILY ?= digits-mlp
REPORT ?= compare-report
report-screenshot: $(STAMP)
	@test -n "$$(ls $(DEMO_REPOSITORY)/*/sparseserve.yaml 2>/dev/null)" || \
		$(BIN)/python -m sparseserve.sparsify.demo_models --repository $(DEMO_REPOSITORY)
	$(BIN)/sparseserve compare --family $(REPORT_FAMILY) --repository $(DEMO_REPOSITORY) \
		--output $(REPORT) --duration 10 --rounds 5 --no-progress
	$(BIN)/python -m sparseserve.compare.screenshot $(REPORT)

# Slow and optional: distils a pruned MiniLM on the CPU. See docs/minilm.md.
MINILM_REPOSITORY ?= minilm-models
minilm: $(STAMP)
	$(BIN)/sparseserve sparsify --recipe recipes/minilm.yaml --repository $(MINILM_REPOSITORY)

bench-minilm: $(STAMP)
	$(BIN)/python bench/minilm.py --repository $(MINILM_REPOSITORY)

# The monitoring tests run a real Prometheus (Debian's package: prometheus + promtool).
# Installed when missing and we are root; a no-op when present. Without it (and not
# root) those tests skip, unless SPARSESERVE_REQUIRE_PROMETHEUS=1 (as in .ci/run).
prometheus:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's prometheus (for the monitoring tests) ..."; \
		DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends prometheus >/dev/null \
		|| { apt-get -o DPkg::Lock::Timeout=300 update -qq && \
		     DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends prometheus >/dev/null; }; \
	else echo "prometheus not installed and not root: the real-Prometheus tests will skip"; fi

test: $(STAMP) prometheus
	$(BIN)/python -m pytest

test-fast: $(STAMP) prometheus
	$(BIN)/python -m pytest -m "not slow"

# Stubs are generated into the package and committed: the Open Inference Protocol in
# sparseserve/protocol, sparseserve's own API in sparseserve/api. The sed moves them into
# sparseserve's private descriptor pool: tritonclient registers the same
# `inference.*` names in protobuf's default pool, and both must coexist in one
# process (tests, and the Triton backend which is a tritonclient user).
PROTO_SRC := protos
PROTO_OUT := service
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I$(PROTO_SRC) \
		--python_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
		$(PROTO_SRC)/sparseserve/protocol/*.proto $(PROTO_SRC)/sparseserve/api/*.proto
	sed -i 's/^from google.protobuf import descriptor_pool as _descriptor_pool$$/from sparseserve.protocol._pool import POOL as _POOL/; s/_descriptor_pool.Default()/_POOL/' \
		$(PROTO_OUT)/sparseserve/protocol/*_pb2.py $(PROTO_OUT)/sparseserve/api/*_pb2.py

check-protos: protos
	git diff --exit-code -- $(PROTO_OUT)/sparseserve/protocol $(PROTO_OUT)/sparseserve/api

# The `config` part of the chart's values.schema.json is generated from the server's
# Settings (a test checks it is current).
helm-schema: $(STAMP)
	$(BIN)/python -m sparseserve.settings_schema helm/sparseserve/values.schema.json

lint: $(STAMP)
	$(BIN)/ruff check service tests bench
	$(BIN)/ruff format --check service tests bench

bench: $(STAMP)
	$(BIN)/python bench/server_overhead.py

clean:
	rm -rf $(VENV) $(DEMO_REPOSITORY) $(DEMO_REPOSITORY)-report $(REPORT) compare-report $(MINILM_REPOSITORY) .pytest_cache
