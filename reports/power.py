"""The report's "what a pass is worth" table: per gated metric, the smallest worsening its checks would block.

Why per metric and not per cell: the detectable worsening depends on the item count and the per-item variance,
which are nearly the same for every checkpoint of a metric; one row per metric (its worst checkpoint) says
which metrics a run at this `--limit` can vouch for, and how many items the others need. Every check's own
numbers stay in results.json and checks.csv.
"""

from __future__ import annotations

from typing import Any

from reports.labels import in_group_order, metric_label
from reports.tables import number


def power_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """[{metric, label, checks, n_items, allowed, detectable, power, underpowered, items_needed}] over the
    metric's *passing* checks (a blocked check detected its worsening; its large spread would only hide what
    the passes are worth): the detectable worsening and items needed as the largest, the power as the
    smallest."""
    by_metric: dict[str, list[dict[str, Any]]] = {}
    for check in document.get("checks", []):
        if check.get("verdict") == "pass" and number(check.get("detectable")) is not None:
            by_metric.setdefault(check["metric"], []).append(check)
    rows = []
    for metric in in_group_order(list(by_metric)):
        checks = by_metric[metric]
        needed = [n for c in checks if c.get("underpowered") and (n := c.get("items_needed")) is not None]
        rows.append({
            "metric": metric, "label": metric_label(metric), "checks": len(checks),
            "n_items": min(int(c["n_items"]) for c in checks),
            "allowed": min(float(c["allowed"]) for c in checks),
            "detectable": max(float(c["detectable"]) for c in checks),
            "power": min(float(c["power"]) for c in checks),
            "underpowered": sum(bool(c.get("underpowered")) for c in checks),
            "items_needed": max(needed) if needed else None,
        })
    return rows


def detection_power(document: dict[str, Any]) -> float | None:
    """The block probability the run's power analysis is stated at (recorded with every check)."""
    return next((float(c["detection_power"]) for c in document.get("checks", []) if c.get("detection_power")), None)


def underpowered_passes(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Passing checks flagged underpowered: a pass by the rule that says little."""
    return [c for c in document.get("checks", []) if c.get("verdict") == "pass" and c.get("underpowered")]
