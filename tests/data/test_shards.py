"""The shard format (visionflow.data.shards): deterministic content-addressed packing, shard boundaries, member names
an index may not hold, the per-shard check validate runs, and export back to the loose layout."""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from visionflow.config import ValidateParams
from visionflow.data import export, shards
from visionflow.data.imageio import DecodeRules
from visionflow.data.validate import build_manifest, list_raw
from visionflow.errors import DataError


def _files(root: Path, n: int = 12, size: int = 300) -> list[tuple[str, Path]]:
    """n distinct files of `size` bytes as (member, path) pairs over three classes."""
    items = []
    for i in range(n):
        label = ("cat", "dog", "fox")[i % 3]
        f = root / label / f"{label}_{i:03d}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(hashlib.sha256(str(i).encode()).digest() * (size // 32) + bytes(size % 32))
        items.append((f"{label}/{f.name}", f))
    return items


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_the_same_files_give_the_same_shards_byte_for_byte_in_any_order(tmp_path):
    items = _files(tmp_path / "src")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    shards.pack(tmp_path / "a", items, 4096)
    shards.pack(tmp_path / "b", list(reversed(items)), 4096)
    a, b = _listing(tmp_path / "a"), _listing(tmp_path / "b")
    assert len(a) > 2 and a == b  # names and bytes, shards and indexes
    assert not any(n.startswith(".partial") for n in a)


def test_a_shard_is_named_by_the_sha256_of_its_bytes_and_opens_as_a_plain_tar(tmp_path):
    items = _files(tmp_path / "src", n=5)
    out = tmp_path / "out"
    out.mkdir()
    members = shards.pack(out, items, 1 << 20)
    (tar,) = out.glob("*.tar")
    assert tar.name == f"shard-{hashlib.sha256(tar.read_bytes()).hexdigest()[:16]}.tar"
    with tarfile.open(tar) as tf:
        assert tf.getnames() == sorted(m for m, _ in items)
        for m in members:  # index offsets point at the member's bytes, and its sha256 is theirs
            data = tf.extractfile(m.member).read()
            assert data == dict(items)[m.member].read_bytes() == shards.read_member(tar, m.member)
            assert hashlib.sha256(data).hexdigest() == m.sha256
    assert shards.verify(out) == []


def test_pack_fills_each_shard_up_to_the_target_and_no_further(tmp_path):
    items = _files(tmp_path / "src", n=10, size=512)  # each member costs a 512-byte header + one data block
    for target, per_shard in ((3 * 1024, 3), (3 * 1024 - 1, 2), (1024, 1), (100, 1)):
        out = tmp_path / f"t{target}"
        out.mkdir()
        members = shards.pack(out, items, target)
        sizes = sorted(sum(1 for m in members if m.shard == s) for s in {m.shard for m in members})
        assert max(sizes) == per_shard and sum(sizes) == 10, target  # a member over the target gets its own shard
        assert len(sizes) == -(-10 // per_shard)


def test_content_version_depends_on_the_images_not_the_shard_boundaries(tmp_path):
    items = _files(tmp_path / "src")
    versions, names = set(), set()
    for target in (1, 4096, 1 << 20):
        out = tmp_path / str(target)
        out.mkdir()
        shards.pack(out, items, target)
        versions.add(shards.content_version(shards.read_index(out)))
        names.add(frozenset(p.name for p in out.iterdir()))
    assert len(versions) == 1 and len(names) == 3
    items[0][1].write_bytes(b"changed")
    out = tmp_path / "changed"
    out.mkdir()
    shards.pack(out, items, 4096)
    assert shards.content_version(shards.read_index(out)) not in versions


HOSTILE = ["../x", "cat/../../x", "/etc/passwd", "/abs", "cat\\..\\x", "cat/a\0.png", "", "cat",
           "cat/", "/cat", "cat//a.png", "cat/a/b.png", "./a.png", "cat/.", "cat/.."]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_member_names_are_refused_in_an_index_and_when_writing(tmp_path, name):
    good = _files(tmp_path / "src", n=2)
    out = tmp_path / "out"
    out.mkdir()
    shards.pack(out, good, 1 << 20)
    (idx,) = out.glob("*.index.csv")
    rows = idx.read_text().splitlines()
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([name, *rows[1].split(",")[1:]])
    idx.write_text("\n".join([rows[0], buf.getvalue().rstrip("\n"), rows[2]]) + "\n")
    with pytest.raises(shards.ShardError, match=f"shard index {idx.name}: .*is not <class>/<file>"):
        shards.read_index(out)
    problems = shards.verify(out)
    assert len(problems) == 1 and idx.name in problems[0] and "\n" not in problems[0]
    with pytest.raises(DataError, match=r"No image is lost: `dvc checkout --force") as exc:
        list_raw(out)
    assert "\n" not in str(exc.value)
    with pytest.raises(shards.ShardError, match="is not <class>/<file>"):
        shards.write_shard(tmp_path, [(name, b"x")])
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob(".partial*"))


