"""Multi-scale deformable attention: reference (grid_sample) vs fast (embedding_bag) implementation.

Times forward and forward+backward at the R50 shapes of one 800x1333 image (N = 22223 tokens on levels
100x167, 50x84, 25x42, 13x21; 8 heads, head dim 32, 4 levels, 4 points):

* ``encoder_dense``: Q = 22223, every token queries (the dense / Deformable-DETR encoder layer);
* ``encoder_focus``: Q = 11112, the first focus layer (top half of the tokens in score order);
* ``decoder``: Q = 1100 (900 queries + 200 denoising), reference boxes anywhere in the image.

Inputs look like the model's: encoder queries sample around their own token centre, decoder queries
around a random box centre, offsets ~ N(0, 2 cells) per level, softmax attention weights. Each measurement
is the median of ``--repeats`` rounds; inside a round every (implementation, pass) runs once, so slow
phases of a shared machine hit both implementations alike (the load average is printed for that reason).

    .venv/bin/python benchmarks/bench_msda.py                 # table, 2 threads
    .venv/bin/python benchmarks/bench_msda.py --json out.json # also write the numbers

On a machine shared with other CPU-bound processes the 2-thread wall times measure the scheduler more than
the kernels: each multi-threaded op waits until its second thread gets a core (~5-10 ms at a load average
of 4 on 2 cores), and the fast path runs 2-3x more such ops than the reference. There, either run at
real-time priority for the minute the benchmark takes (``chrt -f 10 python benchmarks/bench_msda.py``,
needs root), or compare single-threaded CPU time (``--threads 1 --clock cpu``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

if importlib.util.find_spec("focus_detr") is None:  # source checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from focus_detr.ops.ms_deform_attn import implementation_for, ms_deform_attn_reference
from focus_detr.ops.ms_deform_attn_fast import ms_deform_attn_fast

LEVELS_800x1333 = [(100, 167), (50, 84), (25, 42), (13, 21)]
CASES = {  # name -> (number of queries, query kind)
    "encoder_dense": (22223, "encoder"),
    "encoder_focus": (11112, "encoder"),
    "decoder": (1100, "decoder"),
}
IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": ms_deform_attn_reference,
    "fast": ms_deform_attn_fast,
}

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def make_inputs(num_queries: int, kind: str, device: torch.device, heads: int = 8, head_dim: int = 32,
                points: int = 4, seed: int = 0) -> Inputs:
    """``value [1, N, heads, D]``, ``spatial_shapes [L, 2]``, locations ``[1, Q, heads, L, P, 2]``, weights."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS_800x1333)
    num_levels = len(LEVELS_800x1333)
    num_tokens = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(1, num_tokens, heads, head_dim, generator=g)
    if kind == "encoder":
        # Token centres of all levels, in token order; the focus encoder keeps a score-ordered subset.
        centres = torch.cat([
            torch.stack(torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")[::-1],
                        -1).view(-1, 2)
            for h, w in LEVELS_800x1333
        ])
        if num_queries < num_tokens:
            centres = centres[torch.randperm(num_tokens, generator=g)[:num_queries]]
    else:
        centres = torch.rand(num_queries, 2, generator=g)
    cell = 1.0 / shapes.flip(-1).float()  # (1 / W_l, 1 / H_l)
    offsets = torch.randn(1, num_queries, heads, num_levels, points, 2, generator=g) * 2.0 * cell[:, None, :]
    locations = centres[None, :, None, None, None, :] + offsets
    weights = torch.randn(1, num_queries, heads, num_levels * points, generator=g).softmax(-1)
    weights = weights.view(1, num_queries, heads, num_levels, points)
    return value.to(device), shapes.to(device), locations.to(device), weights.to(device)


def run_once(fn: Callable[..., torch.Tensor], inputs: Inputs, backward: bool, device: torch.device,
             clock: Callable[[], float] = time.perf_counter) -> float:
    value, shapes, locations, weights = inputs
    if backward:
        value, locations, weights = (t.detach().requires_grad_() for t in (value, locations, weights))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    out = fn(value, shapes, locations, weights)
    if backward:
        out.backward(torch.ones_like(out))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def bench_case(name: str, device: torch.device, repeats: int,
               clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    num_queries, kind = CASES[name]
    inputs = make_inputs(num_queries, kind, device)
    with torch.no_grad():
        diff = (ms_deform_attn_fast(*inputs) - ms_deform_attn_reference(*inputs)).abs().max().item()
    runs = [(impl, backward) for impl in IMPLEMENTATIONS for backward in (False, True)]
    times: dict[tuple[str, bool], list[float]] = {run: [] for run in runs}
    for impl, backward in runs:  # warm-up (allocator, first-call costs)
        run_once(IMPLEMENTATIONS[impl], inputs, backward, device)
    for _ in range(repeats):
        for impl, backward in runs:
            times[(impl, backward)].append(run_once(IMPLEMENTATIONS[impl], inputs, backward, device, clock))
    result: dict[str, Any] = {"case": name, "queries": num_queries, "tokens": inputs[0].shape[1],
                              "max_abs_diff_forward": diff}
    for impl, backward in runs:
        key = f"{impl}_{'forward_backward' if backward else 'forward'}_s"
        result[key] = statistics.median(times[(impl, backward)])
        result[key.replace("_s", "_all_s")] = times[(impl, backward)]
    result["speedup_forward"] = result["reference_forward_s"] / result["fast_forward_s"]
    result["speedup_forward_backward"] = result["reference_forward_backward_s"] / result["fast_forward_backward_s"]
    return result


def format_table(results: list[dict[str, Any]]) -> str:
    """Medians in ms and reference / fast ratios, one row per case."""
    header = (f"{'case':<14} {'Q':>6} | {'fwd ref':>9} {'fwd fast':>9} {'ratio':>6} | "
              f"{'f+b ref':>9} {'f+b fast':>9} {'ratio':>6} | max|diff| fwd")
    lines = [header, "-" * len(header)]
    for r in results:
        ms = {k: f"{r[k] * 1e3:7.1f}ms" for k in r if k.endswith("_s") and not k.endswith("_all_s")}
        lines.append(
            f"{r['case']:<14} {r['queries']:>6} | {ms['reference_forward_s']:>9} {ms['fast_forward_s']:>9} "
            f"{r['speedup_forward']:>5.2f}x | {ms['reference_forward_backward_s']:>9} "
            f"{ms['fast_forward_backward_s']:>9} {r['speedup_forward_backward']:>5.2f}x | "
            f"{r['max_abs_diff_forward']:.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, default=5, help="rounds per case (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (all threads), which a busy shared "
                             "machine disturbs less (use with --threads 1; OpenMP spin-waits count with more)")
    parser.add_argument("--json", metavar="PATH", help="also write the results (with every timing) as JSON")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = os.getloadavg()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    results = [bench_case(name, device, args.repeats, clock) for name in args.cases]
    load_after = os.getloadavg()

    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {args.clock} clock, "
          f"median of {args.repeats} interleaved rounds; 'auto' runs {implementation_for(device, 'auto')!r} here")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(format_table(results))
    if args.json:
        meta = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
                "clock": args.clock, "repeats": args.repeats, "load_average_before": load_before, "load_average_after": load_after,
                "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
        with open(args.json, "w") as f:
            json.dump({"schema": "focus-detr-bench-msda/1", "meta": meta, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
