"""The token-sparse encoder: dual attention on the selected tokens (Focus-DETR), or dense (DINO) / sparse."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import EncoderConfig
from ..layers.deformable_attention import MultiScaleDeformableAttention
from ..layers.mlp import FeedForward
from .batching import Batching
from .selection import SelectionPolicy, StableSelectionPolicy


@dataclass
class TokenSelection:
    """Which tokens each encoder layer updates.

    indices:     per layer ``[B, K_l]`` token ids, best foreground score first.
    write_back:  per layer ``[B, K_l]`` bool: slots whose result is written back into the token sequence
                 (False on the extra slots that a smaller image gets in a batch).
    token_counts:``[B]`` foreground budget per image.
    writes_all:  per layer, True when every slot of ``write_back`` is known to be True (one image, or images
                 of one budget), so the encoder can skip keeping the old values. False when unknown (export).
    """

    indices: list[Tensor]
    write_back: list[Tensor]
    token_counts: Tensor
    writes_all: list[bool] | None = None

    def layer_writes_all(self, layer: int) -> bool:
        return bool(self.writes_all is not None and self.writes_all[layer])


def plan_token_selection(
    scores: Tensor,
    valid_counts: Tensor,
    keep_ratio: float,
    ratios: tuple[float, ...],
    batching: Batching,
    policy: SelectionPolicy,
) -> TokenSelection:
    """Top-k token sets of every encoder layer from one score map.

    Args:
        scores:       ``[B, N]`` foreground logits with padded tokens already pushed to the bottom.
        valid_counts: ``[B]`` non-padded tokens per image.
        keep_ratio:   foreground budget ``n_b = int(keep_ratio * valid_b) + 1``.
        ratios:       per-layer fraction of the budget (the cascade).
        batching:     how the budgets of a batch combine (:meth:`~.batching.Batching.layer_budget`): per image
                      (batch-invariant), or the batch's largest for every image (official).
    """
    # float32 products truncated to int, exactly as the official code computes them.
    token_counts = (valid_counts.to(torch.float32) * keep_ratio).int() + 1
    token_counts = torch.minimum(token_counts, valid_counts.to(torch.int32).clamp(min=1))
    indices, write_back = [], []
    num_tokens = scores.shape[1]
    budgets = [batching.layer_budget(token_counts, ratio) for ratio in torch.tensor(ratios, dtype=torch.float32)]
    writes_all = None
    if budgets and not torch.compiler.is_exporting():
        # One host read for all layers: does every image own every slot of its layer's top-k?
        writes_all = torch.stack([own.min() >= largest.clamp(max=num_tokens) for largest, own in budgets]).tolist()
    # The stable policy's top-k of every layer is a prefix of one stable descending sort of the same scores:
    # sort once instead of once per layer (same indices, exactly). Other policies decide per layer; the
    # exported graph keeps one top-k per layer (its sizes are symbolic).
    shared_order = None
    if budgets and type(policy) is StableSelectionPolicy and not torch.compiler.is_exporting():
        largest_k = int(torch.stack([largest for largest, _ in budgets]).clamp(max=num_tokens).max())
        if largest_k > 0:
            shared_order = policy.foreground(scores, largest_k, 0)
    for layer, (largest, own) in enumerate(budgets):
        k = largest.clamp(max=num_tokens).item()  # an unbacked size under torch.export: tell it the bounds
        torch._check(k >= 0)
        torch._check(k <= num_tokens)
        if torch.compiler.is_exporting():
            # The exported graph assumes every layer keeps a token (its inputs are large enough, see
            # focus_detr.export.onnx.MIN_SIZE); eager runs also take layers with none.
            torch._check(k >= 1)
        indices.append(shared_order[:, :k] if shared_order is not None else policy.foreground(scores, k, layer))
        write_back.append(torch.arange(k, device=scores.device)[None, :] < own.to(scores.device)[:, None])
    return TokenSelection(indices, write_back, token_counts, writes_all)


def _gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x [B, N, ...]``, ``index [B, K]`` -> ``[B, K, ...]``."""
    # Whole rows by index_select, not torch.gather with the index expanded over the trailing dims: on CPU the
    # element-wise gather of [K, C] rows is an order of magnitude slower, worse with several threads
    # (benchmarks/RESULTS.md, "Contention"). Same values.
    if x.shape[0] == 1:
        return x[0].index_select(0, index[0]).unsqueeze(0)
    batch, n = x.shape[0], x.shape[1]
    offsets = torch.arange(batch, device=index.device)[:, None] * n
    rows = x.reshape(batch * n, *x.shape[2:]).index_select(0, (index + offsets).flatten())
    return rows.view(batch, index.shape[1], *x.shape[2:])


