# imgtocap: `make setup` once, then `make test`; `make demo` trains (if needed) and serves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# No telemetry from any tool, in every target.
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
# Spinning OpenMP threads stall badly when another process holds a core (TorchServe workers).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup test lint format clean

include serve/serve.mk

setup: $(VENV)/.installed

$(VENV)/.installed: requirements/serve.txt requirements/train.txt requirements/dev.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -r requirements/dev.txt
	$(BIN)/pip install --no-deps -e .
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/pytest

clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info
