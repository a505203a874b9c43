"""The training loop: ``train(TrainConfig(...))`` trains Focus-DETR on a COCO-format dataset.

It runs as one process (CPU or one GPU) or under ``torchrun --nproc_per_node N`` as DDP; everything that
writes files happens on rank 0 only. One iteration = one optimiser step on ``batch_size`` images per
process. :func:`train` claims the run folder and installs the stop handlers; :class:`Trainer` is the run,
its methods in the order they run: ``set_up`` (data, model, schedule), ``restore`` (resume or initial
weights), ``describe`` (DDP, loader, run description), then ``run``: per iteration ``step`` (forward, loss,
backward, clip, step, EMA; non-finite steps skipped), then ``log`` / ``evaluate`` / ``checkpoint`` at their
intervals, and ``finish``.

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
import sys
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
from .optim import LRSchedule, build_optimizer, schedule_for, set_lr
from .run_dir import (RunDirError, RunLock, check_new_run, ensure_writable, find_os_error, remove_orphaned_temporaries,
                      storage_error_text)
from .stopping import StopRequest, install_stop_handlers, restore_handlers, signal_name


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
    stop = StopRequest(lock)
    previous_handlers = install_stop_handlers(stop.on_signal)
    try:
        with TeeToLog(run_dir / "log.txt") if info.is_main else contextlib.nullcontext():
            for caution in cautions:
                print(f"warning: {caution}", file=sys.stderr)
            for note in notes:
                print(note)
            try:
                return Trainer(cfg, info, device, run_dir, stop).run()
            except (DistributedError, TrainingDivergedError, RunDirError, RunStorageError):
                raise
            except Exception as e:
                os_error = find_os_error(e)
                if os_error is None or not _is_storage_failure(os_error, run_dir):
                    raise
                raise RunStorageError(storage_error_text(e, os_error.filename or run_dir,
                                                         stop.last_checkpoint)) from None
    finally:
        restore_handlers(previous_handlers)
        lock.release()


class Trainer:
    """One run inside a claimed run folder (see :func:`train`, which claims it and installs the stop handlers).

    Construction prepares the run: :meth:`set_up` (seeds, datasets, model, schedule), :meth:`restore`
    (resume checkpoint or initial weights, optimiser, EMA, loss scaler, counters) and :meth:`describe`
    (DDP wrapper, data loader, ``config.json`` / ``environment.json``). :meth:`run` is the loop: each
    iteration is one :meth:`step`, then :meth:`log`, :meth:`evaluate` and :meth:`checkpoint` when they are
    due; :meth:`finish` writes the final weights. Every method runs on every DDP rank (the collectives inside
    them must be reached by all); only rank 0 writes files.
    """

    def __init__(self, cfg: TrainConfig, info: DistInfo, device: torch.device, run_dir: Path,
                 stop: StopRequest) -> None:
        self.cfg, self.info, self.device, self.run_dir, self.stop = cfg, info, device, run_dir, stop
        self.start_time = time.perf_counter()
        self.set_up()
        state, resume_path = self.restore()
        self.describe(state, resume_path)

    # ---- set-up ---------------------------------------------------------------------------------------

    def set_up(self) -> None:
        """Seeds, AMP, the datasets, the model (on the CPU, freshly initialised) and the schedule."""
        cfg, info = self.cfg, self.info
        seed_everything(cfg.seed)  # same initial weights on every process (DDP would broadcast rank 0's anyway)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.use_amp = cfg.amp and self.device.type == "cuda"
        if cfg.amp and not self.use_amp and info.is_main:
            warnings.warn("--amp is only used on CUDA; training in float32 on the CPU")
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16

        if "num_classes" in cfg.model_overrides or "class_names" in cfg.model_overrides:
            raise ValueError("num_classes and class_names come from the training set's categories; do not override them")
        preset_cfg = make_config(cfg.preset, **cfg.model_overrides)  # the sizes; the classes come from the data
        scales, max_size = default_train_scales(preset_cfg.test_short_side, preset_cfg.test_max_size)
        self.scales = tuple(cfg.train_scales) if cfg.train_scales else scales
        self.max_size = cfg.train_max_size or max_size
        train_source = require_split(cfg.data_dir, cfg.train_split, cfg.train_json, cfg.train_images)
        self.train_set = build_train_dataset(train_source, cfg.train_split, self.scales, self.max_size, cfg.flip,
                                             cfg.crop, cfg.skip_bad, cfg.allow_outside_images)
        model_cfg = dataclasses.replace(preset_cfg, num_classes=self.train_set.num_classes,
                                        class_names=self.train_set.class_names)
        self.model: FocusDETR = build_model(model_cfg)
        # The model config as stored in config.json and every checkpoint, and compared on resume.
        self.model_config = config_to_dict(self.model.cfg)
        self.train_config = cfg.to_dict()
        self.val_set = None
        if cfg.val_split is not None or cfg.val_json is not None:
            val_source = (find_split(cfg.data_dir, cfg.val_split or "val", cfg.val_json, cfg.val_images)
                          if cfg.val_json is not None or cfg.data_dir is not None else None)
            if val_source is not None:
                self.val_set = build_eval_dataset(val_source, cfg.val_split or "val", model_cfg.test_short_side,
                                                  model_cfg.test_max_size, self.train_set.class_names,
                                                  allow_outside_images=cfg.allow_outside_images)
            elif info.is_main:
                warnings.warn(f"no {cfg.val_split} split in {cfg.data_dir or cfg.train_json}: "
                              "training without evaluation")
        self.total_batch = cfg.batch_size * info.world_size
        self.schedule = schedule_for(cfg.schedule, len(self.train_set), self.total_batch, cfg.max_iters,
                                     cfg.lr_steps, cfg.warmup_iters)

    # ---- restore (or fresh start) -----------------------------------------------------------------------

    def restore(self) -> tuple[dict[str, Any] | None, Path | None]:
        """Load the resume checkpoint (model, optimiser, EMA, loss scaler, counters, generator states) or, on
        a fresh start, the backbone / initial weights; build the optimiser, EMA and scaler. Returns the
        checkpoint's content (None on a fresh start) and its path."""
        cfg, info, model = self.cfg, self.info, self.model
        resume_path = _resolve_resume(cfg, self.run_dir)
        state = ckpt.load_checkpoint(resume_path) if resume_path is not None else None
        if state is not None:
            diffs = _config_differences(self.model_config, state["model_config"])
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
        model.to(self.device)
        seed_everything(cfg.seed + info.rank)  # from here on each process draws its own denoising noise
        self.criterion = SetCriterion(model.cfg.num_classes, HungarianMatcher(),
                                      num_decoder_layers=model.cfg.decoder.num_layers)
        self.optimizer = build_optimizer(model, cfg.lr, cfg.backbone_lr, cfg.weight_decay)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.ema = None
        if cfg.ema:
            self.ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update_fn(cfg.ema_decay),
                                                           use_buffers=True)
        self.scaler = (torch.amp.GradScaler("cuda") if self.use_amp and self.amp_dtype == torch.float16
                       else None)

        self.start_iter = self.skipped_steps = 0
        # Best validation AP so far, its iteration, and evaluations since (for model_best.pth and --patience).
        self.best: dict[str, Any] = {"ap": None, "iter": None, "evals_since": 0}
        self.rng_to_restore = None
        if state is not None:
            self._restore_training_state(state)
        if self.start_iter >= self.schedule.max_iters and info.is_main:
            warnings.warn(f"the run is already at iteration {self.start_iter} of {self.schedule.max_iters}: "
                          "nothing to train")
        return state, resume_path

    def _restore_training_state(self, state: dict[str, Any]) -> None:
        cfg, info = self.cfg, self.info
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # a resumed run may change the lr: recompute base_lr
            group["base_lr"] = cfg.backbone_lr if group["name"].startswith("backbone") else cfg.lr
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            elif info.is_main:
                warnings.warn("the checkpoint has no EMA weights: the EMA starts from the current weights")
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.start_iter = int(state["iteration"])
        counters = state.get("counters", {})
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        self.best.update(ap=counters.get("best_ap"), iter=counters.get("best_iter"),
                         evals_since=int(counters.get("evals_since_best", 0)))
        old = LRSchedule.from_state_dict(state["scheduler"])
        if old != self.schedule and info.is_main:
            warnings.warn(f"the schedule differs from the checkpoint's ({old} -> {self.schedule}); using the new one")
        data_state = state.get("data", {})
        if (data_state.get("world_size"), data_state.get("batch_size"), data_state.get("seed")) != \
                (info.world_size, cfg.batch_size, cfg.seed) and info.is_main:
            warnings.warn("world size, batch size or seed differ from the checkpoint's: the data order will not "
                          "continue exactly")
        rngs = state.get("rng") or []
        if info.rank < len(rngs):
            self.rng_to_restore = rngs[info.rank]

    # ---- run description --------------------------------------------------------------------------------

    def describe(self, state: dict[str, Any] | None, resume_path: Path | None) -> None:
        """Wrap the model for DDP, build the data loader, write ``config.json`` (fresh runs) and
        ``environment.json`` and the start / resume event."""
        cfg, info, run_dir, schedule = self.cfg, self.info, self.run_dir, self.schedule
        self.model_without_ddp = self.model
        if info.is_distributed:
            self.model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.loader = build_train_loader(
            self.train_set, cfg.batch_size, cfg.num_workers, cfg.seed, info.rank, info.world_size, self.start_iter,
            self.model_without_ddp.cfg.pixel_mean, self.model_without_ddp.cfg.pixel_std,
            pin_memory=self.device.type == "cuda", group_by_aspect=cfg.group_by_aspect)
        self.logger = MetricsLogger(run_dir, enabled=info.is_main, tensorboard=cfg.tensorboard)
        if not info.is_main:
            return
        description = {
            "train": self.train_config,
            "resolved": {"max_iters": schedule.max_iters, "lr_milestones": list(schedule.milestones),
                         "warmup_iters": schedule.warmup_iters, "world_size": info.world_size,
                         "total_batch_size": self.total_batch, "device": str(self.device), "amp": self.use_amp,
                         "amp_dtype": str(self.amp_dtype).replace("torch.", "") if self.use_amp else None,
                         "train_scales": list(self.scales), "train_max_size": self.max_size,
                         "train_images": len(self.train_set), "val_images": len(self.val_set) if self.val_set else 0,
                         "class_names": list(self.train_set.class_names)},
            "model": self.model_config,
        }
        if state is None or not (run_dir / "config.json").exists():
            write_json(run_dir / "config.json", description)
        write_json(run_dir / "environment.json", {**environment_info(), "resumed_from": str(resume_path)
                                                  if resume_path else None, "start_iteration": self.start_iter})
        self.logger.event(self.start_iter, "resume" if state is not None else "start",
                          checkpoint=str(resume_path) if resume_path else None, max_iters=schedule.max_iters)
        print(f"training {cfg.preset} ({self.train_set.num_classes} classes, {len(self.train_set)} images) for "
              f"{schedule.max_iters} iterations x {self.total_batch} images on {info.world_size} x {self.device}"
              + (f", resuming at iteration {self.start_iter} from {resume_path}" if state is not None else ""))

    # ---- the loop ---------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train from the restored iteration to ``max_iters`` (or ``stop_at``, a signal, patience)."""
        cfg, info = self.cfg, self.info
        if self.rng_to_restore is not None:
            ckpt.restore_rng_state(self.rng_to_restore)  # last thing before the loop: nothing may draw in between
        self.model.train()
        max_iters = self.schedule.max_iters
        self.end_iter = min(max_iters, cfg.stop_at) if cfg.stop_at is not None else max_iters
        self.stop_reason = "stop_at" if self.end_iter < max_iters else "done"
        self.loss_keys: list[str] | None = None
        self.window_sum: torch.Tensor | None = None
        self.window_steps, self.window_iters, self.window_start = 0, 0, time.perf_counter()
        self.consecutive_bad = 0
        self.last_checkpoint = ckpt.find_latest_checkpoint(self.run_dir) if info.is_main and self.start_iter > 0 else None
        self.stop.last_checkpoint = self.last_checkpoint
        self.eval_metrics: dict[str, Any] | None = None
        best_file = self.run_dir / "model_best.pth"
        self.best_weights = best_file if self.best["ap"] is not None and best_file.exists() else None
        # A progress bar only where someone watches it; a redirected log gets summary lines instead.
        self.show_bar = info.is_main and cfg.progress and sys.stderr.isatty()
        self.bar = tqdm(total=max_iters, initial=self.start_iter, disable=not self.show_bar, dynamic_ncols=True,
                        desc="train")
        batches = iter(self.loader)  # DataLoader workers start here and ignore the job's signals (engine/workers.py)
        self.iteration = self.start_iter
        try:
            while self.iteration < self.end_iter:
                images, targets = next(batches)
                stop_now = self.step(images, targets)
                self.iteration += 1
                self.window_iters += 1
                self.bar.update(1)
                if stop_now and self.iteration < self.end_iter:
                    self.end_iter, self.stop_reason = self.iteration, "signal"  # log, checkpoint and leave below
                    self._announce_stop()
                if self.iteration % cfg.log_every == 0 or self.iteration == self.end_iter:
                    self.log()
                # (Not when a signal stops the run here: the checkpoint comes first, the scheduler's grace time
                # is short.)
                if self.val_set is not None and self.stop_reason != "signal" and \
                        ((cfg.eval_every > 0 and self.iteration % cfg.eval_every == 0) or self.iteration == max_iters):
                    self.evaluate()
                # Periodic checkpoints are not written during a run of non-finite steps, so the newest one stays
                # a healthy state (and pruning never removes the last healthy ones).
                if (self.iteration % cfg.checkpoint_every == 0 and self.consecutive_bad == 0) or \
                        self.iteration == self.end_iter:
                    self.checkpoint()
        finally:
            self.bar.close()
            del batches  # shuts DataLoader workers down
        return self.finish()

    def step(self, images: torch.Tensor, targets: list[dict[str, Any]]) -> bool:
        """One optimiser step on one batch (skipped when the loss or gradient is not finite on any process).
        Returns whether a stop signal reached any process (all processes agree on it)."""
        cfg, optimizer, scaler = self.cfg, self.optimizer, self.scaler
        images = images.to(self.device)
        targets = _targets_to(targets, self.device)
        set_lr(optimizer, self.schedule.factor(self.iteration))

        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            outputs = self.model(images, targets)
            losses = self.criterion(outputs, targets)
            loss = self.criterion.total(losses)
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        max_norm = cfg.clip_max_norm if cfg.clip_max_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)

        # A non-finite loss or gradient (on any process: grads are already averaged, the loss is not) skips the
        # step instead of poisoning the weights. fp16 overflows are the GradScaler's business. The same
        # collective makes every process agree on a stop signal that reached any of them.
        loss_value = float(loss.detach())
        bad_grad = not math.isfinite(float(grad_norm)) and scaler is None
        bad, stop_now = any_true_each([not math.isfinite(loss_value) or bad_grad, bool(self.stop)], self.device)
        if bad:
            self._skip_step(losses, loss_value, float(grad_norm))
            return stop_now
        self.consecutive_bad = 0
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model_without_ddp)
        if self.loss_keys is None:
            self.loss_keys = sorted(losses)
        values = torch.stack([loss.detach().float()] + [losses[k].detach().float() for k in self.loss_keys]
                             + [grad_norm.detach().float().to(loss.device)])
        self.window_sum = values if self.window_sum is None else self.window_sum + values
        self.window_steps += 1
        return stop_now

    def _skip_step(self, losses: dict[str, torch.Tensor], loss_value: float, grad_norm: float) -> None:
        """Count a non-finite step (the weights stay as they were); too many in a row stop the run."""
        iteration = self.iteration
        self.skipped_steps += 1
        self.consecutive_bad += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()
        if self.info.is_main:
            nonfinite_terms = sorted(k for k, v in losses.items() if not math.isfinite(float(v.detach())))
            warnings.warn(f"step {iteration + 1}: non-finite loss or gradient (loss {loss_value}, grad norm "
                          f"{grad_norm}; non-finite terms: {nonfinite_terms or 'none'}): step skipped "
                          f"({self.consecutive_bad} in a row, {self.skipped_steps} in total)")
            self.logger.event(iteration + 1, "skipped_step", loss=loss_value, grad_norm=grad_norm,
                              nonfinite_terms=nonfinite_terms, skipped_steps=self.skipped_steps)
        if self.consecutive_bad >= self.cfg.max_bad_steps:
            where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                     else "no checkpoint was written yet")
            text = (f"stopping: {self.consecutive_bad} consecutive steps had a non-finite loss or gradient "
                    f"(steps {iteration + 2 - self.consecutive_bad}..{iteration + 1}); {where}. Lower --lr, check "
                    "the data, or raise --max-bad-steps; resume with --resume auto.")
            self.logger.event(iteration + 1, "stopped", reason="non-finite", skipped_steps=self.skipped_steps)
            if self.info.is_main:  # the skipped steps left the weights as they were: still finite
                api.save(self.model_without_ddp, self.run_dir / "model_last.pth",
                         extra={"iteration": iteration, "ema": False, "stop_reason": "non-finite"})
            raise TrainingDivergedError(text)

    # ---- logging ----------------------------------------------------------------------------------------

    def log(self) -> None:
        """A ``metrics.jsonl`` row with the means over the window since the last one (and over processes),
        and a progress line (or the progress bar's figures)."""
        iteration, max_iters = self.iteration, self.schedule.max_iters
        elapsed = time.perf_counter() - self.window_start
        row: dict[str, float] = {}
        if self.window_sum is not None and self.window_steps:
            mean = (self.window_sum / self.window_steps).tolist()
            names = ["loss"] + (self.loss_keys or []) + ["grad_norm"]
            row = dict(zip(names, mean))
        row = mean_over_processes(row, self.device) if self.loss_keys is not None else row
        images_per_s = self.window_iters * self.total_batch / max(elapsed, 1e-9)
        if self.info.is_main:
            rates = _group_lrs(self.optimizer)
            self.logger.write({"type": "train", "iter": iteration, **row, **rates, "images_per_s": images_per_s,
                               "skipped_steps": self.skipped_steps})
            if self.show_bar:
                self.bar.set_postfix(loss=f"{row.get('loss', float('nan')):.3f}", img_s=f"{images_per_s:.1f}",
                                     skipped=self.skipped_steps)
            else:
                eta = (max_iters - iteration) * elapsed / max(self.window_iters, 1)
                print(f"iter {iteration}/{max_iters}  loss {row.get('loss', float('nan')):.4f}  "
                      + "  ".join(f"{k} {v:.3g}" for k, v in rates.items())
                      + f"  {images_per_s:.1f} img/s  eta {_duration(eta)}"
                      + (f"  skipped {self.skipped_steps}" if self.skipped_steps else ""), flush=True)
        self.window_sum, self.window_steps, self.window_iters, self.window_start = None, 0, 0, time.perf_counter()

    # ---- evaluation -------------------------------------------------------------------------------------

    def evaluate(self) -> None:
        """COCO evaluation of the model (its EMA with --ema) on the validation set; ``model_best.pth`` when the
        AP improved; stops the run after it when a signal came in the meantime or patience ran out."""
        cfg, info, iteration, best = self.cfg, self.info, self.iteration, self.best
        eval_model = self.ema.module if self.ema is not None else self.model_without_ddp
        metrics = evaluate(eval_model, self.val_set, self.device, self.run_dir / "eval" / f"iter_{iteration:07d}",
                           info, cfg.eval_batch_size, 0, cfg.max_eval_images,
                           extra={"iter": iteration, "split": cfg.val_split, "ema": self.ema is not None})
        out_of_patience = False
        if info.is_main and metrics is not None:
            self.eval_metrics = metrics
            self.logger.write({"type": "eval", "iter": iteration, "split": cfg.val_split,
                               **{k: v for k, v in metrics.items() if k not in ("summary", "per_class")}})
            self.bar.write(f"[iter {iteration}] {cfg.val_split}: {format_metrics(metrics)}")
            ap = metrics.get("AP")
            if isinstance(ap, (int, float)) and (best["ap"] is None or ap > best["ap"]):
                best.update(ap=float(ap), iter=iteration, evals_since=0)
                self.best_weights = api.save(eval_model, self.run_dir / "model_best.pth", extra={
                    "iteration": iteration, "ema": self.ema is not None, "AP": float(ap), "split": cfg.val_split})
            else:
                best["evals_since"] += 1
            out_of_patience = cfg.patience > 0 and best["evals_since"] >= cfg.patience
        self.model.train()
        # A signal that came during the evaluation stops here, before another step; so does patience.
        stop_now, out_of_patience = any_true_each([bool(self.stop), out_of_patience], self.device)
        if iteration < self.end_iter and (stop_now or out_of_patience):
            self.end_iter, self.stop_reason = iteration, "signal" if stop_now else "patience"
            if stop_now:
                self._announce_stop()
            elif info.is_main:
                print(f"early stop: {cfg.val_split} AP has not improved for {best['evals_since']} evaluation(s) "
                      f"(--patience {cfg.patience}); best AP {best['ap']:.4f} at iteration {best['iter']}")
                self.logger.event(iteration, "early_stop", best_ap=best["ap"], best_iter=best["iter"])

    # ---- checkpoint -------------------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Write the training checkpoint of this iteration (rank 0; every rank's generator states) and prune old
        ones; a failed write stops every rank with :class:`RunStorageError` naming the last good checkpoint."""
        cfg, info, iteration = self.cfg, self.info, self.iteration
        # Every process's generator states (DDP ranks draw different denoising noise).
        rngs = all_gather_objects(ckpt.capture_rng_state())
        failure = None
        if info.is_main:
            target = ckpt.checkpoint_path(self.run_dir, iteration)
            try:
                self.last_checkpoint = ckpt.save_checkpoint(target, ckpt.training_checkpoint(
                    iteration=iteration, model_config=self.model_config, train_config=self.train_config,
                    model=self.model_without_ddp, optimizer=self.optimizer, scheduler=self.schedule.state_dict(),
                    ema=self.ema, grad_scaler=self.scaler, rng=rngs, batch_size=cfg.batch_size,
                    world_size=info.world_size, seed=cfg.seed, skipped_steps=self.skipped_steps,
                    best_ap=self.best["ap"], best_iter=self.best["iter"], evals_since_best=self.best["evals_since"]))
                self.stop.last_checkpoint = self.last_checkpoint
                ckpt.prune_checkpoints(self.run_dir, cfg.keep_checkpoints)
            except (OSError, RuntimeError) as e:
                if find_os_error(e) is None and not isinstance(e, OSError) and "write" not in str(e).lower():
                    raise
                failure = storage_error_text(e, target, self.last_checkpoint)
                self.logger.event(iteration, "stopped", reason="checkpoint write failed", error=failure)
        failure = broadcast_object(failure)  # also the barrier: no rank runs ahead of the save
        if failure is not None:
            raise RunStorageError(failure)

    # ---- the end ----------------------------------------------------------------------------------------

    def finish(self) -> TrainResult:
        """``model_last.pth`` always; ``model_final.pth`` (and the EMA's) when the run completed; the summary."""
        cfg, info, iteration, best = self.cfg, self.info, self.iteration, self.best
        max_iters, stop_reason, run_dir = self.schedule.max_iters, self.stop_reason, self.run_dir
        stopped_early = iteration < max_iters
        completed = not stopped_early or stop_reason == "patience"
        final_weights = final_ema = last_weights = None
        if info.is_main:
            last_weights = api.save(self.model_without_ddp, run_dir / "model_last.pth",
                                    extra={"iteration": iteration, "ema": False, "stop_reason": stop_reason})
            if completed:
                final_weights = api.save(self.model_without_ddp, run_dir / "model_final.pth",
                                         extra={"iteration": iteration, "ema": False})
                if self.ema is not None:
                    final_ema = api.save(self.ema.module, run_dir / "model_final_ema.pth",
                                         extra={"iteration": iteration, "ema": True})
            self.logger.event(iteration, "stopped" if stopped_early else "done", reason=stop_reason,
                              skipped_steps=self.skipped_steps, seconds=time.perf_counter() - self.start_time)
            self.logger.close()
            seconds = time.perf_counter() - self.start_time
            if stop_reason == "signal":
                # The one line on stderr a scheduler's log or a terminal shows after the job's signal.
                print(f"stopped by {signal_name(self.stop.signal)} at iteration {iteration} of {max_iters}: "
                      f"checkpoint {self.last_checkpoint}, weights {last_weights}; continue with --resume auto",
                      file=sys.stderr, flush=True)
            elif stopped_early and stop_reason != "patience":
                print(f"stopped at iteration {iteration} of {max_iters}; checkpoint {self.last_checkpoint}, weights "
                      f"{last_weights} (continue with --resume auto)")
            else:
                print(f"done: {iteration} iterations in {seconds:.0f} s, {self.skipped_steps} skipped step(s); weights "
                      f"{final_weights}" + (f", best {cfg.val_split} AP {best['ap']:.4f} at iteration {best['iter']} "
                                             f"in {self.best_weights}" if self.best_weights is not None else ""))
            if self.eval_metrics and stop_reason != "signal":
                print(f"{cfg.val_split}: {format_metrics(self.eval_metrics)}")
        barrier()
        return TrainResult(run_dir, iteration, max_iters, final_weights, final_ema, self.last_checkpoint,
                           self.eval_metrics, self.skipped_steps, time.perf_counter() - self.start_time,
                           stopped_early, self.model_without_ddp.eval(),
                           self.ema.module.eval() if self.ema is not None else None, stop_reason=stop_reason,
                           stop_signal=self.stop.signal if stop_reason == "signal" else None,
                           last_weights=last_weights, best_weights=self.best_weights, best_ap=best["ap"])

    def _announce_stop(self) -> None:
        if self.info.is_main:
            print(f"{signal_name(self.stop.signal)} received: writing the checkpoint of iteration {self.iteration}, "
                  "then stopping (a second signal exits at once)", flush=True)
            self.logger.event(self.iteration, "signal", signal=signal_name(self.stop.signal))


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
