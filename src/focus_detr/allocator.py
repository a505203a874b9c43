"""Keep freed CPU memory in the process for reuse (glibc), instead of new pages for every large tensor.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with fresh pages from the
kernel and returns them on ``free``. A detector's large activations (a ``[11112, 2048]`` FFN hidden layer is
91 MB) are therefore new memory on every forward pass, and the kernel zeroes each 4 KiB page on first touch:
on a 2-core AMD EPYC (R50, 800x1333, 2 threads) that was 0.56 M page faults per focus forward and about a
fifth of its wall time (benchmarks/RESULTS.md, "Page faults"). ``reuse_freed_memory`` tells glibc to serve
large blocks from its heap and to keep freed memory, so the next forward reuses pages already mapped: the
process keeps its peak memory instead of giving it back between forwards.

This is what PyTorch's CPU performance guides get with jemalloc or tcmalloc through ``LD_PRELOAD``; here it
is two ``mallopt`` calls, applied by the ``focus-detr`` command (set ``FOCUS_DETR_ALLOCATOR=system`` to keep
glibc's defaults). Library users call it themselves. Nothing is changed when the C library is not glibc,
when another allocator is preloaded, or when the user tuned glibc through its ``MALLOC_*`` variables.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

ENV_VAR = "FOCUS_DETR_ALLOCATOR"  # "reuse" (the command's default) or "system"
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Largest value mallopt accepts for the trim threshold (an int): freed memory is practically never trimmed.
_NEVER_TRIM = 2**31 - 1
_USER_TUNING = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


@dataclass(frozen=True)
class AllocatorState:
    """Whether freed memory is kept for reuse in this process, and why (or why not)."""

    reuse: bool
    reason: str


_state: AllocatorState | None = None


def allocator_state() -> AllocatorState:
    """What :func:`reuse_freed_memory` did in this process (not called yet: glibc's defaults)."""
    return _state or AllocatorState(False, "not requested (glibc defaults)")


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def reuse_freed_memory(environ: dict[str, str] | None = None) -> AllocatorState:
    """Ask glibc to serve large blocks from its heap and keep freed memory (see the module docstring).

    Returns the state; calling it again returns the first answer. ``environ`` (default ``os.environ``) is
    read for the opt-out ``FOCUS_DETR_ALLOCATOR=system``, a preloaded allocator and the user's own
    ``MALLOC_*`` / ``GLIBC_TUNABLES`` settings, each of which leaves glibc as it is.
    """
    global _state
    env = os.environ if environ is None else environ
    choice = env.get(ENV_VAR, "reuse").strip().lower()
    if choice not in ("reuse", "system"):
        raise ValueError(f"{ENV_VAR} must be 'reuse' or 'system', got {env[ENV_VAR]!r}")
    if _state is not None:
        return _state
    if choice == "system":
        _state = AllocatorState(False, f"{ENV_VAR}=system")
    elif any(name in env for name in _USER_TUNING):
        _state = AllocatorState(False, "the user's MALLOC_* / GLIBC_TUNABLES settings are kept")
    elif any(lib in env.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")):
        _state = AllocatorState(False, "another allocator is preloaded")
    else:
        libc = _glibc()
        if libc is None:
            _state = AllocatorState(False, "the C library is not glibc")
        elif libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) != 1 or libc.mallopt(_M_MMAP_MAX, 0) != 1:
            _state = AllocatorState(False, "glibc refused the settings")
        else:
            _state = AllocatorState(True, "glibc: large blocks from the heap, freed memory kept")
    return _state
