# Two entry points: `make demo` (the toy profile end to end) and `make test`.
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
PYTHON ?= python3

# Offline and quiet: no telemetry from DVC, MLflow or Prefect.
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
# Bytecode caching more than halves the import time of every stage process.
unexport PYTHONDONTWRITEBYTECODE
export PATH := $(BIN):$(PATH)

.PHONY: demo test test-slow test-ui test-faults test-cluster install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test,cluster]'
	touch $@

demo: install
	distillery validate
	distillery repro
	@cat reports/results.md

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

# End to end on the micro project: the Prefect flow beside dvc repro, the few-step study added to a built project.
test-slow: install
	$(BIN)/python -m pytest -m slow

# The UIs: Prefect and MLflow in Chromium against real servers and a micro flow, `distillery ui` stopping both
# servers, the offline `dvc plots` page (minutes; Debian's chromium).
test-ui: install
	$(BIN)/python -m pytest -m ui

# Faults injected into real stage processes of a micro project (kills, corrupted checkpoints, malicious files,
# blown-up learning rates, a tracking server that dies, concurrent drivers, a full disk); ends with the count.
test-faults: install
	$(BIN)/python -m pytest -m faults

# Beyond one machine: PostgreSQL, SeaweedFS (S3), the Prefect and MLflow servers on 127.0.0.1, two workers in their
# own clones running the micro DAG from a work pool (one killed mid-distill), stages under torchrun (Debian's postgresql).
test-cluster: install
	$(BIN)/python -m pytest -m cluster

clean:
	rm -rf $(VENV) checkpoints mlflow.db mlruns
