"""Checks a state dict must pass before it is copied into a model.

``Module.load_state_dict`` copies with ``Tensor.copy_``, which casts silently: a floating tensor offered for
an integer buffer (Swin's ``relative_position_index``) is truncated to integers without a word. A damaged
index makes every attention head read the wrong rows of its relative-position bias table, so the model runs
and gives wrong numbers. Integer buffers are derived from the architecture, never learnt, so the model that
receives the state dict already holds the only right values.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

# Integer buffers that hold state rather than values derived from the architecture: checkpoints may
# legitimately differ from a fresh model there.
_STATEFUL_INTEGER_BUFFERS = ("num_batches_tracked",)


def integer_buffer_problems(model: torch.nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """One message per key of ``state_dict`` (our key names) that would damage an integer buffer of ``model``.

    ``model`` must be freshly built, so its integer buffers hold what the architecture computes. A key is a
    problem when the state dict offers a floating (or complex) tensor for an integer / bool buffer, or an
    integer tensor whose values differ from the model's. Keys the model does not have, and mis-shaped keys,
    are left to the strict loader (it reports them). Returns ``[]`` when nothing is wrong.
    """
    problems: list[str] = []
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point() or buffer.is_complex() or name not in state_dict:
            continue
        if name.rsplit(".", 1)[-1] in _STATEFUL_INTEGER_BUFFERS:
            continue
        offered = state_dict[name]
        if not isinstance(offered, Tensor):
            problems.append(f"{name}: expected a {buffer.dtype} tensor, got {type(offered).__name__}")
            continue
        if offered.is_floating_point() or offered.is_complex():
            problems.append(f"{name}: a {offered.dtype} tensor for the model's {buffer.dtype} buffer "
                            "(loading would truncate it to integers)")
            continue
        if tuple(offered.shape) != tuple(buffer.shape):
            continue
        differ = int((offered.to(device=buffer.device, dtype=torch.int64) != buffer.to(torch.int64)).sum())
        if differ:
            problems.append(f"{name}: {differ} of {buffer.numel()} values differ from what the model computes "
                            "for this architecture")
    return problems
