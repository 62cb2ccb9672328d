"""Prefect settings for local runs, applied in entry points before Prefect is imported (never at import time)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Set by entry points (CLI, flows, bench) before albumentations is imported, never at library import; loader
# workers inherit it. albumentations otherwise checks PyPI for a newer version on import, in every worker, and
# warns on an offline machine.
OFFLINE_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1"}


def offline_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def configure_prefect(root: Path) -> None:
    """Local-first defaults: project-local Prefect home, no telemetry, a patient temporary server.

    Anything already set in the environment (PREFECT_API_URL for a real server, say) wins.
    """
    root = Path(root).resolve()
    defaults = {
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    offline_env()
    if not os.environ.get("PREFECT_API_URL"):
        _migrate_local_db(Path(os.environ["PREFECT_HOME"]))


def _migrate_local_db(home: Path) -> None:
    # A fresh SQLite database migrated by the temporary server while clients already connect has been seen to
    # fail with "database is locked"; migrating once up front, in one process, avoids that race.
    db = home / "prefect.db"
    if db.exists():
        return
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    if proc.returncode != 0:
        sys.stderr.write(f"warning: could not pre-create the Prefect database ({proc.stderr.strip()[-300:]})\n")
