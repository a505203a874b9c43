"""`focus-detr benchmark`: parameters, GFLOPs and latency by stage of the focus / dense / sparse encoder modes.

All modes share the same random weights and inputs; latency is the median over interleaved rounds, and the
table gives the ratios focus/dense and sparse/dense. Peak memory runs each mode in a fresh process; the
transformers Deformable DETR anchor runs in the same rounds when transformers is installed (R50 presets).
"""

from __future__ import annotations

import argparse
import json
import sys

from .options import (add_device_option, add_precision_option, add_quiet_option, add_threads_option, check_device,
                      choose_threads)

EXAMPLE = """\
examples:
  focus-detr benchmark                                   # R50 at 800x1333 and 480x640, 5 rounds
  focus-detr benchmark --size 800x1333 --repeats 9 --threads 2 --plot latency.png
  focus-detr benchmark --preset tiny --size 128x160 --repeats 1 --json
  focus-detr benchmark --modes focus,dense --no-memory --no-anchor --train-step
  focus-detr benchmark --size 800x1333 --modes focus,dense --no-memory --no-anchor --background-load 1
"""


def _thread_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated thread counts like 1,2, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated thread counts >= 1 like 1,2, got {text!r}")
    return values



def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "benchmark", help="GFLOPs, latency and memory of the encoder modes (focus / dense / sparse)",
        description=__doc__.strip(), epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="r50_4scale", help="model preset (default: r50_4scale)")
    p.add_argument("--size", default="800x1333,480x640",
                   help="input size(s) HxW, comma-separated (default: 800x1333,480x640)")
    p.add_argument("--batch", type=int, default=1, help="images per forward (default: 1)")
    p.add_argument("--repeats", type=int, default=5, help="measured interleaved rounds (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (default: 1)")
    p.add_argument("--modes", default="focus,dense,sparse", help="encoder modes, comma-separated")
    add_threads_option(p)
    add_device_option(p, default="cpu")
    p.add_argument("--seed", type=int, default=0, help="weight and input seed (default: 0)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-anchor", action="store_true", help="skip the transformers Deformable DETR anchor")
    p.add_argument("--train-step", action="store_true",
                   help="also time a training step of the tiny preset (focus / dense / sparse at 320x480, batch 2) "
                        "and its peak memory per mode, see bench_train_step.py")
    add_precision_option(p)
    p.add_argument("--no-peak", action="store_true",
                   help="skip the machine's matmul peak (and the efficiency columns: achieved GFLOP/s per stage "
                        "as a fraction of it)")
    p.add_argument("--background-load", type=int, default=0, metavar="N",
                   help="also measure focus / dense under contention: with each --contention-threads count, "
                        "quiet and while N busy processes started by the benchmark keep N cores busy (first size)")
    p.add_argument("--pin-load", action="store_true",
                   help="pin each --background-load process to one core (the last cores); default: not pinned")
    p.add_argument("--contention-threads", type=_thread_list, default=[1, 2], metavar="T1,T2",
                   help="thread counts of the contention measurement (default 1,2)")
    p.add_argument("--msda", metavar="IMPL", default=None,
                   help="deformable attention implementation to select first (see "
                        "focus_detr.ops.ms_deform_attn.available_implementations(); default: leave the current one)")
    p.add_argument("--backbone-once", action="store_true",
                   help="cache the backbone output per input (to compare with older focus-detr versions, which ran "
                        "the backbone once per output feature level; a no-op on this version)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (progress goes to stderr)")
    p.add_argument("--output", metavar="PATH", help="also write the JSON report to PATH")
    p.add_argument("--plot", metavar="PATH", help="write latency bars per stage (PNG; one per size)")
    add_quiet_option(p, what="no progress messages on stderr")
    return p


def run(args: argparse.Namespace) -> int:
    from .errors import CLIError

    from ..bench import benchmark_train_step, format_report, parse_size, plot_report, run_benchmark
    from ..bench.models import MODES
    from ..config import PRESETS

    if args.preset not in PRESETS:
        raise CLIError(f"unknown preset {args.preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
    try:
        sizes = [parse_size(s) for s in args.size.split(",") if s.strip()]
    except ValueError as e:
        raise CLIError(str(e)) from None
    if not sizes:
        raise CLIError("--size needs at least one HxW")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise CLIError(f"--modes takes a comma-separated subset of {','.join(MODES)}, got {args.modes!r}")
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1:
        raise CLIError("--repeats and --batch must be >= 1 and --warmup >= 0")
    if args.background_load < 0:
        raise CLIError(f"--background-load must be >= 0 processes, got {args.background_load}")
    if args.background_load and not {"focus", "dense"} <= set(modes):
        raise CLIError("--background-load compares focus with dense: --modes must include both")
    device = str(check_device(args))  # "auto" -> the device it means here
    threads = None if args.threads is None else choose_threads(args.threads)

    if args.msda:
        from ..ops import ms_deform_attn as msda

        choices = list(msda.available_implementations()) + (["auto"] if hasattr(msda, "implementation_for") else [])
        if args.msda not in choices:
            raise CLIError(f"--msda must be one of {', '.join(dict.fromkeys(choices))}, got {args.msda!r}")
        msda.select_implementation(args.msda)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"[benchmark] {msg}", file=sys.stderr, flush=True)

    if args.background_load and device != "cpu":
        raise CLIError("--background-load measures CPU contention: use --device cpu")
    try:
        report = run_benchmark(args.preset, sizes, modes, repeats=args.repeats, warmup=args.warmup, batch=args.batch,
                               threads=threads, device=device, seed=args.seed, memory=not args.no_memory,
                               anchor=not args.no_anchor, backbone_once=args.backbone_once, peak=not args.no_peak,
                               precision=args.precision, progress=progress)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.background_load:
        from ..bench.contention import run_contention

        report["contention"] = run_contention(
            args.preset, sizes[0], args.background_load, args.pin_load, args.contention_threads, ("focus", "dense"),
            repeats=args.repeats, warmup=args.warmup, seed=args.seed, progress=progress)
    if args.train_step:
        progress("training step of the tiny preset, focus / dense / sparse")
        report["train_step"] = benchmark_train_step("tiny", ("focus", "dense", "sparse"), threads=threads,
                                                    device=device, seed=args.seed, memory=not args.no_memory,
                                                    backbone_once=args.backbone_once, progress=progress)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
        progress(f"wrote {args.output}")
    if args.plot:
        try:
            for path in plot_report(report, args.plot):
                progress(f"wrote {path}")
        except ImportError as e:
            progress(f"plot skipped: {e}")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report), end="")
    return 0
