"""`focus-detr convert`: any weights source (official detrex checkpoint or release zip, training checkpoint,
Hugging Face folder, pretrained name) -> our self-describing weights file, verified."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..config import PRESETS
from .options import add_runtime_options, apply_threads, check_device

EXAMPLES = """\
examples:
  focus-detr convert focus_detr_r50_4scale_36ep.pth weights/r50_36ep.pt --preset r50_4scale
  focus-detr convert focus_detr_r50_4scale_12ep.zip weights/r50_12ep.pt --preset r50_4scale_12ep
  focus-detr convert runs/x/checkpoints/checkpoint_0001000.pth weights/x_ema.pt --ema

For official checkpoints the preset must match the training schedule: position-embedding settings are not
stored in them (r50_4scale / r101_4scale = 24 and 36 epochs, *_12ep = 12 epochs; Swin presets by size).
Without --preset it is guessed from the keys (ResNet guesses assume 24/36 epochs) and the guess is printed.
After writing OUT it is loaded back and checked: identical tensors, and identical outputs of the converted
and the reloaded model on a random image (skip with --no-verify).
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "convert", help="convert an official detrex checkpoint (or any weights source) to a focus-detr weights file",
        description="Convert an official detrex Focus-DETR checkpoint (.pth or release .zip), a training "
                    "checkpoint, a Hugging Face folder or a pretrained name into a focus-detr weights file "
                    "(config + tensors, loadable with focus_detr.load or any focus-detr command).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("official", metavar="SOURCE", help="official checkpoint (detectron2 dict with 'model') or release "
                   "zip; also a training checkpoint, Hugging Face folder or pretrained name")
    p.add_argument("out", metavar="OUT", help="weights file to write (e.g. weights/r50.pt)")
    p.add_argument("--preset", choices=sorted(PRESETS), metavar="PRESET",
                   help=f"architecture of an official checkpoint (default: guessed from its keys), one of: "
                        f"{', '.join(sorted(PRESETS))}")
    p.add_argument("--ema", action="store_true", help="for a training checkpoint: convert its EMA weights")
    p.add_argument("--no-verify", action="store_true", help="skip loading OUT back and comparing outputs")
    p.add_argument("--verify-size", type=int, nargs=2, default=(160, 224), metavar=("H", "W"),
                   help="size of the random verification image (default 160 224)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    add_runtime_options(p, device_default="cpu", device_note=": where the verification runs",
                        quiet_help="no download progress bar (for a pretrained name)")
    return p


def run(args: argparse.Namespace) -> int:
    from .. import api
    from ..weights.kinds import build_for_state_dict, read_weights
    from .errors import CLIError

    src, out = args.official, Path(args.out)
    if out.exists() and not args.force:
        raise CLIError(f"{out} exists; pass --force to overwrite it")
    if Path(src).exists() and out.resolve() == Path(src).resolve():
        raise CLIError("OUT must differ from SOURCE")
    device = check_device(args)
    apply_threads(args)
    start = time.perf_counter()
    read = read_weights(src, args.preset, args.ema, progress=not args.quiet)
    if read.kind == "weights":
        raise CLIError(f"{src} is already a focus-detr weights file (see `focus-detr info {src}`)")
    model = build_for_state_dict(read.cfg, read.state_dict, str(read.path or src), read.report)
    summary = read.report.summary() if read.report is not None else f"{len(read.state_dict)} tensors"
    print(f"loaded {read.description}: {summary}")
    if read.report is not None and read.report.unconverted:  # unreachable while loading is strict
        print("unconverted keys: " + ", ".join(read.report.unconverted[:20]), file=sys.stderr)
    extra = {"converted_from": Path(src).name, "source_kind": read.kind, "conversion": summary}
    if read.info.get("preset"):
        extra["preset"] = read.info["preset"]
    api.save(model, out, extra=extra)
    size_mb = out.stat().st_size / 2**20
    print(f"wrote {out} ({size_mb:.1f} MiB, {sum(p.numel() for p in model.parameters()):,} parameters)")
    if not args.no_verify:
        message = verify_roundtrip(model, out, tuple(args.verify_size), device)
        print(f"verified: {message}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def verify_roundtrip(model, path: Path, size: tuple[int, int] = (160, 224), device=None) -> str:
    """Load ``path`` back and compare it with ``model``: every tensor, then the outputs on one random image
    (both models on ``device``, default the CPU).

    Raises :class:`~focus_detr.cli.errors.CLIError` (exit 1) on any difference; returns a one-line summary.
    """
    import torch

    from .. import api
    from .errors import CLIError

    device = torch.device("cpu") if device is None else device
    loaded = api.load(path)
    own, back = model.state_dict(), loaded.state_dict()
    differ = sorted(k for k in own if k not in back or not torch.equal(own[k].cpu(), back[k].cpu()))
    if differ or set(back) - set(own):
        raise CLIError(f"{path}: reloaded weights differ from the converted model: {differ[:10]}", code=1)
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=generator)
    model = model.to(device).eval()
    loaded = loaded.to(device).eval()
    with torch.no_grad():
        a = model(model.batch([image]))
        b = loaded(loaded.batch([image]))
    diff = max(float((a.main.logits - b.main.logits).abs().max()),
               float((a.main.boxes - b.main.boxes).abs().max()))
    if diff != 0.0:
        raise CLIError(f"{path}: outputs of the reloaded model differ from the converted one (max |diff| {diff:g})",
                       code=1)
    return (f"{len(own)} tensors identical after reloading; outputs identical on a random {size[0]}x{size[1]} "
            f"image ({a.main.logits.shape[1]} queries)")
