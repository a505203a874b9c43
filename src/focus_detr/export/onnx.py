"""ONNX export of Focus-DETR with a dynamic input size.

What is exported
----------------
:class:`ExportableFocusDETR` is the inference path of :meth:`FocusDETR.forward` for **one un-padded image**
(batch 1, eval mode, ``batch_mode="invariant"``), restated so that nothing in it turns a tensor *value*
into a Python decision. It reuses the model's own modules (backbone, neck, position embedding, token
projection, foreground score network, encoder and decoder layers, heads), so the weights and the maths are
the model's; only the glue differs:

* feature-level sizes come from the feature maps' (symbolic) shapes instead of ``spatial_shapes.tolist()``;
* the foreground token budgets of the cascade are computed in float32 tensor arithmetic, exactly as
  :func:`~focus_detr.model.encoder.plan_token_selection` does, and handed to ``topk`` as a data-dependent
  size, so the ONNX ``TopK`` nodes take ``K`` from the graph: the token budget follows the image size;
* the deformable-attention sampling core is the reference one (``F.grid_sample``, one call per level),
  given the level sizes directly (see :func:`_ms_deform_attn_with_shapes`);
* branches that the eager model takes on tensor values (padding masks, "is any query padding") are
  resolved statically: with one un-padded image there is no padding;
* every top-k goes through the model's :class:`~focus_detr.model.selection.SelectionPolicy` (stable top-k
  in batch-invariant mode), as in the model.

Inputs and outputs of the ONNX graph (``B = 1``, ``H``, ``W`` dynamic):

=====================  ===================  ==========================================================
name                   shape / dtype        meaning
=====================  ===================  ==========================================================
``image``              ``[1, 3, H, W]`` f32  RGB in 0..255, already resized by the test-time rule
                                            (:func:`focus_detr.model.preprocess.preprocess`)
``logits``             ``[1, Q, C]`` f32     class logits of the final decoder layer
``boxes``              ``[1, Q, 4]`` f32     sigmoid ``(cx, cy, w, h)`` normalised to the input size
``scores``             ``[1, K]`` f32        top-``K`` sigmoid scores over queries x classes, descending
``labels``             ``[1, K]`` i64        class id of each score
``boxes_xyxy``         ``[1, K, 4]`` f32     its box in pixels of ``image``, clipped to the image
``query_indices``      ``[1, K]`` i64        the decoder query that produced it
=====================  ===================  ==========================================================

``Q = min(num_queries, number of tokens)`` and ``K = min(num_detections, Q * C)``. Scaling boxes to the
original photo (``x * W0 / W``, ``y * H0 / H``) and the score threshold are left to the caller (see
:class:`OnnxDetector`). The model's config is stored in the file's metadata (``focus_detr_config``), so
:class:`OnnxDetector` can apply the same resize and class names without the weights file.

Limits: batch size 1 (the batch-invariant model runs images of different sizes one by one anyway); the
``focus`` encoder mode only; each input side between :data:`MIN_SIZE` and :data:`MAX_SIZE` pixels (the
test-time resize gives e.g. 800 x 1333; only images with an aspect ratio beyond ~1:20 fall below the
minimum); a model in ``batch_mode="official"`` is exported with the batch-invariant single-image maths
(it differs from the official mode only at float rounding level for one un-padded image).

The exporter is torch's dynamo-based ``torch.onnx.export(..., dynamo=True, dynamic_shapes=...)``
(needs the optional packages ``onnx`` and ``onnxscript``; ``onnxruntime`` runs the result). The legacy
TorchScript exporter is not used: tracing freezes every Python-side size (level shapes, token budgets).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.detector import FocusDETR, _flatten_levels, _valid_ratios, demote_duplicate_proposals
from ..ops import ms_deform_attn as msda
from ..ops.boxes import box_cxcywh_to_xyxy, inverse_sigmoid

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime

#: ONNX opset the graph is written for (GridSample needs >= 16; TopK with a graph-computed K is opset >= 10).
DEFAULT_OPSET = 18
#: Smallest input side the exported graph accepts: every one of the 4 levels (stride 64) keeps >= 1 cell
#: and the 2-layer cascade keeps >= 1 token per layer.
MIN_SIZE = 65
#: Largest input side declared to the exporter (any size up to it works; the test-time resize gives <= 1333).
MAX_SIZE = 4096
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["logits", "boxes", "scores", "labels", "boxes_xyxy", "query_indices"]


class OnnxExportError(RuntimeError):
    """Export is not possible for this model or environment (the message says why)."""


def _require(module: str, purpose: str) -> Any:
    """Import an optional dependency or explain how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{purpose} needs the optional package {module!r}: pip install 'focus-detr[onnx]' "
                          f"(or pip install onnx onnxscript onnxruntime)") from e


