"""Streaming shards from a DVC remote on a local path (real `dvc push`, no checkout): every image comes back as
stored, shards are fetched only when needed, a damaged download is refused and never cached, and two ranks' loaders
(with workers) see disjoint parts that cover the data once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from tests.helpers import make_folder_dataset, make_project
from visionflow.config import load_params
from visionflow.data import shards
from visionflow.data.imageio import DecodeRules
from visionflow.data.shard_stream import Remote, ShardSource, StreamingShards, project_remote
from visionflow.data.shards import ShardError
from visionflow.errors import DataError


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """A sharded project (several shards), versioned and pushed to its local-path DVC remote."""
    from visionflow import stages

    base = tmp_path_factory.mktemp("stream")
    src = make_folder_dataset(base / "images", per_class=12, size=16)
    root = make_project(base / "proj", src, data={"layout": "shards", "shard_mb": 0.01})
    p = load_params(root / "params.yaml")
    stages.ingest_stage(p, root)
    stages.version_stage(p, root)
    return root


def _source(root: Path, cache: Path, remote: Remote | None = None) -> ShardSource:
    src = ShardSource.from_project(root, cache)
    return src if remote is None else ShardSource(remote, src.dir_md5, cache)


def test_members_and_bytes_match_the_checked_out_shards(pushed, tmp_path):
    raw = pushed / "data/raw"
    source = _source(pushed, tmp_path / "cache")
    members = source.members()
    assert members == shards.read_index(raw)
    assert len({m.shard for m in members}) >= 4
    assert not list((tmp_path / "cache").glob("*.tar"))  # the listing and indexes only, so far
    first = members[0]
    assert source.read(first) == shards.read_member(raw / first.shard, first.member)
    assert [p.name for p in (tmp_path / "cache").glob("*.tar")] == [first.shard]  # fetched on demand
    for m in members:
        assert source.read(m) == shards.read_member(raw / m.shard, m.member)


def test_two_ranks_with_workers_cover_the_data_once(pushed, tmp_path):
    source = _source(pushed, tmp_path / "cache")
    members = source.members()
    seen, lens = [], []
    for rank in (0, 1):
        ds = StreamingShards(
            source, members, ["cat", "dog", "fox"], image_size=8, channels=1, rules=DecodeRules(), seed=3, batch_size=4
        )
        ds.rank, ds.world_size = rank, 2
        loader = DataLoader(ds, batch_size=4, num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader)  # what Lightning counts on for the schedule and DDP
        lens.append(len(batches))
        x, y, keys = batches[0]
        assert x.dtype.is_floating_point is False and tuple(x.shape[1:]) == (1, 8, 8)
        assert all(ds.classes[int(label)] == k.split("/")[0] for label, k in zip(y, keys))
        got = [k for b in batches for k in b[2]]
        pad = [m.member for m in ds.rank_samples()[1]]
        for k in pad:
            got.remove(k)
        seen.append(got)
    assert lens[0] == lens[1]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [m.member for m in members]


def test_a_changed_shard_on_the_remote_is_refused_and_not_cached(pushed, tmp_path):
    remote = tmp_path / "remote"
    shutil.copytree(project_remote(pushed).url, remote)
    source = _source(pushed, tmp_path / "cache", Remote(str(remote)))
    victim = source.members()[0].shard
    obj = remote / "files/md5" / source.listing()[victim][:2] / source.listing()[victim][2:]
    data = bytearray(obj.read_bytes())
    data[-1] ^= 0xFF
    obj.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{victim}.*does not match its DVC md5"):
        source.shard_path(victim)
    assert not (tmp_path / "cache" / victim).exists()
    assert not list((tmp_path / "cache").glob(".partial-*"))  # nothing half-written left behind
    obj.unlink()
    with pytest.raises(ShardError, match=f"{victim}.*missing on the remote"):
        source.shard_path(victim)


def test_no_remote_and_wrong_labels_are_clear_errors(pushed, tmp_path):
    (tmp_path / ".dvc").mkdir()
    with pytest.raises(DataError, match="no DVC remote"):
        project_remote(tmp_path)
    source = _source(pushed, tmp_path / "cache")
    with pytest.raises(DataError, match="not among the classes"):
        StreamingShards(
            source, source.members(), ["cat"], image_size=8, channels=1, rules=DecodeRules(), seed=0, batch_size=2
        )


def test_streaming_entry_point_exits_2_on_bad_input(pushed, tmp_path, capsys):
    from visionflow.training.streaming import main

    assert main(["--project", str(tmp_path), "--keys-dir", str(tmp_path / "k")]) == 2
    assert "params.yaml" in capsys.readouterr().err
    # not split yet: says to run split, or to stream everything
    assert main(["--project", str(pushed), "--keys-dir", str(tmp_path / "k")]) == 2
    assert "--split none" in capsys.readouterr().err
    # 36 images, 18 per rank: a batch size of 17 would leave a last batch of one, which batch norm cannot train on
    args = ["--project", str(pushed), "--keys-dir", str(tmp_path / "k"), "--split", "none", "--channels", "1"]
    assert main([*args, "--cache-dir", str(tmp_path / "c"), "--set", "train.batch_size=17"]) == 2
    assert "last batch holds one sample" in capsys.readouterr().err
