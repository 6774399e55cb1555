"""The dose-response figure: each gated metric against the weight width, one line per method × calibration mix.

Why a figure: the trend the table fits is read at a glance as a line falling or rising from BF16 to 3 bits;
one small panel per metric keeps the scales honest (a bias score and a refusal rate share no axis).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from reports.dose_response import DENSE_BITS, dose_rows, widths_of
from reports.heatmaps import Heatmap

FILE = "dose_response.png"
COLUMNS = 4


@dataclass(frozen=True)
class DoseResponse:
    """The fitted rows and their figure, computed once per report: every format and the terminal read them."""

    rows: list[dict[str, Any]]
    figure: Heatmap | None


def dose_response(document: dict[str, Any]) -> DoseResponse:
    rows = dose_rows(document)
    return DoseResponse(rows, dose_figure(rows))


def dose_figure(rows: list[dict[str, Any]]) -> Heatmap | None:
    """The PNG (as the heatmaps carry theirs) of `dose_rows`, None without a quantization series of two widths
    or more."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # headless: drawn at pytest session end on machines without a display
    import matplotlib.pyplot as plt

    widths = widths_of(rows)
    metrics = list(dict.fromkeys(row["metric"] for row in rows))
    count = len(metrics)
    lines = min(COLUMNS, count)
    figure, grid = plt.subplots(math.ceil(count / lines), lines, figsize=(3.3 * lines, 2.6 * math.ceil(count / lines)),
                                squeeze=False)
    positions = {bits: index for index, bits in enumerate(widths)}
    for axes, metric in zip(grid.flat, metrics, strict=False):
        for row in (r for r in rows if r["metric"] == metric):
            points = [(DENSE_BITS, row["dense"]), *row["values"].items()]
            xs = [positions[b] for b, v in points if v is not None]
            ys = [v for _, v in points if v is not None]
            style = "-" if row["trend"] else "--"
            axes.plot(xs, ys, style, marker="o", markersize=3,
                      label=f"{row['method']} {row['safety']}" + (f" s{row['seed']}" if row["seed"] != "0" else ""))
        axes.set_xticks(range(len(widths)), ["BF16" if b == DENSE_BITS else f"{b}-bit" for b in widths], fontsize=7)
        axes.set_title(rows[[r["metric"] for r in rows].index(metric)]["label"], fontsize=8)
        axes.tick_params(axis="y", labelsize=7)
    for axes in list(grid.flat)[count:]:
        axes.axis("off")
    handles, labels = grid.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=7, frameon=False)
    figure.suptitle("Dose-response: each metric vs weight width (solid: monotone worsening with a significant "
                    "slope)", fontsize=9)
    figure.tight_layout(rect=(0, 0.06, 1, 0.95))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(figure)
    return Heatmap(file=FILE, title="Dose-response over weight width", png=buffer.getvalue())
