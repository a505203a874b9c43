"""The demo (``focus-detr demo``): the whole pipeline on the CPU in minutes.

:func:`run_demo` generates the built-in synthetic "shapes" dataset (if absent), trains the ``tiny`` preset on
it with :data:`RECIPE`, evaluates on the held-out split with pycocotools and writes::

    RUN_DIR/metrics.json          AP, AP50, AP75, APs, APm, APl (fractions), per-class AP, times, recipe
    RUN_DIR/loss_curve.png        training loss
    RUN_DIR/predictions/*.png     held-out images with the detections drawn
    RUN_DIR/model_final.pth       the evaluated weights (`focus-detr eval`, `predict`, `explain` take it)
    RUN_DIR/demo_plan.json        the run length chosen for the time budget (a re-run keeps it)
    RUN_DIR/...                   the training run itself (config.json, metrics.jsonl, checkpoints/, eval/)

Re-running with the same run folder continues an interrupted run from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .train import TrainConfig, TrainResult, train


@dataclass(frozen=True)
class DemoRecipe:
    """The demo's recipe, sized for a CPU-only machine and the demo's time budget (docs/training.md has the
    measured runs).

    The tiny preset is trained from scratch (no ImageNet backbone), so the backbone gets the full lr rather
    than the official x0.1. Images are used at their native size (192 x 256) for training and testing.

    The model adds distinct query selection (``decoder.query_nms_iou=0.5``, off in the official model): a
    short run otherwise ends with several near-identical queries per object, which one-to-one matching
    suppresses only late in training. Measured at 5200 iterations on the same data: AP 0.391 / AP50 0.514
    without, 0.531 / 0.706 with IoU 0.7, 0.566 / 0.769 with IoU 0.5.

    The evaluated weights are the raw ones: an exponential moving average of the weights (decay 0.999) was
    tried on this recipe and did not help, so the demo has no EMA.
    """

    train_images: int = 1000
    val_images: int = 100
    image_size: tuple[int, int] = (192, 256)
    iterations: int = 3000  # with a time budget: the minimum; more when the machine is fast enough
    max_iterations: int = 12000  # with a time budget: the maximum
    calibration_iterations: int = 100  # iterations timed to choose the length
    batch_size: int = 4
    lr: float = 2e-4
    backbone_lr: float = 2e-4
    lr_drop: float = 0.85  # lr x0.1 at this fraction of the iterations
    train_scales: tuple[int, ...] = (192,)
    test_short_side: int = 192
    test_max_size: int = 1000
    model_overrides: dict[str, Any] = field(default_factory=lambda: {"decoder.query_nms_iou": 0.5})
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 25

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    def train_config(self, data_dir: Path, run_dir: Path, iterations: int, stop_at: int | None = None,
                     device: str = "cpu", num_workers: int = 0, progress: bool = True) -> TrainConfig:
        """The :class:`TrainConfig` of a demo run of ``iterations`` (stopped at ``stop_at``), resuming the
        newest checkpoint in ``run_dir``."""
        overrides = {"test_short_side": self.test_short_side, "test_max_size": self.test_max_size,
                     **self.model_overrides}
        return TrainConfig(
            data_dir=str(data_dir), out_dir=str(run_dir), preset="tiny", model_overrides=overrides, val_split=None,
            schedule=None, max_iters=iterations, lr_steps=(int(iterations * self.lr_drop),),
            batch_size=self.batch_size, num_workers=num_workers, lr=self.lr, backbone_lr=self.backbone_lr,
            train_scales=self.train_scales, train_max_size=self.test_max_size, seed=self.seed, device=device,
            checkpoint_every=self.checkpoint_every, keep_checkpoints=self.keep_checkpoints,
            log_every=self.log_every, resume="auto", stop_at=stop_at, progress=progress, tensorboard=False,
        )


RECIPE = DemoRecipe()
# What the demo must reach on the held-out split (reported in metrics.json as "targets_met").
AP_TARGET, AP50_TARGET = 0.30, 0.60

# The run-length planner's allowances: the evaluation, pictures and start-up after training take about
# PLAN_RESERVE_S + PLAN_RESERVE_PER_VAL_IMAGE_S per held-out image; PLAN_MARGIN of the remaining time is used
# (the rest absorbs slower phases); lengths are multiples of PLAN_ROUNDING iterations.
PLAN_RESERVE_S = 45.0
PLAN_RESERVE_PER_VAL_IMAGE_S = 0.3
PLAN_MARGIN = 0.9
PLAN_ROUNDING = 100
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def plan_iterations(recipe: DemoRecipe, seconds_per_iteration: float, elapsed_s: float,
                    budget_min: float) -> tuple[int, float]:
    """The run length that fits the budget, and the minutes the whole demo is then expected to take.

    ``elapsed_s`` is the time spent so far (data and the timed calibration iterations). The evaluation,
    pictures and start-up get a fixed reserve; 10 % of the rest is kept as a margin for slower phases.
    The length is rounded down to 100 and clipped to ``[recipe.iterations, recipe.max_iterations]``, so on a
    slow machine the expected time can exceed the budget (the caller warns).
    """
    reserve = PLAN_RESERVE_S + PLAN_RESERVE_PER_VAL_IMAGE_S * recipe.val_images
    remaining = budget_min * 60.0 - elapsed_s - reserve
    fit = recipe.calibration_iterations + int(PLAN_MARGIN * remaining / seconds_per_iteration)
    iterations = int(min(recipe.max_iterations, max(recipe.iterations, fit // PLAN_ROUNDING * PLAN_ROUNDING)))
    expected_s = elapsed_s + reserve + (iterations - recipe.calibration_iterations) * seconds_per_iteration
    return iterations, expected_s / 60.0


def planned_iterations(run_dir: Path) -> int | None:
    """The length chosen by an earlier, interrupted demo in ``run_dir`` (so a re-run resumes the same run)."""
    try:
        return int(json.loads((run_dir / "demo_plan.json").read_text())["iterations"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def seconds_per_iteration(metrics_path: Path) -> float:
    """Steady-state seconds per iteration from the last two training rows of ``metrics.jsonl``."""
    from .logging import read_metrics

    rows = [row for row in read_metrics(metrics_path) if row.get("type") == "train"]
    if len(rows) < 2:
        raise RuntimeError("the timing run logged too few rows")
    a, b = rows[-2], rows[-1]
    return max(1e-3, (b["time"] - a["time"]) / max(1, b["iter"] - a["iter"]))


@dataclass
class DemoOutcome:
    report: dict[str, Any]  # the content of RUN_DIR/metrics.json
    metrics: dict[str, Any]  # the held-out evaluation (engine.evaluate's dict)
    pictures: list[Path]
    train_result: TrainResult


def run_demo(run_dir: str | Path, data_dir: str | Path | None = None, recipe: DemoRecipe = RECIPE,
             iterations: int | None = None, time_budget_min: float = 17.0, device: str = "cpu", num_workers: int = 0,
             pictures: int = 6, progress: bool = True, log: Callable[[str], None] = print) -> DemoOutcome:
    """Data, training, held-out evaluation and report (see the module docstring); progress lines go to ``log``.

    ``iterations`` fixes the run length; without it the first ``recipe.calibration_iterations`` are timed and
    the length is chosen to fit ``time_budget_min`` for the whole demo (:func:`plan_iterations`; a run folder
    that already has a plan keeps it)."""
    from ..data import ensure_shapes_dataset
    from .data import build_eval_dataset
    from .distributed import DistInfo, process_device
    from .evaluate import evaluate, format_metrics
    from .logging import read_metrics, write_json
    from .. import api

    start = time.perf_counter()
    r = recipe
    run_dir = Path(run_dir)
    data_dir = Path(data_dir) if data_dir is not None else run_dir / "data"

    # 1. data -----------------------------------------------------------------------------------------
    info = ensure_shapes_dataset(data_dir, r.train_images, r.val_images, seed=r.seed, image_size=r.image_size)
    log(f"[1/4] dataset: {info.num_train} train / {info.num_val} val images in {data_dir}"
        + (f" (generated in {info.seconds:.1f} s)" if info.generated else " (already present)"))

    # 2. training -------------------------------------------------------------------------------------
    def config(length: int, stop_at: int | None = None) -> TrainConfig:
        return r.train_config(data_dir, run_dir, length, stop_at, device, num_workers, progress)

    train_start = time.perf_counter()
    iterations = iterations or planned_iterations(run_dir)
    if iterations is None:
        # Time the first iterations, then fit the run into the budget. The lr is constant until the drop at
        # 85 %, so a run stopped here and resumed with its final length is the same as a run of that length.
        log(f"[2/4] timing {r.calibration_iterations} iterations to fit the run into {time_budget_min:g} min")
        train(config(r.max_iterations, stop_at=r.calibration_iterations))
        per_iter = seconds_per_iteration(run_dir / "metrics.jsonl")
        iterations, expected_min = plan_iterations(r, per_iter, time.perf_counter() - start, time_budget_min)
        log(f"      {per_iter:.3f} s per iteration -> {iterations} iterations")
        if expected_min > time_budget_min:
            # Fewer iterations would not show real learning; say so instead of silently overrunning.
            warnings.warn(f"this machine is slower than the demo expects ({per_iter:.3f} s per iteration): even the "
                          f"minimum of {r.iterations} iterations takes about {expected_min:.0f} min, over the "
                          f"{time_budget_min:g} min budget (is another process using the cores? see --threads)",
                          stacklevel=1)
        write_json(run_dir / "demo_plan.json", {"iterations": iterations, "seconds_per_iteration": per_iter,
                                                "time_budget_min": time_budget_min})
    log(f"[2/4] training the tiny preset for {iterations} iterations of {r.batch_size} images "
        f"(progress in {run_dir / 'metrics.jsonl'})")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the schedule differs from the checkpoint")
        result = train(config(iterations))
    train_seconds = time.perf_counter() - train_start
    r = dataclasses.replace(r, iterations=iterations)

    # 3. evaluation on the held-out split -----------------------------------------------------------------
    torch_device = process_device(device, DistInfo())
    weights = run_dir / "model_final.pth"
    model = api.load(weights, device=torch_device)
    val_set = build_eval_dataset(data_dir, "val", model.cfg.test_short_side, model.cfg.test_max_size,
                                 model.cfg.class_names)
    log(f"[3/4] evaluating on {len(val_set)} held-out images")
    metrics = evaluate(model, val_set, torch_device, run_dir / "eval" / "final", batch_size=4, progress=progress)
    assert metrics is not None  # one process: the main one, which gets the metrics
    log(f"      {format_metrics(metrics)}")

    # 4. report: metrics.json, loss curve, pictures ----------------------------------------------------------
    history = [row for row in read_metrics(run_dir / "metrics.jsonl") if row.get("type") == "train"]
    drawn = draw_predictions(model, val_set, run_dir / "predictions", pictures)
    if history:
        from ..viz.plots import plot_loss_curve

        plot_loss_curve(history, run_dir / "loss_curve.png", title="focus-detr demo: tiny preset on shapes")
    report = {
        **{k: metrics[k] for k in METRIC_KEYS},
        "per_class": metrics["per_class"],
        "num_val_images": metrics["num_images"],
        "targets": {"AP": AP_TARGET, "AP50": AP50_TARGET},
        "targets_met": bool((metrics["AP"] or 0) >= AP_TARGET and (metrics["AP50"] or 0) >= AP50_TARGET),
        "iterations": result.iteration,
        "skipped_steps": result.skipped_steps,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
        "device": str(torch_device),
        "weights": str(weights),
        "recipe": r.as_dict(),
    }
    write_json(run_dir / "metrics.json", report)
    return DemoOutcome(report, metrics, drawn, result)


def draw_predictions(model: Any, dataset: Any, out_dir: Path, count: int, score_threshold: float = 0.3) -> list[Path]:
    """Draw the detections of the first ``count`` images of ``dataset`` (original resolution, enlarged 2x)."""
    from PIL import Image

    from ..data import load_image
    from ..viz.draw import draw_detections

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for idx in range(min(count, len(dataset))):
        meta = dataset.get_image_info(idx)
        det = model.predict(str(meta["path"]))
        # The images are small (256 px wide): draw on a 2x enlargement so the tags stay readable.
        image = Image.fromarray(load_image(meta["path"]))
        image = image.resize((image.width * 2, image.height * 2), Image.BILINEAR)
        picture = draw_detections(image, det.boxes * 2, det.scores, det.labels, model.cfg.class_names,
                                  score_threshold=score_threshold)
        path = out_dir / f"{Path(meta['file_name']).stem}.png"
        picture.save(path)
        written.append(path)
    return written
