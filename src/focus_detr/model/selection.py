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


class StableSelectionPolicy(SelectionPolicy):
    """Top-k by a stable descending sort: equal scores keep token order (level, then row-major).

    Exact ties are common (every token whose proposal box is invalid gets the same constant feature and
    score), and ``torch.topk`` breaks them in an order that depends on the tensor length. A stable order
    makes an image's decisions independent of how much padding its batch adds (batch-invariant mode).
    """

    @staticmethod
    def _top(scores: Tensor, k: int) -> Tensor:
        return torch.sort(scores, dim=1, descending=True, stable=True)[1][:, :k]

    def foreground(self, scores: Tensor, k: int, layer: int) -> Tensor:
        return self._top(scores, k)

    def oesm(self, scores: Tensor, k: int, layer: int) -> Tensor:
        return self._top(scores, k)

    def proposals(self, scores: Tensor, k: int) -> Tensor:
        return self._top(scores, k)

    def detections(self, scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
        indices = self._top(scores, k)
        return torch.gather(scores, 1, indices), indices


DEFAULT_POLICY = SelectionPolicy()
STABLE_POLICY = StableSelectionPolicy()
