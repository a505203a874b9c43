"""Latency under contention: focus vs dense with 1 and 2 threads, on a quiet machine and while busy processes
that the benchmark starts itself keep cores occupied.

A user's CPU is rarely idle (a browser, a second model, CI neighbours). With several torch threads every
parallel operator ends at a barrier that waits for its slowest thread; a thread that shares its core with
another process runs at half speed or waits a scheduler slice to run at all. Stages made of many short
operators (token selection, gathers) suffer most, so the focus/dense ratio measured on a quiet machine may not
hold on a busy one. :class:`BackgroundLoad` creates that situation reproducibly: ``N`` processes spinning in
a pure-Python loop (one core each), optionally pinned to the last cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .models import build_mode_models, make_batch
from .peak import torch_threads
from .timing import interleaved, summarize, timed_stages

# A busy process: pins itself when given a core, then spins until killed. Started with -S (no site imports)
# and no torch, so it starts in milliseconds and uses no memory to speak of.
# It also stops by itself when the benchmark process is gone (killed before it could stop its load): it checks
# its parent about 20 times a second.
_BUSY = ("import os, sys\n"
         "cpu = int(sys.argv[1])\n"
         "parent = os.getppid()\n"
         "if cpu >= 0 and hasattr(os, 'sched_setaffinity'):\n"
         "    os.sched_setaffinity(0, {cpu})\n"
         "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
         "while os.getppid() == parent:\n"
         "    for _ in range(200000):\n"
         "        pass\n")


def load_cores(processes: int, pinned: bool) -> list[int | None]:
    """The core each busy process is pinned to (the last cores first: the benchmark's own threads are not
    pinned, the kernel places them), or None for unpinned processes."""
    if not pinned:
        return [None] * processes
    n = os.cpu_count() or 1
    return [n - 1 - (i % n) for i in range(processes)]


class BackgroundLoad:
    """Context manager: ``processes`` busy-looping Python processes while inside (none for 0).

    ``pinned``: each process pinned to one core (:func:`load_cores`); else the kernel moves them freely. The
    processes are started and stopped by this object only (terminated by their own pid on exit).
    """

    def __init__(self, processes: int, pinned: bool = False) -> None:
        if processes < 0:
            raise ValueError(f"background load must be >= 0 processes, got {processes}")
        self.processes = processes
        self.pinned = pinned
        self.cores = load_cores(processes, pinned)
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> "BackgroundLoad":
        try:
            for core in self.cores:
                proc = subprocess.Popen([sys.executable, "-S", "-c", _BUSY, str(-1 if core is None else core)],
                                        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
                self._procs.append(proc)
            for proc in self._procs:
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != b"ready":
                    raise RuntimeError(f"a background-load process exited early (code {proc.poll()})")
        except BaseException:
            self.stop()
            raise
        time.sleep(0.2)  # let the scheduler settle the spinning processes on their cores
        return self

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self._procs.clear()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def describe(self) -> str:
        if not self.processes:
            return "quiet (no load started)"
        where = "pinned to core " + ",".join(str(c) for c in self.cores) if self.pinned else "not pinned"
        return f"{self.processes} busy process{'es' if self.processes > 1 else ''} ({where})"


def run_contention(preset: str = "r50_4scale", size: tuple[int, int] = (800, 1333), load: int = 1,
                   pinned: bool = False, threads: Sequence[int] = (1, 2), modes: Sequence[str] = ("focus", "dense"),
                   repeats: int = 3, warmup: int = 1, seed: int = 0, models: dict | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Median latency by stage of ``modes`` with each thread count in ``threads``, quiet and under ``load``.

    For each thread count the quiet block and the loaded block run back to back (modes interleaved round by
    round inside each block), so the ratios focus/dense of one block are measured under one condition.
    ``models`` reuses already built mode models (same weights as the main benchmark). Returns
    ``{settings, blocks: [{threads, load, stages_ms{mode: {stage: ms}}, total_ms_all, ratios}]}``, where the
    ratios are ``focus/dense`` total and per stage: ratio of medians (``ms``), median of the per-round ratios
    (``paired``) and ratio of the fastest runs (``min``).
    """
    say = progress or (lambda _m: None)
    if load < 1:
        raise ValueError(f"--background-load must be >= 1 process for the contention measurement, got {load}")
    if models is None:
        models, _ = build_mode_models(preset, tuple(modes), seed)
    batch = make_batch(models[modes[0]], size, 1, seed)
    dev = torch.device("cpu")
    runners = {}
    for mode in modes:
        model = models[mode]

        def run(model=model) -> dict[str, float]:
            with torch.no_grad():
                return timed_stages(model, lambda: model(batch), dev)

        runners[mode] = run
    blocks = []
    for t in threads:
        for processes in (0, load):
            bg = BackgroundLoad(processes, pinned)
            with torch_threads(t), bg:
                say(f"contention: {t} thread(s), {bg.describe()}")
                samples = interleaved(runners, repeats, warmup, progress=say)
                try:
                    loadavg = list(os.getloadavg())
                except OSError:
                    loadavg = None
            block: dict[str, Any] = {"threads": t, "load": bg.describe(), "load_processes": processes,
                                     "load_average_after": loadavg, "stages_ms": {}, "total_ms_all": {}}
            summaries = {m: summarize(samples[m]) for m in modes}
            for m in modes:
                block["stages_ms"][m] = {k: v["median_ms"] for k, v in summaries[m].items()}
                block["total_ms_all"][m] = summaries[m]["total"]["ms_all"]
            block["ratios"] = _block_ratios(summaries, modes)
            blocks.append(block)
    return {"settings": {"preset": preset if isinstance(preset, str) else "custom", "size": list(size),
                         "threads": list(threads), "load_processes": load, "pinned": pinned, "repeats": repeats,
                         "warmup": warmup, "modes": list(modes)},
            "blocks": blocks}


