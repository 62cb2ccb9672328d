"""Ingest's side of the label overrides (visionflow.data.overrides): which images move to another class.

An override row whose label differs from the label it had (`was`) moves the image with that sha256 into the row's
class in the next data version; a row that keeps the label changes nothing. Only the copies in data/raw move: the
source files stay as they are. A row naming an image the data does not hold is reported, kept and ignored (its
image may arrive later, e.g. a held-back reviewed batch); a row naming a class the data does not have stops ingest
before anything is written (it would make a class of one image, or be quarantined).

Loose layout: the file moves from <class>/<name> to <new class>/<name> (a free name when taken). Shards: the
affected shards are rewritten with the members renamed (visionflow.data.shards), the others keep their names and
DVC hashes.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from visionflow.data import shards
from visionflow.data.imageio import sha256_file
from visionflow.data.overrides import COLUMNS, read_overrides
from visionflow.errors import DataError


@dataclass(frozen=True)
class Relabels:
    """sha256 -> the class its image goes to, for the override rows that change a label."""

    path: Path
    to: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Relabels:
        """The overrides file's label changes; a missing file is created with its header only, so that DVC (which
        tracks it as a dependency of the ingest stage) always finds it."""
        path = Path(path)
        if not path.exists():
            from visionflow.report import write_text_atomic

            write_text_atomic(path, ",".join(COLUMNS) + "\n")
        return cls(path, {sha: o.label for sha, o in read_overrides(path).items() if not o.keeps_label})

    def digest(self) -> str:
        """Changes when a label change is added, removed or altered (keep decisions do not count)."""
        return hashlib.sha256(repr(sorted(self.to.items())).encode()).hexdigest()

    def check_classes(self, allowed: set[str]) -> None:
        """Raise a one-line DataError when a row names a class outside `allowed`, before anything is written."""
        bad = {sha: label for sha, label in self.to.items() if label not in allowed}
        if bad:
            sha, label = next(iter(sorted(bad.items())))
            raise DataError(
                f"label overrides {self.path}: {len(bad)} row(s) name a class the data does not have, e.g. "
                f"{label!r} for sha256 {sha[:12]}...; the classes are {sorted(allowed)}. Fix the label or delete the "
                "row"
            )


def _free_name(name: str, sha: str, taken: set[str]) -> str:
    """name, or name~<sha256[:8]>(-n) when another file of the class already has it (compared without case, as
    macOS and Windows file systems do)."""
    stem, suffix = os.path.splitext(name)
    candidate, n = name, 0
    while candidate.casefold() in taken:
        n += 1
        candidate = f"{stem}~{sha[:8]}{suffix}" if n == 1 else f"{stem}~{sha[:8]}-{n}{suffix}"
    taken.add(candidate.casefold())
    return candidate


def relabel_folder(folder: Path, relabels: Relabels) -> tuple[Counter, set[str]]:
    """Move each <class>/<file> under `folder` whose sha256 has a label change into its new class. Returns the
    per-class change in counts and the sha256s of the overrides found (moved or already in their class)."""
    delta: Counter = Counter()
    found: set[str] = set()
    if not relabels.to:
        return delta, found
    classes = sorted(d for d in Path(folder).iterdir() if d.is_dir())
    moves = []
    for d in classes:
        for f in sorted(d.iterdir()):
            sha = sha256_file(f) if f.is_file() else None
            if sha in relabels.to:
                found.add(sha)
                if relabels.to[sha] != d.name:
                    moves.append((f, sha, relabels.to[sha]))
    taken: dict[str, set[str]] = {}
    for f, sha, label in moves:
        dest = Path(folder) / label
        if label not in taken:
            taken[label] = {p.name.casefold() for p in dest.iterdir()} if dest.is_dir() else set()
        dest.mkdir(exist_ok=True)
        os.replace(f, dest / _free_name(f.name, sha, taken[label]))
        delta[f.parent.name] -= 1
        delta[label] += 1
    return delta, found


def relabel_shards(raw_dir: Path, relabels: Relabels) -> tuple[Counter, set[str]]:
    """relabel_folder for a sharded folder: each shard holding a member to move is rewritten (one new shard, its
    members renamed, sorted); every other shard stays as it is."""
    delta: Counter = Counter()
    found: set[str] = set()
    if not relabels.to:
        return delta, found
    members = shards.read_index(raw_dir)
    taken: dict[str, set[str]] = {}
    for m in members:
        taken.setdefault(m.label, set()).add(m.member.split("/", 1)[1].casefold())
    renamed: dict[str, str] = {}
    for m in members:
        if m.sha256 in relabels.to:
            found.add(m.sha256)
            label = relabels.to[m.sha256]
            if label != m.label:
                name = _free_name(m.member.split("/", 1)[1], m.sha256, taken.setdefault(label, set()))
                renamed[m.member] = f"{label}/{name}"
                delta[m.label] -= 1
                delta[label] += 1
    for name in sorted({m.shard for m in members if m.member in renamed}):
        shard = Path(raw_dir) / name
        items = [
            (renamed.get(m.member, m.member), shards.read_member(shard, m.member)) for m in members if m.shard == name
        ]
        shard.unlink()
        shards.index_path(shard).unlink()
        shards.write_shard(Path(raw_dir), items)
    return delta, found


def relabel_members(members: dict[str, Path], relabels: Relabels) -> tuple[dict[str, Path], set[str], int]:
    """Reviewed images (member name <class>/<file> -> the file) with their label changes applied: the new member
    names, the sha256s of the overrides found, and how many moved."""
    if not relabels.to:
        return members, set(), 0
    taken: dict[str, set[str]] = {}
    for member in members:
        label, name = member.split("/", 1)
        taken.setdefault(label, set()).add(name.casefold())
    out: dict[str, Path] = {}
    found: set[str] = set()
    moved = 0
    for member, f in members.items():
        label, name = member.split("/", 1)
        sha = sha256_file(f)
        if sha in relabels.to:
            found.add(sha)
            if relabels.to[sha] != label:
                label, moved = relabels.to[sha], moved + 1
                name = _free_name(name, sha, taken.setdefault(label, set()))
        out[f"{label}/{name}"] = f
    return out, found, moved


def missing_warning(path: Path | str, missing: tuple[str, ...]) -> str | None:
    """The one line said about override rows whose image the data does not hold (None when there are none)."""
    if not missing:
        return None
    return (
        f"label overrides {path}: {len(missing)} label change(s) name an image that is not in the data, e.g. sha256 "
        f"{missing[0]}; kept in the file and ignored until the image arrives"
    )
