"""Aspect-ratio grouped training batches: one orientation per batch, exact on resume, no change when every
image has the same orientation."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from focus_detr.data import CocoDetection, build_train_transforms
from focus_detr.engine.data import AspectRatioGroupedBatches, TrainingStream, build_train_loader


def _batches(size, landscape, batch_size, count, seed=0, rank=0, world=1, start_batch=0):
    sampler = AspectRatioGroupedBatches(TrainingStream(size, seed, rank, world), landscape, batch_size, start_batch)
    return list(itertools.islice(iter(sampler), count))


@settings(max_examples=40, deadline=None)
@given(landscape=st.lists(st.booleans(), min_size=1, max_size=12), batch_size=st.integers(1, 4),
       seed=st.integers(0, 1000), world=st.integers(1, 3), start=st.integers(0, 10))
def test_one_orientation_per_batch_and_exact_resume(landscape, batch_size, seed, world, start):
    size = len(landscape)
    for rank in range(world):
        full = _batches(size, landscape, batch_size, start + 8, seed, rank, world)
        assert all(len(b) == batch_size for b in full)
        assert all(len({landscape[key[2]] for key in b}) == 1 for b in full)
        # Keys keep stream order inside a batch, and no stream position is used twice.
        positions = [key[1] for b in full for key in b]
        assert len(positions) == len(set(positions))
        assert all(b[i][1] < b[i + 1][1] for b in full for i in range(len(b) - 1))
        # Resuming at batch `start` gives exactly the rest of the uninterrupted sequence.
        assert _batches(size, landscape, batch_size, 8, seed, rank, world, start_batch=start) == full[start:]


@settings(max_examples=20, deadline=None)
@given(size=st.integers(1, 10), batch_size=st.integers(1, 4), orientation=st.booleans(), seed=st.integers(0, 99))
def test_single_orientation_equals_consecutive_stream_positions(size, batch_size, orientation, seed):
    grouped = _batches(size, [orientation] * size, batch_size, 6, seed)
    stream = iter(TrainingStream(size, seed))
    assert grouped == [[next(stream) for _ in range(batch_size)] for _ in range(6)]


def test_sampler_rejects_inconsistent_arguments():
    with pytest.raises(ValueError, match="orientations"):
        AspectRatioGroupedBatches(TrainingStream(3, 0), [True, False], 2)
    with pytest.raises(ValueError, match="position 0"):
        AspectRatioGroupedBatches(TrainingStream(3, 0, start=5), [True] * 3, 2)


def _mixed_dataset(root: Path) -> CocoDetection:
    """Three landscape (48 x 80) and three portrait (80 x 48) images with one box each."""
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(6):
        h, w = (48, 80) if i % 2 == 0 else (80, 48)
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [4, 4, 20, 20],
                            "iscrowd": 0, "area": 400})
    ann = root / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [{"id": 1, "name": "thing"}]}))
    return CocoDetection(root / "images", ann, build_train_transforms(scales=(48,), max_size=200, flip_p=0.0))


def test_train_loader_batches_never_mix_orientations(tmp_path):
    dataset = _mixed_dataset(tmp_path)
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    grouped = build_train_loader(dataset, 2, 0, seed=0, rank=0, world_size=1, start_iteration=0,
                                 pixel_mean=mean, pixel_std=std)
    plain = build_train_loader(dataset, 2, 0, seed=0, rank=0, world_size=1, start_iteration=0,
                               pixel_mean=mean, pixel_std=std, group_by_aspect=False)
    def padding_share(loader):
        mixed, padded, total = 0, 0, 0
        for batch, _ in itertools.islice(iter(loader), 12):
            sizes = [tuple(s) for s in batch.image_sizes.tolist()]
            mixed += len({h > w for h, w in sizes}) > 1
            canvas = batch.tensor.shape[-2] * batch.tensor.shape[-1]
            total += canvas * len(sizes)
            padded += sum(canvas - h * w for h, w in sizes)
        return mixed, padded / total
    mixed, share = padding_share(grouped)
    assert mixed == 0 and share < 0.15  # only the divisibility padding remains
    plain_mixed, plain_share = padding_share(plain)
    assert plain_mixed > 0 and plain_share > share
