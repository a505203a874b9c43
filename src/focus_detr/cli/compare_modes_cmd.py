"""`focus-detr compare-modes`: focus vs sparse vs dense encoders at matched cost (the paper's claim, in
miniature).

Trains one preset in dense mode, in focus mode at the paper's keep ratio, in sparse mode at the keep ratio
whose encoder GFLOPs equal focus's (within 5 %, solved with the FLOP counter at the evaluation image size),
and in focus mode at other keep ratios (the speed knob) -- per seed from the same initial weights and in the
same data order -- then evaluates each on the held-out split and writes OUT/comparison.json and
OUT/ap_vs_encoder_gflops.png. Re-running with the same --out skips finished runs and resumes an interrupted
one from its newest checkpoint.
"""

from __future__ import annotations

import argparse

from .options import add_quiet_option
from .train_cmd import parse_override

EPILOG = """\
Latency is measured in one pass after all training (every configuration interleaved, one thread, batch 1);
on a busy machine redo that pass later with --remeasure-latency (training is not repeated).

examples:
  focus-detr make-data crowded-shapes --out data/crowded --train 600 --val 100
  focus-detr compare-modes --data data/crowded --out runs/compare --iters 1500 --seeds 3 --jobs 2"""


def _ratios(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated keep ratios (e.g. 0.3,0.7), got {text!r}") from None
    if any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"keep ratios must be in (0, 1], got {text!r}")
    return values



def add_parser(sub) -> argparse.ArgumentParser:
    from ..engine.compare import CompareRecipe

    r = CompareRecipe()
    p = sub.add_parser("compare-modes", help="train dense / sparse / focus encoders at matched cost and compare AP",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="DIR", help="COCO-layout dataset with train and val splits")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (resumable)")
    p.add_argument("--iters", type=int, default=r.iterations, help=f"training iterations per run (default {r.iterations})")
    p.add_argument("--seeds", type=int, default=len(r.seeds), metavar="K",
                   help=f"seeds 0..K-1: initial weights and data order per seed (default {len(r.seeds)})")
    p.add_argument("--preset", default=r.preset, help=f"model preset (default {r.preset})")
    p.add_argument("--batch-size", type=int, default=r.batch_size, help=f"default {r.batch_size}")
    p.add_argument("--lr", type=float, default=r.lr, help=f"default {r.lr:g} (backbone too: trained from scratch)")
    p.add_argument("--focus-keep-ratio", type=float, default=r.focus_keep_ratio,
                   help=f"focus's keep ratio that sparse is matched to (default {r.focus_keep_ratio:g}, the paper's)")
    p.add_argument("--speed-keep-ratios", type=_ratios, default=r.speed_keep_ratios, metavar="R1,R2",
                   help="focus also at these keep ratios (default "
                        f"{','.join(f'{v:g}' for v in r.speed_keep_ratios)}; empty string: none)")
    p.add_argument("--set", dest="overrides", type=parse_override, action="append", default=[], metavar="KEY=VALUE",
                   help="model option for every run on top of the recipe's (decoder.query_nms_iou=0.5), repeatable")
    p.add_argument("--jobs", type=int, default=1,
                   help="training processes at a time, one torch thread each (default 1)")
    p.add_argument("--latency-repeats", type=int, default=r.latency_repeats,
                   help=f"interleaved rounds of the latency pass (default {r.latency_repeats}; 0: no latency)")
    p.add_argument("--remeasure-latency", action="store_true", help="redo the latency pass even if one is stored")
    # CPU only by design: the comparison's latency column is CPU latency, one torch thread per job.
    add_quiet_option(p, no_progress_alias=True)
    return p


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from ..engine.compare import CompareError, CompareRecipe, command_line, compare_modes
    from .errors import CLIError

    if args.iters < 1 or args.seeds < 1 or args.batch_size < 1 or args.jobs < 1 or args.latency_repeats < 0:
        raise CLIError("--iters, --seeds, --batch-size and --jobs must be >= 1 and --latency-repeats >= 0")
    if not 0.0 < args.focus_keep_ratio <= 1.0:
        raise CLIError(f"--focus-keep-ratio must be in (0, 1], got {args.focus_keep_ratio}")
    if args.focus_keep_ratio in args.speed_keep_ratios:
        raise CLIError(f"--speed-keep-ratios repeats --focus-keep-ratio {args.focus_keep_ratio:g}")
    for key, _ in args.overrides:
        if key in ("encoder.mode", "encoder_mode", "encoder.keep_ratio", "encoder_keep_ratio"):
            raise CLIError(f"--set {key}: compare-modes chooses the encoder mode and keep ratio itself")
    torch.set_num_threads(1)
    base = CompareRecipe()
    recipe = dataclasses.replace(
        base, preset=args.preset, iterations=args.iters, batch_size=args.batch_size, lr=args.lr,
        seeds=tuple(range(args.seeds)), focus_keep_ratio=args.focus_keep_ratio,
        speed_keep_ratios=tuple(args.speed_keep_ratios), latency_repeats=args.latency_repeats,
        model_overrides={**base.model_overrides, **dict(args.overrides)})
    try:
        outcome = compare_modes(args.data, args.out, recipe, jobs=args.jobs, progress=not args.quiet,
                                remeasure_latency=args.remeasure_latency, command=command_line())
    except CompareError as e:
        raise CLIError(str(e), code=1) from None
    if outcome.comparison is None:
        return 130
    return 0
