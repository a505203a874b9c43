"""``run_benchmark``: parameters, GFLOPs and latency by stage of the focus / dense / sparse encoder modes on the
same weights and inputs, peak memory per mode, and the optional transformers Deformable DETR anchor."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..allocator import allocator_state
from ..config import FocusDETRConfig, make_config
from ..devices import resolve_device
from ..ops.ms_deform_attn import current_implementation
from .anchor import ANCHOR_NAME, anchor_inputs, anchor_modules, anchor_unavailable_reason, build_anchor, describe_anchor
from .flops import SAMPLING_MACS_PER_POINT_CHANNEL, count_flops, count_stage_flops
from .memory import measure_peak_memory
from .models import MODES, backbone_module, build_mode_models, encoder_tokens, is_resnet50, make_batch, parameter_counts
from .peak import DTYPES, cpu_matrix_units, efficiency, find_peak, measure_peaks
from ..model.stages import STAGES
from .timing import interleaved, summarize, timed_modules, timed_stages

SCHEMA = "focus-detr-benchmark/1"
# STAGES: in forward order, the detector's profiler ranges (focus_detr.model.stages); "total" is the whole forward.
STAGE_NOTES = {
    "backbone": "backbone + neck (ChannelMapper)",
    "preparation": "masks, position embeddings, flattening, reference points",
    "token_selection": "foreground token selector + top-k plans (nothing in dense mode)",
    "encoder": "6 encoder layers (focus: MCSP/OESM + deformable attention on the kept tokens)",
    "query_selection": "two-stage proposals: token projection, proposal heads, top-k queries",
    "decoder": "6 decoder layers + class/box heads",
    "total": "whole forward (batched, normalised input)",
}
RATIOS = (("focus", "dense"), ("sparse", "dense"))

# FlopCounterMode count of the official Focus-DETR R50 (detrex code, eval, no denoising) on one 800x1333
# image, from tests/fixtures/official_parity/manifest.json "flops" (2 FLOP per MAC; grid_sample not counted).
# "rest" = total - backbone - neck: the official "transformer" module (176.9) plus the heads and the
# multi-category score predictor that sit outside it (1.7); ours has no such module boundary.
OFFICIAL_R50_800x1333 = {
    "total": 363_488_110_464,
    "backbone": 174_666_598_400,
    "neck": 10_257_170_432,
    "rest": 363_488_110_464 - 174_666_598_400 - 10_257_170_432,
    "grid_sample_output_elements": 185_962_496,
}
OFFICIAL_R50_TRANSFORMER_MODULE = 176_879_656_832


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "platform": platform.platform(), "device": str(device),
        "msda_implementation": current_implementation(),
        # set by focus_detr (PASSIVE unless the user chose otherwise); what OpenMP threads do while they wait
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        # whether large freed blocks are kept for reuse (focus_detr.allocator; the command turns it on)
        "allocator": allocator_state().reason,
    }
    from ..ops import ms_deform_attn as msda

    resolve = getattr(msda, "implementation_for", None)  # "auto" -> what runs on this device
    if resolve is not None:
        info["msda_implementation_running"] = resolve(device)
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _official_check(flops, cfg: FocusDETRConfig, size: tuple[int, int], batch: int) -> dict[str, Any] | None:
    """Our focus-mode count vs the official model's (same counter, same input size)."""
    if not (is_resnet50(cfg) and tuple(size) == (800, 1333) and batch == 1):
        return None
    neck = flops.by_module.get("neck", 0)
    backbone = flops.by_module.get("backbone", 0)
    counter_total = sum(flops.counter.values())
    ours = {"total": counter_total, "backbone": backbone, "neck": neck,
            "rest": counter_total - backbone - neck,
            "grid_sample_output_elements": flops.sampling_elements}
    return {
        "note": ("FlopCounterMode only (deformable sampling excluded on both sides), GFLOP = 1e9 FLOP, 2 FLOP/MAC; "
                 "rest = total - backbone - neck (official: transformer module "
                 f"{OFFICIAL_R50_TRANSFORMER_MODULE / 1e9:.1f} + heads/MCSP outside it)"),
        "official_gflops": {k: v / 1e9 for k, v in OFFICIAL_R50_800x1333.items() if k != "grid_sample_output_elements"},
        "ours_gflops": {k: v / 1e9 for k, v in ours.items() if k != "grid_sample_output_elements"},
        "ours_over_official": {k: _ratio(ours[k], OFFICIAL_R50_800x1333[k]) for k in ours},
        "sampled_values": {"official": OFFICIAL_R50_800x1333["grid_sample_output_elements"],
                           "ours": flops.sampling_elements},
    }


