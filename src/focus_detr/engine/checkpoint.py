"""Training checkpoints: atomic, checksummed, loadable with ``torch.load(weights_only=True)``.

A checkpoint is one ``torch.save`` file holding a dict of plain values only (dicts, lists, tuples, str,
int, float, bool, None and tensors; no pickled objects), so it loads with ``weights_only=True`` and a
file from an untrusted source cannot run code::

    format          "focus-detr-train-checkpoint"
    format_version  1
    iteration       completed optimiser steps
    model_config    focus_detr.config.config_to_dict(model.cfg): rebuilds the model from the file alone
    train_config    the TrainConfig as a dict (for reference and resume checks)
    model           state dict (no "module." prefix)
    optimizer       optimizer.state_dict()
    scheduler       the learning-rate schedule as a dict (the rate is a pure function of the iteration)
    ema             AveragedModel state dict or None
    grad_scaler     GradScaler state dict or None
    rng             one entry per process (rank order): python / numpy / torch / cuda generator states
    data            {"samples_per_process", "batch_size", "world_size", "seed"}: the sampler position
    counters        {"skipped_steps", "best_ap", "best_iter", "evals_since_best"}
    sha256          digest of everything above (tensor bytes included)

:func:`training_checkpoint` assembles this dict (the one place that does); :func:`save_checkpoint` adds the
header and checksum and writes it.

Files are written to a temporary name unique to the process in the same folder, flushed and fsync'ed, then
renamed over the final name (:func:`focus_detr.weights.files.atomic_write`), so a crash never leaves a
half-written file under a checkpoint name; :func:`focus_detr.weights.files.remove_orphaned_temporaries`
removes the temporaries of writers that died.
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# Reading, checksum and atomic writing are focus_detr.weights' (one of each for every model file); the names
# stay importable from here for the training code.
from ..weights.files import CheckpointFormatError, atomic_torch_save, read_torch_file, tree_digest
from ..weights.kinds import CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, verify_training_checkpoint
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^checkpoint_(\d+)\.pth$")


def checkpoint_path(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"checkpoint_{iteration:07d}.pth"


# --------------------------------------------------------------------------------------------------
# Random number generator states as plain values


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA, when initialised) generator states as tensors and plain values."""
    version, py_state, gauss_next = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"checkpoint has CUDA generator states for {len(cuda)} GPU(s) but "
                          f"{torch.cuda.device_count()} are visible; CUDA random streams are not restored")


# --------------------------------------------------------------------------------------------------
# Content / save / load


def training_checkpoint(*, iteration: int, model_config: dict[str, Any], train_config: dict[str, Any],
                        model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: dict[str, Any],
                        ema: nn.Module | None, grad_scaler: torch.amp.GradScaler | None, rng: list[dict[str, Any]],
                        batch_size: int, world_size: int, seed: int, skipped_steps: int, best_ap: float | None,
                        best_iter: int | None, evals_since_best: int) -> dict[str, Any]:
    """The content of a training checkpoint (the schema in the module docstring), tensors on the CPU.

    ``model`` is the bare model (not the DDP wrapper: no ``module.`` prefix); ``rng`` holds every process's
    :func:`capture_rng_state` in rank order; ``batch_size`` is per process."""
    return {
        "iteration": iteration,
        "model_config": model_config,
        "train_config": train_config,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": to_cpu(optimizer.state_dict()),
        "scheduler": scheduler,
        "ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()} if ema is not None else None,
        "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
        "rng": rng,
        "data": {"samples_per_process": iteration * batch_size, "batch_size": batch_size, "world_size": world_size,
                 "seed": seed},
        "counters": {"skipped_steps": skipped_steps, "best_ap": best_ap, "best_iter": best_iter,
                     "evals_since_best": evals_since_best},
    }


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor inside dicts / lists / tuples detached and moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(v) for v in obj)
    return obj


def save_checkpoint(path: str | Path, content: Mapping[str, Any]) -> Path:
    """Write ``content`` (plain values and tensors) with the format header and checksum, atomically."""
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION, **content}
    payload["sha256"] = tree_digest(payload)
    return atomic_torch_save(payload, Path(path))


def load_checkpoint(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read a training checkpoint; raise :class:`~focus_detr.api.CheckpointFormatError` with the reason when
    the file is missing, truncated, foreign, from a newer version or corrupted."""
    path = Path(path)
    payload = read_torch_file(path, what="checkpoint file")
    return verify_training_checkpoint(payload, str(path), verify)


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of the checkpoint files in ``run_dir/checkpoints``, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint in ``run_dir`` that reads and verifies; damaged newer ones are skipped with a
    warning (e.g. a file cut short by a full disk)."""
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            load_checkpoint(path)
        except CheckpointFormatError as e:
            warnings.warn(f"skipping damaged checkpoint: {e}")
            continue
        return path
    return None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (``keep <= 0`` keeps everything)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(run_dir)[:-keep]:
        try:
            path.unlink()
        except OSError:
            pass