# --------------------------------------------------------------------------------------------------
# Shape-explicit versions of the few helpers that read sizes with ``.tolist()``.

def _ms_deform_attn_with_shapes(value: Tensor, shapes: Sequence[tuple[Any, Any]], sampling_locations: Tensor,
                                attention_weights: Tensor) -> Tensor:
    """:func:`~focus_detr.ops.ms_deform_attn.ms_deform_attn_reference` with the level sizes given as
    (possibly symbolic) ints instead of read from a tensor; same shapes, same operations."""
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        value_l = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * num_heads, head_dim, h, w)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(batch * num_heads, 1, num_queries, num_levels * num_points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


@contextmanager
def _deform_attn_shapes(shapes: Sequence[tuple[Any, Any]]) -> Iterator[None]:
    """Make every deformable-attention call inside the block use ``shapes``.

    ``MultiScaleDeformableAttention`` calls :func:`~focus_detr.ops.ms_deform_attn.ms_deform_attn`, whose
    implementations read the level sizes with ``spatial_shapes.tolist()``; during export that would freeze
    them to the example's size. The process-wide implementation choice is the only seam, so it is switched
    for the duration of the trace and restored afterwards.
    """
    previous = msda.current_implementation()
    msda.register_implementation(
        "_onnx_export", lambda value, _ss, loc, w: _ms_deform_attn_with_shapes(value, shapes, loc, w))
    msda.select_implementation("_onnx_export")
    try:
        yield
    finally:
        msda.select_implementation(previous)
        # Unregister too: outside the trace the closure's shapes are stale, so it must not stay selectable.
        msda._IMPLEMENTATIONS.pop("_onnx_export", None)


def _encoder_reference_points(shapes: Sequence[tuple[Any, Any]], device: torch.device) -> Tensor:
    """``[1, N, L, 2]`` token centres (``_encoder_reference_points`` for an un-padded image: valid ratio 1).

    ``arange + 0.5`` equals the model's ``linspace(0.5, h - 0.5, h)`` exactly (half-integers are exact in
    float32) and, unlike linspace, has no division by ``h - 1`` for a one-cell level."""
    points = []
    for h, w in shapes:
        ref_y, ref_x = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                                      torch.arange(w, dtype=torch.float32, device=device) + 0.5, indexing="ij")
        points.append(torch.stack((ref_x.reshape(-1)[None] / w, ref_y.reshape(-1)[None] / h), -1))
    num_levels = len(shapes)
    return torch.cat(points, 1)[:, :, None].expand(-1, -1, num_levels, -1)


def _token_proposals(shapes: Sequence[tuple[Any, Any]], device: torch.device) -> tuple[Tensor, Tensor]:
    """:func:`~focus_detr.model.foreground_selector.token_proposals` for an un-padded image (``[1, N, 4]``
    box logits, ``[1, N]`` valid)."""
    proposals = []
    for level, (h, w) in enumerate(shapes):
        grid_y, grid_x = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                                        torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
        scale = torch.stack([torch.full((), w, dtype=torch.float32, device=device),
                             torch.full((), h, dtype=torch.float32, device=device)])
        grid = (grid.unsqueeze(0) + 0.5) / scale.view(1, 1, 1, 2)
        wh = torch.ones_like(grid) * 0.05 * (2.0 ** level)
        proposals.append(torch.cat((grid, wh), -1).view(1, -1, 4))
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1)
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(~valid[..., None], float("inf"))
    return proposals, valid


