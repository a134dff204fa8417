# Two commands do everything on a fresh machine: `make demo` and `make test` (`make lint`: ruff).
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml .ci/requirements.txt
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r .ci/requirements.txt     # the pins, in one place
	$(VPY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# -n auto: one pytest-xdist worker per core (the interpreter is CPU-bound; half the time on 2 cores)
test: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -x -n auto -m "not gpu" tests

# ruff over the whole repository (rules: pyproject.toml [tool.ruff]); lint only, no `ruff format`
lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m specssm demo

# On a GPU machine (the device): the whole suite on real hardware, on that machine's Python (its torch
# is built for its CUDA; GPU_PY=... to pick another), after checking its versions against pyproject.toml.
GPU_PY ?= python3
gpu-test:
	$(GPU_PY) scripts/check_versions.py
	$(GPU_PY) -m pytest -q -m gpu tests

.PHONY: setup test lint demo gpu-test
