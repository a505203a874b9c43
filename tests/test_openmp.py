"""The OpenMP wait policy `import focus_detr` sets, and the warning when torch was imported first."""

import logging
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from focus_detr.openmp import WaitPolicyAtImport, spin_warning_message, warn_if_threads_spin

SPINNING = WaitPolicyAtImport(torch_imported_first=True, user_wait_policy=None)


def _import_state(code: str, **env_changes: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    done = subprocess.run([sys.executable, "-c", code], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


REPORT = ("import focus_detr, os; s = focus_detr.WAIT_POLICY_AT_IMPORT; "
          "print(s.torch_imported_first, s.user_wait_policy, s.threads_spin, os.environ['OMP_WAIT_POLICY'])")


def test_import_records_whether_torch_came_first():
    assert _import_state(REPORT) == "False None False PASSIVE"
    assert _import_state("import torch; " + REPORT) == "True None True PASSIVE"
    # A policy the user chose is kept, and then nothing spins by our doing.
    assert _import_state("import torch; " + REPORT, OMP_WAIT_POLICY="ACTIVE") == "True ACTIVE False ACTIVE"


def test_warning_when_threads_spin_on_a_busy_machine(caplog):
    with caplog.at_level(logging.WARNING, logger="focus_detr.openmp"):
        message = warn_if_threads_spin(SPINNING, load_average=1.5, cpu_count=2, torch_threads=2)
    assert "load average 1.5 on 2 CPUs" in message
    assert [r.getMessage() for r in caplog.records] == [f"focus_detr: {message}"]
    assert "Import focus_detr before torch" in message


@pytest.mark.parametrize("state,load,cpus,threads", [
    (SPINNING, 0.1, 2, 2),                                    # idle: spinning costs nothing
    (SPINNING, 3.0, 2, 1),                                    # one thread never waits for a team-mate
    (SPINNING, 10.0, 64, 8),                                  # plenty of free cores
    (WaitPolicyAtImport(False, None), 5.0, 2, 2),             # focus_detr first: PASSIVE took effect
    (WaitPolicyAtImport(True, "PASSIVE"), 5.0, 2, 2),         # the user chose
    (WaitPolicyAtImport(True, "ACTIVE"), 5.0, 2, 2),
])
def test_no_warning_when_spinning_costs_nothing_or_was_chosen(state, load, cpus, threads, caplog):
    with caplog.at_level(logging.WARNING, logger="focus_detr.openmp"):
        assert warn_if_threads_spin(state, load_average=load, cpu_count=cpus, torch_threads=threads) is None
    assert not caplog.records


@given(load=st.floats(0, 64), cpus=st.integers(1, 64), threads=st.integers(1, 64))
def test_warning_iff_threads_exceed_free_cores(load, cpus, threads):
    message = spin_warning_message(SPINNING, load_average=load, cpu_count=cpus, torch_threads=threads)
    assert (message is not None) == (threads > 1 and threads > cpus - load + 1.0)


def test_warning_on_stderr_and_never_an_import_error(tmp_path):
    """Printed on stderr without any logging setup, and `-W error` (a strict test suite) still imports."""
    script = tmp_path / "user_script.py"
    script.write_text("import torch\nimport focus_detr\n")
    # Force the busy-machine branch without a busy machine: a fake os.getloadavg via sitecustomize.
    (tmp_path / "sitecustomize.py").write_text("import os\nos.getloadavg = lambda: (1000.0, 1000.0, 1000.0)\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "2"
    done = subprocess.run([sys.executable, "-W", "error", str(script)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "focus_detr: torch was imported before focus_detr" in done.stderr, done.stderr
