"""`focus-detr predict`: detect objects in image files, folders or glob patterns.

Also holds the model-selection options shared by ``explain`` and ``export`` (:func:`add_model_options`,
:func:`model_from_args`): WEIGHTS is any weights source (a pretrained name, our weights file, a training
checkpoint with optional ``--ema``, an official checkpoint or release zip with optional ``--preset``, a
Hugging Face folder), or ``--preset P --random-init`` instead of WEIGHTS.
"""

from __future__ import annotations

import argparse
import sys

from ..config import PRESETS

EXAMPLES = """\
examples:
  focus-detr predict focus_detr_r50_4scale_36ep photos/ --out runs/predict   # pretrained: downloaded once
  focus-detr predict weights.pt photos/ extra.jpg "more/**/*.png" --out runs/predict
  focus-detr predict r50_36ep.pth photos/ --preset r50_4scale --out runs/predict --device cuda --batch-size 8
  focus-detr predict --preset tiny --random-init photos/ --out runs/smoke      # no weights: smoke test

writes runs/predict/results.json (COCO results format), runs/predict/images.json (COCO images +
categories, so COCO("images.json").loadRes("results.json") works; "failed" lists unreadable inputs) and
runs/predict/annotated/<name> (each picture at its own size with its detections drawn).
Exit code 0 if every input was read, 1 if any failed (the rest are still processed), 2 on usage errors.
"""


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--preset``, ``--ema``, ``--random-init``, ``--seed`` and ``--device`` (shared by predict, explain,
    export)."""
    group = parser.add_argument_group("model")
    group.add_argument("--preset", choices=sorted(PRESETS), metavar="PRESET",
                       help="with an official detrex checkpoint as WEIGHTS: the architecture to load it into (default: "
                            "guessed from its keys); with --random-init: the model to build. One of: "
                            f"{', '.join(sorted(PRESETS))}")
    group.add_argument("--ema", action="store_true", help="with a training checkpoint as WEIGHTS: use its EMA weights")
    group.add_argument("--random-init", action="store_true",
                       help="no weights file: build --preset with random weights (smoke tests, demos)")
    group.add_argument("--seed", type=int, default=0, help="random seed for --random-init (default 0)")
    group.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N (default auto)")


def split_weights(args: argparse.Namespace, positional: list[str], what: str) -> tuple[str | None, list[str]]:
    """Positional arguments are ``WEIGHTS ITEM...``, or just ``ITEM...`` with ``--random-init``."""
    from .main import CLIError

    if args.random_init:
        if args.preset is None:
            raise CLIError("--random-init needs --preset (e.g. --preset tiny)")
        return None, positional
    if len(positional) < 2:
        raise CLIError(f"expected WEIGHTS followed by {what} (or --preset NAME --random-init and {what})")
    return positional[0], positional[1:]


def model_from_args(args: argparse.Namespace, weights: str | None):
    """Load the model the options describe; returns ``(model, description)``."""
    from ..inference import load_model

    return load_model(weights, args.preset, args.random_init, args.device, args.seed, ema=getattr(args, "ema", False))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "predict", help="detect objects in images; writes annotated pictures and COCO-format results",
        description="Detect objects in image files, folders (searched recursively) and glob patterns. "
                    "Unreadable files are reported and skipped.",
        usage="focus-detr predict [options] (WEIGHTS | --preset P --random-init) INPUT [INPUT ...] --out DIR",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="WEIGHTS INPUT",
                   help="weights (pretrained name, weights file, checkpoint, official .pth/.zip, Hugging Face "
                        "folder), then images, folders or globs")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--score-threshold", type=unit_float, default=0.3,
                   help="keep detections with at least this score in results and pictures (default 0.3; "
                        "use 0 for COCO evaluation, with --draw-threshold or --no-draw)")
    p.add_argument("--draw-threshold", type=unit_float, default=None,
                   help="score needed to be drawn on the pictures (default: the score threshold)")
    p.add_argument("--max-detections", type=positive_int, default=None,
                   help="at most this many detections per image (default: the model's, e.g. 300)")
    p.add_argument("--categories", metavar="COCO.json", default=None,
                   help="map labels to this COCO annotation file's category ids by name (default: category id = "
                        "contiguous label)")
    p.add_argument("--no-draw", action="store_true", help="do not write annotated pictures")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    from ..inference import discover_images, predict_to_folder
    from .main import CLIError

    weights, inputs = split_weights(args, args.paths, "INPUT ...")
    paths, problems = discover_images(inputs)
    if not paths:
        detail = "\n  ".join(str(p) for p in problems)
        raise CLIError(f"no images found in the inputs:\n  {detail}")
    model, description = model_from_args(args, weights)
    print(f"model: {description} on {model.device}; {len(paths)} image(s)", file=sys.stderr)
    summary = predict_to_folder(
        model, inputs, args.out, batch_size=args.batch_size, score_threshold=args.score_threshold,
        max_detections=args.max_detections, draw=not args.no_draw, draw_threshold=args.draw_threshold,
        categories_file=args.categories, progress=not args.quiet, model_description=description)
    per_image = summary.seconds / max(summary.num_images, 1)
    print(f"{summary.num_images} image(s), {summary.num_detections} detection(s) in {summary.seconds:.1f} s "
          f"({per_image:.2f} s/image)")
    print(f"results:  {summary.results_file}")
    print(f"images:   {summary.images_file}")
    if summary.pictures:
        print(f"pictures: {summary.out_dir / 'annotated'} ({len(summary.pictures)} files)")
    if not summary.ok:
        print(f"error: {summary.error_summary()}", file=sys.stderr)
        return 1
    return 0
