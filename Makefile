# Newcomer commands:  `make demo` (set up + main job)   `make test` (set up + tests)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_TORCH := torch==2.13.0

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_TORCH)
	$(PY) -m pip install -q -e ".[test,viz,onnx]" "$(PIP_TORCH)"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/focus-detr demo --out runs/demo

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
