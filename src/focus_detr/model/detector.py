"""The Focus-DETR detector: backbone -> neck -> foreground token selector -> focus encoder -> two-stage
query selection -> DINO decoder -> heads. Losses and data live elsewhere; this module only predicts.

``forward`` runs one named method per stage (see :mod:`.stages`), each with its shapes in its signature.
Level sizes travel as Python ints (``shapes``, read from the feature maps), never read back from a tensor,
and the batch semantics are one :class:`~.batching.Batching` object; so the stages run as they are under
``torch.export`` for an un-padded image (:mod:`focus_detr.export.onnx` only wraps them).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import FocusDETRConfig
from ..layers.deformable_attention import MultiScaleDeformableAttention
from ..layers.mlp import MLP
from ..layers.position_encoding import PositionEmbeddingSine
from ..ops.boxes import box_cxcywh_to_xyxy, fast_nms_keep, inverse_sigmoid
from ..ops.images import ImageBatch, batch_images
from .batching import Batching, LevelMaps, batching_for
from .decoder import DINODecoder
from .denoising import DenoisingQueries, prepare_denoising
from .encoder import FocusEncoder, TokenSelection, plan_token_selection
from .foreground_selector import ForegroundTokenSelector, token_proposals
from .neck import ChannelMapper
from .outputs import DenoisingOutputs, EncoderTrace, FocusDETROutputs, Predictions
from .postprocess import Detections, postprocess
from .selection import SelectionPolicy
from .stages import stage

#: Level sizes ``(H_l, W_l)``, fine to coarse, as Python ints (symbolic sizes under ``torch.export``).
Shapes = Sequence[tuple[int, int]]


def _encoder_reference_points(shapes: Shapes, valid_ratios: Tensor) -> Tensor:
    """Token centres, normalised by each image's valid region: ``[B, N, L, 2]`` (x, y) on every level."""
    points = []
    device = valid_ratios.device
    for level, (h, w) in enumerate(shapes):
        # arange + 0.5 gives the half-integers of linspace(0.5, h - 0.5, h) exactly (step 1.0).
        ref_y, ref_x = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                                      torch.arange(w, dtype=torch.float32, device=device) + 0.5, indexing="ij")
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


def _valid_ratios(mask: Tensor) -> Tensor:
    """``[B, H, W]`` padding mask -> ``[B, 2]`` valid ``(w, h)`` fraction (from the first row / column)."""
    _, h, w = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


def demote_duplicate_proposals(scores: Tensor, coords: Tensor, num_queries: int, iou_threshold: float,
                               policy: SelectionPolicy) -> Tensor:
    """Distinct query selection: ranking scores in which near-duplicate proposals come last.

    Args:
        scores: ``[B, N]`` ranking score per token (max class logit; ``-inf`` for excluded tokens).
        coords: ``[B, N, 4]`` proposal boxes as cxcywh logits.
    Returns ``[B, N]``: the candidates (the best ``4 * num_queries``) that overlap a better candidate by more
    than ``iou_threshold`` get their score lowered by the image's score range (+1), below every other token,
    so they are only taken when fewer distinct proposals than queries exist; their order among themselves
    is kept.
    """
    num_candidates = torch.sym_min(scores.shape[1], 4 * num_queries)  # sym_min: symbolic sizes in ONNX export
    candidates = policy.proposals(scores, num_candidates)  # [B, M], best first
    boxes = box_cxcywh_to_xyxy(torch.gather(coords, 1, candidates[..., None].expand(-1, -1, 4)).sigmoid())
    keep = fast_nms_keep(boxes, iou_threshold)
    finite = torch.isfinite(scores)
    highest = scores.masked_fill(~finite, float("-inf")).amax(1, keepdim=True)
    lowest = scores.masked_fill(~finite, float("inf")).amin(1, keepdim=True)
    offset = (highest - lowest).nan_to_num(0.0).clamp(min=0.0) + 1.0
    candidate_scores = torch.gather(scores, 1, candidates)
    return scores.scatter(1, candidates, torch.where(keep, candidate_scores, candidate_scores - offset))