def test_a_malformed_index_is_a_shard_error_naming_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shards.pack(out, _files(tmp_path / "src", n=2), 1 << 20)
    (idx,) = out.glob("*.index.csv")
    bad_rows = (
        "cat/a.png,notanumber,3,ab",
        f"cat/a.png,-512,3,{'a' * 64}",
        f"cat/a.png,512,-3,{'a' * 64}",
        "cat/a.png,0,3,ab",
    )
    for text in ("member,offset\n", *(f"member,offset,size,sha256\n{row}\n" for row in bad_rows), "\0\0\0"):
        idx.write_text(text)
        with pytest.raises(shards.ShardError, match=idx.name):
            shards.read_index(out)


def _damage(raw: Path, case: str) -> None:
    tars = sorted(raw.glob("*.tar"))
    if case == "truncated":
        tars[0].write_bytes(tars[0].read_bytes()[:1500])
    elif case == "flipped byte":
        data = bytearray(tars[0].read_bytes())
        data[700] ^= 1  # inside the first member's data
        tars[0].write_bytes(bytes(data))
    elif case == "missing index":
        shards.index_path(tars[0]).unlink()
    elif case == "every index missing":
        for t in tars:
            shards.index_path(t).unlink()
    elif case == "missing shard":
        tars[0].unlink()
    elif case == "index edited":
        idx = shards.index_path(tars[0])
        sha = idx.read_text().splitlines()[1].split(",")[3]
        idx.write_text(idx.read_text().replace(sha, "0" * 64))
    elif case == "class folder beside shards":
        (raw / "cat").mkdir()
        (raw / "cat" / "new.png").write_bytes(b"x")


