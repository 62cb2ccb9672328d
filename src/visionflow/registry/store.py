"""MLflow model registry: register ONNX models with lineage, and promote with aliases behind gates.

Aliases, never stages: a new version gets `challenger`; it takes `champion` only when every gate passes, and the
outgoing champion keeps `previous`. Promotions are serialised by a lock, so concurrent promoters end with exactly
one champion. The writes of a promotion or rollback are all or nothing (`_Writes`): the champion alias moves last,
and a store failure at any earlier write undoes the ones before it, so the registry is left as it was. The gates
themselves are judged in registry.gates.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from visionflow.errors import VisionflowError
from visionflow.locks import file_lock
from visionflow.registry.gates import Decision, Gate

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
TAG = "visionflow."


class RegistryError(VisionflowError):
    """The registry does not hold what was asked for (no such model, version or alias)."""


def _client():
    import mlflow

    return mlflow.MlflowClient()


def _short(exc: BaseException) -> str:
    """The first line of an exception (MLflow's carry the whole SQL statement after it)."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else type(exc).__name__
    return first if len(first) <= 200 else first[:197] + "..."


def _not_found(exc: BaseException) -> bool:
    text = str(exc)
    return "not found" in text.lower() or "does not exist" in text.lower() or "RESOURCE_DOES_NOT_EXIST" in text


def register_onnx(
    *,
    onnx_path: Path,
    card: dict[str, Any],
    model_name: str,
    mlflow_run_id: str,
    tags: dict[str, str],
    metrics: dict[str, float],
) -> str:
    """Log the ONNX model (with its card and signature) to the training run and register it, the card as the
    version's description; returns the new version."""
    import mlflow
    import onnx

    from visionflow.registry.export import model_card_markdown, onnx_signature

    client = _client()
    model = onnx.load(str(onnx_path))
    with mlflow.start_run(run_id=mlflow_run_id):
        info = mlflow.onnx.log_model(
            model,
            name="onnx_model",
            registered_model_name=model_name,
            signature=onnx_signature(model),
            metadata={"visionflow_card": card},
        )
        mlflow.log_dict(card, "onnx_model_card.json")
    version = str(info.registered_model_version)
    client.update_model_version(model_name, version, description=model_card_markdown(card))
    for k, v in {**tags, f"{TAG}onnx_sha256": card["onnx_sha256"]}.items():
        client.set_model_version_tag(model_name, version, k, str(v))
    for k, v in metrics.items():
        client.set_model_version_tag(model_name, version, f"{TAG}metric.{k}", f"{v:.6f}")
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    return version


def tag_version(model_name: str, version: str, key: str, value: str) -> None:
    """One tag on one version (e.g. the canary's verdict, which a restarted server reads)."""
    _client().set_model_version_tag(model_name, version, key, value)


def alias_version(model_name: str, alias: str) -> str | None:
    try:
        return str(_client().get_model_version_by_alias(model_name, alias).version)
    except Exception as exc:  # MLflow raises RestException/MlflowException for a missing alias or model
        if _not_found(exc):
            return None
        raise RegistryError(
            f"could not read the {alias!r} alias of {model_name} from the registry ({_short(exc)})"
        ) from exc


def version_info(model_name: str, version: str) -> dict[str, Any]:
    try:
        mv = _client().get_model_version(model_name, version)
    except Exception as exc:
        if _not_found(exc) or getattr(exc, "error_code", None) == "INVALID_PARAMETER_VALUE":
            raise RegistryError(
                f"{model_name} has no version {version!r} in the registry (see the MLflow UI, or "
                f"`visionflow lineage {model_name}@champion`)"
            ) from exc
        raise RegistryError(f"could not read {model_name} v{version} from the registry ({_short(exc)})") from exc
    return {
        "version": str(mv.version),
        "run_id": mv.run_id,
        "source": mv.source,
        "tags": dict(mv.tags),
        "aliases": list(getattr(mv, "aliases", []) or []),
    }


def download_onnx(model_name: str, version: str, dest: Path) -> tuple[Path, dict[str, Any]]:
    """The version's model.onnx and its card (the MLmodel metadata), downloaded from the registry into dest
    (created if missing)."""
    import mlflow

    info = version_info(model_name, version)
    dest = Path(dest)
    # MLflow logs an INFO line of its own when there is nothing to download; the error below says it better
    quiet = logging.getLogger("mlflow.store.artifact.artifact_repo")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}", dst_path=str(dest))
        )
        onnx_file = next(iter(sorted(local.rglob("*.onnx"))), None)
    except Exception as exc:  # noqa: BLE001 - any download failure is reported below with its cause
        onnx_file, cause = None, _short(exc)
    else:
        cause = "no .onnx file there"
    finally:
        quiet.setLevel(level)
    if onnx_file is None:
        raise RegistryError(
            f"{model_name} v{version}: its model files could not be fetched from {info['source']} "
            f"({cause}); the artifact store has lost them or is unreachable. Promote or roll back "
            "to a version whose files are there"
        )
    card = (mlflow.models.Model.load(str(onnx_file.parent)).metadata or {}).get("visionflow_card")
    if not card:
        raise RegistryError(
            f"{model_name} v{version} has no model card in its MLmodel metadata: it was not "
            "registered by `visionflow register`"
        )
    return onnx_file, card


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
    with file_lock(
        lock_dir / f"promote-{model_name}.lock", timeout_s=timeout_s, holder=f"another promotion of {model_name}"
    ):
        yield


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
    except Exception as exc:  # noqa: BLE001 - whatever stops the server lock, the message says what to do
        raise VisionflowError(
            f"the Prefect server at {api} holds the promotion lock in server mode but could not be "
            f"reached ({type(exc).__name__}: {str(exc)[:200]}); start it, fix PREFECT_API_URL / "
            "PREFECT_API_AUTH_STRING, or unset PREFECT_API_URL to promote locally"
        ) from None
    acquired = False
    try:
        with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
            acquired = True
            yield
    except TimeoutError:
        if acquired:
            raise
        raise VisionflowError(f"another promotion held {name} on {api} for over {timeout_s}s") from None


