"""Training, evaluation, checkpoints and distributed plumbing (depends on model, losses and data)."""

from .checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, find_latest_checkpoint, list_checkpoints,
                         load_checkpoint, save_checkpoint)
from .distributed import DistInfo, DistributedError
from .evaluate import COCO_STAT_NAMES, HEADLINE_METRICS, coco_evaluate, evaluate, format_metrics, predict_dataset
from .optim import SCHEDULES, LRSchedule, build_optimizer, param_groups, schedule_for
from .run_dir import RunDirError
from .train import RunStorageError, TrainConfig, TrainingDivergedError, TrainResult, train

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_FORMAT_VERSION", "COCO_STAT_NAMES", "DistInfo", "DistributedError",
    "HEADLINE_METRICS", "LRSchedule", "RunDirError", "RunStorageError", "SCHEDULES", "TrainConfig", "TrainResult", "TrainingDivergedError",
    "build_optimizer", "coco_evaluate", "evaluate", "find_latest_checkpoint", "format_metrics", "list_checkpoints",
    "load_checkpoint", "param_groups", "predict_dataset", "save_checkpoint", "schedule_for", "train",
]
