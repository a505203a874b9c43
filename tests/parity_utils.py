"""Reading an official-parity fixture: which folders, the model it describes, its weights, inputs and noise.

A fixture folder (``tests/fixtures/official_parity*``, or any folder named in ``FOCUS_DETR_PARITY_FIXTURE``)
holds what the official detrex code computed for a batch of images with weights set by a fixed rule; its
README is the contract. Everything the tests need comes from the folder itself, so the tests work for any
fixture made the same way:

* ``manifest.json``: the official config file (-> our preset), the harness's ``config_overrides`` (each
  translated to our config, an unknown one is an error), the fully resolved official config (every value we
  can map is checked against our preset + overrides), the inputs and GT, the weighted losses, and the
  calibration: max differences between official runs. Tolerances are :data:`NOISE_FACTOR` times the noise
  recorded for the same array (see :meth:`ParityFixture.atol`).
* ``keys.json``: the official state-dict keys with shape, dtype, alias (``canonical``) name and
  ``rule_filled``, plus the weight rule's ``salt``.
* ``expected.npz`` and the input PNGs (checked against the manifest's sha256).

Anything missing or not understood raises :class:`FixtureError` naming the file and the field, so a fixture the
tests cannot interpret fails with a clear message, never a skip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import zlib
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from focus_detr.config import PRESETS, FocusDETRConfig, ResNetConfig, SwinConfig, make_config
from focus_detr.convert import convert_official_state_dict
from focus_detr.losses import HungarianMatcher, SetCriterion
from focus_detr.ops.boxes import box_xyxy_to_cxcywh

FIXTURES_ROOT = Path(__file__).parent / "fixtures"
FIXTURE_GLOB = "official_parity*"
FIXTURE_ENV = "FOCUS_DETR_PARITY_FIXTURE"

# Every tolerance is this factor times the noise the fixture recorded for the same array (the fixture READMEs:
# "about 10x the observed float32 noise").
NOISE_FACTOR = 10.0
# The calibration runs whose differences are pure float noise: the official model against its own float64
# copy with every top-k decision forced to the same indices (README section 6, "decisions forced").
NOISE_RUNS = {"eval": "float64_forced_vs_float32", "train": "train_float64_forced_vs_float32"}
LOSS_NOISE_RUN = "train_loss_float64_forced_vs_float32"

# Written when FOCUS_DETR_PARITY_REPORT names a file: one JSON line per compared array (README's numbers).
REPORT_ENV = "FOCUS_DETR_PARITY_REPORT"

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
           "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}


class FixtureError(Exception):
    """The fixture folder is incomplete or says something these tests cannot interpret."""


# ---- which fixtures ----------------------------------------------------------------------------------
def fixture_dirs() -> list[Path]:
    """Every ``tests/fixtures/official_parity*`` folder, then the folders in ``$FOCUS_DETR_PARITY_FIXTURE``
    (``os.pathsep``-separated). A named folder that does not exist is kept, so its tests fail and say so."""
    found = sorted(p for p in FIXTURES_ROOT.glob(FIXTURE_GLOB) if p.is_dir())
    extra = [Path(p) for p in os.environ.get(FIXTURE_ENV, "").split(os.pathsep) if p.strip()]
    resolved = {p.resolve() for p in found}
    return found + [p for p in extra if p.resolve() not in resolved]


def fixture_params() -> list[Any]:
    """``pytest.param`` per fixture folder, with the folder name as the test id."""
    params, used = [], set()
    for folder in fixture_dirs():
        name = folder.name
        while name in used:  # two external folders of the same name
            name = f"{folder.parent.name}-{name}"
        used.add(name)
        params.append(pytest.param(folder, id=name))
    return params


# ---- the weight rule -----------------------------------------------------------------------------------
def rule_value(name: str, shape, salt: int = 0) -> torch.Tensor:
    """The fixture README's weight rule (section 2), verbatim in behaviour."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + salt)
    u = torch.rand(tuple(shape), generator=g, dtype=torch.float64) * 2 - 1
    if len(shape) >= 2:
        fan_in = int(torch.tensor(shape[1:]).prod())
        return (u * (3.0 / fan_in) ** 0.5).float()
    if name.endswith("running_var"):
        return (1.0 + 0.5 * u).float()
    if name.endswith(".weight"):
        return (1.0 + 0.2 * u).float()
    return (0.1 * u).float()


