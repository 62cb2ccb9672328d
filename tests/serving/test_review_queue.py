"""The review queue on real SQLite and real file systems: a label survives a full disk, undo, and the whole queue.

The disk-full cases write to a real tmpfs of a few kilobytes (mounting needs root, which CI and the dev machines
have); a failed write must leave the item pending and retryable, with no image and no temporary file behind.
"""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionflow.serving.review import ReviewQueue

CLASSES = ["cat", "dog", "fox"]


def _png(seed: int, size: int = 48) -> bytes:
    """Noise compresses badly, so the PNG is a few kilobytes: larger than the free space the tests leave."""
    arr = np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _add(queue: ReviewQueue, seed: int, confidence: float = 0.4) -> str:
    return queue.add(
        _png(seed), model_version="1", predicted="cat", confidence=confidence, probabilities={c: 1 / 3 for c in CLASSES}
    )


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: the reviewed-images folder on a disk that can really fill up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def _fill(disk: Path, leave: int) -> Path:
    """Fill the disk until about `leave` bytes are free (tmpfs counts whole pages)."""
    filler = disk / ".filler"
    with filler.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:  # ENOSPC: full
            pass
    os.truncate(filler, max(filler.stat().st_size - leave, 0))  # free (at least) `leave` bytes again
    return filler


@pytest.mark.parametrize("leave", [0, 100, 2000])  # fails at the first byte, early, or part way through the PNG
def test_a_label_on_a_full_disk_leaves_the_item_pending_and_retryable(tmp_path, small_disk, leave):
    queue = ReviewQueue(tmp_path / "review", small_disk)
    item = _add(queue, seed=leave)
    (small_disk / "dog").mkdir()
    filler = _fill(small_disk, leave)

    with pytest.raises(OSError):
        queue.review(item, "dog", CLASSES)
    assert [i["id"] for i in queue.pending()] == [item], "the item must stay pending"
    assert list((small_disk / "dog").iterdir()) == [], "no empty, partial or temporary image may be left"

    filler.unlink()  # space again: the same label now goes through
    saved = queue.review(item, "dog", CLASSES)
    assert Path(saved["saved_as"]).read_bytes() == (tmp_path / "review/images" / f"{item}.png").read_bytes()
    assert queue.pending() == []


def test_a_failure_marking_the_item_removes_the_image_it_wrote(tmp_path):
    queue = ReviewQueue(tmp_path / "review", tmp_path / "reviewed")
    item = _add(queue, seed=1)
    with sqlite3.connect(queue.db) as c:  # the database refuses the mark (a real SQLite failure, not a mock)
        c.execute("CREATE TRIGGER refuse BEFORE UPDATE ON items BEGIN SELECT RAISE(ABORT, 'disk I/O'); END")
    with pytest.raises(sqlite3.Error):
        queue.review(item, "fox", CLASSES)
    assert [i["id"] for i in queue.pending()] == [item]
    assert not any(f.is_file() for f in (tmp_path / "reviewed").rglob("*"))


def test_a_retry_with_another_label_leaves_one_image(tmp_path):
    """A process killed between the image write and the mark leaves an image for a pending item; the next label
    of that item (any class) replaces it, so the item is never training data twice."""
    queue = ReviewQueue(tmp_path / "review", tmp_path / "reviewed")
    item = _add(queue, seed=2)
    stale = tmp_path / "reviewed/cat" / f"review_{item}.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a crash")
    queue.review(item, "dog", CLASSES)
    assert sorted(f.relative_to(tmp_path / "reviewed").as_posix() for f in (tmp_path / "reviewed").rglob("*.png")) == [
        f"dog/review_{item}.png"
    ]


def test_undo_puts_the_item_back_and_removes_its_image(tmp_path):
    queue = ReviewQueue(tmp_path / "review", tmp_path / "reviewed")
    items = [_add(queue, seed=s, confidence=0.3 + s / 100) for s in range(3)]
    saved = Path(queue.review(items[1], "fox", CLASSES)["saved_as"])
    assert saved.is_file() and items[1] not in [i["id"] for i in queue.pending()]

    back = queue.undo(items[1])
    assert back["id"] == items[1] and back["label"] == "fox"
    assert not saved.exists()
    assert [i["id"] for i in queue.pending()] == items, "back in its place in the queue"
    for again in (items[1], items[0], "not-an-id", "../x"):  # pending or unknown: nothing to undo
        with pytest.raises(KeyError):
            queue.undo(again)
    queue.review(items[1], "dog", CLASSES)  # and it can be labelled again
    assert (tmp_path / "reviewed/dog" / f"review_{items[1]}.png").is_file()


