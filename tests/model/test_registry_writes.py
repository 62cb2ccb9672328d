"""Promotion and rollback against a real MLflow registry (SQLite), with a store failure injected at each write.

The failure is real: an SQLite trigger makes the store refuse the write of one alias or tag, the way a full disk,
a lost connection or a read-only database does. Whatever write fails, the registry must be left as it was.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import mlflow
import pytest

from tests.helpers import make_read_only
from visionflow.registry.gates import Gate
from visionflow.registry.store import CHALLENGER, CHAMPION, PREVIOUS, RegistryError, apply_promotion, rollback

NAME = "m"
GATES = [Gate("parity", True, "ok"), Gate("accuracy_floor", True, "ok")]
# Every write apply_promotion makes when it promotes v3 over champion v2 (previous v1), and rollback's writes.
PROMOTION_WRITES = [
    ("alias", CHALLENGER),
    ("tag", "visionflow.gate.parity"),
    ("tag", "visionflow.gate.accuracy_floor"),
    ("tag", "visionflow.parent_champion"),
    ("tag", "visionflow.promoted"),
    ("alias", PREVIOUS),
    ("alias", CHAMPION),
]
ROLLBACK_WRITES = [("tag", "visionflow.rolled_back"), ("alias", PREVIOUS), ("alias", CHAMPION)]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A store with v1, v2, v3: champion v2, previous v1, challenger still v1, and a parity tag on v3 that the
    promotion overwrites (so every write of the promotion changes something)."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    client.create_registered_model(NAME)
    for _ in range(3):
        client.create_model_version(NAME, source=str(db.parent / "nowhere"))
    client.set_registered_model_alias(NAME, PREVIOUS, "1")
    client.set_registered_model_alias(NAME, CHAMPION, "2")
    client.set_registered_model_alias(NAME, CHALLENGER, "1")
    client.set_model_version_tag(NAME, "3", "visionflow.gate.parity", "failed")
    return db


@pytest.fixture
def store(template, tmp_path, monkeypatch) -> Path:
    db = tmp_path / "mlflow.db"
    shutil.copy(template, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    return db


def _state(db: Path) -> tuple[list, list]:
    with sqlite3.connect(db) as con:
        aliases = sorted(con.execute("SELECT alias, version FROM registered_model_aliases").fetchall())
        tags = sorted(con.execute("SELECT version, key, value FROM model_version_tags").fetchall())
    return aliases, tags


def _refuse(db: Path, kind: str, key: str) -> None:
    """The store fails every insert or update of this alias or tag key."""
    table, column = ("registered_model_aliases", "alias") if kind == "alias" else ("model_version_tags", "key")
    with sqlite3.connect(db) as con:
        for op in ("INSERT", "UPDATE"):
            con.execute(
                f"CREATE TRIGGER fail_{op} BEFORE {op} ON {table} WHEN NEW.{column} = '{key}' "
                "BEGIN SELECT RAISE(ABORT, 'injected store failure'); END"
            )


def test_without_a_failure_the_writes_happen(store):
    """The baseline the failure tests compare against: each of the writes below really changes the store."""
    before = _state(store)
    d = apply_promotion(NAME, "3", GATES)
    assert d.promoted and d.champion_before == "2" and d.champion_after == "3"
    aliases, tags = _state(store)
    assert aliases == [(CHALLENGER, 3), (CHAMPION, 3), (PREVIOUS, 2)]
    assert {k for _, k, _ in tags} == {key for kind, key in PROMOTION_WRITES if kind == "tag"}
    assert (aliases, tags) != before
    assert rollback(NAME) == ("3", "2")
    assert _state(store)[0] == [(CHALLENGER, 3), (CHAMPION, 2), (PREVIOUS, 3)]


@pytest.mark.parametrize("kind, key", PROMOTION_WRITES)
def test_a_store_failure_at_any_promotion_write_leaves_the_registry_as_it_was(store, kind, key):
    before = _state(store)
    _refuse(store, kind, key)
    with pytest.raises(RegistryError, match="injected store failure.*unchanged"):
        apply_promotion(NAME, "3", GATES)
    assert _state(store) == before


@pytest.mark.parametrize("kind, key", ROLLBACK_WRITES)
def test_a_store_failure_at_any_rollback_write_leaves_the_registry_as_it_was(store, kind, key):
    before = _state(store)
    _refuse(store, kind, key)
    with pytest.raises(RegistryError, match="injected store failure.*unchanged"):
        rollback(NAME)
    assert _state(store) == before
    # and the next rollback, with the store healthy again, is a real one
    with sqlite3.connect(store) as con:
        con.execute("DROP TRIGGER fail_INSERT")
        con.execute("DROP TRIGGER fail_UPDATE")
    assert rollback(NAME) == ("2", "1")


@pytest.mark.parametrize("previous", ["2", None])
def test_rollback_refuses_a_no_op(store, previous):
    client = mlflow.MlflowClient()
    if previous is None:
        client.delete_registered_model_alias(NAME, PREVIOUS)
    else:
        client.set_registered_model_alias(NAME, PREVIOUS, previous)  # champion and previous both v2
    before = _state(store)
    with pytest.raises(RegistryError, match="previous"):
        rollback(NAME)
    assert _state(store) == before


def test_a_read_only_store_is_a_clear_error(store):
    before = _state(store)
    make_read_only(store)
    with pytest.raises(RegistryError, match="readonly database.*unchanged"):
        apply_promotion(NAME, "3", GATES)
    with pytest.raises(RegistryError, match="readonly database.*unchanged"):
        rollback(NAME)
    assert _state(store) == before
