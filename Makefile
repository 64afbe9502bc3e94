# sparseserve — developer entry points. Everything runs inside .venv, which
# `make` builds on first use from pyproject.toml (Python 3.11, pip only).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# One stamp per set of extras: `make demo` installs only [demo]; `make test` (after it,
# or alone) adds what the tests need.
DEMO_STAMP := $(VENV)/.installed-demo
DEV_STAMP  := $(VENV)/.installed-dev
# torch's CPU wheels come from PyTorch's own index, consulted beside pip's configured
# sources: PyPI's torch for Linux pulls several GB of CUDA libraries, and the CPU build
# (2.13.0+cpu) outranks it. Where that index cannot be reached (a closed network with a
# mirror or wheel directory that holds the CPU build), --retries 0 gives up on it at once
# instead of spending minutes on retries. Empty (TORCH_INDEX=): pip's sources only.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH := torch==2.13.0
DEMO_REPOSITORY ?= models

.PHONY: help venv prometheus browser corpus-text demo report-screenshot minilm bench-minilm bench-engines test test-fast protos check-protos helm-schema lint typecheck bench clean clean-models

help:
	@echo "make demo    build the digits models + sparse variants into ./models, serve, query, compare"
	@echo "make report-screenshot  compare digits-mlp on the demo models, screenshot report.html (headless Chromium)"
	@echo "make minilm  build the minilm family (real all-MiniLM-L6-v2; slow: 38 min on 2 idle AVX2 cores)"
	@echo "make corpus-text  install Debian's fortunes (everyday English for the minilm corpus; root)"
	@echo "make bench-minilm  latency, size and fidelity of the minilm variants (after make minilm)"
	@echo "make bench-engines onnxruntime vs OpenVINO on the minilm variants and two MLPs"
	@echo "make test    the whole test suite"
	@echo "make bench   server overhead benchmark (writes bench/results/)"
	@echo "make protos  regenerate the gRPC stubs from protos/"
	@echo "make lint    ruff check + ruff format --check (the generated stubs are checked by a test); CI runs it"
	@echo "make typecheck  mypy --strict on service/sparseserve (docs/typing.md); CI runs it"
	@echo "make helm-schema  regenerate the chart's settings schema from the server's settings"

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, from the CPU index, so that the extras below find it installed.
define install_torch
	@echo "installing $(TORCH) (the CPU build, about 200 MB; the first time takes a minute or more) ..."
	$(BIN)/pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--retries 0 --extra-index-url $(TORCH_INDEX))
endef

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(install_torch)
	@echo "installing sparseserve and what the demo needs into $(VENV) ..."
	$(BIN)/pip install --quiet -e ".[demo]"
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(install_torch)
	@echo "installing sparseserve and its test, deploy-check and benchmark tools into $(VENV) ..."
	$(BIN)/pip install --quiet -e ".[dev,sparsify,compare]"
	touch $@

