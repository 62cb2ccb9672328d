"""The shards scaling benchmark runs end to end at tiny sizes: its rows, the reviewed-images figures, the plot."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from bench.dvc_shards import OPS, base_jpegs, unique_jpeg
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # real DVC: about 25 DVC commands, 30 to 60 s on 2 cores


def test_generated_images_are_unique_valid_jpegs():
    from PIL import Image

    bases = base_jpegs(3, size=64)
    files = [unique_jpeg(bases, i) for i in range(6)]
    assert len(set(files)) == 6
    for data in files:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            assert img.format == "JPEG" and img.size == (64, 64)


def test_shards_bench_at_tiny_sizes(tmp_path):
    out = tmp_path / "shards.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--only",
            "shards",
            "--shard-images",
            "150",
            "300",
            "--loose-max",
            "150",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, COLUMNS="200", DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1"),
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    bench = json.loads(out.read_text())["benchmarks"]["shards"]
    assert bench["status"] == "ok", bench.get("traceback")
    cfg = bench["config"]
    assert cfg["images"] == [150, 300] and cfg["review_at"] == 300 and 5_000 < cfg["avg_image_bytes"] < 30_000
    assert (tmp_path / "shards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and cfg["plot"].endswith("shards.png")
    assert any("loose layout not run above 150" in n for n in bench["notes"])

    paired = {r["variant"]: r for r in bench["rows"] if r["kind"] == "paired"}
    expected = {
        f"{layout} {op}, {n} images" for op in OPS for layout, n in (("loose", 150), ("shards", 150), ("shards", 300))
    }
    assert set(paired) == expected  # 300 is above --loose-max: shards only
    for name, row in paired.items():
        assert row["repeats"] == 1 and row["a"]["median"] > 0 and row["b"]["median"] > 0, name
        assert row["ratio"]["median"] == pytest.approx(row["a"]["median"] / row["b"]["median"])
        if name.startswith("shards"):
            assert row["goal"]["target"] == 3.0 and row["goal"]["met"] in (True, False)
        else:
            assert row["goal"] is None
    assert paired["shards push, 300 images"]["extra"]["a_files_pushed"]["median"] >= 2  # a shard and its index

    single = {r["variant"].split(": ")[1]: r for r in bench["rows"] if r["kind"] == "single"}
    assert set(single) == {"shards added", "files pushed", "bytes pushed", "seconds"}
    assert single["shards added"]["value"] == 1.0 and single["shards added"]["goal"]["met"] is True
    # one new shard: its tar, its index and the new .dir listing; about 500 images' bytes
    assert single["files pushed"]["value"] == 3.0
    assert 500 * 5_000 < single["bytes pushed"]["value"] < 500 * 30_000
    assert single["seconds"]["value"] > 0
