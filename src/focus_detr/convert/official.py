"""Official detrex / detectron2 Focus-DETR (and DINO) checkpoints -> our module names.

The official model registers some modules under several names (``class_embed.i`` is also
``transformer.decoder.class_embed.i``; ``class_embed.6`` is also ``enhance_MCSP_layerlist.{0..5}`` and
``transformer.encoder.enhance_MCSP.{0..5}``). We keep one copy: alias keys are checked equal to their
canonical key and dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..config import FocusDETRConfig
from .checks import integer_buffer_problems

# (official pattern, our replacement). Applied in order; the first match wins. ``{n}`` in a replacement is
# filled with the number of decoder layers (the index of the two-stage proposal heads).
_DECODER_HEAD_RULES = [
    (r"^class_embed\.(\d+)\.(.*)$", "class_heads"),
    (r"^bbox_embed\.(\d+)\.(.*)$", "box_heads"),
]

_COMMON_RULES: list[tuple[str, str]] = [
    (r"^transformer\.level_embeds$", "level_embed"),
    (r"^transformer\.alpha$", "foreground_selector.alpha"),
    (r"^transformer\.tgt_embed\.weight$", "target_embed.weight"),
    (r"^transformer\.enc_output\.(.*)$", r"token_proj.\1"),
    (r"^transformer\.enc_output_norm\.(.*)$", r"token_proj_norm.\1"),
    (r"^transformer\.enc_mask_predictor\.layer1\.0\.(.*)$", r"foreground_selector.score_net.norm.\1"),
    (r"^transformer\.enc_mask_predictor\.layer1\.1\.(.*)$", r"foreground_selector.score_net.proj.\1"),
    (r"^transformer\.enc_mask_predictor\.layer2\.(\d)\.(.*)$", r"foreground_selector.score_net.head.\1.\2"),
    (r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.(.*)$", r"\1.layers.\2.ffn.linear1.\3"),
    (r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.ffns\.0\.layers\.1\.(.*)$", r"\1.layers.\2.ffn.linear2.\3"),
    (r"^transformer\.decoder\.layers\.(\d+)\.attentions\.0\.attn\.(.*)$", r"decoder.layers.\1.self_attn.\2"),
    (r"^transformer\.decoder\.layers\.(\d+)\.attentions\.1\.(.*)$", r"decoder.layers.\1.cross_attn.\2"),
    (r"^transformer\.decoder\.layers\.(\d+)\.norms\.0\.(.*)$", r"decoder.layers.\1.self_attn_norm.\2"),
    (r"^transformer\.decoder\.layers\.(\d+)\.norms\.1\.(.*)$", r"decoder.layers.\1.cross_attn_norm.\2"),
    (r"^transformer\.decoder\.layers\.(\d+)\.norms\.2\.(.*)$", r"decoder.layers.\1.ffn_norm.\2"),
    (r"^transformer\.decoder\.(ref_point_head|norm)\.(.*)$", r"decoder.\1.\2"),
    (r"^label_enc\.weight$", "dn_label_embed.weight"),
    (r"^(backbone|neck)\.(.*)$", r"\1.\2"),
]

# Focus-DETR encoder layer: attentions.0 = OESM multi-head attention, attentions.1 = deformable attention,
# norm2 = the LayerNorm after OESM, norms.0 / norms.1 = after the deformable attention / after the FFN.
_FOCUS_ENCODER_RULES: list[tuple[str, str]] = [
    (r"^transformer\.encoder\.layers\.(\d+)\.attentions\.0\.attn\.(.*)$", r"encoder.layers.\1.oesm_attn.\2"),
    (r"^transformer\.encoder\.layers\.(\d+)\.attentions\.1\.(.*)$", r"encoder.layers.\1.cross_attn.\2"),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm2\.(.*)$", r"encoder.layers.\1.oesm_norm.\2"),
    (r"^transformer\.encoder\.layers\.(\d+)\.norms\.0\.(.*)$", r"encoder.layers.\1.cross_attn_norm.\2"),
    (r"^transformer\.encoder\.layers\.(\d+)\.norms\.1\.(.*)$", r"encoder.layers.\1.ffn_norm.\2"),
]

# DINO encoder layer (dense mode): attentions.0 = deformable self-attention.
_DENSE_ENCODER_RULES: list[tuple[str, str]] = [
    (r"^transformer\.encoder\.layers\.(\d+)\.attentions\.0\.(.*)$", r"encoder.layers.\1.cross_attn.\2"),
    (r"^transformer\.encoder\.layers\.(\d+)\.norms\.0\.(.*)$", r"encoder.layers.\1.cross_attn_norm.\2"),
    (r"^transformer\.encoder\.layers\.(\d+)\.norms\.1\.(.*)$", r"encoder.layers.\1.ffn_norm.\2"),
]

# Keys that name a tensor stored under another key too.
_ALIAS_PATTERNS = [
    (re.compile(r"^transformer\.decoder\.(class_embed|bbox_embed)\.(.*)$"), r"\1.\2"),
    (re.compile(r"^(?:enhance_MCSP_layerlist|transformer\.encoder\.enhance_MCSP)\.\d+\.(.*)$"), "class_embed.{n}.\\1"),
]

_IGNORED = re.compile(r"(num_batches_tracked$)")


@dataclass
class ConversionReport:
    """What happened to each official key."""

    converted: dict[str, str] = field(default_factory=dict)  # official -> ours
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> canonical official key
    unconverted: list[str] = field(default_factory=list)  # official keys no rule knows
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.converted)} keys converted, {len(self.aliases)} alias keys dropped, "
                f"{len(self.ignored)} ignored, {len(self.unconverted)} unconverted")


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model; the message lists every missing / unexpected / mis-shaped key."""


