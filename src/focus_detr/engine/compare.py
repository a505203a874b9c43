"""Focus vs sparse vs dense encoders at matched cost: the paper's comparison, in miniature.

:func:`compare_modes` trains one preset in several encoder configurations on the same data, from the same
initial weights and in the same data order (per seed), evaluates each on the held-out split and writes::

    OUT/comparison.json        per run: mode, keep ratio, seed, encoder / whole-model GFLOPs, CPU latency,
                               AP, AP50, AP75, APs, APm, APl; per configuration: mean, std, min, max; the
                               matched-cost solution; the paired focus - sparse AP difference per seed
    OUT/comparison.md          the summary as a Markdown table
    OUT/ap_vs_encoder_gflops.png   AP against encoder GFLOPs, one point per run
    OUT/cost.json              GFLOPs of every configuration and the keep-ratio solver's trace
    OUT/latency.json           the latency pass (all configurations interleaved, after all training)
    OUT/init/seed_K.pth        the shared initial weights of seed K (a focus-mode model; the other modes load
                               every tensor they have, i.e. all but the foreground selector and OESM)
    OUT/runs/<config>_seed<K>/ each training run (engine.train's run folder) + result.json when finished

The configurations: ``dense`` (every token in every layer), ``focus`` at the paper's keep ratio, ``sparse``
at the keep ratio whose *encoder* GFLOPs equal focus's (within ``flops_tolerance``; solved with the FLOP
counter at the evaluation image size), and ``focus`` at other keep ratios (the speed knob).

Resumable: a run with a result.json made from the same settings is skipped; an interrupted run continues
from its newest checkpoint (``resume="auto"``); the latency pass is reused when its settings match.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SCHEMA = "focus-detr-compare-modes/1"
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
MODES = ("dense", "sparse", "focus")


@dataclass(frozen=True)
class CompareRecipe:
    """What ``compare-modes`` trains. The optimisation follows the demo recipe (from scratch, backbone at the
    full lr, one lr drop at 85 %, distinct query selection at IoU 0.5), at the dataset's native image size."""

    preset: str = "tiny"
    iterations: int = 1500
    batch_size: int = 4
    lr: float = 2e-4
    lr_drop: float = 0.85
    seeds: tuple[int, ...] = (0, 1, 2)
    focus_keep_ratio: float = 0.5  # the paper's default; sparse is matched to this configuration's cost
    speed_keep_ratios: tuple[float, ...] = (0.3, 0.7)  # focus at other keep ratios
    flops_tolerance: float = 0.05  # sparse's encoder GFLOPs within this relative distance of focus's
    model_overrides: dict[str, Any] = field(default_factory=lambda: {"decoder.query_nms_iou": 0.5})
    latency_repeats: int = 15  # 0: no latency pass

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    def training_dict(self) -> dict[str, Any]:
        """The settings a finished run's result depends on (a run is redone when they change)."""
        d = self.as_dict()
        for k in ("seeds", "latency_repeats", "speed_keep_ratios", "flops_tolerance"):
            d.pop(k)
        return d


@dataclass(frozen=True)
class EncoderSetting:
    """One encoder configuration of the comparison."""

    mode: str
    keep_ratio: float  # 1.0 for dense (every token)
    role: str  # "dense", "matched" (focus at the paper's ratio / sparse matched to it), "speed"

    @property
    def name(self) -> str:
        return "dense" if self.mode == "dense" else f"{self.mode}-{self.keep_ratio:g}"

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {"encoder.mode": self.mode}
        if self.mode != "dense":
            out["encoder.keep_ratio"] = self.keep_ratio
        return out


# --------------------------------------------------------------------------------------------------
# The keep-ratio solver


@dataclass
class KeepRatioSolution:
    keep_ratio: float
    cost: float
    target: float
    trace: list[tuple[float, float]]  # (keep ratio, cost) of every evaluation

    @property
    def relative_difference(self) -> float:
        return self.cost / self.target - 1.0


