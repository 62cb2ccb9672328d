"""Ingest and validate in the shard layout: reviewed images append-only, quarantine per image, loose <-> shards
conversion, and export back out then ingest again giving the same content."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from tests.helpers import make_folder_dataset, png
from visionflow.config import ValidateParams
from visionflow.data import export, shards
from visionflow.data.ingest import ingest
from visionflow.data.validate import read_manifest, validate

SHARD = 8 * 1024  # a few images per shard


def _ingest(src: Path, raw: Path, shard_bytes: int | None = SHARD, reviewed: Path | None = None):
    return ingest(
        source=str(src),
        raw_dir=raw,
        max_images=None,
        seed=0,
        cache_dir=raw.parent / "external",
        reviewed_dir=reviewed,
        shard_bytes=shard_bytes,
    )


def _state(raw: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and inode: a file rewritten in place or replaced shows up."""
    return {p.name: (p.read_bytes(), p.stat().st_ino) for p in sorted(raw.iterdir())}


def _loose_version(folder: Path) -> str:
    """content_version of a loose folder, from its files."""
    files = [f for f in folder.glob("*/*") if f.is_file()]
    return shards.content_version(
        shards.Member(f"{f.parent.name}/{f.name}", "", 0, 0, hashlib.sha256(f.read_bytes()).hexdigest()) for f in files
    )


@pytest.fixture
def source(tmp_path):
    return make_folder_dataset(tmp_path / "images", per_class=8)


def _review(reviewed: Path, label: str, names: range) -> None:
    (reviewed / label).mkdir(parents=True, exist_ok=True)
    for i in names:
        (reviewed / label / f"r{i}.png").write_bytes(png(seed=100 + i))


def test_reviewed_images_go_into_one_new_shard_and_leave_every_existing_shard_unchanged(tmp_path, source):
    raw, reviewed = tmp_path / "data/raw", tmp_path / "data/reviewed"
    _review(reviewed, "cat", range(3))
    res = _ingest(source, raw, reviewed=reviewed)
    assert res.n_reviewed == 3 and res.n_images == 27
    before = _state(raw)
    _review(reviewed, "dog", range(3, 5))
    res = _ingest(source, raw, reviewed=reviewed)
    assert res.skipped and res.n_reviewed == 5
    after = _state(raw)
    assert {k: after[k] for k in before} == before  # same bytes, same files
    new = sorted(set(after) - set(before))
    assert len(new) == 2 and new[0].endswith(".index.csv") and new[1].endswith(".tar")
    added = shards.read_index(raw)
    assert {m.member for m in added if m.shard == new[1]} == {"dog/reviewed__r3.png", "dog/reviewed__r4.png"}
    assert shards.verify(raw) == []


def test_removing_a_reviewed_image_rewrites_only_its_shard(tmp_path, source):
    raw, reviewed = tmp_path / "data/raw", tmp_path / "data/reviewed"
    _review(reviewed, "cat", range(3))
    _ingest(source, raw, reviewed=reviewed)
    _review(reviewed, "dog", range(3, 5))
    _ingest(source, raw, reviewed=reviewed)
    members = shards.read_index(raw)
    gone = next(m for m in members if m.member == "dog/reviewed__r3.png")
    before = _state(raw)
    (reviewed / "dog" / "r3.png").unlink()
    _ingest(source, raw, reviewed=reviewed)
    after = _state(raw)
    its_files = {gone.shard, shards.index_path(Path(gone.shard)).name}
    assert {k: v for k, v in before.items() if k not in its_files} == {k: v for k, v in after.items() if k in before}
    assert not its_files & set(after)
    (rewritten,) = {m.shard for m in shards.read_index(raw)} - {m.shard for m in members}
    assert [m.member for m in shards.read_index(raw) if m.shard == rewritten] == ["dog/reviewed__r4.png"]
    assert "dog/reviewed__r3.png" not in {m.member for m in shards.read_index(raw)}


def test_a_corrupt_image_in_a_shard_is_quarantined_with_its_reason_and_the_shard_is_untouched(tmp_path, source):
    (source / "fox" / "broken.png").write_bytes(b"GIF89a, or so it says")  # not an image
    raw = tmp_path / "data/raw"
    _ingest(source, raw)
    before = _state(raw)
    cfg = ValidateParams(
        min_images_per_class=2, max_quarantine_fraction=0.5, quarantine_dir=tmp_path / "q", report_dir=tmp_path / "r"
    )
    res = validate(raw_dir=raw, cfg=cfg, manifest_path=tmp_path / "manifest.csv", workers=1)
    assert res.n_images == 25 and res.n_accepted == 24 and res.n_quarantined == 1
    reasons = read_manifest(tmp_path / "q" / "reasons.csv")
    (row,) = reasons.itertuples()
    assert row.original_path.endswith(".tar#fox/broken.png") and row.reason == "not_an_image"
    assert (tmp_path / "q" / "fox" / "broken.png").read_bytes() == (source / "fox" / "broken.png").read_bytes()
    accepted = read_manifest(tmp_path / "manifest.csv")
    assert all(".tar#" in p for p in accepted["path"]) and "fox/broken.png" not in set(accepted["path"])
    assert _state(raw) == before


def test_ingest_converts_loose_to_shards_and_back_with_the_same_content(tmp_path, source):
    raw = tmp_path / "data/raw"
    assert not _ingest(source, raw, shard_bytes=None).skipped
    loose = {p.relative_to(raw).as_posix(): p.read_bytes() for p in raw.glob("*/*")}
    version = _loose_version(raw)
    assert not _ingest(source, raw).skipped  # a layout change converts data/raw
    assert not any(p.is_dir() for p in raw.iterdir())
    assert shards.content_version(shards.read_index(raw)) == version
    assert _ingest(source, raw).skipped
    assert not _ingest(source, raw, shard_bytes=None).skipped
    assert {p.relative_to(raw).as_posix(): p.read_bytes() for p in raw.glob("*/*")} == loose
    assert not shards.is_sharded(raw)


def test_export_then_ingest_of_the_exported_folder_gives_the_same_content_version(tmp_path, source):
    raw = tmp_path / "data/raw"
    _ingest(source, raw)
    version = shards.content_version(shards.read_index(raw))
    assert export.export(raw, tmp_path / "exported") == (24, 24)
    again = tmp_path / "again/raw"
    _ingest(tmp_path / "exported", again, shard_bytes=3 * SHARD)  # other boundaries, same images
    assert shards.content_version(shards.read_index(again)) == version
    assert _loose_version(tmp_path / "exported") == version
    shutil.rmtree(tmp_path / "exported")
    _ingest(source, raw, shard_bytes=None)  # and from the loose layout: the files are copied
    assert export.export(raw, tmp_path / "exported") == (24, 24)
    assert _loose_version(tmp_path / "exported") == version
