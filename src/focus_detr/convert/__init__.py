"""Official checkpoint conversion (key table + report)."""

from .official import (CheckpointMismatchError, ConversionReport, convert_official_state_dict, extract_state_dict,
                       load_converted)

__all__ = ["CheckpointMismatchError", "ConversionReport", "convert_official_state_dict", "extract_state_dict",
           "load_converted"]
