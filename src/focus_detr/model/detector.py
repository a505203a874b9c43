"""The Focus-DETR detector: backbone -> neck -> foreground token selector -> focus encoder -> two-stage
query selection -> DINO decoder -> heads. Losses and data live elsewhere; this module only predicts."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import FocusDETRConfig
from ..layers.deformable_attention import MultiScaleDeformableAttention
from ..layers.mlp import MLP
from ..layers.position_encoding import PositionEmbeddingSine
from ..ops.boxes import box_cxcywh_to_xyxy, fast_nms_keep, inverse_sigmoid
from ..ops.images import ImageBatch, batch_images
from .decoder import DINODecoder
from .denoising import prepare_denoising
from .encoder import FocusEncoder, TokenSelection, plan_token_selection
from .foreground_selector import ForegroundTokenSelector, token_proposals
from .neck import ChannelMapper
from .outputs import DenoisingOutputs, EncoderTrace, FocusDETROutputs, Predictions
from .postprocess import Detections, postprocess
from .selection import DEFAULT_POLICY, STABLE_POLICY, SelectionPolicy


def _flatten_levels(maps: list[Tensor]) -> Tensor:
    """List of ``[B, C, H_l, W_l]`` -> ``[B, sum H_l W_l, C]``."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)


def _encoder_reference_points(spatial_shapes: Tensor, valid_ratios: Tensor) -> Tensor:
    """Token centres, normalised by each image's valid region: ``[B, N, L, 2]`` (x, y) on every level."""
    points = []
    device = valid_ratios.device
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


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


def _valid_ratios(mask: Tensor) -> Tensor:
    """``[B, H, W]`` padding mask -> ``[B, 2]`` valid ``(w, h)`` fraction (from the first row / column)."""
    _, h, w = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


