"""Process-group set-up and the few collectives the engine needs.

The engine runs in one process (no environment variables) or under ``torchrun``, which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. With ``WORLD_SIZE > 1`` we join a
process group: NCCL when training on CUDA, gloo on CPU. Every collective is bounded by the group's timeout
(``--dist-timeout``), so a rank that dies or hangs makes the others fail with :class:`DistributedError`
instead of waiting forever.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..devices import DeviceError, resolve_device


class DistributedError(RuntimeError):
    """A collective failed or timed out: usually another process of the job died or hangs."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = 1800.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def env_dist_info(timeout_s: float = 1800.0) -> DistInfo:
    """Read the torchrun environment (single process when it is absent)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    return DistInfo(rank, world_size, local_rank, float(timeout_s))


def process_device(requested: str, info: DistInfo) -> torch.device:
    """The device of this process: :func:`focus_detr.devices.resolve_device`, plus the torchrun rule that
    each process takes GPU ``LOCAL_RANK`` (``cuda`` and ``auto`` on a GPU machine mean ``cuda:LOCAL_RANK``).

    One process may name its GPU (``cuda:N``); under torchrun that is refused, since every rank would share
    it. MPS has no multi-process backend here, so it is refused under torchrun too.
    """
    device = resolve_device(requested)
    if device.type == "mps" and info.is_distributed:
        raise DeviceError("--device mps cannot be used with torchrun (no multi-process backend for MPS); "
                          "use --device cpu")
    if device.type != "cuda":
        return device
    if device.index is not None:
        if info.is_distributed:
            raise DeviceError(f"--device {requested} names one GPU, but under torchrun each process takes GPU "
                              "LOCAL_RANK: use --device cuda or auto (CUDA_VISIBLE_DEVICES picks the GPUs)")
        torch.cuda.set_device(device.index)
        return device
    if info.local_rank >= torch.cuda.device_count():
        raise DeviceError(f"LOCAL_RANK {info.local_rank} but only {torch.cuda.device_count()} GPU(s) are visible")
    torch.cuda.set_device(info.local_rank)
    return torch.device("cuda", info.local_rank)


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Join the process group described by ``info`` (no-op for a single process or when already joined)."""
    if not info.is_distributed or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Make NCCL errors and timeouts abort the process instead of hanging (older PyTorch needs the flag).
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        kwargs["device_id"] = device
    try:
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                                timeout=datetime.timedelta(seconds=info.timeout_s), **kwargs)
    except TypeError:  # older PyTorch without device_id
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                                timeout=datetime.timedelta(seconds=info.timeout_s))
    except Exception as e:
        raise DistributedError(f"rank {info.rank}: could not join the process group ({backend}, "
                               f"{info.world_size} processes, timeout {info.timeout_s:g} s): {e}") from e


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _fail(what: str, error: BaseException) -> DistributedError:
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistributedError(
        f"rank {rank}: {what} failed ({type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}). "
        "Another process of the job probably died or stopped responding (see its log); the job stops "
        "because collectives are bounded by --dist-timeout.")


def barrier() -> None:
    if _active():
        try:
            dist.barrier()
        except Exception as e:
            raise _fail("barrier", e) from e


def any_true(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is True on any process (all processes must call it)."""
    return any_true_each([flag], device)[0]


def any_true_each(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise :func:`any_true` of several flags in one collective."""
    if not _active():
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    except Exception as e:
        raise _fail("all_reduce", e) from e
    return [bool(v > 0) for v in t.tolist()]


def mean_over_processes(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over processes (same keys on every process, in the same order)."""
    if not _active() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64 if device.type == "cpu" else torch.float32,
                     device=device)
    try:
        dist.all_reduce(t)
    except Exception as e:
        raise _fail("all_reduce", e) from e
    t = t / dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` for a single process."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(out, obj)
    except Exception as e:
        raise _fail("all_gather_object", e) from e
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of process ``src`` on every process."""
    if not _active():
        return obj
    box = [obj]
    try:
        dist.broadcast_object_list(box, src=src)
    except Exception as e:
        raise _fail("broadcast_object_list", e) from e
    return box[0]
