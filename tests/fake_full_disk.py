"""Run the console script on a "disk" that fills up (or turns read-only) after the first checkpoint.

    python fake_full_disk.py ENOSPC|EROFS -- train --data ... --out ...

Every ``torch.save`` into a checkpoint file after the first one gets a file object whose writes fail with the
given errno after 64 KiB (ENOSPC: part of the file is on disk, as on a real full disk) or at once (EROFS), so
torch sees the same ``OSError`` a real filesystem raises and wraps it the same way.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

import torch


class _FillingFile:
    def __init__(self, target: Any, code: int, allowed: int) -> None:
        self._target = target
        self._code = code
        self._left = allowed

    def write(self, data: Any) -> int:
        size = len(memoryview(data).cast("B"))
        if size > self._left:
            raise OSError(self._code, os.strerror(self._code))
        self._left -= size
        return self._target.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


def install(code: int) -> None:
    real_save = torch.save
    seen = {"checkpoints": 0}

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        name = os.path.basename(str(getattr(f, "name", f)))
        if "checkpoint_" in name:
            seen["checkpoints"] += 1
            if seen["checkpoints"] > 1:
                allowed = 64 * 1024 if code == errno.ENOSPC else 0
                if not hasattr(f, "write"):
                    with open(f, "wb") as handle:
                        return real_save(obj, _FillingFile(handle, code, allowed), *args, **kwargs)
                return real_save(obj, _FillingFile(f, code, allowed), *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


if __name__ == "__main__":
    install(getattr(errno, sys.argv[1]))
    assert sys.argv[2] == "--"
    from focus_detr.cli.main import main

    sys.exit(main(sys.argv[3:]))
