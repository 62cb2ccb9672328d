"""A moved (or cloned) project keeps its data files, its DVC hashes, its cache and its run key: every path a data
file stores is relative to the project root and resolved against it at read time."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from tests.helpers import make_folder_dataset, make_project
from visionflow.config import load_params
from visionflow.data.cache import build_cache
from visionflow.paths import ProjectPaths
from visionflow.stages import ingest_stage, split_stage, validate_stage, version_stage
from visionflow.training.train import run_key

CLASSES = ["cat", "dog", "fox"]


def _data_files(proj):
    """Every data file that names images, with the text it stores."""
    files = [
        proj / "data/validated/manifest.csv",
        proj / "data/quarantine/reasons.csv",
        *sorted((proj / "data/splits").glob("*.csv")),
        *sorted((proj / "data/cache").glob("*/paths.json")),
        *sorted((proj / "data/cache").glob("*/quarantine.json")),
        proj / "reports/validation/validation.json",
    ]
    return {f.relative_to(proj).as_posix(): f.read_text() for f in files}


def _pipeline(proj):
    """The data stages as the training flow runs them, then the test split's cache."""
    p = load_params(proj / "params.yaml")
    ingest_stage(p, proj)
    validate_stage(p, proj, data_version=None)
    split_stage(p, proj)
    paths = ProjectPaths.of(p, proj)
    cache = build_cache(
        paths.splits / "test.csv", paths.cache, classes=CLASSES, image_size=16, channels=1, project=paths
    )
    return p, cache


def _dvc_status(proj) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json", "validate", "split"],
        cwd=proj,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout or "{}")


def test_a_moved_project_keeps_its_data_files_dvc_hashes_cache_and_run_key(tmp_path):
    src = make_folder_dataset(tmp_path / "images", per_class=12)
    (src / "cat" / "broken.png").write_bytes(b"not an image")  # quarantined: reasons.csv names it
    proj = make_project(tmp_path / "a" / "proj", src, validate={"max_quarantine_fraction": 0.5})
    p, cache = _pipeline(proj)
    version_stage(p, proj, push=False)
    subprocess.run(
        [sys.executable, "-m", "dvc", "commit", "--force", "validate", "split"],
        cwd=proj,
        capture_output=True,
        check=True,
    )
    before = _data_files(proj)
    assert len(before) >= 7 and "broken.png" in before["data/quarantine/reasons.csv"]
    for name, text in before.items():
        assert str(tmp_path) not in text, f"{name} stores an absolute path"
    key = run_key(p, "v1", proj / "data/splits")
    pixels = np.array(cache.images)

    (tmp_path / "b").mkdir()
    moved = Path(shutil.move(proj, tmp_path / "b" / "proj"))
    assert not proj.exists()
    assert _dvc_status(moved) == {}  # the recorded hashes still hold where the project now is
    p, again = _pipeline(moved)  # the flow runs validate and split again: the same bytes come out
    assert _data_files(moved) == before
    # great_expectations.json in the (uncached) report holds ids GX draws anew on every run, moved or not
    assert _dvc_status(moved) in ({}, {"validate": [{"changed outs": {"reports/validation": "modified"}}]})
    assert again.folder.name == cache.folder.name and again.build_seconds == 0.0, "the cache was rebuilt"
    assert np.array_equal(np.asarray(again.images), pixels)
    assert run_key(p, "v1", moved / "data/splits") == key
    # and what the files name is read from the moved project
    manifest = pd.read_csv(moved / "data/validated/manifest.csv")
    assert all((moved / path).is_file() for path in manifest["path"])