class _Writes:
    """The registry writes of one promotion or rollback, all or none.

    MLflow has no transaction across calls, so each write first reads what it replaces; when one fails, the
    writes before it are undone in reverse order. Callers make the champion alias (what serving reads) the last
    write: once it is made, nothing is left to fail.
    """

    def __init__(self, model_name: str, what: str) -> None:
        self.client, self.name, self.what = _client(), model_name, what
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def alias(self, alias: str, version: str) -> None:
        def restore(old: str | None) -> None:
            if old is None:
                self.client.delete_registered_model_alias(self.name, alias)
            else:
                self.client.set_registered_model_alias(self.name, alias, old)

        self._do(
            f"setting {alias} to v{version}",
            lambda: alias_version(self.name, alias),
            lambda: self.client.set_registered_model_alias(self.name, alias, version),
            restore,
        )

    def tag(self, version: str, key: str, value: str) -> None:
        def restore(old: str | None) -> None:
            if old is None:
                self.client.delete_model_version_tag(self.name, version, key)
            else:
                self.client.set_model_version_tag(self.name, version, key, old)

        self._do(
            f"tagging v{version} {key}={value}",
            lambda: self.client.get_model_version(self.name, version).tags.get(key),
            lambda: self.client.set_model_version_tag(self.name, version, key, value),
            restore,
        )

    def _do(
        self, step: str, read: Callable[[], Any], write: Callable[[], None], restore: Callable[[Any], None]
    ) -> None:
        try:
            old = read()
            write()
        except Exception as exc:  # noqa: BLE001 - any failed write undoes the earlier ones (_fail)
            self._fail(step, exc)
        self._undo.append((step, lambda: restore(old)))

    def _fail(self, step: str, exc: Exception) -> NoReturn:
        stuck = []
        for done, undo in reversed(self._undo):
            try:
                undo()
            except Exception:  # noqa: BLE001 - an undo that fails is reported, the rest still undone
                stuck.append(done)
        if stuck:
            raise RegistryError(
                f"{self.what} of {self.name} failed at {step} ({_short(exc)}), and undoing "
                f"{'; '.join(stuck)} failed too: check `visionflow lineage {self.name}@champion` "
                "and set those aliases by hand"
            ) from exc
        raise RegistryError(
            f"{self.what} of {self.name} failed at {step} ({_short(exc)}); the registry is unchanged"
        ) from exc


def apply_promotion(model_name: str, version: str, gates: list[Gate]) -> Decision:
    """Set challenger; move champion (keeping previous) only if all gates passed. Call under promotion_lock."""
    before = alias_version(model_name, CHAMPION)
    passed = all(g.passed for g in gates)
    moves = passed and before != version
    writes = _Writes(model_name, f"promotion of v{version}")
    writes.alias(CHALLENGER, version)
    for g in gates:
        writes.tag(version, f"{TAG}gate.{g.name}", "passed" if g.passed else "failed")
    writes.tag(version, f"{TAG}parent_champion", before or "none")
    writes.tag(version, f"{TAG}promoted", str(passed).lower())
    if moves:
        if before is not None:
            writes.alias(PREVIOUS, before)
        writes.alias(CHAMPION, version)  # the switch serving sees, last
    return Decision(model_name, version, passed, before, version if moves else before, gates)


def rollback(model_name: str) -> tuple[str, str]:
    """champion <- previous; the demoted version becomes previous. Returns (demoted, restored)."""
    current, previous = alias_version(model_name, CHAMPION), alias_version(model_name, PREVIOUS)
    if current is None or previous is None:
        raise RegistryError(
            f"{model_name} has no {'champion' if current is None else 'previous'} alias to roll back from/to"
        )
    if current == previous:
        raise RegistryError(
            f"{model_name}: champion and previous are both v{current}, so a rollback would change "
            f"nothing; point `previous` at the version to restore first"
        )
    writes = _Writes(model_name, "rollback")
    writes.tag(current, f"{TAG}rolled_back", "true")
    writes.alias(PREVIOUS, current)
    writes.alias(CHAMPION, previous)  # the switch serving sees, last
    return current, previous
