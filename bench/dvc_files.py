"""dvc: `dvc add`, `dvc status` and `dvc checkout` of N small PNGs vs `md5sum` over the same files.

One git + DVC repository per size (its own DVC site cache) holds N distinct 28 px PNGs (about 0.9 KB each,
Fashion-MNIST-sized) in data/images/, generated and written once. Each repeat then runs, in turn: `dvc add
data/images` from cold (the object cache, the site cache's hash state and index, .dvc/tmp and the .dvc file of the
last repeat are deleted first, so DVC hashes and copies every file as in a new repository), `dvc status`, and
`dvc checkout` after deleting the folder (restore from the cache; it leaves the same bytes for the next repeat's
add). After each DVC command the baseline runs: `find | xargs md5sum` over the same files (read and hash every
file once; page cache warm for both, as the files were just written or read). Ratio = DVC seconds / md5sum
seconds (lower is better). DVC is timed as a command, process start-up included, as a user runs it. N: 20k in
full mode (`--dvc-files 20000 70000` adds the whole Fashion-MNIST, which about doubles the suite's time), 1k in
--quick.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Context, Measurement, paired_row
from bench.sample_data import synthetic_pngs

NAME = "dvc"
OPS = ("add", "status", "checkout")
# Full mode's default. 70k files (the whole Fashion-MNIST) costs about as much as the rest of the suite together
# on 2 cores (five cold adds and five checkouts of 70k files), so it is asked for with --dvc-files 20000 70000.
FULL_SIZES = (20_000,)


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
    """One repository per size, its N files written once; each repeat starts DVC cold on the same files."""

    def __init__(self, ctx: Context, files: list[bytes], n: int) -> None:
        self.ctx, self.files, self.n = ctx, files, n
        root = ctx.tmp(f"dvc/n{n}/repo")
        subprocess.run(["git", "init", "-q"], cwd=root, check=True, env=_env())
        _run([*_dvc(), "init", "-q"], root)
        # What `dvc config --local core.site_cache_dir ...` writes, without another DVC start-up.
        (root / ".dvc/config.local").write_text(f"[core]\n    site_cache_dir = {root / '.site-cache'}\n")
        images = root / "data/images"
        images.mkdir(parents=True)
        for i, data in enumerate(files):
            (images / f"{i:06d}.png").write_bytes(data)
        self.root = root

    def cold(self) -> None:
        """Forget everything DVC learnt in the last repeat (object cache, hash state and index in the site cache,
        .dvc/tmp, the .dvc file), so the next `dvc add` hashes and copies every file as in a new repository. The
        files themselves stay: after the last repeat's checkout they are the same bytes again."""
        for path in (self.root / ".dvc/cache", self.root / ".dvc/tmp", self.root / ".site-cache"):
            shutil.rmtree(path, ignore_errors=True)
        for path in (self.root / "data/images.dvc", self.root / "data/.gitignore"):
            path.unlink(missing_ok=True)

    def op(self, name: str) -> Measurement:
        if name == "add":
            self.cold()
            return Measurement(_run([*_dvc(), "add", "-q", "data/images"], self.root))
        if name == "status":
            return Measurement(_run([*_dvc(), "status", "-q"], self.root))
        shutil.rmtree(self.root / "data/images")
        t = _run([*_dvc(), "checkout", "-q"], self.root)
        restored = sum(1 for _ in (self.root / "data/images").iterdir())
        if restored != self.n:
            raise RuntimeError(f"dvc checkout restored {restored} of {self.n} files")
        return Measurement(t)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def run(ctx: Context) -> dict[str, Any]:
    sizes = tuple(ctx.dvc_files or ((1_000,) if ctx.quick else FULL_SIZES))
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
                    ctx.log(
                        f"  dvc {op} ({n} files): repeat {r + 1}/{ctx.repeats}  dvc {a.value:.2f} s  "
                        f"md5sum {b.value:.2f} s  ratio {a.value / b.value:.2f}"
                    )
        finally:
            repo.close()
        for op in OPS:
            rows.append(
                paired_row(
                    f"dvc {op}, {n // 1000}k files",
                    [a for a, _ in pairs[op]],
                    [b for _, b in pairs[op]],
                    unit="s",
                    a_label=f"dvc {op}",
                    b_label="md5sum (find | xargs)",
                    higher_is_better=False,
                    ratio_definition="dvc seconds / md5sum seconds",
                    notes=["after deleting data/images, restore from the DVC cache"] if op == "checkout" else [],
                )
            )
        del files
    notes = []
    if not ctx.quick and 70_000 not in sizes:
        notes.append(
            "70k files not run (it doubles the suite's time): `python -m bench --only dvc --dvc-files "
            "20000 70000` runs it"
        )
    return {"rows": rows, "notes": notes, "config": {"files": list(sizes), "file_bytes_approx": 900, "dvc": _dvc()[-1]}}
