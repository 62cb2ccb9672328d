"""attribution: does the drift attribution name the right shift, and predict the champion's accuracy before labels?

For each of the 7 simulated shifts at severities 3 and 5: a batch of drift.batch_size held-out images (Fashion-MNIST
images ingest left out, so neither the champion nor the shift suite saw them; seeds unlike the suite's), attributed
with visionflow.monitoring.attribution against the champion's suite (test-split images). Per batch: the named
cause and severity, and the predicted accuracy beside the accuracy measured with the batch's labels. Goals: the
cause right for >= 10 of 14; the prediction within +-5 points for >= 10 of 14. The three predictors
(attribution.predictions) are all scored, which is how PREDICTOR was chosen. Two shifts outside the suite (a
photographic negative, and pixelation) show what "no close match" sees; they are not in the goals.

The champion: VISIONFLOW_BENCH_PROJECT names a project whose registry has one (e.g. a clone after
`make pipeline`); otherwise one is built in the work folder with `visionflow pipeline --no-loop` (--quick: 3,000
images, 2 epochs). `python -m bench --only attribution --out bench/results/attribution.json`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.common import REPO, Context, goal, single

NAME = "attribution"
ENV = "VISIONFLOW_BENCH_PROJECT"
SEVERITIES = (3, 5)
SEED = 9000  # batch seeds start here: unlike the suite's generator keys and the closed loop's seed + 1
TOLERANCE = 0.05


def build_project(ctx: Context) -> Path:
    """A clone-like project with a champion: the repo's params.yaml and dvc.yaml, `visionflow pipeline --no-loop`."""
    import yaml

    proj = ctx.tmp("attribution/project")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    if ctx.quick:
        raw["data"]["max_images"] = 3000
        raw["train"]["max_epochs"] = 2
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copy(REPO / "dvc.yaml", proj / "dvc.yaml")
    (proj / "data/reviewed").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "data/reviewed/README.md", proj / "data/reviewed/README.md")
    (proj / "src").symlink_to(REPO / "src")
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    ctx.log(f"[attribution] building a champion in {proj} (visionflow pipeline --no-loop)")
    exe = Path(sys.executable).with_name("visionflow")
    proc = subprocess.run([str(exe), "pipeline", "--no-loop"], cwd=proj, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"visionflow pipeline failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proj


def _negative(folder: Path) -> None:
    for f in sorted((folder / "images").iterdir()):
        Image.fromarray(255 - np.asarray(Image.open(f))).save(f)


def _pixelate(folder: Path) -> None:
    for f in sorted((folder / "images").iterdir()):
        img = Image.open(f)
        img.resize((img.width // 3, img.height // 3), Image.BILINEAR).resize(img.size, Image.NEAREST).save(f)


UNSEEN = {"negative": _negative, "pixelate": _pixelate}


def _batch_row(shift: str, sev: int | None, a: dict[str, Any], measured: float | None) -> dict[str, Any]:
    named = f"{a['cause']} {a['severity']}" if a.get("cause") else "no close match"
    right = a.get("cause") == shift
    err = {k: round(100 * (v - measured), 1) for k, v in a["predictions"].items()} if measured is not None else {}
    return single(
        f"{shift} {sev}" if sev else f"{shift} (not in the suite)",
        a["predicted_accuracy"],
        unit="accuracy",
        label="predicted accuracy",
        extra={
            "named": named,
            "right": right,
            "runner_up": f"{a['runner_up']['cause']} {a['runner_up']['severity']}",
            "distance": a["distance"],
            "confidence": a["confidence"],
            "measured_accuracy": measured,
            "error_points": round(100 * (a["predicted_accuracy"] - measured), 1) if measured is not None else None,
            "error_points_by_predictor": err,
            "summary": a["summary"],
        },
    )


def _batches(ctx: Context, p, root: Path, champion, suite) -> list[dict[str, Any]]:
    from visionflow.monitoring.attribution import SUITE_SHIFTS, attribute
    from visionflow.monitoring.drift_features import batch_accuracy, batch_features
    from visionflow.monitoring.simulate import simulate

    n = 200 if ctx.quick else p.drift.batch_size
    work = ctx.tmp("attribution/batches")
    plan = [(s, k) for s in SUITE_SHIFTS for k in SEVERITIES] + [(u, None) for u in UNSEEN]
    rows = []
    for i, (shift, sev) in enumerate(plan):
        b = simulate(
            p, root, work / f"{shift}{sev or ''}", shift=shift if sev else "none", severity=sev or 1, n=n, seed=SEED + i
        )
        if not sev:
            UNSEEN[shift](b.folder)
        cur, _ = batch_features(p, root, b.folder, champion[1], champion[2])
        a = attribute(p, suite, cur)
        rows.append(_batch_row(shift, sev, a, batch_accuracy(cur)))
        measured = rows[-1]["extra"]["measured_accuracy"]
        ctx.log(f"[attribution] {shift} {sev or ''}: {a['summary']}; measured accuracy {measured}")
    return rows


def run(ctx: Context) -> dict[str, Any]:
    from visionflow.config import load_params
    from visionflow.monitoring.attribution import PREDICTOR, load_suite
    from visionflow.monitoring.drift import load_champion
    from visionflow.monitoring.drift_features import reference_features
    from visionflow.registry.tracking import setup_mlflow

    root = Path(os.environ[ENV]).resolve() if os.environ.get(ENV) else build_project(ctx)
    p = load_params(root / "params.yaml")
    setup_mlflow(p.registry.tracking_uri, root, p.base.project, p.registry.artifact_location)
    champion = load_champion(p, root)
    ref = reference_features(p, root, *champion)
    suite = load_suite(p, root, *champion, ref, progress=lambda m: ctx.log(f"[attribution] {m}"))
    rows = _batches(ctx, p, root, champion, suite)
    scored = [r for r in rows if "not in the suite" not in r["variant"]]
    right = sum(r["extra"]["right"] for r in scored)
    within = {
        k: sum(abs(r["extra"]["error_points_by_predictor"][k]) <= 100 * TOLERANCE for r in scored)
        for k in scored[0]["extra"]["error_points_by_predictor"]
    }
    rows += [
        single(
            "cause named right",
            right,
            unit="batches",
            label=f"of {len(scored)}",
            the_goal=goal(">= 10 of 14", ">=", 10, on="value"),
        ),
        single(
            f"prediction within +-{100 * TOLERANCE:.0f} points",
            within[PREDICTOR],
            unit="batches",
            label=f"of {len(scored)} ({PREDICTOR})",
            the_goal=goal(">= 10 of 14", ">=", 10, on="value"),
            extra={"by_predictor": within},
        ),
    ]
    return {
        "rows": rows,
        "notes": ["quick mode: a 2-epoch champion on 3,000 images and 200-image batches"] if ctx.quick else [],
        "config": {
            "project": str(root),
            "champion_version": champion[0],
            "suite_images": int(suite.confidence.shape[1]),
            "batch_size": 200 if ctx.quick else p.drift.batch_size,
            "predictor": PREDICTOR,
            "max_distance": p.drift.attribution_max_distance,
            "suite_cache": str(suite.cache),
        },
    }
