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

# In parallel (pytest-xdist): one worker per core, at most 4; tests/conftest.py gives each worker its share of
# the cores and keeps modules with shared fixtures and the timing-sensitive process tests on one worker each.
# TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= auto
test: setup
	-@$(MAKE) --no-print-directory browser || echo "note: Chromium could not be installed; the app's browser test is skipped (CI=true fails it)"
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadgroup --no-loadscope-reorder --durations=25 tests

# Chromium and its driver from the system packages, for the app's browser test (tests/app/test_app.py); nothing to
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
