import numpy as np
import pytest

from visionflow.config import RegistryParams
from visionflow.registry.gates import gate_decision, paired_bootstrap_lower, per_class_recall

CFG = RegistryParams(
    accuracy_floor=0.8,
    min_gain=0.0,
    max_class_drop=0.05,
    latency_budget_ms=10,
    bootstrap_samples=2000,
    bootstrap_alpha=0.05,
)
CLASSES = ["a", "b"]


def test_bootstrap_matches_direct_resampling():
    rng = np.random.default_rng(0)
    new = rng.random(3000) < 0.9
    old = rng.random(3000) < 0.88
    gain, lower = paired_bootstrap_lower(new, old, n_boot=4000, alpha=0.05, seed=1)
    diff = new.astype(float) - old.astype(float)
    direct = np.quantile([diff[rng.integers(0, 3000, 3000)].mean() for _ in range(4000)], 0.05)
    assert gain == pytest.approx(diff.mean())
    assert lower == pytest.approx(direct, abs=0.003)
    assert lower < gain


def test_identical_models_do_not_beat_each_other():
    same = np.random.default_rng(0).random(1000) < 0.9
    gain, lower = paired_bootstrap_lower(same, same, n_boot=500, alpha=0.05, seed=0)
    assert gain == 0 and lower == 0


def _gates(new, old=None, labels=None, latency=1.0, parity=True):
    labels = labels if labels is not None else np.arange(len(new)) % 2
    return {
        g.name: g
        for g in gate_decision(
            cfg=CFG,
            parity_passed=parity,
            parity_detail="",
            latency_ms=latency,
            clean_new=new,
            labels=labels,
            classes=CLASSES,
            seed=0,
            clean_old=old,
        )
    }


def test_first_model_needs_only_floor_latency_and_parity():
    good = np.ones(100, bool)
    g = _gates(good)
    assert set(g) == {"parity", "accuracy_floor", "latency"} and all(x.passed for x in g.values())
    assert not _gates(np.zeros(100, bool))["accuracy_floor"].passed
    assert not _gates(good, latency=11)["latency"].passed
    assert not _gates(good, parity=False)["parity"].passed


def test_clear_improvement_passes_and_regression_fails():
    rng = np.random.default_rng(3)
    old = rng.random(2000) < 0.85
    better = old | (rng.random(2000) < 0.5)
    g = _gates(better, old)
    assert g["beats_champion"].passed and g["no_class_regression"].passed
    g = _gates(old, better)
    assert not g["beats_champion"].passed


def test_one_class_collapsing_is_caught():
    labels = np.arange(2000) % 2
    old = np.ones(2000, bool)
    new = np.ones(2000, bool)
    new[(labels == 1) & (np.arange(2000) % 10 == 1)] = False  # class b loses 10% recall
    g = _gates(new, old, labels)
    assert not g["no_class_regression"].passed and "(b)" in g["no_class_regression"].detail


def test_per_class_recall():
    r = per_class_recall(np.array([1, 0, 1, 1], bool), np.array([0, 0, 1, 1]), 3)
    assert r[0] == 0.5 and r[1] == 1.0 and np.isnan(r[2])
