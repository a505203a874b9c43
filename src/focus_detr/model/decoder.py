"""DINO decoder: deformable cross-attention with iterative box refinement (look-forward-twice)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import DecoderConfig
from ..layers.deformable_attention import MultiScaleDeformableAttention
from ..layers.mlp import MLP, FeedForward
from ..layers.position_encoding import box_sine_embedding
from ..ops.boxes import inverse_sigmoid


class DecoderLayer(nn.Module):
    """self-attention -> LN -> deformable cross-attention -> LN -> FFN -> LN."""

    def __init__(self, embed_dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int,
                 dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.self_attn_dropout = nn.Dropout(dropout)
        self.self_attn_norm = nn.LayerNorm(embed_dim)
        self.cross_attn = MultiScaleDeformableAttention(embed_dim, num_heads, num_levels, num_points)
        self.cross_attn_dropout = nn.Dropout(dropout)
        self.cross_attn_norm = nn.LayerNorm(embed_dim)
        self.ffn = FeedForward(embed_dim, ffn_dim, dropout)
        self.ffn_norm = nn.LayerNorm(embed_dim)

    def forward(self, target: Tensor, query_pos: Tensor, reference_boxes: Tensor, memory: Tensor,
                memory_padding_mask: Tensor | None, spatial_shapes: Tensor, self_attn_mask: Tensor | None,
                query_padding_mask: Tensor | None) -> Tensor:
        """``target, query_pos [B, Q, C]``, ``reference_boxes [B, Q, L, 4]``, ``memory [B, N, C]`` -> ``[B, Q, C]``.

        ``self_attn_mask [Q, Q]`` bool, True = may not attend (denoising groups); ``query_padding_mask [B, Q]``
        True on queries that other queries must ignore (proposal slots of images with too few tokens).
        """
        q = target + query_pos
        attn = self.self_attn(q, q, target, attn_mask=self_attn_mask, key_padding_mask=query_padding_mask,
                              need_weights=False)[0]
        target = self.self_attn_norm(target + self.self_attn_dropout(attn))
        attn = self.cross_attn(target + query_pos, reference_boxes, memory, spatial_shapes, memory_padding_mask)
        target = self.cross_attn_norm(target + self.cross_attn_dropout(attn))
        return self.ffn_norm(self.ffn(target))


class DINODecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, embed_dim: int, num_levels: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(embed_dim, cfg.num_heads, num_levels, cfg.num_points, cfg.ffn_dim, cfg.dropout)
            for _ in range(cfg.num_layers)
        )
        self.ref_point_head = MLP(2 * embed_dim, embed_dim, embed_dim, 2)
        self.norm = nn.LayerNorm(embed_dim)
        self.embed_dim = embed_dim

    def forward(
        self,
        target: Tensor,
        reference_boxes: Tensor,
        memory: Tensor,
        memory_padding_mask: Tensor | None,
        spatial_shapes: Tensor,
        valid_ratios: Tensor,
        box_heads: nn.ModuleList,
        self_attn_mask: Tensor | None = None,
        query_padding_mask: Tensor | None = None,
        position_scale: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """
        Args:
            target:          ``[B, Q, C]`` content queries.
            reference_boxes: ``[B, Q, 4]`` initial sigmoid boxes (cxcywh, valid-region normalised).
            box_heads:       one box head per layer; refines the boxes between layers.
            position_scale:  ``[B, 1, 4]`` factor on the boxes before their position embedding (official: the
                             level-0 valid ratio, which makes a query's position depend on the batch padding),
                             or None for the boxes themselves (batch-invariant; the official batch-of-1 result).
        Returns:
            per layer, the normalised hidden states ``[B, Q, C]`` and the refined boxes ``[B, Q, 4]``
            (not detached: look-forward-twice lets the next layer's loss reach this layer's head).
        """
        hidden, refined = [], []
        scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        for layer, box_head in zip(self.layers, box_heads):
            boxes_per_level = reference_boxes[:, :, None] * scale
            pos_boxes = reference_boxes if position_scale is None else reference_boxes * position_scale
            query_pos = self.ref_point_head(box_sine_embedding(pos_boxes, self.embed_dim // 2))
            target = layer(target, query_pos, boxes_per_level, memory, memory_padding_mask, spatial_shapes,
                           self_attn_mask, query_padding_mask)
            new_boxes = (box_head(target) + inverse_sigmoid(reference_boxes)).sigmoid()
            reference_boxes = new_boxes.detach()
            hidden.append(self.norm(target))
            refined.append(new_boxes)
        return hidden, refined
