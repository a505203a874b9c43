"""Shared helpers for the official-parity tests: fixture location, rule-built weights, inputs."""

from __future__ import annotations

import json
import os
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DEFAULT_FIXTURE = Path(__file__).parent / "fixtures" / "official_parity"


def fixture_dir() -> Path:
    return Path(os.environ.get("FOCUS_DETR_PARITY_FIXTURE", DEFAULT_FIXTURE))


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


@lru_cache(maxsize=2)
def manifest(folder: str) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


def official_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every official key filled by the rule; alias keys share their canonical key's value."""
    keys = json.loads((folder / "keys.json").read_text())
    salt = int(keys.get("salt", manifest(str(folder)).get("salt", 0)))
    cache: dict[str, torch.Tensor] = {}
    sd = {}
    for entry in keys["keys"]:
        canonical = entry["canonical"]
        if canonical not in cache:
            cache[canonical] = rule_value(canonical, entry["shape"], salt)
        sd[entry["key"]] = cache[canonical]
    return sd


def preset_and_overrides(folder: Path) -> tuple[str, dict]:
    """Our preset + overrides for the fixture's official config (read from its manifest)."""
    m = manifest(str(folder))
    cfg_file = m["config_file"]
    name = Path(cfg_file).stem  # e.g. focus_detr_r50_4scale_36ep
    preset = m.get("preset")
    if preset is None:
        base = name.replace("focus_detr_", "")
        for suffix in ("_12ep", "_24ep", "_36ep"):
            base = base.replace("_22k" + suffix, "").replace(suffix, "")
        preset = base
    overrides: dict = {"batch_mode": "official"}
    yaml_text = m.get("model_config_resolved_yaml", "")
    pe = {}
    in_pe = False
    for line in yaml_text.splitlines():
        if line.startswith("position_embedding:"):
            in_pe = True
            continue
        if in_pe:
            if not line.startswith("  "):
                break
            key, _, value = line.strip().partition(":")
            if key in ("temperature", "offset"):
                pe[key] = float(value)
    if pe:
        overrides["position_embedding.temperature"] = pe.get("temperature", 10000.0)
        overrides["position_embedding.offset"] = pe.get("offset", -0.5)
    dn = m.get("config_overrides", {}).get("model.dn_number")
    if dn is not None:
        overrides["denoising.num_queries"] = int(dn)
    return preset, overrides


def load_inputs(folder: Path) -> list[torch.Tensor]:
    m = manifest(str(folder))
    images = []
    for item in m["inputs"]:
        arr = np.asarray(Image.open(folder / item["file"]).convert("RGB"))
        images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous())
    return images


def load_targets(folder: Path) -> list[dict[str, torch.Tensor]]:
    """GT as the model/criterion expect it: labels and cxcywh boxes normalised by the image size."""
    m = manifest(str(folder))
    targets = []
    for item in m["inputs"]:
        h, w = item["height"], item["width"]
        xyxy = torch.tensor(item["gt_boxes_xyxy"], dtype=torch.float32) / torch.tensor([w, h, w, h], dtype=torch.float32)
        cxcywh = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                              xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], 1)
        targets.append({"labels": torch.tensor(item["gt_classes"], dtype=torch.long), "boxes": cxcywh})
    return targets


@lru_cache(maxsize=1)
def expected(folder: str) -> dict[str, np.ndarray]:
    with np.load(Path(folder) / "expected.npz") as data:
        return {k: data[k] for k in data.files}
