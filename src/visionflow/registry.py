"""MLflow model registry: register ONNX models with lineage, and promote with aliases behind gates.

Aliases, never stages: a new version gets `challenger`; it takes `champion` only when every gate passes, and the
outgoing champion keeps `previous`. Promotions are serialised by a lock, and the champion alias moves in one
registry call after all checks, so concurrent promoters end with exactly one champion and a failure midway
leaves the old one in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.config import RegistryParams
from visionflow.errors import VisionflowError

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
TAG = "visionflow."


class RegistryError(VisionflowError):
    """The registry does not hold what was asked for (no such model, version or alias)."""


def _client():
    import mlflow

    return mlflow.MlflowClient()


def register_onnx(*, onnx_path: Path, card: dict[str, Any], model_name: str, mlflow_run_id: str,
                  tags: dict[str, str], metrics: dict[str, float]) -> str:
    """Log the ONNX model (with its card and signature) to the training run and register it, the card as the
    version's description; returns the new version."""
    import mlflow
    import onnx

    from visionflow.export import model_card_markdown, onnx_signature

    client = _client()
    model = onnx.load(str(onnx_path))
    with mlflow.start_run(run_id=mlflow_run_id):
        info = mlflow.onnx.log_model(model, name="onnx_model", registered_model_name=model_name,
                                     signature=onnx_signature(model), metadata={"visionflow_card": card})
        mlflow.log_dict(card, "onnx_model_card.json")
    version = str(info.registered_model_version)
    client.update_model_version(model_name, version, description=model_card_markdown(card))
    for k, v in {**tags, f"{TAG}onnx_sha256": card["onnx_sha256"]}.items():
        client.set_model_version_tag(model_name, version, k, str(v))
    for k, v in metrics.items():
        client.set_model_version_tag(model_name, version, f"{TAG}metric.{k}", f"{v:.6f}")
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    return version


def alias_version(model_name: str, alias: str) -> str | None:
    try:
        return str(_client().get_model_version_by_alias(model_name, alias).version)
    except Exception as exc:  # MLflow raises RestException/MlflowException for a missing alias or model
        if "not found" in str(exc).lower() or "does not exist" in str(exc).lower() or "RESOURCE_DOES_NOT_EXIST" in str(exc):
            return None
        raise


def version_info(model_name: str, version: str) -> dict[str, Any]:
    mv = _client().get_model_version(model_name, version)
    return {"version": str(mv.version), "run_id": mv.run_id, "source": mv.source, "tags": dict(mv.tags),
            "aliases": list(getattr(mv, "aliases", []) or [])}


def download_onnx(model_name: str, version: str, dest: Path) -> tuple[Path, dict[str, Any]]:
    """The version's model.onnx and its card (the MLmodel metadata), downloaded from the registry into dest
    (created if missing)."""
    import mlflow

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}",
                                                     dst_path=str(dest)))
    onnx_file = next(local.rglob("*.onnx"))
    return onnx_file, mlflow.models.Model.load(str(onnx_file.parent)).metadata["visionflow_card"]


def prefect_api_url() -> str | None:
    """The Prefect API this process's clients talk to, or None when they use the local temporary server.

    Read from Prefect's settings, not os.environ: Prefect fixes its settings when first imported (profiles and
    temporary_settings included), so only this tells where its clients really go.
    """
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


@contextlib.contextmanager
def promotion_lock(lock_dir: Path, model_name: str, timeout_s: float = 600) -> Iterator[None]:
    """One promotion at a time per model.

    With a Prefect server (PREFECT_API_URL set: server mode, promoters on several machines) the lock is a Prefect
    global concurrency limit of 1 held under a lease, so a promoter that dies frees it when the lease runs out;
    locally it is a file lock (every promoter on this machine or a shared filesystem).
    """
    if prefect_api_url():
        with _prefect_lock(f"visionflow-promote-{model_name}", timeout_s):
            yield
        return
    from filelock import FileLock, Timeout

    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_dir / f"promote-{model_name}.lock"))
    try:
        with lock.acquire(timeout=timeout_s):
            yield
    except Timeout:
        raise VisionflowError(f"another promotion of {model_name} held the lock for over {timeout_s}s") from None


@contextlib.contextmanager
def _prefect_lock(name: str, timeout_s: float) -> Iterator[None]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    api = prefect_api_url()
    try:
        with get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                except ObjectAlreadyExists:  # another promoter created it first
                    pass
    except Exception as exc:
        raise VisionflowError(f"the Prefect server at {api} holds the promotion lock in server mode but could not be "
                              f"reached ({type(exc).__name__}: {str(exc)[:200]}); start it, fix PREFECT_API_URL / "
                              "PREFECT_API_AUTH_STRING, or unset PREFECT_API_URL to promote locally") from None
    acquired = False
    try:
        with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
            acquired = True
            yield
    except TimeoutError:
        if acquired:
            raise
        raise VisionflowError(f"another promotion held {name} on {api} for over {timeout_s}s") from None


# --- gates --------------------------------------------------------------------------------------------------


@dataclass
class Gate:
    name: str
    passed: bool
    detail: str
    value: float | None = None


