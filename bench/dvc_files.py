"""dvc: `dvc add`, `dvc status` and `dvc checkout` of N small PNGs vs `md5sum` over the same files.

Each repeat builds a fresh git + DVC repository under the work folder (its own DVC site cache, so no hash state is
carried over) with N distinct 28 px PNGs (about 0.9 KB each, Fashion-MNIST-sized) in data/images/, then, in turn:
`dvc add data/images` (hash + copy into the cache), `dvc status`, and `dvc checkout` after deleting the folder
(restore from the cache). After each DVC command the baseline runs: `find | xargs md5sum` over the same files
(read and hash every file once). Ratio = DVC seconds / md5sum seconds (lower is better). DVC is timed as a
command, process start-up included, as a user runs it. N: 20k and 70k (the whole Fashion-MNIST) in full mode,
1k in --quick.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Context, Measurement, paired_row, synthetic_pngs

NAME = "dvc"
OPS = ("add", "status", "checkout")


def _dvc() -> list[str]:
    exe = Path(sys.executable).with_name("dvc")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "dvc"]


def _env() -> dict[str, str]:
    return dict(os.environ, DVC_NO_ANALYTICS="1", GIT_TERMINAL_PROMPT="0")


def _run(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env())
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}")
    return elapsed


def md5sum(folder: Path) -> Measurement:
    return Measurement(_run(["bash", "-c", "find images -type f -print0 | xargs -0 md5sum > /dev/null"], folder))


class Repo:
    """One fresh repository per repeat; the three DVC operations run in order on it."""

    def __init__(self, ctx: Context, files: list[bytes], n: int) -> None:
        self.ctx, self.files, self.n = ctx, files, n
        self.count = 0
        self.root: Path | None = None

    def fresh(self) -> Path:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        self.count += 1
        root = self.ctx.tmp(f"dvc/n{self.n}/repo{self.count}")
        subprocess.run(["git", "init", "-q"], cwd=root, check=True, env=_env())
        _run([*_dvc(), "init", "-q"], root)
        # What `dvc config --local core.site_cache_dir ...` writes, without another DVC start-up per repeat.
        (root / ".dvc/config.local").write_text(f"[core]\n    site_cache_dir = {root / '.site-cache'}\n")
        images = root / "data/images"
        images.mkdir(parents=True)
        for i, data in enumerate(self.files):
            (images / f"{i:06d}.png").write_bytes(data)
        self.root = root
        return root

    def op(self, name: str) -> Measurement:
        if name == "add":
            root = self.fresh()
            return Measurement(_run([*_dvc(), "add", "-q", "data/images"], root))
        assert self.root is not None
        if name == "status":
            return Measurement(_run([*_dvc(), "status", "-q"], self.root))
        shutil.rmtree(self.root / "data/images")
        t = _run([*_dvc(), "checkout", "-q"], self.root)
        restored = sum(1 for _ in (self.root / "data/images").iterdir())
        if restored != self.n:
            raise RuntimeError(f"dvc checkout restored {restored} of {self.n} files")
        return Measurement(t)

    def close(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def run(ctx: Context) -> dict[str, Any]:
    sizes = (1_000,) if ctx.quick else (20_000, 70_000)
    rows = []
    for n in sizes:
        ctx.log(f"[dvc] {n} PNG files")
        files = synthetic_pngs(n, seed=n)
        repo = Repo(ctx, files, n)
        # Interleave per repeat: add, md5sum, status, md5sum, checkout, md5sum on the same fresh repository, so the
        # three comparisons are built pairwise from one pass and each DVC figure has its own baseline next to it.
        pairs: dict[str, list[tuple[Measurement, Measurement]]] = {op: [] for op in OPS}
        try:
            for r in range(ctx.repeats):
                for op in OPS:
                    a = repo.op(op)
                    b = md5sum(repo.root / "data")
                    pairs[op].append((a, b))
                    ctx.log(f"  dvc {op} ({n} files): repeat {r + 1}/{ctx.repeats}  dvc {a.value:.2f} s  "
                            f"md5sum {b.value:.2f} s  ratio {a.value / b.value:.2f}")
        finally:
            repo.close()
        for op in OPS:
            rows.append(paired_row(
                f"dvc {op}, {n // 1000}k files", [a for a, _ in pairs[op]], [b for _, b in pairs[op]], unit="s",
                a_label=f"dvc {op}", b_label="md5sum (find | xargs)", higher_is_better=False,
                ratio_definition="dvc seconds / md5sum seconds",
                notes=["after deleting data/images, restore from the DVC cache"] if op == "checkout" else []))
        del files
    return {"rows": rows, "notes": [], "config": {"files": list(sizes), "file_bytes_approx": 900,
                                                  "dvc": _dvc()[-1]}}

