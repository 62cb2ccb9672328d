"""A reviewed batch is audited against the champion (confident learning, thresholds from its test split) before
it joins the data: too many suspected label errors hold it back until it is re-reviewed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import champion_project, make_folder_dataset, make_project, use_mlflow
from visionflow.config import load_params
from visionflow.data.imageio import DecodeRules
from visionflow.data.overrides import append_overrides, decision
from visionflow.errors import DataError
from visionflow.monitoring.batch_audit import take_in_audited
from visionflow.monitoring.label_audit import class_thresholds, confident_class
from visionflow.paths import ProjectPaths


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """(project, params, champion probabilities on the 42 batch images, their files, classes)."""
    from visionflow.data.validate import read_manifest
    from visionflow.monitoring.drift import load_champion
    from visionflow.monitoring.drift_features import extract

    proj, batch = champion_project(tmp_path_factory.mktemp("audit"))
    p = load_params(proj / "params.yaml")
    use_mlflow(p, proj)
    _, session, card = load_champion(p, proj)
    rules = DecodeRules.from_params(p.validation)
    files = sorted(Path(batch).iterdir())
    probs = extract(files, session, card, rules).probabilities
    test = read_manifest(proj / "data/splits/test.csv").sort_values("path")
    test_probs = extract([proj / x for x in test["path"]], session, card, rules).probabilities
    classes = list(card["classes"])
    thresholds = class_thresholds(np.array([classes.index(c) for c in test["label"]]), test_probs)
    return proj, p, probs, files, classes, thresholds


def _batch(proj: Path, name: str, files: list[Path], labels: list[str]) -> Path:
    folder = proj / "batches" / name
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, folder / "images" / f.name)
    pd.DataFrame({"file": [f.name for f in files], "label": labels}).to_csv(folder / "labels.csv", index=False)
    return folder


def test_a_batch_with_many_suspects_is_held_until_re_reviewed(project):
    proj, p, probs, files, classes, thresholds = project
    paths = ProjectPaths.of(p, proj)
    # the least likely class for each image: wherever a class confidently holds, the label is suspect
    wrong = [classes[k] for k in probs.argmin(1)]
    confident, suggested = confident_class(probs, thresholds)
    expected = {
        hashlib.sha256(f.read_bytes()).hexdigest(): lab
        for f, ok, s, lab in zip(files, confident, suggested, wrong)
        if ok and classes[s] != lab
    }
    assert len(expected) / len(files) > p.review.max_suspect_share, "the fixture must give a batch to hold"
    batch = _batch(proj, "noisy", files, wrong)
    taken = take_in_audited(p, proj, batch, None)
    audit = taken["audit"]
    assert taken["images"] == {} and audit["held"] and audit["n_audited"] == len(files)
    assert audit["suspects"] == len(expected) and audit["suspect_share"] == round(len(expected) / len(files), 4)
    # sha256 as text: pandas' C parser crashes (SIGSEGV, pandas 2.3.3) on a hash like "48e7935590960911..." read as
    # a float with a huge exponent
    suspects = pd.read_csv(proj / audit["suspects_file"], dtype={"sha256": str, "path": str})
    assert set(suspects["sha256"]) == set(expected) and list(suspects["rank"]) == list(range(1, len(expected) + 1))
    assert set(suspects["method"]) == {"confident-learning"} and set(suspects["scope"]) == {"reviewed-noisy"}
    assert list(suspects["score"]) == sorted(suspects["score"]) and all((proj / x).is_file() for x in suspects["path"])
    record = json.loads((paths.held_batches / "noisy.json").read_text())
    assert "max_suspect_share" in record["reason"] and record["suspects_file"] == audit["suspects_file"]
    assert not any(paths.reviewed.rglob("noisy__*")), "a held batch is not copied into the reviewed images"
    # re-reviewed: a person kept every suspect's label; the batch now goes through and the record goes
    append_overrides(paths.label_overrides, [decision(sha, lab, lab, "test") for sha, lab in expected.items()])
    again = take_in_audited(p, proj, batch, None)
    assert not again["audit"]["held"] and again["audit"]["released"] and again["audit"]["decided"] == len(expected)
    assert sum(again["images"].values()) == len(files) and not (paths.held_batches / "noisy.json").exists()


def test_a_batch_labelled_like_the_champion_is_taken_in(project):
    proj, p, probs, files, classes, thresholds = project
    ProjectPaths.of(p, proj).label_overrides.unlink(missing_ok=True)  # no decisions: every suspect counts
    confident, suggested = confident_class(probs, thresholds)
    labels = [classes[s if ok else k] for ok, s, k in zip(confident, suggested, probs.argmax(1))]
    batch = _batch(proj, "agreed", files, labels)
    # a person asked to label only some (the budgeted selection): only those are audited and taken in
    from visionflow.monitoring.selection import batch_name

    chosen = {batch_name(batch, f) for f in sorted((batch / "images").iterdir())[:3]}
    some = take_in_audited(p, proj, batch, None, only=chosen)
    assert some["audit"]["n_audited"] == 3 and sum(some["images"].values()) == 3
    taken = take_in_audited(p, proj, batch, None)
    assert not taken["audit"]["held"] and taken["audit"]["suspects"] == 0
    assert sum(taken["images"].values()) == len(files)


def test_on_a_drifted_batch_the_limit_grows_by_the_champions_predicted_error(project):
    proj, p, probs, files, classes, thresholds = project
    ProjectPaths.of(p, proj).label_overrides.unlink(missing_ok=True)
    wrong = [classes[k] for k in probs.argmin(1)]
    batch = _batch(proj, "drifted", files, wrong)
    plain = take_in_audited(p, proj, batch, None)["audit"]
    assert plain["held"] and plain["threshold"] == p.review.max_suspect_share, plain
    # a champion predicted right half the time: limit 0.2 + 0.5 = 0.7
    held = take_in_audited(p, proj, batch, None, predicted_accuracy=0.5)
    assert held["audit"]["threshold"] == 0.7 and held["audit"]["held"] == (plain["suspect_share"] > 0.7)
    if held["audit"]["held"]:
        assert "predicted error 50%" in held["audit"]["reason"]
    # predicted to be always wrong: its disagreement says nothing, the batch is taken in
    taken = take_in_audited(p, proj, batch, None, predicted_accuracy=0.0)
    assert taken["audit"]["threshold"] == 1.0 and not taken["audit"]["held"]
    assert sum(taken["images"].values()) == len(files)


def test_bad_batches_are_clear_and_lose_nothing(project):
    proj, p, _, files, classes, _ = project
    reviewed = ProjectPaths.of(p, proj).reviewed
    before = sorted(reviewed.rglob("*"))
    batch = _batch(proj, "zebra", files[:3], ["zebra", classes[0], ""])
    with pytest.raises(DataError, match="zebra"):
        take_in_audited(p, proj, batch, None)
    assert sorted(reviewed.rglob("*")) == before and len(list((batch / "images").iterdir())) == 3
    empty = _batch(proj, "empty", [], [])
    taken = take_in_audited(p, proj, empty, None)
    assert taken == {"images": {}, "audit": taken["audit"]} and taken["audit"]["status"] == "empty"
    # an empty label cell is no label: that image is left out, the others are taken in
    unlabelled = _batch(proj, "partly", files[:2], [classes[0], ""])
    assert take_in_audited(p, proj, unlabelled, None)["images"] == {classes[0]: 1}


def test_without_a_champion_the_batch_is_taken_in_unaudited(tmp_path):
    src = make_folder_dataset(tmp_path / "images", per_class=2)
    proj = make_project(tmp_path / "proj", src, registry={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    p = load_params(proj / "params.yaml")
    use_mlflow(p, proj)
    batch = _batch(proj, "early", sorted((src / "cat").iterdir()), ["cat", "cat"])
    taken = take_in_audited(p, proj, batch, ["cat", "dog", "fox"])
    assert taken["images"] == {"cat": 2} and taken["audit"]["status"] == "skipped"
    assert "no champion" in taken["audit"]["note"]
