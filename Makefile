# Targets named in the README. Each sets up .venv by itself on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
OUT ?= runs/demo

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch from the CPU wheel unless a torch is already there (a bare `pip install torch` pulls CUDA)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/mak demo --out $(OUT)

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/bench_select.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