def run_benchmark(
    preset: str | FocusDETRConfig = "r50_4scale",
    sizes: Sequence[tuple[int, int]] = ((800, 1333),),
    modes: Sequence[str] = MODES,
    repeats: int = 5,
    warmup: int = 1,
    batch: int = 1,
    threads: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    memory: bool = True,
    anchor: bool = True,
    backbone_once: bool = False,
    peak: bool = True,
    precision: str = "fp32",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark the encoder modes of ``preset`` on the same weights and inputs.

    For each size: parameters, GFLOPs by stage (FlopCounterMode + deformable sampling, see
    :mod:`focus_detr.bench.flops`), median latency by stage over ``repeats`` interleaved rounds (after
    ``warmup`` rounds), the ratios focus/dense and sparse/dense, peak memory per mode (fresh process each),
    and -- for ResNet-50 presets with transformers installed -- the Deformable DETR anchor timed in the same
    rounds. ``backbone_once`` wraps each model's backbone in :class:`~focus_detr.bench.models.BackboneOnce`
    (see there: a workaround measuring the detector as if it ran its backbone once per forward). Returns a
    JSON-serialisable dict (see ``benchmarks/README.md`` for its layout).

    ``peak``: also time the machine's matrix-multiply peak (:mod:`focus_detr.bench.peak`, fp32 and bf16 -- and
    ``precision``'s dtype -- with 1 and the benchmark's threads) and report every stage's achieved GFLOP/s as a
    fraction of the peak of the dtype the model runs in. ``precision`` other than ``fp32`` runs each model
    through ``focus_detr.model.optimize.optimize_for_inference`` (FLOPs are counted on that model too).
    """
    say = progress or (lambda _msg: None)
    if threads:
        torch.set_num_threads(threads)
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if batch < 1:
        raise ValueError("batch must be >= 1")
    modes = list(dict.fromkeys(modes))
    if not modes:
        raise ValueError("no encoder modes given")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown encoder mode {mode!r}; choose from {', '.join(MODES)}")
    dev = resolve_device(device)  # the one device rule ("auto", a missing GPU: DeviceError, a ValueError)
    cfg = make_config(preset)
    preset_name = preset if isinstance(preset, str) else "custom"

    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    say(f"building {', '.join(modes)} models ({preset_name}, seed {seed})")
    models, not_shared = build_mode_models(cfg, modes, seed, dev, backbone_once=backbone_once)
    if precision != "fp32":
        models = {m: optimized_for(model, precision) for m, model in models.items()}
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "meta": machine_info(dev),
        "preset": preset_name,
        "modes": modes,
        "stages": list(STAGES) + ["total"],
        "stage_notes": STAGE_NOTES,
        "settings": {"repeats": repeats, "warmup": warmup, "batch": batch, "seed": seed,
                     "interleaved": True, "statistic": "median", "backbone_once": backbone_once,
                     "precision": precision},
        "flop_convention": (f"GFLOP = 1e9 FLOP, 2 FLOP per multiply-add (FlopCounterMode); deformable sampling "
                            f"added as 2*{SAMPLING_MACS_PER_POINT_CHANNEL}*B*Q*heads*levels*points*head_dim"),
        "weights": {"seed": seed, "source": "focus-mode model (random init); other modes load its state dict",
                    "not_shared": not_shared},
        "params": {m: parameter_counts(models[m]) for m in modes},
        "results": [],
    }

    want_anchor = anchor
    anchor_model = None
    if want_anchor:
        reason = anchor_unavailable_reason()
        if reason is None and not is_resnet50(cfg):
            reason = f"the anchor is a ResNet-50 detector; preset {preset_name!r} is not ResNet-50"
        if reason is None:
            say("building the transformers Deformable DETR anchor (random init, no download)")
            anchor_model = build_anchor(cfg.num_classes, seed).to(dev)
            report["anchor"] = describe_anchor(anchor_model)
        else:
            say(f"anchor skipped: {reason}")
            report["anchor"] = {"skipped": reason}
    else:
        report["anchor"] = {"skipped": "disabled (--no-anchor)"}

    for size in sizes:
        size = (int(size[0]), int(size[1]))
        batch_ = make_batch(models[modes[0]], size, batch, seed).to(dev)
        entry: dict[str, Any] = {"size": list(size), "batch": batch, "modes": {}, "tokens": {}, "flop_details": {}}

        # ---- FLOPs (one counted forward per mode) --------------------------------------------------------
        flops = {}
        for mode in modes:
            say(f"{size[0]}x{size[1]}: counting FLOPs of {mode}")
            model = models[mode]
            calls = []
            handle = backbone_module(model).register_forward_hook(lambda *_: calls.append(1))
            try:
                with torch.no_grad():
                    count, outputs = count_stage_flops(model, lambda model=model: model(batch_))
            finally:
                handle.remove()
            flops[mode] = count
            entry.setdefault("backbone_calls_per_forward", {})[mode] = len(calls)
            entry["tokens"][mode] = encoder_tokens(outputs, model.cfg.encoder.num_layers)
            entry["flop_details"][mode] = {
                "by_module_gflops": {k: v / 1e9 for k, v in count.by_module.items()},
                "by_op_gflops": {k: v / 1e9 for k, v in count.by_op.items()},
                "sampling_gflops": {k: v / 1e9 for k, v in count.sampling.items()},
                "sampled_values": count.sampling_elements,
            }
            del outputs

        # ---- latency (interleaved rounds) ------------------------------------------------------------------
        runners: dict[str, Callable[[], dict[str, float]]] = {}
        for mode in modes:
            model = models[mode]

            def run_mode(model=model) -> dict[str, float]:
                with torch.no_grad():
                    return timed_stages(model, lambda: model(batch_), dev)

            runners[mode] = run_mode
        if anchor_model is not None:
            inputs = anchor_inputs(batch_.tensor, batch_.padding_mask)
            modules = anchor_modules(anchor_model)

            def run_anchor() -> dict[str, float]:
                with torch.no_grad():
                    return timed_modules(anchor_model, lambda: anchor_model(**inputs), modules, dev)

            runners[ANCHOR_NAME] = run_anchor
        say(f"{size[0]}x{size[1]}: timing {', '.join(runners)} ({warmup} warm-up + {repeats} interleaved rounds)")
        samples = interleaved(runners, repeats, warmup, progress=say)

        for mode in modes:
            timing = summarize(samples[mode])
            stages: dict[str, dict[str, Any]] = {}
            for stage in list(STAGES) + ["total"]:
                t = timing.get(stage, {"median_ms": 0.0, "min_ms": 0.0, "max_ms": 0.0, "spread": 0.0, "ms_all": []})
                if stage == "total":
                    c, s = sum(flops[mode].counter.values()), sum(flops[mode].sampling.values())
                else:
                    c, s = flops[mode].counter.get(stage, 0), flops[mode].sampling.get(stage, 0)
                stages[stage] = {"ms": t["median_ms"], "min_ms": t["min_ms"], "max_ms": t["max_ms"],
                                 "spread": t["spread"], "ms_all": t["ms_all"],
                                 "gflops": (c + s) / 1e9, "gflops_counter": c / 1e9, "gflops_sampling": s / 1e9}
            entry["modes"][mode] = {"stages": stages}

        entry["ratios"] = compute_ratios(entry, modes)

        if anchor_model is not None:
            say(f"{size[0]}x{size[1]}: counting FLOPs of the anchor")
            with torch.no_grad():
                aflops = count_flops(anchor_model, lambda: anchor_model(**inputs))
            timing = summarize(samples[ANCHOR_NAME])
            anchor_entry: dict[str, Any] = {
                "stages_ms": {k: v["median_ms"] for k, v in timing.items()},
                "total": {"ms": timing["total"]["median_ms"], "min_ms": timing["total"]["min_ms"],
                          "max_ms": timing["total"]["max_ms"], "spread": timing["total"]["spread"],
                          "ms_all": timing["total"]["ms_all"], "gflops": aflops.total() / 1e9,
                          "gflops_sampling": sum(aflops.sampling.values()) / 1e9},
                "by_module_gflops": {k: v / 1e9 for k, v in aflops.by_module.items()},
            }
            entry["anchor"] = anchor_entry
            anchor_ratios(entry, modes)

        if "focus" in modes:
            check = _official_check(flops["focus"], cfg, size, batch)
            if check:
                entry["official_flop_check"] = check

        if memory:
            say(f"{size[0]}x{size[1]}: peak memory, one fresh process per mode")
            mem_modes = list(modes) + ([ANCHOR_NAME] if anchor_model is not None else [])
            if isinstance(preset, str):
                entry["memory"] = measure_peak_memory(preset_name, mem_modes, size, batch, seed, device,
                                                      torch.get_num_threads(), backbone_once=backbone_once)
            else:
                entry["memory"] = {"skipped": "peak memory needs a named preset (the child process rebuilds it)"}
        else:
            entry["memory"] = {"skipped": "disabled (--no-memory)"}
        report["results"].append(entry)

    if peak:
        threads_now = torch.get_num_threads()
        dtypes = list(dict.fromkeys(["fp32", "bf16", precision]))
        say(f"matrix-multiply peak ({', '.join(dtypes)}; {', '.join(map(str, sorted({1, threads_now})))} thread(s))")
        report["peaks"] = measure_peaks(dtypes, sorted({1, threads_now}), dev)
        report["meta"]["cpu_matrix_units"] = cpu_matrix_units()
        add_efficiency(report)
    report["targets"] = evaluate_targets(report)
    return report


def optimized_for(model: Any, precision: str) -> Any:
    """``focus_detr.model.optimize.optimize_for_inference(model, precision=...)``."""
    from ..model.optimize import optimize_for_inference

    return optimize_for_inference(model, precision=precision)


def add_efficiency(report: dict[str, Any]) -> None:
    """Add ``gflops_per_s`` and ``of_peak`` (achieved / matmul peak of the run's dtype and threads) to every
    stage of every mode (in place), and ``report["efficiency_peak"]`` naming the peak used."""
    precision = report["settings"].get("precision", "fp32")
    threads = report["meta"].get("torch_threads")
    used = find_peak(report.get("peaks", []), precision, threads)
    report["efficiency_peak"] = used
    for entry in report["results"]:
        for mode, data in entry["modes"].items():
            for stage, st in data["stages"].items():
                st.update(efficiency(st["gflops"], st["ms"], used["gflops"] if used else None))


def compute_ratios(entry: dict[str, Any], modes: Sequence[str]) -> dict[str, Any]:
    """``{"focus/dense": {stage: {ms, ms_paired, gflops}}, "sparse/dense": ...}`` for one size's results.

    ``ms`` is the ratio of the medians; ``ms_paired`` the median over rounds of the ratio of the two runs of
    the same round (adjacent in time, so under similar machine load: steadier on a busy machine); ``ms_min``
    the ratio of the fastest runs (the least disturbed by other processes). A stage
    that does no work in the reference mode (token selection in dense mode) gets no latency ratio.
    """
    ratios: dict[str, Any] = {}
    for a, b in RATIOS:
        if a not in modes or b not in modes:
            continue
        table = {}
        for stage in entry["modes"][a]["stages"]:
            sa, sb = entry["modes"][a]["stages"][stage], entry["modes"][b]["stages"][stage]
            absent = sb["gflops"] == 0 and sa["gflops"] > 0
            paired = [r for r in (_ratio(x, y) for x, y in zip(sa["ms_all"], sb["ms_all"])) if r is not None]
            table[stage] = {"ms": None if absent else _ratio(sa["ms"], sb["ms"]),
                            "ms_paired": None if absent or not paired else statistics.median(paired),
                            "ms_min": None if absent else _ratio(sa["min_ms"], sb["min_ms"]),
                            "gflops": _ratio(sa["gflops"], sb["gflops"])}
        ratios[f"{a}/{b}"] = table
    return ratios


def anchor_ratios(entry: dict[str, Any], modes: Sequence[str]) -> None:
    """Add ``<mode>/anchor_ms`` (ratio of medians) and ``<mode>/anchor_ms_paired`` to ``entry["anchor"]``."""
    anchor = entry["anchor"]
    for mode in modes:
        ours = entry["modes"][mode]["stages"]["total"]
        anchor[f"{mode}/anchor_ms"] = _ratio(ours["ms"], anchor["total"]["ms"])
        paired = [r for r in (_ratio(x, y) for x, y in zip(ours["ms_all"], anchor["total"]["ms_all"])) if r is not None]
        anchor[f"{mode}/anchor_ms_paired"] = statistics.median(paired) if paired else None
        anchor[f"{mode}/anchor_ms_min"] = _ratio(ours["min_ms"], anchor["total"]["min_ms"])


def refresh_derived(report: dict[str, Any]) -> dict[str, Any]:
    """Recompute ratios and targets of a saved report from its per-run values (in place; returns it)."""
    for entry in report["results"]:
        entry["ratios"] = compute_ratios(entry, report["modes"])
        if entry.get("anchor"):
            anchor_ratios(entry, report["modes"])
    if report.get("peaks"):
        add_efficiency(report)
    report["targets"] = evaluate_targets(report)
    return report


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets (R50, 800x1333, CPU) that this report can decide."""
    targets = []
    for entry in report["results"]:
        if entry["size"] != [800, 1333]:
            continue
        ratios = entry.get("ratios", {}).get("focus/dense")
        if ratios:
            for stage, name, limit in (("encoder", "encoder latency focus/dense", 0.45),
                                       ("total", "whole-model latency focus/dense", 0.65)):
                value, paired = ratios[stage]["ms"], ratios[stage].get("ms_paired")
                targets.append({"name": name, "value": value, "paired": paired, "min": ratios[stage].get("ms_min"),
                                "limit": limit,
                                "met": value is not None and value <= limit})
            targets.append({"name": "encoder GFLOPs focus/dense (information)", "value": ratios["encoder"]["gflops"],
                            "limit": None, "met": None})
            targets.append({"name": "whole-model GFLOPs focus/dense (paper: about 0.55)",
                            "value": ratios["total"]["gflops"], "limit": None, "met": None})
        focus_total = entry["modes"].get("focus", {}).get("stages", {}).get("total", {})
        if focus_total.get("of_peak") is not None:
            precision = report["settings"].get("precision", "fp32")
            threads = report["meta"].get("torch_threads")
            # the target is for one thread in fp32; other settings are reported for information
            decides = precision == "fp32" and threads == 1
            targets.append({"name": f"focus whole model, fraction of the {precision} matmul peak ({threads} "
                                    f"thread{'s' if threads != 1 else ''})",
                            "value": focus_total["of_peak"], "limit": 0.6 if decides else None,
                            "met": focus_total["of_peak"] >= 0.6 if decides else None})
        anchor = entry.get("anchor")
        if anchor and anchor.get("focus/anchor_ms") is not None:
            value = anchor["focus/anchor_ms"]
            targets.append({"name": "latency focus / transformers Deformable DETR", "value": value,
                            "paired": anchor.get("focus/anchor_ms_paired"), "min": anchor.get("focus/anchor_ms_min"),
                            "limit": 1.0, "met": value < 1.0})
    return targets
