"""The demo loop's batches are sized to the held-out pool (a user's small dataset), or the loop is skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.helpers import make_project
from visionflow.config import load_params
from visionflow.monitoring.simulate import load_batch, loop_batch_size, simulate


def project_with_test_split(tmp_path: Path, n_test: int, mode: str = "RGB") -> Path:
    """A project whose test split lists n_test real images (what the loop draws from for a folder dataset)."""
    proj = make_project(tmp_path / "proj", tmp_path / "src")
    rng = np.random.default_rng(n_test)
    rows = []
    for i in range(n_test):
        path = proj / "data/raw" / f"c{i % 3}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (12, 12, 3) if mode == "RGB" else (12, 12)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)
        rows.append({"path": str(path), "label": f"c{i % 3}"})
    (proj / "data/splits").mkdir(parents=True)
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(proj / "data/splits/test.csv", index=False)
    return proj


@pytest.mark.parametrize(
    ("pool", "batch_size", "min_batch"),
    [(270, 500, 30), (271, 500, 30), (60, 500, 30), (2000, 500, 30), (1000, 500, 30), (40, 10, 5), (33, 100, 16)],
)
def test_batches_fit_the_pool_and_never_overlap(tmp_path, pool, batch_size, min_batch):
    proj = project_with_test_split(tmp_path, pool)
    p = load_params(proj / "params.yaml", [f"drift.batch_size={batch_size}", f"drift.min_batch_size={min_batch}"])
    size = loop_batch_size(p, proj)
    assert size.pool == pool
    assert size.n == min(batch_size, pool // 2) >= min_batch
    assert ("more than half" in size.note) == (size.n < batch_size), size.note
    # the closed loop's two batches: one seeded draw, split in two (shift "none" keeps the pixels, so an image
    # drawn twice would show up in both)
    a = simulate(p, proj, proj / "a", shift="none", severity=1, n=size.n, seed=7)
    b = simulate(p, proj, proj / "b", shift="none", severity=1, n=size.n, seed=7, skip=size.n)
    pixels = [{Image.open(f).tobytes() for f in batch.images} for batch in (a, b)]
    assert len(pixels[0]) == len(pixels[1]) == size.n and not pixels[0] & pixels[1]
    assert len(load_batch(proj / "b").labels) == size.n and b.meta["skip"] == size.n


@pytest.mark.parametrize(("pool", "min_batch"), [(59, 30), (9, 5), (0, 5), (1, 5)])
def test_a_pool_too_small_for_a_verdict_skips_the_loop_with_a_note(tmp_path, pool, min_batch):
    proj = project_with_test_split(tmp_path, pool)
    p = load_params(proj / "params.yaml", [f"drift.min_batch_size={min_batch}"])
    size = loop_batch_size(p, proj)
    assert size.n == 0 and "skipped" in size.note and str(pool) in size.note and "min_batch_size" in size.note


def test_a_draw_past_the_pool_is_a_clear_error(tmp_path):
    from visionflow.errors import DataError

    proj = project_with_test_split(tmp_path, 20)
    p = load_params(proj / "params.yaml")
    with pytest.raises(DataError, match="after the first 15"):
        simulate(p, proj, proj / "x", shift="none", severity=1, n=10, seed=0, skip=15)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_simulated_images_keep_the_source_colour_mode(tmp_path, mode):
    """Batches look like what the camera sends, whatever train.channels says."""
    proj = project_with_test_split(tmp_path, 10, mode)
    p = load_params(proj / "params.yaml")
    batch = simulate(p, proj, proj / "x", shift="darker", severity=2, n=4, seed=0)
    assert {Image.open(f).mode for f in batch.images} == {mode}
