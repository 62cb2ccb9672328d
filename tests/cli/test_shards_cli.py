"""The shard layout through the real `visionflow` command and real DVC (local remote): export-data, damaged shards
in validate and their restore by `dvc checkout`, and a push killed midway then resumed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import make_folder_dataset, make_project, run_cli
from visionflow.data import shards

SHARD_MB = 0.01  # about ten 16x16 PNGs per shard: a handful of shards


def _project(tmp_path: Path) -> Path:
    src = make_folder_dataset(tmp_path / "images", per_class=12)
    proj = make_project(tmp_path / "proj", src, data={"layout": "shards", "shard_mb": SHARD_MB})
    run_cli(proj, "ingest")
    return proj


def _dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    assert not check or proc.returncode == 0, proc.stderr
    return proc


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_export_data_writes_the_images_out_once_and_refuses_a_folder_of_other_files(tmp_path):
    proj = _project(tmp_path)
    first = run_cli(proj, "export-data", "out")  # piped: the title, then tab-separated key/value lines
    assert first.stdout.splitlines()[0] == "export-data" and "written\t36" in first.stdout.splitlines()
    exported = {p.relative_to(proj / "out").as_posix(): p.read_bytes() for p in (proj / "out").rglob("*.png")}
    assert exported == {
        p.relative_to(tmp_path / "images").as_posix(): p.read_bytes() for p in (tmp_path / "images").rglob("*.png")
    }
    again = json.loads(run_cli(proj, "export-data", "out", "--json").stdout)
    assert again["written"] == 0 and again["images"] == 36
    (proj / "out" / "cat" / "mine.txt").write_text("not an image of data/raw")
    line = _one_error_line(run_cli(proj, "export-data", "out", check=False))
    assert "'cat/mine.txt'" in line and "nothing was written" in line


def _damage(raw: Path, case: str) -> None:
    tar = sorted(raw.glob("*.tar"))[0]
    data = tar.read_bytes()
    tar.unlink()  # DVC's cache holds its own copy (copy link type): replace the file, as an editor would
    if case == "truncated shard":
        tar.write_bytes(data[: len(data) // 2])
    elif case == "flipped byte":
        tar.write_bytes(data[:700] + bytes([data[700] ^ 1]) + data[701:])
    else:
        tar.write_bytes(data)
    if case == "missing index":
        shards.index_path(tar).unlink()
    elif case == "index edited":
        idx = shards.index_path(tar)
        text = idx.read_text()
        idx.unlink()
        idx.write_text(text.replace(text.splitlines()[1].split(",")[3], "0" * 64))
    elif case == "class folder beside shards":
        (raw / "cat").mkdir()
        (raw / "cat" / "new.png").write_bytes(b"x")


@pytest.mark.slow
def test_damaged_shards_fail_validate_with_one_line_and_dvc_checkout_restores_them(tmp_path):
    proj = _project(tmp_path)
    run_cli(proj, "version", "--no-push")
    raw = proj / "data/raw"
    expected = {
        "truncated shard": "where its index says",
        "flipped byte": "does not match its sha256 in the index",
        "missing index": "has no index",
        "index edited": "does not match its sha256 in the index",
        "class folder beside shards": "holds both shards and class folders",
    }
    for case, problem in expected.items():
        _damage(raw, case)
        line = _one_error_line(run_cli(proj, "validate", check=False))
        assert problem in line and "dvc checkout --force" in line and "visionflow ingest --force" in line, case
        _dvc(proj, "checkout", "--force", "data/raw")  # the message's own remedy
        assert shards.verify(raw) == [] and not any(p.is_dir() for p in raw.iterdir()), case
    res = json.loads(run_cli(proj, "validate", "--json").stdout)
    assert res["images"] == 36 and res["quarantined"] == 0


# Runs `dvc push` and SIGKILLs it from inside at a fixed point: once `landed` objects are in the remote, the next
# object is cut to half its bytes in DVC's temporary file (a copy killed midway) and the process dies. DVC writes
# each remote object under a temporary name and renames it (dvc_objects' local put_file), so this is exactly what
# a push killed at that moment leaves, without depending on timing.
_KILLED_PUSH = textwrap.dedent(
    """
    import os, signal, sys
    remote, landed = sys.argv[1], int(sys.argv[2])
    real_replace, done = os.replace, []
    def replace(src, dst, *a, **kw):
        if str(dst).startswith(remote):
            if len(done) == landed:
                os.truncate(src, os.path.getsize(src) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            done.append(dst)
        return real_replace(src, dst, *a, **kw)
    os.replace = replace
    from dvc.cli import main
    sys.exit(main(["push", "--jobs", "1"]))
    """
)


def _fresh_clone(proj: Path, dest: Path, *, verify: bool) -> Path:
    """What another machine has after `git clone`: the pipeline files and the remote's address, no data."""
    dest.mkdir()
    for name in ("dvc.yaml", "dvc.lock", "params.yaml"):
        shutil.copy(proj / name, dest / name)
    shutil.copytree(proj / ".dvc", dest / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    _dvc(dest, "config", "--local", "core.no_scm", "true")
    _dvc(dest, "remote", "modify", "--local", "local", "verify", str(verify).lower())
    return dest


@pytest.mark.slow
def test_a_push_killed_midway_resumes_and_a_fresh_clone_pulls_every_shard_intact(tmp_path):
    proj = _project(tmp_path)
    run_cli(proj, "version", "--no-push")
    raw, remote = proj / "data/raw", proj / "remote"
    n_files = len(list(raw.iterdir()))
    killed = subprocess.run([sys.executable, "-c", _KILLED_PUSH, str(remote), "3"], cwd=proj, capture_output=True)
    assert killed.returncode == -9, killed.stderr
    objects = [p for p in (remote / "files").rglob("*") if p.is_file()]
    assert sum(1 for p in objects if not p.name.endswith(".tmp")) == 3 and any(".tmp" in p.name for p in objects)
    assert "in sync" not in _dvc(proj, "status", "-c").stdout
    _dvc(proj, "push")  # resumed: uploads what is missing
    assert "Cache and remote 'local' are in sync." in _dvc(proj, "status", "-c").stdout
    pulled = _fresh_clone(proj, tmp_path / "clone", verify=True)
    _dvc(pulled, "pull", "data/raw")
    assert len(list((pulled / "data/raw").iterdir())) == n_files
    # every shard has its indexed size and its sha256 matches its name
    assert shards.verify(pulled / "data/raw") == [] and shards.verify_hashes(pulled / "data/raw") == []
    assert shards.content_version(shards.read_index(pulled / "data/raw")) == shards.content_version(
        shards.read_index(raw)
    )


@pytest.mark.slow
def test_a_truncated_object_in_the_remote_is_caught_on_pull_and_repaired_by_pushing_it_again(tmp_path):
    """A remote object cut short under its final name (a hand copy, a remote without atomic writes): DVC's push
    checks only that objects exist, so the damage is caught when pulling: by DVC with `verify` on, and by validate's
    shard check without it (its size is wrong). Removing the object (and the folder's .dir listing) and pushing
    again repairs it."""
    proj = _project(tmp_path)
    run_cli(proj, "version")
    remote = proj / "remote"
    victim = max((p for p in (remote / "files").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    good = victim.read_bytes()
    victim.chmod(0o644)
    victim.write_bytes(good[: len(good) // 2])
    assert "in sync" in _dvc(proj, "status", "-c").stdout  # DVC does not see it
    verified = _fresh_clone(proj, tmp_path / "verified", verify=True)
    assert _dvc(verified, "pull", "data/raw", check=False).returncode != 0
    trusting = _fresh_clone(proj, tmp_path / "trusting", verify=False)
    _dvc(trusting, "pull", "data/raw")
    line = _one_error_line(run_cli(trusting, "validate", check=False))
    assert "where its index says" in line
    # DVC uploads a folder's .dir listing last and takes its presence to mean every object of the folder is
    # there, so the repair removes both: the next push then checks and uploads each missing object.
    victim.unlink()
    for listing in (remote / "files").rglob("*.dir"):
        listing.unlink()
    _dvc(proj, "push")
    assert victim.read_bytes() == good
    _dvc(verified, "pull", "data/raw")
    assert shards.verify(verified / "data/raw") == []
