"""The small training setting the engine tests share: the tiny preset cut down further, 96 px images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from focus_detr.engine import TrainConfig

SMALL_MODEL = {"decoder.num_queries": 20, "encoder.oesm_topk": 20, "test_short_side": 96}


def small_train_config(data_dir: str | Path, out: str | Path, **changes: Any) -> TrainConfig:
    """A CPU run of a few iterations on 96 px images, no evaluation, no progress bar; ``changes`` override."""
    base: dict[str, Any] = dict(
        data_dir=str(data_dir), out_dir=str(out), preset="tiny", val_split=None, schedule=None, max_iters=4,
        batch_size=2, num_workers=0, lr=2e-4, backbone_lr=2e-4, train_scales=(96,), train_max_size=200, seed=0,
        checkpoint_every=100, log_every=1, progress=False, tensorboard=False, model_overrides=dict(SMALL_MODEL))
    base.update(changes)
    return TrainConfig(**base)
