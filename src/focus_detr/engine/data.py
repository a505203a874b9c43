"""Training and evaluation data for the engine: a resumable sample stream and the DataLoaders.

Training reads an endless, reproducible stream of samples (as detectron2's ``TrainingSampler``):
position ``k`` of process ``r`` is a pure function of ``(seed, r, world_size, k)``, and so is the random
augmentation applied to it (the item is loaded with Python's ``random`` seeded from that key). Hence

* resuming at iteration ``i`` only needs ``k = i * batch_size``: the data order and the augmentations
  continue exactly, whatever the number of DataLoader workers;
* no sampler state has to be pickled into checkpoints.

Each "epoch" of the stream is a permutation of the dataset drawn with ``torch.Generator(seed + epoch)``;
with ``W`` processes every process reads its own ``rank::W`` slice of that permutation (padded by
wrapping around, as ``DistributedSampler``), so the processes see disjoint images within an epoch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data import CocoDetection, build_test_transforms, build_train_transforms, make_collate
from ..data.class_map import categories_with_boxes, map_categories
from ..data.coco import validate_categories, validate_top_level
from ..data.layouts import CocoJsonSplit, DatasetSplit, VocSplit, YoloSplit, require_split
from ..data.transforms import DEFAULT_TRAIN_SCALES
from .workers import ignore_job_signals

SampleKey = tuple[int, int, int]  # (rank, stream position, dataset index)


class TrainingStream(Sampler[SampleKey]):
    """Endless ``(rank, position, index)`` keys for one process, starting at stream position ``start``."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0,
                 shuffle: bool = True) -> None:
        if size <= 0:
            raise ValueError("the training set is empty")
        self.size = size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.start = int(start)
        self.shuffle = shuffle
        self.per_process = math.ceil(size / world_size)

    def epoch_indices(self, epoch: int) -> list[int]:
        """This process's dataset indices for one pass of the stream."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = self.per_process * self.world_size
        order = (order * math.ceil(total / self.size))[:total]  # pad by wrapping around
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[SampleKey]:
        k = self.start
        epoch, cached = -1, []
        while True:
            e, j = divmod(k, self.per_process)
            if e != epoch:
                epoch, cached = e, self.epoch_indices(e)
            yield self.rank, k, cached[j]
            k += 1


class AspectRatioGroupedBatches(Sampler[list[SampleKey]]):
    """Batches in which every image has the same orientation (landscape ``w > h``, or not), as detectron2's
    aspect-ratio grouping in the official recipe: mixing a landscape and a portrait image pads both to a
    square-ish canvas, which wastes about a third of the compute on padding.

    Keys of the ``stream`` (read from position 0) go, in stream order, to the bucket of their image's
    orientation; a bucket that reaches ``batch_size`` keys is emitted. Batch ``b`` is therefore a pure
    function of the stream and the orientations (unlike detectron2's, which groups inside each DataLoader
    worker and so depends on the worker count), and resuming at batch ``start_batch`` replays the bucket
    filling from the start, which touches only keys, never images (well under a second for a COCO schedule).
    """

    def __init__(self, stream: TrainingStream, landscape: Sequence[bool], batch_size: int,
                 start_batch: int = 0) -> None:
        if stream.start != 0:
            raise ValueError("the grouped batches replay the stream from position 0; resume with start_batch")
        if len(landscape) != stream.size:
            raise ValueError(f"{len(landscape)} orientations for a dataset of {stream.size} images")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.stream = stream
        self.landscape = [bool(x) for x in landscape]
        self.batch_size = batch_size
        self.start_batch = int(start_batch)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        buckets: tuple[list[SampleKey], list[SampleKey]] = ([], [])
        emitted = 0
        for key in self.stream:
            bucket = buckets[self.landscape[key[2]]]
            bucket.append(key)
            if len(bucket) == self.batch_size:
                if emitted >= self.start_batch:
                    yield list(bucket)
                emitted += 1
                bucket.clear()


class SeededItems(Dataset):
    """Wraps a dataset so item ``(rank, position, index)`` is loaded with Python's ``random`` seeded from
    ``(seed, rank, position)`` (the data transforms draw from the global ``random``). The caller's
    ``random`` state is restored afterwards, so this does not disturb anything else in the process."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey) -> Any:
        rank, position, index = key
        saved = random.getstate()
        random.seed(f"focus-detr/{self.seed}/{rank}/{position}")  # str seeds are hashed with sha512: stable
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved)


def default_train_scales(short_side: int, max_size: int) -> tuple[tuple[int, ...], int]:
    """The official multi-scale list (480..800 step 32, max 1333), scaled by ``short_side / 800`` for
    models with a smaller test size (scales rounded to multiples of 8)."""
    if short_side == 800:
        return DEFAULT_TRAIN_SCALES, max_size
    ratio = short_side / 800.0
    scales = tuple(sorted({max(32, int(round(s * ratio / 8.0)) * 8) for s in DEFAULT_TRAIN_SCALES}))
    return scales, max_size


def split_paths(data_dir: str | Path, split: str) -> tuple[Path, Path]:
    """``(image_dir, annotation_file)`` of a split in the COCO layout
    ``annotations/instances_{split}.json`` + ``images/{split}/`` (other layouts: :func:`find_split`)."""
    root = Path(data_dir)
    return root / "images" / split, root / "annotations" / f"instances_{split}.json"


def _as_split(data: str | Path | DatasetSplit, split: str) -> DatasetSplit:
    if isinstance(data, (CocoJsonSplit, YoloSplit, VocSplit)):  # already found (find_split / require_split)
        return data
    return require_split(data, split)


