"""The validation report: validation.json (the summary), great_expectations.json (the suites' raw results) and
index.html (the summary for people), in validate.report_dir.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from visionflow.data.expectations import SuiteOutcome


def write_reports(report_dir: Path, summary: dict[str, Any], images: SuiteOutcome, classes: SuiteOutcome) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "validation.json").write_text(json.dumps(summary, indent=2, default=str))
    (report_dir / "great_expectations.json").write_text(
        json.dumps({"images": images.raw, "classes": classes.raw}, indent=1, default=str)
    )
    (report_dir / "index.html").write_text(_render_html(summary))
    return report_dir


def _render_html(summary: dict[str, Any]) -> str:
    def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    status = "PASSED" if summary["success"] else "FAILED"
    suites = "".join(
        f"<h3>{name}</h3>"
        + table(
            [dict(r, success="yes" if r["success"] else "NO") for r in rows],
            ["expectation", "column", "reason", "success", "unexpected_count", "element_count"],
        )
        for name, rows in summary["suites"].items()
    )
    classes = table([{"label": k, "count": v} for k, v in summary["class_counts"].items()], ["label", "count"])
    quarantined = table(summary["quarantined"][:500], ["path", "label", "quarantine_reason", "decode_detail"])
    problems = "".join(f"<li>{html.escape(p)}</li>" for p in summary["problems"]) or "<li>none</li>"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>visionflow validation</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}} .PASSED{{color:#070}} .FAILED{{color:#b00}}</style>
</head><body><h1>Data validation: <span class="{status}">{status}</span></h1>
<p>data version {html.escape(str(summary["data_version"]))}: {summary["n_images"]} images,
{summary["n_accepted"]} accepted, {summary["n_quarantined"]} quarantined
({summary["quarantined_fraction"]:.2%})</p><h2>Problems</h2><ul>{problems}</ul>
<h2>Expectation suites (great-expectations)</h2>{suites}<h2>Accepted images per class</h2>{classes}
<h2>Quarantined files (first 500)</h2>{quarantined}</body></html>"""
