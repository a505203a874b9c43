"""Benchmarks of the encoder modes: parameters, GFLOPs and latency by stage, peak memory, training speed,
and an optional transformers Deformable DETR anchor. Used by ``focus-detr benchmark`` and ``benchmarks/``."""

from .core import (OFFICIAL_R50_800x1333, STAGES, compute_ratios, evaluate_targets, machine_info, refresh_derived,
                   run_benchmark)
from .flops import (EXTRA_FLOP_FORMULAS, FlopCount, SamplingCounter, count_flops, count_stage_flops,
                    deformable_sampling_flops, flop_counter)
from .models import MODES, build_mode_models, make_batch, parameter_counts, parse_size
from .report import format_report, format_train_step, plot_report
from .train_step import benchmark_train_step

__all__ = [
    "MODES", "STAGES", "OFFICIAL_R50_800x1333", "run_benchmark", "evaluate_targets", "machine_info", "compute_ratios",
    "refresh_derived",
    "deformable_sampling_flops", "count_stage_flops", "count_flops", "flop_counter", "SamplingCounter", "FlopCount",
    "EXTRA_FLOP_FORMULAS", "build_mode_models", "make_batch", "parameter_counts", "parse_size", "format_report",
    "format_train_step", "plot_report", "benchmark_train_step",
]
