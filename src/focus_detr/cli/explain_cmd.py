"""`focus-detr explain`: the Focus-DETR explanation figure (foreground scores, kept tokens, OESM tokens) for
one image, plus the arrays behind it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .options import add_runtime_options
from .predict_cmd import add_model_options, model_from_args, positive_int, split_weights, unit_float

EXAMPLES = """\
examples:
  focus-detr explain focus_detr_r50_4scale_36ep photo.jpg --out runs/explain
  focus-detr explain weights.pt photo.jpg --out runs/explain
  focus-detr explain --preset tiny --random-init photo.jpg --out runs/explain    # no weights: demo
  focus-detr explain weights.pt https://example.com/street.jpg --out runs/explain # downloaded first

writes runs/explain/explain.png (row 1: detections, foreground probability per feature level, share of
tokens kept per layer; row 2: tokens kept by each encoder layer; row 3: the tokens of each layer's
object-enhanced self-attention), runs/explain/explain_arrays.npz (the same data as arrays, see
focus_detr.viz.explain_arrays) and runs/explain/detections.json (the drawn detections, original pixels).
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "explain", help="explain where the model looks in one image (figure + arrays)",
        description="Draw Focus-DETR's token sparsification for one image: foreground score heat maps per "
                    "feature level, the tokens each encoder layer keeps, the OESM tokens, and the detections.",
        usage="focus-detr explain [options] (WEIGHTS | --preset P --random-init) IMAGE --out DIR",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="WEIGHTS IMAGE",
                   help="weights (pretrained name, weights file, checkpoint, official .pth/.zip, Hugging Face "
                        "folder), then one image file or http(s) URL")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--score-threshold", type=unit_float, default=0.3,
                   help="draw detections with at least this score (default 0.3)")
    p.add_argument("--max-detections", type=positive_int, default=50, help="draw at most this many (default 50)")
    p.add_argument("--dpi", type=positive_int, default=100, help="resolution of explain.png (default 100)")
    p.add_argument("--width", type=float, default=16.0, help="figure width in inches (default 16)")
    add_model_options(p)
    add_runtime_options(p, quiet_help="do not print the model line on stderr")
    return p


def run(args: argparse.Namespace) -> int:
    from ..data.errors import DataError
    from ..inference import explain
    from ..viz import save_figure
    from .errors import CLIError

    weights, images = split_weights(args, args.paths, "IMAGE")
    if len(images) != 1:
        raise CLIError(f"explain takes one image, got {len(images)}: {' '.join(images)}")
    from ..data.url_io import is_url, url_file_name

    # A URL stays a string (Path() would collapse its "//"); explain() downloads it with a size limit.
    image: str | Path = images[0] if is_url(images[0]) else Path(images[0])
    if isinstance(image, Path) and not image.is_file():
        raise CLIError(f"{image}: no such image file")
    name = url_file_name(image) if isinstance(image, str) else image.name
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError("explain needs matplotlib: pip install 'focus-detr[viz]'") from None
    model, description = model_from_args(args, weights)
    if not args.quiet:
        print(f"model: {description} on {model.device}", file=sys.stderr)
    try:
        figure, arrays, detections = explain(model, image, score_threshold=args.score_threshold,
                                             max_detections=args.max_detections, title=name,
                                             width_inches=args.width)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png, npz, js = out / "explain.png", out / "explain_arrays.npz", out / "detections.json"
    save_figure(figure, png, dpi=args.dpi)
    import numpy as np

    np.savez_compressed(npz, **arrays)
    js.write_text(json.dumps({
        "image": str(image), "height": int(arrays["image_size"][0]), "width": int(arrays["image_size"][1]),
        "input_size": [int(v) for v in arrays["input_size"]],
        "detections": [{"box_xyxy": [round(v, 2) for v in box], "score": round(score, 5), "label": label,
                        "name": name}
                       for box, score, label, name in zip(detections.boxes.tolist(), detections.scores.tolist(),
                                                          detections.labels.tolist(), detections.names)],
    }, indent=1) + "\n")
    counts = ", ".join(f"layer {k + 1}: {int(c)}" for k, c in enumerate(arrays["selected_count"]))
    print(f"input {arrays['input_size'][0]}x{arrays['input_size'][1]} (from {arrays['image_size'][0]}x"
          f"{arrays['image_size'][1]}), {int(arrays['valid_count'])} tokens; kept per layer: {counts}; "
          f"{len(detections)} detection(s) >= {args.score_threshold}")
    panels = getattr(figure, "focus_detr_panels", {})
    print(f"figure:   {png} ({', '.join(f'{k} {v}' for k, v in panels.items())} panels)")
    print(f"arrays:   {npz}")
    print(f"detections: {js}")
    return 0
