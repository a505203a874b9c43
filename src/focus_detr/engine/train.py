"""The training loop: ``train(TrainConfig(...))`` trains Focus-DETR on a COCO-format dataset.

It runs as one process (CPU or one GPU) or under ``torchrun --nproc_per_node N`` as DDP; everything that
writes files happens on rank 0 only. One iteration = one optimiser step on ``batch_size`` images per
process. Read :func:`train` top to bottom: set-up, resume, the loop (forward, loss, backward, clip, step,
EMA), then logging / evaluation / checkpointing at their intervals.

Run folder (``out_dir``; see engine/run_dir.py for its rules: refused when it holds another run unless
``resume`` / ``overwrite``, locked while a run writes to it, leftovers of killed writers removed at start)::

    .lock                  PID and host of the run writing to the folder (removed when it stops)
    log.txt                everything the run printed (stdout and stderr, without progress-bar redraws)
    config.json            the TrainConfig, the resolved schedule / data settings, the model config
    environment.json       package versions, git revision, command line (rewritten at each (re)start)
    metrics.jsonl          training / evaluation rows and events (see engine/logging.py)
    tensorboard/           when the `tensorboard` package is installed
    checkpoints/checkpoint_XXXXXXX.pth   training checkpoints (engine/checkpoint.py), newest kept
    eval/iter_XXXXXXX/     predictions.json, metrics.json, coco_summary.txt of each evaluation
    model_final.pth        final weights (focus_detr.api.save format: config + state dict)
    model_final_ema.pth    EMA weights (with --ema)
    model_last.pth         the weights when the run stopped, for whatever reason (end, stop_at, signal, patience)
    model_best.pth         the evaluated weights (EMA with --ema) with the best validation AP so far

Stopping: SIGTERM, SIGUSR1 and SIGINT (Ctrl-C), to the main process or to the whole process group (DataLoader
workers ignore them, engine/workers.py), finish the current step (or the evaluation in progress), write a
checkpoint and ``model_last.pth`` and return with ``stop_reason == "signal"``; every DDP rank stops at the
same iteration. A second signal exits the process at once (exit code 128 + signal number) without a new
checkpoint; under torchrun the agent's copy of the job's signal, which arrives right after it, does not count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .. import api
from ..config import config_to_dict, make_config
from ..data.layouts import find_split, require_split
from ..losses import HungarianMatcher, SetCriterion
from ..model import FocusDETR, build_model
from . import checkpoint as ckpt
from .data import build_eval_dataset, build_train_dataset, build_train_loader, default_train_scales
from .distributed import (DistInfo, DistributedError, all_gather_objects, any_true_each, barrier, broadcast_object,
                          cleanup_distributed, env_dist_info, init_distributed, mean_over_processes, process_device)
from .evaluate import evaluate, format_metrics
from .logging import MetricsLogger, TeeToLog, environment_info, write_json
from .run_dir import (RunDirError, RunLock, check_new_run, ensure_writable, find_os_error, remove_orphaned_temporaries,
                      storage_error_text)
from .optim import LRSchedule, build_optimizer, schedule_for, set_lr


class TrainingDivergedError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class RunStorageError(RuntimeError):
    """Writing to the run folder failed (full disk, read-only filesystem, quota, ...); the message names the
    last good checkpoint."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (the CLI flags of ``focus-detr train`` map onto these)."""

    data_dir: str | None  # any layout of focus_detr.data.layouts; None with train_json
    out_dir: str
    preset: str = "tiny"
    # Model config overrides passed to build_model (e.g. {"decoder.num_queries": 100}); num_classes and
    # class_names always come from the training set.
    model_overrides: dict[str, Any] = field(default_factory=dict)
    train_split: str = "train"
    val_split: str | None = "val"  # None: no evaluation
    # Explicit COCO jsons (any layout); the image folders default to the json's folder.
    train_json: str | None = None
    train_images: str | None = None
    val_json: str | None = None
    val_images: str | None = None
    allow_outside_images: bool = False  # accept file_name entries leaving the image folder
    # Length: a named schedule (12ep / 24ep / 36ep, scaled to this dataset) and/or max_iters.
    schedule: str | None = "12ep"
    max_iters: int | None = None
    lr_steps: tuple[int, ...] | None = None
    warmup_iters: int = 0
    batch_size: int = 2  # per process
    num_workers: int = 2
    lr: float = 1e-4
    backbone_lr: float = 1e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1  # <= 0 disables clipping (the norm is still computed and checked)
    train_scales: tuple[int, ...] | None = None  # None: official multi-scale list scaled to the model
    train_max_size: int | None = None  # None: the model's test_max_size
    flip: bool = True
    crop: bool = False  # detrex's random-crop branch (off in the official Focus-DETR recipe)
    group_by_aspect: bool = True  # batches of one orientation (landscape / portrait), as the official sampler
    seed: int = 0
    device: str = "auto"
    amp: bool = False  # CUDA only: bf16 autocast (fp16 + GradScaler where bf16 is unsupported)
    ema: bool = False
    ema_decay: float = 0.9998
    eval_every: int = 0  # 0: evaluate at the end only
    eval_batch_size: int = 1
    max_eval_images: int | None = None
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3  # <= 0 keeps all
    log_every: int = 20
    resume: str | None = None  # None, "auto" (newest complete checkpoint in out_dir) or a path
    overwrite: bool = False  # replace the run in out_dir (without it, a folder holding a run needs resume)
    patience: int = 0  # stop after this many evaluations without a better validation AP (0: never)
    max_bad_steps: int = 20  # consecutive non-finite steps tolerated before stopping
    dist_timeout_s: float = 1800.0
    stop_at: int | None = None  # checkpoint and stop at this iteration (pre-emption / tests)
    deterministic: bool = False
    skip_bad: bool = False  # skip unreadable training images with a counted warning instead of failing
    backbone_weights: str | None = None  # ImageNet backbone file (torchvision / detectron2 / Swin)
    # Fine-tuning: initial weights from a weights file, a training checkpoint or an official checkpoint (of
    # `preset`); tensors whose shape differs (the class heads of another label set) keep their fresh init.
    init_weights: str | None = None
    progress: bool = True
    tensorboard: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


