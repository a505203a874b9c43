"""`focus-detr convert`: official detrex Focus-DETR checkpoint -> our self-describing weights file, verified."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..config import PRESETS

EXAMPLES = """\
examples:
  focus-detr convert focus_detr_r50_4scale_36ep.pth weights/r50_36ep.pt --preset r50_4scale
  focus-detr convert focus_detr_r50_4scale_12ep.pth weights/r50_12ep.pt --preset r50_4scale_12ep

The preset must match the checkpoint's training schedule: position-embedding settings are not stored in
official checkpoints (r50_4scale / r101_4scale = 24 and 36 epochs, *_12ep = 12 epochs; Swin presets by size).
After writing OUT it is loaded back and checked: identical tensors, and identical outputs of the converted
and the reloaded model on a random image (skip with --no-verify).
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "convert", help="convert an official detrex checkpoint to a focus-detr weights file",
        description="Convert an official detrex Focus-DETR checkpoint (.pth) into a focus-detr weights file "
                    "(config + tensors, loadable with focus_detr.load or any focus-detr command).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("official", metavar="OFFICIAL.pth", help="official checkpoint (detectron2 dict with 'model')")
    p.add_argument("out", metavar="OUT", help="weights file to write (e.g. weights/r50.pt)")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), metavar="PRESET",
                   help=f"architecture of the checkpoint, one of: {', '.join(sorted(PRESETS))}")
    p.add_argument("--no-verify", action="store_true", help="skip loading OUT back and comparing outputs")
    p.add_argument("--verify-size", type=int, nargs=2, default=(160, 224), metavar=("H", "W"),
                   help="size of the random verification image (default 160 224)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    return p


def run(args: argparse.Namespace) -> int:
    from .. import api
    from ..convert.official import extract_state_dict
    from ..inference import _is_our_weights, short_error
    from .main import CLIError

    src, out = Path(args.official), Path(args.out)
    if not src.is_file():
        raise CLIError(f"{src}: no such file")
    if out.exists() and not args.force:
        raise CLIError(f"{out} exists; pass --force to overwrite it")
    if out.resolve() == src.resolve():
        raise CLIError("OUT must differ from the official checkpoint")
    start = time.perf_counter()
    if _is_our_weights(src):
        raise CLIError(f"{src} is already a focus-detr weights file (see `focus-detr info {src}`)")
    try:
        state = extract_state_dict(src)
    except Exception as e:  # noqa: BLE001 - truncated zip, foreign pickle, text...: say so without a traceback
        raise CLIError(f"{src}: not a readable checkpoint ({short_error(e)})", code=1) from None
    if not state:
        raise CLIError(f"{src}: holds no tensors (expected a detectron2 checkpoint with a 'model' state dict)", code=1)
    model, report = api.load_official(state, args.preset, return_report=True)
    print(f"loaded {src} into preset {args.preset!r}: {report.summary()}")
    if report.unconverted:  # load_official is strict, so this is only reachable if that ever changes
        print("unconverted keys: " + ", ".join(report.unconverted[:20]), file=sys.stderr)
    api.save(model, out, extra={"converted_from": src.name, "preset": args.preset,
                                "conversion": report.summary()})
    size_mb = out.stat().st_size / 2**20
    print(f"wrote {out} ({size_mb:.1f} MiB, {sum(p.numel() for p in model.parameters()):,} parameters)")
    if not args.no_verify:
        message = verify_roundtrip(model, out, tuple(args.verify_size))
        print(f"verified: {message}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def verify_roundtrip(model, path: Path, size: tuple[int, int] = (160, 224)) -> str:
    """Load ``path`` back and compare it with ``model``: every tensor, then the outputs on one random image.

    Raises :class:`~focus_detr.cli.main.CLIError` (exit 1) on any difference; returns a one-line summary.
    """
    import torch

    from .. import api
    from .main import CLIError

    loaded = api.load(path)
    own, back = model.state_dict(), loaded.state_dict()
    differ = sorted(k for k in own if k not in back or not torch.equal(own[k].cpu(), back[k]))
    if differ or set(back) - set(own):
        raise CLIError(f"{path}: reloaded weights differ from the converted model: {differ[:10]}", code=1)
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=generator)
    model.eval()
    with torch.no_grad():
        a = model(model.batch([image]))
        b = loaded(loaded.batch([image]))
    diff = max(float((a.main.logits.cpu() - b.main.logits).abs().max()),
               float((a.main.boxes.cpu() - b.main.boxes).abs().max()))
    if diff != 0.0:
        raise CLIError(f"{path}: outputs of the reloaded model differ from the converted one (max |diff| {diff:g})",
                       code=1)
    return (f"{len(own)} tensors identical after reloading; outputs identical on a random {size[0]}x{size[1]} "
            f"image ({a.main.logits.shape[1]} queries)")
