"""The run folder's rules: one run per folder, one writer at a time, no leftovers, writable before long work.

* :func:`check_new_run` refuses a folder that already holds a run unless it is resumed (``--resume``) or
  replaced (``--overwrite``): a second run never silently overwrites checkpoints or appends to the first
  run's ``metrics.jsonl``. (We refuse instead of numbering ``runs/x-2`` as ultralytics does: a requeued job
  runs the same command line with ``--resume auto`` and must find its own folder again.)
* :class:`RunLock` is ``RUN_DIR/.lock`` (``{"pid", "host", "started"}``) created with ``O_EXCL`` while a run
  writes to the folder. A second run into it is refused naming the holder's PID and host; a lock left by a
  process that no longer exists on this host (SIGKILL, a power cut) is taken over with a warning.
* :func:`remove_orphaned_temporaries` deletes temporary files (``.checkpoint_*.pth.tmp-*``,
  ``*.pth.tmp``) that a killed writer left behind; under the lock no other writer can own them.
* :func:`ensure_writable` creates an output folder and writes a probe file, so an unwritable ``--out``
  fails in a second, not after the work.
* :func:`storage_error_text` turns a failed save (full disk, read-only filesystem, ...) into one line.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import warnings
from pathlib import Path

LOCK_NAME = ".lock"
# What a run writes into its folder (engine/train.py); --overwrite removes exactly these.
RUN_ENTRIES: tuple[str, ...] = ("config.json", "environment.json", "metrics.jsonl", "log.txt", "tensorboard",
                                "checkpoints", "eval", "model_final.pth", "model_final_ema.pth", "model_last.pth",
                                "model_best.pth")
# Fixed temporary names of versions before the one atomic writer (focus_detr.weights.files.atomic_write).
_LEGACY_TEMPORARY_PATTERNS: tuple[str, ...] = ("*.pth.tmp", "*.json.tmp")


class RunDirError(RuntimeError):
    """The run folder cannot be used: it holds another run, is locked by a live run, or is not writable."""


def existing_run_entries(run_dir: str | Path) -> list[str]:
    """The names of the run files present in ``run_dir`` (empty when it is new or holds no run)."""
    root = Path(run_dir)
    return [name for name in RUN_ENTRIES if (root / name).exists()]


def check_new_run(run_dir: str | Path, resume: bool, overwrite: bool) -> list[str]:
    """Refuse a folder that holds a run unless ``resume`` or ``overwrite``; with ``overwrite`` remove the
    run's files (only those a run writes, see ``RUN_ENTRIES``) and return their names."""
    root = Path(run_dir)
    found = existing_run_entries(root)
    if not found or resume:
        return []
    if not overwrite:
        raise RunDirError(f"{root} already holds a run ({', '.join(found[:4])}{' ...' if len(found) > 4 else ''}); "
                          "continue it with --resume auto, replace it with --overwrite, or choose another --out")
    import shutil

    for name in found:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found


def _process_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused PID from the holder."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


class RunLock:
    """``RUN_DIR/.lock`` held while this process writes to the folder (see the module docstring)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def _describe(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "start_ticks": _process_start_ticks(os.getpid())}

    def _read_holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _holder_is_gone(self, holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False  # cannot tell for another machine: refuse
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return True  # an empty or torn lock file (killed while writing it)
        if not _pid_alive(pid):
            return True
        ticks = holder.get("start_ticks")
        now = _process_start_ticks(pid)
        return ticks is not None and now is not None and ticks != now  # the PID was reused

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunDirError` naming the holder; take over a stale lock with a warning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                    self.held = True  # already ours (train() called twice in one process)
                    return
                if not self._holder_is_gone(holder):
                    raise RunDirError(
                        f"{self.path.parent} is in use by another run (PID {holder.get('pid', '?')} on host "
                        f"{holder.get('host', '?')}, since {holder.get('started', '?')}); wait for it to finish, "
                        f"choose another --out, or delete {self.path} if that run no longer exists") from None
                warnings.warn(f"taking over the lock of {self.path.parent} from PID {holder.get('pid', '?')} on "
                              f"{holder.get('host', '?')}, which no longer runs")
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self._describe()) + "\n")
            self.held = True
            return
        raise RunDirError(f"could not take the lock {self.path} (another run keeps taking it)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = self._read_holder()
        if holder.get("pid") == os.getpid():
            try:
                self.path.unlink()
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_orphaned_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete temporary files a killed writer left in ``run_dir`` and ``run_dir/checkpoints`` (call it while
    holding the :class:`RunLock`: no other process writes there, so every temporary is an orphan, whatever
    process id its name holds); returns what was removed."""
    from ..weights.files import remove_orphaned_temporaries as remove_in_folder

    root = Path(run_dir)
    removed: list[Path] = []
    for folder in (root, root / "checkpoints"):
        removed += remove_in_folder(folder, max_age_s=0.0)
        for pattern in _LEGACY_TEMPORARY_PATTERNS:
            for path in folder.glob(pattern) if folder.is_dir() else ():
                try:
                    path.unlink()
                    removed.append(path)
                except OSError:
                    pass
    return removed


def ensure_writable(folder: str | Path, what: str = "--out") -> Path:
    """Create ``folder`` (and parents) and write / delete a probe file in it; raise :class:`RunDirError`
    with one line when that fails (read-only filesystem, no permission, full disk, a file in the way)."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"{what} {path} is not writable: {e.strerror or e}") from None
    return path


_STORAGE_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EROFS: "the filesystem is read-only",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EIO: "an input/output error",
}


def find_os_error(error: BaseException) -> OSError | None:
    """The OSError in ``error``'s cause / context chain (torch.save wraps the writer's OSError in a
    RuntimeError), or None."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def storage_error_text(error: BaseException, target: str | Path, last_good: str | Path | None) -> str:
    """One line: what could not be written, why, and which checkpoint is the last good one."""
    os_error = find_os_error(error)
    if os_error is not None:
        reason = _STORAGE_HINTS.get(os_error.errno, os_error.strerror or str(os_error))
        detail = f"{reason} ([Errno {os_error.errno}] {errno.errorcode.get(os_error.errno or 0, '')})"
    else:
        detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    return (f"could not write {target}: {detail}; {where}. Free space or fix the folder, then continue with "
            "--resume auto")