@dataclass
class TrainResult:
    run_dir: Path
    iteration: int
    max_iters: int
    final_weights: Path | None
    final_ema_weights: Path | None
    last_checkpoint: Path | None
    eval_metrics: dict[str, Any] | None
    skipped_steps: int
    seconds: float
    stopped_early: bool  # stopped before max_iters (stop_at, a signal, patience)
    # The trained model (unwrapped from DDP, on its training device) and its EMA copy, for API callers.
    model: FocusDETR | None = field(default=None, repr=False)
    ema_model: FocusDETR | None = field(default=None, repr=False)
    # Why the run stopped: "done" (max_iters), "stop_at", "signal" or "patience".
    stop_reason: str = "done"
    stop_signal: int | None = None  # the signal number when stop_reason == "signal"
    last_weights: Path | None = None  # model_last.pth
    best_weights: Path | None = None  # model_best.pth (when there was an evaluation)
    best_ap: float | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _targets_to(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
            for t in targets]


def _resolve_resume(cfg: TrainConfig, run_dir: Path) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        return ckpt.find_latest_checkpoint(run_dir)
    return Path(cfg.resume)


def _config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _config_differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    norm = lambda v: list(map(norm, v)) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return [] if norm(a) == norm(b) else [f"{prefix[:-1]}: checkpoint {b!r} vs now {a!r}"]


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) a run; see the module docstring for what is written. Under ``torchrun`` every
    process calls this; all return a :class:`TrainResult` (``eval_metrics`` on rank 0 only)."""
    info = env_dist_info(cfg.dist_timeout_s)
    device = process_device(cfg.device, info)
    owns_group = info.is_distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized())
    init_distributed(info, device)
    try:
        return _train(cfg, info, device)
    except (DistributedError, TrainingDivergedError, RunDirError, RunStorageError):
        raise
    except Exception as e:
        # A collective inside DDP's backward or the criterion failed: say what it probably means.
        if info.is_distributed and _is_collective_failure(e):
            raise DistributedError(
                f"rank {info.rank}: a collective operation failed ({type(e).__name__}: {str(e).splitlines()[0][:300]}). "
                f"Another process of the job probably died or hangs; collectives time out after "
                f"{info.timeout_s:g} s (--dist-timeout).") from e
        raise
    finally:
        if owns_group:
            cleanup_distributed()


def _is_collective_failure(error: BaseException) -> bool:
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    text = str(error)
    return any(s in text for s in ("Gloo", "gloo", "NCCL", "Connection closed", "Connection reset", "timed out",
                                   "Timed out", "Socket Timeout"))


# errno values that mean "the run folder cannot take more data" (reported in one line, see run_dir.py);
# the second group only counts for files inside the run folder (a dataset file may fail to open too).
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG)
_RUN_FILE_ERRNOS = (errno.EIO, errno.EACCES, errno.EPERM)


def _is_storage_failure(error: OSError, run_dir: Path) -> bool:
    if error.errno in _STORAGE_ERRNOS:
        return True
    if error.errno not in _RUN_FILE_ERRNOS or not error.filename:
        return False
    try:
        return Path(os.fsdecode(error.filename)).resolve().is_relative_to(run_dir.resolve())
    except (TypeError, ValueError, OSError):
        return False


class _StopRequest:
    """What the signal handlers saw. The first SIGTERM / SIGUSR1 / SIGINT is recorded (the loop stops at the
    end of the current step); a second one exits the process at once. Under torchrun the agent forwards the
    job's signal to every rank right after the job's own copy arrived: that repeat does not count."""

    AGENT_REPEAT_S = 5.0

    def __init__(self, lock: RunLock | None = None) -> None:
        self.signals: list[int] = []
        self.first_at = 0.0
        self.pid = os.getpid()
        self.lock = lock
        self.last_checkpoint: Path | None = None
        self.under_agent = "TORCHELASTIC_RUN_ID" in os.environ

    def __bool__(self) -> bool:
        return bool(self.signals)

    @property
    def signal(self) -> int | None:
        return self.signals[0] if self.signals else None

    def on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:
            return  # a DataLoader worker forked before its worker_init_fn ran: the main process decides
        now = time.monotonic()
        if not self.signals:
            self.signals.append(signum)
            self.first_at = now
            return
        if self.under_agent and signum == self.signals[0] and now - self.first_at < self.AGENT_REPEAT_S:
            return
        where = (f"the last complete checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                 else "no checkpoint was written yet")
        try:
            sys.stderr.write(f"second signal ({_signal_name(signum)}): exiting at once without a new checkpoint; "
                             f"{where}\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - nothing may stop the exit
            pass
        if self.lock is not None:
            self.lock.release()
        os._exit(128 + signum)


def _signal_name(signum: int | None) -> str:
    try:
        return signal.Signals(signum).name if signum is not None else "?"
    except ValueError:
        return str(signum)


def _train(cfg: TrainConfig, info: DistInfo, device: torch.device) -> TrainResult:
    """Claim the run folder (rank 0), then train inside it with log.txt and the stop handlers in place."""
    run_dir = Path(cfg.out_dir)
    lock = RunLock(run_dir)
    problem, notes, cautions = None, [], []
    if info.is_main:
        try:
            ensure_writable(run_dir, "--out")
            with warnings.catch_warnings(record=True) as caught:  # said again below, inside log.txt
                warnings.simplefilter("always")
                lock.acquire()
            cautions = [str(w.message) for w in caught]
            replaced = check_new_run(run_dir, resume=cfg.resume is not None, overwrite=cfg.overwrite)
            if replaced:
                notes.append(f"--overwrite: removed the previous run's {', '.join(replaced)} from {run_dir}")
            orphans = remove_orphaned_temporaries(run_dir)
            if orphans:
                notes.append(f"removed {len(orphans)} unfinished temporary file(s) of an interrupted run: "
                             + ", ".join(p.name for p in orphans[:4]) + (" ..." if len(orphans) > 4 else ""))
        except RunDirError as e:
            problem = str(e)
    problem = broadcast_object(problem)  # every rank refuses together
    if problem is not None:
        lock.release()
        raise RunDirError(problem)
    stop = _StopRequest(lock)
    previous_handlers = _install_stop_handlers(stop.on_signal)
    try:
        with TeeToLog(run_dir / "log.txt") if info.is_main else contextlib.nullcontext():
            for caution in cautions:
                print(f"warning: {caution}", file=sys.stderr)
            for note in notes:
                print(note)
            try:
                return _run(cfg, info, device, run_dir, stop)
            except (DistributedError, TrainingDivergedError, RunDirError, RunStorageError):
                raise
            except Exception as e:
                os_error = find_os_error(e)
                if os_error is None or not _is_storage_failure(os_error, run_dir):
                    raise
                raise RunStorageError(storage_error_text(e, os_error.filename or run_dir,
                                                         stop.last_checkpoint)) from None
    finally:
        _restore_handlers(previous_handlers)
        lock.release()


def _run(cfg: TrainConfig, info: DistInfo, device: torch.device, run_dir: Path, stop: _StopRequest) -> TrainResult:
    start_time = time.perf_counter()
    seed_everything(cfg.seed)  # same initial weights on every process (DDP would broadcast rank 0's anyway)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    use_amp = cfg.amp and device.type == "cuda"
    if cfg.amp and not use_amp and info.is_main:
        warnings.warn("--amp is only used on CUDA; training in float32 on the CPU")
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16

    # ---- data and model ---------------------------------------------------------------------------
    if "num_classes" in cfg.model_overrides or "class_names" in cfg.model_overrides:
        raise ValueError("num_classes and class_names come from the training set's categories; do not override them")
    base_cfg = make_config(cfg.preset, **cfg.model_overrides)  # the preset's sizes, before the classes are known
    scales, max_size = default_train_scales(base_cfg.test_short_side, base_cfg.test_max_size)
    scales = tuple(cfg.train_scales) if cfg.train_scales else scales
    max_size = cfg.train_max_size or max_size
    train_source = require_split(cfg.data_dir, cfg.train_split, cfg.train_json, cfg.train_images)
    train_set = build_train_dataset(train_source, cfg.train_split, scales, max_size, cfg.flip, cfg.crop,
                                    cfg.skip_bad, cfg.allow_outside_images)
    model: FocusDETR = build_model(cfg.preset, num_classes=train_set.num_classes, class_names=train_set.class_names,
                                   **cfg.model_overrides)
    val_set = None
    if cfg.val_split is not None or cfg.val_json is not None:
        val_source = (find_split(cfg.data_dir, cfg.val_split or "val", cfg.val_json, cfg.val_images)
                      if cfg.val_json is not None or cfg.data_dir is not None else None)
        if val_source is not None:
            val_set = build_eval_dataset(val_source, cfg.val_split or "val", model.cfg.test_short_side,
                                         model.cfg.test_max_size, train_set.class_names,
                                         allow_outside_images=cfg.allow_outside_images)
        elif info.is_main:
            warnings.warn(f"no {cfg.val_split} split in {cfg.data_dir or cfg.train_json}: training without evaluation")

    total_batch = cfg.batch_size * info.world_size
    schedule = schedule_for(cfg.schedule, len(train_set), total_batch, cfg.max_iters, cfg.lr_steps, cfg.warmup_iters)

    # ---- resume (or fresh start) --------------------------------------------------------------------
    resume_path = _resolve_resume(cfg, run_dir)
    state = ckpt.load_checkpoint(resume_path) if resume_path is not None else None
    if state is not None:
        diffs = _config_differences(config_to_dict(model.cfg), state["model_config"])
        if diffs:
            raise ValueError(f"{resume_path} was trained with another model config:\n  " + "\n  ".join(diffs[:20]))
        model.load_state_dict(state["model"])
    else:
        if cfg.backbone_weights:
            from ..backbones.weights import load_backbone_weights
            report = load_backbone_weights(model.backbone, cfg.backbone_weights)
            if info.is_main:
                print(f"backbone weights: {report}")
        if cfg.init_weights:
            loaded, left = load_matching_weights(model, read_any_state_dict(cfg.init_weights, cfg.preset))
            if info.is_main:
                print(f"initial weights from {cfg.init_weights}: {loaded} tensors loaded; kept fresh "
                      f"({len(left)}): {', '.join(left[:8])}{' ...' if len(left) > 8 else ''}")
    model.to(device)
    seed_everything(cfg.seed + info.rank)  # from here on each process draws its own denoising noise
    criterion = SetCriterion(model.cfg.num_classes, HungarianMatcher(), num_decoder_layers=model.cfg.decoder.num_layers)
    optimizer = build_optimizer(model, cfg.lr, cfg.backbone_lr, cfg.weight_decay)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ema = None
    if cfg.ema:
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update_fn(cfg.ema_decay), use_buffers=True)
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None

    start_iter, skipped_steps = 0, 0
    # Best validation AP so far, its iteration, and evaluations since (for model_best.pth and --patience).
    best: dict[str, Any] = {"ap": None, "iter": None, "evals_since": 0}
    rng_to_restore = None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # a resumed run may change the lr: recompute base_lr
            group["base_lr"] = cfg.backbone_lr if group["name"].startswith("backbone") else cfg.lr
        if ema is not None:
            if state.get("ema") is not None:
                ema.load_state_dict(state["ema"])
            elif info.is_main:
                warnings.warn("the checkpoint has no EMA weights: the EMA starts from the current weights")
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        start_iter = int(state["iteration"])
        counters = state.get("counters", {})
        skipped_steps = int(counters.get("skipped_steps", 0))
        best.update(ap=counters.get("best_ap"), iter=counters.get("best_iter"),
                    evals_since=int(counters.get("evals_since_best", 0)))
        old = LRSchedule.from_state_dict(state["scheduler"])
        if old != schedule and info.is_main:
            warnings.warn(f"the schedule differs from the checkpoint's ({old} -> {schedule}); using the new one")
        data_state = state.get("data", {})
        if (data_state.get("world_size"), data_state.get("batch_size"), data_state.get("seed")) != \
                (info.world_size, cfg.batch_size, cfg.seed) and info.is_main:
            warnings.warn("world size, batch size or seed differ from the checkpoint's: the data order will not "
                          "continue exactly")
        rngs = state.get("rng") or []
        if info.rank < len(rngs):
            rng_to_restore = rngs[info.rank]
    if start_iter >= schedule.max_iters and info.is_main:
        warnings.warn(f"the run is already at iteration {start_iter} of {schedule.max_iters}: nothing to train")

    model_without_ddp = model
    if info.is_distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loader = build_train_loader(train_set, cfg.batch_size, cfg.num_workers, cfg.seed, info.rank, info.world_size,
                                start_iter, model_without_ddp.cfg.pixel_mean, model_without_ddp.cfg.pixel_std,
                                pin_memory=device.type == "cuda", group_by_aspect=cfg.group_by_aspect)

    # ---- run description ----------------------------------------------------------------------------
    logger = MetricsLogger(run_dir, enabled=info.is_main, tensorboard=cfg.tensorboard)
    if info.is_main:
        description = {
            "train": cfg.to_dict(),
            "resolved": {"max_iters": schedule.max_iters, "lr_milestones": list(schedule.milestones),
                         "warmup_iters": schedule.warmup_iters, "world_size": info.world_size,
                         "total_batch_size": total_batch, "device": str(device), "amp": use_amp,
                         "amp_dtype": str(amp_dtype).replace("torch.", "") if use_amp else None,
                         "train_scales": list(scales), "train_max_size": max_size,
                         "train_images": len(train_set), "val_images": len(val_set) if val_set else 0,
                         "class_names": list(train_set.class_names)},
            "model": config_to_dict(model_without_ddp.cfg),
        }
        if state is None or not (run_dir / "config.json").exists():
            write_json(run_dir / "config.json", description)
        write_json(run_dir / "environment.json", {**environment_info(), "resumed_from": str(resume_path)
                                                  if resume_path else None, "start_iteration": start_iter})
        logger.event(start_iter, "resume" if state is not None else "start",
                     checkpoint=str(resume_path) if resume_path else None, max_iters=schedule.max_iters)
        print(f"training {cfg.preset} ({train_set.num_classes} classes, {len(train_set)} images) for "
              f"{schedule.max_iters} iterations x {total_batch} images on {info.world_size} x {device}"
              + (f", resuming at iteration {start_iter} from {resume_path}" if state is not None else ""))
    del state

    # ---- the loop -------------------------------------------------------------------------------------
    if rng_to_restore is not None:
        ckpt.restore_rng_state(rng_to_restore)  # last thing before the loop: nothing may draw in between
    model.train()
    end_iter = min(schedule.max_iters, cfg.stop_at) if cfg.stop_at is not None else schedule.max_iters
    stop_reason = "stop_at" if end_iter < schedule.max_iters else "done"
    loss_keys: list[str] | None = None
    window_sum: torch.Tensor | None = None
    window_steps, window_iters, window_start = 0, 0, time.perf_counter()
    consecutive_bad = 0
    last_checkpoint = ckpt.find_latest_checkpoint(run_dir) if info.is_main and start_iter > 0 else None
    stop.last_checkpoint = last_checkpoint
    eval_metrics: dict[str, Any] | None = None
    best_weights = run_dir / "model_best.pth" if best["ap"] is not None and (run_dir / "model_best.pth").exists() else None
    # A progress bar only where someone watches it; a redirected log gets summary lines instead.
    show_bar = info.is_main and cfg.progress and sys.stderr.isatty()
    bar = tqdm(total=schedule.max_iters, initial=start_iter, disable=not show_bar, dynamic_ncols=True, desc="train")
    batches = iter(loader)  # DataLoader workers start here and ignore the job's signals (engine/workers.py)
    iteration = start_iter
    try:
        while iteration < end_iter:
            images, targets = next(batches)
            images = images.to(device)
            targets = _targets_to(targets, device)
            set_lr(optimizer, schedule.factor(iteration))

            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                outputs = model(images, targets)
                losses = criterion(outputs, targets)
                loss = criterion.total(losses)
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                scaler.unscale_(optimizer)
            max_norm = cfg.clip_max_norm if cfg.clip_max_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)

            # A non-finite loss or gradient (on any process: grads are already averaged, the loss is not)
            # skips the step instead of poisoning the weights. fp16 overflows are the GradScaler's business.
            # The same collective makes every process agree on a stop signal that reached any of them.
            loss_value = float(loss.detach())
            bad_grad = not math.isfinite(float(grad_norm)) and scaler is None
            bad, stop_now = any_true_each([not math.isfinite(loss_value) or bad_grad, bool(stop)], device)
            if bad:
                skipped_steps += 1
                consecutive_bad += 1
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.update()
                if info.is_main:
                    finite_terms = {k: float(v.detach()) for k, v in losses.items()
                                    if not math.isfinite(float(v.detach()))}
                    msg = (f"step {iteration + 1}: non-finite loss or gradient (loss {loss_value}, grad norm "
                           f"{float(grad_norm)}; non-finite terms: {sorted(finite_terms) or 'none'}): step skipped "
                           f"({consecutive_bad} in a row, {skipped_steps} in total)")
                    warnings.warn(msg)
                    logger.event(iteration + 1, "skipped_step", loss=loss_value, grad_norm=float(grad_norm),
                                 nonfinite_terms=sorted(finite_terms), skipped_steps=skipped_steps)
                if consecutive_bad >= cfg.max_bad_steps:
                    where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else \
                        "no checkpoint was written yet"
                    text = (f"stopping: {consecutive_bad} consecutive steps had a non-finite loss or gradient "
                            f"(steps {iteration + 2 - consecutive_bad}..{iteration + 1}); {where}. Lower --lr, check the data, or raise "
                            "--max-bad-steps; resume with --resume auto.")
                    logger.event(iteration + 1, "stopped", reason="non-finite", skipped_steps=skipped_steps)
                    if info.is_main:  # the skipped steps left the weights as they were: still finite
                        api.save(model_without_ddp, run_dir / "model_last.pth",
                                 extra={"iteration": iteration, "ema": False, "stop_reason": "non-finite"})
                    raise TrainingDivergedError(text)
            else:
                consecutive_bad = 0
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if ema is not None:
                    ema.update_parameters(model_without_ddp)
                if loss_keys is None:
                    loss_keys = sorted(losses)
                values = torch.stack([loss.detach().float()] + [losses[k].detach().float() for k in loss_keys]
                                     + [grad_norm.detach().float().to(loss.device)])
                window_sum = values if window_sum is None else window_sum + values
                window_steps += 1
            iteration += 1
            window_iters += 1
            bar.update(1)
            if stop_now and iteration < end_iter:
                end_iter, stop_reason = iteration, "signal"  # log, checkpoint and leave the loop below
                _announce_stop(stop, iteration, info, logger)

            # ---- logging ----------------------------------------------------------------------------
            if iteration % cfg.log_every == 0 or iteration == end_iter:
                elapsed = time.perf_counter() - window_start
                row: dict[str, float] = {}
                if window_sum is not None and window_steps:
                    mean = (window_sum / window_steps).tolist()
                    names = ["loss"] + (loss_keys or []) + ["grad_norm"]
                    row = dict(zip(names, mean))
                row = mean_over_processes(row, device) if loss_keys is not None else row
                images_per_s = window_iters * total_batch / max(elapsed, 1e-9)
                if info.is_main:
                    rates = _group_lrs(optimizer)
                    logger.write({"type": "train", "iter": iteration, **row, **rates, "images_per_s": images_per_s,
                                  "skipped_steps": skipped_steps})
                    if show_bar:
                        bar.set_postfix(loss=f"{row.get('loss', float('nan')):.3f}", img_s=f"{images_per_s:.1f}",
                                        skipped=skipped_steps)
                    else:
                        eta = (schedule.max_iters - iteration) * elapsed / max(window_iters, 1)
                        print(f"iter {iteration}/{schedule.max_iters}  loss {row.get('loss', float('nan')):.4f}  "
                              + "  ".join(f"{k} {v:.3g}" for k, v in rates.items())
                              + f"  {images_per_s:.1f} img/s  eta {_duration(eta)}"
                              + (f"  skipped {skipped_steps}" if skipped_steps else ""), flush=True)
                window_sum, window_steps, window_iters, window_start = None, 0, 0, time.perf_counter()

            # ---- evaluation -------------------------------------------------------------------------
            final = iteration == schedule.max_iters
            # (Not when a signal stops the run here: the checkpoint comes first, the scheduler's grace time is short.)
            if val_set is not None and stop_reason != "signal" and \
                    ((cfg.eval_every > 0 and iteration % cfg.eval_every == 0) or final):
                eval_model = ema.module if ema is not None else model_without_ddp
                metrics = evaluate(eval_model, val_set, device, run_dir / "eval" / f"iter_{iteration:07d}", info,
                                   cfg.eval_batch_size, 0, cfg.max_eval_images,
                                   extra={"iter": iteration, "split": cfg.val_split, "ema": ema is not None})
                out_of_patience = False
                if info.is_main and metrics is not None:
                    eval_metrics = metrics
                    logger.write({"type": "eval", "iter": iteration, "split": cfg.val_split,
                                  **{k: v for k, v in metrics.items() if k not in ("summary", "per_class")}})
                    bar.write(f"[iter {iteration}] {cfg.val_split}: {format_metrics(metrics)}")
                    ap = metrics.get("AP")
                    if isinstance(ap, (int, float)) and (best["ap"] is None or ap > best["ap"]):
                        best.update(ap=float(ap), iter=iteration, evals_since=0)
                        best_weights = api.save(eval_model, run_dir / "model_best.pth", extra={
                            "iteration": iteration, "ema": ema is not None, "AP": float(ap), "split": cfg.val_split})
                    else:
                        best["evals_since"] += 1
                    out_of_patience = cfg.patience > 0 and best["evals_since"] >= cfg.patience
                model.train()
                # A signal that came during the evaluation stops here, before another step; so does patience.
                stop_now, out_of_patience = any_true_each([bool(stop), out_of_patience], device)
                if iteration < end_iter and (stop_now or out_of_patience):
                    end_iter, stop_reason = iteration, "signal" if stop_now else "patience"
                    if stop_now:
                        _announce_stop(stop, iteration, info, logger)
                    elif info.is_main:
                        print(f"early stop: {cfg.val_split} AP has not improved for {best['evals_since']} "
                              f"evaluation(s) (--patience {cfg.patience}); best AP {best['ap']:.4f} at iteration "
                              f"{best['iter']}")
                        logger.event(iteration, "early_stop", best_ap=best["ap"], best_iter=best["iter"])

            # ---- checkpoint -------------------------------------------------------------------------
            # Periodic checkpoints are not written during a run of non-finite steps, so the newest one stays
            # a healthy state (and pruning never removes the last healthy ones).
            if (iteration % cfg.checkpoint_every == 0 and consecutive_bad == 0) or iteration == end_iter:
                # Every process's generator states (DDP ranks draw different denoising noise).
                rngs = all_gather_objects(ckpt.capture_rng_state())
                failure = None
                if info.is_main:
                    target = ckpt.checkpoint_path(run_dir, iteration)
                    try:
                        last_checkpoint = ckpt.save_checkpoint(target, {
                            "iteration": iteration,
                            "model_config": config_to_dict(model_without_ddp.cfg),
                            "train_config": cfg.to_dict(),
                            "model": {k: v.detach().cpu() for k, v in model_without_ddp.state_dict().items()},
                            "optimizer": _to_cpu(optimizer.state_dict()),
                            "scheduler": schedule.state_dict(),
                            "ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()} if ema is not None else None,
                            "grad_scaler": scaler.state_dict() if scaler is not None else None,
                            "rng": rngs,
                            "data": {"samples_per_process": iteration * cfg.batch_size, "batch_size": cfg.batch_size,
                                     "world_size": info.world_size, "seed": cfg.seed},
                            "counters": {"skipped_steps": skipped_steps, "best_ap": best["ap"],
                                         "best_iter": best["iter"], "evals_since_best": best["evals_since"]},
                        })
                        stop.last_checkpoint = last_checkpoint
                        ckpt.prune_checkpoints(run_dir, cfg.keep_checkpoints)
                    except (OSError, RuntimeError) as e:
                        if find_os_error(e) is None and not isinstance(e, OSError) and "write" not in str(e).lower():
                            raise
                        failure = storage_error_text(e, target, last_checkpoint)
                        logger.event(iteration, "stopped", reason="checkpoint write failed", error=failure)
                failure = broadcast_object(failure)  # also the barrier: no rank runs ahead of the save
                if failure is not None:
                    raise RunStorageError(failure)
    finally:
        bar.close()
        del batches  # shuts DataLoader workers down

    # ---- the end ------------------------------------------------------------------------------------
    stopped_early = iteration < schedule.max_iters
    completed = not stopped_early or stop_reason == "patience"
    final_weights = final_ema = last_weights = None
    if info.is_main:
        last_weights = api.save(model_without_ddp, run_dir / "model_last.pth",
                                extra={"iteration": iteration, "ema": False, "stop_reason": stop_reason})
        if completed:
            final_weights = api.save(model_without_ddp, run_dir / "model_final.pth",
                                     extra={"iteration": iteration, "ema": False})
            if ema is not None:
                final_ema = api.save(ema.module, run_dir / "model_final_ema.pth",
                                     extra={"iteration": iteration, "ema": True})
        logger.event(iteration, "stopped" if stopped_early else "done", reason=stop_reason,
                     skipped_steps=skipped_steps, seconds=time.perf_counter() - start_time)
        logger.close()
        seconds = time.perf_counter() - start_time
        if stop_reason == "signal":
            # The one line on stderr a scheduler's log or a terminal shows after the job's signal.
            print(f"stopped by {_signal_name(stop.signal)} at iteration {iteration} of {schedule.max_iters}: "
                  f"checkpoint {last_checkpoint}, weights {last_weights}; continue with --resume auto",
                  file=sys.stderr, flush=True)
        elif stopped_early and stop_reason != "patience":
            print(f"stopped at iteration {iteration} of {schedule.max_iters}; checkpoint {last_checkpoint}, weights "
                  f"{last_weights} (continue with --resume auto)")
        else:
            print(f"done: {iteration} iterations in {seconds:.0f} s, {skipped_steps} skipped step(s); weights "
                  f"{final_weights}" + (f", best {cfg.val_split} AP {best['ap']:.4f} at iteration {best['iter']} in "
                                         f"{best_weights}" if best_weights is not None else ""))
        if eval_metrics and stop_reason != "signal":
            print(f"{cfg.val_split}: {format_metrics(eval_metrics)}")
    barrier()
    return TrainResult(run_dir, iteration, schedule.max_iters, final_weights, final_ema, last_checkpoint,
                       eval_metrics, skipped_steps, time.perf_counter() - start_time, stopped_early,
                       model_without_ddp.eval(), ema.module.eval() if ema is not None else None,
                       stop_reason=stop_reason, stop_signal=stop.signal if stop_reason == "signal" else None,
                       last_weights=last_weights, best_weights=best_weights, best_ap=best["ap"])


def _announce_stop(stop: _StopRequest, iteration: int, info: DistInfo, logger: MetricsLogger) -> None:
    if info.is_main:
        print(f"{_signal_name(stop.signal)} received: writing the checkpoint of iteration {iteration}, then stopping "
              "(a second signal exits at once)", flush=True)
        logger.event(iteration, "signal", signal=_signal_name(stop.signal))


def _group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``{"lr": ..., "lr_backbone": ...}``: the current rate of the transformer and backbone groups."""
    rates: dict[str, float] = {}
    for group in optimizer.param_groups:
        key = "lr_backbone" if str(group.get("name", "")).startswith("backbone") else "lr"
        rates.setdefault(key, float(group["lr"]))
    return dict(sorted(rates.items(), key=lambda kv: kv[0] != "lr"))