@dataclass
class Tokens:
    """The flattened multi-scale tokens of a batch (levels fine to coarse, row-major), read by every stage
    after the neck.

    features:          ``[B, N, C]`` neck features (no position embedding).
    pos:               ``[B, N, C]`` sine position + level embedding.
    padding_mask:      ``[B, N]`` bool, True on padding.
    attention_mask:    ``padding_mask`` as deformable attention takes it (None when nothing is padded).
    shapes:            per level ``(H_l, W_l)`` as Python ints.
    spatial_shapes:    ``[L, 2]`` long, the same as a tensor (for deformable attention and the outputs).
    valid_ratios:      ``[B, L, 2]`` ``(w, h)`` fraction of each level covered by the image.
    reference_points:  ``[B, N, L, 2]`` token centres on every level.
    valid_counts:      ``[B]`` non-padded tokens per image.
    proposals:         ``[B, N, 4]`` one box proposal per token (logits, ``+inf`` where unusable).
    proposal_valid:    ``[B, N]`` bool, where the proposal is usable.
    """

    features: Tensor
    pos: Tensor
    padding_mask: Tensor
    attention_mask: Tensor | None
    shapes: Shapes
    spatial_shapes: Tensor
    valid_ratios: Tensor
    reference_points: Tensor
    valid_counts: Tensor
    proposals: Tensor
    proposal_valid: Tensor


@dataclass
class QuerySelection:
    """The decoder's queries, chosen from the encoder tokens (two-stage), denoising queries in front.

    indices:            ``[B, Q]`` token ids chosen as proposals, in query order.
    target:             ``[B, P + Q, C]`` content queries (``P`` denoising queries first, 0 without).
    reference_boxes:    ``[B, P + Q, 4]`` initial sigmoid boxes.
    proposals:          the two-stage proposals' class logits ``[B, Q, K]`` and boxes ``[B, Q, 4]``.
    max_logits:         ``[B, N]`` max-over-classes proposal logit of every token.
    padding_mask:       ``[B, P + Q]`` True on query slots an image cannot fill, or None.
    self_attn_mask:     ``[P + Q, P + Q]`` denoising attention mask, or None.
    denoising:          the denoising queries (training with targets), or None.
    """

    indices: Tensor
    target: Tensor
    reference_boxes: Tensor
    proposals: Predictions
    max_logits: Tensor
    padding_mask: Tensor | None
    self_attn_mask: Tensor | None
    denoising: DenoisingQueries | None


