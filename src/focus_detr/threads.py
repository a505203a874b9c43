"""CPU threads that follow the free cores: each forward pass uses at most as many torch threads as there are
cores other processes leave free.

Why: PyTorch's CPU operators split their work evenly over the intra-op threads and end at a barrier. With more
runnable threads than cores (2 torch threads and one busy process on a 2-core machine) one of the threads
shares its core and every parallel operator waits for it: a scheduler slice per operator (about 1.8 ms
measured, ~1200 parallel operators per R50 forward) and the even split runs at the speed of the thread that
gets half a core. On a 2-core AMD EPYC with one busy process (R50 800x1333, benchmarks/RESULTS.md,
"Contention") the focus model took 6.9 s per image with 2 threads and 4.7 s with 1 thread; dense 8.9 s and
7.8 s. The smaller, faster focus model suffers most, since the cost is per operator, not per FLOP.

How: the busy time of the CPUs this process may run on (``/proc/stat``), minus this process's own CPU time,
over the wall time since the previous decision, is the number of cores other work keeps busy. The next
forward then uses ``clamp(round(cpus - busy_elsewhere), 1, requested)`` threads. A window shorter than
``min_window_s`` keeps the previous decision (``/proc/stat`` counts in 10 ms ticks). Where ``/proc/stat`` is
missing (macOS, Windows) the budget is always ``requested``.

Use: ``ThreadBudget(requested=2).attach(model)`` decides before every ``model(...)`` call (a forward
pre-hook); ``with budget.applied():`` does it for one block of code. The ``focus-detr`` commands that run a
model attach one unless ``--fixed-threads`` is given.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

_PROC_STAT = "/proc/stat"


def allowed_cpus() -> list[int]:
    """CPU ids this process may run on (its affinity mask; all CPUs where the platform has none)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def read_busy_seconds(cpus: list[int], path: str = _PROC_STAT) -> float | None:
    """Seconds the given CPUs have spent busy since boot (``/proc/stat``: everything but idle and iowait,
    steal included: time the hypervisor gave to another machine is time this process could not have either).
    None where the file is missing or lacks one of the CPUs."""
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{c}" for c in cpus}
    ticks = 0
    found = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if name not in wanted:
            continue
        fields = [int(v) for v in rest.split()]
        if len(fields) < 4:
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        # guest and guest_nice (fields 8, 9) are already counted in user and nice
        ticks += sum(fields[:8]) - idle
        found += 1
    if found != len(wanted):
        return None
    return ticks / _clock_ticks()


def _clock_ticks() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100.0


def threads_for(free_cores: float, requested: int) -> int:
    """Threads to use when ``free_cores`` cores are free: rounded to the nearest core, at least 1, at most
    ``requested``. A core that other work keeps more than half busy counts as taken."""
    if not math.isfinite(free_cores):
        return requested
    return max(1, min(requested, math.floor(free_cores + 0.5)))


@dataclass
class BudgetDecision:
    """One decision: the threads chosen and the cores other processes kept busy over ``window_s`` before it
    (None: no measurement, ``threads`` is the requested count or the previous decision)."""

    threads: int
    busy_elsewhere: float | None
    window_s: float


class ThreadBudget:
    """At most ``requested`` torch threads (default: ``torch.get_num_threads()`` when created), fewer while
    other processes keep cores busy. See the module docstring.

    ``cpus``: the CPU ids counted (default: this process's affinity). ``busy_reader``, ``own_cpu_time`` and
    ``clock`` replace ``/proc/stat``, this process's CPU time and the
    wall clock (tests).
    """

    def __init__(self, requested: int | None = None, min_window_s: float = 0.25, cpus: list[int] | None = None,
                 busy_reader: Callable[[], float | None] | None = None,
                 own_cpu_time: Callable[[], float] = time.process_time,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if requested is not None and requested < 1:
            raise ValueError(f"requested threads must be >= 1, got {requested}")
        self.requested = requested if requested is not None else torch.get_num_threads()
        self.min_window_s = min_window_s
        cpu_ids = allowed_cpus() if cpus is None else list(cpus)
        self.cpus = len(cpu_ids)
        if busy_reader is None:
            busy_reader = lambda: read_busy_seconds(cpu_ids)  # noqa: E731
        self._busy_reader = busy_reader
        self._own_cpu_time = own_cpu_time
        self._clock = clock
        self.history: list[BudgetDecision] = []
        self._threads = self.requested
        self._mark = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        busy = self._busy_reader()
        if busy is None:
            return None
        return self._clock(), busy, self._own_cpu_time()

    @property
    def available(self) -> bool:
        """Whether the machine's CPU counters can be read here (otherwise the budget is always ``requested``)."""
        return self._mark is not None

    def decide(self) -> int:
        """Threads for the next piece of work, from the busy time measured since the last decision."""
        now = self._sample()
        if now is None or self._mark is None:
            self._mark = now
            self.history.append(BudgetDecision(self._threads, None, 0.0))
            return self._threads
        wall = now[0] - self._mark[0]
        if wall < self.min_window_s:
            self.history.append(BudgetDecision(self._threads, None, wall))
            return self._threads
        own = now[2] - self._mark[2]
        busy_elsewhere = max(0.0, (now[1] - self._mark[1] - own) / wall)
        self._threads = threads_for(self.cpus - busy_elsewhere, self.requested)
        self._mark = now
        self.history.append(BudgetDecision(self._threads, busy_elsewhere, wall))
        return self._threads

    @contextlib.contextmanager
    def applied(self) -> Iterator[int]:
        """Run the block with :meth:`decide`'s thread count, then restore the previous count."""
        previous = torch.get_num_threads()
        threads = self.decide()
        torch.set_num_threads(threads)
        try:
            yield threads
        finally:
            torch.set_num_threads(previous)

    def attach(self, module: torch.nn.Module) -> "torch.utils.hooks.RemovableHandle":
        """Decide and set the thread count before every call of ``module`` (a forward pre-hook; the count
        stays set after the call). Returns the hook's handle (``.remove()`` to stop)."""

        def before_forward(_module: torch.nn.Module, _args: tuple) -> None:
            threads = self.decide()
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)

        return module.register_forward_pre_hook(before_forward)

    def summary(self) -> dict[str, object]:
        """Requested threads and how often each count was used (for reports)."""
        used: dict[int, int] = {}
        for d in self.history:
            used[d.threads] = used.get(d.threads, 0) + 1
        measured = [d.busy_elsewhere for d in self.history if d.busy_elsewhere is not None]
        return {"requested": self.requested, "cpus": self.cpus, "available": self.available,
                "threads_used": dict(sorted(used.items())),
                "busy_elsewhere_last": measured[-1] if measured else None}
