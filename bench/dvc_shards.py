"""shards: loose files vs shards (visionflow.data.shards) through DVC, at 20k, 100k and 300k generated JPEGs.

The images: 300 base JPEGs of 256 px (smooth colour fields, shapes, blur and sensor-like noise, quality 75-91;
about 12 KB on average, 5 to 25 KB) encoded once, each written file made unique by a JPEG comment segment (COM,
which decoders skip) holding its number, so that every file has its own hash as in a real dataset. They are
written once as a loose <class>/<file> source folder (10 classes), grown from one size to the next.

Per size and layout, a fresh git + DVC repository with a local-path remote (and its own DVC site cache) runs, in
turn: "ingest" (loose: copy the source folder into data/raw; shards: `shards.pack` it into data/raw, shards of
params.yaml's `data.shard_mb`; then `dvc add data/raw`), `dvc push`, `dvc status` (nothing changed), `dvc
checkout` after deleting data/raw, and `dvc pull` after deleting data/raw, the DVC cache and the site cache (what
a fresh clone has). Each is timed whole (DVC as a command, start-up included; the copy or pack in-process), and
right after each one `find | xargs md5sum` reads the source folder's files (the same image bytes, once). Ratio =
seconds / md5sum seconds; goal for shards: <= 3x at every size. Repeats: up to 3 below 100k images, 1 from 100k.

Then, at 100k (or the largest size run), 500 reviewed images are added to the shard repository as ingest adds
them (`ingest.sync_reviewed_shards`), then `dvc add` + `dvc push`: the shards added, the files and bytes the
remote gained (and the files dvc says it pushed), and the seconds. A log-log plot of the curves is written beside
the JSON (<out>.png).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import Context, Measurement, goal, paired_row, single
from bench.dvc_files import _dvc, _env, md5sum

NAME = "shards"
OPS = ("ingest", "push", "status", "checkout", "pull")
LAYOUTS = ("loose", "shards")
FULL_SIZES = (20_000, 100_000, 300_000)
QUICK_SIZES = (300,)
# The loose layout costs minutes per DVC command from 100k files (70k: 70 s add, 118 s checkout on 2 cores), and
# 300k loose files would take most of an hour: sizes above this run shards only (--loose-max raises it).
LOOSE_MAX = 100_000
REVIEWED = 500
REVIEW_AT = 100_000
N_CLASSES = 10
BASES = 300
GOAL = 3.0
INGEST = {"loose": "copy + dvc add", "shards": "pack + dvc add"}


# --- generated images -----------------------------------------------------------------------------------------------


def base_jpegs(count: int = BASES, size: int = 256) -> list[bytes]:
    """count distinct JPEGs of size px with photo-like compressibility (about 12 KB each at 256 px)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    out = []
    for i in range(count):
        rng = np.random.default_rng(i)
        cells = int(rng.integers(2, 8))
        low = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 12))):
            x0, y0 = (int(v) for v in rng.integers(0, size, 2))
            w, h = (int(v) for v in rng.integers(16, size // 2, 2))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([x0, y0, x0 + w, y0 + h], fill=fill)
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
        arr = np.asarray(img).astype(np.float32) + rng.normal(0, rng.uniform(2, 10), (size, size, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(75, 92)))
        out.append(buf.getvalue())
    return out


def unique_jpeg(bases: list[bytes], i: int) -> bytes:
    """Base image i % len(bases) with a COM segment naming i right after SOI: a valid JPEG, unique bytes."""
    base = bases[i % len(bases)]
    text = f"visionflow bench image {i}".encode()
    return base[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + base[2:]


def image_member(i: int) -> str:
    return f"class_{i % N_CLASSES}/{i:07d}.jpg"


def write_images(folder: Path, start: int, stop: int, bases: list[bytes]) -> int:
    """Write images start..stop-1 under folder/<class>/<file>: their bytes."""
    total = 0
    for c in range(N_CLASSES):
        (folder / f"class_{c}").mkdir(parents=True, exist_ok=True)
    for i in range(start, stop):
        data = unique_jpeg(bases, i)
        (folder / image_member(i)).write_bytes(data)
        total += len(data)
    return total


# --- one repository -------------------------------------------------------------------------------------------------


def _timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env())
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}")
    return elapsed, proc.stdout + proc.stderr


def tree_size(folder: Path) -> tuple[int, int]:
    """(files, bytes) under folder."""
    files = size = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            files += 1
            size += os.path.getsize(os.path.join(dirpath, name))
    return files, size


class Repo:
    """A fresh git + DVC repository with a local-path remote, for one size, layout and repeat."""

    def __init__(self, ctx: Context, name: str, layout: str, source: Path, n: int, shard_bytes: int) -> None:
        self.layout, self.source, self.n, self.shard_bytes = layout, source, n, shard_bytes
        self.root = ctx.tmp(f"{name}/repo")
        self.remote = ctx.tmp(f"{name}/remote")
        subprocess.run(["git", "init", "-q"], cwd=self.root, check=True, env=_env())
        _timed([*_dvc(), "init", "-q"], self.root)
        # What `dvc remote add -d` and `dvc config --local core.site_cache_dir` write, without two DVC start-ups.
        (self.root / ".dvc/config.local").write_text(
            f"[core]\n    remote = store\n    site_cache_dir = {self.root / '.site-cache'}\n"
            f"['remote \"store\"']\n    url = {self.remote}\n"
        )
        self.raw = self.root / "data/raw"

    def ingest(self) -> Measurement:
        """Copy (loose) or pack (shards) the source into data/raw, then `dvc add` it; both parts kept as extras."""
        from visionflow.data import shards

        start = time.perf_counter()
        if self.layout == "loose":
            shutil.copytree(self.source, self.raw)
        else:
            self.raw.mkdir(parents=True)
            items = [(f"{d.name}/{f.name}", f) for d in sorted(self.source.iterdir()) for f in sorted(d.iterdir())]
            shards.pack(self.raw, items, self.shard_bytes)
        prepare = time.perf_counter() - start
        add = _timed([*_dvc(), "add", "-q", "data/raw"], self.root)[0]
        return Measurement(prepare + add, {"copy_or_pack_s": prepare, "dvc_add_s": add})

    def op(self, name: str) -> Measurement:
        load = {"load_avg_1min": os.getloadavg()[0]}  # the machine is shared: a busy moment shows here
        if name == "ingest":
            m = self.ingest()
            m.extra.update(load)
            return m
        if name in ("checkout", "pull"):
            shutil.rmtree(self.raw)
        if name == "pull":
            for path in (self.root / ".dvc/cache", self.root / ".site-cache"):
                shutil.rmtree(path, ignore_errors=True)
        t, out = _timed([*_dvc(), name, *(() if name == "push" else ("-q",))], self.root)
        if name in ("checkout", "pull"):
            self.check_restored()
        return Measurement(t, {**load, **({"files_pushed": pushed_count(out)} if name == "push" else {})})

    def check_restored(self) -> None:
        from visionflow.data import shards

        got = len(shards.read_index(self.raw)) if self.layout == "shards" else tree_size(self.raw)[0]
        if got != self.n:
            raise RuntimeError(f"{self.layout}: data/raw has {got} of {self.n} images after restoring it")

    def close(self) -> None:
        shutil.rmtree(self.root.parent, ignore_errors=True)


def pushed_count(output: str) -> float:
    """The file count of dvc push's "N files pushed" (0 for "Everything is up to date")."""
    m = re.search(r"(\d+) files? pushed", output)
    return float(m.group(1)) if m else 0.0


def add_reviewed(ctx: Context, repo: Repo, bases: list[bytes], n: int) -> list[dict[str, Any]]:
    """Add REVIEWED new images to the pushed shard repository as ingest does, version and push them."""
    from visionflow.data import shards
    from visionflow.data.ingest import sync_reviewed_shards

    reviewed = ctx.tmp(f"shards/reviewed-{n}")
    write_images(reviewed, n, n + REVIEWED, bases)
    before = {p.name for p in repo.raw.glob(f"{shards.SHARD_PREFIX}*{shards.TAR_SUFFIX}")}
    remote_before = tree_size(repo.remote)
    start = time.perf_counter()
    sync_reviewed_shards(reviewed, repo.raw, repo.shard_bytes)
    t_sync = time.perf_counter() - start
    t_add = _timed([*_dvc(), "add", "-q", "data/raw"], repo.root)[0]
    t_push, out = _timed([*_dvc(), "push"], repo.root)
    after = {p.name for p in repo.raw.glob(f"{shards.SHARD_PREFIX}*{shards.TAR_SUFFIX}")}
    remote_after = tree_size(repo.remote)
    files, size = (remote_after[0] - remote_before[0], remote_after[1] - remote_before[1])
    shutil.rmtree(reviewed)
    if not after - before:
        raise RuntimeError(f"sync_reviewed_shards added no shard for {REVIEWED} new reviewed images")
    label = f"add {REVIEWED} reviewed to {n // 1000}k" if n >= 1000 else f"add {REVIEWED} reviewed to {n}"
    note = [f"the remote held {remote_before[0]} files, {remote_before[1] / 2**20:.0f} MiB before"]
    return [
        single(
            f"{label}: shards added",
            float(len(after - before)),
            unit="shards",
            label="new shard files",
            the_goal=goal("1 shard", "<=", 1.0, on="value"),
        ),
        single(
            f"{label}: files pushed",
            float(files),
            unit="files",
            label="files the remote gained",
            extra={"dvc_reported_files_pushed": pushed_count(out)},
            notes=note,
        ),
        single(
            f"{label}: bytes pushed",
            float(size),
            unit="bytes",
            label="bytes the remote gained",
            extra={"mib": round(size / 2**20, 2), "dataset_mib": round(remote_before[1] / 2**20, 1)},
        ),
        single(
            f"{label}: seconds",
            t_sync + t_add + t_push,
            unit="s",
            label="sync + dvc add + dvc push",
            extra={"sync_s": t_sync, "add_s": t_add, "push_s": t_push},
        ),
    ]


# --- the run --------------------------------------------------------------------------------------------------------


def repeats_for(ctx: Context, n: int) -> int:
    return 1 if n >= 100_000 else min(ctx.repeats, 3)


def measure(ctx: Context, source: Path, n: int, layout: str, shard_bytes: int, bases: list[bytes], review: bool):
    """Every op's (layout, md5sum) pairs over the repeats at one size, and the review rows when asked."""
    pairs: dict[str, list[tuple[Measurement, Measurement]]] = {op: [] for op in OPS}
    review_rows: list[dict[str, Any]] = []
    reps = repeats_for(ctx, n)
    for r in range(reps):
        repo = Repo(ctx, f"shards/n{n}-{layout}-{r}", layout, source, n, shard_bytes)
        try:
            for op in OPS:
                a = repo.op(op)
                b = md5sum(source.parent)
                pairs[op].append((a, b))
                ctx.log(
                    f"  {layout} {op} ({n} images): repeat {r + 1}/{reps}  {a.value:.2f} s  "
                    f"md5sum {b.value:.2f} s  ratio {a.value / b.value:.2f}"
                )
            if review and r == reps - 1:
                review_rows = add_reviewed(ctx, repo, bases, n)
                ctx.log("  " + "; ".join(f"{row['variant']} = {row['value']:.4g}" for row in review_rows))
        finally:
            repo.close()
    return pairs, review_rows


def rows_for(n: int, layout: str, pairs: dict[str, list[tuple[Measurement, Measurement]]]) -> list[dict[str, Any]]:
    size = f"{n // 1000}k" if n >= 1000 else str(n)
    return [
        paired_row(
            f"{layout} {op}, {size} images",
            [a for a, _ in pairs[op]],
            [b for _, b in pairs[op]],
            unit="s",
            a_label=f"{layout}: {INGEST[layout] if op == 'ingest' else 'dvc ' + op}",
            b_label="md5sum (find | xargs)",
            higher_is_better=False,
            ratio_definition="seconds / md5sum seconds",
            the_goal=goal(f"<= {GOAL:g}x md5sum", "<=", GOAL) if layout == "shards" else None,
        )
        for op in OPS
    ]


def run(ctx: Context) -> dict[str, Any]:
    sizes = sorted(set(ctx.shard_images or (QUICK_SIZES if ctx.quick else FULL_SIZES)))
    loose_max = ctx.loose_max if ctx.loose_max is not None else LOOSE_MAX
    review_at = REVIEW_AT if REVIEW_AT in sizes else sizes[-1]
    shard_bytes = int(ctx.params().data.shard_mb * 2**20)
    ctx.log(f"[shards] {BASES} base JPEGs")
    bases = base_jpegs()
    source = ctx.tmp("shards/source/images")
    rows: list[dict[str, Any]] = []
    written = total_bytes = 0
    try:
        for n in sizes:
            total_bytes += write_images(source, written, n, bases)  # the source folder grows to n images
            written = n
            ctx.log(f"[shards] {n} images, {total_bytes / n / 1000:.1f} KB on average")
            for layout in LAYOUTS:
                if layout == "loose" and n > loose_max:
                    continue
                pairs, review = measure(
                    ctx, source, n, layout, shard_bytes, bases, layout == "shards" and n == review_at
                )
                rows += rows_for(n, layout, pairs) + review
    finally:
        shutil.rmtree(source.parent, ignore_errors=True)
    notes = [f"loose layout not run above {loose_max} images (--loose-max)"] if sizes[-1] > loose_max else []
    config = {
        "images": sizes,
        "loose_max": loose_max,
        "repeats": {str(n): repeats_for(ctx, n) for n in sizes},
        "avg_image_bytes": round(total_bytes / written),
        "image_px": 256,
        "shard_bytes": shard_bytes,
        "reviewed": REVIEWED,
        "review_at": review_at,
        "dvc": _dvc()[-1],
    }
    if ctx.out is not None:
        from bench.shard_plot import plot

        config["plot"] = str(plot(rows, ctx.out.with_suffix(".png"), config))
    return {"rows": rows, "notes": notes, "config": config}