def _duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def ema_update_fn(decay: float):
    """``multi_avg_fn`` for ``AveragedModel``: an exponential moving average whose decay warms up as
    ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (timm's ``ModelEmaV2`` schedule). With a fixed
    decay of 0.9998 the random initial weights would still weigh 0.9998^n in the average: 55 % after 3000
    steps, which ruins the EMA of a short run."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_decay must be in [0, 1], got {decay}")

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        for e, p in zip(ema_params, params):
            if e.is_floating_point():
                e.lerp_(p, 1.0 - d)
            else:
                e.copy_(p)

    return update


def read_any_state_dict(path: str | Path, preset: str | None) -> dict[str, torch.Tensor]:
    """Model weights (our names) from any weights source (:func:`focus_detr.weights.kinds.read_state_dict`: our
    weights file, training checkpoint, official checkpoint or zip of ``preset``, Hugging Face folder,
    pretrained name)."""
    from ..weights.kinds import read_state_dict

    return read_state_dict(path, preset)


def load_matching_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    """Copy every tensor of ``state_dict`` whose name and shape exist in ``model``; return how many were
    copied and the model's tensors left as they were (e.g. class heads of another number of classes).
    A floating tensor offered for an integer buffer, or an integer buffer whose values differ from the
    model's own (Swin's relative position index), is refused, as every loader does."""
    from ..convert.checks import integer_buffer_problems
    from ..weights.files import CheckpointFormatError

    problems = integer_buffer_problems(model, state_dict)
    if problems:
        raise CheckpointFormatError("the initial weights damage integer buffers: " + "; ".join(problems[:5]))
    own = model.state_dict()
    matching = {k: v for k, v in state_dict.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    model.load_state_dict(matching, strict=False)
    return len(matching), sorted(k for k in own if k not in matching)


def _install_stop_handlers(on_signal: Any) -> dict[int, Any]:
    """Route SIGTERM / SIGUSR1 / SIGINT to ``on_signal`` instead of dying (main thread only; returns the old
    handlers, for :func:`_restore_handlers`)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, on_signal)
    return previous


def _restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj
