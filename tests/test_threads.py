"""The thread budget (focus_detr.threads): fewer torch threads while other processes keep cores busy.

The arithmetic is checked with fake counters (busy seconds of the machine, this process's CPU time, a clock),
the /proc/stat parsing on a written file, and the measurement itself on this machine with a busy process
pinned to one core."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from focus_detr.threads import ThreadBudget, allowed_cpus, read_busy_seconds, threads_for


class FakeMachine:
    """Counters advanced by hand: ``run(wall, busy_elsewhere, own)`` = ``wall`` seconds pass while other
    processes keep ``busy_elsewhere`` cores busy and this process uses ``own`` cores."""

    def __init__(self, cpus: int = 2, readable: bool = True) -> None:
        self.cpus, self.readable = cpus, readable
        self.now = self.busy = self.own = 0.0

    def run(self, wall: float, busy_elsewhere: float, own: float) -> None:
        self.now += wall
        self.busy += wall * min(self.cpus, busy_elsewhere + own)
        self.own += wall * own

    def budget(self, requested: int, min_window_s: float = 0.25) -> ThreadBudget:
        return ThreadBudget(requested, min_window_s, cpus=list(range(self.cpus)),
                            busy_reader=lambda: self.busy if self.readable else None,
                            own_cpu_time=lambda: self.own, clock=lambda: self.now)


@given(st.floats(-4, 64, allow_nan=False), st.integers(1, 32))
def test_threads_for_stays_between_one_and_requested(free: float, requested: int) -> None:
    n = threads_for(free, requested)
    assert 1 <= n <= requested
    assert n <= max(1, round(free) + 1)
    assert threads_for(free + 1, requested) >= n  # more free cores never means fewer threads


def test_threads_for_rounds_to_the_nearest_core() -> None:
    assert threads_for(2.0, 2) == 2
    assert threads_for(1.6, 2) == 2  # other work takes under half a core: keep both threads
    assert threads_for(1.33, 2) == 1  # 2 threads + 1 busy process share 2 cores: each gets 2/3
    assert threads_for(1.0, 2) == 1
    assert threads_for(0.0, 2) == 1
    assert threads_for(float("nan"), 3) == 3


def test_quiet_machine_keeps_the_requested_threads() -> None:
    m = FakeMachine(cpus=2)
    b = m.budget(2)
    for _ in range(3):
        m.run(2.0, busy_elsewhere=0.05, own=1.9)  # our own two threads are not "other work"
        assert b.decide() == 2
    assert b.history[-1].busy_elsewhere == pytest.approx(0.05)


def test_a_busy_core_lowers_the_threads_and_a_freed_one_raises_them() -> None:
    m = FakeMachine(cpus=2)
    b = m.budget(2)
    m.run(3.0, busy_elsewhere=0.67, own=1.33)  # contended: the other process gets its share of the 2 cores
    assert b.decide() == 1
    m.run(3.0, busy_elsewhere=1.0, own=1.0)
    assert b.decide() == 1
    m.run(3.0, busy_elsewhere=0.0, own=1.0)  # the other process ended
    assert b.decide() == 2
    assert b.summary()["threads_used"] == {1: 2, 2: 1}


def test_a_short_window_keeps_the_previous_decision() -> None:
    m = FakeMachine(cpus=2)
    b = m.budget(2, min_window_s=0.5)
    m.run(1.0, busy_elsewhere=1.0, own=1.0)
    assert b.decide() == 1
    m.run(0.1, busy_elsewhere=0.0, own=1.0)  # 10 ms ticks: too short to tell
    assert b.decide() == 1
    assert b.history[-1].busy_elsewhere is None
    m.run(0.5, busy_elsewhere=0.0, own=1.0)  # measured from the last decision that measured: 0.6 s
    assert b.decide() == 2


def test_without_cpu_counters_the_budget_is_the_requested_count() -> None:
    m = FakeMachine(cpus=2, readable=False)
    b = m.budget(3)
    assert not b.available
    m.run(5.0, busy_elsewhere=2.0, own=0.0)
    assert b.decide() == 3


def test_many_cores_and_one_busy_process_change_nothing() -> None:
    m = FakeMachine(cpus=16)
    b = m.budget(8)
    m.run(2.0, busy_elsewhere=1.0, own=8.0)
    assert b.decide() == 8


def test_requested_must_be_positive() -> None:
    with pytest.raises(ValueError, match="requested threads"):
        ThreadBudget(0)


def test_read_busy_seconds_parses_proc_stat(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  300 0 100 900 50 0 0 0 0 0\n"
                    "cpu0 100 0 50 400 20 0 0 10 5 0\n"
                    "cpu1 200 0 50 500 30 5 5 0 0 0\n"
                    "intr 12345\n")
    hz = os.sysconf("SC_CLK_TCK")
    assert read_busy_seconds([0], str(stat)) == pytest.approx(160 / hz)  # guest is inside user already
    assert read_busy_seconds([0, 1], str(stat)) == pytest.approx((160 + 260) / hz)
    assert read_busy_seconds([2], str(stat)) is None  # a CPU the file does not list
    assert read_busy_seconds([0], str(tmp_path / "missing")) is None


def test_applied_sets_the_decision_and_restores_the_count() -> None:
    m = FakeMachine(cpus=2)
    b = m.budget(2)
    previous = torch.get_num_threads()
    m.run(1.0, busy_elsewhere=1.0, own=1.0)
    with b.applied() as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == previous


def test_attach_decides_before_every_forward() -> None:
    m = FakeMachine(cpus=2)
    b = m.budget(2)
    seen = []
    module = torch.nn.Identity()
    module.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    previous = torch.get_num_threads()
    handle = b.attach(module)
    try:
        m.run(1.0, busy_elsewhere=1.0, own=1.0)
        module(torch.zeros(1))
        m.run(1.0, busy_elsewhere=0.0, own=1.0)
        module(torch.zeros(1))
    finally:
        handle.remove()
        torch.set_num_threads(previous)
    assert seen == [1, 2]
    assert len(b.history) == 2


@pytest.mark.skipif(not Path("/proc/stat").is_file() or not hasattr(os, "sched_setaffinity"),
                    reason="needs Linux /proc/stat and CPU affinity")
def test_measures_a_busy_process_on_this_machine() -> None:
    from focus_detr.bench.contention import BackgroundLoad

    core = allowed_cpus()[-1]
    assert read_busy_seconds([core]) is not None
    with BackgroundLoad(1, pinned=True) as bg:
        assert bg.cores == [core] or bg.cores == [(os.cpu_count() or 1) - 1]
        busy_core = bg.cores[0]
        budget = ThreadBudget(2, min_window_s=0.2, cpus=[busy_core])
        time.sleep(0.6)  # this process idles; the pinned process keeps its core busy
        budget.decide()
    measured = budget.history[-1].busy_elsewhere
    assert measured is not None and measured > 0.8, budget.history
    assert budget.history[-1].threads == 1  # that core is taken
