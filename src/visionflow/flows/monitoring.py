"""The closed loop: drift check -> (event) -> retraining -> promotion gate.

- `drift_check_flow` checks a production batch (a folder, or the serving prediction log since the last check).
  On drift it claims the retraining cool-down (data/drift/retrain_ledger.json) and emits the Prefect event
  `visionflow.drift.detected`; the event's resource says whether a retraining was requested or suppressed by the
  cool-down. With deployments served (flows/deployments.py), the retraining deployment's trigger starts on a
  "requested" event; in the embedded default (no Prefect server, no worker) the check runs the retraining flow
  itself. Either way there is at most one retraining per drift.cooldown_hours.
- `retraining_flow` takes the reviewed batch in as labelled data (a new DVC data version), warm-starts from the
  champion's weights, and runs the training flow, whose promotion gate compares challenger and champion on the
  clean test split, the corruption suite and the reviewed drifted evaluation batch.
- `closed_loop_flow` is what `make pipeline` demonstrates after the first champion: a simulated drifted batch,
  drift detected, retraining, a new champion that is better on the drifted data.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from visionflow import stages
from visionflow.config import Params, load_params
from visionflow.flows.training import training_flow
from visionflow.monitoring import ledger as monitor
from visionflow.paths import ProjectPaths
from visionflow.registry.store import prefect_api_url
from visionflow.registry.tracking import setup_mlflow
from visionflow.report import update_report, write_json_atomic

DRIFT_EVENT = "visionflow.drift.detected"
RETRAIN_DEPLOYMENT = "visionflow-retraining/retrain-on-drift"


def _root_params(params_path: str, overrides: list[str] | None) -> tuple[Path, Params]:
    """The project root and its params, with MLflow set up for the flow (each flow's first step)."""
    root, p = Path(params_path).resolve().parent, load_params(params_path, overrides)
    setup_mlflow(p.registry.tracking_uri, root, p.base.project, p.registry.artifact_location)
    return root, p


@task
def check_batch(p: Params, root: Path, batch: str | None, use_prediction_log: bool) -> dict[str, Any]:
    if use_prediction_log:
        cursor = ProjectPaths.of(p, root).log_cursor
        since = json.loads(cursor.read_text())["checked_until"] if cursor.is_file() else None
        until = time.time()
        verdict = stages.drift_stage(p, root, log_path=root / p.serve.prediction_log, since=since)
        write_json_atomic(cursor, {"checked_until": until})  # only after a successful check
    else:
        verdict = stages.drift_stage(p, root, batch=Path(batch))
    log = get_run_logger()
    if verdict.get("drifted") is None:
        log.warning("no drift verdict: %s", verdict.get("message"))
    else:
        log.info(
            "%s: drift share %.2f (threshold %.2f) -> %s; moved: %s; report %s",
            verdict["batch"],
            verdict["drift_share"],
            verdict["threshold"],
            "DRIFTED" if verdict["drifted"] else "no drift",
            ", ".join(verdict["moved"][:8]) or "nothing",
            verdict["report_html"],
        )
    if verdict.get("drifted") and (verdict.get("attribution") or {}).get("summary"):
        log.info("%s: %s", verdict["batch"], verdict["attribution"]["summary"])
    if verdict["n_unreadable"]:
        log.warning("%d unreadable image(s) left in place and listed in the verdict", verdict["n_unreadable"])
    return verdict


@task
def claim_cooldown(p: Params, root: Path, verdict: dict[str, Any], trigger: str) -> monitor.Claim:
    claim = monitor.claim_retraining(
        ProjectPaths.of(p, root).retrain_ledger,
        cooldown_s=p.drift.cooldown_hours * 3600,
        trigger=trigger,
        detail={"batch": verdict["batch"], "drift_share": verdict["drift_share"]},
    )
    if not claim.granted:
        get_run_logger().info(
            "retraining suppressed: one started at %s is within the %.1f h cool-down",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(claim.last["time"])),
            p.drift.cooldown_hours,
        )
    return claim


