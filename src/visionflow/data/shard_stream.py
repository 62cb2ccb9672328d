"""Streaming shards straight from the DVC remote: training on several machines without `dvc checkout`.

With `data.layout: shards`, data/raw is a DVC directory of tar shards and their indexes (visionflow.data.shards).
dvc.lock names that directory's `.dir` object; on the remote (DVC 3 layout) every object lives at
<remote>/files/md5/<md5[:2]>/<md5[2:]>, and the `.dir` object is a JSON list of {"md5", "relpath"}. ShardSource
reads that listing and the small index files, then fetches a shard only when a sample in it is first needed, into
a local shard cache. Each download is checked (its DVC md5, and for a shard the sha256 prefix in its name) and
written under a temporary name, then renamed: an interrupted or damaged download never leaves a shard behind.
The remote is read with fsspec (s3fs for s3://, plain files for a path); S3 credentials come from the environment.

An epoch's samples are ordered shard by shard (shard order and the order inside each shard shuffled by
(seed, epoch)) and cut into world_size contiguous parts, so each rank reads few shards; see rank_part. DDP needs
the same number of batches on every rank, or the ranks wait on each other forever: parts differ by at most one
sample, and the shorter parts are padded to the longest by repeating their first sample (StreamingShards.padding
reports which). The partition itself holds every sample exactly once. Within a rank, DataLoader workers get whole
batches (worker_part), so the loader yields ceil(part / batch_size) batches on every rank: what Lightning's len()
and the learning-rate schedule count on.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from visionflow.data import shards
from visionflow.data.imageio import DecodeRules, decode_for_model
from visionflow.data.shards import Member, ShardError
from visionflow.data.versioning import data_version
from visionflow.errors import DataError

_CHUNK = 1 << 20


# --- the remote -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Remote:
    url: str  # s3://bucket/prefix or a local path
    endpoint_url: str | None = None  # an S3-compatible endpoint (moto, MinIO)

    def filesystem(self):
        import fsspec

        opts = {}
        if self.url.startswith("s3://") and self.endpoint_url:
            opts["client_kwargs"] = {"endpoint_url": self.endpoint_url}
        fs, base = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **opts)
        return fs, base.rstrip("/")

    def object_path(self, base: str, md5: str) -> str:
        return f"{base}/files/md5/{md5[:2]}/{md5[2:]}"


def project_remote(root: Path, name: str | None = None) -> Remote:
    """The project's DVC remote (the default one unless named) from .dvc/config and .dvc/config.local; for S3 the
    endpoint is AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (botocore's names), else the remote's endpointurl."""
    from dvc.config import Config

    config = Config(dvc_dir=str(Path(root) / ".dvc"))
    name = name or config["core"].get("remote")
    remote = config["remote"].get(name) if name else None
    if not remote or not remote.get("url"):
        raise DataError(f"{root}: no DVC remote {name or '(default)'} configured: run `visionflow version` first")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or remote.get("endpointurl")
    return Remote(str(remote["url"]), endpoint)


class ShardSource:
    """The shards of one data version (a `.dir` md5), fetched from the remote into cache_dir on demand."""

    def __init__(self, remote: Remote, dir_md5: str, cache_dir: Path):
        self.remote = remote
        self.dir_md5 = dir_md5.removesuffix(".dir")
        self.cache_dir = Path(cache_dir)
        self._listing: dict[str, str] | None = None
        # opened lazily by each process that reads (a forked loader worker inherits the parent's, which s3fs
        # refuses to use: "This class is not fork-safe"), so it is kept with the pid that opened it
        self._fs: tuple[int, object] | None = None

    @classmethod
    def from_project(cls, root: Path, cache_dir: Path, raw_dir: str = "data/raw") -> ShardSource:
        return cls(project_remote(root), data_version(root, raw_dir), cache_dir)

    def __getstate__(self):
        return {**self.__dict__, "_fs": None}

    def _remote(self):
        if self._fs is None or self._fs[0] != os.getpid():
            self._fs = (os.getpid(), self.remote.filesystem())
        return self._fs[1]

    def listing(self) -> dict[str, str]:
        """relpath -> md5 of every file in the data version."""
        if self._listing is None:
            path = self._download(self.dir_md5 + ".dir", self.dir_md5, f"listing {self.dir_md5}.dir")
            try:
                entries = json.loads(path.read_bytes())
                self._listing = {e["relpath"]: e["md5"] for e in entries}
            except (ValueError, KeyError, TypeError) as exc:
                raise ShardError(f"the DVC listing {self.dir_md5}.dir is not a .dir object ({exc})") from exc
        return self._listing

    def members(self) -> list[Member]:
        """Every member of every shard, sorted by member (the indexes are fetched; the shards are not)."""
        out: list[Member] = []
        for rel, md5 in sorted(self.listing().items()):
            if rel.startswith(shards.SHARD_PREFIX) and rel.endswith(shards.INDEX_SUFFIX):
                out.extend(shards.read_index_file(self._download(rel, md5, rel)))
        if not out:
            raise DataError(f"data version {self.dir_md5} has no shard indexes: is data.layout shards?")
        return sorted(out, key=lambda m: m.member)

    def shard_path(self, shard: str) -> Path:
        """The local path of a shard (and its index beside it), downloaded first if it is not cached."""
        listing = self.listing()
        if shard not in listing:
            raise ShardError(f"{shard} is not in data version {self.dir_md5}")
        self._download(shards.index_path(Path(shard)).name, listing[shards.index_path(Path(shard)).name], shard)
        return self._download(shard, listing[shard], shard)

    def read(self, m: Member) -> bytes:
        return shards.read_member(self.shard_path(m.shard), m.member)

    def _download(self, name: str, md5: str, what: str) -> Path:
        """cache_dir/name, fetched and checked unless already there (it only ever appears complete and checked)."""
        dest = self.cache_dir / name
        if dest.is_file():
            return dest
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fs, base = self._remote()
        src = self.remote.object_path(base, md5) + (".dir" if name.endswith(".dir") else "")
        tmp = self.cache_dir / f".partial-{os.getpid()}-{secrets.token_hex(4)}-{name}"
        h_md5, h_sha = hashlib.md5(), hashlib.sha256()
        try:
            try:
                with fs.open(src, "rb") as fin, tmp.open("wb") as fout:
                    for block in iter(lambda: fin.read(_CHUNK), b""):
                        h_md5.update(block)
                        h_sha.update(block)
                        fout.write(block)
            except FileNotFoundError:
                raise ShardError(f"{what}: {src} is missing on the remote (was `visionflow version` pushed?)") from None
            if h_md5.hexdigest() != md5:
                raise ShardError(f"{what}: the download from {src} does not match its DVC md5 {md5}: not cached")
            if name.endswith(shards.TAR_SUFFIX) and shards.shard_name(h_sha.hexdigest()) != name:
                raise ShardError(f"{what}: the download does not hash to its name (sha256 {h_sha.hexdigest()[:16]})")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest


# --- the epoch partition ---------------------------------------------------------------------------------------------


def epoch_order(members: list[Member], seed: int, epoch: int) -> list[Member]:
    """The epoch's samples, shard by shard: shard order and each shard's own order shuffled by (seed, epoch)."""
    rng = random.Random(f"{seed}:{epoch}")  # a str seed hashes deterministically (not with PYTHONHASHSEED)
    by_shard: dict[str, list[Member]] = {}
    for m in sorted(members, key=lambda m: (m.shard, m.member)):
        by_shard.setdefault(m.shard, []).append(m)
    order = sorted(by_shard)
    rng.shuffle(order)
    out: list[Member] = []
    for s in order:
        group = by_shard[s]
        rng.shuffle(group)
        out.extend(group)
    return out


def even_cut(n: int, parts: int, i: int) -> range:
    """Part i of range(n) cut into `parts` contiguous pieces whose lengths differ by at most one."""
    if parts < 1 or not 0 <= i < parts:
        raise ValueError(f"part {i} of {parts}")
    base, extra = divmod(n, parts)
    start = i * base + min(i, extra)
    return range(start, start + base + (i < extra))


def rank_part(n: int, world_size: int, rank: int) -> tuple[range, list[int]]:
    """A rank's contiguous part of the epoch's n samples, and the padding that evens it out: indices of samples
    repeated (its own first sample; for a rank with none, the epoch's first) so every rank has ceil(n/world)."""
    part = even_cut(n, world_size, rank)
    want = -(-n // world_size)
    return part, [(part.start + k) % n for k in range(want - len(part))] if n else []


def worker_part(length: int, workers: int, worker: int, batch_size: int) -> range:
    """A loader worker's piece of a rank's `length` samples, in whole batches (only the rank's last batch may be
    short); workers' batch counts differ by at most one."""
    batches = -(-length // batch_size)
    b = even_cut(batches, workers, worker)
    return range(min(b.start * batch_size, length), min(b.stop * batch_size, length))


# --- the dataset -----------------------------------------------------------------------------------------------------


class StreamingShards(IterableDataset):
    """(uint8 image tensor (C, H, W) as the model takes it, label index, member key) for this rank's part of the
    epoch. Set rank, world_size and epoch before iterating (the loader's workers get a copy when it is iterated,
    so use non-persistent workers when the epoch changes)."""

    def __init__(
        self,
        source: ShardSource,
        members: list[Member],
        classes: list[str],
        *,
        image_size: int,
        channels: int,
        rules: DecodeRules,
        seed: int,
        batch_size: int,
        transform=None,
    ):
        unknown = sorted({m.label for m in members} - set(classes))
        if unknown:
            raise DataError(f"images of labels {unknown} are not among the classes {classes}")
        if not members:
            raise DataError("no samples to stream")
        self.source, self.members, self.classes = source, members, classes
        self.image_size, self.channels, self.rules = image_size, channels, rules
        self.seed, self.batch_size, self.transform = seed, batch_size, transform
        self.rank, self.world_size, self.epoch = 0, 1, 0

    def rank_samples(self) -> tuple[list[Member], list[Member]]:
        """This rank's samples this epoch (padding included, at the end) and the padding alone."""
        order = epoch_order(self.members, self.seed, self.epoch)
        part, pad = rank_part(len(order), self.world_size, self.rank)
        padding = [order[i] for i in pad]
        return [order[i] for i in part] + padding, padding

    def __len__(self) -> int:
        return -(-len(self.members) // self.world_size)

    def __iter__(self):
        samples, _ = self.rank_samples()
        info = get_worker_info()
        if info is not None:
            samples = [samples[i] for i in worker_part(len(samples), info.num_workers, info.id, self.batch_size)]
        index = {c: i for i, c in enumerate(self.classes)}
        for m in samples:
            img = decode_for_model(self.source.read(m), self.image_size, self.channels, self.rules)
            if self.transform is not None:
                img = self.transform(image=img)["image"]
                if img.ndim == 2:
                    img = img[..., None]
            yield torch.from_numpy(np.array(img.transpose(2, 0, 1), copy=True)), index[m.label], m.member
