"""train.channels "auto" and the image-size hint, decided from the modes and sizes a split manifest records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import REPO
from visionflow.config import load_params
from visionflow.data.validate import MANIFEST_COLUMNS
from visionflow.training.datamodule import decide_input

GREY = ["L", "1", "LA", "I;16", "I", "F"]
COLOUR = ["RGB", "RGBA", "P", "CMYK", "YCbCr"]


def manifest(tmp_path: Path, modes: list[str], sizes: list[tuple[int, int]] | None = None) -> Path:
    sizes = sizes or [(28, 28)] * len(modes)
    rows = [
        dict.fromkeys(MANIFEST_COLUMNS, "") | {"path": f"x/{i}.png", "label": "a", "mode": m, "width": w, "height": h}
        for i, (m, (w, h)) in enumerate(zip(modes, sizes))
    ]
    path = tmp_path / "train.csv"
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("seed", range(6))
def test_auto_follows_the_majority_of_modes(tmp_path, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 200))
    minority = int(rng.integers(0, n // 10 + 1))  # a few odd files never flip the decision
    for majority, other, want in ((COLOUR, GREY, 3), (GREY, COLOUR, 1)):
        modes = list(rng.choice(majority, n - minority)) + list(rng.choice(other, minority))
        d = decide_input(manifest(tmp_path, modes), "auto", 28)
        assert d.channels == want, (modes, d)
        assert "auto" in d.note and f"-> {want}" in d.note


def test_explicit_channels_are_kept_and_a_grey_setting_on_colour_data_is_called_out(tmp_path):
    path = manifest(tmp_path, ["RGB"] * 50)
    d = decide_input(path, 1, 28)
    assert d.channels == 1 and "train as grey" in d.note and "auto" in d.note
    assert decide_input(path, 3, 28).channels == 3
    assert "train as grey" not in decide_input(manifest(tmp_path, ["L"] * 50), 1, 28).note


def test_the_bundled_default_stays_grey_28_px(tmp_path):
    """params.yaml's defaults on Fashion-MNIST's manifest (28x28, mode L): grey, 28 px, no hint."""
    p = load_params(REPO / "params.yaml")
    assert p.train.channels == "auto" and p.train.image_size == 28
    d = decide_input(manifest(tmp_path, ["L"] * 300), p.train.channels, p.train.image_size)
    assert (d.channels, d.image_size, d.hint) == (1, 28, None)


@pytest.mark.parametrize(
    ("side", "image_size", "suggested"),
    [(100, 28, 96), (64, 28, 64), (500, 28, 224), (56, 28, 48), (300, 64, 224), (130, 64, 128)],
)
def test_large_images_get_a_size_hint(tmp_path, side, image_size, suggested):
    rng = np.random.default_rng(side)
    sizes = [(int(side + rng.integers(0, 40)), side) for _ in range(31)]
    d = decide_input(manifest(tmp_path, ["RGB"] * 31, sizes), "auto", image_size)
    assert d.hint is not None and f"train.image_size: {suggested}" in d.hint, d.hint
    assert d.median_size[1] == side


@pytest.mark.parametrize(("side", "image_size"), [(28, 28), (40, 28), (55, 28), (100, 64)])
def test_no_hint_when_the_images_are_about_the_training_size(tmp_path, side, image_size):
    d = decide_input(manifest(tmp_path, ["RGB"] * 11, [(side, side)] * 11), "auto", image_size)
    assert d.hint is None


def test_small_images_are_said_to_be_upscaled(tmp_path):
    d = decide_input(manifest(tmp_path, ["L"] * 11, [(16, 20)] * 11), "auto", 28)
    assert d.hint is not None and "upscaled" in d.hint and "train.image_size: 16" in d.hint


def test_a_manifest_without_modes_is_decided_from_the_image_headers(tmp_path):
    """Hand-written manifests (path, label), as the benchmarks write them."""
    from PIL import Image

    rows = []
    for i, (mode, size) in enumerate([("RGB", (60, 64))] * 5 + [("L", (60, 64))] * 2):
        path = tmp_path / f"{i}.png"
        Image.new(mode, size).save(path)
        rows.append({"path": str(path), "label": "a"})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    d = decide_input(tmp_path / "m.csv", "auto", 28)
    assert d.channels == 3 and d.median_size == (60, 64) and "train.image_size: 48" in d.hint
