"""What a report opens with: the verdict in a few lines, and one picture of the whole grid.

Why: the tables are 15+ columns wide; a reader first needs to know which checkpoints are blocked and by which
checks, then to see the pattern (which methods and mixes worsen which metrics). The picture is the grid of
checkpoint × gated metric, each cell coloured by the worsening in units of its tolerance (worse_by / allowed:
≤ 0 no worse, 1 at the tolerance, beyond it red), blocked cells marked ✕ and errors !. It is plain HTML (no
image library), so it renders wherever the report opens.
"""

from __future__ import annotations

from typing import Any

from reports.labels import in_group_order, metric_group, metric_label
from reports.tables import number

MARK = {"fail": "✕", "error": "!", "pass": ""}


def _units(check: dict[str, Any]) -> float | None:
    worse, allowed = number(check.get("worse_by")), number(check.get("allowed"))
    if worse is None or allowed is None:
        return None
    if allowed <= 0:
        return 0.0 if worse <= 0 else 3.0
    return worse / allowed


def colour(units: float | None) -> str:
    """Cell colour: grey unknown; green no worse; green → yellow up to the tolerance; yellow → red to 3×."""
    if units is None:
        return "#e0e0e0"
    if units <= 0:
        return "#d8f0dc"
    if units <= 1:
        return _mix((216, 240, 220), (255, 226, 128), units)
    return _mix((255, 226, 128), (207, 34, 46), min(units - 1, 2) / 2)


def _mix(low: tuple[int, int, int], high: tuple[int, int, int], share: float) -> str:
    red, green, blue = (round(a + (b - a) * share) for a, b in zip(low, high, strict=True))
    return f"#{red:02x}{green:02x}{blue:02x}"


def overview(document: dict[str, Any]) -> dict[str, Any]:
    """{headline, blocked: [(checkpoint, [labels])], unmeasured: [...], metrics: [(id, label)],
    groups: [(group name, column count)], rows: [...]}; columns in the paper's group order."""
    metrics = in_group_order(list(document.get("metrics", [])))
    checks: dict[str, dict[str, dict[str, Any]]] = {}
    for check in document.get("checks", []):
        checks.setdefault(check["checkpoint"]["id"], {})[check["metric"]] = check
    order = [c["id"] for c in document.get("checkpoints", []) if c.get("id") in checks]
    order += [name for name in checks if name not in order]
    blocked = [(name, [metric_label(m) for m in metrics if checks[name].get(m, {}).get("verdict") == "fail"])
               for name in order]
    unmeasured = [(name, [metric_label(m) for m in metrics if checks[name].get(m, {}).get("verdict") == "error"])
                  for name in order]
    blocked = [(name, labels) for name, labels in blocked if labels]
    unmeasured = [(name, labels) for name, labels in unmeasured if labels]
    headline = (f"{len(blocked)} of {len(order)} checkpoint(s) blocked" if blocked
                else f"all {len(order)} checkpoint(s) within tolerance")
    if unmeasured:
        headline += f"; {len(unmeasured)} with checks that could not be measured (errors)"
    rows = []
    for name in order:
        cells = []
        for metric in metrics:
            check = checks[name].get(metric)
            units = _units(check) if check else None
            verdict = check.get("verdict", "error") if check else None
            cells.append({"metric": metric, "verdict": verdict, "mark": MARK.get(verdict or "", ""),
                          "units": units, "colour": colour(units)})
        rows.append({"checkpoint": name, "cells": cells})
    groups: dict[str, int] = {}  # metrics are in group order, so each group's columns are adjacent
    for metric in metrics:
        groups[metric_group(metric)] = groups.get(metric_group(metric), 0) + 1
    return {"headline": headline, "blocked": blocked, "unmeasured": unmeasured,
            "metrics": [(m, metric_label(m)) for m in metrics], "groups": list(groups.items()), "rows": rows}