def _scatter_tokens(x: Tensor, index: Tensor, rows: Tensor, in_place: bool = False) -> Tensor:
    """``x [B, N, C]`` with ``rows [B, K, C]`` written at ``index [B, K]`` (ids unique within an image).

    Whole rows by ``index_copy``, not ``scatter`` with the index expanded over the channels (3.5x faster on
    CPU for 11k of 22k rows; same values). ``in_place`` writes into ``x`` itself and returns it; only for
    tensors no one else holds and autograd does not record (the encoder's inference path).
    """
    batch, n = x.shape[0], x.shape[1]
    if batch == 1:
        if in_place:
            x[0].index_copy_(0, index[0], rows[0])
            return x
        return x[0].index_copy(0, index[0], rows[0]).unsqueeze(0)
    flat_index = (index + torch.arange(batch, device=index.device)[:, None] * n).flatten()
    flat_rows = rows.reshape(batch * index.shape[1], *rows.shape[2:])
    if in_place:
        x.view(batch * n, *x.shape[2:]).index_copy_(0, flat_index, flat_rows)
        return x
    return x.reshape(batch * n, *x.shape[2:]).index_copy(0, flat_index, flat_rows).view(x.shape)


class EncoderLayer(nn.Module):
    """One encoder layer: [OESM self-attention ->] deformable attention -> LN -> FFN -> LN."""

    def __init__(self, embed_dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int,
                 dropout: float, with_oesm: bool) -> None:
        super().__init__()
        self.with_oesm = with_oesm
        if with_oesm:
            self.oesm_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
            self.oesm_norm = nn.LayerNorm(embed_dim)
        self.cross_attn = MultiScaleDeformableAttention(embed_dim, num_heads, num_levels, num_points)
        self.cross_attn_dropout = nn.Dropout(dropout)
        self.cross_attn_norm = nn.LayerNorm(embed_dim)
        self.ffn = FeedForward(embed_dim, ffn_dim, dropout)
        self.ffn_norm = nn.LayerNorm(embed_dim)

    def object_enhanced_self_attention(self, x: Tensor, pos: Tensor, positions: Tensor,
                                       key_padding_mask: Tensor | None, in_place: bool = False) -> Tensor:
        """Self-attention among the tokens at ``positions [B, M]`` of ``x [B, K, C]``; others unchanged.

        ``in_place``: write the results into ``x`` (see :func:`_scatter_tokens`)."""
        y = _gather_tokens(x, positions)
        q = y + _gather_tokens(pos, positions)
        y = y + self.oesm_attn(q, q, y, key_padding_mask=key_padding_mask, need_weights=False)[0]
        y = self.oesm_norm(y)
        return _scatter_tokens(x, positions, y, in_place)

    def forward(self, x: Tensor, pos: Tensor, reference_points: Tensor, value: Tensor,
                value_padding_mask: Tensor | None, spatial_shapes: Tensor) -> Tensor:
        """``x, pos [B, K, C]``, ``reference_points [B, K, L, 2]``, ``value [B, N, C]`` -> ``[B, K, C]``."""
        attn = self.cross_attn(x + pos, reference_points, value, spatial_shapes, value_padding_mask)
        x = self.cross_attn_norm(x + self.cross_attn_dropout(attn))
        return self.ffn_norm(self.ffn(x))


