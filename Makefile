# SafeMed workbook. Two commands do everything on a fresh machine:
#   make reproduce   every notebook, embedded default (tiny profile), offline, CPU
#   make test        unit tests + every notebook under nbval with the smoke profile, on both cores
#   make unit        the fast tier: unit tests without notebooks, browser or slow tests
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= tiny
ARGS ?=
# pytest-xdist processes (one per core)
WORKERS ?= 2
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install reproduce test unit nbval browser-deps lab bench clean-runs

# torch is installed first and pinned through constraints.txt: pip then takes the CPU wheel that
# lies on disk instead of several GB of CUDA packages. torchvision is never installed.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name safemed --display-name "SafeMed workbook (.venv)" >/dev/null
	@touch $(STAMP)

install: $(STAMP)

reproduce: $(STAMP)
	$(PY) -m safemed_lib.reproduce --profile $(PROFILE) $(ARGS)

# Debian's Chromium for the real-browser test of the attack visualizer (no browser download).
browser-deps:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

test: export SAFEMED_OUTPUT_DIR := runs/nbval/outputs
test: $(STAMP) browser-deps
	rm -rf runs/nbval
	$(PY) -m safemed_lib.reproduce --profile smoke --prepare-only --out runs/nbval
	$(PY) -m pytest tests runs/nbval --nbval-lax --nbval-cell-timeout=900 -p no:cacheprovider -q -rs \
		-n $(WORKERS) --dist loadfile $(ARGS)

unit: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider -rs -m "not notebooks and not browser and not slow" \
		-n $(WORKERS) $(ARGS)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=.

bench: $(STAMP)
	$(PY) benchmarks/run.py $(ARGS)

clean-runs:
	rm -rf runs
