"""Discrete decisions of the model, behind one seam.

Every top-k the model takes (foreground tokens, OESM tokens, two-stage proposals, final detections) goes
through a :class:`SelectionPolicy`. The default takes ``torch.topk``. Parity tests and experiments can force
recorded decisions (near-tied scores can legally reorder between implementations) by passing another policy
to ``model(..., policy=...)`` instead of threading flags through every call.
"""

from __future__ import annotations

import torch
from torch import Tensor


class SelectionPolicy:
    """Chooses indices of the ``k`` best scores along dim 1, best first. Override any method to force
    decisions; each receives the scores it would rank so overrides can check shapes."""

    def foreground(self, scores: Tensor, k: int, layer: int) -> Tensor:
        """``scores [B, N]`` masked foreground logits -> token ids ``[B, k]`` updated by encoder ``layer``."""
        return torch.topk(scores, k, dim=1)[1]

    def oesm(self, scores: Tensor, k: int, layer: int) -> Tensor:
        """``scores [B, K_l]`` multi-category scores of the layer's tokens -> positions ``[B, k]`` within them."""
        return torch.topk(scores, k, dim=1)[1]

    def proposals(self, scores: Tensor, k: int) -> Tensor:
        """``scores [B, N]`` max class logit per token -> token ids ``[B, k]`` in query order."""
        return torch.topk(scores, k, dim=1)[1]

    def detections(self, scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """``scores [B, Q * C]`` probabilities -> (values ``[B, k]``, flat indices ``[B, k]``)."""
        values, indices = torch.topk(scores, k, dim=1)
        return values, indices


DEFAULT_POLICY = SelectionPolicy()
