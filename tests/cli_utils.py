"""How the end-to-end tests start the command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import focus_detr

REPO = Path(__file__).resolve().parents[1]


def cli_command() -> list[str]:
    """The ``focus-detr`` console script next to this interpreter (else on PATH), else
    ``python -m focus_detr.cli.main``."""
    script = Path(sys.executable).parent / "focus-detr"
    if script.exists():
        return [str(script)]
    found = shutil.which("focus-detr")
    return [found] if found else [sys.executable, "-m", "focus_detr.cli.main"]




def run_cli(*args: str | os.PathLike[str], cwd: Path | None = None, env_extra: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``focus-detr ARGS`` in a subprocess; returns the completed process (text stdout / stderr)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(env_extra or {})
    return subprocess.run([*cli_command(), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def save_tiny_weights(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return focus_detr.save(focus_detr.build_model("tiny"), path)


def make_picture(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> Path:
    """A small picture: noisy background and a few filled shapes (``size`` is ``(h, w)``)."""
    rng = np.random.default_rng(seed)
    h, w = size
    arr = (rng.random((h, w, 3)) * 60 + 90).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        x1, y1 = x0 + int(rng.integers(4, max(5, w // 2))), y0 + int(rng.integers(4, max(5, h // 2)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.convert(mode).save(path)
    return path
