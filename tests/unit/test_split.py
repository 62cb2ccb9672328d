import pandas as pd
import pytest

from visionflow.data.split import SPLITS, assign_splits, leakage_check


def manifest(n_per_class=40, classes=("a", "b", "c"), dup_every=0):
    rows = []
    for c in classes:
        for i in range(n_per_class):
            sha = f"{c}{i}" if not dup_every or i % dup_every else f"{c}{i - 1}"
            rows.append({"path": f"{c}/{i}.png", "label": c, "sha256": sha})
    return pd.DataFrame(rows)


def test_deterministic_and_seed_sensitive():
    m = manifest()
    a = assign_splits(m, val_fraction=0.1, test_fraction=0.2, seed=7)
    b = assign_splits(m, val_fraction=0.1, test_fraction=0.2, seed=7)
    c = assign_splits(m, val_fraction=0.1, test_fraction=0.2, seed=8)
    assert (a == b).all()
    assert not (a == c).all()


def test_stratified_fractions_per_class():
    m = manifest(n_per_class=100)
    s = assign_splits(m, val_fraction=0.1, test_fraction=0.2, seed=0)
    table = pd.crosstab(m["label"], s)
    assert (table["test"] == 20).all() and (table["val"] == 10).all() and (table["train"] == 70).all()


def test_duplicates_share_a_split():
    m = manifest(dup_every=3)
    s = assign_splits(m, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert (m.assign(split=s).groupby("sha256")["split"].nunique() == 1).all()


def test_every_split_gets_every_class_when_possible():
    m = manifest(n_per_class=5)
    s = assign_splits(m, val_fraction=0.05, test_fraction=0.05, seed=0)
    assert set(pd.crosstab(m["label"], s).columns) == set(SPLITS)
    assert (pd.crosstab(m["label"], s) > 0).all().all()


def test_leakage_check_catches_shared_sha():
    m = manifest(n_per_class=5)
    frames = {"train": m.iloc[:10], "val": m.iloc[10:12], "test": pd.concat([m.iloc[12:], m.iloc[:1]])}
    outcome = leakage_check(frames)
    assert not outcome.success
    assert set(outcome.failing["sha256_in_two_splits"]) == {m.iloc[0]["sha256"]}
    clean = leakage_check({"train": m.iloc[:10], "val": m.iloc[10:12], "test": m.iloc[12:]})
    assert clean.success


@pytest.mark.parametrize("frac", [0.0, 0.6])
def test_fractions_validated_by_params(frac):
    from visionflow.config import parse_params
    from visionflow.errors import ConfigError

    with pytest.raises(ConfigError, match="data.test_fraction"):
        parse_params({"data": {"test_fraction": frac}})
