"""What a run writes besides checkpoints: ``metrics.jsonl``, TensorBoard events, the run description.

Only the main process writes; other processes get a disabled :class:`MetricsLogger`.

``metrics.jsonl`` has one JSON object per line:

* training rows ``{"type": "train", "iter", "loss", "loss_class", ..., "lr", "images_per_s",
  "skipped_steps", "time"}`` (loss values are means over the logging window and over processes; the
  individual terms are unweighted, ``loss`` is the weighted total that is optimised);
* evaluation rows ``{"type": "eval", "iter", "split", "AP", "AP50", ...}``;
* events ``{"type": "event", "iter", "event": "start" | "resume" | "skipped_step" | "stopped" | "done", ...}``.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    """JSON-friendly: floats stay floats (non-finite ones become strings), tensors become numbers."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsLogger:
    """Appends rows to ``run_dir/metrics.jsonl`` and mirrors scalars to TensorBoard when it is installed."""

    def __init__(self, run_dir: str | Path | None, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled and run_dir is not None
        self.path = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
        self._tb = None
        if self.enabled and tensorboard:
            try:  # optional dependency: torch.utils.tensorboard needs the `tensorboard` package
                from torch.utils.tensorboard import SummaryWriter
            except Exception:
                SummaryWriter = None  # noqa: N806
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            else:
                print(f"note: the tensorboard package is not installed: metrics go to {self.path} only "
                      "(pip install tensorboard to get TensorBoard events; --no-tensorboard hides this note)")

    @property
    def tensorboard_enabled(self) -> bool:
        return self._tb is not None

    def write(self, row: Mapping[str, Any]) -> None:
        if not self.enabled or self.path is None:
            return
        row = _clean(dict(row))
        row.setdefault("time", time.time())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None and row.get("type") in ("train", "eval"):
            step = int(row.get("iter", 0))
            prefix = "train" if row["type"] == "train" else f"eval_{row.get('split', 'val')}"
            for key, value in row.items():
                if key in ("iter", "time", "type") or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                self._tb.add_scalar(f"{prefix}/{key}", value, step)
            self._tb.flush()

    def event(self, iteration: int, event: str, **fields: Any) -> None:
        self.write({"type": "event", "iter": iteration, "event": event, **fields})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class _LogFile:
    """The shared ``log.txt`` of a :class:`TeeToLog`: one pending line per stream, ``\r`` redraws dropped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: Any = None
        self.pending: dict[str, str] = {}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")
        except OSError:
            self.file = None  # the run itself reports the unwritable folder

    def feed(self, stream: str, text: str) -> None:
        if self.file is None or not text:
            return
        buffered = self.pending.get(stream, "") + text
        *lines, rest = buffered.split("\n")
        self.pending[stream] = rest.rsplit("\r", 1)[-1]
        if lines:
            self._write("".join(line.rsplit("\r", 1)[-1] + "\n" for line in lines))

    def _write(self, text: str) -> None:
        try:
            self.file.write(text)
            self.file.flush()
        except (OSError, ValueError):  # a full disk must not turn every print into an error
            self.file = None

    def close(self) -> None:
        if self.file is None:
            return
        tail = "".join(v + "\n" for v in self.pending.values() if v.strip())
        if tail:
            self._write(tail)
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
        self.file = None


class _TeeStream:
    """Writes go to the original stream and to the log file; everything else is the original's."""

    def __init__(self, original: Any, log: _LogFile, name: str) -> None:
        self._original = original
        self._log = log
        self._name = name

    def write(self, text: str) -> int:
        self._log.feed(self._name, text)
        return self._original.write(text)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._original, attr)


class TeeToLog:
    """While active, everything written to ``sys.stdout`` and ``sys.stderr`` (prints, warnings, errors)
    is also appended to ``path`` (the run's ``log.txt``), without progress-bar redraws (``\r``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._log: _LogFile | None = None
        self._saved: tuple[Any, Any] | None = None

    def __enter__(self) -> TeeToLog:
        self._log = _LogFile(self.path)
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout = _TeeStream(sys.stdout, self._log, "stdout")  # type: ignore[assignment]
        sys.stderr = _TeeStream(sys.stderr, self._log, "stderr")  # type: ignore[assignment]
        return self

    def flush(self) -> None:
        if self._log is not None and self._log.file is not None:
            try:
                self._log.file.flush()
            except (OSError, ValueError):
                pass

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._saved is not None:
            sys.stdout, sys.stderr = self._saved
            self._saved = None
        if self._log is not None:
            if exc is not None and self._log.file is not None:
                # The caller prints the error after this context ends: keep it in the log too.
                self._log.feed("stderr", f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}\n")
            self._log.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (a torn last line, e.g. after a crash, is ignored)."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def git_revision() -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the checkout this package runs from, or ``{}`` when it is not
    a git checkout (e.g. an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": bool(status)}


def environment_info() -> dict[str, Any]:
    """Versions of Python and the packages a run depends on, the git revision and the command line."""
    import torch

    versions: dict[str, str | None] = {}
    for pkg in ("focus-detr", "torch", "numpy", "scipy", "pillow", "pycocotools", "tqdm", "tensorboard"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git": git_revision(),
        "argv": list(sys.argv),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "torch_threads": torch.get_num_threads(),
    }
    return info


def write_json(path: str | Path, payload: Any) -> None:
    from ..weights.files import atomic_write_bytes  # unique temporary name per process, fsync, rename

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, (json.dumps(_clean(payload), indent=2) + "\n").encode())
