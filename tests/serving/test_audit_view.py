"""The review page's label audit view through the real app: suspects files written with write_suspects, images as
files and shard members, decisions into the real overrides file (real file locks, real threads)."""

from __future__ import annotations

import hashlib
import threading

import pytest
from fastapi.testclient import TestClient

from tests.helpers import CLASSES, DV, make_project, png, register_champion
from visionflow.config import load_params
from visionflow.data import overrides
from visionflow.data.shards import locator, write_shard
from visionflow.locks import file_lock
from visionflow.monitoring.label_audit import write_suspects
from visionflow.paths import ProjectPaths
from visionflow.serving.app import create_app
from visionflow.serving.audit_view import AlreadyDecided, SuspectFiles
from visionflow.serving.champion import ChampionHolder

TOKEN = "audit-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    proj = make_project(
        root / "proj",
        root,
        registry={"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
        serve={"auth_token_env": "VF_AUDIT_TEST_TOKEN"},
    )
    p = load_params(proj / "params.yaml")
    register_champion(proj, p, CLASSES, tags=DV, seed=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VF_AUDIT_TEST_TOKEN", TOKEN)
        app = create_app(p, proj, holder=ChampionHolder(p.registry.model_name, cache_dir=root / "m"), watch=False)
        with TestClient(app) as client:
            yield proj, p, client


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _row(rank, path, data, label, suggested, scope="train", method="aum", score=-1.5) -> dict:
    return dict(rank=rank, path=path, sha256=_sha(data), label=label, suggested=suggested, score=score,
                method=method, scope=scope)  # fmt: skip


@pytest.fixture
def audit(served, tmp_path):
    """Fresh suspects files in the served project, and no decisions yet: the rows, by name."""
    proj, p, _ = served
    paths = ProjectPaths.of(p, proj)
    for old in [*paths.label_audit.glob("*"), paths.label_overrides]:
        old.unlink(missing_ok=True)
    raw = proj / p.data.raw_dir
    imgs = {name: png(seed) for seed, name in enumerate(["file", "shard", "abs", "gone", "changed", "wolf", "rev"])}
    for name in ("file", "gone", "changed", "wolf", "rev"):
        (raw / "cat").mkdir(parents=True, exist_ok=True)
        (raw / "cat" / f"{name}.png").write_bytes(imgs[name])
    (raw / "cat/gone.png").unlink()
    (raw / "cat/changed.png").write_bytes(png(99))
    (tmp_path / "abs.png").write_bytes(imgs["abs"])
    text = b"not an image, but named by a suspects file"
    (raw / "cat/notes.txt").write_bytes(text)
    _, members = write_shard(raw, [("dog/s.png", imgs["shard"])])
    rows = {
        "file": _row(1, "data/raw/cat/file.png", imgs["file"], "cat", "dog"),
        "shard": _row(2, paths.relative(locator(raw, members[0])), imgs["shard"], "dog", "fox"),
        "abs": _row(3, str(tmp_path / "abs.png"), imgs["abs"], "fox", "cat"),
        "gone": _row(4, "data/raw/cat/gone.png", imgs["gone"], "cat", "fox"),
        "changed": _row(5, "data/raw/cat/changed.png", imgs["changed"], "cat", "fox"),
        "text": _row(6, "data/raw/cat/notes.txt", text, "cat", "dog"),
        "wolf": _row(7, "data/raw/cat/wolf.png", imgs["wolf"], "cat", "wolf"),  # a class the model lacks
    }
    write_suspects(paths.label_audit / "suspects-train.csv", list(rows.values()))
    rows["rev"] = _row(1, "data/raw/cat/rev.png", imgs["rev"], "cat", "dog", "reviewed-b1", "confident-learning", 0.1)
    dup = {**rows["file"], "scope": "reviewed-b1", "rank": 2}  # also in train: listed once, where it comes first
    write_suspects(paths.label_audit / "suspects-reviewed-b1.csv", [rows["rev"], dup])
    return rows, imgs, paths


def _list(client) -> dict:
    r = client.get("/review/audit/suspects", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def _decide(client, row_or_sha, label, **headers):
    sha = row_or_sha if isinstance(row_or_sha, str) else row_or_sha["sha256"]
    return client.post(f"/review/audit/{sha}", json={"label": label}, headers={**AUTH, **headers})


def test_the_list_shows_every_suspect_once_in_order_and_says_what_it_cannot_read(served, audit):
    _, _, client = served
    rows, _, paths = audit
    (paths.label_audit / "suspects-bad.csv").write_text("name,x\n1,2\n")
    (paths.label_audit / "suspects-rows.csv").write_text("rank,path,sha256,label,suggested\n1,x.png,nothex,cat,dog\n")
    (paths.label_audit / "suspects-zz.csv").write_text(f"rank,path,sha256,label,suggested\n1,{'x' * 200_000},x,y,z\n")
    d = _list(client)
    order = ["rev", "file", "shard", "abs", "gone", "changed", "text", "wolf"]
    assert [s["id"] for s in d["suspects"]] == [rows[n]["sha256"] for n in order]
    assert d["suspects"][1] == {
        "id": rows["file"]["sha256"], "scope": "reviewed-b1", "rank": 2, "path": "data/raw/cat/file.png",
        "label": "cat", "suggested": "dog", "score": -1.5, "method": "aum",
    }  # fmt: skip
    assert d["total"] == 8 and d["decided"] == 0 and d["classes"] == CLASSES
    assert d["problems"] == [
        "reports/label_audit/suspects-bad.csv: not a suspects table (missing the columns path, sha256, label, "
        "suggested; expected ('rank', 'path', 'sha256', 'label', 'suggested', 'score', 'method', 'scope'))",
        "reports/label_audit/suspects-rows.csv: 1 row(s) skipped: line 2 needs a 64-hex sha256, a path, a label "
        "and a suggested label",
        "reports/label_audit/suspects-zz.csv: unreadable from line 2 (field larger than field limit (131072)); run "
        "the label audit again",
    ]
    assert client.get("/review/audit/suspects").status_code == 401
    for f in paths.label_audit.glob("*"):
        f.unlink()
    empty = _list(client)
    assert empty["suspects"] == [] and "no suspects files in reports/label_audit" in empty["problems"][0]
    assert client.get("/review", params={"token": TOKEN}).status_code == 200


def test_the_image_endpoint_serves_only_the_images_the_suspects_files_name(served, audit):
    _, _, client = served
    rows, imgs, _ = audit

    def image(sha: str):
        return client.get(f"/review/audit/image/{sha}", headers=AUTH)

    for name in ("file", "shard", "abs"):
        r = image(rows[name]["sha256"])
        assert r.status_code == 200 and r.content == imgs[name], name
        assert r.headers["content-type"] == "image/png" and r.headers["x-content-type-options"] == "nosniff"
    assert image(rows["gone"]["sha256"]).status_code == 410
    changed = image(rows["changed"]["sha256"])
    assert changed.status_code == 410 and "changed since the audit" in changed.json()["detail"]
    assert image(rows["text"]["sha256"]).status_code == 422  # named, with the right hash, but not an image
    for other in (_sha(png(99)), "..%2F..%2Fetc%2Fpasswd", "data%2Fraw%2Fcat%2Ffile.png", "A" * 64):
        assert image(other).status_code == 404, other
    assert client.get(f"/review/audit/image/{rows['file']['sha256']}").status_code == 401


def test_decisions_go_to_the_overrides_file_and_the_decided_leave_the_list(served, audit):
    _, _, client = served
    rows, _, paths = audit
    assert _decide(client, rows["file"], "dog").json() == {
        "id": rows["file"]["sha256"], "label": "dog", "was": "cat", "kept": False
    }  # fmt: skip
    assert _decide(client, rows["shard"], "dog").json()["kept"] is True  # its own label: keep
    assert _decide(client, rows["abs"], "fox").status_code == 200  # a third class: picked
    assert _decide(client, rows["wolf"], "wolf").status_code == 422  # suggested, but not one of the model's
    assert _decide(client, rows["wolf"], "zebra").status_code == 422
    assert _decide(client, rows["gone"], "fox").status_code == 200  # a vanished image can still be decided
    again = _decide(client, rows["file"], "fox")
    assert again.status_code == 409 and "already decided: dog (by review-page" in again.json()["detail"]
    assert _decide(client, _sha(b"not a suspect"), "dog").status_code == 404
    refused = [
        {"Content-Type": "text/plain"},
        {"Origin": "http://evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
    ]
    for headers in refused:
        r = client.post(f"/review/audit/{rows['wolf']['sha256']}", content='{"label": "cat"}',
                        headers={**AUTH, "Content-Type": "application/json", **headers})  # fmt: skip
        assert r.status_code in (403, 415), headers
    no_token = client.post(f"/review/audit/{rows['wolf']['sha256']}", json={"label": "cat"})
    assert no_token.status_code == 401

    decided = overrides.read_overrides(paths.label_overrides)
    want = {"file": ("dog", "cat"), "shard": ("dog", "dog"), "abs": ("fox", "fox"), "gone": ("fox", "cat")}
    assert {s: (o.label, o.was) for s, o in decided.items()} == {rows[n]["sha256"]: w for n, w in want.items()}
    assert {o.source for o in decided.values()} == {"review-page"}
    assert len(paths.label_overrides.read_text().splitlines()) == 1 + 4  # one row each, nothing else
    d = _list(client)
    assert [s["id"] for s in d["suspects"]] == [rows[n]["sha256"] for n in ("rev", "changed", "text", "wolf")]
    assert d["decided"] == 4


def test_a_malformed_overrides_file_is_shown_and_left_alone(served, audit):
    _, _, client = served
    rows, _, paths = audit
    paths.label_overrides.write_text("sha256,label\nnot-a-hash,dog\n")
    d = _list(client)
    assert d["total"] == 8 and any("label overrides" in p for p in d["problems"])
    r = _decide(client, rows["file"], "dog")
    assert r.status_code == 503 and "label overrides" in r.json()["detail"]
    assert paths.label_overrides.read_text() == "sha256,label\nnot-a-hash,dog\n"


def test_concurrent_decisions_make_one_row_per_image(served, audit):
    rows, _, paths = audit
    files = SuspectFiles(paths)
    outcomes: list[str] = []
    targets = [("file", "dog"), ("file", "fox"), ("file", "cat"), ("file", "dog")] + [
        (n, "fox") for n in ("shard", "abs", "gone", "changed", "text", "rev")
    ]

    def decide(name: str, label: str) -> None:
        try:
            files.decide(rows[name]["sha256"], label, lambda: CLASSES)
            outcomes.append(name)
        except AlreadyDecided:
            outcomes.append("refused")

    threads = [threading.Thread(target=decide, args=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == sorted(["file", "refused", "refused", "refused", *[t[0] for t in targets[4:]]])
    lines = paths.label_overrides.read_text().splitlines()
    assert len(lines) == 1 + 7 and len(overrides.read_overrides(paths.label_overrides)) == 7


def test_the_check_and_the_append_are_one_step(served, audit):
    """Another reviewer's decision lands while this one waits for the lock: this one is refused, not appended."""
    rows, _, paths = audit
    files = SuspectFiles(paths)
    sha = rows["rev"]["sha256"]
    result: list = []

    def decide() -> None:
        try:
            result.append(files.decide(sha, "dog", lambda: CLASSES))
        except AlreadyDecided as exc:
            result.append(exc.existing)

    with file_lock(files.lock):
        t = threading.Thread(target=decide)
        t.start()
        t.join(0.3)
        assert t.is_alive(), "the decision did not wait for the lock"
        overrides.append_overrides(paths.label_overrides, [overrides.decision(sha, "fox", "cat", "other-page")])
    t.join()
    assert result[0].source == "other-page"
    assert overrides.read_overrides(paths.label_overrides)[sha].label == "fox"
    assert len(paths.label_overrides.read_text().splitlines()) == 2
