"""Official checkpoint conversion (key table + report)."""

from .checks import integer_buffer_problems
from .official import (CheckpointMismatchError, ConversionReport, convert_official_state_dict, extract_state_dict,
                       load_converted)

__all__ = ["CheckpointMismatchError", "ConversionReport", "convert_official_state_dict", "extract_state_dict",
           "integer_buffer_problems", "load_converted"]
