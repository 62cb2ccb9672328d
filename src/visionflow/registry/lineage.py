"""Why a model version is where it is: the lineage tags that registration and promotion write on a version, read
back as one typed record (data version, code, params, runs, parent champion, gates, metrics, export checks)."""

from __future__ import annotations

from dataclasses import dataclass

from visionflow.registry.store import TAG, RegistryError, alias_version, version_info

GATE = f"{TAG}gate."
METRIC = f"{TAG}metric."


@dataclass(frozen=True)
class Lineage:
    model: str
    version: str
    aliases: list[str]
    mlflow_run_id: str
    data_version: str | None
    git_commit: str | None
    params_hash: str | None
    flow_run_id: str | None
    parent_champion: str | None  # None: the first champion, nothing before it
    promoted: str | None  # None: not judged by the promotion gates yet
    gates: dict[str, str]
    metrics: dict[str, float]
    onnx_sha256: str | None
    parity_max_abs_diff: str | None
    ort_latency_ms_b1: str | None
    derived_from: str | None = None  # a reduced-precision variant's fp32 parent, "MODEL/VERSION (PRECISION)"


def resolve_ref(ref: str) -> tuple[str, str]:
    """(model name, version) of MODEL@ALIAS or MODEL/VERSION; the alias is looked up in the registry."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = alias_version(name, alias)
        if version is None:
            raise RegistryError(f"{name} has no alias {alias!r}")
        return name, version
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        return name, version
    raise RegistryError("give MODEL@ALIAS or MODEL/VERSION")


def lineage(ref: str) -> Lineage:
    """The lineage of MODEL@ALIAS or MODEL/VERSION, from the registry MLflow points at."""
    name, version = resolve_ref(ref)
    info = version_info(name, version)
    t = info["tags"]
    return Lineage(
        model=name,
        version=version,
        aliases=info["aliases"],
        mlflow_run_id=info["run_id"],
        data_version=t.get(f"{TAG}data_version"),
        git_commit=t.get(f"{TAG}git_commit"),
        params_hash=t.get(f"{TAG}params_hash"),
        flow_run_id=t.get(f"{TAG}flow_run_id"),
        parent_champion=t.get(f"{TAG}parent_champion"),
        promoted=t.get(f"{TAG}promoted"),
        gates={k.removeprefix(GATE): v for k, v in t.items() if k.startswith(GATE)},
        metrics={k.removeprefix(METRIC): float(v) for k, v in t.items() if k.startswith(METRIC)},
        onnx_sha256=t.get(f"{TAG}onnx_sha256"),
        parity_max_abs_diff=t.get(f"{TAG}parity.max_abs_diff"),
        ort_latency_ms_b1=t.get(f"{TAG}latency.ort_ms_b1"),
        derived_from=(
            f"{t[f'{TAG}parent_model']}/{t.get(f'{TAG}parent_version')} ({t.get(f'{TAG}precision')})"
            if f"{TAG}parent_model" in t
            else None
        ),
    )
