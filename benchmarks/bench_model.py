#!/usr/bin/env python
"""Benchmark the focus / dense / sparse encoder modes (and the transformers anchor) of one preset.

Same as ``focus-detr benchmark`` (every option of that command is accepted, see ``--help`` of it) with the
JSON report and the latency plot written by default, plus ``--profile`` to print where the time goes.

    python benchmarks/bench_model.py --size 800x1333 --repeats 5 --threads 2 --backbone-once
    python benchmarks/bench_model.py --preset tiny --size 128x160 --repeats 1 --profile focus,dense
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

try:
    import focus_detr  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from focus_detr.cli.main import main as cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--out-dir", default=os.path.join(tempfile.gettempdir(), "focus-detr-bench"),
                        help="where the JSON report goes unless --output is given")
    parser.add_argument("--profile", metavar="MODES", default=None,
                        help="after the benchmark, profile one forward of these modes (comma-separated) at the "
                             "first size and print the top operators per stage")
    parser.add_argument("--name", default=None, help="file name stem of the outputs (default: preset + options)")
    ours, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print("\nAll other options are those of `focus-detr benchmark`:\n")
        return cli_main(["benchmark", "--help"])

    def value(flag: str, default: str) -> str:
        return rest[rest.index(flag) + 1] if flag in rest and rest.index(flag) + 1 < len(rest) else default

    preset = value("--preset", "r50_4scale")
    stem = ours.name or preset + ("_backbone_once" if "--backbone-once" in rest else "")
    os.makedirs(ours.out_dir, exist_ok=True)
    args = ["benchmark", *rest]
    if "--output" not in rest:
        args += ["--output", os.path.join(ours.out_dir, stem + ".json")]
    if "--plot" not in rest:
        args += ["--plot", os.path.join(ours.out_dir, f"latency_{stem}.png")]
    code = cli_main(args)
    if code or not ours.profile:
        return code

    import torch

    from focus_detr.bench import build_mode_models, make_batch, parse_size
    from focus_detr.bench.profile import format_profile, profile_by_stage

    threads = value("--threads", "")
    if threads:
        torch.set_num_threads(int(threads))
    size = parse_size(value("--size", "800x1333").split(",")[0])
    modes = tuple(m for m in ours.profile.split(",") if m)
    models, _ = build_mode_models(preset, modes, int(value("--seed", "0")), backbone_once="--backbone-once" in rest)
    for mode in modes:
        model = models[mode]
        batch = make_batch(model, size)
        with torch.no_grad():
            model(batch)  # warm-up
        print(f"\nprofile of {mode} at {size[0]}x{size[1]} (self CPU time of the top operators per stage):")
        print(format_profile(profile_by_stage(model, lambda model=model, batch=batch: model(batch))), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