@task
def emit_drift_event(
    p: Params, verdict: dict[str, Any], claim: monitor.Claim, batch: str | None, eval_batch: str | None
) -> str | None:
    from prefect.events import emit_event

    event = emit_event(
        event=DRIFT_EVENT,
        resource={
            "prefect.resource.id": f"visionflow.model.{p.model_name}",
            "prefect.resource.name": p.model_name,
            "visionflow.retrain": "requested" if claim.granted else "suppressed",
        },
        payload={
            "batch": batch,
            "eval_batch": eval_batch,
            "claim_id": claim.claim_id,
            "drift_share": verdict["drift_share"],
            "moved": verdict["moved"][:20],
            "champion_version": verdict["champion_version"],
            "augment": augment_of(verdict),
        },
    )
    return str(event.id) if event is not None else None


def augment_of(verdict: dict[str, Any]) -> str | None:
    """The train.augment override the drift attribution chose for the retrain (None: keep params.yaml's)."""
    return ((verdict.get("attribution") or {}).get("augment") or {}).get("override")


def _retrain_mode(requested: str) -> str:
    """'event' when a Prefect server has the retraining deployment (its trigger reacts); else 'inline'."""
    if requested != "auto":
        return requested
    if not prefect_api_url():
        return "inline"
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(RETRAIN_DEPLOYMENT)
        return "event"
    except ObjectNotFound:
        return "inline"


@flow(name="visionflow-drift-check", log_prints=True)
def drift_check_flow(
    params_path: str = "params.yaml",
    batch: str | None = None,
    use_prediction_log: bool = False,
    eval_batch: str | None = None,
    retrain: Literal["auto", "event", "inline", "off"] = "auto",
    overrides: list[str] | None = None,
    budgeted_review: bool = False,
) -> dict[str, Any]:
    """Check a batch folder (or the prediction log since the last check) for drift; retrain on drift
    (budgeted_review: see retraining_flow)."""
    root, p = _root_params(params_path, overrides)
    if batch is None and not use_prediction_log:
        raise ValueError("give a batch folder, or use_prediction_log=True")
    verdict = check_batch(p, root, batch, use_prediction_log)
    outcome: dict[str, Any] = {"drift": verdict, "retrain": {"triggered": False}}
    if not verdict.get("drifted") or retrain == "off":
        return outcome
    mode = _retrain_mode(retrain)
    claim = claim_cooldown(p, root, verdict, trigger=f"drift:{verdict['batch']}")
    event_id = emit_drift_event(p, verdict, claim, batch, eval_batch)
    outcome["retrain"] = {
        "triggered": claim.granted,
        "mode": mode,
        "event_id": event_id,
        "claim_id": claim.claim_id,
        "suppressed_until": claim.next_allowed if not claim.granted else None,
    }
    if claim.granted and mode == "inline":
        outcome["retrain"].update(
            retraining_flow(
                params_path=params_path,
                batch=batch,
                eval_batch=eval_batch,
                reason="drift",
                claim_id=claim.claim_id,
                overrides=overrides,
                budgeted_review=budgeted_review,
                augment=augment_of(verdict),
                predicted_accuracy=(verdict.get("attribution") or {}).get("predicted_accuracy"),
            )
        )
    return outcome


@task
def choose_for_review(p: Params, root: Path, batch: str) -> dict[str, Any]:
    """The images of the batch a person is asked to label: review.budget of them, by review.strategy."""
    from visionflow.monitoring.selection import select_batch

    log = get_run_logger()
    if p.base.task != "classification":  # the strategies rank one predicted label per image
        log.info("budgeted selection is for classification: every image of %s is reviewed", batch)
        return {"files": None}
    sel = select_batch(p, root, Path(batch))
    (log.info if sel.budget else log.warning)(
        "the reviewer labels %d of %d image(s), chosen by %s (review.budget %d)%s; list in %s/selection.csv",
        len(sel.table),
        sel.pool,
        sel.strategy,
        sel.budget,
        ": no labels asked, no reviewed image is added" if not sel.budget else "",
        batch,
    )
    return {**sel.summary(), "files": sorted(sel.table["file"])}


