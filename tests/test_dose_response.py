"""Dose-response over bit width (reports.dose_response, reports.dose_figure): series, fits on known answers,
the named trends in the reports and the terminal."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from reports.dose_figure import dose_figure
from reports.dose_response import dose_rows, weight_bits
from reports.formats import render_html, render_latex, render_markdown, write_reports
from reports.plugin import trend_lines

FLIP = "bbq.flip_bias_emergence"
SHARE = "advbench.refusal_rate"


def _document(flip_rates: dict[int, float], worse: dict[int, float], n_items: int = 200) -> dict[str, Any]:
    """gptq at the given widths, one calibration mix; worse_by of the share metric per width as given."""
    checkpoints, checks = [], []
    for bits in flip_rates:
        checkpoint = {"id": f"gptq-w{bits}a16-safety0-seed0", "kind": "checkpoint", "seed": 0,
                      "safety_fraction": 0.0, "method": {"method": "gptq", "scheme": f"w{bits}a16", "ratio": None}}
        checkpoints.append(checkpoint)
        checks.append({"checkpoint": checkpoint, "metric": FLIP, "compressed": flip_rates[bits], "dense": 0.0,
                       "worse_by": flip_rates[bits], "n_items": n_items, "verdict": "pass"})
        checks.append({"checkpoint": checkpoint, "metric": SHARE, "compressed": 0.9 - worse[bits], "dense": 0.9,
                       "worse_by": worse[bits], "n_items": n_items, "verdict": "pass"})
    return {"metrics": [SHARE, FLIP], "dense": {SHARE: 0.9, FLIP: 0.0}, "checkpoints": checkpoints,
            "checks": checks, "settings": {"benchmarks": ["bbq", "advbench"], "limit": n_items},
            "model": "m", "finished_at": "now"}


def _row(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    return next(row for row in rows if row["metric"] == metric)


def test_weight_bits_are_read_from_quantization_schemes_only() -> None:
    assert weight_bits({"method": "gptq", "scheme": "w3a16"}) == 3
    assert weight_bits({"method": "fp8", "scheme": "w8a8"}) == 8
    assert weight_bits({"method": "wanda", "scheme": "s50"}) is None
    assert weight_bits({"method": "reap", "ratio": 0.5}) is None


def test_two_widths_give_the_exact_logistic_slope() -> None:
    """Two points fit exactly: (logit 0.3 − logit 0.1) / 4 bits removed = 0.3374 log-odds per bit."""
    rows = dose_rows(_document({8: 0.1, 4: 0.3}, {8: 0.0, 4: 0.0}))
    slope, low, high = _row(rows, FLIP)["slope"]
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert slope == pytest.approx((logit(0.3) - logit(0.1)) / 4, abs=1e-6)
    assert low < slope < high and _row(rows, FLIP)["monotone"]


def test_a_steady_worsening_is_a_trend_and_a_noisy_one_is_not() -> None:
    """Worsening 0 (BF16), 0.04, 0.06, 0.065 at 16, 8, 4, 3 bits lies on a line of 0.005 per bit removed."""
    rows = dose_rows(_document({8: 0.02, 4: 0.08, 3: 0.2}, {8: 0.04, 4: 0.06, 3: 0.065}))
    share, flip = _row(rows, SHARE), _row(rows, FLIP)
    assert share["slope"][0] == pytest.approx(0.005, abs=1e-9) and share["trend"]
    assert flip["trend"] and flip["slope"][1] > 0 and flip["kind"] == "logistic"
    noisy = dose_rows(_document({8: 0.05, 4: 0.01, 3: 0.06}, {8: 0.05, 4: -0.01, 3: 0.04}))
    assert not _row(noisy, SHARE)["trend"] and not _row(noisy, FLIP)["monotone"]
    flat = dose_rows(_document({8: 0.0, 4: 0.0, 3: 0.0}, {8: 0.0, 4: 0.0, 3: 0.0}))
    assert _row(flat, FLIP)["slope"] is None and not _row(flat, FLIP)["trend"]  # no flips: nothing to fit
    assert dose_rows(_document({4: 0.1}, {4: 0.0})) == []  # one width: no series


def test_trends_are_named_in_every_report_and_the_terminal(tmp_path: Path) -> None:
    document = _document({8: 0.02, 4: 0.08, 3: 0.2}, {8: 0.04, 4: 0.06, 3: 0.065})
    for text in (render_markdown(document), render_html(document), render_latex(document)):
        assert "2 monotone worsening trend(s) with a significant slope" in text
    lines = trend_lines(dose_rows(document))
    assert lines[0].startswith("dose-response: 2 monotone worsening trend(s)")
    assert any(line.startswith(f"  gptq safety 0% {FLIP}: +") and "3-bit 0.200" in line for line in lines)
    figure = dose_figure(dose_rows(document))
    assert figure is not None and figure.png.startswith(b"\x89PNG")
    written = write_reports(document, tmp_path)
    assert tmp_path / "dose_response.png" in written
    assert "](dose_response.png)" in (tmp_path / "report.md").read_text()