class FocusEncoder(nn.Module):
    """Stack of encoder layers over a subset of tokens per layer (or all tokens in dense mode)."""

    def __init__(self, cfg: EncoderConfig, embed_dim: int, num_levels: int) -> None:
        super().__init__()
        self.cfg = cfg
        with_oesm = cfg.mode == "focus"
        self.layers = nn.ModuleList(
            EncoderLayer(embed_dim, cfg.num_heads, num_levels, cfg.num_points, cfg.ffn_dim, cfg.dropout, with_oesm)
            for _ in range(cfg.num_layers)
        )
        self.sample_features = cfg.resolved_value_source() == "features"

    def forward(
        self,
        features: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        padding_mask: Tensor | None,
        spatial_shapes: Tensor,
        selection: TokenSelection | None,
        foreground_scores: Tensor | None,
        category_head: nn.Module | None,
        batching: Batching,
        policy: SelectionPolicy,
    ) -> tuple[Tensor, list[Tensor]]:
        """
        Args:
            features:          ``[B, N, C]`` flattened neck features (no position embedding).
            pos:               ``[B, N, C]`` position + level embedding.
            reference_points:  ``[B, N, L, 2]`` token centres on every level.
            padding_mask:      ``[B, N]`` True on padding (None: no padding).
            selection:         tokens per layer (None: every layer updates every token, dense mode).
            foreground_scores: ``[B, N]`` foreground logits used by OESM (focus mode).
            category_head:     multi-category score predictor (the two-stage class head, shared).
            batching:          batch semantics (which slots of a smaller image take part in OESM).
        Returns:
            memory ``[B, N, C]`` and, per layer, the token ids that took part in OESM ``[B, M_l]``.
        """
        out = features
        oesm_token_ids: list[Tensor] = []
        # Inference writes each layer's rows into one copy of the features instead of copying all N tokens per
        # layer (out-of-place, as autograd and graph capture need).
        in_place = (selection is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                    and not torch.compiler.is_exporting() and features.is_contiguous())
        if in_place:
            out = features.clone()
        for layer_id, layer in enumerate(self.layers):
            value = features if self.sample_features else out
            if selection is None:
                out = layer(out, pos, reference_points, value, padding_mask, spatial_shapes)
                continue
            index = selection.indices[layer_id]
            writes_all = selection.layer_writes_all(layer_id)
            previous = _gather_tokens(out, index)
            x = previous
            x_pos = _gather_tokens(pos, index)
            ref = _gather_tokens(reference_points, index)
            if layer.with_oesm:
                assert foreground_scores is not None and category_head is not None
                # `previous` is a fresh gather; it may be overwritten when its old values are not needed below.
                x, ids = self._oesm(layer, layer_id, x, x_pos, index, selection.write_back[layer_id],
                                    foreground_scores, category_head, batching, policy, in_place and writes_all)
                oesm_token_ids.append(ids)
            x = layer(x, x_pos, ref, value, padding_mask, spatial_shapes)
            if not writes_all:
                # Only the image's own budget is written back; extra slots of smaller images keep the old value.
                keep = selection.write_back[layer_id][..., None]
                x = torch.where(keep, x, previous)
            out = _scatter_tokens(out, index, x, in_place)
        return out, oesm_token_ids

    def _oesm(self, layer: EncoderLayer, layer_id: int, x: Tensor, x_pos: Tensor, index: Tensor,
              own_slots: Tensor, foreground_scores: Tensor, category_head: nn.Module, batching: Batching,
              policy: SelectionPolicy, in_place: bool) -> tuple[Tensor, Tensor]:
        category_logits = category_head(x).max(-1)[0]
        fg = torch.gather(foreground_scores, 1, index)
        if self.cfg.oesm_score == "logit_product":
            # Official: product of raw logits (two negative logits rank high; kept for checkpoint parity).
            score = category_logits * fg
        else:
            score = category_logits.sigmoid() * fg.sigmoid()
        num = torch.sym_min(self.cfg.oesm_topk, x.shape[1])
        score, key_padding_mask = batching.mask_oesm(score, own_slots, num)
        positions = policy.oesm(score, num, layer_id)
        x = layer.object_enhanced_self_attention(x, x_pos, positions, key_padding_mask, in_place)
        return x, torch.gather(index, 1, positions)
