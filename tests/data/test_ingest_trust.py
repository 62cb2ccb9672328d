"""Ingest against hostile and unlucky source folders (issue 21, items 2, 8, 9, 10): unsafe class names are refused,
no good image is lost to a name collision, symlinks never lead out of the source, and files that cannot be read
are skipped with a reason instead of crashing the stage."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import make_folder_dataset, run_cli
from visionflow.data import folder_source
from visionflow.data import ingest as ingest_mod
from visionflow.data.ingest import REVIEWED_PREFIX, ingest
from visionflow.errors import DataError

MAX_CLASS_NAME = 64  # the documented limit

HOSTILE = [
    "<",
    ">",
    '"',
    "'",
    "&",
    "/",
    "\\",
    "\x00",
    "\x01",
    "\x1b",
    "\x7f",
    "\t",
    "\n",
    "\r",
    "\u202e",
    "\u200b",
    "\u00a0",
    "`",
    "$",
    "{",
    "}",
    ";",
    "|",
    "*",
    "?",
    ":",
    "%",
    "=",
    "(",
    "#",
    "\u2028",
    "\ufeff",
]
GOOD = [
    "cat",
    "tshirt_top",
    "ankle-boot",
    "size 10",
    "v1.2",
    "Größe",
    "猫",
    "собака",
    "Cafe\u0301",
    "9lives",
    "A",
    "x" * MAX_CLASS_NAME,
]


def _ingest(src: Path, root: Path, **kw):
    return ingest(source=str(src), raw_dir=root / "raw", max_images=None, seed=0, cache_dir=root / "cache", **kw)


def _contents(folder: Path) -> Counter:
    return Counter(hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.rglob("*") if f.is_file())


def _bad_names(n: int, seed: int) -> list[str]:
    """A hostile character at a random place in a good name, plus names bad by shape."""
    r = random.Random(seed)
    names = []
    for _ in range(n):
        base = r.choice(GOOD[:-1])
        k = r.randrange(len(base) + 1)
        names.append(base[:k] + r.choice(HOSTILE) + base[k:])
    return names + [
        "",
        ".",
        "..",
        ".hidden",
        " lead",
        "trail ",
        "trail.",
        "-dash",
        "_under",
        "<script>alert(1)</script>",
        "x" * (MAX_CLASS_NAME + 1),
        "<img src=x onerror=alert(1)>",
        "a\u0301\u200d",
    ]


# --- item 2: class names ------------------------------------------------------------------------------------------


def test_class_name_rule_accepts_plain_text_in_any_script():
    assert [n for n in GOOD if folder_source.class_name_problem(n)] == []


@pytest.mark.parametrize("seed", range(4))
def test_class_name_rule_refuses_every_unsafe_name(seed):
    for name in _bad_names(40, seed):
        problem = folder_source.class_name_problem(name)
        assert problem and "\n" not in problem, repr(name)


def test_class_name_rule_never_lets_markup_or_control_through():
    """The other direction: whatever random text the rule accepts holds none of the dangerous characters."""
    r = random.Random(5)
    alphabet = "ab猫é_-. " * 4 + "".join(HOSTILE)
    accepted = 0
    for _ in range(3000):
        name = "".join(r.choice(alphabet) for _ in range(r.randint(1, 8)))
        if folder_source.class_name_problem(name) is None:
            accepted += 1
            assert not set(name) & set(HOSTILE), repr(name)
            assert name[0] not in ". -_" and name[-1] not in ". "
    assert accepted > 50  # the rule is not simply refusing everything


def test_ingest_refuses_unsafe_class_folders_in_one_line(tmp_path):
    names = [
        n
        for n in _bad_names(12, seed=9)
        if n and "/" not in n and "\x00" not in n and n not in (".", "..") and not n.startswith(".")
    ]  # creatable, and not hidden (hidden is skipped)
    for i, name in enumerate(names):
        src = make_folder_dataset(tmp_path / f"src{i}", classes=("cat", "dog"), per_class=2)
        (src / name).mkdir()
        shutil.copy(src / "cat" / "cat_0000.png", src / name / "x.png")
        with pytest.raises(DataError) as err:
            _ingest(src, tmp_path / f"out{i}")
        msg = str(err.value)
        assert repr(name) in msg and "\n" not in msg and "letters and digits" in msg, (name, msg)
        assert not (tmp_path / f"out{i}").exists()  # refused before anything was written


def test_ingest_keeps_plain_unicode_class_names(tmp_path):
    classes = ("Größe", "猫", "size 10", "Cafe\u0301")
    src = make_folder_dataset(tmp_path / "src", classes=classes, per_class=3)
    res = _ingest(src, tmp_path)
    assert res.classes == dict.fromkeys(classes, 3)


def test_cli_ingest_refuses_an_unsafe_class_name_and_reports_what_it_left_out(tmp_path):
    from tests.helpers import make_project

    src = make_folder_dataset(tmp_path / "images", classes=("cat", "dog"), per_class=2)
    (src / "<img src=x onerror=alert(1)>").mkdir()
    shutil.copy(src / "cat" / "cat_0000.png", src / "<img src=x onerror=alert(1)>" / "a.png")
    proj = make_project(tmp_path / "proj", src)
    proc = run_cli(proj, "ingest", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "'<img src=x onerror=alert(1)>'" in proc.stderr
    shutil.rmtree(src / "<img src=x onerror=alert(1)>")
    (src / "cat" / "passwd.png").symlink_to("/etc/passwd")
    proc = run_cli(proj, "ingest")
    assert "symlink_outside_source" in proc.stdout and ".ingest.json" in proc.stdout


def test_reviewed_class_folders_are_checked_too(tmp_path):
    src = make_folder_dataset(tmp_path / "src", classes=("cat", "dog"), per_class=2)
    reviewed = tmp_path / "reviewed" / "cat<svg onload=alert(1)>"
    reviewed.mkdir(parents=True)
    (reviewed / "r.png").write_bytes(b"r")
    with pytest.raises(DataError, match="letters and digits"):
        _ingest(src, tmp_path, reviewed_dir=tmp_path / "reviewed")


# --- item 8: nothing lost to a name ----------------------------------------------------------------------------------

POOL = [
    "a.png",
    "sub/a.png",
    "sub__a.png",
    "sub/x/a.png",
    "sub__x__a.png",
    "sub/x__a.png",
    "sub__x/a.png",
    "Sub/A.png",
    "SUB__A.png",
    "reviewed__a.png",
    "reviewed__sub__a.png",
    "reviewed/a.png",
    "x/y/z/w.png",
    "x__y__z__w.png",
    "x__y/z__w.png",
    "b.png",
    "B.PNG",
    "sub/b.png",
]


@pytest.mark.parametrize("seed", range(6))
def test_flattening_nested_folders_never_overwrites_a_file(tmp_path, seed):
    r = random.Random(seed)
    src = tmp_path / "src"
    for cls in ("dog", "cat"):
        for i, rel in enumerate(r.sample(POOL, 9)):
            path = src / cls / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"{cls}-{rel}-{i}".encode())
    res = _ingest(src, tmp_path)
    assert _contents(tmp_path / "raw") == _contents(src)
    assert res.classes == {"cat": 9, "dog": 9} and res.n_images == 18
    assert not any(f.name.startswith(REVIEWED_PREFIX) for f in (tmp_path / "raw").rglob("*"))
    assert _ingest(src, tmp_path).skipped  # the counts agree, so an unchanged source is not ingested again


def test_reviewed_sync_never_touches_a_users_file_named_like_a_reviewed_one(tmp_path):
    src = make_folder_dataset(tmp_path / "src", classes=("cat", "dog"), per_class=2)
    (src / "cat" / "reviewed__x.png").write_bytes(b"the user's own image")
    (src / "cat" / "REVIEWED__y.png").write_bytes(b"another of the user's")
    reviewed = tmp_path / "reviewed"
    (reviewed / "cat").mkdir(parents=True)
    (reviewed / "cat" / "x.png").write_bytes(b"a reviewed image")
    res = _ingest(src, tmp_path, reviewed_dir=reviewed)
    assert _contents(tmp_path / "raw") == _contents(src) + _contents(reviewed)
    assert res.classes == {"cat": 5, "dog": 2} and res.n_reviewed == 1
    (reviewed / "cat" / "x.png").unlink()  # the reviewed image leaves; the user's files stay
    res = _ingest(src, tmp_path, reviewed_dir=reviewed)
    assert _contents(tmp_path / "raw") == _contents(src)
    assert res.skipped and res.classes == {"cat": 4, "dog": 2}


def test_a_copy_that_does_not_add_up_fails_loudly(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(b"a")
    ingest_mod._check_copied(tmp_path, {"cat": 1})
    with pytest.raises(DataError, match="cat: 1 file.* 2 "):
        ingest_mod._check_copied(tmp_path, {"cat": 2})


# --- items 9 and 10: symlinks and unreadable files -----------------------------------------------------------------


def _reasons(res) -> dict[str, str]:
    return {s["path"]: s["reason"] for s in res.skipped_files}


def test_symlinks_never_lead_out_of_the_source(tmp_path):
    src = make_folder_dataset(tmp_path / "src", classes=("cat", "dog"), per_class=3)
    outside = make_folder_dataset(tmp_path / "outside", classes=("secret",), per_class=2, seed=1) / "secret"
    (src / "cat" / "passwd.png").symlink_to("/etc/passwd")
    (src / "cat" / "secret.png").symlink_to(outside / "secret_0000.png")
    (src / "cat" / "rel.png").symlink_to("../../outside/secret/secret_0001.png")
    (src / "cat" / "alias.png").symlink_to(src / "dog" / "dog_0000.png")  # inside the source: followed
    (src / "fox").symlink_to(outside)  # a class folder that is a symlink elsewhere
    (src / "dog" / "sub").symlink_to(outside)  # a nested folder likewise
    (src / "dog" / "up").symlink_to(src)  # and one that points back inside (a loop if followed)
    res = _ingest(src, tmp_path)
    assert res.classes == {"cat": 4, "dog": 3}
    raw = _contents(tmp_path / "raw")
    assert not raw & (_contents(outside) + Counter([hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()]))
    reasons = _reasons(res)
    assert reasons == {
        "cat/passwd.png": "symlink_outside_source",
        "cat/secret.png": "symlink_outside_source",
        "cat/rel.png": "symlink_outside_source",
        "fox": "symlinked_folder",
        "dog/sub": "symlinked_folder",
        "dog/up": "symlinked_folder",
    }


def test_dangling_and_looping_symlinks_and_odd_files_are_skipped_with_a_reason(tmp_path):
    src = make_folder_dataset(tmp_path / "src", classes=("cat", "dog"), per_class=3)
    (src / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (src / "cat" / "gone_rel.png").symlink_to("missing.png")
    (src / "cat" / "loop1.png").symlink_to("loop2.png")
    (src / "cat" / "loop2.png").symlink_to("loop1.png")
    (src / "dog" / "self.png").symlink_to("self.png")
    os.mkfifo(src / "dog" / "pipe.png")  # opening a FIFO for reading would hang the stage
    (src / "dog" / "folder.png").mkdir()  # a folder named like an image holds nothing to take
    res = _ingest(src, tmp_path)
    assert res.classes == {"cat": 3, "dog": 3}
    assert _reasons(res) == {
        "cat/gone.png": "dangling_symlink",
        "cat/gone_rel.png": "dangling_symlink",
        "cat/loop1.png": "symlink_loop",
        "cat/loop2.png": "symlink_loop",
        "dog/self.png": "symlink_loop",
        "dog/pipe.png": "not_a_regular_file",
    }
    assert not (tmp_path / "raw.partial").exists()
    again = _ingest(src, tmp_path)
    assert again.skipped and _reasons(again) == _reasons(res)  # the report survives an up-to-date run


def _drop_privileges() -> None:
    if os.geteuid() == 0:  # root reads any file: become nobody, for whom mode 000 means unreadable
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)


@pytest.mark.parametrize("shard_bytes", [None, 1 << 20], ids=["loose", "shards"])
def test_an_unreadable_file_is_skipped_not_a_crash(shard_bytes):
    """Run as an unprivileged user (root reads a mode-000 file): ingest in a forked child that became nobody."""
    top = Path(tempfile.mkdtemp(prefix="vf-unreadable-"))  # pytest's tmp_path is closed to other users
    try:
        top.chmod(0o777)
        src = make_folder_dataset(top / "src", classes=("cat", "dog"), per_class=3)
        locked = src / "cat" / "locked.png"
        shutil.copy(src / "cat" / "cat_0000.png", locked)
        locked.chmod(0)
        (src / "dog" / "closed").mkdir()
        (src / "dog" / "closed" / "inner.png").write_bytes(b"x")
        (src / "dog" / "closed").chmod(0)
        with multiprocessing.get_context("fork").Pool(1, initializer=_drop_privileges) as pool:
            res = pool.apply(_ingest, (src, top), {"shard_bytes": shard_bytes})
        assert res.classes == {"cat": 3, "dog": 3} and bool(res.n_shards) == bool(shard_bytes)
        reasons = _reasons(res)
        assert reasons == {"cat/locked.png": "unreadable_file", "dog/closed": "unreadable_folder"}
        assert not (top / "raw.partial").exists()
    finally:
        for d, _, _ in os.walk(top):
            os.chmod(d, 0o755)
        shutil.rmtree(top)


@pytest.mark.parametrize("seed", range(3))
def test_flat_names_are_unique_without_case_and_outside_the_reviewed_namespace(seed):
    r = random.Random(seed)
    parts = ["a", "A", "sub", "SUB", "a__b", "reviewed", "reviewed__a", "x~1", "b.png", "B.png", "a.png"]
    rels = sorted({tuple(r.choice(parts) for _ in range(r.randint(1, 3))) for _ in range(60)})
    names = folder_source.flat_names(rels)
    assert len({n.casefold() for n in names}) == len(rels)
    assert not any(n.casefold().startswith(REVIEWED_PREFIX) for n in names)
    assert names == folder_source.flat_names(rels)  # the same source always gets the same names
