"""Stopping a training run on a signal: SIGTERM, SIGUSR1 and SIGINT finish the current step, a second one exits.

:class:`StopRequest` records what the handlers saw; the training loop reads it after every step (and after
an evaluation) and agrees with the other DDP ranks on it through one collective, so every rank stops at the
same iteration (engine/train.py). DataLoader workers ignore the signals (engine/workers.py).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .run_dir import RunLock


class StopRequest:
    """What the signal handlers saw. The first SIGTERM / SIGUSR1 / SIGINT is recorded (the loop stops at the
    end of the current step); a second one exits the process at once. Under torchrun the agent forwards the
    job's signal to every rank right after the job's own copy arrived: that repeat does not count."""

    AGENT_REPEAT_S = 5.0

    def __init__(self, lock: RunLock | None = None) -> None:
        self.signals: list[int] = []
        self.first_at = 0.0
        self.pid = os.getpid()
        self.lock = lock
        self.last_checkpoint: Path | None = None  # named in the second signal's message
        self.under_agent = "TORCHELASTIC_RUN_ID" in os.environ

    def __bool__(self) -> bool:
        return bool(self.signals)

    @property
    def signal(self) -> int | None:
        return self.signals[0] if self.signals else None

    def on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:
            return  # a DataLoader worker forked before its worker_init_fn ran: the main process decides
        now = time.monotonic()
        if not self.signals:
            self.signals.append(signum)
            self.first_at = now
            return
        if self.under_agent and signum == self.signals[0] and now - self.first_at < self.AGENT_REPEAT_S:
            return
        where = (f"the last complete checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                 else "no checkpoint was written yet")
        try:
            sys.stderr.write(f"second signal ({signal_name(signum)}): exiting at once without a new checkpoint; "
                             f"{where}\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - nothing may stop the exit
            pass
        if self.lock is not None:
            self.lock.release()
        os._exit(128 + signum)


def signal_name(signum: int | None) -> str:
    try:
        return signal.Signals(signum).name if signum is not None else "?"
    except ValueError:
        return str(signum)


def install_stop_handlers(on_signal: Any) -> dict[int, Any]:
    """Route SIGTERM / SIGUSR1 / SIGINT to ``on_signal`` instead of dying (main thread only; returns the old
    handlers, for :func:`restore_handlers`)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, on_signal)
    return previous


def restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
