# Newcomer commands:  `make demo` (set up + main job)   `make test` (set up + tests)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_TORCH := torch==2.13.0

.PHONY: setup demo test bench browser clean

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

# Chromium and its driver from the system packages, for the app's browser test (tests/test_app.py); nothing to
# do when both are there. Needs root (or sudo) and apt; .ci/run calls it on a fresh machine.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	else SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing chromium and chromium-driver (apt)"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    chromium chromium-driver >/dev/null; fi

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