@task
def take_in_batch(
    p: Params, root: Path, batch: str, only: list[str] | None = None, predicted_accuracy: float | None = None
) -> dict[str, Any]:
    """The reviewed batch (with `only`, the images chosen for review) audited (visionflow.monitoring.batch_audit),
    then taken in unless held back."""
    taken = stages.take_in_stage(p, root, Path(batch), only, predicted_accuracy)
    audit, log = taken["audit"], get_run_logger()
    if audit is None:
        log.info("took in %d reviewed image(s) from %s", sum(taken["images"].values()), batch)
    elif audit["held"]:
        log.warning("reviewed batch %s held back from the next data version: %s", batch, audit["reason"])
    else:
        log.info(
            "took in %d reviewed image(s) from %s; label audit: %s",
            sum(taken["images"].values()),
            batch,
            audit.get("note") or f"{audit['suspects']} suspect(s) of {audit['n_audited']} ({audit['suspects_file']})",
        )
    return taken


@task
def warm_start_weights(p: Params, root: Path) -> str | None:
    path = stages.champion_weights(p, root)
    get_run_logger().info("warm start from %s", path or "scratch (no champion weights)")
    return str(path) if path else None


@flow(name="visionflow-retraining", log_prints=True)
def retraining_flow(
    params_path: str = "params.yaml",
    batch: str | None = None,
    eval_batch: str | None = None,
    reason: str = "scheduled",
    claim_id: str | None = None,
    overrides: list[str] | None = None,
    budgeted_review: bool = False,
    augment: str | None = None,
    predicted_accuracy: float | None = None,
) -> dict[str, Any]:
    """Reviewed data in (new data version), warm-started training, and the promotion gate.

    budgeted_review: the batch's labels stand for a person who labels only what the budgeted selection offers
    (review.budget images by review.strategy), so only those are taken in; otherwise every labelled image is.
    augment: a train.augment override from the drift attribution (e.g. train.augment.noise=0.5), applied on top.
    predicted_accuracy: the attribution's predicted champion accuracy on the batch (widens the label audit's limit).
    """
    root, p = _root_params(params_path, overrides)
    paths = ProjectPaths.of(p, root)
    # Event-templated parameters render a missing value as "None".
    batch, eval_batch, claim_id, augment = (
        None if v in (None, "", "None") else v for v in (batch, eval_batch, claim_id, augment)
    )
    if reason == "drift" and claim_id is None:
        # Started by an event that did not come through the cool-down ledger: claim now, or stand down.
        claim = monitor.claim_retraining(
            paths.retrain_ledger, cooldown_s=p.drift.cooldown_hours * 3600, trigger="event"
        )
        if not claim.granted:
            return {"triggered": False, "reason": "cool-down", "suppressed_until": claim.next_allowed}
        claim_id = claim.claim_id
    start = time.perf_counter()
    review = choose_for_review(p, root, batch) if batch and budgeted_review else None
    taken = (
        take_in_batch(p, root, batch, review.pop("files") if review else None, predicted_accuracy)
        if batch
        else {"images": {}, "audit": None}
    )
    extra = list(overrides or []) + ([augment] if augment else [])
    weights = warm_start_weights(p, root) if p.drift.warm_start_epochs else None
    if weights:
        extra += stages.warm_start_overrides(p, Path(weights))
    summary = training_flow(
        params_path=params_path, overrides=extra, report_path=str(paths.retrain_report), eval_batch=eval_batch
    )
    reg = summary["registry"]
    result = {
        "triggered": True,
        "reason": reason,
        "flow_run_id": str(flow_run.id),
        "reviewed_images_added": taken["images"],
        "label_audit": taken["audit"],
        "review_selection": review,
        "new_data_version": summary["data_version"],
        "warm_start": bool(weights),
        "augment_override": augment,
        "new_version": reg["version"],
        "promoted": reg["promoted"],
        "gate_reasons": reg["reasons"],
        "champion_before": reg["champion_before"],
        "champion_after": reg["champion"],
        # classification's accuracy, a detector's mAP@0.5 (`metric` says which); *_accuracy for classification
        "metric": reg["metric"],
        "clean_metric": reg["clean_metric"],
        "eval_batch_metric": reg["eval_batch_metric"],
        "clean_accuracy": reg.get("clean_accuracy"),
        "eval_batch_accuracy": reg.get("eval_batch_accuracy"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if claim_id:
        monitor.record_outcome(
            paths.retrain_ledger,
            claim_id,
            new_version=reg["version"],
            promoted=reg["promoted"],
            flow_run_id=str(flow_run.id),
        )
    return result


@task
def simulate_batch(
    p: Params, root: Path, name: str, shift: str, severity: int, n: int, seed: int, skip: int = 0
) -> str:
    folder = stages.simulate_stage(p, root, name, shift=shift, severity=severity, n=n, seed=seed, skip=skip)
    get_run_logger().info("simulated %s: %d held-out images, shift %s at severity %d", folder, n, shift, severity)
    return str(folder)


@task
def size_loop(p: Params, root: Path) -> tuple[int, str]:
    """Images per batch, sized to the held-out pool; 0 when it is too small for a drift verdict."""
    n, note = stages.loop_size_stage(p, root)
    (get_run_logger().warning if n == 0 else get_run_logger().info)(note)
    return n, note


@flow(name="visionflow-closed-loop", log_prints=True)
def closed_loop_flow(
    params_path: str = "params.yaml", overrides: list[str] | None = None, report_path: str | None = None
) -> dict[str, Any]:
    """A drifted production batch arrives; drift is detected; retraining; a better champion on the drifted data.

    On a small dataset the batches shrink to fit the held-out images, or the loop is skipped with a note.
    report_path: where the loop's keys go (default reports/pipeline.json; relative to the project root).
    """
    root, p = _root_params(params_path, overrides)
    report = root / report_path if report_path else ProjectPaths.of(p, root).pipeline_report
    shift, sev = p.drift.default_shift, p.drift.default_severity
    n, note = size_loop(p, root)
    if n == 0:
        loop = {"skipped": True, "note": note}
        update_report(report, closed_loop=loop)
        return {"closed_loop": loop}
    # Production batch (reviewed labels travel with it) and a separate held-out batch under the same shift for
    # judging the retrained model on drifted data it never saw: one seeded draw, split in two, so they are disjoint.
    production = simulate_batch(p, root, f"production-{shift}{sev}", shift, sev, n, p.base.seed + 1)
    holdout = simulate_batch(p, root, f"holdout-{shift}{sev}", shift, sev, n, p.base.seed + 1, skip=n)
    outcome = drift_check_flow(
        params_path=params_path,
        batch=production,
        eval_batch=holdout,
        retrain="inline",
        overrides=overrides,
        budgeted_review=True,  # the simulated reviewer labels only what the review queue would offer
    )
    v, r = outcome["drift"], outcome["retrain"]
    drift = {
        "batch": production,
        "drifted": v.get("drifted"),
        "drift_share": v.get("drift_share"),
        "features": v.get("moved"),
        "views": v.get("views"),
        "report_html": v.get("report_html"),
        "champion_accuracy_on_batch": v.get("accuracy"),
        "attribution": v.get("attribution"),
        # the attribution's accuracy predicted before any label, against the one the batch's labels measure
        "predicted_accuracy": (v.get("attribution") or {}).get("predicted_accuracy"),
    }
    retrain = {
        k: r.get(k)
        for k in (
            "triggered",
            "reason",
            "new_data_version",
            "new_version",
            "promoted",
            "gate_reasons",
            "champion_before",
            "champion_after",
            "metric",
            "clean_metric",
            "eval_batch_metric",
            "clean_accuracy",
            "eval_batch_accuracy",
            "seconds",
            "suppressed_until",
            "label_audit",
            "review_selection",
            "reviewed_images_added",
            "augment_override",
        )
    }
    ev = r.get("eval_batch_metric") or {}
    # Before and after on the drifted hold-out batch: after is the champion's once the gate has decided (the
    # challenger if promoted). In the task's metric: accuracy, or a detector's mAP@0.5.
    before, after = ev.get("champion"), ev.get("challenger") if r.get("promoted") else ev.get("champion")
    retrain["drifted_metric_before"], retrain["drifted_metric_after"] = before, after
    if p.base.task == "classification":
        retrain["drifted_accuracy_before"], retrain["drifted_accuracy_after"] = before, after
    retrain["holdout_batch"] = holdout
    loop = {"skipped": False, "note": note, "batch_size": n}
    update_report(report, drift=drift, retrain=retrain, closed_loop=loop)
    return {"drift": drift, "retrain": retrain, "closed_loop": loop}
