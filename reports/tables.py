"""The view model every report format renders: the paper's tables and the item-flip rows.

Why one view model: Markdown, HTML, LaTeX and CSV must show the same numbers, grouping, bolding and verdicts,
so they all read the tables built here and differ only in their templates and escaping.

The paper's layout: Table 1 holds every checkpoint without a compression ratio (quantization, weight
sparsity) and the expert-compression checkpoints at the first ratio of the run (`--ratios` order: list the main
ratio first); Tables 2, 3, … hold the same for each further ratio. When a setting was calibrated with several
seeds, its row in those tables is the seed mean (the paper's number) and its per-seed rows go to an appendix
table. Each table bolds its own best compressed value per metric.
"""

from __future__ import annotations

import math
import re
from typing import Any

from reports.labels import metric_label

FAMILY_ORDER = ("quantization", "sparsity", "expert")
FLIP_ITEMS_SHOWN = 10
APPENDIX = "A"
_DIRECTION = re.compile(r"\((higher is better|lower is better|closer to ([-+]?\d+(?:\.\d+)?))")


def metric_direction(tolerance: Any) -> tuple[str, float | None] | None:
    """("higher"|"lower"|"target", target) parsed from a check's tolerance text; None when it says nothing.

    Why from the text: the document records the tolerance as thresholds.toml resolved it, which is the
    authority on what "better" means for that metric (overrides included), not a second list kept here.
    """
    match = _DIRECTION.search(str(tolerance or ""))
    if match is None:
        return None
    if match.group(2) is not None:
        return "target", float(match.group(2))
    return ("higher" if match.group(1).startswith("higher") else "lower"), None


def number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, NaN, a string from a foreign shard)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def family_of(method: str) -> str:
    """Compression family from the registry; an unknown method (a merged foreign shard) is still reported."""
    try:
        import compressors

        return str(compressors.get(method).family)
    except Exception:  # the report must render whatever the registry thinks of the name
        return "other"


def percent(value: float) -> str:
    return f"{value * 100:g}%"


def _setting(method: dict[str, Any]) -> str:
    parts = []
    if method.get("scheme"):
        parts.append(str(method["scheme"]).upper())
    ratio = number(method.get("ratio"))
    if ratio is not None:
        parts.append(percent(ratio))
    return " ".join(parts) or "–"


def _badness(direction: tuple[str, float | None] | None, value: float) -> float | None:
    """Smaller is better; None when the metric has no direction, so nothing is bolded for it."""
    if direction is None:
        return None
    kind, target = direction
    if kind == "higher":
        return -value
    if kind == "lower":
        return value
    return abs(value - (target or 0.0))


def _setting_key(checkpoint: dict[str, Any]) -> tuple[Any, ...]:
    """What the seeds of one setting share: method, scheme, ratio and safety fraction."""
    method = checkpoint.get("method") or {}
    return (method.get("method"), method.get("scheme"), method.get("ratio"), checkpoint.get("safety_fraction"))


def averaged_seeds(checkpoints: list[dict[str, Any]]) -> set[str]:
    """Ids of the per-seed checkpoints whose setting also has a seed mean: the tables (and the dose-response)
    show the mean; the seeds themselves go to the appendix."""
    averaged = {_setting_key(c) for c in checkpoints if c.get("kind") == "seed_mean"}
    return {c["id"] for c in checkpoints if c.get("kind") != "seed_mean" and _setting_key(c) in averaged}


def safety_text(value: Any) -> str:
    """The calibration mix as the ids spell it: "0%", "11.8%", "100%"; "–" for a data-free method."""
    fraction = number(value)
    return "–" if fraction is None else f"{round(fraction * 100, 3):g}%"


def _seed_label(checkpoint: dict[str, Any]) -> str:
    if checkpoint.get("kind") == "seed_mean":
        return "mean " + ",".join(str(s) for s in checkpoint.get("seeds") or [])
    return str(checkpoint.get("seed", "–"))


def _row(checkpoint: dict[str, Any], columns: list[dict[str, Any]], checks: dict[tuple[str, str], Any],
         method_rank: dict[str, int], ratio_rank: dict[float | None, int]) -> dict[str, Any]:
    method = checkpoint.get("method") or {}
    name = str(method.get("method", "?"))
    method_rank.setdefault(name, len(method_rank))
    ratio = number(method.get("ratio"))
    ratio_rank.setdefault(ratio, len(ratio_rank))  # ratios in grid order: the run's first ratio is the main one
    family = family_of(name)
    cells = {}
    for column in columns:
        check = checks.get((checkpoint["id"], column["metric"]))
        if check is None:
            continue
        ci = check.get("delta_ci")
        cells[column["metric"]] = {
            "value": number(check.get("compressed")), "delta": number(check.get("delta")),
            "ci": tuple(ci) if isinstance(ci, list | tuple) and len(ci) == 2 else None,
            "verdict": check.get("verdict", "error"), "error": check.get("error"), "best": False,
            "underpowered": bool(check.get("underpowered")) and check.get("verdict") == "pass",
        }
    return {
        "id": checkpoint["id"], "family": family, "method": name, "setting": _setting(method),
        "ratio": number(method.get("ratio")), "safety": number(checkpoint.get("safety_fraction")),
        "safety_text": safety_text(checkpoint.get("safety_fraction")),
        "seed": _seed_label(checkpoint), "kind": checkpoint.get("kind", "checkpoint"),
        "verdict": checkpoint.get("verdict", "error"), "cells": cells,
        "sort": (FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER), family,
                 method_rank[name], str(method.get("scheme") or ""), ratio_rank[ratio],
                 number(checkpoint.get("safety_fraction")) or 0.0,
                 checkpoint.get("kind") == "seed_mean", str(checkpoint.get("seed")), checkpoint["id"]),
    }


