"""Data: COCO-format datasets, augmentations, batching, robust image reading, a synthetic dataset.

Depends only on :mod:`focus_detr.ops` (never on model / engine).
"""

from focus_detr.data.coco import CocoDetection
from focus_detr.data.collate import collate_detection, make_collate
from focus_detr.data.errors import DataError, DataWarning
from focus_detr.data.io import MAX_IMAGE_PIXELS, load_image, to_rgb_array
from focus_detr.data.synthetic import (
    SHAPES_CLASS_NAMES,
    SHAPES_LAYOUTS,
    ShapesDatasetInfo,
    ShapesLayout,
    ensure_shapes_dataset,
    make_shapes_dataset,
)
from focus_detr.data.transforms import (
    Compose,
    RandomChoice,
    RandomCrop,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    build_test_transforms,
    build_train_transforms,
)

__all__ = [
    "CocoDetection",
    "Compose",
    "DataError",
    "DataWarning",
    "MAX_IMAGE_PIXELS",
    "RandomChoice",
    "RandomCrop",
    "RandomHorizontalFlip",
    "ResizeShortestEdge",
    "SHAPES_CLASS_NAMES",
    "SHAPES_LAYOUTS",
    "ShapesDatasetInfo",
    "ShapesLayout",
    "build_test_transforms",
    "build_train_transforms",
    "collate_detection",
    "ensure_shapes_dataset",
    "load_image",
    "make_collate",
    "make_shapes_dataset",
    "to_rgb_array",
]
