"""What every benchmark shares: the run context, interleaved A/B timing, result rows and their goals, the JSON file."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


@dataclass
class Context:
    """Settings of this run plus a place for benchmarks to leave figures for later ones."""

    quick: bool
    repeats: int
    workdir: Path
    compile: bool = False
    peak_tflops: float = 989.0
    console: Any = None
    dvc_files: tuple[int, ...] | None = None  # dvc benchmark sizes; None: its default for the mode
    shard_images: tuple[int, ...] | None = None  # shards benchmark sizes; None: its default for the mode
    loose_max: int | None = None  # shards benchmark: the largest size the loose layout runs at; None: its default
    out: Path | None = None  # the JSON results file; a benchmark's side files (a plot) go beside it
    shared: dict[str, Any] = field(default_factory=dict)

    def log(self, msg: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        if self.console is not None:
            self.console.print(f"[dim]{stamp}[/dim] {msg}", highlight=False)
        else:
            print(f"{stamp} {msg}", file=sys.stderr, flush=True)

    def tmp(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def params(self, overrides: list[str] | None = None):
        from visionflow.config import load_params

        p = load_params(PARAMS, overrides)
        if p.train.channels == "auto":
            # The benchmarks build caches and networks directly, without training's decision; their data is
            # Fashion-MNIST, which "auto" trains as grey.
            p = load_params(PARAMS, [*(overrides or []), "train.channels=1"])
        return p


@dataclass
class Measurement:
    """One timed run: the headline value plus any side figures (summarised per repeat like the value)."""

    value: float
    extra: dict[str, float] = field(default_factory=dict)


class Skip(Exception):  # a signal, not an error
    """Raised by a benchmark variant that cannot run here (no GPU, no dataset): becomes a note, not a failure."""


def summary(values: list[float]) -> dict[str, Any]:
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "values": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}


def goal(text: str, op: str, target: float, on: str = "ratio") -> dict[str, Any]:
    """A goal on the median of `on` ("ratio", "a", "b" or "extra.<key>"); evaluated after the run."""
    return {"text": text, "op": op, "target": target, "on": on, "met": None}


def _goal_value(row: dict[str, Any], on: str) -> float | None:
    if on == "value":
        return row.get("value")
    if on.startswith("extra."):
        entry = row.get("extra", {}).get(on.removeprefix("extra."))
        return entry.get("median") if isinstance(entry, dict) else entry
    part = row.get(on)
    return part.get("median") if isinstance(part, dict) else None


def judge(row: dict[str, Any]) -> dict[str, Any]:
    g = row.get("goal")
    if g:
        v = _goal_value(row, g["on"])
        g["met"] = None if v is None else (v >= g["target"] if g["op"] == ">=" else v <= g["target"])
    return row


def _as_measurement(x: float | Measurement) -> Measurement:
    return x if isinstance(x, Measurement) else Measurement(float(x))


def compare(
    ctx: Context,
    variant: str,
    run_a: Callable[[], float | Measurement],
    run_b: Callable[[], float | Measurement],
    *,
    repeats: int | None = None,
    **row: Any,
) -> dict[str, Any]:
    """Run A then B, `repeats` times (A, B, A, B, ...); the ratio is taken per pair, then summarised.
    Keyword arguments are paired_row's."""
    n = repeats or ctx.repeats
    a_runs: list[Measurement] = []
    b_runs: list[Measurement] = []
    for r in range(n):
        a = _as_measurement(run_a())
        b = _as_measurement(run_b())
        a_runs.append(a)
        b_runs.append(b)
        ctx.log(
            f"  {variant}: repeat {r + 1}/{n}  A {a.value:.4g}  B {b.value:.4g} {row.get('unit', '')}"
            f"  ratio {a.value / b.value if b.value else float('nan'):.3f}"
        )
    return paired_row(variant, a_runs, b_runs, **row)


def paired_row(
    variant: str,
    a_runs: list[Measurement],
    b_runs: list[Measurement],
    *,
    unit: str,
    a_label: str,
    b_label: str,
    higher_is_better: bool,
    ratio_definition: str = "A / B",
    the_goal: dict[str, Any] | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """The result row of interleaved pairs (a_runs[i], b_runs[i])."""
    ratios = [a.value / b.value if b.value else float("nan") for a, b in zip(a_runs, b_runs)]
    extra: dict[str, Any] = {}
    for prefix, runs in (("a_", a_runs), ("b_", b_runs)):
        keys = sorted({k for m in runs for k in m.extra})
        for k in keys:
            extra[prefix + k] = summary([m.extra[k] for m in runs if k in m.extra])
    row = {
        "variant": variant,
        "kind": "paired",
        "unit": unit,
        "higher_is_better": higher_is_better,
        "a": {"label": a_label, **summary([m.value for m in a_runs])},
        "b": {"label": b_label, **summary([m.value for m in b_runs])},
        "ratio": {"definition": ratio_definition, **summary(ratios)},
        "repeats": len(a_runs),
        "extra": extra,
        "goal": the_goal,
        "notes": list(notes or []),
    }
    return judge(row)


def single(
    variant: str,
    value: float | None,
    *,
    unit: str,
    label: str,
    the_goal: dict[str, Any] | None = None,
    notes: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A figure that is not an A/B pair (read from a report, or derived from other rows)."""
    row = {
        "variant": variant,
        "kind": "single",
        "unit": unit,
        "label": label,
        "value": value,
        "extra": dict(extra or {}),
        "goal": the_goal,
        "notes": list(notes or []),
    }
    return judge(row)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def scratch_project(ctx: Context, name: str, settings: dict[str, Any]) -> tuple[Path, Any]:
    """A throwaway project folder under the work folder: the repo's params.yaml with a SQLite MLflow store inside
    the folder and `settings` ({"section.key": value}) applied, written there (a server started in the folder reads
    it) and loaded."""
    import yaml

    from visionflow.config import load_params

    proj = ctx.tmp(name)
    raw = yaml.safe_load(PARAMS.read_text())
    raw["registry"]["tracking_uri"] = f"sqlite:///{proj / 'mlflow.db'}"
    for key, value in settings.items():
        section, option = key.split(".")
        raw[section][option] = value
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return proj, load_params(proj / "params.yaml")
