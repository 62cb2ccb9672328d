"""Data the benchmarks run on: seeded subsets of the real splits when the pipeline has made them, else synthetic
Fashion-MNIST-like PNGs."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import REPO, Context

N_CLASSES = 10  # class count of the synthetic data and of the untrained nets built without a dataset


def synthetic_classes(n: int = N_CLASSES) -> list[str]:
    return [f"class_{i}" for i in range(n)]


@dataclass
class SplitData:
    """Split manifests (train/val/test csv) and the cache folder build_cache writes into."""

    splits_dir: Path
    cache_dir: Path
    classes: list[str]
    source: str  # "real (...)" or "synthetic (...)"
    counts: dict[str, int]


def real_data_available() -> bool:
    return (REPO / "data/splits/train.csv").is_file() and (REPO / "data/cache").is_dir()


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def synthetic_pngs(n: int, size: int = 28, seed: int = 0) -> list[bytes]:
    """n distinct grayscale PNGs shaped like Fashion-MNIST (a blob on a dark background plus noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        cy, cx, r = rng.uniform(size * 0.3, size * 0.7, 2).tolist() + [rng.uniform(size * 0.2, size * 0.45)]
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) * rng.uniform(80, 220)
        arr = np.clip(blob + rng.normal(0, 25, (size, size)), 0, 255).astype(np.uint8)
        out.append(_png(arr))
    return out


def make_splits(
    ctx: Context, name: str, counts: dict[str, int], *, use_whole_real_train: bool = False, n_classes: int = N_CLASSES
) -> SplitData:
    """Train/val/test manifests for a benchmark: the real splits (a seeded subset of each, or the whole real
    train split with the pipeline's own cache when use_whole_real_train) when data/splits and data/cache exist,
    else synthetic Fashion-MNIST-like PNGs written under the work folder."""
    import pandas as pd

    from visionflow.data.validate import read_manifest
    from visionflow.training.datamodule import class_names

    real_dir = REPO / "data/splits"
    if real_data_available():
        classes = class_names(real_dir)
        if use_whole_real_train:
            n = {s: len(read_manifest(real_dir / f"{s}.csv")) for s in ("train", "val", "test")}
            return SplitData(real_dir, REPO / "data/cache", classes, "real (data/splits, data/cache)", n)
        out = ctx.tmp(f"{name}/splits")
        got = {}
        for split, k in counts.items():
            df = read_manifest(real_dir / f"{split}.csv")
            df = df.sample(n=min(k, len(df)), random_state=0) if k < len(df) else df
            df["path"] = [str(REPO / x) for x in df["path"]]  # stored relative to the project root
            df.to_csv(out / f"{split}.csv", index=False)
            got[split] = len(df)
        return SplitData(out, ctx.tmp(f"{name}/cache"), classes, "real subset of data/splits", got)
    classes = synthetic_classes(n_classes)
    root = ctx.tmp(f"{name}/images")
    out = ctx.tmp(f"{name}/splits")
    seed = 0
    for split, k in counts.items():
        rows = []
        for i, data in enumerate(synthetic_pngs(k, seed=seed)):
            label = classes[i % n_classes]
            path = root / split / label / f"{i:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            rows.append({"path": str(path), "label": label})
        pd.DataFrame(rows).to_csv(out / f"{split}.csv", index=False)
        seed += 1
    return SplitData(
        out, ctx.tmp(f"{name}/cache"), classes, "synthetic PNGs (no data/splits + data/cache)", dict(counts)
    )
