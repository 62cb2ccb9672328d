"""export-data: write data/raw's images back out as <out>/<class>/<file>, from shards or the loose layout.

The loose layout stays what users browse and bring; a sharded data/raw (visionflow.data.shards) is turned back
into it here. Export never overwrites or mixes in someone's files, and a second run into the same folder writes
nothing.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from visionflow.data.imageio import sha256_file
from visionflow.data.shards import ShardError, is_sharded, read_index, read_member, restore_hint
from visionflow.errors import DataError


@dataclass(frozen=True)
class _Stored:
    """An image to export: its size, and how to get its sha256 and its bytes."""

    size: int
    sha256: Callable[[], str]
    read: Callable[[], bytes]


def _stored_images(raw_dir: Path) -> dict[str, _Stored]:
    """member (<class>/<file>) -> the image, from the shards' indexes or the loose layout's files."""
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir} does not exist: run `visionflow ingest` first")
    if is_sharded(raw_dir):
        return {
            m.member: _Stored(
                m.size, functools.partial(str, m.sha256), functools.partial(read_member, raw_dir / m.shard, m.member)
            )
            for m in read_index(raw_dir)
        }
    files = [f for d in sorted(raw_dir.iterdir()) if d.is_dir() for f in sorted(d.iterdir()) if f.is_file()]
    return {
        f"{f.parent.name}/{f.name}": _Stored(f.stat().st_size, functools.partial(sha256_file, f), f.read_bytes)
        for f in files
    }


def _to_write(out_dir: Path, images: dict[str, _Stored]) -> list[str]:
    """The members out_dir does not hold yet. Refuses, before anything is written, an out_dir holding any other
    file, or a file of the same name with other bytes: export never overwrites or mixes in someone's files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} is a file: export into a folder")
    other = []
    for folder, _dirs, names in os.walk(out_dir):
        for name in names:
            rel = (Path(folder) / name).relative_to(out_dir).as_posix()
            if rel not in images and not name.startswith(".partial-"):  # .partial-: an interrupted export's
                other.append(rel)
    todo = []
    for member, img in images.items():
        dest = out_dir / member
        if not (dest.exists() or dest.is_symlink()):
            todo.append(member)
        elif dest.is_symlink() or not dest.is_file() or dest.stat().st_size != img.size:
            other.append(member)
        elif sha256_file(dest) != img.sha256():
            other.append(member)
    if other:
        raise DataError(
            f"{out_dir} holds {len(other)} file(s) that are not these images, e.g. {sorted(other)[0]!r}: "
            "export into an empty folder (or one an export of this same data wrote); nothing was written"
        )
    return todo


def export(raw_dir: Path, out_dir: Path, progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Write every image of raw_dir (shards, or the loose layout's files) back out as out_dir/<class>/<file>:
    (images written, images in raw_dir). An out_dir that already holds exactly these images is left as it is, so
    a second export writes nothing; each file appears whole (written aside, then renamed)."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    images = _stored_images(raw_dir)
    todo = _to_write(out_dir, images)
    for i, member in enumerate(todo, 1):
        dest = out_dir / member
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(".partial-" + dest.name)
        try:
            tmp.write_bytes(images[member].read())
        except ShardError as exc:  # a damaged shard: the images written so far are whole, the shard is restorable
            tmp.unlink(missing_ok=True)
            raise DataError(f"{exc}; {i - 1} image(s) were exported before it. {restore_hint(raw_dir)}") from None
        os.replace(tmp, dest)
        if progress and (i % 1000 == 0 or i == len(todo)):
            progress(i, len(todo))
    return len(todo), len(images)
