"""Data: COCO-format datasets (and the YOLO / VOC / Roboflow layouts read into them), augmentations, batching, robust image reading, a synthetic dataset.

Depends only on :mod:`focus_detr.ops` (never on model / engine).
"""

from focus_detr.data.class_map import ClassMismatchError, map_categories, parse_class_map
from focus_detr.data.coco import CocoDetection
from focus_detr.data.collate import collate_detection, make_collate
from focus_detr.data.errors import DataError, DataWarning
from focus_detr.data.image_io import MAX_IMAGE_PIXELS, load_image, to_rgb_array
from focus_detr.data.layouts import (
    ACCEPTED_LAYOUTS,
    CocoJsonSplit,
    DatasetSplit,
    VocSplit,
    YoloSplit,
    find_split,
    require_split,
)
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
    "ACCEPTED_LAYOUTS",
    "ClassMismatchError",
    "CocoDetection",
    "CocoJsonSplit",
    "DatasetSplit",
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
    "VocSplit",
    "YoloSplit",
    "build_test_transforms",
    "build_train_transforms",
    "collate_detection",
    "ensure_shapes_dataset",
    "find_split",
    "load_image",
    "make_collate",
    "make_shapes_dataset",
    "map_categories",
    "parse_class_map",
    "require_split",
    "to_rgb_array",
]
