"""`focus-detr predict`: detect objects in image and video files, folders, glob patterns, http(s) URLs and
camera / RTSP streams.

Also holds the model-selection options shared by ``explain`` and ``export`` (:func:`add_model_options`,
:func:`model_from_args`): WEIGHTS is any weights source (a pretrained name, our weights file, a training
checkpoint with optional ``--ema``, an official checkpoint or release zip with optional ``--preset``, a
Hugging Face folder), or ``--preset P --random-init`` instead of WEIGHTS.
"""

from __future__ import annotations

import argparse
import sys

from ..config import PRESETS
from .options import add_precision_option, add_runtime_options

EXAMPLES = """\
examples:
  focus-detr predict focus_detr_r50_4scale_36ep photos/ --out runs/predict   # pretrained: downloaded once
  focus-detr predict weights.pt photos/ extra.jpg "more/**/*.png" --out runs/predict
  focus-detr predict r50_36ep.pth photos/ --preset r50_4scale --out runs/predict --device cuda --batch-size 8
  focus-detr predict --preset tiny --random-init photos/ --out runs/smoke      # no weights: smoke test
  focus-detr predict weights.pt photos/ --out runs/bf16 --precision bf16        # CPUs with bf16 units, GPUs
  focus-detr predict weights.pt https://example.com/street.jpg --out runs/url   # downloaded first
  focus-detr predict weights.pt clip.mp4 --out runs/video --frame-step 2        # needs focus-detr[video]
  focus-detr predict weights.pt rtsp://camera.local/stream camera:0 --max-frames 300 --out runs/live

writes runs/predict/results.json (COCO results format), runs/predict/images.json (COCO images +
categories, so COCO("images.json").loadRes("results.json") works; "failed" lists unreadable inputs) and
runs/predict/annotated/<name> (each picture with its detections drawn; a legend strip is added below when
some labels do not fit on the picture) and runs/predict/annotated/<video>.mp4 for each video or stream (its
frames are images.json entries with "video" and "frame_index"; results carry "frame_index" too).
URLs are downloaded into runs/predict/downloads/ first; live streams run until --max-frames or Ctrl+C.
Exit code 0 if every input was read, 1 if any failed (the rest are still processed), 2 on usage errors,
130 on Ctrl-C (after writing the results of the inputs done).
"""


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--preset``, ``--ema``, ``--random-init`` and ``--seed`` (shared by predict, explain, export; their
    ``--device``, ``--threads`` and ``--quiet`` come from :func:`focus_detr.cli.options.add_runtime_options`)."""
    group = parser.add_argument_group("model")
    group.add_argument("--preset", choices=sorted(PRESETS), metavar="PRESET",
                       help="with an official detrex checkpoint as WEIGHTS: the architecture to load it into (default: "
                            "guessed from its keys); with --random-init: the model to build. One of: "
                            f"{', '.join(sorted(PRESETS))}")
    group.add_argument("--ema", action="store_true", help="with a training checkpoint as WEIGHTS: use its EMA weights")
    group.add_argument("--random-init", action="store_true",
                       help="no weights file: build --preset with random weights (smoke tests, demos)")
    group.add_argument("--seed", type=int, default=0, help="random seed for --random-init (default 0)")


def split_weights(args: argparse.Namespace, positional: list[str], what: str) -> tuple[str | None, list[str]]:
    """Positional arguments are ``WEIGHTS ITEM...``, or just ``ITEM...`` with ``--random-init``."""
    from .errors import CLIError

    if args.random_init:
        if args.preset is None:
            raise CLIError("--random-init needs --preset (e.g. --preset tiny)")
        return None, positional
    if len(positional) < 2:
        raise CLIError(f"expected WEIGHTS followed by {what} (or --preset NAME --random-init and {what})")
    return positional[0], positional[1:]


def model_from_args(args: argparse.Namespace, weights: str | None):
    """Load the model the options describe, on ``--device`` with ``--threads``; returns ``(model, description)``."""
    from ..inference import load_model
    from .options import apply_threads, check_device

    check_device(args)
    apply_threads(args)
    return load_model(weights, args.preset, args.random_init, args.device, args.seed, ema=getattr(args, "ema", False),
                      progress=not getattr(args, "quiet", False))


def check_output_folder(folder: str, what: str = "--out") -> None:
    """Create ``folder`` and make sure it takes files, before any long work (one-line CLIError if not)."""
    from ..engine.run_dir import RunDirError, ensure_writable
    from .errors import CLIError

    try:
        ensure_writable(folder, what)
    except RunDirError as e:
        raise CLIError(str(e)) from None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "predict", help="detect objects in images; writes annotated pictures and COCO-format results",
        description="Detect objects in image and video files, folders (searched recursively), glob patterns, "
                    "http(s) URLs and camera / stream sources (camera:N, rtsp://...). Unreadable inputs are "
                    "reported and skipped.",
        usage="focus-detr predict [options] (WEIGHTS | --preset P --random-init) INPUT [INPUT ...] --out DIR",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="WEIGHTS INPUT",
                   help="weights (pretrained name, weights file, checkpoint, official .pth/.zip, Hugging Face "
                        "folder), then images, videos, folders, globs, http(s) URLs, camera:N or rtsp:// streams")
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
    p.add_argument("--no-draw", action="store_true", help="do not write annotated pictures / videos")
    p.add_argument("--frame-step", type=positive_int, default=1,
                   help="videos and streams: predict every N-th frame (default 1: all)")
    p.add_argument("--max-frames", type=positive_int, default=None,
                   help="videos and streams: stop after this many predicted frames per input (default: all; "
                        "a live stream otherwise runs until Ctrl+C)")
    p.add_argument("--max-download-mb", type=positive_float, default=200.0,
                   help="URLs: refuse downloads larger than this (default 200)")
    p.add_argument("--keep-ratio", type=float, default=None, metavar="R",
                   help="speed knob: foreground keep ratio of the encoder in (0, 1] (default: the model's, 0.5 "
                        "in the paper); lower is faster, see focus_detr.model.knobs.with_keep_ratio")
    add_model_options(p)
    add_runtime_options(p, quiet_help="no progress bar and no model line on stderr")
    add_precision_option(p)
    return p


def run(args: argparse.Namespace) -> int:
    from ..inference import discover_inputs, predict_to_folder
    from .errors import CLIError

    from .options import apply_precision, check_device

    weights, inputs = split_weights(args, args.paths, "INPUT ...")
    check_device(args)  # before scanning folders or downloading
    check_output_folder(args.out)
    items, problems = discover_inputs(inputs)
    if not items:
        detail = "\n  ".join(str(p) for p in problems)
        raise CLIError(f"no images or videos found in the inputs:\n  {detail}")
    _check_video_support(items)
    if args.keep_ratio is not None:  # the range now, before loading; the encoder mode once the model is there
        from ..model.knobs import check_keep_ratio

        try:
            check_keep_ratio(args.keep_ratio)
        except ValueError as e:
            raise CLIError(f"--keep-ratio: {e}") from None
    model, description = model_from_args(args, weights)
    if args.keep_ratio is not None:
        from ..model.knobs import with_keep_ratio

        try:
            with_keep_ratio(model, args.keep_ratio)
        except ValueError as e:
            raise CLIError(f"--keep-ratio: {e}") from None
        description += f", keep ratio {model.cfg.encoder.keep_ratio:g}"
    model = apply_precision(model, args.precision)
    description += f", {args.precision}"
    counts = {kind: sum(it.kind == kind for it in items) for kind in ("image", "video", "url", "stream")}
    found = ", ".join(f"{n} {kind}(s)" for kind, n in counts.items() if n)
    if not args.quiet:
        print(f"model: {description} on {model.device}; {found}", file=sys.stderr)
    summary = predict_to_folder(
        model, inputs, args.out, batch_size=args.batch_size, score_threshold=args.score_threshold,
        max_detections=args.max_detections, draw=not args.no_draw, draw_threshold=args.draw_threshold,
        categories_file=args.categories, progress=not args.quiet, model_description=description,
        frame_step=args.frame_step, max_frames=args.max_frames,
        max_download_bytes=int(args.max_download_mb * 1e6))
    if summary.interrupted_by is not None:
        # Ctrl-C / SIGTERM: what was done is written; say so in one line and exit like an interrupted command.
        print(f"interrupted after {summary.num_images} of {summary.num_inputs} image(s): results so far in "
              f"{summary.results_file}", file=sys.stderr)
        return 128 + int(summary.interrupted_by)
    per_image = summary.seconds / max(summary.num_images, 1)
    print(f"{summary.num_images} image(s), {summary.num_detections} detection(s) in {summary.seconds:.1f} s "
          f"({per_image:.2f} s/image)")
    for video in summary.videos:
        print(f"video:    {video}")
    print(f"results:  {summary.results_file}")
    print(f"images:   {summary.images_file}")
    if summary.pictures:
        print(f"pictures: {summary.out_dir / 'annotated'} ({len(summary.pictures)} files)")
    if not summary.ok:
        print(f"error: {summary.error_summary()}", file=sys.stderr)
        return 1
    return 0


def _check_video_support(items) -> None:
    """Videos or streams without PyAV: say so once, up front (the images are still processed)."""
    if any(it.kind in ("video", "stream") for it in items):
        from ..video import INSTALL_HINT
        import importlib.util

        if importlib.util.find_spec("av") is None:
            print(f"note: {INSTALL_HINT} (videos and streams among the inputs are skipped and listed as failed)",
                  file=sys.stderr)