def _table(key: str, title: str, rows: list[dict[str, Any]], columns: list[dict[str, Any]],
           dense: dict[str, float | None]) -> dict[str, Any]:
    """Sort, bold the best compressed value(s) per metric among these rows (errors never win), and group
    family -> method for the templates' first-in-group blanking."""
    rows = sorted(rows, key=lambda row: row["sort"])
    for column in columns:
        scored = [(_badness(column["direction"], cell["value"]), cell) for row in rows
                  if (cell := row["cells"].get(column["metric"])) and cell["verdict"] != "error"
                  and cell["value"] is not None]
        scores = [score for score, _ in scored if score is not None]
        for score, cell in scored:
            cell["best"] = score is not None and math.isclose(score, min(scores), abs_tol=1e-12)
    groups: list[dict[str, Any]] = []
    previous_method = None
    for row in rows:
        if not groups or groups[-1]["family"] != row["family"]:
            groups.append({"family": row["family"], "rows": []})
            previous_method = None
        row["first_in_family"] = not groups[-1]["rows"]
        row["first_in_method"] = row["method"] != previous_method
        previous_method = row["method"]
        groups[-1]["rows"].append(row)
    return {"key": key, "title": title, "columns": columns, "dense": dense, "groups": groups,
            "appendix": key == APPENDIX}


def report_tables(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Table 1, one table per further compression ratio, then the per-seed appendix when there is one.

    Cells come from the checks (not the checkpoint rows) because only checks carry the confidence interval.
    Fresh row dicts per call: bolding is per table, so no state leaks between calls.
    """
    checks = {(c["checkpoint"]["id"], c["metric"]): c for c in document.get("checks", [])}
    columns = []
    for metric in document.get("metrics", []):
        tolerance = next((c.get("tolerance") for (_, m), c in checks.items() if m == metric), None)
        judged = any(c.get("refusal_judge") for (_, m), c in checks.items() if m == metric)
        columns.append({"metric": metric, "label": metric_label(metric), "direction": metric_direction(tolerance),
                        "judged": judged})
    dense = {column["metric"]: number(document.get("dense", {}).get(column["metric"])) for column in columns}
    checkpoints = document.get("checkpoints", [])
    in_appendix = averaged_seeds(checkpoints)
    method_rank: dict[str, int] = {}
    ratio_rank: dict[float | None, int] = {}
    main: list[dict[str, Any]] = []
    per_seed: list[dict[str, Any]] = []
    for checkpoint in checkpoints:
        row = _row(checkpoint, columns, checks, method_rank, ratio_rank)
        (per_seed if checkpoint["id"] in in_appendix else main).append(row)
    ratios = list(dict.fromkeys(row["ratio"] for row in main if row["ratio"] is not None))
    tables = []
    for index, ratio in enumerate(ratios or [None]):
        rows = [row for row in main if row["ratio"] == ratio or (index == 0 and row["ratio"] is None)]
        at = f"expert-compression ratio {percent(ratio)}" if ratio is not None else ""
        title = (f"compressed checkpoints vs the dense baseline{f' ({at})' if at else ''}" if index == 0
                 else f"the same at {at}")
        if any(row["kind"] == "seed_mean" for row in rows):
            title += f"; a setting calibrated with several seeds shows their mean (each seed: Table {APPENDIX})"
        tables.append(_table(str(index + 1), title, rows, columns, dense))
    if per_seed:
        tables.append(_table(APPENDIX, "every calibration seed of the settings averaged above", per_seed,
                             columns, dense))
    return tables


def table_of(document: dict[str, Any]) -> dict[str, str]:
    """{checkpoint id: table key} ("1", "2", …, "A"): where each check's row appears, for the CSV."""
    return {row["id"]: table["key"] for table in report_tables(document) for group in table["groups"]
            for row in group["rows"]}


def table_model(document: dict[str, Any]) -> dict[str, Any]:
    """Table 1 alone (the main ratio, seed means), for callers that want the paper's first table."""
    return report_tables(document)[0]


def flip_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per flip metric per checkpoint: how many paired items changed, and which (first few)."""
    rows = []
    for check in document.get("checks", []):
        if ".flip_" not in check.get("metric", ""):
            continue
        items = [item for item in check.get("changed_items") or [] if isinstance(item, dict)]
        rows.append({
            "checkpoint": check["checkpoint"]["id"], "metric": check["metric"],
            "changed": check.get("changed_count"), "n_items": check.get("n_items"),
            "rate": number(check.get("compressed")), "verdict": check.get("verdict", "error"),
            "flipped": [{"id": str(item.get("item_id", "?")), "dense": str(item.get("dense", "")),
                         "compressed": str(item.get("compressed", ""))} for item in items[:FLIP_ITEMS_SHOWN]],
            "more": max(0, len(items) - FLIP_ITEMS_SHOWN),
        })
    return rows
