"""`focus-detr export`: an ONNX graph with a dynamic image size, checked against PyTorch with onnxruntime."""

from __future__ import annotations

import argparse
import sys

from .options import add_precision_option, add_runtime_options
from .predict_cmd import add_model_options, model_from_args, split_weights

EXAMPLES = """\
examples:
  focus-detr export weights.pt --format onnx model.onnx
  focus-detr export --preset tiny --random-init --format onnx tiny.onnx     # no weights: smoke test

The graph takes one image "image" [1, 3, H, W] float32 (RGB 0..255, already resized by the model's
test-time rule; H and W dynamic, 65..4096) and returns logits [1, Q, C], boxes [1, Q, 4] (sigmoid cxcywh),
scores / labels / boxes_xyxy / query_indices of the top-K detections. focus_detr.export.OnnxDetector runs
it on image files. After export the file is run with onnxruntime on two random images of other sizes and
compared with PyTorch (skip with --no-verify). Needs: pip install onnx onnxscript onnxruntime.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export", help="export to ONNX (dynamic image size), verified with onnxruntime",
        description="Export a model to ONNX with a dynamic input size (torch.onnx dynamo exporter).",
        usage="focus-detr export [options] (WEIGHTS | --preset P --random-init) --format onnx OUT.onnx",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    # nargs="*": with --random-init there is no WEIGHTS, and OUT may come after --format onnx (below).
    p.add_argument("paths", nargs="*", metavar="WEIGHTS OUT", help="weights (pretrained name, weights file, checkpoint, "
                   "official .pth/.zip, Hugging Face folder), then the file to write (OUT may also follow --format onnx)")
    # nargs="+": argparse cannot take a positional after an option, so in the documented form
    # `export WEIGHTS --format onnx OUT.onnx` OUT arrives here and is moved back to the positionals.
    p.add_argument("--format", nargs="+", default=["onnx"], metavar="FORMAT", help="output format: onnx (default)")
    # Default kept in focus_detr.export.onnx.DEFAULT_OPSET (not imported here: --help must not load torch).
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18; at least 16)")
    p.add_argument("--example-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="input size traced (default: a 480x640 photo after the model's resize); any size works "
                        "afterwards")
    p.add_argument("--verify-sizes", type=int, nargs="+", metavar="H W", default=None,
                   help="sizes of the random verification images, as H W pairs (default: two sizes that differ "
                        "from the example size)")
    p.add_argument("--no-verify", action="store_true", help="do not run the exported file with onnxruntime")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest accepted |logit| difference between onnxruntime and PyTorch (default 1e-3)")
    add_model_options(p)
    add_runtime_options(p, quiet_help="do not print the model line on stderr")
    add_precision_option(p, note="; export writes fp32 graphs only (see docs/usage.md)")
    return p


def run(args: argparse.Namespace) -> int:
    from ..export.onnx import DEFAULT_OPSET, MIN_SIZE, OnnxExportError, default_example_size, export_onnx
    from .errors import CLIError

    opset = DEFAULT_OPSET if args.opset is None else args.opset

    fmt, *trailing = args.format
    if fmt != "onnx":
        raise CLIError(f"unknown --format {fmt!r}; supported: onnx")
    weights, rest = split_weights(args, list(args.paths) + trailing, "OUT.onnx")
    if len(rest) != 1:
        raise CLIError(f"expected one output file, got {len(rest)}: {' '.join(rest)}")
    out = rest[0]
    if args.precision != "fp32":
        raise CLIError(f"--precision {args.precision} is not supported by export: it writes float32 ONNX graphs "
                       "(onnxruntime has no fast bfloat16 CPU kernels; for a float16 GPU graph convert the fp32 file, "
                       "e.g. with onnxconverter-common's float16 converter)")
    if opset < 16:
        raise CLIError("--opset must be >= 16 (GridSample, used by deformable attention, needs opset 16)")
    for module in ("onnx", "onnxscript") + (() if args.no_verify else ("onnxruntime",)):
        try:
            __import__(module)
        except ImportError:
            raise CLIError(f"export needs the optional package {module!r}: pip install onnx onnxscript onnxruntime "
                           "(or pip install 'focus-detr[onnx]')", code=1) from None
    model, description = model_from_args(args, weights)
    example = tuple(args.example_size) if args.example_size else default_example_size(model.cfg)
    verify_sizes = None
    if not args.no_verify:
        if args.verify_sizes:
            if len(args.verify_sizes) % 2:
                raise CLIError("--verify-sizes takes H W pairs")
            verify_sizes = [tuple(args.verify_sizes[i:i + 2]) for i in range(0, len(args.verify_sizes), 2)]
        else:
            h, w = example
            # Two other sizes (one landscape, one portrait) so a frozen size or token budget would show.
            verify_sizes = [(max(MIN_SIZE, h - 64), w + 32), (w, max(MIN_SIZE, h - 32))]
    if not args.quiet:
        print(f"model: {description}; exporting with example size {example[0]}x{example[1]} "
              f"(opset {opset}; this takes a minute)", file=sys.stderr)
    try:
        report = export_onnx(model, out, opset=opset, example_size=example, verify_sizes=verify_sizes)
    except OnnxExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {report.path} ({report.size_bytes / 2**20:.1f} MiB, opset {report.opset}, dynamic height/width) "
          f"in {report.seconds:.0f} s")
    failed = False
    for check in report.checks:
        h, w = check["size"]
        ok = check["logits"] <= args.tolerance and check["detections_agree"]
        failed |= not ok
        print(f"onnxruntime vs PyTorch on a {h}x{w} image: max |diff| logits {check['logits']:.2e}, "
              f"boxes {check['boxes']:.2e}, scores {check['scores']:.2e}; detections agree: "
              f"{'yes' if check['detections_agree'] else 'NO'} -> {'ok' if ok else 'MISMATCH'}")
    if failed:
        print(f"error: onnxruntime results differ from PyTorch beyond {args.tolerance:g}", file=sys.stderr)
        return 1
    return 0