# ---- the official config ---------------------------------------------------------------------------------
def parse_resolved_yaml(text: str, source: str) -> dict[str, Any]:
    """The block YAML that detectron2's ``LazyConfig.to_py``/``OmegaConf`` dump writes (nested mappings,
    ``- item`` lists, scalars, ``!!python/name:x ''`` tags) -> nested dicts. Enough for
    ``model_config_resolved_yaml``; anything else raises :class:`FixtureError`."""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    value, end = _parse_block(lines, 0, 0, source)
    if end != len(lines):
        raise FixtureError(f"{source}: cannot parse line {end + 1}: {lines[end]!r}")
    return value


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _parse_block(lines: list[str], i: int, indent: int, source: str) -> tuple[Any, int]:
    if i < len(lines) and _indent(lines[i]) == indent and lines[i].lstrip().startswith("- "):
        items = []
        while i < len(lines) and _indent(lines[i]) == indent and lines[i].lstrip().startswith("- "):
            content = lines[i][indent + 2:]
            if _split_key(content) is not None:  # a mapping inside the list item
                lines[i] = " " * (indent + 2) + content
                value, i = _parse_block(lines, i, indent + 2, source)
            else:
                value, i = _scalar(content), i + 1
            items.append(value)
        return items, i
    mapping: dict[str, Any] = {}
    while i < len(lines) and _indent(lines[i]) == indent and not lines[i].lstrip().startswith("- "):
        split = _split_key(lines[i].strip())
        if split is None:
            raise FixtureError(f"{source}: cannot parse line {i + 1}: {lines[i]!r}")
        key, rest = split
        i += 1
        if rest:
            mapping[key] = _scalar(rest)
        elif i < len(lines) and (_indent(lines[i]) > indent
                                 or (_indent(lines[i]) == indent and lines[i].lstrip().startswith("- "))):
            mapping[key], i = _parse_block(lines, i, _indent(lines[i]), source)
        else:
            mapping[key] = None
    return mapping, i


def _split_key(text: str) -> tuple[str, str] | None:
    m = re.match(r"^([^\s:'\"\[{][^:]*?|'[^']*'|\"[^\"]*\"):(?:\s+(.*))?$", text)
    if m is None:
        return None
    return m.group(1).strip("'\""), (m.group(2) or "").strip()


def _scalar(text: str) -> Any:
    text = text.strip()
    tag = re.match(r"^!!python/\w+:(\S+)(?:\s+''|\s+\"\")?$", text)
    if tag:
        return tag.group(1)
    if text in ("null", "~", ""):
        return None
    if text in ("true", "false"):
        return text == "true"
    if text.startswith("[") and text.endswith("]"):
        return [_scalar(t) for t in text[1:-1].split(",") if t.strip()]
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# Official resolved-config path -> our config path, for every value that changes what the model computes
# (and a few that only change training, which the training-mode comparisons depend on).
_CONFIG_MAP = {
    "position_embedding.temperature": "position_embedding.temperature",
    "position_embedding.offset": "position_embedding.offset",
    "position_embedding.normalize": "position_embedding.normalize",
    "position_embedding.scale": "position_embedding.scale",
    "position_embedding.eps": "position_embedding.eps",
    "neck.out_channels": "embed_dim",
    "neck.num_outs": "num_levels",
    "transformer.num_feature_levels": "num_levels",
    "transformer.focus_rho": "encoder.keep_ratio",
    "transformer.cascade_set": "encoder.cascade",
    "transformer.encoder.embed_dim": "embed_dim",
    "transformer.encoder.num_heads": "encoder.num_heads",
    "transformer.encoder.feedforward_dim": "encoder.ffn_dim",
    "transformer.encoder.attn_dropout": "encoder.dropout",
    "transformer.encoder.ffn_dropout": "encoder.dropout",
    "transformer.encoder.num_layers": "encoder.num_layers",
    "transformer.decoder.embed_dim": "embed_dim",
    "transformer.decoder.num_heads": "decoder.num_heads",
    "transformer.decoder.feedforward_dim": "decoder.ffn_dim",
    "transformer.decoder.attn_dropout": "decoder.dropout",
    "transformer.decoder.ffn_dropout": "decoder.dropout",
    "transformer.decoder.num_layers": "decoder.num_layers",
    "embed_dim": "embed_dim",
    "num_classes": "num_classes",
    "num_queries": "decoder.num_queries",
    "select_box_nums_for_evaluation": "num_detections",
    "dn_number": "denoising.num_queries",
    "label_noise_ratio": "denoising.label_noise_ratio",
    "box_noise_scale": "denoising.box_noise_scale",
    "pixel_mean": "pixel_mean",
    "pixel_std": "pixel_std",
}
_BACKBONE_MAPS: dict[type, dict[str, str]] = {
    ResNetConfig: {
        "backbone.stages.depth": "backbone.depth",
        "backbone.freeze_at": "backbone.freeze_at",
        "backbone.out_features": "backbone.out_features",
        "backbone.stem.out_channels": "backbone.stem_channels",
    },
    SwinConfig: {
        "backbone.pretrain_img_size": "backbone.pretrain_img_size",
        "backbone.embed_dim": "backbone.embed_dim",
        "backbone.depths": "backbone.depths",
        "backbone.num_heads": "backbone.num_heads",
        "backbone.window_size": "backbone.window_size",
        "backbone.drop_path_rate": "backbone.drop_path_rate",
        "backbone.out_indices": "backbone.out_indices",
    },
}
_BACKBONE_TARGETS = {".ResNet": ResNetConfig, ".SwinTransformer": SwinConfig}
# Harness overrides that change nothing we compute.
_IGNORED_OVERRIDES = {"model.device"}  # the tests run on the CPU, as the official harness did


