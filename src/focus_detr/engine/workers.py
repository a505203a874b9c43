"""DataLoader workers leave shutdown to the main process.

A terminal's Ctrl-C and a scheduler's SIGTERM / SIGUSR1 (SLURM at the time limit, ``scancel``) go to every
process of the job's process group, DataLoader workers included. A worker that dies of it makes the main
process fail with "DataLoader worker ... exited unexpectedly" before it can write a checkpoint. Workers
therefore ignore these signals; the main process decides when to stop and then shuts its workers down
through the DataLoader (a worker whose main process disappears exits by itself: PyTorch's workers watch
their parent).
"""

from __future__ import annotations

import signal

JOB_SIGNALS: tuple[str, ...] = ("SIGINT", "SIGTERM", "SIGUSR1")


def ignore_job_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` for DataLoaders: ignore SIGINT, SIGTERM and SIGUSR1 in this worker process."""
    for name in JOB_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
