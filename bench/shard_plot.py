"""The shards benchmark's curve: seconds vs images, log-log, one line per command and layout, md5sum beside them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_VARIANT = re.compile(r"^(loose|shards) (\w+), ")


def curves(rows: list[dict[str, Any]], images: list[int]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(layout, op) -> [(images, median seconds)], plus ("md5sum", "md5sum"): per size, the median of every md5sum
    pass run beside a command at that size."""
    out: dict[tuple[str, str], list[tuple[int, float]]] = {}
    md5: dict[int, list[float]] = {}
    for row in rows:
        m = _VARIANT.match(row["variant"]) if row["kind"] == "paired" else None
        if not m:
            continue
        key = (m.group(1), m.group(2))
        n = _size(row["variant"], images)
        out.setdefault(key, []).append((n, row["a"]["median"]))
        md5.setdefault(n, []).extend(row["b"]["values"])
    out[("md5sum", "md5sum")] = [(n, sorted(v)[len(v) // 2]) for n, v in sorted(md5.items())]
    return out


def _size(variant: str, images: list[int]) -> int:
    label = variant.rsplit(", ", 1)[1].split()[0]
    for n in images:
        if label in (f"{n // 1000}k", str(n)):
            return n
    raise ValueError(f"no size for {variant!r}")


def plot(rows: list[dict[str, Any]], path: Path, config: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ingest": "C0", "push": "C1", "status": "C2", "checkout": "C3", "pull": "C4", "md5sum": "black"}
    styles = {"loose": ("--", "s"), "shards": ("-", "o"), "md5sum": (":", "x")}
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for (layout, op), points in curves(rows, config["images"]).items():
        xs, ys = zip(*sorted(points))
        line, marker = styles[layout]
        label = "md5sum pass (baseline)" if layout == "md5sum" else f"{layout} {op}"
        ax.plot(xs, ys, line, marker=marker, color=colors[op], label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images")
    ax.set_ylabel("seconds (median)")
    ax.set_title(
        f"DVC: loose files vs shards ({config['avg_image_bytes'] / 1000:.1f} KB JPEGs, "
        f"shards of {config['shard_bytes'] / 2**20:g} MiB)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the lines fill the axes
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
