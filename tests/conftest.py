"""Shared fixtures, and how the suite runs in parallel.

``make test`` runs the suite with pytest-xdist (``-n auto --dist loadgroup``: one worker per core, at most
4). Three rules keep that fast and the tests independent:

* CPU threads: with N workers on C cores each worker (and every process it starts, through
  ``OMP_NUM_THREADS``) gets C // N torch threads, so the workers do not fight over the cores. A test that
  changes torch's thread count gets it back afterwards (a module's fixtures: after the module).
* One worker per file with shared artefacts: the tests of a file that defines module- or class-scoped
  fixtures (a trained run, an exported ONNX file, a dataset) run on one worker, one after another, so each
  such fixture is built once.
* Timing-sensitive process tests (signals, SIGKILL crash safety, DDP ranks, Ctrl-C) run one after another on
  one worker (TIMING_SENSITIVE), never two of them at once.

The units are formed by this file's scheduler (pytest_xdist_make_scheduler) from the node ids alone.
Work units start longest first (EXPECTED_SECONDS) so that no long unit starts last and leaves one worker
idle at the end. Without xdist (``pytest tests/test_x.py``) none of this changes anything but the thread
restore.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import pytest
import torch


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _threads_per_worker() -> int | None:
    """Torch threads for each xdist worker, None when not running under xdist."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if not os.environ.get("PYTEST_XDIST_WORKER") or workers < 1:
        return None
    return max(1, _cores() // workers)


WORKER_THREADS = _threads_per_worker()
if WORKER_THREADS is not None:
    torch.set_num_threads(WORKER_THREADS)
    # Inherited by the command-line processes the tests start (torch reads it at start-up). A value the
    # caller set is kept.
    os.environ.setdefault("OMP_NUM_THREADS", str(WORKER_THREADS))

# Test files whose tests time or signal real processes: they run one after another on one worker.
TIMING_SENSITIVE = {"test_signals.py", "test_crash_safety.py", "test_ddp.py", "test_reliability.py"}

# Rough seconds of the longest work units on a quiet 2-core machine (from per-test CPU times): a group
# ("timing_sensitive", or the name of a file that is one unit) or a single test ("file::test", parameters
# left out). Only the order in which units start depends on it: the longest first, so that no long unit
# starts last and leaves the other workers idle; units not listed keep their collection order after these.
EXPECTED_SECONDS: dict[str, float] = {
    "timing_sensitive": 170, "test_parity": 130, "test_onnx": 85, "test_run_folder": 80, "test_cli_train": 70,
    "test_cli_predict": 40, "test_cli_tools": 40, "test_weights_kinds": 20, "test_inputs": 20, "test_bench": 20,
    "test_evaluation": 20, "test_hostile_inputs": 15, "test_data_layouts": 15,
    "test_weights_download.py::test_official_zip_from_the_parity_fixture": 22,
    "test_compare_modes.py::test_compare_modes_end_to_end": 16,
    "test_overfit.py::test_tiny_model_overfits_four_images": 16,
}


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: on a 2-core machine shared with other work, OpenMP threads spinning against each
    other make small training runs many times slower (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads_after_module():
    """A module fixture that sets torch's threads (e.g. to run as the official code did) must not change
    them for the modules that run after it on the same worker."""
    previous = torch.get_num_threads()
    yield
    if torch.get_num_threads() != previous:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The same for a test (an in-process ``main([..., "--threads", "1"])`` sets them for the process)."""
    previous = torch.get_num_threads()
    yield
    if torch.get_num_threads() != previous:
        torch.set_num_threads(previous)


_SHARED_FIXTURE = re.compile(r"@pytest\.fixture\([^)]*scope=[\"'](module|class|package)[\"']")


@functools.lru_cache(maxsize=None)
def _file_shares_artefacts(path: str) -> bool:
    """Whether a test file defines a module-, class- or package-scoped fixture."""
    try:
        return _SHARED_FIXTURE.search(Path(path).read_text(encoding="utf-8")) is not None
    except OSError:
        return False


def work_unit(nodeid: str, rootdir: Path) -> str:
    """The unit of work a test belongs to: the tests of one unit run on one worker, one after another.

    An explicit ``xdist_group`` suffix (``...@name``) wins; then the TIMING_SENSITIVE files share one unit;
    a file with module/class-scoped fixtures is one unit; any other test is a unit of its own."""
    if nodeid.rfind("@") > nodeid.rfind("]"):
        return nodeid.rsplit("@", 1)[-1]
    file = nodeid.split("::", 1)[0]
    name = Path(file).name
    if name in TIMING_SENSITIVE:
        return "timing_sensitive"
    if _file_shares_artefacts(str(rootdir / file)):
        return name.removesuffix(".py")
    return nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadgroup`` with the units of :func:`work_unit`. xdist's own grouping (an ``xdist_group`` mark
    appended to the node id on the workers) has no effect with pytest 9, which no longer reads ``_nodeid``;
    this scheduler needs only the node ids that the workers report."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    rootdir = Path(config.rootpath)

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid, rootdir)

    return WorkUnitScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On xdist workers: the longest units first (EXPECTED_SECONDS), the others in collection order. The
    scheduler hands units out in the order the workers collected them."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rootdir = Path(config.rootpath)
    unit_of = {item.nodeid: work_unit(item.nodeid, rootdir) for item in items}
    seconds: dict[str, float] = {}
    for item in items:
        unit = unit_of[item.nodeid]
        key = unit if unit != item.nodeid else f"{item.path.name}::{item.name.split('[')[0]}"
        seconds[unit] = max(seconds.get(unit, 0.0), EXPECTED_SECONDS.get(key, 0.0))
    items.sort(key=lambda item: -seconds[unit_of[item.nodeid]])  # stable: ties keep the collection order
