"""`focus-detr models`: the pretrained models by name, their COCO AP, size and whether they are cached."""

from __future__ import annotations

import argparse
import json

EXAMPLES = """\
examples:
  focus-detr models                         # the table
  focus-detr models --json                  # machine-readable
  focus-detr predict focus_detr_r50_4scale_36ep photos/ --out runs/predict   # use one (downloaded once)

Files are cached in $FOCUS_DETR_HOME (default ~/.cache/focus_detr); FOCUS_DETR_MIRROR=URL replaces the scheme
and host of every download URL. Entries without an official link are listed as unavailable.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="list the pretrained models (official COCO AP, size, cached or not)",
                       description="List the pretrained Focus-DETR models and ImageNet backbones that every weights "
                                   "argument accepts by name.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    return p


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def run(args: argparse.Namespace) -> int:
    from ..weights import registry
    from ..weights.download import cache_home, cached_state

    rows = []
    for m in registry.all_models():
        state = cached_state(m)
        rows.append({**registry.as_dict(m), **state,
                     "size": state.get("converted_size", state.get("download_size"))})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'name':<44s} {'backbone':<22s} {'epochs':>6s} {'COCO AP':>7s} {'size':>9s}  cached")
    for r in rows:
        ap = "-" if r["coco_ap"] is None else f"{r['coco_ap']:.1f}"
        epochs = "-" if r["epochs"] is None else str(r["epochs"])
        cached = "yes" if r["cached"] else ("unavailable" if not r["available"] else "no")
        print(f"{r['name']:<44s} {r['backbone']:<22s} {epochs:>6s} {ap:>7s} {_size(r['size']):>9s}  {cached}")
    notes = [r for r in rows if r["note"]]
    if notes:
        print("notes:")
        for r in notes:
            print(f"  {r['name']}: {r['note']}")
    print(f"cache: {cache_home()} (size is known once a file is cached: none of the official files publishes one)")
    return 0
