"""Commands of the data part of the pipeline: ingest, version, validate, split; and export-data, check-params."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from visionflow import stages
from visionflow.cli.options import Invocation
from visionflow.cli.output import console, out, print_json, progress_bar
from visionflow.config import Params
from visionflow.paths import ProjectPaths

SHARDS_ADVISED = 100_000  # images from which the loose layout costs DVC minutes per command (BENCHMARKS.md)


def ingest(
    ctx: typer.Context, force: Annotated[bool, typer.Option(help="rewrite data/raw even if it is up to date.")] = False
) -> None:
    """Bring the dataset (data.source: 'fashion-mnist', 'fashion-mnist-photos' or a folder per class) into
    data/raw/<class>/."""
    run: Invocation = ctx.obj
    p = run.params()
    with progress_bar("ingest") as update:
        res = stages.ingest_stage(p, run.root, force=force, progress=update)
    from visionflow.data.ingest import MARKER

    left_out = Counter(s["reason"] for s in res.skipped_files)  # each file and its reason: in the MARKER file
    run.show(
        "ingest" + (" (up to date, skipped)" if res.skipped else ""),
        {
            "source": res.source,
            "raw_dir": res.raw_dir,
            "images": res.n_images,
            "classes": res.classes,
            **({"shards": res.n_shards, "content version": res.content_version} if res.n_shards else {}),
            **({f"left out (see {Path(res.raw_dir).parent / MARKER})": dict(left_out)} if left_out else {}),
            "label overrides applied": res.overrides_applied,
        },
    )
    from visionflow.data.relabel import missing_warning

    if warning := missing_warning(ProjectPaths.of(p, run.root).label_overrides, res.overrides_missing):
        console.print(f"[yellow]warning:[/] {warning}")
    if not res.n_shards and res.n_images >= SHARDS_ADVISED:
        console.print(
            f"[yellow]hint:[/] {res.n_images} loose files make every `dvc` command slow; data.layout: shards "
            "packs them into a few dozen files (README, 'Data at scale: shards')"
        )


def version(
    ctx: typer.Context, push: Annotated[bool, typer.Option(help="push the data to the DVC remote.")] = True
) -> None:
    """Version data/raw with DVC (init when needed), push it to the remote and print the data version."""
    run: Invocation = ctx.obj
    run.show("data version", stages.version_stage(run.params(), run.root, push=push))


def data_version_or_warn(p: Params, root: Path) -> str | None:
    dv = stages.current_data_version(p, root)
    if dv is None:
        console.print(
            "[yellow]warning:[/] data/raw is not versioned yet (run `visionflow version`); "
            "results will say data_version=unversioned"
        )
    return dv


def validate(ctx: typer.Context) -> None:
    """Build the image manifest, check it with the great-expectations suite and quarantine failing files."""
    run: Invocation = ctx.obj
    p = run.params()
    dv = data_version_or_warn(p, run.root)
    with progress_bar("validate") as update:
        res = stages.validate_stage(p, run.root, dv, progress=update)
    run.show(
        "validation",
        {
            "data_version": dv,
            "images": res.n_images,
            "accepted": res.n_accepted,
            "quarantined": res.n_quarantined,
            "by_reason": res.quarantined_by_reason,
            "report": res.report_html,
        },
    )


def split(ctx: typer.Context) -> None:
    """Write stratified, leakage-checked train/val/test manifests to data/splits/."""
    run: Invocation = ctx.obj
    res = stages.split_stage(run.params(), run.root)
    run.show("split", {**res.counts, "leakage_free": res.leakage_free})


def export_data(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Argument(metavar="OUT", help="the folder to write OUT/<class>/<file> into (created if needed).")
    ],
) -> None:
    """Write data/raw's images back out as OUT/<class>/<file>, byte for byte (from shards or loose files).

    OUT must be empty or hold an earlier export of the same images (only missing files are written, so a second
    run writes nothing); any other file in OUT stops it before anything is written.
    """
    run: Invocation = ctx.obj
    raw = run.paths(run.params()).raw
    from visionflow.data import export

    with progress_bar("export-data") as update:
        written, total = export.export(raw, out, progress=update)
    run.show(
        "export-data" + ("" if written else " (up to date, nothing written)"),
        {"raw_dir": str(raw), "out": str(out.resolve()), "images": total, "written": written},
    )


def check_params(ctx: typer.Context) -> None:
    """Validate params.yaml (and --set overrides) and print the resolved values."""
    run: Invocation = ctx.obj
    p = run.params()
    if run.as_json:
        print_json({"params": p.as_dict(), "digest": p.digest()})
        return
    out.print_json(data=p.as_dict())
    out.print(f"params digest {p.digest()}")