def solve_keep_ratio(cost: Callable[[float], float], target: float, tolerance: float = 0.05,
                     aim: float = 0.01, low: float = 0.01, high: float = 1.0, max_evaluations: int = 40,
                     decimals: int = 3) -> KeepRatioSolution:
    """The keep ratio ``r`` in ``[low, high]`` with ``cost(r)`` closest to ``target``.

    ``cost`` must be non-decreasing in ``r`` (an encoder's FLOPs are: more kept tokens, more work; with
    integer token counts it is a step function). Bisection on ``r`` stops once ``|cost / target - 1| <= aim``;
    the answer is rounded to ``decimals`` (a readable ratio) and the best evaluated point is returned. Raises
    ``ValueError`` when no point is within ``tolerance`` (the target is out of reach, e.g. more than the cost
    at ``high``).
    """
    if not (target > 0 and 0 < low < high <= 1.0):
        raise ValueError(f"need target > 0 and 0 < low < high <= 1, got target={target}, low={low}, high={high}")
    trace: list[tuple[float, float]] = []
    seen: dict[float, float] = {}

    def evaluate(r: float) -> float:
        r = round(r, decimals)
        if r not in seen:
            seen[r] = float(cost(r))
            trace.append((r, seen[r]))
        return seen[r]

    def best() -> tuple[float, float]:
        return min(seen.items(), key=lambda item: (abs(item[1] / target - 1.0), item[0]))

    c_low, c_high = evaluate(low), evaluate(high)
    if c_low <= target <= c_high:
        lo, hi = round(low, decimals), round(high, decimals)
        step = 0
        while len(trace) < max_evaluations:
            c_lo, c_hi = seen[lo], seen[hi]
            # Alternate an interpolation step (the cost is close to linear in the kept tokens: usually one or
            # two steps land) with a bisection step (guaranteed progress on step functions).
            if step % 2 == 0 and c_hi > c_lo:
                mid = round(lo + (target - c_lo) / (c_hi - c_lo) * (hi - lo), decimals)
            else:
                mid = round((lo + hi) / 2, decimals)
            step += 1
            if not lo < mid < hi or mid in seen:
                mid = round((lo + hi) / 2, decimals)
                if not lo < mid < hi or mid in seen:
                    break  # the bracket is down to the ratio's resolution
            c = evaluate(mid)
            if abs(c / target - 1.0) <= aim:
                break
            if c < target:
                lo = mid
            else:
                hi = mid
    r, c = best()
    if abs(c / target - 1.0) > tolerance:
        raise ValueError(f"no keep ratio in [{low}, {high}] gives a cost within {tolerance:.0%} of {target:.4g} "
                         f"(closest: {c:.4g} at {r})")
    return KeepRatioSolution(keep_ratio=r, cost=c, target=target, trace=trace)


# --------------------------------------------------------------------------------------------------
# Cost of a configuration (FLOPs at the evaluation size)


def encoder_flops(preset: str, overrides: dict[str, Any], size: tuple[int, int], num_classes: int,
                  seed: int = 0) -> dict[str, float]:
    """GFLOPs of one forward of a batch of 1 image of ``size`` (H, W), by stage: ``encoder``,
    ``token_selection`` and ``total``. The count depends on the configuration and the size only."""
    from ..bench.flops import count_stage_flops
    from ..bench.models import make_batch
    from ..model import build_model

    torch.manual_seed(seed)
    model = build_model(preset, num_classes=num_classes, **overrides).eval()
    batch = make_batch(model, size)
    with torch.no_grad():
        count, _ = count_stage_flops(model, lambda: model(batch))
    return {"encoder": count.total("encoder") / 1e9, "token_selection": count.total("token_selection") / 1e9,
            "total": count.total() / 1e9}


# --------------------------------------------------------------------------------------------------
# The dataset


@dataclass(frozen=True)
class DatasetSummary:
    data_dir: str
    num_classes: int
    class_names: tuple[str, ...]
    train_images: int
    val_images: int
    image_size: tuple[int, int]  # (H, W): the most common size of the held-out images
    sizes_seen: int  # distinct image sizes in the held-out split


