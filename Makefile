# Two commands do all the set-up on a fresh machine:
#   make main   -- trains, evaluates and exports on the embedded default data (CPU, ~20 min)
#   make test   -- the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build, so nothing later pulls a CUDA wheel.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=20 tests

main: $(VENV)/.installed
	$(VENV)/bin/btoks main --workdir runs/main

.PHONY: install test main
