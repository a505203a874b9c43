"""How PyTorch's OpenMP threads wait, and a warning when they will spin on a busy machine.

OpenMP threads that finish their share of an operator wait for the rest of their team. libgomp (PyTorch's
OpenMP runtime on Linux) lets them spin first, holding a core; when other processes want the cores too, the
spinning thread takes the time slices its own slower team-mate needs, and every parallel operator ends late.
`import focus_detr` therefore sets ``OMP_WAIT_POLICY=PASSIVE`` -- but the runtime reads the variable once,
when torch loads it. A script that imports torch first keeps the spinning policy: R50 at 800x1333, 2 threads,
one other busy process, focus forward 6.8-7.0 s spinning vs 4.6 s passive (benchmarks/RESULTS.md, "Import
order"). On an idle machine spinning costs nothing, so the warning is only given when the machine looks busy.

The warning is a log record (logger ``focus_detr.openmp``, level WARNING, printed on stderr when logging is not
configured), not a Python warning: whether it appears depends on the machine's load at import time, and a
test suite run with ``-W error`` must not fail its ``import focus_detr`` because a CI runner happened to be busy.
Silence it by setting ``OMP_WAIT_POLICY`` or with ``logging.getLogger("focus_detr.openmp").setLevel("ERROR")``.

This module must not import torch at module level: `focus_detr/__init__.py` records, before anything imports
torch, whether torch was already loaded.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WaitPolicyAtImport:
    """What `import focus_detr` found. ``torch_imported_first``: torch was in ``sys.modules`` already, so the
    ``OMP_WAIT_POLICY`` this package sets came too late. ``user_wait_policy``: the value the user exported
    (None when unset; focus_detr then sets PASSIVE)."""

    torch_imported_first: bool
    user_wait_policy: str | None

    @property
    def threads_spin(self) -> bool:
        """True when the OpenMP runtime was loaded without a wait policy, i.e. with spinning waits."""
        return self.torch_imported_first and self.user_wait_policy is None


def record_wait_policy() -> WaitPolicyAtImport:
    """Record the state before this package sets the policy; call before anything imports torch."""
    return WaitPolicyAtImport(torch_imported_first="torch" in sys.modules,
                              user_wait_policy=os.environ.get("OMP_WAIT_POLICY"))


def spin_warning_message(state: WaitPolicyAtImport, *, load_average: float, cpu_count: int,
                         torch_threads: int) -> str | None:
    """The warning to give, or None. Warn only when the threads spin AND fewer cores look free than torch
    uses threads (``load_average`` is the 1-minute run-queue length; spinning costs nothing when every thread
    has a core of its own)."""
    if not state.threads_spin or torch_threads <= 1:
        return None
    free_cores = cpu_count - load_average
    if torch_threads <= free_cores + 1.0:  # our own importing thread is part of the load average
        return None
    return (f"torch was imported before focus_detr with OMP_WAIT_POLICY unset, so its {torch_threads} OpenMP "
            f"threads spin while they wait, and this machine looks busy (load average {load_average:.1f} on "
            f"{cpu_count} CPUs): forwards can be about 1.5x slower than with passive waiting (R50 800x1333, 2 "
            "threads, one busy process: 6.9 s vs 4.6 s). Import focus_detr before torch, or export "
            "OMP_WAIT_POLICY=PASSIVE before starting Python (OMP_WAIT_POLICY=ACTIVE keeps spinning and silences "
            "this warning).")


def warn_if_threads_spin(state: WaitPolicyAtImport, *, load_average: float | None = None,
                         cpu_count: int | None = None, torch_threads: int | None = None) -> str | None:
    """Log the warning when `spin_warning_message` says so; returns the message (None: no warning).
    Arguments left None are read from this machine and the loaded torch."""
    if not state.threads_spin:
        return None
    if load_average is None:
        try:
            load_average = os.getloadavg()[0]
        except OSError:  # not available on this platform: no basis for a warning
            return None
    if cpu_count is None:
        cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch_threads is None:
        import torch

        torch_threads = torch.get_num_threads()
    message = spin_warning_message(state, load_average=load_average, cpu_count=cpu_count,
                                   torch_threads=torch_threads)
    if message is not None:
        logger.warning("focus_detr: %s", message)
    return message