class FocusDETR(nn.Module):
    """Focus-DETR. Build it with :func:`focus_detr.build_model`.

    ``forward(batch, targets=None, policy=None) -> FocusDETROutputs``; ``postprocess(outputs)`` turns the
    result into detections; ``predict(images)`` takes PIL images / arrays / paths and does everything.
    """

    def __init__(self, cfg: FocusDETRConfig, backbone: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        embed_dim = cfg.embed_dim
        num_levels = cfg.num_levels
        self.backbone = backbone
        in_channels = [backbone.out_channels[name] for name in backbone.out_features]
        self.neck = ChannelMapper(in_channels, embed_dim, num_extra_levels=num_levels - len(in_channels))
        pe = cfg.position_embedding
        self.position_embedding = PositionEmbeddingSine(embed_dim // 2, pe.temperature, pe.normalize, pe.scale,
                                                        pe.eps, pe.offset)
        self.level_embed = nn.Parameter(torch.empty(num_levels, embed_dim))
        # Token projection shared by the foreground selector and the two-stage proposals (official
        # enc_output / enc_output_norm).
        self.token_proj = nn.Linear(embed_dim, embed_dim)
        self.token_proj_norm = nn.LayerNorm(embed_dim)
        mode = cfg.encoder.mode
        self.foreground_selector = ForegroundTokenSelector(embed_dim, num_levels) if mode != "dense" else None
        self.encoder = FocusEncoder(cfg.encoder, embed_dim, num_levels)
        self.decoder = DINODecoder(cfg.decoder, embed_dim, num_levels)
        self.target_embed = nn.Embedding(cfg.decoder.num_queries, embed_dim)
        self._init_transformer()

        # Heads: one per decoder layer plus one for the two-stage proposals. They start as identical copies
        # (the official deep-copies one initialised prototype).
        class_head = nn.Linear(embed_dim, cfg.num_classes)
        nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))
        box_head = MLP(embed_dim, embed_dim, 4, 3)
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        self.class_heads = nn.ModuleList(copy.deepcopy(class_head) for _ in range(cfg.decoder.num_layers))
        self.box_heads = nn.ModuleList(copy.deepcopy(box_head) for _ in range(cfg.decoder.num_layers))
        # The proposal class head is also the encoder's multi-category score predictor (OESM): one module,
        # used in three places, saved once (the official checkpoint stores it under 14 alias names).
        self.proposal_class_head = copy.deepcopy(class_head)
        self.proposal_box_head = copy.deepcopy(box_head)
        self.dn_label_embed = nn.Embedding(cfg.num_classes, embed_dim)

    def _init_transformer(self) -> None:
        # Official order: xavier on every transformer matrix, then the deformable-attention init, then level
        # embeddings ~ N(0, 1).
        for module in (self.encoder, self.decoder, self.token_proj, self.target_embed):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        if self.foreground_selector is not None:
            for p in self.foreground_selector.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    @property
    def device(self) -> torch.device:
        return self.level_embed.device

    @property
    def batching(self) -> Batching:
        """The batch semantics of ``cfg.batch_mode`` (read at each call: the config may be replaced)."""
        return batching_for(self.cfg.batch_mode)

    @property
    def default_policy(self) -> SelectionPolicy:
        """The decision policy used when none is given (stable top-k in batch-invariant mode)."""
        return self.batching.policy

    def save_pretrained(self, folder: str, extra: dict | None = None):
        """Write ``folder/config.json`` + ``folder/model.safetensors`` (the Hugging Face layout; needs the
        ``hf`` extra); ``focus_detr.from_pretrained(folder)`` loads it back. Files are :mod:`focus_detr.weights`'."""
        from ..weights.hf import save_pretrained  # the file formats live above the model; imported on use

        return save_pretrained(self, folder, extra)

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Upload in the Hugging Face layout to Hub repo ``repo_id`` (needs the ``hub`` extra); returns its URL."""
        from ..weights.hf import push_to_hub

        return push_to_hub(self, repo_id, private=private, token=token)

    def batch(self, images: list[Tensor]) -> ImageBatch:
        """Normalise and pad ``[3, h, w]`` RGB images (0..255) into an :class:`ImageBatch` on the model's device."""
        return batch_images([im.to(self.device) for im in images], self.cfg.pixel_mean, self.cfg.pixel_std)

    # ---- stages ----------------------------------------------------------------------------------
    def neck_features(self, x: Tensor) -> list[Tensor]:
        """Backbone (run once) then neck: ``[B, 3, H, W]`` -> list of ``[B, C, H_l, W_l]``, fine to coarse."""
        outs = self.backbone(x)
        return self.neck([outs[name] for name in self.backbone.out_features])

    def extract_features(self, batch: ImageBatch, batching: Batching) -> LevelMaps:
        """Stage ``backbone``: ``[B, 3, H, W]`` images -> per level ``[B, C, H_l, W_l]`` features and masks."""
        return batching.level_maps(self.neck_features, batch, self.training)

    def flatten_tokens(self, levels: LevelMaps, batching: Batching) -> Tokens:
        """Stage ``preparation``: per level ``[B, C, H_l, W_l]`` -> ``[B, N, C]`` tokens with positions,
        masks, reference points and proposals (see :class:`Tokens`)."""
        feats, masks = levels.features, levels.masks
        shapes = [(f.shape[2], f.shape[3]) for f in feats]
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=self.device)
        features = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)
        padding_mask = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat([self.position_embedding(m).flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                         for lvl, m in enumerate(masks)], 1)
        valid_ratios = torch.stack([_valid_ratios(m) for m in masks], 1)
        proposals, proposal_valid = token_proposals(padding_mask, shapes)
        return Tokens(features, pos, padding_mask, batching.attention_mask(padding_mask), shapes, spatial_shapes,
                      valid_ratios, _encoder_reference_points(shapes, valid_ratios), (~padding_mask).sum(1),
                      proposals, proposal_valid)

    def project_tokens(self, x: Tensor, tokens: Tokens) -> Tensor:
        """``[B, N, C]`` -> the shared token projection ``[B, N, C]``, zero input where no proposal is usable."""
        return self.token_proj_norm(self.token_proj(x.masked_fill(~tokens.proposal_valid[..., None], 0.0)))

    def select_tokens(self, tokens: Tokens, levels: LevelMaps, batching: Batching, policy: SelectionPolicy
                      ) -> tuple[Tensor | None, Tensor | None, TokenSelection | None]:
        """Stage ``token_selection``: foreground logits ``[B, N]``, the ranking they give (padding last,
        ``[B, N]``) and the cascade's token sets; all None in dense mode (every layer updates every token)."""
        if self.foreground_selector is None:
            return None, None, None
        cfg = self.cfg.encoder  # read at each call: keep_ratio may be changed for inference
        projected = self.project_tokens(tokens.features + tokens.pos, tokens)
        logits = self.foreground_selector(projected, tokens.shapes, levels.valid, levels.sizes)
        ranking = batching.rank_foreground(logits, tokens.padding_mask)
        ratios = cfg.cascade if cfg.mode == "focus" else (1.0,) * cfg.num_layers
        selection = plan_token_selection(ranking, tokens.valid_counts, cfg.keep_ratio, ratios, batching, policy)
        return logits, ranking, selection

    def encode(self, tokens: Tokens, selection: TokenSelection | None, ranking: Tensor | None,
               batching: Batching, policy: SelectionPolicy) -> tuple[Tensor, list[Tensor]]:
        """Stage ``encoder``: tokens -> memory ``[B, N, C]`` and per layer the OESM token ids ``[B, M_l]``."""
        return self.encoder(tokens.features, tokens.pos, tokens.reference_points, tokens.attention_mask,
                            tokens.spatial_shapes, selection, ranking, self.proposal_class_head, batching, policy)

    def select_queries(self, memory: Tensor, tokens: Tokens, batching: Batching, policy: SelectionPolicy,
                       targets: list[dict[str, Tensor]] | None = None) -> QuerySelection:
        """Stage ``query_selection``: memory ``[B, N, C]`` -> the ``Q = min(num_queries, N)`` best proposals
        as queries (distinct ones first with ``query_nms_iou``), plus denoising queries in training."""
        cfg = self.cfg
        output_memory = self.project_tokens(memory, tokens)
        proposal_logits = self.proposal_class_head(output_memory)
        max_logits = proposal_logits.max(-1)[0]
        ranking = batching.rank_proposals(max_logits, tokens.padding_mask)
        num_queries = torch.sym_min(cfg.decoder.num_queries, max_logits.shape[1])
        if cfg.decoder.query_nms_iou is not None:
            # Duplicate demotion compares proposal boxes, so every token's box is needed.
            proposal_coords = self.proposal_box_head(output_memory) + tokens.proposals
            ranking = demote_duplicate_proposals(ranking.detach(), proposal_coords.detach(), num_queries,
                                                 cfg.decoder.query_nms_iou, policy)
        topk = policy.proposals(ranking, num_queries)
        padding = batching.query_padding(num_queries, tokens.valid_counts)
        topk_memory = torch.gather(output_memory, 1, topk[..., None].expand(-1, -1, output_memory.shape[-1]))
        if cfg.decoder.query_nms_iou is not None:
            topk_coords = torch.gather(proposal_coords, 1, topk[..., None].expand(-1, -1, 4))
        else:
            # The box head is row-wise, so only the Q selected rows need it (the official code runs it on all
            # N tokens and gathers: the same values, two [N, C] x [C, C] products saved, ~3 % of a forward).
            topk_proposals = torch.gather(tokens.proposals, 1, topk[..., None].expand(-1, -1, 4))
            topk_coords = self.proposal_box_head(topk_memory) + topk_proposals
        reference_boxes = topk_coords.detach().sigmoid()
        proposals = Predictions(self.proposal_class_head(topk_memory), topk_coords.sigmoid())
        target = self.target_embed.weight[:num_queries][None].repeat(memory.shape[0], 1, 1)

        dn = None
        if self.training and targets is not None:
            dn = prepare_denoising(targets, cfg.denoising.num_queries, cfg.denoising.label_noise_ratio,
                                   cfg.denoising.box_noise_scale, cfg.num_classes, self.dn_label_embed, num_queries)
        self_attn_mask = None
        if dn is not None:
            target = torch.cat([dn.content, target], 1)
            reference_boxes = torch.cat([dn.boxes.sigmoid(), reference_boxes], 1)
            self_attn_mask = dn.attn_mask
            if padding is not None:
                padding = torch.cat([padding.new_zeros(padding.shape[0], dn.content.shape[1]), padding], 1)
        return QuerySelection(topk, target, reference_boxes, proposals, max_logits, padding, self_attn_mask, dn)

    def decode(self, queries: QuerySelection, memory: Tensor, tokens: Tokens, batching: Batching
               ) -> tuple[list[Predictions], list[Tensor]]:
        """Stage ``decoder``: queries and memory ``[B, N, C]`` -> per decoder layer its predictions (class
        logits ``[B, P + Q, K]``, sigmoid boxes ``[B, P + Q, 4]``) and refined boxes ``[B, P + Q, 4]``."""
        hidden, refined = self.decoder(queries.target, queries.reference_boxes, memory, tokens.attention_mask,
                                       tokens.spatial_shapes, tokens.valid_ratios, self.box_heads,
                                       queries.self_attn_mask, queries.padding_mask,
                                       batching.position_scale(tokens.valid_ratios))
        # Keeps the label embedding in the graph when denoising is off, so DDP sees every parameter used.
        hidden[0] = hidden[0] + self.dn_label_embed.weight[0, 0] * 0.0
        predictions = []
        for layer, h in enumerate(hidden):
            ref = queries.reference_boxes if layer == 0 else refined[layer - 1]
            predictions.append(Predictions(self.class_heads[layer](h),
                                           (self.box_heads[layer](h) + inverse_sigmoid(ref)).sigmoid()))
        return predictions, refined

    # ---- the whole forward -----------------------------------------------------------------------
    def forward(self, batch: ImageBatch, targets: list[dict[str, Tensor]] | None = None,
                policy: SelectionPolicy | None = None, batching: Batching | None = None) -> FocusDETROutputs:
        """Run the detector.

        Args:
            batch:    images from :meth:`batch` / the data collate.
            targets:  training targets (``labels [n]``, ``boxes [n, 4]`` cxcywh normalised); used for denoising
                      queries in training mode only.
            policy:   decision policy (default: plain top-k in official mode, stable top-k in batch-invariant mode).
            batching: batch semantics (default: :attr:`batching` for this batch; the ONNX export passes
                      :data:`~focus_detr.model.batching.UNPADDED`).

        Convenience: anything else :meth:`predict` takes (a path, an http(s) URL, a PIL image, an array, or
        a list of them) is passed to :meth:`predict`, so ``model("photo.jpg")`` returns its
        :class:`Detections` (a list for a list).
        """
        if not isinstance(batch, ImageBatch):
            if targets is not None or policy is not None:
                raise TypeError("targets / policy need an ImageBatch (model.batch(...)); for images call "
                                "model(images) or model.predict(images, ...)")
            return self.predict(batch)  # type: ignore[return-value]
        batching = batching or self.batching.for_batch(batch)
        policy = policy or batching.policy
        with stage("backbone"):
            levels = self.extract_features(batch, batching)
        with stage("preparation"):
            tokens = self.flatten_tokens(levels, batching)
        with stage("token_selection"):
            foreground_logits, ranking, selection = self.select_tokens(tokens, levels, batching, policy)
        with stage("encoder"):
            memory, oesm_ids = self.encode(tokens, selection, ranking, batching, policy)
        with stage("query_selection"):
            queries = self.select_queries(memory, tokens, batching, policy, targets)
        with stage("decoder"):
            predictions, refined = self.decode(queries, memory, tokens, batching)
            query_padding_mask = queries.padding_mask
            denoising = None
            if queries.denoising is not None:
                dn = queries.denoising
                num_dn = dn.content.shape[1]
                denoising = DenoisingOutputs(torch.stack([p.logits[:, :num_dn] for p in predictions]),
                                             torch.stack([p.boxes[:, :num_dn] for p in predictions]),
                                             dn.num_groups, dn.max_gt)
                predictions = [Predictions(p.logits[:, num_dn:], p.boxes[:, num_dn:]) for p in predictions]
                refined = [x[:, num_dn:] for x in refined]
                if query_padding_mask is not None:
                    query_padding_mask = query_padding_mask[:, num_dn:]

        if selection is not None:
            trace = EncoderTrace(selection.token_counts, selection.indices, selection.write_back, oesm_ids)
        else:
            trace = EncoderTrace(tokens.valid_counts, [], [], [])
        spatial_shapes = tokens.spatial_shapes
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        return FocusDETROutputs(
            main=predictions[-1], aux=predictions[:-1], encoder_proposals=queries.proposals, denoising=denoising,
            foreground_logits=foreground_logits, spatial_shapes=spatial_shapes,
            level_start_index=level_start_index, valid_ratios=tokens.valid_ratios,
            token_padding_mask=tokens.padding_mask, image_sizes=batch.image_sizes, proposal_indices=queries.indices,
            encoder_trace=trace, memory=memory, reference_boxes=refined, proposal_max_logits=queries.max_logits,
            query_padding_mask=query_padding_mask,
        )

    # ----------------------------------------------------------------------------------------------
    def postprocess(self, outputs: FocusDETROutputs, original_sizes: Tensor | None = None,
                    score_threshold: float = 0.0, max_detections: int | None = None,
                    policy: SelectionPolicy | None = None) -> list[Detections]:
        """Detections per image in pixels of ``original_sizes`` (default: the network input sizes)."""
        return postprocess(outputs.main.logits, outputs.main.boxes, outputs.image_sizes, original_sizes,
                           max_detections or self.cfg.num_detections, self.cfg.class_names,
                           outputs.query_padding_mask, score_threshold, policy or self.default_policy)

    @torch.no_grad()
    def predict(self, images, score_threshold: float = 0.0, max_detections: int | None = None,
                batch_size: int = 1) -> list[Detections]:
        """Detect objects in PIL images, numpy arrays (HW, HWC; uint8/uint16/float), image file paths or
        http(s) URLs (downloaded to a temporary file, :func:`focus_detr.data.url_io.download_url`).

        Each image is decoded (:func:`focus_detr.data.image_io.to_rgb_array`) and given the official
        test-time resize (:func:`focus_detr.model.preprocess.preprocess`: shorter side ``cfg.test_short_side``,
        longer side at most ``cfg.test_max_size``), then normalised when batched; returns one
        :class:`Detections` per image, boxes in pixels of the original image. Accepts one image or a list.
        """
        # One of the two places the model imports from data (README "Layout"; the other is Detections.plot): predict takes paths, URLs, PIL images
        # and arrays, so it needs the decoder. data.image_io is a leaf (it imports only data.url_io and
        # data.errors); nothing else of data is used, and importing it here, not at the top, keeps the
        # model package free of data when it is loaded.
        from ..data.image_io import to_rgb_array
        from .preprocess import preprocess

        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        was_training = self.training
        self.eval()
        results: list[Detections] = []
        try:
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                tensors, originals = [], []
                for item in chunk:
                    tensor, original = preprocess(to_rgb_array(item), self.cfg)
                    tensors.append(tensor)
                    originals.append(original)
                batch = self.batch(tensors)
                outputs = self(batch)
                results.extend(self.postprocess(outputs, torch.tensor(originals), score_threshold, max_detections))
        finally:
            self.train(was_training)
        return results[0] if single else results
