"""What a training run writes to MLflow beyond Lightning's own logging: its resolved config when it starts fresh,
its headline figures when it ends."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from visionflow.config import Params

if TYPE_CHECKING:
    from visionflow.training.train import RunPlan


def log_run_config(client, run_id: str, p: Params, plan: RunPlan) -> None:
    """A fresh run's resolved params (flattened, searchable), and its classes, runtime and step budget."""
    from mlflow.entities import Param

    resolved = {**p.as_dict(), "train": plan.cfg.model_dump(mode="json")}
    params = {
        **_flatten(resolved),
        "train.channels_decision": plan.decision.note,
        "train.image_size_hint": plan.decision.hint or "none",
    }
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
    client.log_dict(run_id, resolved, "params.resolved.yaml")
    client.log_dict(
        run_id,
        {
            "classes": plan.classes,
            "runtime": asdict(plan.rt),
            "max_steps": plan.max_steps,
            "steps_per_epoch": plan.steps_per_epoch,
            "input": asdict(plan.decision),
        },
        "run_config.json",
    )


def log_figures(client, run_id: str, figures: dict[str, Any], step: int) -> None:
    """The headline figures as perf/ metrics (comparable across runs in MLflow's table), the basis as a tag."""
    from mlflow.entities import Metric, RunTag

    ts = int(time.time() * 1000)
    names = ("images_per_s", "busy_fraction", "time_to_first_step_s", "time_to_first_step_after_cache_s", "cache_s")
    client.log_batch(
        run_id,
        metrics=[Metric(f"perf/{k}", float(figures[k]), ts, step) for k in names if figures.get(k) is not None],
        tags=[RunTag("visionflow.perf.busy_basis", figures["busy_basis"])],
    )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