def extract_state_dict(obj: Mapping | str | Path) -> dict[str, Tensor]:
    """Accept a path, a detectron2 checkpoint dict (``{"model": sd, ...}``) or a bare state dict; strip
    ``module.`` prefixes (DDP)."""
    if isinstance(obj, (str, Path)):
        from ..weights.files import read_torch_file  # the one torch.load (weights_only=True, one-line errors)

        obj = read_torch_file(obj)
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    sd = obj.get("model", obj) if "model" in obj and isinstance(obj.get("model"), Mapping) else obj
    out = {}
    for key, value in sd.items():
        if not isinstance(value, Tensor):
            continue
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def convert_official_state_dict(state_dict: Mapping[str, Tensor], cfg: FocusDETRConfig) -> tuple[dict[str, Tensor], ConversionReport]:
    """Rename official keys to ours. Alias keys must hold the same values as their canonical key."""
    num_decoder_layers = cfg.decoder.num_layers
    encoder_rules = _DENSE_ENCODER_RULES if cfg.encoder.mode == "dense" else _FOCUS_ENCODER_RULES
    rules = [(re.compile(p), r) for p, r in encoder_rules + _COMMON_RULES]
    report = ConversionReport()
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if _IGNORED.search(key):
            report.ignored.append(key)
            continue
        canonical = _canonical_alias(key, num_decoder_layers)
        if canonical is not None:
            report.aliases[key] = canonical
            if canonical in state_dict and not torch.equal(state_dict[canonical], value):
                raise CheckpointMismatchError(
                    f"alias key {key!r} differs from {canonical!r}; the official model ties these tensors")
            if canonical not in state_dict:
                # Only the alias was saved: treat it as the canonical key.
                new = _rename_head(canonical, num_decoder_layers)
                if new is not None:
                    out.setdefault(new, value)
                    report.converted[key] = new
            continue
        new = _rename_head(key, num_decoder_layers)
        if new is None:
            for pattern, repl in rules:
                if pattern.match(key):
                    new = pattern.sub(repl, key)
                    break
        if new is None:
            report.unconverted.append(key)
            continue
        out[new] = value
        report.converted[key] = new
    return out, report


def _canonical_alias(key: str, num_decoder_layers: int) -> str | None:
    for pattern, repl in _ALIAS_PATTERNS:
        m = pattern.match(key)
        if m:
            return m.expand(repl.replace("{n}", str(num_decoder_layers)))
    return None


def _rename_head(key: str, num_decoder_layers: int) -> str | None:
    m = re.match(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$", key)
    if not m:
        return None
    kind, index, rest = m.group(1), int(m.group(2)), m.group(3)
    ours = "class" if kind == "class_embed" else "box"
    if index == num_decoder_layers:
        return f"proposal_{ours}_head.{rest}"
    return f"{ours}_heads.{index}.{rest}"


def load_converted(model: torch.nn.Module, state_dict: Mapping[str, Tensor], report: ConversionReport | None = None,
                   source: str = "checkpoint") -> None:
    """Strictly load ``state_dict`` (our names) into ``model``; raise :class:`CheckpointMismatchError` naming
    every missing, unexpected and mis-shaped key, and every integer buffer the state dict would damage
    (:func:`~focus_detr.convert.checks.integer_buffer_problems`; ``model`` must be freshly built)."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    if report is not None:
        unexpected = sorted(set(unexpected) | {f"{k} (no conversion rule)" for k in report.unconverted})
    shape = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape))
    inverse = {v: k for k, v in (report.converted.items() if report else [])}
    # load_state_dict would silently cast these (a float relative_position_index becomes all zeros).
    damaged = [_with_official_name(p, inverse) for p in integer_buffer_problems(model, state_dict)]
    if missing or unexpected or shape or damaged:
        lines = [f"{source} does not fit the model ({model.cfg.backbone.__class__.__name__}, "
                 f"encoder mode {model.cfg.encoder.mode!r}, {model.cfg.num_classes} classes):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:30]) + (" ..." if len(missing) > 30 else ""))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): "
                         + ", ".join(f"{inverse.get(k, k)}" for k in unexpected[:30]) + (" ..." if len(unexpected) > 30 else ""))
        if shape:
            lines.append(f"  mis-shaped keys ({len(shape)}): " + "; ".join(shape[:30]) + (" ..." if len(shape) > 30 else ""))
        if damaged:
            lines.append(f"  integer buffers the checkpoint would damage ({len(damaged)}):")
            lines.extend(f"    {line}" for line in damaged)
        if missing or unexpected or shape:
            lines.append("  (is the preset right? e.g. r50 vs r101, swin size, num_classes)")
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict(dict(state_dict), strict=True)


def _with_official_name(problem: str, inverse: Mapping[str, str]) -> str:
    """``"ours: text"`` -> ``"ours (official: theirs): text"`` where the names differ."""
    key, sep, text = problem.partition(": ")
    official = inverse.get(key)
    return f"{key} (official: {official}){sep}{text}" if official and official != key else problem
