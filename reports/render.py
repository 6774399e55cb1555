"""Turn the collected audit records into one results document and render it through jinja templates.

The results document is the stable interface between the run and every output format (and between merged CI
shards and the report), so rendering never reaches back into pytest state. Its schema is documented, field by
field, in `reports/results.schema.json` (JSON Schema); tests validate real documents against it and it allows
no undocumented field, so a new field is added there deliberately.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fixtures.settings import AuditConfig

SCHEMA = "moe-fbs-audit/results/v1"
SCHEMA_FILE = Path(__file__).resolve().parent / "results.schema.json"


def run_settings(audit_config: AuditConfig) -> dict[str, Any]:
    """What must agree between shards for their results to be merged into one report."""
    from benchmarks import judged_benchmarks
    from benchmarks.refusal import get_detector, judge_label

    judge = (judge_label(get_detector(audit_config.refusal_judge).describe())
             if judged_benchmarks(audit_config.benchmarks) else None)
    return {"model": audit_config.model, "benchmarks": list(audit_config.benchmarks), "limit": audit_config.limit,
            "data_dir": audit_config.data_dir or "hub", "eval_seed": audit_config.eval_seed,
            "thresholds": str(audit_config.thresholds), "refusal_judge": judge}


def build_document(records: Sequence[dict[str, Any]], settings: dict[str, Any], finished_at: str) -> dict[str, Any]:
    metrics: list[str] = []
    dense: dict[str, float] = {}
    rows: dict[str, dict[str, Any]] = {}
    records = sorted(records, key=lambda r: (r["checkpoint"].get("position", 0), r["checkpoint"]["id"]))
    for record in records:
        metric, checkpoint = record["metric"], record["checkpoint"]
        if metric not in metrics:
            metrics.append(metric)
        if "dense" in record:
            dense[metric] = record["dense"]
        row = rows.setdefault(checkpoint["id"], {**checkpoint, "cells": {}})
        row["cells"][metric] = {key: record.get(key) for key in
                                ("compressed", "delta", "worse_by", "allowed", "n_items", "verdict", "error")}
    for row in rows.values():
        verdicts = [cell["verdict"] for cell in row["cells"].values()]
        row["verdict"] = "error" if "error" in verdicts else "fail" if "fail" in verdicts else "pass"
    return {
        "schema": SCHEMA,
        "finished_at": finished_at,
        "model": settings["model"],
        "settings": settings,
        "metrics": metrics,
        "dense": dense,
        "checkpoints": list(rows.values()),
        "checks": [dict(record) for record in records],
    }


def render_markdown(document: dict[str, Any], template_dir: Path | None = None) -> str:
    """Kept here for callers of the original API; every format now lives in reports.formats."""
    from reports.formats import render_markdown as render

    return render(document, template_dir)
