"""One holder at a time, with the holder named: an OS file lock the kernel drops when its holder dies (so a killed
run never blocks the next) and, beside it, the holder's pid for the refusal to name. The pid file is written after
and removed before the lock changes hands, so it always names the holder."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from itk.runtime.protocol import UserError


@contextmanager
def held(lock_path: Path, refusal: Callable[[str], UserError]) -> Iterator[None]:
    """Hold `lock_path` (its folder is made); when another process holds it, raise `refusal(holder)` at once, where
    holder reads "pid N" (or "pid not yet recorded")."""
    from filelock import FileLock, Timeout

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock, owner = FileLock(lock_path, timeout=0), lock_path.with_name(lock_path.name + ".pid")
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = f"pid {int(owner.read_text().strip())}"
        except (OSError, ValueError):
            holder = "pid not yet recorded"
        raise refusal(holder) from None
    try:
        owner.write_text(f"{os.getpid()}\n", encoding="utf-8")
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()
