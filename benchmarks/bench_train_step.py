#!/usr/bin/env python
"""Training cost: time (and with --memory peak memory) of one training step (forward +
SetCriterion/HungarianMatcher loss + backward + AdamW step), focus / dense / sparse, steps interleaved.

    python benchmarks/bench_train_step.py --threads 2 --steps 10 [--memory] [--backbone-once] [--json out.json]
    python benchmarks/bench_train_step.py --preset r50_4scale --size 320x480 --batch 1 --steps 2 --memory
"""

from __future__ import annotations

import argparse
import json
import os
import sys

try:
    import focus_detr  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from focus_detr.bench import benchmark_train_step, format_train_step, parse_size  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--modes", default="focus,dense,sparse")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", default="320x480", help="HxW of every image (default: 320x480)")
    p.add_argument("--steps", type=int, default=10, help="measured steps per mode (default: 10)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone-once", action="store_true", help="see `focus-detr benchmark --help`")
    p.add_argument("--memory", action="store_true",
                   help="also the peak memory of a step per mode (a fresh process each, after two steps)")
    p.add_argument("--json", metavar="PATH", help="write the result here")
    args = p.parse_args(argv)
    result = benchmark_train_step(args.preset, tuple(args.modes.split(",")), args.batch, parse_size(args.size),
                                  args.steps, args.warmup, args.seed, args.threads, args.device,
                                  backbone_once=args.backbone_once, memory=args.memory,
                                  progress=lambda m: print(f"[train] {m}", file=sys.stderr))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print("\n".join(format_train_step(result, markdown=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
