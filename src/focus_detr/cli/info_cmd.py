"""`focus-detr info`: what a preset, a weights file or an official checkpoint contains."""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ..config import PRESETS

EXAMPLES = """\
examples:
  focus-detr info tiny                                   # a preset: config and parameter count
  focus-detr info weights/r50_36ep.pt                    # one of our weights files
  focus-detr info focus_detr_r50_4scale_36ep.pth --preset r50_4scale   # official: where each key goes
  focus-detr info weights/r50_36ep.pt --json             # machine-readable
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "info", help="show a preset's or a checkpoint's config, parameter counts and key mapping",
        description="Describe a preset name, a focus-detr weights file, or an official detrex checkpoint: "
                    "the model config, parameters per top-level module and, for official checkpoints loaded "
                    "with --preset, which official keys became which of ours.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="WEIGHTS|PRESET", help=f"a file, or a preset: {', '.join(sorted(PRESETS))}")
    p.add_argument("--preset", choices=sorted(PRESETS), metavar="PRESET",
                   help="for an official checkpoint: the architecture to map it onto")
    p.add_argument("--keys", action="store_true", help="list every official -> our key mapping")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def run(args: argparse.Namespace) -> int:
    from .. import api
    from ..config import config_to_dict, make_config
    from .main import CLIError

    target = args.target
    path = Path(target)
    info: dict[str, Any]
    if target in PRESETS and not path.exists():
        cfg = make_config(target)
        info = {"kind": "preset", "name": target, "config": config_to_dict(cfg), "parameters": _param_counts(cfg)}
    elif path.is_file():
        try:
            payload = api.read_weights_file(path)
        except api.CheckpointFormatError:
            payload = None  # not one of ours: try it as an official checkpoint
        if payload is not None:
            from ..config import config_from_dict

            cfg = config_from_dict(payload["config"])
            info = {"kind": "weights", "path": str(path), "format_version": payload.get("format_version"),
                    "sha256": payload.get("sha256"), "extra": payload.get("extra", {}),
                    "config": config_to_dict(cfg), "parameters": _param_counts(cfg, payload["state_dict"])}
        else:
            info = _official_info(path, args.preset)
    else:
        raise CLIError(f"{target!r} is neither a file nor a preset ({', '.join(sorted(PRESETS))})")

    if args.json:
        if not args.keys:
            info.pop("key_map", None)
        print(json.dumps(info, indent=1, default=str))
    else:
        print(_render(info, args.keys))
    return 0


def _official_info(path: Path, preset: str | None) -> dict[str, Any]:
    """Describe an official checkpoint; with ``preset``, convert it and report where every key went."""
    from .. import api
    from ..config import config_to_dict, make_config
    from ..convert.official import extract_state_dict
    from ..inference import short_error
    from .main import CLIError

    try:
        state = extract_state_dict(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file: say what we tried
        raise CLIError(f"{path}: neither a focus-detr weights file nor a readable official checkpoint "
                       f"({short_error(e)})", code=1) from None
    prefixes = Counter(_prefix(k) for k in state)
    info: dict[str, Any] = {"kind": "official", "path": str(path), "num_keys": len(state),
                            "num_values": int(sum(v.numel() for v in state.values())),
                            "key_prefixes": dict(sorted(prefixes.items()))}
    if preset is None:
        info["note"] = "pass --preset to map the keys onto a focus-detr model and see the conversion report"
        return info
    _, report = api.load_official(state, preset, return_report=True)  # strict: fails on any misfit
    cfg = make_config(preset)
    sources: dict[str, Counter] = defaultdict(Counter)
    for official, ours in report.converted.items():
        sources[ours.split(".")[0]][_prefix(official)] += 1
    info.update({
        "preset": preset, "conversion": report.summary(), "config": config_to_dict(cfg),
        "parameters": _param_counts(cfg),
        "sources": {module: dict(c) for module, c in sorted(sources.items())},
        "aliases": len(report.aliases), "ignored": report.ignored, "unconverted": report.unconverted,
        "key_map": dict(report.converted),
    })
    return info


def _prefix(key: str) -> str:
    """Group official keys by their first two name parts: ``transformer.encoder.*``; short keys stay whole."""
    parts = key.split(".")
    return ".".join(parts[:2]) + ".*" if len(parts) > 2 else key


def _param_counts(cfg, state_dict: dict | None = None) -> dict[str, int]:
    """Parameters per top-level module (buffers such as frozen batch-norm statistics are not counted)."""
    import torch

    from ..model import build_model

    try:
        with torch.device("meta"):  # no memory, no init cost; some backbones need real tensors to build
            model = build_model(cfg)
    except RuntimeError:
        model = build_model(cfg)
    counts: Counter = Counter()
    for name, p in model.named_parameters():
        counts[name.split(".")[0]] += p.numel()
    out = dict(counts.most_common())
    out["total"] = int(sum(counts.values()))
    if state_dict is not None:
        out["tensors_in_file"] = len(state_dict)
    return out


def _render(info: dict[str, Any], show_keys: bool) -> str:
    lines: list[str] = []
    kind = info["kind"]
    if kind == "preset":
        lines.append(f"preset {info['name']}")
    elif kind == "weights":
        lines.append(f"focus-detr weights file {info['path']} (format version {info['format_version']})")
        lines.append(f"  sha256 of tensors: {info['sha256']}")
        for k, v in info["extra"].items():
            lines.append(f"  {k}: {v}")
    else:
        lines.append(f"official checkpoint {info['path']}: {info['num_keys']} tensors, {info['num_values']:,} values")
        for prefix, n in info["key_prefixes"].items():
            lines.append(f"  {prefix:<40s} {n:5d} keys")
        if "note" in info:
            lines.append(info["note"])
            return "\n".join(lines)
        lines.append(f"mapped onto preset {info['preset']!r}: {info['conversion']}")
        lines.append("where our modules' weights come from (our module <- official key prefix: count):")
        for module, src in info["sources"].items():
            parts = ", ".join(f"{p} ({n})" for p, n in sorted(src.items(), key=lambda kv: -kv[1]))
            lines.append(f"  {module:<22s} <- {parts}")
        if info["ignored"]:
            lines.append(f"ignored keys ({len(info['ignored'])}): {', '.join(info['ignored'][:10])}"
                         f"{' ...' if len(info['ignored']) > 10 else ''}")
        lines.append(f"alias keys dropped (copies of another key): {info['aliases']}")
        if show_keys:
            lines.append("key map (official -> ours):")
            lines += [f"  {a} -> {b}" for a, b in info["key_map"].items()]
    if "config" in info:
        lines.append("config:")
        lines += _render_config(info["config"], "  ")
    if "parameters" in info:
        params = dict(info["parameters"])
        total = params.pop("total")
        in_file = params.pop("tensors_in_file", None)
        lines.append(f"parameters: {total:,}" + (f" ({in_file} tensors in the file, buffers included)" if in_file else ""))
        for module, n in params.items():
            lines.append(f"  {module:<22s} {n:>12,}  {100.0 * n / max(total, 1):5.1f}%")
    return "\n".join(lines)


def _render_config(d: dict[str, Any], indent: str) -> list[str]:
    lines = []
    for key, value in d.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines += _render_config(value, indent + "  ")
        elif isinstance(value, (list, tuple)):
            shown = ", ".join(str(v) for v in value[:6]) + (f", ... ({len(value)} items)" if len(value) > 8 else "")
            if len(value) <= 8:
                shown = ", ".join(str(v) for v in value)
            lines.append(f"{indent}{key}: [{shown}]")
        else:
            lines.append(f"{indent}{key}: {value}")
    return lines
