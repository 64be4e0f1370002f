# The README's commands. Each target creates .venv and installs what it needs first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: up test unit e2e lint format schema eval compose-config install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[envoy,test]'
	@# xds-protos ships an older copy of OpenTelemetry's protos at the same paths as
	@# opentelemetry-proto; whichever installs last wins, and the OTLP exporter needs its own.
	$(PY) -m pip install --quiet --force-reinstall --no-deps \
		"opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	touch $(STAMP)

install: $(STAMP)

## make up: Envoy :10000, service :50051 (+ :9464 health/metrics), mock LLM :8099
up: $(STAMP)
	$(PY) -m extproc up --policy policies/example.yaml

## make test: lint, type-check, unit and end-to-end tests (real Envoy, real SDKs)
test: $(STAMP) lint
	$(PY) -m pytest -q

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

e2e: $(STAMP)
	$(PY) -m pytest -q tests/e2e

lint: $(STAMP)
	$(VENV)/bin/ruff check extproc tests deploy bench
	$(VENV)/bin/ruff format --check extproc tests deploy bench
	$(VENV)/bin/mypy extproc

format: $(STAMP)
	$(VENV)/bin/ruff format extproc tests deploy bench
	$(VENV)/bin/ruff check --fix extproc tests deploy bench

## make eval: guardrail precision/recall, injection TPR/FPR on ../shared/data
eval: $(STAMP)
	$(PY) -m extproc eval

## make compose-config: regenerate deploy/compose/envoy.yaml from envoy/gateway.yaml
compose-config: $(STAMP)
	$(PY) deploy/compose/render_envoy.py

schema: $(STAMP)
	$(PY) -m extproc schema > policies/policy.schema.json

clean:
	rm -rf $(VENV) .stack build *.egg-info

## make bench: the benchmark harness (bench/README.md); results go to bench/results/.
## BENCH_ARGS=--quick for a few seconds per step, --only 0,1,5 for some scenarios.
BENCH_VENV := bench/.venv-litellm
BENCH_ARGS ?=
.PHONY: bench bench-peers bench-tools

bench-tools: $(STAMP)
	$(PY) -m pip install --quiet -r bench/requirements.txt
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk >/dev/null) \
		|| { echo "bench needs wrk: apt-get install -y wrk"; exit 1; }

bench: $(STAMP) bench-tools
	$(PY) -m bench.run $(BENCH_ARGS)

## make bench-peers: the same run plus LiteLLM proxy, installed into bench/.venv-litellm.
bench-peers: $(STAMP) bench-tools
	@test -x $(BENCH_VENV)/bin/litellm || ( $(PYTHON) -m venv $(BENCH_VENV) \
		&& $(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip \
		&& $(BENCH_VENV)/bin/python -m pip install --quiet -r bench/requirements-litellm.txt )
	$(PY) -m bench.run --peers $(BENCH_ARGS)
