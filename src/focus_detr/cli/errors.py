"""Errors of the ``focus-detr`` command line: which ones are the user's to fix, and how each kind is reported.

* :class:`CLIError` and the library's input errors (bad data, weights or config files, a device this machine
  lacks, a missing file or optional package: :data:`USER_ERRORS`) are the user's to fix: one line on stderr,
  ``error: <message>``, no traceback.
* Anything else (``TypeError``, ``KeyError``, ``AttributeError``, ... from inside the package) is a bug: its
  traceback is printed, followed by one line asking to report it with the version.
"""

from __future__ import annotations

import sys
import traceback

# Every library error type meant for the user subclasses one of these: DataError, DeviceError,
# CheckpointFormatError, CheckpointMismatchError and ConfigError are ValueErrors; unreadable or unwritable
# paths are OSErrors; a missing optional package is an ImportError naming the pip command.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)


class CLIError(Exception):
    """A user-facing error: printed as ``error: <message>``, exit code ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's to fix (printed in one line) rather than a bug (printed with its
    traceback). An ImportError of one of the package's own modules is a bug, not a missing extra."""
    if isinstance(error, CLIError):
        return True
    if isinstance(error, ImportError) and (error.name or "").split(".")[0] == "focus_detr":
        return False
    return isinstance(error, USER_ERRORS)


def report_bug(error: BaseException) -> None:
    """Print ``error``'s traceback and a line asking to report it (on stderr)."""
    from .. import __version__

    traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    print(f"focus-detr {__version__}: unexpected {type(error).__name__}: this is a bug in focus-detr, not in your "
          "input; please report it with the traceback above, the command line and the version "
          "(`focus-detr --version`)", file=sys.stderr, flush=True)