def build_train_dataset(data: str | Path | DatasetSplit, split: str, scales: Sequence[int], max_size: int,
                        flip: bool = True, crop: bool = False, skip_bad: bool = False,
                        allow_outside_images: bool = False) -> CocoDetection:
    """The training split: ``data`` is a dataset folder in any layout of :mod:`focus_detr.data.layouts`
    (``split`` names the split) or a split found by :func:`find_split`. ``skip_bad``: a missing or
    unreadable image is skipped with a counted warning instead of stopping the run with a
    :class:`~focus_detr.data.errors.DataError` naming it."""
    source = _as_split(data, split)
    transforms = build_train_transforms(scales=tuple(scales), max_size=max_size, crop=crop,
                                        flip_p=0.5 if flip else 0.0, **(_crop_kwargs(scales) if crop else {}))
    return CocoDetection(source.image_dir, source.source, transforms, filter_empty=True, skip_bad=skip_bad,
                         allow_outside_images=allow_outside_images, read_annotations=source.read)


def _crop_kwargs(scales: Sequence[int]) -> dict[str, Any]:
    # The detrex crop branch (resize to 400/500/600, crop 384..600) scaled like the scales themselves.
    ratio = max(scales) / 800.0
    if ratio >= 0.999:
        return {}
    r = lambda v: max(16, int(round(v * ratio)))  # noqa: E731
    return {"crop_resize_sizes": tuple(r(v) for v in (400, 500, 600)), "crop_size_range": (r(384), r(600))}


def build_eval_dataset(data: str | Path | DatasetSplit, split: str, short_side: int, max_size: int,
                       class_names: Sequence[str] | None, num_classes: int | None = None,
                       class_map: Mapping[str, Any] | None = None,
                       allow_outside_images: bool = False) -> CocoDetection:
    """Every image of the split (none filtered), test-time resize, labels in the model's label space.

    With ``class_names`` and/or ``num_classes`` (the model's), the dataset's categories are first paired
    with the model's classes by :func:`~focus_detr.data.class_map.map_categories` (by name, by count, or
    by ``class_map``); a mismatch is a :class:`~focus_detr.data.class_map.ClassMismatchError`. Only the
    paired categories are evaluated. Without either, labels follow the file's categories.
    """
    source = _as_split(data, split)
    transforms = build_test_transforms(short_side, max_size)
    if class_names is None and num_classes is None:
        return CocoDetection(source.image_dir, source.source, transforms, filter_empty=False,
                             allow_outside_images=allow_outside_images, read_annotations=source.read)
    content = source.read()
    _, _, categories = validate_top_level(content, source.source)
    validate_categories(categories, source.source)
    num_classes = num_classes if num_classes is not None else len(class_names)  # type: ignore[arg-type]
    mapping = map_categories(categories, categories_with_boxes(content), class_names, num_classes, class_map,
                             source.source)
    names = tuple(class_names) if class_names is not None else tuple(str(k) for k in range(num_classes))
    return CocoDetection(source.image_dir, source.source, transforms, filter_empty=False, class_names=names,
                         category_to_label=mapping, allow_outside_images=allow_outside_images,
                         read_annotations=_ReadOnceThenAgain(content, source.read))


class _ReadOnceThenAgain:
    """Returns ``content`` on the first call (already read to check the classes), ``read()`` afterwards;
    does not keep the content alive or ship it to DataLoader workers."""

    def __init__(self, content: Any, read: Callable[[], Any]) -> None:
        self._content = content
        self._read = read

    def __call__(self) -> Any:
        content, self._content = self._content, None
        return content if content is not None else self._read()

    def __getstate__(self) -> dict[str, Any]:
        return {"_content": None, "_read": self._read}


def build_train_loader(dataset: CocoDetection, batch_size: int, num_workers: int, seed: int, rank: int,
                       world_size: int, start_iteration: int, pixel_mean: Sequence[float],
                       pixel_std: Sequence[float], pin_memory: bool = False,
                       group_by_aspect: bool = True) -> DataLoader:
    """Endless DataLoader of ``(ImageBatch, targets)`` starting at batch ``start_iteration``.

    ``group_by_aspect``: batches of one orientation (:class:`AspectRatioGroupedBatches`, the official
    recipe); otherwise consecutive stream positions. Both are exact on resume. When every image has the
    same orientation the two give the same batches.
    """
    common: dict[str, Any] = dict(
        num_workers=num_workers, collate_fn=make_collate(pixel_mean, pixel_std), pin_memory=pin_memory,
        persistent_workers=False, worker_init_fn=ignore_job_signals,  # the main process owns shutdown
        # Own generator: creating the iterator must not consume the global torch RNG (resume exactness).
        generator=torch.Generator().manual_seed(seed),
    )
    if group_by_aspect:
        landscape = [info["width"] > info["height"] for info in map(dataset.get_image_info, range(len(dataset)))]
        batches = AspectRatioGroupedBatches(TrainingStream(len(dataset), seed, rank, world_size), landscape,
                                            batch_size, start_batch=start_iteration)
        return DataLoader(SeededItems(dataset, seed), batch_sampler=batches, **common)
    stream = TrainingStream(len(dataset), seed, rank, world_size, start_iteration * batch_size)
    return DataLoader(SeededItems(dataset, seed), batch_size=batch_size, sampler=stream, drop_last=True, **common)


def build_eval_loader(dataset: Dataset, indices: Sequence[int], batch_size: int, num_workers: int,
                      pixel_mean: Sequence[float], pixel_std: Sequence[float]) -> DataLoader:
    subset = torch.utils.data.Subset(dataset, list(indices))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=make_collate(pixel_mean, pixel_std), worker_init_fn=ignore_job_signals,
                      generator=torch.Generator().manual_seed(0))