class ExportableFocusDETR(nn.Module):
    """``image [1, 3, H, W]`` (RGB 0..255, resized) -> ``(logits, boxes, scores, labels, boxes_xyxy,
    query_indices)``.

    Wraps a :class:`FocusDETR` (sharing its parameters) and follows its ``forward`` for one un-padded image
    in eval mode; see the module docstring for what differs and why.
    """

    def __init__(self, model: FocusDETR) -> None:
        super().__init__()
        cfg = model.cfg
        if cfg.encoder.mode != "focus":
            raise OnnxExportError(f"ONNX export supports encoder mode 'focus' only, this model uses {cfg.encoder.mode!r}")
        self.model = model
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        device = image.device
        x = (image - self.pixel_mean) / self.pixel_std
        feats = m.neck([m.backbone(x)[n] for n in m.backbone.out_features])
        shapes = [(f.shape[2], f.shape[3]) for f in feats]
        with _deform_attn_shapes(shapes):
            return self._transformer(feats, shapes, image.shape[2], image.shape[3], device)

    def _transformer(self, feats: list[Tensor], shapes: list[tuple[Any, Any]], img_h: Any, img_w: Any,
                     device: torch.device) -> tuple[Tensor, ...]:
        m, cfg = self.model, self.model.cfg
        masks = [torch.zeros(1, h, w, dtype=torch.bool, device=device) for h, w in shapes]
        pos_maps = [m.position_embedding(mask) for mask in masks]
        spatial_shapes = torch.stack([torch.stack([torch.full((), h, dtype=torch.long, device=device),
                                                   torch.full((), w, dtype=torch.long, device=device)])
                                      for h, w in shapes])
        features = _flatten_levels(feats)
        num_tokens = features.shape[1]
        padding_mask = torch.zeros(1, num_tokens, dtype=torch.bool, device=device)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + m.level_embed[lvl].view(1, 1, -1)
                         for lvl, p in enumerate(pos_maps)], 1)
        valid_ratios = torch.stack([_valid_ratios(mask) for mask in masks], 1)
        reference_points = _encoder_reference_points(shapes, device)

        # ---- foreground token selector (model.foreground_selector.forward, level sizes from shapes) ------
        _, proposal_valid = _token_proposals(shapes, device)
        tokens = m.token_proj_norm(m.token_proj((features + pos).masked_fill(~proposal_valid[..., None], 0.0)))
        fg = self._foreground_logits(tokens, shapes)

        # ---- token budgets: float32 arithmetic of plan_token_selection, K stays in the graph -------------
        enc = cfg.encoder
        valid_count = torch.full((1,), num_tokens, dtype=torch.float32, device=device)
        count = (valid_count * enc.keep_ratio).int() + 1
        count = torch.minimum(count, torch.full_like(count, num_tokens))
        # The model's own decision policy (stable top-k in batch-invariant mode: exact ties, e.g. the identical
        # tokens whose proposal box is invalid, resolve to the lowest index; exported as ONNX TopK, whose ties
        # also go to the lowest index).
        policy = m.default_policy
        selected = []
        for layer, ratio in enumerate(torch.tensor(enc.cascade, dtype=torch.float32)):
            k_t = (ratio * count.to(torch.float32)).int()
            k = k_t.max().item()
            torch._check(k >= 1)
            torch._check(k <= num_tokens)
            selected.append(policy.foreground(fg, k, layer))

        # ---- encoder (FocusEncoder.forward without the batch bookkeeping) --------------------------------
        memory = features
        for layer_id, layer in enumerate(m.encoder.layers):
            value = features if m.encoder.sample_features else memory
            index = selected[layer_id]
            x = _gather(memory, index)
            x_pos = _gather(pos, index)
            ref = _gather(reference_points, index)
            category = m.proposal_class_head(x).max(-1)[0]
            fg_sel = torch.gather(fg, 1, index)
            score = category * fg_sel if enc.oesm_score == "logit_product" else category.sigmoid() * fg_sel.sigmoid()
            num = torch.sym_min(enc.oesm_topk, x.shape[1])
            positions = policy.oesm(score, num, layer_id)
            x = layer.object_enhanced_self_attention(x, x_pos, positions, None)
            x = layer(x, x_pos, ref, value, padding_mask, spatial_shapes)
            memory = memory.scatter(1, index[..., None].expand(-1, -1, memory.shape[-1]), x)

        # ---- two-stage query selection -------------------------------------------------------------------
        proposals, proposal_valid = _token_proposals(shapes, device)
        output_memory = m.token_proj_norm(m.token_proj(memory.masked_fill(~proposal_valid[..., None], 0.0)))
        proposal_logits = m.proposal_class_head(output_memory)
        proposal_coords = m.proposal_box_head(output_memory) + proposals
        num_queries = torch.sym_min(cfg.decoder.num_queries, num_tokens)
        ranking = proposal_logits.max(-1)[0]
        if cfg.decoder.query_nms_iou is not None:
            ranking = demote_duplicate_proposals(ranking, proposal_coords, num_queries, cfg.decoder.query_nms_iou,
                                                 policy)
        topk = policy.proposals(ranking, num_queries)
        reference_boxes = torch.gather(proposal_coords, 1, topk[..., None].expand(-1, -1, 4)).sigmoid()
        target = m.target_embed.weight[:num_queries][None]

        # ---- decoder and heads ----------------------------------------------------------------------------
        hidden, refined = m.decoder(target, reference_boxes, memory, padding_mask, spatial_shapes, valid_ratios,
                                    m.box_heads, None, None, position_from_scaled_boxes=not m.per_image)
        last = len(hidden) - 1
        ref = reference_boxes if last == 0 else refined[last - 1]
        logits = m.class_heads[last](hidden[last])
        boxes = (m.box_heads[last](hidden[last]) + inverse_sigmoid(ref)).sigmoid()

        # ---- post-processing (model.postprocess without the threshold / rescaling) ----------------------
        num_classes = logits.shape[2]
        prob = logits.sigmoid().reshape(1, -1)
        num_det = torch.sym_min(cfg.num_detections, num_queries * num_classes)
        scores, flat = policy.detections(prob, num_det)
        query = torch.div(flat, num_classes, rounding_mode="floor")
        labels = flat % num_classes
        picked = torch.gather(boxes, 1, query[..., None].expand(-1, -1, 4))
        size = torch.stack([torch.full((), img_w, dtype=torch.float32, device=device),
                            torch.full((), img_h, dtype=torch.float32, device=device)]).repeat(2)
        xyxy = box_cxcywh_to_xyxy(picked) * size
        xyxy = torch.minimum(torch.maximum(xyxy, torch.zeros_like(size)), size)
        return logits, boxes, scores, labels, xyxy, query

    def _foreground_logits(self, tokens: Tensor, shapes: list[tuple[Any, Any]]) -> Tensor:
        """ForegroundTokenSelector.forward for one un-padded image (batch-invariant weighting)."""
        selector = self.model.foreground_selector
        channels = tokens.shape[2]
        starts = [0]
        for h, w in shapes:
            starts.append(starts[-1] + h * w)
        num_levels = len(shapes)
        scores: list[Tensor] = [tokens] * num_levels
        coarser: Tensor | None = None
        for i, level in enumerate(reversed(range(num_levels))):
            h, w = shapes[level]
            x = tokens[:, starts[level]:starts[level + 1]]
            valid = torch.ones(1, h * w, dtype=torch.bool, device=tokens.device)
            if coarser is not None:
                up = F.interpolate(coarser, (h, w), mode="bilinear", align_corners=True)
                grid = x.reshape(1, h, w, channels).permute(0, 3, 1, 2)
                x = x + (grid * up * selector.alpha[i - 1]).permute(0, 2, 3, 1).reshape(1, -1, channels)
            score = selector.score_net(x, valid)
            scores[level] = score
            coarser = score.reshape(1, 1, h, w)
        return torch.cat(scores, dim=1).squeeze(-1)


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """``x [B, N, ...]``, ``index [B, K]`` -> ``[B, K, ...]``."""
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, expanded)


