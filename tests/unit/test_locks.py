"""The one cross-process lock (visionflow.locks.file_lock) and the promotion lock built on it."""

from __future__ import annotations

import threading
import time

import pytest

from visionflow.errors import VisionflowError
from visionflow.locks import file_lock
from visionflow.registry.store import promotion_lock


def test_a_held_lock_times_out_with_the_holder_named_and_is_free_after_release(tmp_path):
    path = tmp_path / "sub" / "x.lock"  # the folder is created
    with file_lock(path):
        # a second open file description, as another process would have: flock makes it wait
        with pytest.raises(VisionflowError, match="another process held the lock for over 0.1s"):
            with file_lock(path, timeout_s=0.1):
                pass
    with file_lock(path, timeout_s=0.1):
        assert path.is_file()


def test_a_waiter_gets_the_lock_when_the_holder_lets_go(tmp_path):
    path, order = tmp_path / "x.lock", []

    def hold() -> None:
        with file_lock(path):
            order.append("held")
            time.sleep(0.3)
            order.append("released")

    holder = threading.Thread(target=hold)
    holder.start()
    while not order:
        time.sleep(0.01)
    with file_lock(path, timeout_s=10):
        order.append("acquired")
    holder.join()
    assert order == ["held", "released", "acquired"]


def test_a_local_promotion_waits_for_the_other_and_says_who_held_it(tmp_path):
    with promotion_lock(tmp_path, "m"):
        with pytest.raises(VisionflowError, match="another promotion of m held the lock for over 0.1s"):
            with promotion_lock(tmp_path, "m", timeout_s=0.1):
                pass
        with promotion_lock(tmp_path, "other", timeout_s=0.1):  # a lock per model
            pass
    assert (tmp_path / "promote-m.lock").is_file()