def inspect_dataset(data_dir: str | Path) -> DatasetSummary:
    """Read the two annotation files of ``data_dir`` (COCO layout) with one-line errors for what is missing."""
    from .data import split_paths

    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such folder (make one with `focus-detr make-data crowded-shapes "
                                f"--out {root}`)")
    found = {}
    for split in ("train", "val"):
        _, ann = split_paths(root, split)
        if not ann.is_file():
            raise FileNotFoundError(f"{ann}: missing; compare-modes needs a train and a held-out val split")
        try:
            found[split] = json.loads(ann.read_text())
            images, categories = found[split]["images"], found[split]["categories"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{ann}: not a COCO annotation file ({type(e).__name__}: {e})") from None
        if not images:
            raise ValueError(f"{ann}: no images")
    categories = sorted(found["train"]["categories"], key=lambda c: c["id"])
    sizes = Counter((int(im["height"]), int(im["width"])) for im in found["val"]["images"])
    size = sizes.most_common(1)[0][0]
    return DatasetSummary(str(root), len(categories), tuple(c["name"] for c in categories),
                          len(found["train"]["images"]), len(found["val"]["images"]), size, len(sizes))


# --------------------------------------------------------------------------------------------------
# One run


@dataclass(frozen=True)
class RunSpec:
    setting: EncoderSetting
    seed: int
    run_dir: str
    init_weights: str
    data_dir: str
    recipe: CompareRecipe
    image_size: tuple[int, int]
    progress: bool

    @property
    def name(self) -> str:
        return f"{self.setting.name}_seed{self.seed}"

    def identity(self) -> dict[str, Any]:
        """What makes a finished result reusable."""
        return {"mode": self.setting.mode, "keep_ratio": self.setting.keep_ratio, "seed": self.seed,
                "recipe": self.recipe.training_dict(), "image_size": list(self.image_size)}


def model_overrides(recipe: CompareRecipe, setting: EncoderSetting, image_size: tuple[int, int]) -> dict[str, Any]:
    """Native-size evaluation: the short side and max size of the dataset's images, no resizing."""
    h, w = image_size
    return {"test_short_side": min(h, w), "test_max_size": max(h, w), **recipe.model_overrides,
            **setting.overrides()}


def read_result(spec: RunSpec) -> dict[str, Any] | None:
    path = Path(spec.run_dir) / "result.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and result.get("identity") == spec.identity() else None


def train_and_evaluate(spec: RunSpec) -> dict[str, Any] | None:
    """Train (or resume) one run and evaluate it on the held-out split; writes and returns result.json's
    content, or None if training stopped early (interrupted: run again to resume)."""
    from .. import api
    from .data import build_eval_dataset
    from .evaluate import evaluate
    from .logging import write_json
    from .train import TrainConfig, train

    torch.set_num_threads(1)
    r = spec.recipe
    h, w = spec.image_size
    run_dir = Path(spec.run_dir)
    start = time.perf_counter()
    # A folder left by a run with other settings must not be resumed as if it were this one.
    spec_path = run_dir / "run_spec.json"
    if run_dir.exists() and _read_json(spec_path) != spec.identity():
        warnings.warn(f"{run_dir}: made with other settings (or unknown ones); starting this run afresh",
                      stacklevel=1)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(spec_path, spec.identity())
    cfg = TrainConfig(
        data_dir=spec.data_dir, out_dir=str(run_dir), preset=r.preset,
        model_overrides=model_overrides(r, spec.setting, spec.image_size), val_split=None, schedule=None,
        max_iters=r.iterations, lr_steps=(int(r.iterations * r.lr_drop),), batch_size=r.batch_size, num_workers=0,
        lr=r.lr, backbone_lr=r.lr, train_scales=(min(h, w),), train_max_size=max(h, w), seed=spec.seed,
        device="cpu", checkpoint_every=max(100, r.iterations // 5), keep_checkpoints=1, log_every=25,
        resume="auto", init_weights=spec.init_weights, progress=spec.progress, tensorboard=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the schedule differs from the checkpoint")
        trained = train(cfg)
    if trained.iteration < r.iterations or trained.final_weights is None:
        return None
    model = api.load(trained.final_weights)
    val_set = build_eval_dataset(spec.data_dir, "val", model.cfg.test_short_side, model.cfg.test_max_size,
                                 model.cfg.class_names)
    metrics = evaluate(model, val_set, torch.device("cpu"), run_dir / "eval", batch_size=4)
    assert metrics is not None
    result = {
        "identity": spec.identity(), "name": spec.name, "config": spec.setting.name, "mode": spec.setting.mode,
        "keep_ratio": spec.setting.keep_ratio, "role": spec.setting.role, "seed": spec.seed,
        **{k: metrics[k] for k in METRIC_KEYS}, "iterations": trained.iteration,
        "skipped_steps": trained.skipped_steps, "seconds": round(time.perf_counter() - start, 1),
        "weights": str(trained.final_weights),
    }
    write_json(run_dir / "result.json", result)
    return result


def _run_in_worker(spec: RunSpec) -> tuple[str, dict[str, Any] | None]:
    try:
        return spec.name, train_and_evaluate(spec)
    except KeyboardInterrupt:
        return spec.name, None


# --------------------------------------------------------------------------------------------------
# The comparison


@dataclass
class CompareOutcome:
    out_dir: Path
    comparison: dict[str, Any] | None  # None when runs remain (interrupted)
    finished_runs: int
    total_runs: int


def _say(message: str) -> None:
    print(message, flush=True)


def compare_modes(data_dir: str | Path, out_dir: str | Path, recipe: CompareRecipe = CompareRecipe(), jobs: int = 1,
                  progress: bool = True, remeasure_latency: bool = False, command: str | None = None,
                  log: Callable[[str], None] = _say) -> CompareOutcome:
    """Run the comparison (see the module docstring); returns what was written."""
    from ..model import build_model
    from .. import api
    from .logging import write_json

    _check_recipe(recipe)
    data = inspect_dataset(data_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = data.image_size
    if data.sizes_seen > 1:
        warnings.warn(f"the held-out images have {data.sizes_seen} sizes: GFLOPs and latency are for the most "
                      f"common one, {size[0]}x{size[1]}", stacklevel=2)
    log(f"dataset {data.data_dir}: {data.train_images} train / {data.val_images} held-out images, "
        f"{data.num_classes} classes, evaluated at {size[0]}x{size[1]}")

    # 1. Cost of every configuration; sparse's keep ratio matched to focus's encoder GFLOPs ----------------
    settings, cost = _plan_settings(recipe, data, out, log)
    write_json(out / "cost.json", cost)

    # 2. Shared initial weights per seed -------------------------------------------------------------------
    init_paths: dict[int, Path] = {}
    for seed in recipe.seeds:
        path = out / "init" / f"seed_{seed}.pth"
        if not path.is_file():
            torch.manual_seed(seed)
            model = build_model(recipe.preset, num_classes=data.num_classes, class_names=data.class_names,
                                **model_overrides(recipe, EncoderSetting("focus", recipe.focus_keep_ratio,
                                                                         "matched"), size))
            api.save(model, path, extra={"purpose": "compare-modes shared initialisation", "seed": seed})
        init_paths[seed] = path

    # 3. Training runs -------------------------------------------------------------------------------
    # Order: the matched comparison (dense, sparse, focus) for every seed first, then the speed knob, so an
    # interrupted comparison has its main result complete first.
    ordered = [(seed, s) for seed in recipe.seeds for s in settings if s.role != "speed"]
    ordered += [(seed, s) for seed in recipe.seeds for s in settings if s.role == "speed"]
    specs = [RunSpec(s, seed, str(out / "runs" / f"{s.name}_seed{seed}"), str(init_paths[seed]), data.data_dir,
                     recipe, size, progress and jobs == 1)
             for seed, s in ordered]
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for spec in specs:
        done = read_result(spec)
        if done is not None:
            results[spec.name] = done
        else:
            todo.append(spec)
    log(f"{len(specs)} runs ({len(settings)} configurations x {len(recipe.seeds)} seeds, {recipe.iterations} "
        f"iterations each): {len(results)} finished earlier, {len(todo)} to train"
        + (f", {jobs} at a time" if todo and jobs > 1 else ""))
    interrupted = _train_all(todo, jobs, results, len(specs), log)
    if interrupted:
        log(f"stopped with {len(specs) - len(results)} of {len(specs)} runs unfinished; run the same command again "
            "to resume")
        return CompareOutcome(out, None, len(results), len(specs))

    # 4. Latency: one pass over every configuration, interleaved, after all training ----------------------
    latency = _latency_pass(recipe, settings, specs, results, data, out, remeasure_latency, log)

    # 5. comparison.json and the plot --------------------------------------------------------------------------
    comparison = build_comparison(recipe, data, settings, cost, specs, results, latency, command)
    write_json(out / "comparison.json", comparison)
    (out / "comparison.md").write_text(markdown_table(comparison) + "\n")
    plot_path = out / "ap_vs_encoder_gflops.png"
    plot_ap_vs_gflops(comparison, plot_path)
    log(format_table(comparison))
    log(f"wrote {out / 'comparison.json'} and {plot_path}")
    return CompareOutcome(out, comparison, len(results), len(specs))


def _check_recipe(r: CompareRecipe) -> None:
    if r.iterations < 1 or r.batch_size < 1 or r.lr <= 0:
        raise ValueError(f"iterations, batch size and lr must be positive, got {r.iterations}, {r.batch_size}, {r.lr}")
    if not r.seeds or len(set(r.seeds)) != len(r.seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {list(r.seeds)}")
    for k in (r.focus_keep_ratio, *r.speed_keep_ratios):
        if not 0.0 < k <= 1.0:
            raise ValueError(f"keep ratios must be in (0, 1], got {k}")
    if r.focus_keep_ratio in r.speed_keep_ratios:
        raise ValueError(f"the speed-knob keep ratios {list(r.speed_keep_ratios)} repeat the matched focus ratio "
                         f"{r.focus_keep_ratio}")
    if not 0.0 < r.flops_tolerance < 1.0:
        raise ValueError(f"flops_tolerance must be in (0, 1), got {r.flops_tolerance}")


def _plan_settings(recipe: CompareRecipe, data: DatasetSummary, out: Path,
                   log: Callable[[str], None]) -> tuple[list[EncoderSetting], dict[str, Any]]:
    size = data.image_size
    cached = _read_json(out / "cost.json")
    key = {"preset": recipe.preset, "image_size": list(size), "num_classes": data.num_classes,
           "focus_keep_ratio": recipe.focus_keep_ratio, "speed_keep_ratios": list(recipe.speed_keep_ratios),
           "flops_tolerance": recipe.flops_tolerance, "model_overrides": recipe.model_overrides}
    if cached is not None and cached.get("key") == key:
        settings = [EncoderSetting(**s) for s in cached["settings"]]
        log(f"cost: reusing {out / 'cost.json'} (sparse keep ratio {cached['matched']['sparse_keep_ratio']})")
        return settings, cached

    def flops(setting: EncoderSetting) -> dict[str, float]:
        return encoder_flops(recipe.preset, model_overrides(recipe, setting, size), size, data.num_classes)

    focus = EncoderSetting("focus", recipe.focus_keep_ratio, "matched")
    focus_flops = flops(focus)
    log(f"cost: focus at keep ratio {focus.keep_ratio:g}: encoder {focus_flops['encoder']:.4f} GFLOPs; solving "
        f"sparse's keep ratio for the same encoder GFLOPs (within {recipe.flops_tolerance:.0%})")
    solution = solve_keep_ratio(lambda r: flops(EncoderSetting("sparse", r, "matched"))["encoder"],
                                focus_flops["encoder"], tolerance=recipe.flops_tolerance)
    sparse = EncoderSetting("sparse", solution.keep_ratio, "matched")
    log(f"cost: sparse keep ratio {sparse.keep_ratio:g} -> encoder {solution.cost:.4f} GFLOPs "
        f"({solution.relative_difference:+.2%} vs focus, {len(solution.trace)} FLOP counts)")
    settings = [EncoderSetting("dense", 1.0, "dense"), sparse, focus]
    settings += [EncoderSetting("focus", k, "speed") for k in recipe.speed_keep_ratios]
    per_setting = {}
    for s in settings:
        per_setting[s.name] = focus_flops if s == focus else flops(s)
    cost = {
        "key": key,
        "settings": [dataclasses.asdict(s) for s in settings],
        "gflops": per_setting,
        "matched": {"focus_keep_ratio": focus.keep_ratio, "focus_encoder_gflops": focus_flops["encoder"],
                    "sparse_keep_ratio": sparse.keep_ratio, "sparse_encoder_gflops": solution.cost,
                    "relative_difference": solution.relative_difference, "tolerance": recipe.flops_tolerance,
                    "method": ("FLOP counter (bench.flops: FlopCounterMode + analytic deformable sampling, 2 FLOP "
                               "per multiply-add) on one image at the evaluation size; the encoder stage only "
                               "(the detector's stage markers); bracketed interpolation/bisection on sparse's keep "
                               "ratio, rounded to 3 decimals"),
                    "solver_trace": [list(t) for t in solution.trace]},
    }
    return settings, cost


class CompareError(RuntimeError):
    """Some training runs failed (the message names them and why; the others were kept)."""


def _train_all(todo: list[RunSpec], jobs: int, results: dict[str, dict[str, Any]], total: int,
               log: Callable[[str], None]) -> bool:
    """Train ``todo`` (``jobs`` processes at a time); returns True if interrupted. A run that fails does not
    stop the others; :class:`CompareError` names the failures at the end."""
    failures: list[str] = []

    def report(name: str, result: dict[str, Any] | None) -> bool:
        if result is None:
            log(f"  {name}: stopped before the end (interrupted)")
            return True
        results[name] = result
        log(f"  [{len(results)}/{total}] {name}: AP {result['AP']:.3f} AP50 {result['AP50']:.3f} "
            f"({result['seconds'] / 60:.1f} min)")
        return False

    def failed(spec: RunSpec, error: BaseException) -> None:
        text = f"{spec.name}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        failures.append(text)
        log(f"  FAILED {text} (run folder {spec.run_dir})")

    interrupted = False
    if jobs <= 1 or len(todo) <= 1:
        for spec in todo:
            log(f"  training {spec.name} ({spec.recipe.iterations} iterations) in {spec.run_dir}")
            try:
                result = train_and_evaluate(spec)
            except KeyboardInterrupt:
                result = None
            except Exception as e:  # noqa: BLE001 -- reported with the run's name, the others go on
                failed(spec, e)
                continue
            if report(spec.name, result):
                interrupted = True
                break
    else:
        import concurrent.futures as cf
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = {pool.submit(_run_in_worker, spec): spec for spec in todo}
            log("  started: " + ", ".join(s.name for s in todo[:jobs]) + (" ..." if len(todo) > jobs else ""))
            try:
                for future in cf.as_completed(futures):
                    try:
                        name, result = future.result()
                    except Exception as e:  # noqa: BLE001 -- a worker's error, or a worker that died
                        failed(futures[future], e)
                        continue
                    if report(name, result):
                        interrupted = True
            except KeyboardInterrupt:
                interrupted = True
                for f in futures:
                    f.cancel()
    if failures and not interrupted:
        raise CompareError(f"{len(failures)} of {len(todo)} runs failed (the others are kept; rerun to retry): "
                           + "; ".join(failures))
    return interrupted


def _latency_pass(recipe: CompareRecipe, settings: list[EncoderSetting], specs: list[RunSpec],
                  results: dict[str, dict[str, Any]], data: DatasetSummary, out: Path, remeasure: bool,
                  log: Callable[[str], None]) -> dict[str, Any] | None:
    """Median whole-model and encoder latency of each configuration (first seed's trained weights) on one
    held-out image at its native size, batch 1, one torch thread, all configurations interleaved."""
    if recipe.latency_repeats <= 0:
        return None
    from .. import api
    from ..bench.core import machine_info
    from ..bench.timing import interleaved, summarize, timed_stages
    from ..data import load_image

    path = out / "latency.json"
    key = {"settings": [s.name for s in settings], "repeats": recipe.latency_repeats,
           "image_size": list(data.image_size)}
    cached = _read_json(path)
    if cached is not None and cached.get("key") == key and not remeasure:
        log(f"latency: reusing {path} (measured {cached['machine']['date']}; --remeasure-latency to redo)")
        return cached
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first_seed = recipe.seeds[0]
        models = {}
        for s in settings:
            spec = next(sp for sp in specs if sp.setting == s and sp.seed == first_seed)
            models[s.name] = api.load(results[spec.name]["weights"]).eval()
        val_json = json.loads((Path(data.data_dir) / "annotations" / "instances_val.json").read_text())
        image_info = next(im for im in val_json["images"]
                          if (int(im["height"]), int(im["width"])) == tuple(data.image_size))
        image = torch.from_numpy(load_image(Path(data.data_dir) / "images" / "val" / image_info["file_name"])
                                 ).permute(2, 0, 1).contiguous()
        device = torch.device("cpu")

        def runner(model):
            batch = model.batch([image])
            def run() -> dict[str, float]:
                with torch.no_grad():
                    return timed_stages(model, lambda: model(batch), device)
            return run

        log(f"latency: {recipe.latency_repeats} interleaved rounds over {len(models)} configurations "
            f"(1 thread, batch 1, {data.image_size[0]}x{data.image_size[1]})")
        samples = interleaved({name: runner(m) for name, m in models.items()}, recipe.latency_repeats, warmup=2)
        summary = {name: summarize(v) for name, v in samples.items()}
        per_setting = {name: {"total_ms": s["total"]["median_ms"], "encoder_ms": s["encoder"]["median_ms"]
                              if "encoder" in s else None, "total_spread": s["total"]["spread"]}
                       for name, s in summary.items()}
        dense = per_setting.get("dense")
        for v in per_setting.values():
            v["total_vs_dense"] = v["total_ms"] / dense["total_ms"] if dense else None
            v["encoder_vs_dense"] = (v["encoder_ms"] / dense["encoder_ms"]
                                     if dense and v["encoder_ms"] and dense["encoder_ms"] else None)
        info = machine_info(device)
        info["torch_threads"] = 1
        latency = {"key": key, "machine": info, "per_setting": per_setting,
                   "note": "median of interleaved rounds, one process, one torch thread; the whole forward "
                           "(preprocessed batch in, detections out) and its encoder stage"}
        from .logging import write_json
        write_json(path, latency)
        return latency
    finally:
        torch.set_num_threads(threads)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _stats(values: Sequence[float | None]) -> dict[str, float | None]:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "min": min(v),
            "max": max(v), "n": len(v)}


def build_comparison(recipe: CompareRecipe, data: DatasetSummary, settings: list[EncoderSetting],
                     cost: dict[str, Any], specs: list[RunSpec], results: dict[str, dict[str, Any]],
                     latency: dict[str, Any] | None, command: str | None) -> dict[str, Any]:
    from ..bench.core import machine_info

    runs = []
    for spec in specs:
        r = results[spec.name]
        g = cost["gflops"][spec.setting.name]
        lat = (latency or {}).get("per_setting", {}).get(spec.setting.name, {})
        runs.append({
            "name": spec.name, "config": spec.setting.name, "mode": spec.setting.mode,
            "keep_ratio": spec.setting.keep_ratio, "role": spec.setting.role, "seed": spec.seed,
            "encoder_gflops": g["encoder"], "token_selection_gflops": g["token_selection"],
            "total_gflops": g["total"],
            "latency_ms": lat.get("total_ms"), "encoder_latency_ms": lat.get("encoder_ms"),
            "latency_vs_dense": lat.get("total_vs_dense"), "encoder_latency_vs_dense": lat.get("encoder_vs_dense"),
            **{k: r[k] for k in METRIC_KEYS}, "iterations": r["iterations"], "train_seconds": r["seconds"],
        })
    summary = {}
    for s in settings:
        mine = [run for run in runs if run["config"] == s.name]
        summary[s.name] = {"mode": s.mode, "keep_ratio": s.keep_ratio, "role": s.role,
                           "encoder_gflops": mine[0]["encoder_gflops"], "total_gflops": mine[0]["total_gflops"],
                           "latency_ms": mine[0]["latency_ms"], "latency_vs_dense": mine[0]["latency_vs_dense"],
                           "encoder_latency_ms": mine[0]["encoder_latency_ms"],
                           **{k: _stats([run[k] for run in mine]) for k in METRIC_KEYS}}
    focus_name = next(s.name for s in settings if s.mode == "focus" and s.role == "matched")
    sparse_name = next(s.name for s in settings if s.mode == "sparse")
    paired = {}
    for k in METRIC_KEYS:
        diffs = []
        for seed in recipe.seeds:
            f = next(run[k] for run in runs if run["config"] == focus_name and run["seed"] == seed)
            sp = next(run[k] for run in runs if run["config"] == sparse_name and run["seed"] == seed)
            diffs.append(None if f is None or sp is None else f - sp)
        paired[k] = {"per_seed": diffs, **_stats(diffs),
                     "focus_better_seeds": sum(1 for d in diffs if d is not None and d > 0)}
    return {
        "schema": SCHEMA,
        "command": command,
        "machine": machine_info(torch.device("cpu")),
        "latency_machine": (latency or {}).get("machine"),
        "dataset": {**dataclasses.asdict(data), "image_size": list(data.image_size),
                    "class_names": list(data.class_names)},
        "recipe": recipe.as_dict(),
        "matched_cost": {k: v for k, v in cost["matched"].items()},
        "runs": runs,
        "summary": summary,
        "focus_minus_sparse": {"focus": focus_name, "sparse": sparse_name, **paired},
        "notes": ("GFLOPs: 2 FLOP per multiply-add, one image at the evaluation size, eval mode. Latency: one pass "
                  "after all training, configurations interleaved, medians; ratios against dense come from the same "
                  "pass. AP: COCO mAP@[.5:.95] on the held-out split (pycocotools); None where a size class is "
                  "empty."),
    }


def format_table(comparison: dict[str, Any]) -> str:
    """A plain-text table of the summary (mean +- std over seeds)."""
    def pm(s: dict[str, Any]) -> str:
        return "n/a" if s["mean"] is None else f"{s['mean']:.3f}+-{s['std']:.3f}"

    lines = [f"{'config':<14}{'keep':>6}{'enc GFLOPs':>12}{'GFLOPs':>9}{'latency':>10}  "
             f"{'AP':>13}{'AP50':>13}{'APs':>13}{'APm':>13}{'APl':>13}"]
    for name, s in comparison["summary"].items():
        lat = "n/a" if s["latency_ms"] is None else f"{s['latency_ms']:.0f} ms"
        lines.append(f"{name:<14}{s['keep_ratio']:>6.3f}{s['encoder_gflops']:>12.3f}{s['total_gflops']:>9.2f}"
                     f"{lat:>10}  " + "".join(f"{pm(s[k]):>13}" for k in ("AP", "AP50", "APs", "APm", "APl")))
    d = comparison["focus_minus_sparse"]["AP"]
    if d["mean"] is not None:
        lines.append(f"focus - sparse AP at matched encoder cost: {d['mean']:+.3f} (std {d['std']:.3f} over "
                     f"{d['n']} seeds; focus better in {d['focus_better_seeds']} of {d['n']})")
    return "\n".join(lines)


def markdown_table(comparison: dict[str, Any]) -> str:
    """The summary as a Markdown table (mean +- std over seeds, [min, max] for AP) and the per-run AP."""
    def pm(st: dict[str, Any], digits: int = 3) -> str:
        return "n/a" if st["mean"] is None else f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}"

    seeds = comparison["recipe"]["seeds"]
    rows = ["| configuration | keep ratio | encoder GFLOPs | model GFLOPs | latency (vs dense) | encoder latency | "
            "AP | AP50 | APs | APm | APl | AP per seed (" + ", ".join(str(s) for s in seeds) + ") |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, s in comparison["summary"].items():
        lat = "n/a" if s["latency_ms"] is None else f"{s['latency_ms']:.0f} ms ({s['latency_vs_dense']:.2f})"
        enc = "n/a" if s["encoder_latency_ms"] is None else f"{s['encoder_latency_ms']:.1f} ms"
        per_seed = ", ".join("n/a" if r["AP"] is None else f"{r['AP']:.3f}"
                             for seed in seeds for r in comparison["runs"] if r["config"] == name and r["seed"] == seed)
        rows.append(f"| {name} | {s['keep_ratio']:g} | {s['encoder_gflops']:.3f} | {s['total_gflops']:.2f} | {lat} | "
                    f"{enc} | " + " | ".join(pm(s[k]) for k in ("AP", "AP50", "APs", "APm", "APl")) + f" | {per_seed} |")
    return "\n".join(rows)


def plot_ap_vs_gflops(comparison: dict[str, Any], path: str | Path) -> Path:
    """AP against encoder GFLOPs, one point per run, one colour per configuration (mean marked)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the plot needs matplotlib: pip install 'focus-detr[viz]'") from None
    colours = {"dense": "#444444", "sparse": "#d62728", "focus": "#1f77b4"}
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for name, s in comparison["summary"].items():
        runs = [r for r in comparison["runs"] if r["config"] == name and r["AP"] is not None]
        if not runs:
            continue
        xs = [r["encoder_gflops"] for r in runs]
        ys = [r["AP"] for r in runs]
        # sparse and focus sit at the same x (matched cost): different markers, sparse's hollow.
        marker = {"dense": "D", "sparse": "s"}.get(s["mode"], "o" if s["role"] != "speed" else "^")
        label = "dense" if s["mode"] == "dense" else f"{s['mode']}, keep {s['keep_ratio']:g}" + (
            " (matched cost)" if s["role"] == "matched" else "")
        colour = colours.get(s["mode"], "k")
        face = "none" if s["mode"] == "sparse" else colour
        ax.scatter(xs, ys, edgecolors=colour, facecolors=face, marker=marker, alpha=0.7, s=36, label=label)
        ax.scatter([xs[0]], [statistics.fmean(ys)], color=colours.get(s["mode"], "k"), marker="_", s=260,
                   linewidths=2)
    ax.set_xlabel("encoder GFLOPs (one image at the evaluation size)")
    ax.set_ylabel("held-out AP (COCO mAP@[.5:.95])")
    n = len(comparison["recipe"]["seeds"])
    ax.set_title(f"{comparison['recipe']['preset']} preset: AP vs encoder cost ({n} seed{'s' * (n > 1)}; bar = mean)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def command_line() -> str:
    return " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])
