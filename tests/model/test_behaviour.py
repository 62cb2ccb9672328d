"""Behaviour tests on a model trained on real Fashion-MNIST images (a small, fast configuration)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import REPO, use_mlflow
from visionflow import stages
from visionflow.config import load_params
from visionflow.data.cache import build_cache
from visionflow.training.evaluate import predict_logits
from visionflow.training.robustness import corrupt_batch
from visionflow.training.train import load_classifier

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import shutil
    import subprocess

    import yaml

    proj = tmp_path_factory.mktemp("fmnist")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(max_images=3000)
    params["train"].update(max_epochs=4, num_workers=0)
    params["registry"]["tracking_uri"] = f"sqlite:///{proj / 'mlflow.db'}"
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(REPO / "dvc.yaml", proj / "dvc.yaml")
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    p = load_params(proj / "params.yaml")
    stages.ingest_stage(p, proj)
    stages.validate_stage(p, proj, None)
    stages.split_stage(p, proj)
    use_mlflow(p, proj)
    stages.train_stage(p, proj, None, progress=False)
    model = load_classifier(proj / "models/model.ckpt")
    test = build_cache(
        proj / "data/splits/test.csv",
        proj / "data/cache",
        classes=list(model.hparams.classes),
        image_size=model.hparams.image_size,
        channels=model.hparams.channels,
    )
    return model, np.asarray(test.images), test.labels


def test_learns_far_above_chance(trained):
    model, images, labels = trained
    acc = (predict_logits(model.net, images).argmax(1) == labels).mean()
    assert acc > 0.75, acc


@pytest.mark.parametrize("delta", [-6, 6])
def test_invariant_to_small_brightness_change(trained, delta):
    model, images, _ = trained
    before = predict_logits(model.net, images).argmax(1)
    shifted = np.clip(images.astype(np.int16) + delta, 0, 255).astype(np.uint8)
    after = predict_logits(model.net, shifted).argmax(1)
    assert (before == after).mean() >= 0.95


def test_heavy_corruption_hurts_more_than_light(trained):
    model, images, labels = trained
    light = (predict_logits(model.net, corrupt_batch(images, "noise", 1)).argmax(1) == labels).mean()
    heavy = (predict_logits(model.net, corrupt_batch(images, "noise", 5)).argmax(1) == labels).mean()
    assert heavy < light


def test_prediction_does_not_depend_on_batch_composition(trained):
    model, images, _ = trained
    alone = np.concatenate([predict_logits(model.net, images[i : i + 1]) for i in range(20)])
    together = predict_logits(model.net, images[:20])
    np.testing.assert_allclose(alone, together, rtol=1e-4, atol=1e-4)
