"""The paper-ready split of a report table: columns grouped under the paper's headings, few enough per panel
to be read at print size.

Why a split and not one wide table: Table 1 of a run with every benchmark has 14+ metrics; squeezed onto one
page it is unreadable (the LaTeX report once did that with `\\resizebox`). The paper puts the headline metrics
(Social Bias / Safety & Refusal / Capability) in one table and the diagnostics (item flips, generation drift)
in another, each cell a value with its delta, and the confidence intervals in a companion table. Every panel
holds the same rows, so a reader reads a checkpoint across panels by its row.
"""

from __future__ import annotations

from typing import Any

from reports.labels import FURTHER_GROUPS, HEADLINE_GROUPS, metric_group

MAX_PANEL_COLUMNS = 8  # metric columns a landscape page shows at \small with value and delta per cell
PANEL_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _grouped(columns: list[dict[str, Any]], names: tuple[str, ...]) -> list[dict[str, Any]]:
    groups = []
    for name in names:
        members = [column for column in columns if metric_group(column["metric"]) == name]
        if members:
            groups.append({"name": name, "columns": members})
    return groups


def _chunks(groups: list[dict[str, Any]], limit: int) -> list[list[dict[str, Any]]]:
    """Panels of at most `limit` columns, split at group boundaries where a group fits, inside it where not."""
    panels: list[list[dict[str, Any]]] = [[]]
    for group in groups:
        columns = group["columns"]
        while columns:
            room = limit - sum(len(g["columns"]) for g in panels[-1])
            if room < min(len(columns), limit):
                panels.append([])
                room = limit
            panels[-1].append({"name": group["name"], "columns": columns[:room]})
            columns = columns[room:]
    return [panel for panel in panels if panel]


def panels(table: dict[str, Any], limit: int = MAX_PANEL_COLUMNS) -> list[dict[str, Any]]:
    """[{letter, groups: [{name, columns, first, last}], columns, span}] for one report table: the headline
    groups first, then flips, drift and anything else. `first`/`last` are 1-based LaTeX column numbers of each
    group counted after `span` leading label columns (the templates' \\cmidrule needs them)."""
    label_columns = 5  # method, setting, safety, seed, gate
    result = []
    chunks = (_chunks(_grouped(table["columns"], HEADLINE_GROUPS), limit)
              + _chunks(_grouped(table["columns"], FURTHER_GROUPS), limit))
    for index, chunk in enumerate(chunks):
        position = label_columns
        for group in chunk:
            group["first"], group["last"] = position + 1, position + len(group["columns"])
            position = group["last"]
        result.append({"letter": PANEL_LETTERS[index] if len(chunks) > 1 else "", "groups": chunk,
                       "columns": [column for group in chunk for column in group["columns"]],
                       "span": position})
    return result
