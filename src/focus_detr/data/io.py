"""Robust image decoding (implemented in :mod:`focus_detr.ops.image_io`, shared with inference)."""

from ..ops.image_io import *  # noqa: F401,F403
from ..ops.image_io import MAX_IMAGE_PIXELS, load_image, to_rgb_array  # noqa: F401
