# The README's commands. Each target creates .venv and installs what it needs first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: up test unit e2e lint format schema install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[envoy,test]'
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
	$(VENV)/bin/ruff check extproc tests
	$(VENV)/bin/ruff format --check extproc tests
	$(VENV)/bin/mypy extproc

format: $(STAMP)
	$(VENV)/bin/ruff format extproc tests
	$(VENV)/bin/ruff check --fix extproc tests

schema: $(STAMP)
	$(PY) -m extproc schema > policies/policy.schema.json

clean:
	rm -rf $(VENV) .stack build *.egg-info
