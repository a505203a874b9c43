#!/usr/bin/env python
"""The speed knob on a trained model: held-out AP and latency per keep ratio, a table and a plot.

    python benchmarks/bench_keep_ratio.py --weights /work/runs/demo/model_final.pth --data /work/runs/demo/data \
        --json keep_ratio.json --plot docs/images/keep_ratio_ap_vs_latency.png
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

from focus_detr.bench.knob_sweep import DEFAULT_KEEP_RATIOS, format_sweep, keep_ratio_sweep, plot_sweep  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="trained weights or checkpoint (focus or sparse mode)")
    p.add_argument("--data", required=True, help="dataset folder with the held-out split")
    p.add_argument("--split", default="val")
    p.add_argument("--keep-ratios", default=",".join(f"{r:g}" for r in DEFAULT_KEEP_RATIOS),
                   help="comma-separated ratios in (0, 1] (default %(default)s)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense-mode reference point")
    p.add_argument("--latency-images", type=int, default=8, help="held-out images timed per round (default 8)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved latency rounds (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N held-out images")
    p.add_argument("--json", metavar="PATH", help="write the result here")
    p.add_argument("--plot", metavar="PATH", help="write the AP-vs-latency picture here (PNG)")
    args = p.parse_args(argv)
    try:
        ratios = [float(r) for r in args.keep_ratios.split(",") if r.strip()]
        result = keep_ratio_sweep(args.weights, args.data, args.split, ratios, not args.no_dense, args.latency_images,
                                  args.repeats, args.threads, args.max_images,
                                  progress=lambda m: print(f"[keep-ratio] {m}", file=sys.stderr, flush=True))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        print(f"wrote {plot_sweep(result, args.plot)}", file=sys.stderr)
    print("\n".join(format_sweep(result, markdown=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
