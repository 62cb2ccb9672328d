"""Shards: data/raw as content-addressed WebDataset tar files instead of one file per image.

DVC's cost grows with the number of files it tracks (hashing, copying and stat-ing each), so at 100k+ images the
loose layout (data/raw/<class>/<file>) spends minutes per `dvc` command. With `data.layout: shards`, ingest packs
the images into tar shards of about `data.shard_mb` each, and DVC tracks a few dozen files instead of a million.

Why plain tar in the WebDataset layout (and not LitData chunks or MosaicML MDS): a tar opens with any tool
(`tar -xf shard.tar` gives back data/raw/<class>/<file>), WebDataset readers stream it as is, and it can be written
byte-for-byte reproducibly (fixed mtime, owner and mode: exactly what Python's tarfile writes, with the headers
built here because tarfile's per-member cost dominated packing), which content addressing needs. LitData's chunks
are a private binary format and their names are positional, not content hashes.

Layout of a sharded raw_dir:
  shard-<sha256[:16]>.tar        the images, members named <class>/<file> (their loose-layout path), sorted
  shard-<sha256[:16]>.index.csv  one row per member: member, offset, size, sha256 (the per-image manifest)

A shard's name is the sha256 of its bytes, so the same images always give the same shard, and a shard that did not
change keeps its name and DVC hash: DVC stores and pushes only new shards. The source's images are packed in sorted
order; reviewed production images (members <class>/reviewed__<file>) are added append-only, in new shards, so a
new review batch never rewrites an existing shard. `content_version` hashes the sorted (member, sha256) pairs: a
pure function of the images, whatever the shard boundaries.

Every stage reads images through visionflow.data.imageio.read_limited, which takes a loose path or a shard
locator "<raw_dir>/shard-<hash>.tar#<member>" (what the validated manifest and the splits hold in this layout).
Each read checks the member's sha256 against the index, so a damaged shard is caught at the image, not trusted.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import os
import re
import tarfile
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from visionflow.data.pools import default_workers, die_with_parent
from visionflow.errors import DataError

SHARD_PREFIX = "shard-"
TAR_SUFFIX = ".tar"
INDEX_SUFFIX = ".index.csv"
LOCATOR_SEP = "#"
INDEX_COLUMNS = ("member", "offset", "size", "sha256")
_BLOCK = 512  # tar's block size: each member is a header block plus its data padded to whole blocks


Reader = Callable[[Path], bytes]  # reads one source file; raises OSError for one that cannot be read


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


def indexed_shard(index: Path) -> str:
    """The name of the shard an index file describes (index_path's inverse)."""
    return index.name.removesuffix(INDEX_SUFFIX) + TAR_SUFFIX


def is_sharded(raw_dir: Path) -> bool:
    # A shard without its index still makes the folder sharded (a damaged one, which verify names), not loose.
    return any(Path(raw_dir).glob(f"{SHARD_PREFIX}*{INDEX_SUFFIX}")) or any(
        Path(raw_dir).glob(f"{SHARD_PREFIX}*{TAR_SUFFIX}")
    )


def locator(raw_dir: Path | str, m: Member) -> str:
    return f"{Path(raw_dir) / m.shard}{LOCATOR_SEP}{m.member}"


_LOCATED = re.compile(rf"({re.escape(SHARD_PREFIX)}[0-9a-f]{{16}}{re.escape(TAR_SUFFIX)}){LOCATOR_SEP}(.+)")


def split_locator(path: str | os.PathLike) -> tuple[Path, str] | None:
    """(shard path, member) for a shard locator "<raw_dir>/shard-<hash>.tar#<class>/<file>", None for a plain file
    path. Read from the right: a file name may itself hold "shard-", ".tar" or "#", a class name cannot."""
    head, _, name = os.fspath(path).rpartition("/")
    folder, _, middle = head.rpartition("/")
    found = _LOCATED.fullmatch(middle)
    if not found or not name:
        return None
    return Path(folder, found[1]), f"{found[2]}/{name}"


def check_member_name(member: str) -> None:
    """Members are <class>/<file>: nothing that could write outside a folder when exported. The file part may hold
    any character a Linux file name may (the loose layout keeps such names too)."""
    parts = member.split("/")
    if len(parts) != 2 or any(p in ("", ".", "..") for p in parts) or "\0" in member:
        raise ShardError(f"shard member name {member!r} is not <class>/<file>")


# --- writing ------------------------------------------------------------------------------------------------------


def _tarinfo(member: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata: the tar's bytes depend on the members' names and bytes only.
    info = tarfile.TarInfo(member)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _cost(size: int) -> int:
    """Bytes a member of this size takes in a shard (its header block and padded data): what a shard's target
    size counts, when writing (ShardWriter) and when planning the shards up front (_plan) alike."""
    return _BLOCK + _padded(size)


def _tar_end(data_end: int) -> int:
    """The size of a tar whose last member's padded data ends at data_end: two zero blocks, then padding to whole
    records (tarfile.RECORDSIZE), as tarfile closes an archive."""
    return -(-(data_end + 2 * _BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


# tarfile's header for a member with a short ASCII name (one ustar block), with the name, size and checksum
# fields left to fill: building it with tarfile costs ~50 us a member, most of packing's time at 100k images.
_USTAR = bytearray(_tarinfo("x", 0).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
_USTAR[0:100], _USTAR[124:136], _USTAR[148:156] = bytes(100), bytes(12), b" " * 8


def tar_header(member: str, size: int) -> bytes:
    """The header block(s) tarfile writes for this member in PAX format with fixed metadata, byte for byte (a
    test holds it to tarfile's own): one ustar block, or tarfile's PAX extended header for a long or non-ASCII
    name."""
    name = member.encode("utf-8", "surrogateescape")
    if len(name) > 100 or not name.isascii() or size >= 8**11:
        return _tarinfo(member, size).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    buf = bytearray(_USTAR)
    buf[0 : len(name)] = name
    buf[124:136] = b"%011o\0" % size
    buf[148:155] = b"%06o\0" % sum(buf)  # the checksum counts its own field as spaces; byte 155 stays a space
    return bytes(buf)


class ShardWriter:
    """Writes members, in the order added, into tar shards of about target_bytes (None: one shard), each under a
    temporary name until complete and then renamed to its hash, so an interrupted write leaves no shard. Callers
    add members sorted by name: the same members then always give the same shards, byte for byte. The bytes are
    what tarfile writes (headers from tar_header, two zero blocks at the end, padded to whole records)."""

    def __init__(self, out_dir: Path, target_bytes: int | None = None):
        self.out_dir, self.target = Path(out_dir), target_bytes
        self.members: list[Member] = []
        self._fh = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add(self, member: str, data: bytes) -> None:
        check_member_name(member)
        cost = _cost(len(data))
        if self._fh is not None and self.target is not None and self._used + cost > self.target:
            self._finish()
        if self._fh is None:
            self._start()
        self._write(tar_header(member, len(data)))
        self._rows.append((member, self._pos, len(data), hashlib.sha256(data).hexdigest()))
        self._write(data)
        self._write(bytes(_padded(len(data)) - len(data)))
        self._used += cost

    def _write(self, b: bytes) -> None:
        self._sha.update(b)
        self._fh.write(b)
        self._pos += len(b)

    def _start(self) -> None:
        self._tmp = self.out_dir / f".partial-{os.getpid()}-{len(self.members)}{TAR_SUFFIX}"
        self._fh = self._tmp.open("wb")
        self._sha = hashlib.sha256()
        self._rows: list[tuple[str, int, int, str]] = []
        self._used = self._pos = 0

    def _finish(self) -> None:
        self._write(bytes(_tar_end(self._pos) - self._pos))
        self._fh.close()
        self._fh = None
        name = shard_name(self._sha.hexdigest())
        final = self.out_dir / name
        _write_index(index_path(final), self._rows)
        os.replace(self._tmp, final)
        self.members.extend(Member(m, name, o, s, h) for m, o, s, h in self._rows)

    def close(self) -> None:
        if self._fh is not None:
            self._finish()

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._tmp.unlink(missing_ok=True)
            self._fh = None


def write_shard(out_dir: Path, members: list[tuple[str, bytes | Path]]) -> tuple[str, list[Member]]:
    """Write one shard of these members (sorted by name) and its index into out_dir: its file name and members."""
    with ShardWriter(out_dir) as w:
        for member, src in sorted(members, key=lambda x: x[0]):
            w.add(member, src if isinstance(src, bytes) else Path(src).read_bytes())
    return w.members[0].shard, w.members


def _write_index(path: Path, rows: list[tuple[str, int, int, str]]) -> None:
    tmp = path.with_name(".partial-" + path.name)
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(INDEX_COLUMNS)
        w.writerows(rows)
    os.replace(tmp, path)


def _read_file(path: Path) -> bytes:
    return Path(path).read_bytes()


def _plan(sizes: list[int], target_bytes: int) -> list[range]:
    """The runs of consecutive items that make each shard: ShardWriter's roll-over rule, decided from the sizes up
    front so that the shards can be written in parallel and still come out the same."""
    groups, start, used = [], 0, 0
    for i, size in enumerate(sizes):
        cost = _cost(size)
        if i > start and used + cost > target_bytes:
            groups.append(range(start, i))
            start, used = i, 0
        used += cost
    if sizes:
        groups.append(range(start, len(sizes)))
    return groups


def _write_group(out_dir: Path, items: list[tuple[str, Path]], read: Reader) -> tuple[list[Member], list[tuple]]:
    """One shard of these items, and the (member, path, error) of each that could not be read (left out)."""
    failed = []
    with ShardWriter(out_dir) as w:
        for member, path in items:
            try:
                data = read(path)
            except OSError as exc:
                failed.append((member, path, exc))
                continue
            w.add(member, data)
    return w.members, failed


def pack_files(
    out_dir: Path,
    items: Iterable[tuple[str, Path, int]],
    target_bytes: int,
    *,
    read: Reader = _read_file,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Member], list[tuple[str, Path, OSError]]]:
    """Pack (member, file, size) items, sorted by member, into shards of about target_bytes, one process per core
    (each writes whole shards; the boundaries come from the sizes, so the shards are the same whatever the number of
    processes). Returns the members written and the (member, path, error) of files `read` could not read, which
    are left out. read must be a module-level function (it crosses to the worker processes)."""
    items = sorted(items)
    jobs = [[(m, p) for m, p, _ in items[g.start : g.stop]] for g in _plan([s for *_, s in items], target_bytes)]
    workers = min(workers or default_workers(), len(jobs), 8)
    members: list[Member] = []
    failed: list[tuple[str, Path, OSError]] = []
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(ProcessPoolExecutor(workers, initializer=die_with_parent))
            results = pool.map(_write_group, [out_dir] * len(jobs), jobs, [read] * len(jobs))
        else:
            results = (_write_group(out_dir, job, read) for job in jobs)
        done = 0
        for (written, bad), job in zip(results, jobs, strict=True):
            members.extend(written)
            failed.extend(bad)
            done += len(job)
            if progress:
                progress(done, len(items))
    return members, failed


def pack(
    out_dir: Path,
    items: Iterable[tuple[str, Path]],
    target_bytes: int,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> list[Member]:
    """Pack (member, file) pairs, sorted by member, into shards of about target_bytes: the same files always
    give the same shards. A file that cannot be read stops it (OSError)."""
    members, failed = pack_files(
        out_dir, [(m, p, Path(p).stat().st_size) for m, p in items], target_bytes, workers=workers, progress=progress
    )
    if failed:
        member, path, exc = failed[0]
        raise ShardError(f"could not read {path} (member {member!r}): {exc}")
    return members


# --- reading ------------------------------------------------------------------------------------------------------


def read_index_file(path: Path) -> list[Member]:
    shard = indexed_shard(path)
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
            if m.offset < 0 or m.size < 0 or len(m.sha256) != 64:
                raise ShardError(f"{m.member!r} has offset {m.offset}, size {m.size}, sha256 {m.sha256[:70]!r}")
    except ShardError as exc:
        raise ShardError(f"shard index {path.name}: {exc}") from None
    return out


def read_index(raw_dir: Path) -> list[Member]:
    """Every member of every shard in raw_dir, sorted by member; a member in two shards is an error."""
    members: list[Member] = []
    for idx in sorted(Path(raw_dir).glob(f"{SHARD_PREFIX}*{INDEX_SUFFIX}")):
        members.extend(read_index_file(idx))
    members.sort(key=lambda m: m.member)
    dup = [a.member for a, b in zip(members, members[1:]) if a.member == b.member]
    if dup:
        raise DataError(f"{raw_dir}: {len(dup)} image(s) are in two shards, e.g. {dup[0]!r}; ingest again")
    return members


@functools.lru_cache(maxsize=256)
def _shard_members(index_file: str, _mtime_ns: int, _size: int) -> dict[str, Member]:
    return {m.member: m for m in read_index_file(Path(index_file))}


def lookup(shard: Path, member: str) -> Member:
    idx = index_path(shard)
    try:
        st = idx.stat()
    except FileNotFoundError:
        raise ShardError(f"{idx.name} is missing: the shard {shard} has no index") from None
    m = _shard_members(str(idx), st.st_mtime_ns, st.st_size).get(member)
    if m is None:
        raise ShardError(f"{member!r} is not in shard {shard}")
    return m


def read_member(shard: Path, member: str) -> bytes:
    """The bytes of one member, checked against its sha256 in the index (imageio.read_limited, which every stage
    reads through, applies the size limit first)."""
    m = lookup(shard, member)
    try:
        with shard.open("rb") as fh:
            fh.seek(m.offset)
            data = fh.read(m.size)
    except FileNotFoundError:
        raise ShardError(f"shard {shard} is missing") from None
    if len(data) != m.size:
        raise ShardError(f"shard {shard} is truncated: {member!r} ends past its end")
    if hashlib.sha256(data).hexdigest() != m.sha256:
        raise ShardError(
            f"{member!r} in shard {shard} does not match its sha256 in the index: the shard or its index was changed"
        )
    return data


def member_size(shard: Path, member: str) -> int:
    return lookup(shard, member).size


def _tar_size(members: list[Member]) -> int:
    """The size of the shard that holds these members, as ShardWriter writes it."""
    return _tar_end(max((m.offset + _padded(m.size) for m in members), default=0))


def verify(raw_dir: Path) -> list[str]:
    """Problems with the shards in raw_dir that a stat shows: a missing or truncated shard, a shard without its
    index. Empty when all is well. Changed bytes are caught where they are read (read_member checks each image's
    sha256), so the data is read once, not twice."""
    problems = []
    raw_dir = Path(raw_dir)
    tars = {p.name for p in raw_dir.glob(f"{SHARD_PREFIX}*{TAR_SUFFIX}")}
    for idx in sorted(raw_dir.glob(f"{SHARD_PREFIX}*{INDEX_SUFFIX}")):
        name = indexed_shard(idx)
        if name not in tars:
            problems.append(f"{name} is missing")
            continue
        tars.discard(name)
        try:
            size, want = (raw_dir / name).stat().st_size, _tar_size(read_index_file(idx))
        except ShardError as exc:  # a malformed or hostile index
            problems.append(str(exc))
            continue
        if size != want:
            problems.append(f"{name} is {size} bytes where its index says {want} (truncated or changed)")
    problems.extend(f"{t} has no index" for t in sorted(tars))
    return problems


def verify_hashes(raw_dir: Path) -> list[str]:
    """Shards whose bytes do not hash to their name (reads every shard: for checks and tests, not every run)."""
    problems = []
    for shard in sorted(Path(raw_dir).glob(f"{SHARD_PREFIX}*{TAR_SUFFIX}")):
        h = hashlib.sha256()
        with shard.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        if shard_name(h.hexdigest()) != shard.name:
            problems.append(f"{shard.name} does not hash to its name (changed)")
    return problems


def restore_hint(raw_dir: Path | str) -> str:
    """What to do about a damaged shard (said by every error about one)."""
    return (
        f"`dvc checkout --force {raw_dir}` (or `dvc pull --force`) restores the versioned shards, "
        "or `visionflow ingest --force` packs them again from the source"
    )


def content_version(members: Iterable[Member]) -> str:
    """sha256 of the sorted (member, sha256) pairs: the same images give the same version, however packed."""
    h = hashlib.sha256()
    for m in sorted(members, key=lambda m: m.member):
        h.update(f"{m.member}\t{m.sha256}\n".encode())
    return h.hexdigest()