@dataclass
class Decision:
    model: str
    version: str
    promoted: bool
    champion_before: str | None
    champion_after: str | None
    gates: list[Gate] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return [f"{g.name}: {g.detail}" for g in self.gates if not g.passed]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": self.reasons}


def paired_bootstrap_lower(correct_new: np.ndarray, correct_old: np.ndarray, *, n_boot: int, alpha: float,
                           seed: int) -> tuple[float, float]:
    """Mean accuracy gain (new - old) on the same images and its one-sided (1 - alpha) bootstrap lower bound.

    Per image the paired difference is -1, 0 or +1, so resampling images with replacement is exactly a
    multinomial draw over those three outcomes: the same bootstrap without materialising n_boot x n indices.
    """
    diff = correct_new.astype(np.int8) - correct_old.astype(np.int8)
    n = len(diff)
    probs = [(diff == -1).mean(), (diff == 0).mean(), (diff == 1).mean()]
    draws = np.random.default_rng(seed).multinomial(n, probs, size=n_boot)
    boots = (draws[:, 2] - draws[:, 0]) / n
    return float(diff.mean()), float(np.quantile(boots, alpha))


def per_class_recall(correct: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.array([correct[labels == c].mean() if (labels == c).any() else np.nan for c in range(n_classes)])


def gate_decision(*, cfg: RegistryParams, parity_passed: bool, parity_detail: str, latency_ms: float,
                  clean_new: np.ndarray, labels: np.ndarray, classes: list[str], seed: int,
                  clean_old: np.ndarray | None = None, all_new: np.ndarray | None = None,
                  all_old: np.ndarray | None = None, compared_on: str = "clean+corrupted") -> list[Gate]:
    """Every gate the challenger must pass. clean_* are per-image correctness on the clean test split;
    all_* add the corruption suite; both models are judged on exactly the same images."""
    gates = [Gate("parity", parity_passed, parity_detail)]
    acc = float(clean_new.mean())
    gates.append(Gate("accuracy_floor", acc >= cfg.accuracy_floor,
                      f"test accuracy {acc:.4f} {'>=' if acc >= cfg.accuracy_floor else '<'} floor "
                      f"{cfg.accuracy_floor}", acc))
    gates.append(Gate("latency", latency_ms <= cfg.latency_budget_ms,
                      f"ONNX Runtime batch-1 latency {latency_ms:.2f} ms vs budget {cfg.latency_budget_ms} ms",
                      latency_ms))
    if clean_old is not None:
        new = all_new if all_new is not None else clean_new
        old = all_old if all_old is not None else clean_old
        gain, lower = paired_bootstrap_lower(new, old, n_boot=cfg.bootstrap_samples, alpha=cfg.bootstrap_alpha,
                                             seed=seed)
        gates.append(Gate("beats_champion", lower > cfg.min_gain,
                          f"accuracy gain over champion {gain:+.4f} on {len(new)} {compared_on} images, "
                          f"{1 - cfg.bootstrap_alpha:.0%} lower bound {lower:+.4f} "
                          f"{'>' if lower > cfg.min_gain else '<='} margin {cfg.min_gain}", lower))
        k = len(classes)
        drop = per_class_recall(clean_old, labels, k) - per_class_recall(clean_new, labels, k)
        worst = int(np.nanargmax(drop))
        gates.append(Gate("no_class_regression", bool(drop[worst] <= cfg.max_class_drop),
                          f"largest per-class recall drop {drop[worst]:+.4f} ({classes[worst]}) vs limit "
                          f"{cfg.max_class_drop}", float(drop[worst])))
    return gates


def apply_promotion(model_name: str, version: str, gates: list[Gate]) -> Decision:
    """Set challenger; move champion (keeping previous) only if all gates passed. Call under promotion_lock."""
    client = _client()
    before = alias_version(model_name, CHAMPION)
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    passed = all(g.passed for g in gates)
    for g in gates:
        client.set_model_version_tag(model_name, version, f"{TAG}gate.{g.name}", "passed" if g.passed else "failed")
    client.set_model_version_tag(model_name, version, f"{TAG}parent_champion", before or "none")
    after = before
    if passed and before != version:
        if before is not None:
            client.set_registered_model_alias(model_name, PREVIOUS, before)
        client.set_registered_model_alias(model_name, CHAMPION, version)  # the single atomic switch
        after = version
    client.set_model_version_tag(model_name, version, f"{TAG}promoted", str(passed).lower())
    return Decision(model_name, version, passed, before, after, gates)


def rollback(model_name: str) -> tuple[str, str]:
    """champion <- previous; the demoted version becomes previous. Returns (demoted, restored)."""
    client = _client()
    current, previous = alias_version(model_name, CHAMPION), alias_version(model_name, PREVIOUS)
    if current is None or previous is None:
        raise RegistryError(f"{model_name} has no {'champion' if current is None else 'previous'} alias to roll "
                            "back from/to")
    client.set_registered_model_alias(model_name, CHAMPION, previous)
    client.set_registered_model_alias(model_name, PREVIOUS, current)
    client.set_model_version_tag(model_name, current, f"{TAG}rolled_back", "true")
    return current, previous
