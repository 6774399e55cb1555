"""Heatmaps of generation drift (mean Δ cross-NLL / Δ entropy vs dense) for the HTML and Markdown reports.

Why heatmaps: the drift finding ("stable benchmarks hide drift") is a pattern across checkpoints and prompt
sources that a table of numbers hides. Like the paper's Figures 1–8, each gated drift check's per-dataset
values (`by_dataset` in the results, one per drift prompt source) give checkpoint × dataset maps: Δ cross-NLL
and Δ entropy at each temperature, and the change from T=0 to each other temperature; an "all" column holds
the overall (gated) value. Rows are the rows of the report's main tables (seed means where there are
several seeds). A document without per-dataset values (an older run) still gets checkpoint × temperature maps.
matplotlib is optional (not a dependency of the audit): without it, or without drift checks, no heatmap.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from typing import Any

from reports.tables import number, report_tables

_DRIFT = re.compile(r"^drift\.delta_(cross_nll|entropy)_t(\d+(?:\.\d+)?)$")
_TITLES = {"cross_nll": "mean Δ cross-NLL (nats/token)", "entropy": "mean Δ top-20 entropy (nats)"}
ALL = "all"
Grid = tuple[str, str, list[str], list[str], list[list[float]]]  # file, title, rows, columns, values


@dataclass(frozen=True)
class Heatmap:
    """One rendered image: `file` is its name next to the report, `png` its bytes."""

    file: str
    title: str
    png: bytes


def drift_values(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, dict[str, float]]]:
    """{(quantity, temperature): {checkpoint id: {dataset or "all": compressed value}}} from the drift checks."""
    values: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for check in document.get("checks", []):
        match = _DRIFT.match(str(check.get("metric", "")))
        if match is None:
            continue
        cells: dict[str, float] = {}
        for dataset, entry in (check.get("by_dataset") or {}).items():
            value = number(entry.get("compressed")) if isinstance(entry, dict) else None
            if value is not None:
                cells[str(dataset)] = value
        overall = number(check.get("compressed"))
        if overall is not None:
            cells[ALL] = overall
        if cells:
            values.setdefault((match.group(1), match.group(2)), {})[check["checkpoint"]["id"]] = cells
    return values


def heatmap_grids(document: dict[str, Any]) -> list[Grid]:
    """Every heatmap to draw, with NaN gaps for missing cells."""
    values = drift_values(document)
    order = [row["id"] for table in report_tables(document) if not table["appendix"]
             for group in table["groups"] for row in group["rows"]]
    grids: list[Grid] = []
    for quantity in ("cross_nll", "entropy"):
        temperatures = sorted({t for q, t in values if q == quantity}, key=float)
        maps = {t: values[(quantity, t)] for t in temperatures}
        rows = [c for c in order if any(c in maps[t] for t in temperatures)]
        if not rows:
            continue
        datasets = sorted({d for t in temperatures for cells in maps[t].values() for d in cells if d != ALL})
        if not datasets:  # no per-dataset values: one checkpoint x temperature map
            grids.append((f"heatmap_delta_{quantity}.png", f"{_TITLES[quantity]} by temperature", rows,
                          [f"T={t}" for t in temperatures],
                          [[maps[t].get(c, {}).get(ALL, math.nan) for t in temperatures] for c in rows]))
            continue
        columns = [*datasets, ALL]
        per_t = {t: [[maps[t].get(c, {}).get(d, math.nan) for d in columns] for c in rows] for t in temperatures}
        for t in temperatures:
            grids.append((f"heatmap_delta_{quantity}_t{t}.png", f"{_TITLES[quantity]} by dataset, T={t}", rows,
                          columns, per_t[t]))
        if "0" in per_t:
            for t in temperatures:
                if t != "0":
                    change = [[a - b for a, b in zip(hot, cold, strict=True)]
                              for hot, cold in zip(per_t[t], per_t["0"], strict=True)]
                    grids.append((f"heatmap_delta_{quantity}_t{t}_minus_t0.png",
                                  f"{_TITLES[quantity]}: change T={t} − T=0", rows, columns, change))
    return grids


def drift_heatmaps(document: dict[str, Any]) -> list[Heatmap]:
    """Render the heatmaps as PNG bytes; an empty list when there is nothing to draw or no matplotlib."""
    grids = heatmap_grids(document)
    if not grids:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless: runs at pytest session end on CI machines without a display
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    heatmaps = []
    for file, title, rows, columns, grid in grids:
        finite = [abs(v) for line in grid for v in line if not math.isnan(v)]
        bound = max(finite, default=1.0) or 1.0  # symmetric scale: 0 (no drift) is always the neutral colour
        figure, axes = plt.subplots(figsize=(max(5.5, 3.5 + 1.1 * len(columns)), 1.4 + 0.45 * len(rows)))
        image = axes.imshow(grid, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
        axes.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
        axes.set_yticks(range(len(rows)), rows)
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                if not math.isnan(value):
                    axes.text(j, i, f"{value:+.3f}", ha="center", va="center", fontsize=8,
                              color="white" if abs(value) > 0.6 * bound else "black")
        axes.set_title(title, fontsize=9)
        figure.colorbar(image, ax=axes)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
        plt.close(figure)
        heatmaps.append(Heatmap(file=file, title=title, png=buffer.getvalue()))
    return heatmaps
