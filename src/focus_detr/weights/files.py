"""The one place that reads and writes model files as bytes: safe loading, one checksum, one atomic writer.

* :func:`read_torch_file` is the only ``torch.load`` in focus-detr. It always passes ``weights_only=True``
  (a file cannot run code) and turns every failure (missing, truncated, random bytes, pickled objects)
  into a :class:`CheckpointFormatError` whose message is one line naming the file and what is wrong.
  torch's advice to retry with ``weights_only=False`` is never repeated: that would run the file's code.
* :func:`read_numpy_pickle` reads detectron2 ``.pkl`` weight files with an unpickler that can only rebuild
  numpy arrays and plain containers.
* :func:`tree_digest` is the checksum of every file we write (weights files, training checkpoints, the
  Hugging Face layout): sha256 over a nested structure of plain values and tensors, config included.
* :func:`atomic_write` / :func:`atomic_torch_save` write to a temporary name unique to the process
  (``.NAME.tmp-PID-RANDOM``) in the destination folder, fsync, and rename over the final name, so a crash
  never leaves a half-written file under a real name; :func:`remove_orphaned_temporaries` cleans up the
  temporaries of processes that died mid-write.

This module depends on torch and numpy only (no model code), so every layer may use it.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import secrets
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor


class CheckpointFormatError(ValueError):
    """A model file that cannot be used (missing, truncated, foreign, corrupted, unsafe, out of bounds).

    The message is one line that starts with the file's path and says what is wrong.
    """


# --------------------------------------------------------------------------------------------------
# Reading


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else ""


def _unsafe_global(message: str) -> str | None:
    """The ``module.name`` a weights-only unpickler refused, from torch's (long) message."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    return m.group(1) if m else None