def _lookup(tree: dict[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _our_value(cfg: FocusDETRConfig, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _same(official: Any, ours: Any) -> bool:
    if isinstance(official, (list, tuple)) or isinstance(ours, (list, tuple)):
        return (isinstance(official, (list, tuple)) and isinstance(ours, (list, tuple))
                and len(official) == len(ours) and all(_same(a, b) for a, b in zip(official, ours)))
    if isinstance(official, bool) or isinstance(ours, bool):
        return official is ours
    if isinstance(official, (int, float)) and isinstance(ours, (int, float)):
        return float(official) == float(ours)
    return official == ours


def preset_for_config_file(config_file: str) -> str:
    """``.../focus_detr_r50_4scale_12ep.py`` -> ``r50_4scale_12ep``; ``..._swin_base_384_4scale_36ep.py`` ->
    ``swin_base_384_4scale`` (the preset named after the config, with its schedule suffix if such a preset
    exists). Raises :class:`FixtureError` if no preset matches."""
    stem = Path(config_file).stem
    base = re.sub(r"^focus_detr_", "", stem).replace("_22k", "")
    candidates = [base, re.sub(r"_\d+ep$", "", base)]
    for name in candidates:
        if name in PRESETS:
            return name
    raise FixtureError(f"official config {config_file!r}: no preset among {candidates} "
                       f"(presets: {', '.join(sorted(PRESETS))})")


# ---- one fixture -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class ParityFixture:
    """A validated fixture folder. Build with :func:`load_fixture`."""

    folder: Path
    manifest: dict[str, Any]
    keys: list[dict[str, Any]]
    salt: int
    official_config: dict[str, Any]
    preset: str
    overrides: dict[str, Any]
    cfg: FocusDETRConfig

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def batch_size(self) -> int:
        return len(self.manifest["inputs"])

    def require(self, name: str) -> Any:
        """A manifest field that must be there."""
        if name not in self.manifest:
            raise FixtureError(f"{self.folder / 'manifest.json'}: no field {name!r}")
        return self.manifest[name]

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        with np.load(self.folder / "expected.npz") as data:
            return {k: data[k] for k in data.files}

    def array(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            raise FixtureError(f"{self.folder / 'expected.npz'}: no array {name!r}")
        return self.arrays[name]

    # -- noise and tolerances
    def noise(self, mode: str, name: str) -> float:
        """Max abs difference the fixture recorded for array ``name`` (without the ``eval_``/``train_`` prefix)
        between the official float32 model and its float64 copy with decisions forced."""
        run = NOISE_RUNS[mode]
        table = self.require("calibration_max_abs_diff")
        if run not in table:
            raise FixtureError(f"{self.folder / 'manifest.json'}: calibration_max_abs_diff has no run {run!r}; "
                               "cannot derive tolerances")
        if name not in table[run]:
            raise FixtureError(f"{self.folder / 'manifest.json'}: calibration_max_abs_diff.{run} records no noise "
                               f"for {name!r}; cannot derive its tolerance")
        value = table[run][name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FixtureError(f"{self.folder / 'manifest.json'}: calibration_max_abs_diff.{run}.{name} is "
                               f"{value!r}, not a number")
        return float(value)

    def atol(self, mode: str, name: str) -> float:
        return NOISE_FACTOR * self.noise(mode, name)

    def loss_noise(self) -> float:
        """Largest relative difference of the 40 weighted losses between the official model and its float64
        copy (decisions forced): the noise of the ``train_loss_values`` array, relative."""
        table = self.require("calibration_max_abs_diff")
        if LOSS_NOISE_RUN not in table:
            raise FixtureError(f"{self.folder / 'manifest.json'}: calibration_max_abs_diff has no run "
                               f"{LOSS_NOISE_RUN!r}; cannot derive the loss tolerance")
        rel = {}
        for key in self.require("train_loss_order"):
            entry = table[LOSS_NOISE_RUN].get(key)
            if not isinstance(entry, dict) or not isinstance(entry.get("rel"), (int, float)):
                raise FixtureError(f"{self.folder / 'manifest.json'}: calibration_max_abs_diff.{LOSS_NOISE_RUN} "
                                   f"records no relative noise for loss {key!r}")
            rel[key] = float(entry["rel"])
        return max(rel.values())

    def loss_rtol(self) -> float:
        return NOISE_FACTOR * self.loss_noise()

    # -- inputs
    def images(self) -> list[torch.Tensor]:
        """``[3, H, W]`` uint8 RGB per input, in manifest order."""
        out = []
        for item in self.require("inputs"):
            arr = np.asarray(Image.open(self.folder / item["file"]).convert("RGB"))
            if arr.shape[:2] != (item["height"], item["width"]):
                raise FixtureError(f"{self.folder / item['file']}: {arr.shape[:2]} pixels, the manifest says "
                                   f"{(item['height'], item['width'])}")
            out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous())
        return out

    def image_sizes(self) -> torch.Tensor:
        return torch.tensor([[i["height"], i["width"]] for i in self.require("inputs")], dtype=torch.int64)

    def targets(self, order: str = "official") -> list[dict[str, torch.Tensor]]:
        """GT as our criterion expects it: labels and normalised cxcywh float32 boxes.

        ``official``: divide the xyxy pixels by (w, h, w, h), then convert (detrex ``prepare_targets``);
        ``collate``: convert, then divide (``focus_detr.data.collate``). They differ by <= 1 ulp.
        """
        out = []
        for item in self.require("inputs"):
            h, w = item["height"], item["width"]
            xyxy = torch.tensor(item["gt_boxes_xyxy"], dtype=torch.float32).reshape(-1, 4)
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            boxes = box_xyxy_to_cxcywh(xyxy / scale) if order == "official" else box_xyxy_to_cxcywh(xyxy) / scale
            out.append({"labels": torch.tensor(item["gt_classes"], dtype=torch.int64), "boxes": boxes})
        return out

    # -- the official criterion's settings
    def _official_number(self, path: str) -> float:
        found, value = _lookup(self.official_config, path)
        if not found or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FixtureError(f"{self.folder / 'manifest.json'}: model_config_resolved_yaml has no number at {path}")
        return float(value)

    def criterion(self) -> SetCriterion:
        """Our criterion with the official matcher costs and focal parameters (default loss weights: the
        tests check them against the official ``train_loss_weights_applied``)."""
        m = "criterion.matcher."
        matcher = HungarianMatcher(cost_class=self._official_number(m + "cost_class"),
                                   cost_bbox=self._official_number(m + "cost_bbox"),
                                   cost_giou=self._official_number(m + "cost_giou"),
                                   alpha=self._official_number(m + "alpha"), gamma=self._official_number(m + "gamma"))
        return SetCriterion(self.cfg.num_classes, matcher, focal_alpha=self._official_number("criterion.alpha"),
                            focal_gamma=self._official_number("criterion.gamma"),
                            num_decoder_layers=self.cfg.decoder.num_layers)

    # -- weights
    def official_state_dict(self, fresh_model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every official key: rule-filled keys by the weight rule (salt from the fixture, one value per alias
        group, cast to the recorded dtype); the others (e.g. Swin's int64 ``relative_position_index``) set to
        what ``fresh_model`` computes for them, as the official model computes them."""
        source = self.folder / "keys.json"
        _, report = convert_official_state_dict({e["key"]: torch.empty(0) for e in self.keys}, self.cfg)
        ours_of = report.converted  # official name -> ours
        own = fresh_model.state_dict()
        cache: dict[str, torch.Tensor] = {}
        state = {}
        for entry in self.keys:
            key, canonical, shape = entry["key"], entry.get("canonical", entry["key"]), tuple(entry["shape"])
            dtype = _DTYPES.get(entry.get("dtype", ""))
            if dtype is None:
                raise FixtureError(f"{source}: key {key!r} has dtype {entry.get('dtype')!r}; expected one of "
                                   f"{sorted(_DTYPES)}")
            rule_filled = entry.get("rule_filled", dtype.is_floating_point)
            if rule_filled:
                if not dtype.is_floating_point:
                    raise FixtureError(f"{source}: key {key!r} is rule_filled but has the integer dtype {dtype}")
                if canonical not in cache:
                    cache[canonical] = rule_value(canonical, shape, self.salt).to(dtype)
                state[key] = cache[canonical]
                continue
            ours = ours_of.get(key)
            if ours is None or ours not in own:
                raise FixtureError(f"{source}: key {key!r} is not rule-filled and our model has no counterpart "
                                   "to take its value from")
            value = own[ours].detach().clone()
            if value.dtype != dtype or tuple(value.shape) != shape:
                raise FixtureError(f"{source}: key {key!r} is {entry['dtype']} {list(shape)} in the official model, "
                                   f"ours ({ours}) is {value.dtype} {list(value.shape)}")
            state[key] = value
        return state


@lru_cache(maxsize=None)
def load_fixture(folder: Path) -> ParityFixture:
    """Read and validate a fixture folder (cached). Raises :class:`FixtureError` saying what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FixtureError(f"parity fixture folder {folder} does not exist")
    for name in ("manifest.json", "keys.json", "expected.npz"):
        if not (folder / name).is_file():
            raise FixtureError(f"parity fixture {folder}: {name} is missing")
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        keys_file = json.loads((folder / "keys.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FixtureError(f"parity fixture {folder}: unreadable JSON ({exc})") from None
    for name in ("config_file", "config_overrides", "model_config_resolved_yaml", "inputs", "salt",
                 "calibration_max_abs_diff", "train_losses_weighted", "train_loss_order", "num_params_unique",
                 "num_state_dict_keys"):
        if name not in manifest:
            raise FixtureError(f"{folder / 'manifest.json'}: no field {name!r}")
    if "keys" not in keys_file:
        raise FixtureError(f"{folder / 'keys.json'}: no field 'keys'")
    for entry in keys_file["keys"]:
        for name in ("key", "shape", "dtype"):
            if name not in entry:
                raise FixtureError(f"{folder / 'keys.json'}: entry {entry!r} has no {name!r}")
    salt = manifest["salt"]
    if "salt" in keys_file and keys_file["salt"] != salt:
        raise FixtureError(f"parity fixture {folder}: salt {keys_file['salt']} in keys.json but {salt} in "
                           "manifest.json")
    for item in manifest["inputs"]:
        for name in ("file", "height", "width", "gt_boxes_xyxy", "gt_classes"):
            if name not in item:
                raise FixtureError(f"{folder / 'manifest.json'}: input {item!r} has no {name!r}")
        path = folder / item["file"]
        if not path.is_file():
            raise FixtureError(f"parity fixture {folder}: input {item['file']} is missing")
        if "sha256" in item and hashlib.sha256(path.read_bytes()).hexdigest() != item["sha256"]:
            raise FixtureError(f"{path}: sha256 differs from the manifest's (a changed input image)")

    official = parse_resolved_yaml(manifest["model_config_resolved_yaml"],
                                   f"{folder / 'manifest.json'}: model_config_resolved_yaml")
    preset = preset_for_config_file(manifest["config_file"])
    backbone_type = _backbone_type(official, folder)
    config_map = {**_CONFIG_MAP, **_BACKBONE_MAPS[backbone_type]}
    overrides: dict[str, Any] = {"batch_mode": "official"}
    for key, value in manifest["config_overrides"].items():
        if key in _IGNORED_OVERRIDES:
            continue
        path = key[len("model."):] if key.startswith("model.") else None
        if path not in config_map:
            raise FixtureError(f"{folder / 'manifest.json'}: config_overrides {key!r} has no counterpart in our "
                               "config; the tests cannot reproduce this fixture")
        overrides[config_map[path]] = tuple(value) if isinstance(value, list) else value
    cfg = make_config(preset, **overrides)
    if not isinstance(cfg.backbone, backbone_type):
        raise FixtureError(f"{folder}: the official backbone is a {backbone_type.__name__}, preset {preset!r} "
                           f"builds a {type(cfg.backbone).__name__}")
    mismatches = []
    for path, ours_path in config_map.items():
        found, value = _lookup(official, path)
        if not found or (isinstance(value, str) and value.startswith("${")):
            continue  # not set in the official config (its default applies) or an interpolation of another value
        ours = _our_value(cfg, ours_path)
        if not _same(value, ours):
            mismatches.append(f"{path} = {value!r} (ours: {ours_path} = {ours!r})")
    found, feats = _lookup(official, "position_embedding.num_pos_feats")
    if found and feats * 2 != cfg.embed_dim:
        mismatches.append(f"position_embedding.num_pos_feats = {feats} (ours: embed_dim / 2 = {cfg.embed_dim // 2})")
    if mismatches:
        raise FixtureError(f"{folder}: preset {preset!r} + config_overrides differ from the official config "
                           f"{manifest['config_file']}: " + "; ".join(mismatches))
    if cfg.denoising.num_queries != 0:
        raise FixtureError(f"{folder}: recorded with denoising on (dn_number = {cfg.denoising.num_queries}); its "
                           "random noised queries cannot be reproduced")
    return ParityFixture(folder=folder, manifest=manifest, keys=keys_file["keys"], salt=int(salt),
                         official_config=official, preset=preset, overrides=overrides, cfg=cfg)


def _backbone_type(official: dict[str, Any], folder: Path) -> type:
    found, target = _lookup(official, "backbone._target_")
    for suffix, kind in _BACKBONE_TARGETS.items():
        if found and isinstance(target, str) and target.endswith(suffix):
            return kind
    raise FixtureError(f"{folder / 'manifest.json'}: official backbone {target!r} is none of "
                       f"{sorted(s.lstrip('.') for s in _BACKBONE_TARGETS)}")


# ---- comparing ---------------------------------------------------------------------------------------------
def record(fx: ParityFixture, quantity: str, diff: float, tolerance: float, noise: float | None) -> None:
    """Append one measured difference to ``$FOCUS_DETR_PARITY_REPORT`` (if set)."""
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"fixture": fx.name, "quantity": quantity, "max_abs_diff": diff,
                                "tolerance": tolerance, "noise": noise}) + "\n")


def max_abs_diff(ours: torch.Tensor | np.ndarray, official: np.ndarray, name: str) -> float:
    ours_np = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    assert ours_np.shape == official.shape, f"{name}: shape {ours_np.shape} vs official {official.shape}"
    if not ours_np.size:
        return 0.0
    return float(np.abs(ours_np.astype(np.float64) - official.astype(np.float64)).max())


def assert_close(fx: ParityFixture, mode: str, ours: torch.Tensor | np.ndarray, official: np.ndarray, name: str,
                 noise_name: str | None = None) -> None:
    """``ours`` within :data:`NOISE_FACTOR` x the recorded noise of ``noise_name`` (default ``name``)."""
    noise = fx.noise(mode, noise_name or name)
    tolerance = NOISE_FACTOR * noise
    diff = max_abs_diff(ours, official, f"{mode}_{name}")
    record(fx, f"{mode}_{name}", diff, tolerance, noise)
    assert diff <= tolerance, (f"{fx.name}: {mode}_{name}: max abs diff {diff:.3g} > {tolerance:.3g} "
                               f"({NOISE_FACTOR:g} x the recorded official noise {noise:.3g})")
