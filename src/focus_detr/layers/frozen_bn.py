"""BatchNorm with fixed statistics and affine parameters (detectron2's ``FrozenBatchNorm2d``).

The official ResNet backbones use it everywhere: ImageNet statistics are kept as they are, because the
per-GPU detection batch (2 images) is far too small to estimate batch statistics.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FrozenBatchNorm2d(nn.Module):
    """``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` with everything fixed.

    All four tensors are persistent **buffers** (not parameters), so they appear in ``state_dict()`` under
    the detectron2 names but never in ``parameters()`` and never receive gradients. There is no
    ``num_batches_tracked`` buffer; such keys in a loaded state dict are ignored.

    At construction the layer is the identity: ``running_var`` starts at ``1 - eps`` (as in detectron2)
    so that ``sqrt(running_var + eps) == 1`` exactly.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance before the square root.

    Shapes: input ``[B, C, H, W]`` -> output ``[B, C, H, W]``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad:
            # detectron2 (at the commit detrex pins) uses an explicit affine when gradients flow:
            # F.batch_norm's backward would also compute gradients for weight/bias, costing memory.
            # The two paths differ only by float rounding.
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
            out_dtype = x.dtype  # may be half under autocast
            return x * scale.reshape(1, -1, 1, 1).to(out_dtype) + shift.reshape(1, -1, 1, 1).to(out_dtype)
        # Without gradients F.batch_norm is one fused op.
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
        )

    def scale_and_shift(self, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """``(scale, shift)`` ``[C]`` in ``dtype`` with ``forward(x) == x * scale + shift`` per channel."""
        scale = self.weight.to(dtype) * (self.running_var.to(dtype) + self.eps).rsqrt()
        return scale, self.bias.to(dtype) - self.running_mean.to(dtype) * scale

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints converted from torchvision / nn.BatchNorm2d carry a num_batches_tracked counter that
        # means nothing for a frozen layer: drop it instead of reporting it as unexpected.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def fold_frozen_batch_norm(weight: Tensor, bias: Tensor | None, norm: FrozenBatchNorm2d) -> tuple[Tensor, Tensor]:
    """Weight and bias of one convolution equal to ``norm(conv(x, weight, bias))``.

    ``weight [C_out, C_in, k, k]`` is scaled per output channel and the bias becomes ``bias * scale + shift``.
    The arithmetic is done in float64 and rounded once to ``weight.dtype``, so in float64 the folded
    convolution equals conv -> norm up to the reassociation of a multiply (~1e-15 relative).
    """
    if weight.shape[0] != norm.num_features:
        raise ValueError(f"cannot fold a FrozenBatchNorm2d of {norm.num_features} channels into a convolution with "
                         f"{weight.shape[0]} output channels")
    scale, shift = norm.scale_and_shift(torch.float64)
    scale = scale.to(weight.device)
    shift = shift.to(weight.device)
    folded_weight = weight.to(torch.float64) * scale.view(-1, *([1] * (weight.dim() - 1)))
    folded_bias = shift if bias is None else bias.to(torch.float64) * scale + shift
    return folded_weight.to(weight.dtype), folded_bias.to(weight.dtype)
