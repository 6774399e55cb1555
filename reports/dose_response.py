"""Dose-response over bit width: how each gated metric and flip rate moves as quantization goes BF16 → 8 → 4
→ 3 bits, per method and calibration mix, with a fitted trend.

Why: the seed study's finding is that bias emerges as compression deepens; each width can pass its tolerance
while the trend across widths is clear. A monotone worsening with a significant slope is named in the summary
even when every width passes.

The fits, both per series (method × calibration mix × seed or seed mean) with at least two compressed widths:
- a flip rate (items that turned biased / lost a refusal): a binomial GLM (logistic regression) of the per-item
  flips on the bit width — flips per width are binomial counts over the same eligible items, the sufficient
  statistic of the per-item regression — with its 95% Wald interval (statsmodels). The slope is reported per
  bit removed (log-odds), so a positive slope is more flips at fewer bits.
- any other gated metric: ordinary least squares of the worsening vs dense on the bits removed, the dense model
  included as 0 at 16 bits, with the slope's 95% t interval (scipy's linregress; few points, wide intervals).
Pairing across widths (the same items at every width) is not modelled: the intervals treat widths as
independent samples, which is what a reader of the table can check against the per-width intervals.
"""

from __future__ import annotations

import math
import re
import warnings
from itertools import pairwise
from typing import Any

from reports.labels import in_group_order, metric_label
from reports.tables import averaged_seeds, family_of, number, safety_text

DENSE_BITS = 16
_SCHEME_BITS = re.compile(r"^w(\d+)a\d+$")
LEVEL = 0.95


def weight_bits(method: dict[str, Any]) -> int | None:
    """The weight width of a quantization checkpoint (`w3a16` → 3), None for anything else."""
    if family_of(str(method.get("method"))) != "quantization":
        return None
    match = _SCHEME_BITS.match(str(method.get("scheme") or ""))
    return int(match.group(1)) if match else None


def _series(document: dict[str, Any]) -> dict[tuple[str, str, str], dict[int, str]]:
    """{(method, safety text, seed label): {bits: checkpoint id}}: seed means replace their seeds."""
    checkpoints = document.get("checkpoints", [])
    skipped = averaged_seeds(checkpoints)
    series: dict[tuple[str, str, str], dict[int, str]] = {}
    for checkpoint in checkpoints:
        method = checkpoint.get("method") or {}
        bits = weight_bits(method)
        if bits is None or checkpoint["id"] in skipped:
            continue
        safety = safety_text(checkpoint.get("safety_fraction"))
        seed = "mean" if checkpoint.get("kind") == "seed_mean" else str(checkpoint.get("seed", "–"))
        series.setdefault((str(method.get("method")), safety, seed), {})[bits] = checkpoint["id"]
    return {key: widths for key, widths in series.items() if len(widths) >= 2}


def _logistic_slope(points: list[tuple[int, float, int]]) -> tuple[float, float, float] | None:
    """(slope per bit removed, low, high) of a binomial GLM of flip rates (n items each) on bits; None when
    the rates carry no trend to fit (no flip, or every eligible item flipped, at every width)."""
    if all(rate <= 0 for _, rate, _ in points) or all(rate >= 1 for _, rate, _ in points):
        return None
    import numpy as np
    import statsmodels.api as sm

    bits = np.array([float(b) for b, _, _ in points])
    rates = np.array([rate for _, rate, _ in points])
    weights = np.array([float(n) for _, _, n in points])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # perfect separation and convergence notes: judged by the result
        try:
            fit = sm.GLM(rates, sm.add_constant(bits), family=sm.families.Binomial(), var_weights=weights).fit()
        except Exception:  # a degenerate design (statsmodels raises on perfect separation): no trend to fit
            return None
        low, high = fit.conf_int(alpha=1 - LEVEL)[1]
    slope = float(fit.params[1])
    if not all(math.isfinite(v) for v in (slope, low, high)):
        return None
    return -slope, -float(high), -float(low)


def _linear_slope(points: list[tuple[int, float]]) -> tuple[float, float, float] | None:
    """(slope per bit removed, low, high) of the worsening on bits removed, with its t interval."""
    from scipy.stats import linregress, t

    if len(points) < 3:
        return None  # two points fit exactly: no interval
    removed = [float(DENSE_BITS - b) for b, _ in points]
    worse = [w for _, w in points]
    if len(set(worse)) == 1:
        return 0.0, 0.0, 0.0
    fit = linregress(removed, worse)
    margin = float(t.ppf(0.5 + LEVEL / 2, len(points) - 2)) * float(fit.stderr)
    return float(fit.slope), float(fit.slope) - margin, float(fit.slope) + margin


def dose_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per series × gated metric: value and worsening per width, the fitted slope, monotone or not,
    and `trend` (a monotone worsening whose slope interval lies above 0)."""
    checks = {(c["checkpoint"]["id"], c["metric"]): c for c in document.get("checks", [])}
    metrics = in_group_order(list(document.get("metrics", [])))
    rows = []
    for (method, safety, seed), widths in sorted(_series(document).items()):
        for metric in metrics:
            found = [(bits, checks.get((checkpoint, metric))) for bits, checkpoint in widths.items()]
            cells = {bits: check for bits, check in found if check is not None
                     and number(check.get("worse_by")) is not None}
            if len(cells) < len(found):
                continue  # a width without a measured value: no trend to draw through it
            ordered = sorted(cells, reverse=True)  # 8, 4, 3: compression deepening
            worse = [float(cells[b]["worse_by"]) for b in ordered]
            flip = ".flip_" in metric
            if flip:
                slope = _logistic_slope([(b, float(cells[b]["compressed"]), int(cells[b]["n_items"]))
                                         for b in ordered])
                path = worse
            else:
                slope = _linear_slope([(DENSE_BITS, 0.0), *zip(ordered, worse, strict=True)])
                path = [0.0, *worse]
            monotone = all(b >= a for a, b in pairwise(path)) and path[-1] > path[0]
            rows.append({
                "method": method, "safety": safety, "seed": seed, "metric": metric, "label": metric_label(metric),
                "dense": number(document.get("dense", {}).get(metric)),
                "values": {b: number(cells[b]["compressed"]) for b in ordered},
                "worse": dict(zip(ordered, worse, strict=True)),
                "verdicts": {b: cells[b]["verdict"] for b in ordered},
                "slope": slope, "kind": "logistic" if flip else "linear", "monotone": monotone,
                "trend": bool(monotone and slope is not None and slope[1] > 0),
            })
    return rows


def widths_of(rows: list[dict[str, Any]]) -> list[int]:
    """Every width present, dense first, then compression deepening: the table's columns."""
    return [DENSE_BITS, *sorted({b for row in rows for b in row["values"]}, reverse=True)]
