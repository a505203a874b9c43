"""`focus-detr demo`: the whole pipeline on the CPU in minutes.

Generates the built-in synthetic "shapes" dataset (if absent), trains the ``tiny`` preset on it, evaluates
on the held-out split with pycocotools and writes::

    RUN_DIR/metrics.json          AP, AP50, AP75, APs, APm, APl (fractions), per-class AP, times, recipe
    RUN_DIR/loss_curve.png        training loss
    RUN_DIR/predictions/*.png     held-out images with the detections drawn
    RUN_DIR/model_final.pth       the evaluated weights (`focus-detr eval`, `predict`, `explain` take it)
    RUN_DIR/...                   the training run itself (config.json, metrics.jsonl, checkpoints/, eval/)

Re-running with the same --out continues an interrupted run from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from ..engine.demo import AP50_TARGET, AP_TARGET, METRIC_KEYS, RECIPE
from .options import add_device_option, add_quiet_option, add_threads_option, check_device, choose_threads
from .train_cmd import parse_override


def add_parser(sub) -> argparse.ArgumentParser:
    r = RECIPE
    p = sub.add_parser("demo", help="generate the synthetic dataset, train the tiny model on the CPU, evaluate, plot",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  focus-detr demo --out runs/demo")
    p.add_argument("--out", default="runs/demo", metavar="RUN_DIR", help="run folder (default runs/demo)")
    p.add_argument("--data", metavar="DIR", help="dataset folder (default RUN_DIR/data; generated if absent)")
    p.add_argument("--iters", type=int, help="fixed number of training iterations (default: chosen from --time-budget)")
    p.add_argument("--time-budget", type=float, default=17.0, metavar="MINUTES",
                   help="wall-clock budget of the whole demo: the first iterations are timed and the run length is "
                        f"chosen to fit (between {r.iterations} and {r.max_iterations} iterations; default 17)")
    p.add_argument("--batch-size", type=int, default=r.batch_size, help=f"default {r.batch_size}")
    p.add_argument("--lr", type=float, default=r.lr, help=f"default {r.lr:g} (backbone too: trained from scratch)")
    p.add_argument("--train-images", type=int, default=r.train_images, help=f"default {r.train_images}")
    p.add_argument("--val-images", type=int, default=r.val_images, help=f"default {r.val_images}")
    p.add_argument("--seed", type=int, default=r.seed, help=f"default {r.seed}")
    p.add_argument("--set", dest="overrides", type=parse_override, action="append", default=[], metavar="KEY=VALUE",
                   help="change a model option on top of the recipe's (repeatable), e.g. "
                        "--set encoder.oesm_score=prob_product or --set decoder.query_nms_iou=None")
    add_device_option(p, default="cpu")
    add_threads_option(p, default=1, note=". One thread is the robust default: when another process starts "
                       "competing for the cores, spinning OpenMP threads slow training many times over, one thread "
                       "only proportionally (docs/training.md)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0: decoding is cheap here)")
    p.add_argument("--pictures", type=int, default=6, help="held-out images drawn with their detections (default 6)")
    add_quiet_option(p, no_progress_alias=True)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..engine.demo import run_demo
    from .errors import CLIError

    if (args.iters is not None and args.iters <= 0) or args.batch_size <= 0 or args.time_budget <= 0:
        raise CLIError("--iters, --batch-size and --time-budget must be positive")
    check_device(args)
    threads = choose_threads(args.threads)
    torch.set_num_threads(threads)
    recipe = dataclasses.replace(RECIPE, iterations=args.iters or RECIPE.iterations, batch_size=args.batch_size,
                                 lr=args.lr, backbone_lr=args.lr, train_images=args.train_images,
                                 val_images=args.val_images, seed=args.seed,
                                 model_overrides={**RECIPE.model_overrides, **dict(args.overrides)})
    print(f"      torch threads: {threads}")
    outcome = run_demo(args.out, args.data, recipe, iterations=args.iters, time_budget_min=args.time_budget,
                       device=args.device, num_workers=args.workers, pictures=args.pictures, progress=not args.quiet,
                       log=lambda line: print(line, flush=True))
    report, run_dir = outcome.report, outcome.train_result.run_dir
    print(f"[4/4] wrote {run_dir / 'metrics.json'}, {run_dir / 'loss_curve.png'} and {len(outcome.pictures)} "
          f"pictures in {run_dir / 'predictions'}")
    ap, ap50 = (f"{v:.3f}" if v is not None else "n/a" for v in (report["AP"], report["AP50"]))
    print(f"done in {report['total_seconds'] / 60:.1f} min: held-out AP {ap}, AP50 {ap50} "
          f"(targets {AP_TARGET} / {AP50_TARGET}: {'met' if report['targets_met'] else 'NOT met'})")
    print(json.dumps({k: report[k] for k in METRIC_KEYS}))
    return 0