venv: $(DEV_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python -m sparseserve.demo --repository $(DEMO_REPOSITORY)

# A person's view of a compare report: a comparison of one demo family (the demo models
# are built first if missing), then report.html in headless Chromium ->
# $(REPORT)/report-screenshot.png. Needs a Chromium on PATH (Debian: apt-get install chromium).
REPORT_FAMILY ?= digits-mlp
REPORT ?= compare-report
report-screenshot: $(DEMO_STAMP)
	@test -n "$$(ls $(DEMO_REPOSITORY)/*/sparseserve.yaml 2>/dev/null)" || \
		$(BIN)/python -m sparseserve.sparsify.demo_models --repository $(DEMO_REPOSITORY)
	$(BIN)/sparseserve compare --family $(REPORT_FAMILY) --repository $(DEMO_REPOSITORY) \
		--output $(REPORT) --duration 10 --rounds 5 --no-progress
	$(BIN)/python -m sparseserve.compare.screenshot $(REPORT)

# Slow and optional: distils a pruned MiniLM on the CPU. See docs/minilm.md.
MINILM_REPOSITORY ?= minilm-models
minilm: $(DEV_STAMP) corpus-text
	$(BIN)/sparseserve sparsify --recipe recipes/minilm.yaml --repository $(MINILM_REPOSITORY)

bench-minilm: $(DEV_STAMP)
	$(BIN)/python -m bench.minilm --repository $(MINILM_REPOSITORY)

bench-engines: $(DEV_STAMP)
	$(BIN)/python -m bench.engines --repository $(MINILM_REPOSITORY)

# apt-get install of Debian packages (quiet, no recommends; the lists refreshed once if
# the first try fails): what corpus-text, prometheus and browser run as root.
APT := DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300
apt_install = $(APT) install -y -qq --no-install-recommends $(1) >/dev/null \
	|| { $(APT) update -qq && $(APT) install -y -qq --no-install-recommends $(1) >/dev/null; }

# Everyday English for the minilm corpus (sparsify/corpus.py): Debian's fortune
# quotations (package `fortunes`, data files only, under /usr/share/games/fortunes).
# Installed when missing and we are root; without them the corpus has no fortunes
# and says so in its source line.
corpus-text:
	@if [ -e /usr/share/games/fortunes/fortunes ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's fortunes (everyday English for the minilm corpus) ..."; \
		$(call apt_install,fortunes); \
	else echo "fortunes not installed and not root: the minilm corpus goes without them"; fi

# The monitoring tests run a real Prometheus (Debian's package: prometheus + promtool).
# Installed when missing and we are root; a no-op when present. Without it (and not
# root) those tests skip, unless SPARSESERVE_REQUIRE_PROMETHEUS=1 (as in .ci/run).
prometheus:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's prometheus (for the monitoring tests) ..."; \
		$(call apt_install,prometheus); \
	else echo "prometheus not installed and not root: the real-Prometheus tests will skip"; fi

# The report-screenshot test renders report.html in a headless Chromium (Debian's
# package). Installed when missing and we are root; without it (and not root) that test
# skips, unless SPARSESERVE_REQUIRE_BROWSER=1 (as in .ci/run).
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
		|| command -v google-chrome >/dev/null || command -v chrome >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium (for the report-screenshot test) ..."; \
		$(call apt_install,chromium); \
	else echo "no Chromium and not root: the report-screenshot test will skip"; fi

test: $(DEV_STAMP) prometheus browser
	$(BIN)/python -m pytest

test-fast: $(DEV_STAMP) prometheus browser
	$(BIN)/python -m pytest -m "not slow"

# Stubs are generated into the package and committed: the Open Inference Protocol in
# sparseserve/protocol, sparseserve's own API in sparseserve/api. The sed moves them into
# sparseserve's private descriptor pool: tritonclient registers the same
# `inference.*` names in protobuf's default pool, and both must coexist in one
# process (tests, and the Triton backend which is a tritonclient user).
PROTO_SRC := protos
PROTO_OUT := service
protos: $(DEV_STAMP)
	$(BIN)/python -m grpc_tools.protoc -I$(PROTO_SRC) \
		--python_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
		$(PROTO_SRC)/sparseserve/protocol/*.proto $(PROTO_SRC)/sparseserve/api/*.proto
	sed -i 's/^from google.protobuf import descriptor_pool as _descriptor_pool$$/from sparseserve.protocol._pool import POOL as _POOL/; s/_descriptor_pool.Default()/_POOL/' \
		$(PROTO_OUT)/sparseserve/protocol/*_pb2.py $(PROTO_OUT)/sparseserve/api/*_pb2.py

check-protos: protos
	git diff --exit-code -- $(PROTO_OUT)/sparseserve/protocol $(PROTO_OUT)/sparseserve/api

# The `config` part of the chart's values.schema.json is generated from the server's
# Settings (a test checks it is current).
helm-schema: $(DEV_STAMP)
	$(BIN)/python -m sparseserve.settings_schema helm/sparseserve/values.schema.json

# .ci/run runs this before `make test`: a lint or format failure fails CI.
lint: $(DEV_STAMP)
	$(BIN)/ruff check service tests bench
	$(BIN)/ruff format --check service tests bench

# mypy, strict, on the sparseserve package (configured in pyproject.toml; docs/typing.md).
# .ci/run runs it after `make lint` and before `make test`: a type error fails CI.
typecheck: $(DEV_STAMP)
	$(BIN)/mypy

# The benchmarks are the `bench` package: run from the repository root.
bench: $(DEV_STAMP)
	$(BIN)/python -m bench.server_overhead

# The model repositories stay: ./models may hold your own models beside the demo's.
clean:
	rm -rf $(VENV) $(DEMO_REPOSITORY)-report $(DEMO_REPOSITORY)-triton $(REPORT) compare-report .pytest_cache .mypy_cache

# The demo's and minilm's repositories too.
clean-models:
	rm -rf $(DEMO_REPOSITORY) $(MINILM_REPOSITORY)
