"""Process pools that use the machine: how many workers, and how each one starts."""

from __future__ import annotations

import os
import signal
import sys


def default_workers() -> int:
    """The cores this process may use (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def die_with_parent() -> None:
    """Initializer of a process-pool worker: it dies with the process that started it (a killed build or ingest
    leaves no workers behind, still writing)."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def pool_worker_setup() -> None:
    """Initializer of a decoding pool's worker: die_with_parent, and OpenCV keeps to one thread (a worker is one
    core's share)."""
    import cv2

    cv2.setNumThreads(1)
    die_with_parent()
