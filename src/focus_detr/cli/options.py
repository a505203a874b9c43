"""The options every command that runs a model shares, defined once so they mean the same everywhere.

* ``--device auto|cpu|cuda|cuda:N|mps``: spelling checked by argparse (:func:`focus_detr.devices.device_name_arg`),
  availability by :func:`focus_detr.devices.resolve_device` when the command starts (one-line error, exit 2).
* ``--threads N|auto``: torch CPU threads (``auto``: PyTorch's default unless the load average shows other
  work, then 1).
* ``--precision fp32|bf16|fp16``: run the model through :func:`focus_detr.optimize_for_inference` in that
  precision (:func:`add_precision_option`, :func:`apply_precision`).
* ``--quiet``: no progress bars or progress messages (results are still printed). Commands that had
  ``--no-progress`` keep it as a hidden alias, so old scripts keep working.

This module must not import torch at import time: ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..devices import DEVICE_CHOICES, device_name_arg


def threads_arg(text: str) -> int | str:
    """argparse ``type=`` for ``--threads``: a positive integer or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of threads or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of threads or 'auto', got {value}")
    return value


def add_device_option(group: Any, default: str = "auto", note: str = "") -> None:
    """``--device`` (``default`` is checked like a given value)."""
    what = "auto = CUDA if available, else the CPU" if default == "auto" else f"default {default}"
    group.add_argument("--device", type=device_name_arg, default=default, metavar="DEVICE",
                       help=f"{DEVICE_CHOICES} ({what}){note}")


def add_threads_option(group: Any, default: int | str | None = None, note: str = "") -> None:
    """``--threads``; ``default`` None leaves PyTorch's choice."""
    shown = "PyTorch's choice" if default is None else str(default)
    group.add_argument("--threads", type=threads_arg, default=default, metavar="N|auto",
                       help=f"torch CPU threads (default {shown}; 'auto': PyTorch's default unless other work is "
                            f"running, then 1){note}")


def add_quiet_option(group: Any, no_progress_alias: bool = False, what: str = "no progress bars") -> None:
    """``--quiet``; ``no_progress_alias`` adds the hidden ``--no-progress`` of older versions."""
    group.add_argument("--quiet", action="store_true", help=what)
    if no_progress_alias:
        group.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)


def add_runtime_options(parser: argparse.ArgumentParser, device_default: str = "auto", device_note: str = "",
                        quiet_help: str = "no progress bars", no_progress_alias: bool = False) -> None:
    """``--device``, ``--threads`` and ``--quiet`` in one group (predict, explain, export, convert)."""
    group = parser.add_argument_group("device and output")
    add_device_option(group, device_default, device_note)
    add_threads_option(group)
    add_quiet_option(group, no_progress_alias, quiet_help)


# The precisions of focus_detr.model.optimize.PRECISIONS (not imported: --help must not load torch; a test
# checks that the two agree).
PRECISION_CHOICES: tuple[str, ...] = ("fp32", "bf16", "fp16")


def add_precision_option(group: Any, default: str = "fp32", note: str = "") -> None:
    """``--precision fp32|bf16|fp16``; apply it with :func:`apply_precision` once the model is loaded."""
    group.add_argument("--precision", choices=PRECISION_CHOICES, default=default,
                       help=f"compute precision (default {default}): the model is optimised for inference (FrozenBN "
                            "folded; bf16/fp16: weights cast once, scores, boxes and deformable sampling kept in "
                            "float32). bf16: CPU and CUDA, slower than fp32 on CPUs without bf16 units "
                            f"(AVX-512-BF16/AMX); fp16: CUDA only{note}")


def apply_precision(model: Any, precision: str) -> Any:
    """``focus_detr.optimize_for_inference(model, precision)``, with an unsupported precision / device pair as a
    one-line :class:`~focus_detr.cli.errors.CLIError` (exit 2). The warning about bf16 on a CPU without bf16
    units is printed once on stderr."""
    import warnings

    from ..model.optimize import PrecisionError, optimize_for_inference
    from .errors import CLIError

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimized = optimize_for_inference(model, precision)
    except PrecisionError as e:
        raise CLIError(f"--precision {precision}: {e}") from None
    import sys

    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return optimized


def choose_threads(requested: int | str) -> int:
    """``requested`` threads, or for ``auto`` PyTorch's default unless the 1-minute load average says at least
    one core is already busy with other work, then 1."""
    import os

    import torch

    if requested != "auto":
        return max(1, int(requested))
    default = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return default
    return 1 if default > 1 and load >= 1.0 else default


def apply_threads(args: argparse.Namespace) -> int | None:
    """Set torch's CPU threads from ``args.threads`` (None: leave them); returns the number set."""
    if getattr(args, "threads", None) is None:
        return None
    import torch

    threads = choose_threads(args.threads)
    torch.set_num_threads(threads)
    return threads


def check_device(args: argparse.Namespace):
    """Resolve ``args.device`` now, so a device this machine lacks fails in a second, before any loading.
    Returns the :class:`torch.device`; raises :class:`~focus_detr.cli.errors.CLIError` (exit 2)."""
    from ..devices import DeviceError, resolve_device
    from .errors import CLIError

    try:
        return resolve_device(args.device)
    except DeviceError as e:
        raise CLIError(str(e)) from None
