"""How the end-to-end tests start the command line."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def cli_command() -> list[str]:
    """The ``focus-detr`` console script next to this interpreter (else on PATH), else
    ``python -m focus_detr.cli.main``."""
    script = Path(sys.executable).parent / "focus-detr"
    if script.exists():
        return [str(script)]
    found = shutil.which("focus-detr")
    return [found] if found else [sys.executable, "-m", "focus_detr.cli.main"]
