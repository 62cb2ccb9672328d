"""Data versioning with DVC: the data version is the DVC hash of data/raw as recorded in dvc.lock.

`dvc repro` records that hash itself; the Prefect flow calls the stage functions directly and then records the
same hash with `dvc commit`, so both routes agree and `dvc status` is clean after either.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from visionflow.errors import VersioningError

INGEST_STAGE = "ingest"


def _dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip()
        raise VersioningError(f"`dvc {' '.join(args)}` failed in {root}:\n{msg[-3000:]}")
    return proc


def resolve_remote_url(root: Path, url: str) -> str:
    """A remote given as a plain relative path is relative to the project root (DVC would use .dvc/)."""
    if "://" in url or url.startswith("/"):
        return url
    return str((root / url).resolve())


REMOTE_URL_ENV = "VISIONFLOW_DVC_REMOTE_URL"
ENDPOINT_ENV = "AWS_ENDPOINT_URL"


def ensure_repo(root: Path, remote_name: str, remote_url: str) -> str:
    """`dvc init` when needed and point the default remote at remote_url (in .dvc/config.local, not committed).

    VISIONFLOW_DVC_REMOTE_URL overrides data.remote_url (a shared remote, e.g. s3://bucket/visionflow). For S3
    remotes AWS_ENDPOINT_URL (an S3-compatible store such as MinIO) is written as the remote's endpointurl;
    credentials stay in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, read by boto at push time)
    and are never written to a file.
    """
    root = Path(root)
    scm = (root / ".git").exists()
    if not (root / ".dvc").is_dir():
        _dvc(root, "init", *([] if scm else ["--no-scm"]))
    elif not scm:  # a copy without .git (a container image): DVC would refuse every command
        _dvc(root, "config", "--local", "core.no_scm", "true")
    url = resolve_remote_url(root, os.environ.get(REMOTE_URL_ENV) or remote_url)
    if "://" not in url:
        Path(url).mkdir(parents=True, exist_ok=True)
    _dvc(root, "remote", "add", "--local", "--force", "--default", remote_name, url)
    if url.startswith("s3://") and os.environ.get(ENDPOINT_ENV):
        _dvc(root, "remote", "modify", "--local", remote_name, "endpointurl", os.environ[ENDPOINT_ENV])
    return url


def commit(root: Path, stages: list[str]) -> None:
    """Record the current outputs of these dvc.yaml stages in dvc.lock and the DVC cache."""
    _dvc(Path(root), "commit", "--force", *stages)


def push(root: Path, remote_name: str) -> None:
    _dvc(Path(root), "push", "--remote", remote_name)


def status_clean(root: Path) -> bool:
    proc = _dvc(Path(root), "status", "--json")
    return proc.stdout.strip() in ("{}", "")


def data_version(root: Path, raw_dir: Path | str = "data/raw") -> str:
    """The DVC directory hash of raw_dir from dvc.lock (what `dvc checkout` restores)."""
    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        raise VersioningError("dvc.lock not found: the data has not been versioned yet (run `visionflow version`)")
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    want = Path(raw_dir).as_posix().rstrip("/")
    for out in stages.get(INGEST_STAGE, {}).get("outs", []):
        if Path(out["path"]).as_posix().rstrip("/") == want:
            return str(out["md5"]).removesuffix(".dir")
    raise VersioningError(f"dvc.lock has no hash for {want}: run `visionflow version`")
