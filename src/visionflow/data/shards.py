"""Shards: data/raw as content-addressed WebDataset tar files instead of one file per image.

DVC's cost grows with the number of files it tracks (hashing, copying and stat-ing each), so at 100k+ images the
loose layout (data/raw/<class>/<file>) spends minutes per `dvc` command. With `data.layout: shards`, ingest packs
the images into tar shards of about `data.shard_mb` each, and DVC tracks a few dozen files instead of a million.

Why plain tar in the WebDataset layout (and not LitData chunks or MosaicML MDS): a tar opens with any tool
(`tar -xf shard.tar` gives back data/raw/<class>/<file>), WebDataset readers stream it as is, and the Python
standard library writes it byte-for-byte reproducibly (fixed mtime, owner and mode), which content addressing needs.
LitData's chunks are a private binary format and their names are positional, not content hashes.

Layout of a sharded raw_dir:
  shard-<sha256[:16]>.tar        the images, members named <class>/<file> (their loose-layout path), sorted
  shard-<sha256[:16]>.index.csv  one row per member: member, offset, size, sha256 (the per-image manifest)

A shard's name is the sha256 of its bytes, so the same images always give the same shard, and a shard that did not
change keeps its name and DVC hash: DVC stores and pushes only new shards. The source's images are packed in sorted
order; reviewed production images (members <class>/reviewed__<file>) are added append-only, in new shards, so a
new review batch never rewrites an existing shard. `content_version` hashes the sorted (member, sha256) pairs: a
pure function of the images, whatever the shard boundaries.

Every stage reads images through visionflow.data.imageio.read_stored, which takes a loose path or a shard
locator "<raw_dir>/shard-<hash>.tar#<member>" (what the validated manifest and the splits hold in this layout).
Each read checks the member's sha256 against the index, so a damaged shard is caught at the image, not trusted.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import os
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from visionflow.errors import DataError

SHARD_PREFIX = "shard-"
TAR_SUFFIX = ".tar"
INDEX_SUFFIX = ".index.csv"
LOCATOR_SEP = "#"
INDEX_COLUMNS = ("member", "offset", "size", "sha256")
_BLOCK = 512  # tar's block size: each member is a header block plus its data padded to whole blocks


class ShardError(OSError):
    """A shard that cannot give back an image as indexed (missing, truncated, or bytes that changed)."""


@dataclass(frozen=True)
class Member:
    member: str  # <class>/<file>
    shard: str  # shard file name, shard-<hash>.tar
    offset: int  # of the member's data in the shard
    size: int
    sha256: str

    @property
    def label(self) -> str:
        return self.member.split("/", 1)[0]


def shard_name(digest: str) -> str:
    return f"{SHARD_PREFIX}{digest[:16]}{TAR_SUFFIX}"


def index_path(shard: Path) -> Path:
    return shard.with_name(shard.name.removesuffix(TAR_SUFFIX) + INDEX_SUFFIX)


def is_sharded(raw_dir: Path) -> bool:
    # A shard without its index still makes the folder sharded (a damaged one, which verify names), not loose.
    return any(Path(raw_dir).glob(f"{SHARD_PREFIX}*{INDEX_SUFFIX}")) or any(
        Path(raw_dir).glob(f"{SHARD_PREFIX}*{TAR_SUFFIX}")
    )


def locator(raw_dir: Path | str, m: Member) -> str:
    return f"{Path(raw_dir) / m.shard}{LOCATOR_SEP}{m.member}"


def split_locator(path: str | os.PathLike) -> tuple[Path, str] | None:
    """(shard path, member) for a shard locator, None for a plain file path."""
    text = os.fspath(path)
    cut = text.rfind("/" + SHARD_PREFIX)
    if cut < 0:
        return None
    end = text.find(TAR_SUFFIX + LOCATOR_SEP, cut)
    if end < 0:
        return None
    end += len(TAR_SUFFIX)
    return Path(text[:end]), text[end + 1 :]


def check_member_name(member: str) -> None:
    """Members are <class>/<file>: nothing that could write outside a folder when exported."""
    parts = member.split("/")
    if len(parts) != 2 or any(p in ("", ".", "..") for p in parts) or "\\" in member or "\0" in member:
        raise ShardError(f"shard member name {member!r} is not <class>/<file>")


# --- writing ------------------------------------------------------------------------------------------------------


class _HashingWriter(io.RawIOBase):
    """Hashes the bytes as they are written, so a shard is named without reading it back."""

    def __init__(self, fh):
        self.fh, self.sha, self.pos = fh, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def write(self, b) -> int:
        self.sha.update(b)
        self.pos += len(b)
        return self.fh.write(b)


def _tarinfo(member: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata: the tar's bytes depend on the members' names and bytes only.
    info = tarfile.TarInfo(member)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info


def write_shard(out_dir: Path, members: list[tuple[str, bytes | Path]]) -> tuple[str, list[Member]]:
    """Write one shard of these members (sorted by name) and its index into out_dir: its file name and members.
    Written under a temporary name and renamed once complete, so an interrupted write leaves no shard."""
    out_dir = Path(out_dir)
    members = sorted(members, key=lambda x: x[0])
    tmp = out_dir / f".partial-{os.getpid()}{TAR_SUFFIX}"
    rows: list[tuple[str, int, int, str]] = []
    try:
        with tmp.open("wb") as fh:
            w = _HashingWriter(fh)
            with tarfile.open(fileobj=w, mode="w", format=tarfile.PAX_FORMAT) as tf:
                for member, src in members:
                    check_member_name(member)
                    data = src if isinstance(src, bytes) else Path(src).read_bytes()
                    tf.addfile(_tarinfo(member, len(data)), io.BytesIO(data))
                    offset = tf.offset - -(-len(data) // _BLOCK) * _BLOCK  # data starts after the header(s)
                    rows.append((member, offset, len(data), hashlib.sha256(data).hexdigest()))
            digest = w.sha.hexdigest()
        name = shard_name(digest)
        final = out_dir / name
        _write_index(index_path(final), rows)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return name, [Member(m, name, o, s, h) for m, o, s, h in rows]


def _write_index(path: Path, rows: list[tuple[str, int, int, str]]) -> None:
    tmp = path.with_name(".partial-" + path.name)
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(INDEX_COLUMNS)
        w.writerows(rows)
    os.replace(tmp, path)


def _groups(items: list[tuple[str, Path]], sizes: list[int], target_bytes: int) -> Iterable[list[tuple[str, Path]]]:
    group: list[tuple[str, Path]] = []
    used = 0
    for item, size in zip(items, sizes, strict=True):
        cost = _BLOCK + -(-size // _BLOCK) * _BLOCK
        if group and used + cost > target_bytes:
            yield group
            group, used = [], 0
        group.append(item)
        used += cost
    if group:
        yield group


def pack(
    out_dir: Path,
    items: Iterable[tuple[str, Path]],
    target_bytes: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[Member]:
    """Pack (member, file) pairs, sorted by member, into shards of about target_bytes: the same files always
    give the same shards."""
    items = sorted(items)
    sizes = [Path(p).stat().st_size for _, p in items]
    out: list[Member] = []
    for group in _groups(items, sizes, target_bytes):
        out.extend(write_shard(out_dir, group)[1])
        if progress:
            progress(len(out), len(items))
    return out


# --- reading ------------------------------------------------------------------------------------------------------


def _read_index_file(path: Path) -> list[Member]:
    shard = path.name.removesuffix(INDEX_SUFFIX) + TAR_SUFFIX
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            r = csv.reader(fh)
            if tuple(next(r, ())) != INDEX_COLUMNS:
                raise ShardError(f"{path} is not a shard index (expected the columns {', '.join(INDEX_COLUMNS)})")
            out = [Member(m, shard, int(o), int(s), h) for m, o, s, h in r]
    except (ValueError, UnicodeDecodeError) as exc:
        raise ShardError(f"shard index {path} is malformed ({exc})") from exc
    try:
        for m in out:
            check_member_name(m.member)
    except ShardError as exc:
        raise ShardError(f"shard index {path.name}: {exc}") from None
    return out


def read_index(raw_dir: Path) -> list[Member]:
    """Every member of every shard in raw_dir, sorted by member; a member in two shards is an error."""
    members: list[Member] = []
    for idx in sorted(Path(raw_dir).glob(f"{SHARD_PREFIX}*{INDEX_SUFFIX}")):
        members.extend(_read_index_file(idx))
    members.sort(key=lambda m: m.member)
    dup = [a.member for a, b in zip(members, members[1:]) if a.member == b.member]
    if dup:
        raise DataError(f"{raw_dir}: {len(dup)} image(s) are in two shards, e.g. {dup[0]!r}; ingest again")
    return members


@functools.lru_cache(maxsize=256)
def _shard_members(index_file: str, _mtime_ns: int, _size: int) -> dict[str, Member]:
    return {m.member: m for m in _read_index_file(Path(index_file))}


def lookup(shard: Path, member: str) -> Member:
    idx = index_path(shard)
    try:
        st = idx.stat()
    except FileNotFoundError:
        raise ShardError(
            f"{idx.name} is missing: the shard {shard} has no index (`dvc checkout` restores it)"
        ) from None
    m = _shard_members(str(idx), st.st_mtime_ns, st.st_size).get(member)
    if m is None:
        raise ShardError(f"{member!r} is not in shard {shard}")
    return m


def read_member(shard: Path, member: str, max_bytes: int | None = None) -> bytes:
    """The bytes of one member, checked against its sha256 in the index."""
    m = lookup(shard, member)
    if max_bytes is not None and m.size > max_bytes:
        from visionflow.data.imageio import RejectedImage

        raise RejectedImage("file_too_large", f"{m.size} bytes > limit {max_bytes}")
    try:
        with shard.open("rb") as fh:
            fh.seek(m.offset)
            data = fh.read(m.size)
    except FileNotFoundError:
        raise ShardError(f"shard {shard} is missing (`dvc checkout` or `dvc pull` restores it)") from None
    if len(data) != m.size:
        raise ShardError(
            f"shard {shard} is truncated: {member!r} ends past its end (`dvc checkout --force` restores it)"
        )
    if hashlib.sha256(data).hexdigest() != m.sha256:
        raise ShardError(
            f"{member!r} in shard {shard} does not match its sha256 in the index: the shard or its index was changed "
            "(`dvc checkout --force` restores them)"
        )
    return data


def member_size(shard: Path, member: str) -> int:
    return lookup(shard, member).size


def verify(raw_dir: Path) -> list[str]:
    """Problems with the shards in raw_dir: a shard whose bytes do not hash to its name or do not match its index,
    a malformed index, a missing shard or index. Empty when all is well. Reads every shard once (the price of
    checking the data before training on it)."""
    problems = []
    raw_dir = Path(raw_dir)
    tars = {p.name for p in raw_dir.glob(f"{SHARD_PREFIX}*{TAR_SUFFIX}")}
    for idx in sorted(raw_dir.glob(f"{SHARD_PREFIX}*{INDEX_SUFFIX}")):
        name = idx.name.removesuffix(INDEX_SUFFIX) + TAR_SUFFIX
        if name not in tars:
            problems.append(f"{name} is missing")
            continue
        tars.discard(name)
        try:
            problem = _shard_problem(raw_dir / name, _read_index_file(idx))
        except ShardError as exc:
            problem = str(exc)
        if problem:
            problems.append(problem)
    problems.extend(f"{t} has no index" for t in sorted(tars))
    return problems


def _shard_problem(path: Path, rows: list[Member]) -> str | None:
    """In one pass over the shard: does it hash to its name, and does each indexed member's data (offset, size)
    hash to its sha256? The index is not content-addressed, so an edited index is caught here, not at each read."""
    rows = sorted(rows, key=lambda m: m.offset)
    whole, part = hashlib.sha256(), hashlib.sha256()
    pos = i = 0
    wrong: list[str] = []
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            whole.update(block)
            end = pos + len(block)
            while i < len(rows) and rows[i].offset < end:
                m = rows[i]
                part.update(block[max(m.offset - pos, 0) : max(m.offset + m.size - pos, 0)])
                if m.offset + m.size > end:
                    break  # the member goes on in the next block
                if part.hexdigest() != m.sha256:
                    wrong.append(m.member)
                part, i = hashlib.sha256(), i + 1
            pos = end
    wrong.extend(m.member for m in rows[i:])  # members that end past the end of the file
    if shard_name(whole.hexdigest()) != path.name:
        return f"{path.name} does not hash to its name (truncated or changed)"
    if wrong:
        return f"{path.name} does not match its index ({len(wrong)} image(s), e.g. {wrong[0]!r})"
    return None


def content_version(members: Iterable[Member]) -> str:
    """sha256 of the sorted (member, sha256) pairs: the same images give the same version, however packed."""
    h = hashlib.sha256()
    for m in sorted(members, key=lambda m: m.member):
        h.update(f"{m.member}\t{m.sha256}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class _Stored:
    """An image to export: its size, and how to get its sha256 and its bytes."""

    size: int
    sha256: Callable[[], str]
    read: Callable[[], bytes]


def _file_sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


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
        f"{f.parent.name}/{f.name}": _Stored(f.stat().st_size, functools.partial(_file_sha256, f), f.read_bytes)
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
        elif _file_sha256(dest) != img.sha256():
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
            raise DataError(f"{exc}; {i - 1} image(s) were exported before it") from None
        os.replace(tmp, dest)
        if progress and (i % 1000 == 0 or i == len(todo)):
            progress(i, len(todo))
    return len(todo), len(images)
