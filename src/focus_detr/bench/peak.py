"""The machine's matrix-multiply peak, measured in the same run as the model, and efficiency against it.

A detector's FLOPs are almost all matrix products and convolutions; the fastest a CPU (or GPU) does them is a
large square ``torch.mm`` in the same library, dtype and thread count. :func:`matmul_peak` times that
(best of a few trials, so a moment of contention from other processes does not lower the peak much), and
:func:`efficiency` divides the model's achieved GFLOP/s per stage by it. Measured in the same process and the
same minutes as the model, the fraction is comparable across machines and loads where absolute times are not.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Temporarily ``torch.set_num_threads(threads)`` (None: leave as is)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def matmul_peak(dtype: str = "fp32", threads: int | None = None, device: str | torch.device = "cpu",
                size: int | None = None, trials: int = 3, trial_seconds: float = 0.25) -> dict[str, Any]:
    """GFLOP/s of ``torch.mm`` of two ``[n, n]`` matrices of ``dtype`` with ``threads`` torch threads.

    ``n`` (unless given) is 1024 on CPU (2048 for fp32 with more than 2 threads, 4096 on CUDA): large enough for
    the library's blocked kernel to reach its steady speed, small enough for a trial to take a fraction of a
    second on one core; a dtype the CPU has no fast kernel for (bfloat16 without AVX-512-BF16 / AMX runs at
    well under 1 GFLOP/s) gets a smaller ``n`` (down to 128) so that one product takes about 50 ms. Each trial repeats the product for about ``trial_seconds``; the best trial is the peak.
    Returns ``{dtype, threads, n, gflops, trials_gflops, seconds}``; ``2 n^3`` FLOP per product (2 per
    multiply-add, the convention of the FLOP counts).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if trials < 1:
        raise ValueError("trials must be >= 1")
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    start_all = time.perf_counter()
    with torch_threads(threads if dev.type == "cpu" else None):
        used_threads = torch.get_num_threads()
        if size is None:
            size = 4096 if dev.type == "cuda" else (2048 if dtype == "fp32" and used_threads > 2 else 1024)
            if dev.type == "cpu" and dtype != "fp32":  # fp32 always has a fast kernel
                size = min(size, _affordable_size(DTYPES[dtype]))
        g = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=g).to(device=dev, dtype=DTYPES[dtype])
        b = torch.randn(size, size, generator=g).to(device=dev, dtype=DTYPES[dtype])
        out = torch.empty(size, size, device=dev, dtype=DTYPES[dtype])
        flop = 2 * size ** 3
        # warm-up, and the time of one product to size the trials
        torch.mm(a, b, out=out)
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        one = max(time.perf_counter() - t0, 1e-6)
        reps = max(1, int(trial_seconds / one))
        results = []
        for _ in range(trials):
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=out)
            sync()
            results.append(flop * reps / (time.perf_counter() - t0) / 1e9)
    return {"dtype": dtype, "threads": used_threads if dev.type == "cpu" else None, "n": size,
            "gflops": max(results), "trials_gflops": results, "device": str(dev),
            "seconds": time.perf_counter() - start_all}


def _affordable_size(dtype: torch.dtype, seconds: float = 0.05) -> int:
    """The largest ``n`` (a multiple of 64, 128 to 4096) whose ``n x n`` product takes about ``seconds``, from
    a timed 256 x 256 product."""
    a = torch.ones(256, 256, dtype=dtype)
    torch.mm(a, a)
    best = float("inf")
    for _ in range(3):  # best of three: one product can be delayed by another process
        t0 = time.perf_counter()
        torch.mm(a, a)
        best = min(best, time.perf_counter() - t0)
    rate = 2 * 256 ** 3 / max(best, 1e-7)
    n = int((rate * seconds / 2) ** (1 / 3)) // 64 * 64
    return max(128, min(4096, n))


def measure_peaks(dtypes: Sequence[str] = ("fp32", "bf16"), threads: Sequence[int] = (1, 2),
                  device: str | torch.device = "cpu", **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`matmul_peak` for every dtype and thread count (on CUDA the thread counts do not apply: once per
    dtype)."""
    dev = torch.device(device)
    counts: Sequence[int | None] = list(dict.fromkeys(threads)) if dev.type == "cpu" else [None]
    return [matmul_peak(d, t, dev, **kwargs) for d in dict.fromkeys(dtypes) for t in counts]


def find_peak(peaks: Sequence[dict[str, Any]], dtype: str, threads: int | None) -> dict[str, Any] | None:
    """The measured peak of ``dtype`` at ``threads`` (any thread count on CUDA), else None."""
    for p in peaks:
        if p["dtype"] == dtype and (p["threads"] is None or p["threads"] == threads):
            return p
    return None


def efficiency(gflop: float, ms: float, peak_gflops: float | None) -> dict[str, float | None]:
    """``{"gflops_per_s", "of_peak"}`` of ``gflop`` GFLOP done in ``ms`` milliseconds against ``peak_gflops``."""
    rate = gflop / (ms / 1000.0) if ms > 0 and gflop > 0 else None
    of_peak = rate / peak_gflops if rate is not None and peak_gflops else None
    return {"gflops_per_s": rate, "of_peak": of_peak}


def cpu_matrix_units() -> dict[str, bool]:
    """Which matrix-relevant instruction sets the CPU flags name (Linux ``/proc/cpuinfo``; empty elsewhere):
    ``avx2``, ``fma``, ``avx512f``, ``avx512_bf16``, ``amx_bf16``, ``amx_tile``, ``avx512_fp16``, ``amx_fp16``."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "amx_fp16")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {w: w in flags for w in wanted}
    except OSError:
        pass
    return {}
