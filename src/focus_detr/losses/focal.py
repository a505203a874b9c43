"""Sigmoid focal losses (RetinaNet, https://arxiv.org/abs/1708.02002), element-wise.

Two functions with the same mathematics for 0/1 targets and different numerics:

* :func:`sigmoid_focal_loss` is the detrex form used for every set-prediction class loss
  (``loss_class``, ``_i``, ``_enc``, ``_dn``). Its cross-entropy term is
  ``binary_cross_entropy_with_logits`` (finite for any logit), its modulating factor is computed
  from the sigmoid probability exactly as detrex does, so the results match the official ones
  operation for operation.
* :func:`foreground_focal_loss` is the Foreground Token Selector loss (``select_loss``). The official
  ``focal_loss_from_logits`` (``foreground_supervision.py``) computes it literally from the sigmoid::

      p = sigmoid(x); p_t = p t + (1 - p)(1 - t); w = 0.25 t + 0.75 (1 - t)
      loss = -w (1 - p_t)^2 log(p_t)

  In float32 ``log(p_t)`` becomes ``log(0) = -inf`` for a background token with a logit above ~17
  (``1 - sigmoid(x)`` rounds to 0) or a foreground token below ~-88, which makes the official
  loss infinite and detectron2 aborts the run. We evaluate the same formula in log-sigmoid form
  (``log p_t = logsigmoid(±x)``, ``1 - p_t = sigmoid(∓x)``), which equals the literal value to float
  rounding wherever the literal one is finite and accurate, and stays finite (≈ 0.75·x for a
  background logit x ≫ 0) where the official one overflows. This is a deliberate, documented
  deviation that can only differ from the official code where the official code fails.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise sigmoid focal loss, detrex form.

    Args:
        logits:  ``[...]`` raw logits.
        targets: ``[...]`` same shape, binary (0/1) float targets.
        alpha:   weight of positives (``1 - alpha`` for negatives); ``alpha < 0`` disables weighting.
        gamma:   exponent of the modulating factor ``(1 - p_t)``.

    Returns:
        ``[...]`` un-reduced loss, same shape as ``logits``.
    """
    targets = targets.to(logits.dtype)
    prob = logits.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss


def foreground_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss of the foreground token selector, in stable log-sigmoid form.

    ``-w (1 - p_t)^gamma log(p_t)`` with ``w = alpha t + (1 - alpha)(1 - t)``; see the module docstring
    for why it is not computed literally from the sigmoid as in the official code.

    Args:
        logits:  ``[...]`` raw foreground logits.
        targets: ``[...]`` same shape, **binary** (0/1) targets. For 0/1 targets the two mixtures below
                 pick one term exactly; soft targets would give a different (but finite) value than the
                 literal formula.
        alpha:   weight of foreground tokens.
        gamma:   exponent of the modulating factor.

    Returns:
        ``[...]`` un-reduced loss, same shape as ``logits``; finite for every finite logit.
    """
    targets = targets.to(logits.dtype)
    # log p_t without forming p_t: log(sigmoid(x)) for t = 1, log(1 - sigmoid(x)) = log(sigmoid(-x)) for t = 0.
    log_p_t = targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits)
    # 1 - p_t without the cancellation of 1 - (1 - sigmoid(x)): sigmoid(-x) for t = 1, sigmoid(x) for t = 0.
    one_minus_p_t = targets * torch.sigmoid(-logits) + (1 - targets) * torch.sigmoid(logits)
    weight = alpha * targets + (1 - alpha) * (1 - targets)
    return -weight * one_minus_p_t**gamma * log_p_t
