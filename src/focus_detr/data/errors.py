"""Data errors (defined in :mod:`focus_detr.ops.errors`, shared with inference)."""

from ..ops.errors import DataError, DataWarning

__all__ = ["DataError", "DataWarning"]