# --------------------------------------------------------------------------------------------------
# Export and running the exported graph


@dataclass
class ExportReport:
    """What :func:`export_onnx` did: the file, the opset, how long it took and the verification results."""

    path: Path
    opset: int
    example_size: tuple[int, int]
    seconds: float
    size_bytes: int
    # One entry per verification size: {"size": (h, w), "logits": max |diff|, "boxes": ..., "scores": ...}
    checks: list[dict[str, Any]] = field(default_factory=list)


def default_example_size(cfg: Any) -> tuple[int, int]:
    """The network-input size of a 480 x 640 photo after the model's test-time resize (a typical input)."""
    from ..ops.images import resized_shape

    return resized_shape(480, 640, cfg.test_short_side, cfg.test_max_size)


def export_onnx(model: FocusDETR, path: str | os.PathLike[str], opset: int = DEFAULT_OPSET,
                example_size: tuple[int, int] | None = None,
                verify_sizes: Sequence[tuple[int, int]] | None = None) -> ExportReport:
    """Export ``model`` to ``path`` as an ONNX graph with a dynamic image size (see the module docstring).

    ``example_size`` is the ``(H, W)`` traced (default: :func:`default_example_size`). With
    ``verify_sizes`` (and onnxruntime installed), the file is run on random images of those sizes and
    compared with the PyTorch model; the differences are in the report (nothing is asserted here).
    """
    _require("onnx", "ONNX export")
    _require("onnxscript", "ONNX export (torch's dynamo-based exporter)")
    from ..config import config_to_dict

    start = time.perf_counter()
    cpu_model = copy.deepcopy(model).cpu().eval()
    wrapper = ExportableFocusDETR(cpu_model).eval()
    h, w = example_size or default_example_size(cpu_model.cfg)
    _check_size(h, w)
    example = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)) * 255.0
    dim_h = torch.export.Dim("height", min=MIN_SIZE, max=MAX_SIZE)
    dim_w = torch.export.Dim("width", min=MIN_SIZE, max=MAX_SIZE)
    # The exporter narrates every step on stdout and its optimizer logs per node; keep them for errors only.
    log = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(log), _quiet_loggers():
            program = torch.onnx.export(
                wrapper, (example,), dynamo=True, dynamic_shapes={"image": {2: dim_h, 3: dim_w}},
                input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, opset_version=opset, verbose=False,
                custom_translation_table={torch.ops.aten.sort.stable: _onnx_sort_stable})
    except Exception as e:  # noqa: BLE001 - re-raised with the exporter's own log attached
        tail = "\n".join(log.getvalue().strip().splitlines()[-15:])
        raise OnnxExportError(f"torch.onnx.export failed: {type(e).__name__}: {str(e)[:2000]}\n{tail}") from e
    assert program is not None
    program.model.metadata_props["focus_detr_config"] = json.dumps(config_to_dict(cpu_model.cfg))
    program.model.metadata_props["focus_detr_outputs"] = ",".join(OUTPUT_NAMES)
    program.model.metadata_props["focus_detr_input"] = "image [1, 3, H, W] float32 RGB 0..255, resized"
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    program.save(out, external_data=False)
    report = ExportReport(out, opset, (h, w), 0.0, out.stat().st_size)
    if verify_sizes:
        report.checks = compare_with_pytorch(cpu_model, out, verify_sizes)
    report.seconds = time.perf_counter() - start
    return report