def read_torch_file(path: str | os.PathLike[str], what: str = "weights file") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.

    ``what`` names the expected thing in "no such <what>". Raises :class:`CheckpointFormatError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: no such {what}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with warnings.catch_warnings():
            # A file that starts like a legacy pickle makes torch warn about the old format before it fails;
            # the one-line error below says what is wrong, so the warning would only add two lines.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _unsafe_global(str(e))
        if refused is not None:
            raise CheckpointFormatError(
                f"{path}: not a readable checkpoint, refused: it holds pickled Python objects other than tensors "
                f"and plain values ({refused}); focus-detr does not run code from model files") from None
        # Random bytes and cut files also end here, under torch's "weights only" banner: say what it is.
        raise CheckpointFormatError(f"{path}: not a readable checkpoint, the file is truncated or not a PyTorch "
                                    "file (its pickle data is damaged)") from None
    except MemoryError:
        raise CheckpointFormatError(f"{path}: not enough memory to read this file") from None
    except PermissionError:
        raise CheckpointFormatError(f"{path}: permission denied") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, random bytes, foreign formats: one line, no traceback
        raise CheckpointFormatError(f"{path}: not a readable checkpoint, the file is truncated or not a PyTorch file "
                                    f"({type(e).__name__}: {_first_line(e)})") from None


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references something other than numpy arrays and plain containers."""


# The only globals a detectron2 weight pickle needs: numpy array / dtype / scalar reconstruction (old
# and numpy-2 module paths), bytes from protocol-2 pickles, and OrderedDict. Everything else (os.system,
# builtins.eval, torch internals, ...) is refused before it can be called.
_SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [(mod, name) for mod in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")]
    + [(mod, "_frombuffer") for mod in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict")]
)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise UnsafePickleError(f"refusing to unpickle global {module}.{name}: only numpy arrays and plain "
                                    "containers are allowed in a weight file")
        if module.startswith("numpy.core."):
            # numpy >= 2 moved numpy.core to numpy._core; import the new path to avoid the deprecation shim.
            try:
                return super().find_class("numpy._core." + module[len("numpy.core."):], name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(module, name)


class RefusedPickleError(CheckpointFormatError, UnsafePickleError):
    """A weights pickle refused for what it references; one line naming the file (both error families)."""


def safe_load_pickle(data: bytes) -> Any:
    """Unpickle ``data`` allowing only numpy arrays, dtypes, scalars and builtin containers.

    ``encoding="latin1"`` lets Python-2 pickles of numpy arrays (old detectron/Caffe2 files) load.
    Raises :class:`UnsafePickleError` for any other global.
    """
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def read_numpy_pickle(path: str | os.PathLike[str], what: str = "weights file") -> Any:
    """A ``.pkl`` of numpy arrays (detectron2 weights) through :func:`safe_load_pickle`, with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: no such {what}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointFormatError(f"{path}: cannot be read ({type(e).__name__}: {_first_line(e)})") from None
    try:
        return safe_load_pickle(data)
    except UnsafePickleError as e:
        raise RefusedPickleError(f"{path}: refused, {_first_line(e, 300)}; focus-detr does not run code "
                                 "from model files") from None
    except RecursionError:
        raise CheckpointFormatError(f"{path}: not a weights pickle (nested too deeply)") from None
    except Exception as e:  # noqa: BLE001 - truncated or garbage pickle
        raise CheckpointFormatError(f"{path}: not a readable pickle, it is truncated or not a pickle file "
                                    f"({type(e).__name__}: {_first_line(e)})") from None


# --------------------------------------------------------------------------------------------------
# Checksum


def _update_digest(h: Any, obj: Any, where: str) -> None:
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            _update_digest(h, key, where)
            _update_digest(h, obj[key], f"{where}/{key}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for i, item in enumerate(obj):
            _update_digest(h, item, f"{where}[{i}]")
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        # Also the guard that keeps our files weights_only-safe: nothing else may go in.
        raise TypeError(f"entry {where or '/'} has type {type(obj).__name__}; only plain values and tensors may "
                        "be stored")


def tree_digest(obj: Any) -> str:
    """sha256 over a nested structure of plain values and tensors (dict order does not matter).

    Lists and tuples hash differently; a structure read back from JSON should be normalised the same way
    on both sides (see :func:`focus_detr.weights.kinds` for the weights file's payload)."""
    h = hashlib.sha256()
    _update_digest(h, obj, "")
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (downloads and the cache index)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Atomic writes and their leftovers

# .NAME.tmp-PID-RANDOM (and the older .NAME.tmp-PID of earlier versions).
_TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)(?:-[0-9a-f]+)?$")


def temporary_name(path: Path) -> Path:
    """A name in ``path``'s folder no other process (or thread) will pick: ``.NAME.tmp-PID-RANDOM``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_folder(folder: Path) -> None:
    try:  # make the rename itself durable (not possible on every filesystem / OS)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, rename it over ``path``.

    On any failure (full disk, exception in ``write``) the temporary file is removed and ``path`` keeps its
    previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass
    _fsync_folder(path.parent)
    return path


def atomic_torch_save(payload: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(payload)`` through :func:`atomic_write`."""
    return atomic_write(path, lambda f: torch.save(payload, f))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_orphaned_temporaries(folder: str | os.PathLike[str], max_age_s: float = 24 * 3600.0) -> list[Path]:
    """Delete temporary files left by :func:`atomic_write` in ``folder`` (not recursive) whose writer is gone.

    A temporary is orphaned when the process in its name no longer runs on this host, or when it is older
    than ``max_age_s`` (a PID reused by another program, or a folder shared between hosts). Files of live
    writers are left alone. Returns the files removed. Training calls this for its run folder at start.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.iterdir():
        m = _TEMP_NAME.match(p.name)
        if not m or not p.is_file():
            continue
        try:
            age = now - p.stat().st_mtime
        except OSError:
            continue
        if int(m.group(1)) == os.getpid() and age < max_age_s:
            continue  # our own write in progress (another thread)
        if _pid_alive(int(m.group(1))) and age < max_age_s:
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


__all__ = ["CheckpointFormatError", "UnsafePickleError", "read_torch_file", "read_numpy_pickle", "safe_load_pickle",
           "tree_digest", "file_sha256", "temporary_name", "atomic_write", "atomic_torch_save", "atomic_write_bytes",
           "remove_orphaned_temporaries"]
