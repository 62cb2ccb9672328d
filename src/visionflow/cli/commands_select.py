"""`visionflow select`: rank a batch's images for labelling within a budget (visionflow.monitoring.selection)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from visionflow.cli.commands_monitoring import existing_folder
from visionflow.cli.options import Invocation
from visionflow.cli.output import out, print_json, print_rows
from visionflow.errors import DataError


def select(
    ctx: typer.Context,
    batch: Annotated[
        Path, typer.Argument(help="a folder of images: flat, images/ (+ labels.csv), or one sub-folder per class.")
    ],
    budget: Annotated[
        int | None, typer.Option(help="images to choose (default review.budget; 0 chooses none).")
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(help="uncertainty-diversity, uncertainty or random (default review.strategy)."),
    ] = None,
) -> None:
    """Choose the images of a batch a person should label first: the champion's least certain, spread over its
    embedding space, drifted features first. Writes BATCH/selection.csv (file, rank, margin, ...)."""
    from visionflow.monitoring.selection import STRATEGIES, select_batch

    if budget is not None and budget < 0:
        raise DataError(f"--budget must be 0 or more, not {budget}")
    if strategy is not None and strategy not in STRATEGIES:
        raise DataError(f"unknown --strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    run: Invocation = ctx.obj
    p = run.params()
    existing_folder(batch, "batch folder")
    run.setup_mlflow(p)
    sel = select_batch(p, run.root, batch, budget=budget, strategy=strategy)
    summary = {**sel.summary(), "written": str(batch / "selection.csv")}
    if run.as_json:
        print_json({**summary, "selection": sel.table.to_dict(orient="records")})
        return
    print_rows(
        f"{summary['chosen']} of {sel.pool} image(s) chosen by {sel.strategy} (budget {sel.budget})",
        ["rank", "file", "margin", "predicted", "confidence"],
        [
            [str(r.rank), r.file, f"{r.margin:.3f}", r.predicted_class, f"{r.confidence:.3f}"]
            for r in sel.table.head(20).itertuples()
        ],
    )
    if len(sel.table) > 20:
        out.print(f"... {len(sel.table) - 20} more in {summary['written']}")
    if sel.budget == 0:
        out.print("budget 0: nothing chosen (review.budget or --budget)")
    if sel.unreadable:
        out.print(f"[yellow]{len(sel.unreadable)} unreadable image(s)[/], not chosen, left in place:")
        for r in sel.unreadable[:20]:
            out.print(f"  {r['file']}: {r['reason']}")
