"""bench.user_folder: the generated "own folder" has what issue 21's folder had (and is the same for a seed)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from bench.user_folder import CLASSES, main, make_user_folder


def _kinds(root: Path) -> Counter:
    kinds: Counter = Counter()
    for f in sorted(root.rglob("*")):
        if f.is_symlink():
            target = Path(os.path.realpath(f))
            kinds[
                "link-"
                + (
                    "dangling"
                    if not target.exists()
                    else "inside"
                    if target.is_relative_to(root.resolve())
                    else "outside"
                )
            ] += 1
        elif f.is_file():
            try:
                with Image.open(f) as im:
                    im.load()
                    kinds[(im.format, "colour" if im.mode == "RGB" else im.mode)] += 1
            except OSError:
                kinds["broken"] += 1
    return kinds


def test_folder_has_classes_formats_debris_and_symlinks(tmp_path):
    root = make_user_folder(tmp_path / "f", per_class=12, n_classes=4, min_side=20, max_side=60, seed=3)
    assert sorted(d.name for d in root.iterdir()) == list(CLASSES[:4])
    kinds = _kinds(root)
    assert kinds["broken"] == 3  # truncated JPEG, zero-byte file, text named .jpg
    assert kinds["link-inside"] == kinds["link-outside"] == kinds["link-dangling"] == 1
    images = {k: v for k, v in kinds.items() if isinstance(k, tuple)}
    assert sum(images.values()) == 48 and kinds[("JPEG", "colour")] and kinds[("PNG", "colour")]
    sizes = {Image.open(f).size for f in root.rglob("IMG_*")}
    assert len(sizes) > 20 and all(20 <= min(s) and max(s) <= 60 for s in sizes)


def test_same_seed_same_folder_and_the_cli_refuses_a_non_empty_folder(tmp_path, capsys):
    a = make_user_folder(tmp_path / "a", per_class=3, n_classes=2, symlinks=False, seed=1)
    b = make_user_folder(tmp_path / "b", per_class=3, n_classes=2, symlinks=False, seed=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert main([str(tmp_path / "c"), "--per-class", "2", "--classes", "2"]) == 0
    assert "2 classes" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main([str(tmp_path / "c")])
    assert refused.value.code == 2
