"""Great-expectations, run on a dataframe: the runner behind validate's image and class suites and split's suite.

Each expectation carries the reason given to the rows that fail it, so a suite's result says which rows fail and
why (validate quarantines them; split reports them). The stages define their own expectations; the context is
ephemeral and in memory, so nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd


@dataclass(frozen=True)
class Check:
    """One expectation plus the quarantine reason given to each row that fails it."""

    expectation: Any
    reason: str


@dataclass
class SuiteOutcome:
    name: str
    success: bool
    results: list[dict[str, Any]]
    failing: dict[str, list[str]]  # reason -> paths (or keys) of the failing rows
    raw: dict[str, Any]


def _gx_context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # analytics off in the context's own config: the GX_ANALYTICS_ENABLED variable is the entry point's to set
    config = DataContextConfig(analytics_enabled=False, store_backend_defaults=InMemoryStoreBackendDefaults())
    ctx = gx.get_context(mode="ephemeral", project_config=config)
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return gx, ctx


def run_suite(name: str, df: pd.DataFrame, key: str, checks: Callable[[Any], list[Check]]) -> SuiteOutcome:
    """Run a great-expectations suite on a dataframe; `key` names the column that identifies failing rows."""
    gx, ctx = _gx_context()
    df = df.reset_index(drop=True)  # failing rows are reported by index; it must be unique
    asset = ctx.data_sources.add_pandas(name).add_dataframe_asset(f"{name}_frame")
    batch = asset.add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"{name}_suite"))
    reasons: dict[str, str] = {}
    for check in checks(gx.expectations):
        exp = suite.add_expectation(check.expectation)
        reasons[exp.id] = check.reason
    definition = ctx.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite, name=name))
    res = definition.run(
        batch_parameters={"dataframe": df},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [key]},
    )
    failing: dict[str, list[str]] = {}
    summary = []
    for r in res.results:
        cfg = r.expectation_config
        reason = reasons.get(cfg.id, cfg.type)
        bad = [str(item[key]) for item in (r.result.get("unexpected_index_list") or [])]
        if not r.success and not bad and r.result.get("observed_value") is not None:
            bad = ["<dataset>"]
        if bad:
            failing.setdefault(reason, []).extend(bad)
        summary.append(
            {
                "expectation": cfg.type,
                "column": cfg.kwargs.get("column"),
                "reason": reason,
                "success": r.success,
                "unexpected_count": r.result.get("unexpected_count"),
                "element_count": r.result.get("element_count"),
                "kwargs": {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "column")},
            }
        )
    return SuiteOutcome(name, bool(res.success), summary, failing, res.to_json_dict())
