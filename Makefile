# imgtocap: `make setup` once, then `make test` (or `make test-fast` while working); `make demo`
# trains (if needed) and serves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every package .venv holds, pinned: requirements/*.txt pin what the project imports, this file
# pins their dependencies too (mlflow's and dvc's would drift otherwise). `make lock` writes it.
LOCK := requirements/constraints.txt

# No telemetry from any tool, in every target.
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
# Spinning OpenMP threads stall badly when another process holds a core (TorchServe workers).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup test test-fast lint format lock docs plots-template clean ui

include serve/serve.mk

setup: $(VENV)/.installed

$(VENV)/.installed: requirements/serve.txt requirements/train.txt requirements/dev.txt $(LOCK) setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --constraint $(LOCK) --upgrade pip
	$(BIN)/pip install --constraint $(LOCK) --requirement requirements/dev.txt
	$(BIN)/pip install --no-deps -e .
	touch $@

## lock: after editing a pin in requirements/: install the pins into .venv, then write $(LOCK)
# Installs without the old lock (it would refuse the new pin). Packages already installed stay
# as they are wherever they satisfy the pins, so the lock changes only where the edit needs it;
# `rm -rf .venv && make lock` re-resolves everything to the newest versions the pins allow.
lock:
	test -x $(BIN)/pip || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --requirement requirements/dev.txt
	{ echo '# Written by `make lock` (pip freeze of .venv): every package, dependencies included.'; \
	  echo '# `make setup` and the Dockerfile install within it. Edit requirements/*.txt, not this.'; \
	  $(BIN)/pip freeze --all --exclude-editable --exclude imgtocap; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

## ui: mlflow ui on the runs' store, on the first free port from UI_PORT (default 5050; the demo page has 5000)
ui: setup
	$(BIN)/python -m training.tracking.ui

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# the whole suite; the 25 slowest tests at the end (CI's log shows what makes it slow)
test: lint
	$(BIN)/pytest --durations=25

## test-fast: lint + the tests that start nothing heavy, under a minute on 2 cores: no pipeline,
# no TorchServe, no JVM (METEOR), browser, nginx, kubectl or child Python (markers: pyproject.toml)
test-fast: lint
	$(BIN)/pytest -m "not (slow or java or browser or nginx or kubectl or subprocess)" --durations=10

## docs: the docs site (docs/, mkdocs.yml) into site/; --strict: a dead link or a page not in nav fails
# (NO_MKDOCS_2_WARNING: Material's banner about MkDocs 2.0, not a warning about these pages)
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

## plots-template: re-vendor vega, vega-lite and vega-embed from npm into docs/plots/offline.html
# (needs npm; the result is committed, so `dvc plots show` and CI work offline without it)
plots-template:
	$(PYTHON) docs/plots/vendor.py

clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info