def test_a_failed_undo_keeps_the_label_and_its_image(tmp_path):
    queue = ReviewQueue(tmp_path / "review", tmp_path / "reviewed")
    item = _add(queue, seed=3)
    saved = Path(queue.review(item, "cat", CLASSES)["saved_as"])
    with sqlite3.connect(queue.db) as c:
        c.execute("CREATE TRIGGER refuse BEFORE UPDATE ON items BEGIN SELECT RAISE(ABORT, 'disk I/O'); END")
    with pytest.raises(sqlite3.Error):
        queue.undo(item)
    assert saved.is_file() and queue.pending() == []
    assert [f.name for f in saved.parent.iterdir()] == [saved.name]


@pytest.mark.parametrize("n", [0, 1, 49, 50, 51, 137])
def test_the_whole_queue_is_reachable_and_counted(tmp_path, n):
    queue = ReviewQueue(tmp_path / "review", tmp_path / "reviewed")
    rng = np.random.default_rng(n)
    ids = [
        queue.add(b"png", model_version="1", predicted="cat", confidence=float(c), probabilities={})
        for c in rng.choice([0.2, 0.35, 0.5], size=n)
    ]  # ties in confidence too
    assert queue.count() == n
    seen: list[str] = []
    while page := queue.pending(limit=50):  # what the page does: label what it has, then ask again
        seen += [i["id"] for i in page]
        for i in page:
            queue.review(i["id"], "cat", CLASSES)
    assert sorted(seen) == sorted(ids) and len(seen) == n and queue.count() == 0


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".", ".hidden", "a\\b", "/abs"])
def test_a_class_name_that_is_not_one_folder_name_is_refused(tmp_path, name):
    """The label is the folder under reviewed_dir: a model card's class name must not write outside it."""
    queue = ReviewQueue(tmp_path / "review", tmp_path / "out" / "reviewed")
    item = _add(queue, seed=5)
    with pytest.raises(ValueError, match="folder name"):
        queue.review(item, name, [*CLASSES, name])
    assert [i["id"] for i in queue.pending()] == [item]
    assert not any(f.is_file() for f in (tmp_path / "out").rglob("*"))


def test_a_budget_caps_the_offer_per_window_most_useful_first(tmp_path):
    """Every candidate is kept, but a person is offered the budget (less what was labelled in the window), the
    least certain first and spread over the embedding space; older candidates fall out of the window's offer."""
    queue = ReviewQueue(tmp_path / "review", tmp_path / "reviewed", budget=3, window_hours=1)
    rng = np.random.default_rng(0)
    ids = []
    for k in range(12):  # four clusters of three; margins grow with k, so item 0 is the least certain
        top = 0.4 + 0.01 * k
        emb = np.eye(4, dtype=np.float32)[k % 4] + 0.01 * rng.standard_normal(4).astype(np.float32)
        ids.append(
            queue.add(
                b"png",
                model_version="1",
                predicted="cat",
                confidence=top,
                probabilities={"cat": top, "dog": top - 0.01 * (k + 1), "fox": 1 - 2 * top + 0.01 * (k + 1)},
                embedding=emb,
            )
        )
    offer = [i["id"] for i in queue.pending()]
    assert queue.count() == 3 and offer[0] == ids[0] and "embedding" not in queue.pending()[0]
    assert len({ids.index(i) % 4 for i in offer}) == 3  # three different clusters, not three near-copies
    queue.review(offer[0], "cat", CLASSES)
    assert queue.count() == 2 and [i["id"] for i in queue.pending()][0] != offer[0]
    with sqlite3.connect(queue.db) as c:  # the window has passed for every candidate: none is offered, all kept
        c.execute("UPDATE items SET created = created - 7200")
    assert queue.pending() == [] and queue.count() == 0
    assert ReviewQueue(tmp_path / "review", tmp_path / "reviewed").count() == 11


def test_a_budget_of_zero_offers_nothing_and_keeps_every_candidate(tmp_path):
    queue = ReviewQueue(tmp_path / "review", tmp_path / "reviewed", budget=0)
    _add(queue, 1)
    assert queue.pending() == [] and queue.count() == 0
    assert len(ReviewQueue(tmp_path / "review", tmp_path / "reviewed").pending()) == 1