def _onnx_sort_stable(self: Any, stable: bool | None = None, dim: int = -1, descending: bool = False) -> Any:
    """ONNX for ``aten.sort.stable`` (the stable top-k of the batch-invariant policy), which torch's ONNX
    library does not cover: a full-length ``TopK``. ONNX defines TopK's ties to go to the lower index, so
    it is a stable sort. (Same construction as the library's ``aten::sort``.)"""
    from onnxscript import opset18 as op

    dim_size = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
    return op.TopK(self, dim_size, axis=dim, largest=descending, sorted=True)


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    names = ["torch.onnx", "onnxscript", "onnx_ir", "torch._dynamo", "torch.export", "torch.fx"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_size(h: int, w: int) -> None:
    if not (MIN_SIZE <= h <= MAX_SIZE and MIN_SIZE <= w <= MAX_SIZE):
        raise ValueError(f"the exported graph takes inputs of {MIN_SIZE}..{MAX_SIZE} pixels per side, got {h}x{w}")


def _session(path: str | os.PathLike[str]) -> "onnxruntime.InferenceSession":
    ort = _require("onnxruntime", "running an exported ONNX file")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_with_pytorch(model: FocusDETR, onnx_path: str | os.PathLike[str],
                         sizes: Sequence[tuple[int, int]], seed: int = 0) -> list[dict[str, Any]]:
    """Run the ONNX file and ``model`` on one random image per size; max absolute differences per output.

    ``logits`` / ``boxes`` compare every query. The post-processed outputs are ranked by score, and
    scores that differ by rounding can swap places, so ``scores`` compares the sorted score lists and
    ``detections_agree`` says whether label and box agree for every detection whose score is further than
    1e-5 from its neighbours.
    """
    session = _session(onnx_path)
    model = model.eval()
    generator = torch.Generator().manual_seed(seed)
    checks = []
    for h, w in sizes:
        image = torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8)
        with torch.no_grad():
            ref = model(model.batch([image.to(model.device)]))
            det = model.postprocess(ref, max_detections=None)[0]
        logits, boxes, scores, labels, xyxy, _ = session.run(None, {"image": image[None].float().numpy()})
        checks.append({
            "size": (h, w),
            "logits": float(np.abs(logits - ref.main.logits.cpu().numpy()).max()),
            "boxes": float(np.abs(boxes - ref.main.boxes.cpu().numpy()).max()),
            "scores": float(np.abs(np.sort(scores[0]) - np.sort(det.scores.cpu().numpy())).max())
            if scores.shape[1] == det.scores.numel() else float("inf"),
            "detections_agree": _detections_agree(scores[0], labels[0], xyxy[0], det),
        })
    return checks


