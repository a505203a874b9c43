"""Sanity check of the whole training path: the tiny model overfits 4 images of the built-in dataset.

If matching, losses, denoising, the optimiser or the post-processing were broken, AP50 on the training
images would stay far below 1. Runs in CI (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import pytest

from focus_detr.data import ensure_shapes_dataset
from focus_detr.engine import TrainConfig, train


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.mark.slow
def test_tiny_model_overfits_four_images(tmp_path):
    data = tmp_path / "shapes"
    ensure_shapes_dataset(data, 4, 1, seed=0, image_size=(96, 128), min_object_size=12, objects_per_image=(1, 3))
    result = train(TrainConfig(
        data_dir=str(data), out_dir=str(tmp_path / "run"), preset="tiny",
        val_split="train",  # evaluate on the training images themselves
        schedule=None, max_iters=150, batch_size=2, num_workers=0, lr=5e-4, backbone_lr=5e-4,
        train_scales=(96,), train_max_size=200, flip=False, seed=0, checkpoint_every=10**6, log_every=50,
        eval_batch_size=4, progress=False, tensorboard=False,
        model_overrides={"decoder.num_queries": 30, "encoder.oesm_topk": 30, "test_short_side": 96},
    ))
    metrics = result.eval_metrics
    assert result.skipped_steps == 0
    assert metrics["AP50"] >= 0.9, metrics["summary"]
    assert metrics["AP"] >= 0.5, metrics["summary"]
