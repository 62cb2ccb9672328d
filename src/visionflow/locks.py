"""The one cross-process lock of the project: an exclusive flock(2) on a lock file.

Used wherever two processes on one machine (or on a shared filesystem) must take turns: the retraining ledger,
a promotion without a Prefect server, the image cache build. The kernel drops the lock of a process that dies, so
a crash never leaves a stale lock behind, and the lock file itself may stay.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from visionflow.errors import VisionflowError

POLL_S = 0.05  # how often a waiter with a deadline retries


@contextlib.contextmanager
def file_lock(path: Path, *, timeout_s: float | None = None, holder: str = "another process") -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created, with its folder, when missing) for the block.

    Waits for ever by default; with `timeout_s`, at most that long, then a VisionflowError saying that `holder`
    held the lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        _acquire(fh, timeout_s, holder)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _acquire(fh: IO[str], timeout_s: float | None, holder: str) -> None:
    if timeout_s is None:
        fcntl.flock(fh, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise VisionflowError(f"{holder} held the lock for over {timeout_s}s") from None
            time.sleep(POLL_S)
