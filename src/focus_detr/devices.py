"""Device names: the one place that checks and resolves ``auto | cpu | cuda | cuda:N | mps``.

Every ``--device`` option of the command line (an argparse ``type=``: :func:`device_name_arg`), the Python
API (``load_model(device=...)``) and the training engine (per process under torchrun, see
:func:`focus_detr.engine.distributed.process_device`) go through :func:`resolve_device`, so a device
string means the same everywhere and a bad one is refused with the same one-line :class:`DeviceError`.

Imports only torch (and not even torch for the syntax check, so ``--help`` stays fast).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda)(?::([0-9]+))?$")


class DeviceError(ValueError):
    """A device string that is malformed or names a device this machine does not have (one line)."""


def check_device_name(text: str) -> str:
    """``text`` normalised (``" CUDA:01"`` -> ``"cuda:1"``) if it is a well-formed device name, else
    :class:`DeviceError`. Only the spelling is checked here; :func:`resolve_device` checks availability."""
    name = str(text).strip().lower()
    match = _DEVICE_RE.match(name)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        hint = ""
        if name.isdigit():
            hint = f" (a GPU is written cuda:{name})"
        elif name.startswith("gpu"):
            hint = " (a GPU is written cuda or cuda:N)"
        raise DeviceError(f"invalid device {text!r}: expected {DEVICE_CHOICES}{hint}")
    if match.group(2) is not None:
        name = f"cuda:{int(match.group(2))}"  # cuda:01 -> cuda:1
    return name


def device_name_arg(text: str) -> str:
    """argparse ``type=`` for ``--device``: the syntax check of :func:`check_device_name` as a usage error.

    Availability (no CUDA, too few GPUs, no MPS) is checked when the command resolves the device, because
    that needs torch and must not slow down ``--help``."""
    import argparse

    try:
        return check_device_name(text)
    except DeviceError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The :class:`torch.device` that ``device`` names on this machine.

    ``"auto"`` is CUDA when available, else the CPU (MPS is never chosen automatically: some operators are
    missing there). ``"cuda"`` / ``"cuda:N"`` / ``"mps"`` without that device raise :class:`DeviceError`
    rather than silently falling back to the CPU.
    """
    import torch

    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = check_device_name(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but CUDA is not available (torch {torch.__version__}); "
                              "use --device cpu or auto")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"device {name!r} requested but only {count} CUDA device(s) are visible "
                              f"(cuda:0..cuda:{count - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"device {name!r} requested but MPS (Apple GPU) is not available in this torch "
                              f"build or on this machine (torch {torch.__version__}); use --device cpu or auto")
    elif dev.type != "cpu":
        raise DeviceError(f"invalid device {name!r}: expected {DEVICE_CHOICES}")
    return dev


__all__ = ["DEVICE_CHOICES", "DeviceError", "check_device_name", "device_name_arg", "resolve_device"]
