# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "torch==2.13.0" "triton==3.6.0" "numpy<2.4" pytest matplotlib
	$(VPY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -x -m "not gpu" tests

demo: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m specssm demo

# On a GPU machine (the device): the whole suite on real hardware.
gpu-test:
	$(PY) -m pytest -q -m gpu tests

.PHONY: setup test demo gpu-test