class FocusDETR(nn.Module):
    """Focus-DETR. Build it with :func:`focus_detr.build_model`.

    ``forward(batch, targets=None, policy=None) -> FocusDETROutputs``; ``detect(batch)`` adds
    post-processing; ``predict(images)`` takes PIL images / arrays / paths and does everything.
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

    # ----------------------------------------------------------------------------------------------
    # Stage markers: benchmarks set ``stage_callback`` to a function receiving the name of each stage as it
    # begins ("backbone" (backbone + neck), "preparation", "token_selection", "encoder", "query_selection",
    # "decoder" (decoder + heads), then "end"). No cost when unset.
    stage_callback = None

    def _mark(self, stage: str) -> None:
        if self.stage_callback is not None:
            self.stage_callback(stage)

    @property
    def device(self) -> torch.device:
        return self.level_embed.device

    @property
    def default_policy(self) -> SelectionPolicy:
        return STABLE_POLICY if self.per_image else DEFAULT_POLICY

    @property
    def per_image(self) -> bool:
        return self.cfg.batch_mode == "invariant"

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

    def _neck_features(self, x: Tensor) -> list[Tensor]:
        """Backbone (run once) then neck: ``[B, 3, H, W]`` -> list of ``[B, C, H_l, W_l]``, fine to coarse."""
        outs = self.backbone(x)
        return self.neck([outs[name] for name in self.backbone.out_features])

    def _features(self, batch: ImageBatch) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
        """Neck features per level ``[B, C, H_l, W_l]``, padding masks per level ``[B, H_l, W_l]`` and, in
        batch-invariant mode, each image's own feature size per level ``[B, L, 2]``."""
        x = batch.tensor
        sizes = batch.image_sizes
        full = bool((sizes[:, 0] == x.shape[2]).all() and (sizes[:, 1] == x.shape[3]).all())
        if not self.per_image:
            feats = self._neck_features(x)
            if self.training:
                pixel_mask = batch.padding_mask.to(x.dtype)
            else:
                # Official eval quirk: padding counts as image (all-zero mask).
                pixel_mask = torch.zeros_like(batch.padding_mask, dtype=x.dtype)
            masks = [F.interpolate(pixel_mask[None], size=f.shape[-2:]).to(torch.bool)[0] for f in feats]
            return feats, masks, None
        if full:
            feats = self._neck_features(x)
            level_sizes = torch.tensor([list(f.shape[-2:]) for f in feats], device=x.device)
            level_sizes = level_sizes[None].expand(x.shape[0], -1, -1).contiguous()
        else:
            # Images of different sizes run through the backbone one by one: convolutions and GroupNorm would
            # otherwise see the batch padding, and an image's features would depend on its batch mates.
            per_image = []
            for b in range(x.shape[0]):
                h, w = sizes[b].tolist()
                xb = x[b:b + 1, :, :h, :w]
                per_image.append(self._neck_features(xb))
            feats = []
            for level in range(len(per_image[0])):
                hmax = max(p[level].shape[2] for p in per_image)
                wmax = max(p[level].shape[3] for p in per_image)
                feats.append(torch.stack([F.pad(p[level][0], (0, wmax - p[level].shape[3], 0, hmax - p[level].shape[2]))
                                          for p in per_image]))
            level_sizes = torch.tensor([[list(p[level].shape[-2:]) for level in range(len(p))] for p in per_image],
                                       device=x.device)
        masks = []
        for level, f in enumerate(feats):
            h, w = f.shape[-2:]
            rows = torch.arange(h, device=x.device)[None, :, None] >= level_sizes[:, level, 0, None, None]
            cols = torch.arange(w, device=x.device)[None, None, :] >= level_sizes[:, level, 1, None, None]
            masks.append(rows | cols)
        return feats, masks, level_sizes

    def forward(self, batch: ImageBatch, targets: list[dict[str, Tensor]] | None = None,
                policy: SelectionPolicy | None = None) -> FocusDETROutputs:
        """Run the detector.

        Args:
            batch:   images from :meth:`batch` / the data collate.
            targets: training targets (``labels [n]``, ``boxes [n, 4]`` cxcywh normalised); used for denoising
                     queries in training mode only.
            policy:  decision policy (default: plain top-k in official mode, stable top-k in batch-invariant mode).

        Convenience: anything else :meth:`predict` takes (a path, an http(s) URL, a PIL image, an array, or
        a list of them) is passed to :meth:`predict`, so ``model("photo.jpg")`` returns its
        :class:`Detections` (a list for a list).
        """
        if not isinstance(batch, ImageBatch):
            if targets is not None or policy is not None:
                raise TypeError("targets / policy need an ImageBatch (model.batch(...)); for images call "
                                "model(images) or model.predict(images, ...)")
            return self.predict(batch)  # type: ignore[return-value]
        policy = policy or self.default_policy
        cfg = self.cfg
        self._mark("backbone")
        feats, masks, level_sizes = self._features(batch)
        self._mark("preparation")
        batch_size = feats[0].shape[0]
        pos_maps = [self.position_embedding(m) for m in masks]
        spatial_shapes = torch.as_tensor([list(f.shape[-2:]) for f in feats], dtype=torch.long, device=self.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        features = _flatten_levels(feats)
        padding_mask = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                         for lvl, p in enumerate(pos_maps)], 1)
        valid_ratios = torch.stack([_valid_ratios(m) for m in masks], 1)
        reference_points = _encoder_reference_points(spatial_shapes, valid_ratios)
        valid_counts = (~padding_mask).sum(1)

        # ---- foreground token selection -------------------------------------------------------------
        self._mark("token_selection")
        foreground_logits = None
        selection: TokenSelection | None = None
        ranking = None
        if self.foreground_selector is not None:
            _, proposal_valid = token_proposals(padding_mask, spatial_shapes)
            tokens = self.token_proj_norm(self.token_proj((features + pos).masked_fill(~proposal_valid[..., None], 0.0)))
            foreground_logits = self.foreground_selector(tokens, spatial_shapes, level_sizes)
            if self.per_image:
                ranking = foreground_logits.masked_fill(padding_mask, float("-inf"))
            else:
                # Official: padded tokens get the batch-wide minimum (they can still be selected).
                ranking = foreground_logits.masked_fill(padding_mask, foreground_logits.min())
            ratios = cfg.encoder.cascade if cfg.encoder.mode == "focus" else (1.0,) * cfg.encoder.num_layers
            selection = plan_token_selection(ranking, valid_counts, cfg.encoder.keep_ratio, ratios, self.per_image,
                                             policy)

        # ---- encoder --------------------------------------------------------------------------------
        self._mark("encoder")
        memory, oesm_ids = self.encoder(
            features, pos, reference_points, padding_mask, spatial_shapes, selection,
            ranking, self.proposal_class_head, self.per_image, policy)

        # ---- two-stage query selection ----------------------------------------------------------------
        self._mark("query_selection")
        proposals, proposal_valid = token_proposals(padding_mask, spatial_shapes)
        output_memory = self.token_proj_norm(self.token_proj(memory.masked_fill(~proposal_valid[..., None], 0.0)))
        proposal_logits = self.proposal_class_head(output_memory)
        proposal_coords = self.proposal_box_head(output_memory) + proposals
        proposal_scores = proposal_logits.max(-1)[0]
        ranking_scores = proposal_scores
        if self.per_image:
            ranking_scores = proposal_scores.masked_fill(padding_mask, float("-inf"))
        num_queries = min(cfg.decoder.num_queries, proposal_scores.shape[1])
        if cfg.decoder.query_nms_iou is not None:
            ranking_scores = demote_duplicate_proposals(ranking_scores.detach(), proposal_coords.detach(),
                                                        num_queries, cfg.decoder.query_nms_iou, policy)
        topk = policy.proposals(ranking_scores, num_queries)
        query_padding_mask = None
        if self.per_image:
            query_padding_mask = torch.arange(num_queries, device=self.device)[None, :] >= valid_counts[:, None]
            if not bool(query_padding_mask.any()):
                query_padding_mask = None
        topk_coords = torch.gather(proposal_coords, 1, topk[..., None].expand(-1, -1, 4))
        reference_boxes = topk_coords.detach().sigmoid()
        topk_memory = torch.gather(output_memory, 1, topk[..., None].expand(-1, -1, output_memory.shape[-1]))
        encoder_proposals = Predictions(self.proposal_class_head(topk_memory), topk_coords.sigmoid())
        target = self.target_embed.weight[:num_queries][None].repeat(batch_size, 1, 1)

        # ---- denoising queries (training) --------------------------------------------------------------
        dn = None
        if self.training and targets is not None:
            dn = prepare_denoising(targets, cfg.denoising.num_queries, cfg.denoising.label_noise_ratio,
                                   cfg.denoising.box_noise_scale, cfg.num_classes, self.dn_label_embed, num_queries)
        self_attn_mask = None
        num_dn = 0
        if dn is not None:
            num_dn = dn.content.shape[1]
            target = torch.cat([dn.content, target], 1)
            reference_boxes = torch.cat([dn.boxes.sigmoid(), reference_boxes], 1)
            self_attn_mask = dn.attn_mask
            if query_padding_mask is not None:
                query_padding_mask = torch.cat([query_padding_mask.new_zeros(batch_size, num_dn), query_padding_mask], 1)
        init_reference = reference_boxes

        # ---- decoder and heads -----------------------------------------------------------------------
        self._mark("decoder")
        hidden, refined = self.decoder(target, reference_boxes, memory, padding_mask, spatial_shapes, valid_ratios,
                                       self.box_heads, self_attn_mask, query_padding_mask,
                                       position_from_scaled_boxes=not self.per_image)
        # Keeps the label embedding in the graph when denoising is off, so DDP sees every parameter used.
        hidden[0] = hidden[0] + self.dn_label_embed.weight[0, 0] * 0.0
        all_logits, all_boxes = [], []
        for layer, h in enumerate(hidden):
            ref = init_reference if layer == 0 else refined[layer - 1]
            all_logits.append(self.class_heads[layer](h))
            all_boxes.append((self.box_heads[layer](h) + inverse_sigmoid(ref)).sigmoid())
        denoising = None
        if dn is not None:
            denoising = DenoisingOutputs(torch.stack([x[:, :num_dn] for x in all_logits]),
                                         torch.stack([x[:, :num_dn] for x in all_boxes]), dn.num_groups, dn.max_gt)
            all_logits = [x[:, num_dn:] for x in all_logits]
            all_boxes = [x[:, num_dn:] for x in all_boxes]
            refined = [x[:, num_dn:] for x in refined]
            if query_padding_mask is not None:
                query_padding_mask = query_padding_mask[:, num_dn:]
        preds = [Predictions(lg, bx) for lg, bx in zip(all_logits, all_boxes)]
        self._mark("end")

        if selection is not None:
            trace = EncoderTrace(selection.token_counts, selection.indices, selection.write_back, oesm_ids)
        else:
            trace = EncoderTrace(valid_counts, [], [], [])
        return FocusDETROutputs(
            main=preds[-1], aux=preds[:-1], encoder_proposals=encoder_proposals, denoising=denoising,
            foreground_logits=foreground_logits, spatial_shapes=spatial_shapes,
            level_start_index=level_start_index, valid_ratios=valid_ratios, token_padding_mask=padding_mask,
            image_sizes=batch.image_sizes, proposal_indices=topk, encoder_trace=trace, memory=memory,
            reference_boxes=refined, proposal_max_logits=proposal_scores, query_padding_mask=query_padding_mask,
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
