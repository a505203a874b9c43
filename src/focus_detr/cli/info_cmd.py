"""`focus-detr info`: what a preset or any weights source contains, and which kind of file it is."""

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
  focus-detr info runs/x/checkpoints/checkpoint_0000100.pth   # a training checkpoint (--ema: its EMA weights)
  focus-detr info focus_detr_r50_4scale_36ep.pth --preset r50_4scale   # official: where each key goes
  focus-detr info focus_detr_r50_4scale_36ep             # a pretrained name (downloaded once)
  focus-detr info weights/r50_36ep.pt --json             # machine-readable
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "info", help="show a preset's or a weights source's kind, config, parameter counts and key mapping",
        description="Describe a preset name or any weights source (pretrained name, focus-detr weights file, "
                    "training checkpoint, official detrex checkpoint or release zip, Hugging Face folder): its "
                    "kind, the model config, parameters per top-level module and, for official checkpoints, "
                    "which official keys became which of ours.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="WEIGHTS|PRESET",
                   help=f"a weights source, or a preset: {', '.join(sorted(PRESETS))}")
    p.add_argument("--preset", choices=sorted(PRESETS), metavar="PRESET",
                   help="for an official checkpoint: the architecture to map it onto (default: guessed from its keys)")
    p.add_argument("--ema", action="store_true", help="for a training checkpoint: describe its EMA weights")
    p.add_argument("--keys", action="store_true", help="list every official -> our key mapping")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def run(args: argparse.Namespace) -> int:
    from ..config import config_to_dict, make_config
    from ..weights import registry
    from ..weights.kinds import KIND_NAMES, read_weights
    from .errors import CLIError

    target = args.target
    if not Path(target).exists() and target not in PRESETS and registry.find(target) is None and "/" not in target:
        raise CLIError(f"{target!r} is neither a file nor a preset ({', '.join(sorted(PRESETS))}) nor a pretrained "
                       "model name (`focus-detr models`)")
    info: dict[str, Any]
    if target in PRESETS and not Path(target).exists():
        cfg = make_config(target)
        info = {"kind": "preset", "name": target, "config": config_to_dict(cfg), "parameters": _param_counts(cfg)}
    else:
        try:
            read = read_weights(target, args.preset, args.ema)
        except Exception as e:
            info = _unrecognised_official(target, e)
        else:
            info = {"kind": read.kind, "kind_name": KIND_NAMES[read.kind], "source": target,
                    "path": str(read.path) if read.path else None, "description": read.description,
                    **read.info, "extra": read.extra, "config": config_to_dict(read.cfg),
                    "parameters": _param_counts(read.cfg, read.state_dict)}
            if read.report is not None:
                info.update(_official_mapping(read.report))

    if args.json:
        if not args.keys:
            info.pop("key_map", None)
        print(json.dumps(info, indent=1, default=str))
    else:
        print(_render(info, args.keys))
    return 0


def _unrecognised_official(target: str, error: Exception) -> dict[str, Any]:
    """An official checkpoint whose architecture could not be guessed: its key groups (else re-raise)."""
    from ..weights.kinds import identify, official_state_dict

    if "not recognisable from its keys" not in str(error):
        raise error
    src = identify(target)
    if src.kind != "official":
        raise error
    state = official_state_dict(src.payload, str(src.path))
    return {"kind": "official", "kind_name": "official detrex checkpoint", "path": str(src.path),
            "num_keys": len(state), "num_values": int(sum(v.numel() for v in state.values())),
            "key_prefixes": dict(sorted(Counter(_prefix(k) for k in state).items())),
            "note": "the architecture is not recognisable from the keys: pass --preset to map them onto a "
                    "focus-detr model and see the conversion report"}


def _official_mapping(report) -> dict[str, Any]:
    """Where our modules' weights came from in an official checkpoint."""
    official_keys = list(report.converted) + list(report.aliases) + report.ignored + report.unconverted
    sources: dict[str, Counter] = defaultdict(Counter)
    for official, ours in report.converted.items():
        sources[ours.split(".")[0]][_prefix(official)] += 1
    return {"num_keys": len(official_keys), "key_prefixes": dict(sorted(Counter(_prefix(k) for k in official_keys).items())),
            "conversion": report.summary(), "sources": {module: dict(c) for module, c in sorted(sources.items())},
            "aliases": len(report.aliases), "ignored": report.ignored, "unconverted": report.unconverted,
            "key_map": dict(report.converted)}


def _prefix(key: str) -> str:
    """Group official keys by their first two name parts: ``transformer.encoder.*``; short keys stay whole."""
    parts = key.split(".")
    return ".".join(parts[:2]) + ".*" if len(parts) > 2 else key


def _param_counts(cfg, state_dict: dict | None = None) -> dict[str, int]:
    """Parameters per top-level module (buffers such as frozen batch-norm statistics are not counted)."""

    from ..model import build_model

    # A real build (not the meta device: its first use costs seconds of start-up in every process).
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
    elif "description" not in info:  # an official checkpoint of unknown architecture
        lines.append(f"kind: {info['kind_name']} ({kind})")
        lines.append(f"{info['path']}: {info['num_keys']} tensors, {info['num_values']:,} values")
        for prefix, n in info["key_prefixes"].items():
            lines.append(f"  {prefix:<40s} {n:5d} keys")
        lines.append(info["note"])
        return "\n".join(lines)
    else:
        lines.append(f"kind: {info['kind_name']} ({kind})" + (f", holding a {info['inner_kind']} file {info['member']}"
                                                               if "member" in info else ""))
        lines.append(f"source: {info['description']}")
        if info.get("sha256"):
            lines.append(f"  sha256 (config + tensors): {info['sha256']}")
        for k, v in info.get("extra", {}).items():
            lines.append(f"  {k}: {v}")
    if "conversion" in info:
        lines.append(f"official keys: {info['num_keys']}")
        for prefix, n in info["key_prefixes"].items():
            lines.append(f"  {prefix:<40s} {n:5d} keys")
        lines.append(f"mapped onto preset {info.get('preset')!r}: {info['conversion']}")
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
