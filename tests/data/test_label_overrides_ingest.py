"""Ingest applies the label overrides file (data.label_overrides): a corrected image lands in its new class in the
next data version, the source stays untouched, and bad rows are said clearly."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from tests.helpers import make_folder_dataset, make_project, png, run_cli
from visionflow import stages
from visionflow.config import load_params
from visionflow.data import shards
from visionflow.data.ingest import ingest
from visionflow.data.overrides import append_overrides, decision


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _project(tmp_path: Path, **params) -> tuple[Path, Path]:
    src = make_folder_dataset(tmp_path / "images", per_class=4)
    return make_project(tmp_path / "proj", src, **params), src


def _ingest(proj: Path):
    return stages.ingest_stage(load_params(proj / "params.yaml"), proj)


def test_a_label_change_moves_the_copy_and_a_changed_file_ingests_again(tmp_path):
    proj, src = _project(tmp_path)
    moved = src / "cat" / "cat_0000.png"
    before = moved.read_bytes()
    overrides = proj / "data/label_overrides.csv"
    append_overrides(
        overrides,
        [
            decision(_sha(moved), "dog", "cat", "test"),
            decision(_sha(src / "fox" / "fox_0001.png"), "fox", "fox", "test"),  # a keep: changes nothing
            decision("ab" * 32, "fox", "cat", "test"),  # an image the data does not hold
        ],
    )
    res = _ingest(proj)
    raw = proj / "data/raw"
    assert (raw / "dog" / "cat_0000.png").read_bytes() == before and not (raw / "cat" / "cat_0000.png").exists()
    assert moved.read_bytes() == before, "the source file must stay untouched"
    assert res.classes == {"cat": 3, "dog": 5, "fox": 4} and res.overrides_applied == 1
    assert res.overrides_missing == ("ab" * 32,)
    again = _ingest(proj)
    assert again.skipped and again.overrides_applied == 1 and again.overrides_missing == ("ab" * 32,)
    # a later row puts the image back: the overrides file changed, so ingest runs again
    append_overrides(overrides, [decision(_sha(moved), "cat", "dog", "test")])
    back = _ingest(proj)
    assert not back.skipped and back.overrides_applied == 0 and (raw / "cat" / "cat_0000.png").is_file()
    assert back.classes == {"cat": 4, "dog": 4, "fox": 4}


def test_shards_and_reviewed_images_take_the_override_and_dvc_tracks_the_file(tmp_path):
    proj, src = _project(tmp_path, data={"layout": "shards", "shard_mb": 0.001})
    p = load_params(proj / "params.yaml")
    reviewed = proj / "data/reviewed/cat/r1.png"
    reviewed.parent.mkdir(parents=True)
    reviewed.write_bytes(png(3))
    stages.ingest_stage(p, proj)
    first = stages.version_stage(p, proj, push=False).data_version
    untouched = {m.shard for m in shards.read_index(proj / "data/raw") if m.label == "fox"}
    append_overrides(
        proj / "data/label_overrides.csv",
        [
            decision(_sha(src / "dog" / "dog_0002.png"), "cat", "dog", "test"),
            decision(_sha(reviewed), "fox", "cat", "test"),
        ],
    )
    res = stages.ingest_stage(p, proj)
    assert res.overrides_applied == 2 and res.overrides_missing == ()
    members = {m.member: m for m in shards.read_index(proj / "data/raw")}
    assert "cat/dog_0002.png" in members and "dog/dog_0002.png" not in members
    assert "fox/reviewed__r1.png" in members and "cat/reviewed__r1.png" not in members
    assert res.classes == {"cat": 5, "dog": 3, "fox": 5}
    assert untouched <= {m.shard for m in members.values()}, "shards without a moved image keep their names"
    assert shards.verify(proj / "data/raw") == [] and shards.verify_hashes(proj / "data/raw") == []
    second = stages.version_stage(p, proj, push=False).data_version
    assert second != first, "the corrected data is a new data version"
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]["ingest"]
    assert "data/label_overrides.csv" in {d["path"] for d in lock["deps"]}


def test_an_override_naming_an_unknown_class_stops_ingest_before_anything_is_written(tmp_path):
    proj, src = _project(tmp_path)
    append_overrides(
        proj / "data/label_overrides.csv", [decision(_sha(src / "cat" / "cat_0000.png"), "zebra", "cat", "test")]
    )
    proc = run_cli(proj, "ingest", check=False)
    assert proc.returncode == 2 and "'zebra'" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (proj / "data/raw").exists()


def test_the_overrides_file_is_created_when_missing_and_data_labels_limit_the_classes(tmp_path):
    proj, src = _project(tmp_path, data={"labels": ["cat", "dog"]})
    (proj / "data/label_overrides.csv").unlink()
    _ingest(proj)
    assert (proj / "data/label_overrides.csv").read_text().startswith("sha256,label,was")
    append_overrides(proj / "data/label_overrides.csv", [decision("cd" * 32, "dog", "cat", "test")])
    proc = run_cli(proj, "ingest")
    out = proc.stdout + proc.stderr
    warning = [line for line in out.splitlines() if "not in the data" in line]
    assert len(warning) == 1 and "1 label change(s)" in warning[0] and "cd" * 32 in warning[0], out
    append_overrides(
        proj / "data/label_overrides.csv", [decision(_sha(src / "cat" / "cat_0000.png"), "fox", "cat", "test")]
    )
    proc = run_cli(proj, "ingest", check=False)
    assert proc.returncode == 2 and "'fox'" in proc.stderr


@pytest.mark.slow
def test_the_bundled_source_takes_overrides_in_the_shard_layout(tmp_path):
    def run():
        return ingest(
            source="fashion-mnist",
            raw_dir=tmp_path / "raw",
            max_images=20,
            seed=0,
            cache_dir=tmp_path / "cache",
            shard_bytes=8192,
            label_overrides=tmp_path / "overrides.csv",
        )

    run()
    trouser = next(m for m in shards.read_index(tmp_path / "raw") if m.label == "trouser")
    append_overrides(tmp_path / "overrides.csv", [decision(trouser.sha256, "bag", "trouser", "test")])
    res = run()
    assert not res.skipped and res.overrides_applied == 1 and res.classes["trouser"] == 1 and res.classes["bag"] == 3
    moved = {m.member: m for m in shards.read_index(tmp_path / "raw")}["bag/" + trouser.member.split("/", 1)[1]]
    assert moved.sha256 == trouser.sha256 and shards.verify(tmp_path / "raw") == []