def _block_ratios(summaries: dict[str, dict[str, dict[str, Any]]], modes: Sequence[str]) -> dict[str, Any]:
    import statistics

    out: dict[str, Any] = {}
    if "focus" not in modes or "dense" not in modes:
        return out
    f, d = summaries["focus"], summaries["dense"]
    for stage in f:
        if stage not in d or d[stage]["median_ms"] <= 0:
            continue
        paired = [a / b for a, b in zip(f[stage]["ms_all"], d[stage]["ms_all"]) if b > 0]
        out[stage] = {"ms": f[stage]["median_ms"] / d[stage]["median_ms"],
                      "paired": statistics.median(paired) if paired else None,
                      "min": f[stage]["min_ms"] / d[stage]["min_ms"] if d[stage]["min_ms"] > 0 else None}
    return {"focus/dense": out}


def format_contention(result: dict[str, Any], markdown: bool = False) -> list[str]:
    """One row per (threads, load) block: focus and dense totals, focus/dense (median / paired / min), and the
    focus token-selection + encoder time."""
    from .report import markdown_table

    s = result["settings"]
    out = [f"Contention ({s['preset']} at {s['size'][0]}x{s['size'][1]}, {s['repeats']} interleaved rounds per "
           f"block, background load {s['load_processes']} busy process(es), "
           f"{'pinned' if s['pinned'] else 'not pinned'}):", ""]
    rows = []
    for b in result["blocks"]:
        r = b["ratios"].get("focus/dense", {}).get("total", {})
        st = b["stages_ms"]
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        rows.append([str(b["threads"]), b["load"], f"{st.get('focus', {}).get('total', 0):.0f}",
                     f"{st.get('dense', {}).get('total', 0):.0f}",
                     f"{fmt(r.get('ms'))} / {fmt(r.get('paired'))} / {fmt(r.get('min'))}",
                     f"{st.get('focus', {}).get('token_selection', 0):.0f}",
                     f"{st.get('focus', {}).get('encoder', 0):.0f} / {st.get('dense', {}).get('encoder', 0):.0f}"])
    out += markdown_table(["threads", "load", "focus ms", "dense ms", "focus/dense (median / paired / min)",
                   "focus token_selection ms", "encoder ms focus / dense"], rows, markdown)
    return out