DAMAGE = {
    "truncated": "where its index says",
    "flipped byte": "does not match its sha256 in the index",
    "missing index": "has no index",
    "every index missing": "has no index",
    "missing shard": "is missing",
    "index edited": "does not match its sha256 in the index",
    "class folder beside shards": "holds both shards and class folders (cat): move the folders out",
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_shards_stop_validation_with_one_line_saying_how_to_restore(tmp_path, case):
    raw = tmp_path / "raw"
    raw.mkdir()
    shards.pack(raw, _files(tmp_path / "src"), 4096)
    assert len(list_raw(raw)) == 12
    _damage(raw, case)
    with pytest.raises(DataError) as exc:
        # a stat catches what changes a shard's size; changed bytes are caught as each image is read
        build_manifest(raw, DecodeRules.from_params(ValidateParams()), workers=1)
    msg = str(exc.value)
    assert DAMAGE[case] in msg and "\n" not in msg
    assert f"`dvc checkout --force {raw}`" in msg and "`visionflow ingest --force`" in msg


def test_export_writes_the_loose_layout_and_a_second_run_writes_nothing(tmp_path):
    items = _files(tmp_path / "src")
    raw = tmp_path / "raw"
    raw.mkdir()
    shards.pack(raw, items, 4096)
    seen = []
    assert export.export(raw, tmp_path / "out", progress=lambda d, t: seen.append((d, t))) == (12, 12)
    assert seen[-1] == (12, 12)
    exported = {p.relative_to(tmp_path / "out").as_posix(): p.read_bytes() for p in (tmp_path / "out").rglob("*.*")}
    assert exported == {m: p.read_bytes() for m, p in items}
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    assert export.export(raw, tmp_path / "out") == (0, 12)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == before
    # the loose layout exports too: its files are copied
    assert export.export(tmp_path / "src", tmp_path / "out2") == (12, 12)
    assert export.export(tmp_path / "src", tmp_path / "out") == (0, 12)


@pytest.mark.parametrize("intruder", ["extra file", "different bytes", "folder at a file's name", "symlink"])
def test_export_refuses_a_folder_holding_other_files_before_writing_anything(tmp_path, intruder):
    items = _files(tmp_path / "src")
    raw = tmp_path / "raw"
    raw.mkdir()
    shards.pack(raw, items, 4096)
    out = tmp_path / "out"
    if intruder == "extra file":
        (out / "notes").mkdir(parents=True)
        (out / "notes" / "todo.txt").write_text("mine")
    elif intruder == "different bytes":
        (out / items[-1][0]).parent.mkdir(parents=True)
        (out / items[-1][0]).write_bytes(items[-1][1].read_bytes()[::-1])
    elif intruder == "folder at a file's name":
        (out / items[0][0]).mkdir(parents=True)
    else:
        (out / "cat").mkdir(parents=True)
        (out / items[0][0]).symlink_to(items[0][1])
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(DataError, match="not these images.*nothing was written") as exc:
        export.export(raw, out)
    assert "\n" not in str(exc.value)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_export_from_a_damaged_shard_is_a_data_error(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shards.pack(raw, _files(tmp_path / "src"), 1 << 20)
    _damage(raw, "flipped byte")
    with pytest.raises(DataError, match="does not match its sha256.*dvc checkout --force"):
        export.export(raw, tmp_path / "out")
    assert not list((tmp_path / "out").rglob(".partial*"))


def test_shards_are_byte_for_byte_what_tarfile_writes(tmp_path):
    """The writer builds headers itself (tarfile's cost per member dominated packing); the bytes must stay what
    tarfile writes for the same members in PAX format, long and non-ASCII names included, so any tar reader, and
    shards written before, agree."""
    names = ["cat/a.png", "cat/" + "n" * 96, "cat/" + "l" * 150 + ".png", "chat/été.png", "dog/empty.png"]
    members = [(n, bytes([i]) * (i * 700)) for i, n in enumerate(names)]
    name, _ = shards.write_shard(tmp_path, members)
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for member, data in sorted(members):
            tf.addfile(shards._tarinfo(member, len(data)), io.BytesIO(data))
    assert (tmp_path / name).read_bytes() == ref.getvalue()
    with tarfile.open(tmp_path / name) as tf:
        assert {m.name: tf.extractfile(m).read() for m in tf.getmembers()} == dict(members)


def test_shards_written_in_parallel_are_the_ones_written_one_by_one(tmp_path):
    items = _files(tmp_path / "src")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    assert shards.pack(one, items, 2048, workers=1) == shards.pack(two, items, 2048, workers=2)
    assert len(list(one.glob("*.tar"))) > 2
    assert {p.name: p.read_bytes() for p in one.iterdir()} == {p.name: p.read_bytes() for p in two.iterdir()}


ODD_NAMES = [
    "a\\b.png",
    "with\nnewline.png",
    "x#y.tar#z.png",
    "shard-0123456789abcdef.tar#cat.png",
    "..png",
    " sp .png",
]


def test_odd_but_legal_file_names_are_members_and_their_locators_read_back(tmp_path):
    """Any name a Linux file may have (the loose layout keeps them): a backslash, a newline, '#', even a name that
    looks like a locator; each one's locator splits back to its own shard and member."""
    items = []
    for i, name in enumerate(ODD_NAMES):
        f = tmp_path / "src" / f"{i}"
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(bytes([i]) * 100)
        items.append((f"cat/{name}", f))
    raw = tmp_path / "raw"
    raw.mkdir()
    shards.pack(raw, items, 1 << 20)
    for m in shards.read_index(raw):
        loc = shards.locator(raw, m)
        assert shards.split_locator(loc) == (raw / m.shard, m.member)
        assert shards.read_member(*shards.split_locator(loc)) == dict(items)[m.member].read_bytes()
    assert shards.split_locator(tmp_path / "src" / "cat" / "shard-0123456789abcdef.tar#cat.png") is None
    assert export.export(raw, tmp_path / "out") == (len(ODD_NAMES), len(ODD_NAMES))
    assert sorted(p.name for p in (tmp_path / "out" / "cat").iterdir()) == sorted(ODD_NAMES)