def _detections_agree(scores: np.ndarray, labels: np.ndarray, boxes: np.ndarray, det: Any,
                      gap: float = 1e-5, box_atol: float = 1e-2) -> bool:
    """Label and box agree for every ONNX detection whose score is unambiguous (no other score within
    ``gap`` in either list), compared with the PyTorch detection of the nearest score."""
    ref_scores = det.scores.cpu().numpy()
    ref_labels = det.labels.cpu().numpy()
    ref_boxes = det.boxes.cpu().numpy()
    all_scores = np.concatenate([scores, ref_scores])
    for i, s in enumerate(scores):
        if (np.abs(all_scores - s) < gap).sum() > 2:  # itself + its counterpart; more means a near-tie
            continue
        j = int(np.argmin(np.abs(ref_scores - s)))
        if abs(ref_scores[j] - s) >= gap:
            if s - gap <= ref_scores.min():  # just below the other list's top-K cut
                continue
            return False
        if ref_labels[j] != labels[i] or np.abs(ref_boxes[j] - boxes[i]).max() > box_atol:
            return False
    return True


class OnnxDetector:
    """Runs an exported file with onnxruntime: ``OnnxDetector("model.onnx").predict(image) -> Detections``.

    The config stored in the file gives the test-time resize and the class names; boxes are returned in
    pixels of the original image, as :meth:`FocusDETR.predict` does.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from ..config import config_from_dict

        onnx = _require("onnx", "reading an exported ONNX file's metadata")
        self.path = Path(path)
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if "focus_detr_config" not in meta:
            raise ValueError(f"{path}: not exported by focus-detr (no focus_detr_config metadata)")
        self.cfg = config_from_dict(json.loads(meta["focus_detr_config"]))
        self.session = _session(path)

    def prepare(self, image: Any) -> tuple[np.ndarray, tuple[int, int]]:
        """Image (path, PIL, array) -> (``[1, 3, h, w]`` float32 network input, original ``(H, W)``)."""
        from ..data.image_io import to_rgb_array
        from ..model.preprocess import preprocess

        network_input, original = preprocess(to_rgb_array(image), self.cfg)  # as FocusDETR.predict
        _check_size(*network_input.shape[1:])
        return np.ascontiguousarray(network_input.numpy()[None], dtype=np.float32), original

    def run(self, network_input: np.ndarray) -> dict[str, np.ndarray]:
        """Raw outputs (see the module docstring) for a prepared ``[1, 3, h, w]`` input."""
        return dict(zip(OUTPUT_NAMES, self.session.run(None, {"image": network_input})))

    def predict(self, image: Any, score_threshold: float = 0.0, max_detections: int | None = None):
        """Detections in original-image pixels (a :class:`~focus_detr.model.Detections`)."""
        from ..model import Detections

        x, (orig_h, orig_w) = self.prepare(image)
        out = self.run(x)
        h, w = x.shape[2:]
        scale = np.array([orig_w / w, orig_h / h, orig_w / w, orig_h / h], dtype=np.float32)
        boxes = out["boxes_xyxy"][0] * scale
        keep = (out["scores"][0] >= score_threshold) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if max_detections is not None:
            keep &= np.arange(keep.size) < max_detections
        labels = out["labels"][0][keep]
        names = self.cfg.class_names
        return Detections(torch.from_numpy(boxes[keep]), torch.from_numpy(out["scores"][0][keep]),
                          torch.from_numpy(labels.astype(np.int64)),
                          [names[i] if names is not None else str(i) for i in labels.tolist()],
                          torch.from_numpy(out["query_indices"][0][keep].astype(np.int64)))
