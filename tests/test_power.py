"""The power analysis (fixtures.power): its formula on known answers, its properties, and the gate's own block
rate on synthetic paired data with a known shift."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.gate import GateError, blocks, bootstrap_intervals, require_power
from fixtures.power import DETECTION_POWER, block_probability, power_of
from fixtures.stats import Interval, resample_weights
from fixtures.thresholds import Tolerance
from reports.formats import render_html, render_latex, render_markdown
from reports.plugin import underpowered_lines
from reports.power import power_rows

GOLDEN = Path(__file__).resolve().parent / "golden"


def test_known_answer_for_a_share_with_no_observed_change() -> None:
    """sd 0, 100 items, allowed 0.05, ci 95%: the gate blocks an estimate t with t − 1.96·√(t(1−t)/100) > 0.05
    (t ≈ 0.112); a true worsening of 0.10 has σ = √(0.1·0.9/100) = 0.03, so it is blocked with
    Φ((0.10 − t)/0.03) ≈ 35%."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    threshold = brentq(lambda t: t - 1.96 * math.sqrt(t * (1 - t) / 100) - 0.05, 0.05, 0.5)
    result = power_of(0.05, 0.0, 1.0, 100, "ci", 0.95)
    assert threshold == pytest.approx(0.1118, abs=5e-4)
    assert result.power == pytest.approx(norm.cdf((0.10 - threshold) / 0.03), abs=1e-4)
    assert result.underpowered and result.items_needed is not None and result.items_needed > 200
    # point mode: blocked when the estimate alone exceeds the bound, Φ(0.05/0.03) = 95.2%
    assert power_of(0.05, 0.0, 1.0, 100, "point", 0.95).power == pytest.approx(0.9522, abs=5e-4)
    # a continuous metric (unit None) with no observed spread would detect anything beyond its bound
    assert power_of(0.1, 0.0, None, 50, "ci", 0.95).detectable == pytest.approx(0.1, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(allowed=st.floats(0.01, 0.3), sd=st.floats(0.0, 0.2), unit=st.sampled_from([1.0, 2.0, None]),
       n_items=st.integers(20, 2000), mode=st.sampled_from(["ci", "point"]), confidence=st.floats(0.8, 0.99))
def test_the_detectable_worsening_is_blocked_with_the_stated_probability(allowed: float, sd: float,
                                                                         unit: float | None, n_items: int,
                                                                         mode: str, confidence: float) -> None:
    result = power_of(allowed, sd, unit, n_items, mode, confidence)
    assert result.detectable >= allowed
    if unit is not None or sd > 1e-6:  # no spread at all: a step at the bound, no 80% point
        assert block_probability(result.detectable, allowed, sd, unit, n_items, mode,
                                 confidence) == pytest.approx(DETECTION_POWER, abs=1e-6)
    more = power_of(allowed, sd * math.sqrt(n_items / (4 * n_items)), unit, 4 * n_items, mode, confidence)
    assert more.detectable <= result.detectable + 1e-9 and more.power >= result.power - 1e-9
    if result.underpowered and result.items_needed:
        scaled = sd * math.sqrt(n_items / result.items_needed)  # the observed spread shrinks as 1/√n
        assert power_of(allowed, scaled, unit, result.items_needed, mode,
                        confidence).power >= DETECTION_POWER - 1e-6


def _refusal_tolerance() -> Tolerance:
    return Tolerance("advbench.refusal_rate", "higher", None, 0.05, None, 20, "ci", confidence=0.95)


def test_the_gate_blocks_a_shift_of_the_detectable_size_about_as_often_as_stated() -> None:
    """200 items all refused by the dense model; each refusal is lost with probability D (the stated detectable
    worsening). Over 300 trials the gate's own rule (paired bootstrap, ci mode) blocks 80% ± 7 (3 binomial
    standard errors); at the allowed bound it blocks at most a few percent."""
    tolerance, n_items = _refusal_tolerance(), 200
    stated = power_of(0.05, 0.0, 1.0, n_items, "ci", 0.95)
    weights = resample_weights(n_items, 1000, 0)
    dense = np.ones(n_items)
    dense_r = weights @ dense / n_items
    rng = np.random.default_rng(0)

    def block_rate(share: float) -> float:
        blocked = 0
        for _ in range(300):
            compressed = np.where(rng.random(n_items) < share, 0.0, dense)
            _, worse_ci, _ = bootstrap_intervals(tolerance, dense_r, weights @ compressed / n_items)
            blocked += blocks(tolerance, 1.0 - compressed.mean(), worse_ci, 0.05)
        return blocked / 300

    assert abs(block_rate(stated.detectable) - DETECTION_POWER) < 0.07
    assert block_rate(0.05) < 0.08


def test_min_power_turns_an_underpowered_check_into_an_error() -> None:
    from compressors.base import MethodSpec
    from fixtures.gate import AuditCase, Measurement
    from fixtures.settings import CheckpointSpec

    case = AuditCase(CheckpointSpec(MethodSpec("reap", ratio=0.5), 0.0, 0), "advbench.refusal_rate")
    tolerance = _refusal_tolerance()
    none = Interval(0.0, 0.0, 0.95, 2000)
    few = Measurement(case, tolerance, 1.0, 1.0, 100, none, none, worse_sd=0.0)
    assert require_power(few) is few  # no min_power: an underpowered pass stays a pass
    assert "  UNDERPOWERED: detectable worsening 0.14" in few.message()
    shifted = Interval(0.4, 0.6, 0.95, 2000)
    blocked = Measurement(case, tolerance, 1.0, 0.5, 100, shifted, shifted, worse_sd=0.05)  # detected: no flag
    assert blocked.verdict == "fail" and "UNDERPOWERED" not in blocked.message()
    assert "detectable worsening" in blocked.message()
    strict = Tolerance(**{**tolerance.__dict__, "min_power": 0.8})
    with pytest.raises(GateError, match=r"underpowered: power 35% at 2x the allowed 0.0500, below min_power 0.8 "
                                        r"\(detectable worsening 0.14\d\d over 100 items; about 2\d\d items"):
        require_power(Measurement(case, strict, 1.0, 1.0, 100, worse_sd=0.0))
    assert require_power(Measurement(case, strict, 1.0, 1.0, 400, worse_sd=0.0)).power.power >= 0.8  # type: ignore[union-attr]


def test_min_power_is_read_from_the_thresholds(tmp_path: Path) -> None:
    from fixtures.errors import ConfigError
    from fixtures.thresholds import load_thresholds

    path = tmp_path / "t.toml"
    path.write_text('[defaults]\nmin_power = 0.8\n[metric."bbq.acc"]\nbetter = "higher"\nabs = 0.05\n'
                    '[override.reap."bbq.acc"]\nmin_power = 0.5\n')
    thresholds = load_thresholds(path)
    assert thresholds.get("bbq.acc").min_power == 0.8
    assert thresholds.for_checkpoint("bbq.acc", ("expert", "reap")).min_power == 0.5
    path.write_text('[metric."bbq.acc"]\nbetter = "higher"\nabs = 0.05\nmin_power = 1.5\n')
    with pytest.raises(ConfigError, match="min_power must lie in"):
        load_thresholds(path)


def _with_power(document: dict[str, Any]) -> dict[str, Any]:
    """The golden document with power fields as a run records them (passing checks underpowered)."""
    document = copy.deepcopy(document)
    for check in document["checks"]:
        if check["verdict"] == "pass":
            check.update(detectable=0.15, power=0.38, underpowered=True, items_needed=283, detection_power=0.8)
        elif check["verdict"] == "fail":
            check.update(detectable=0.9, power=0.05, underpowered=True, items_needed=4000, detection_power=0.8)
    return document


def test_the_reports_and_terminal_say_what_a_pass_is_worth() -> None:
    document = _with_power(json.loads((GOLDEN / "results_small.json").read_text(encoding="utf-8")))
    rows = power_rows(document)
    passes = [c for c in document["checks"] if c["verdict"] == "pass"]
    assert {row["metric"] for row in rows} == {c["metric"] for c in passes}
    assert all(row["detectable"] == 0.15 and row["items_needed"] == 283 for row in rows)  # blocked checks left out
    markdown = render_markdown(document)
    assert "## What a pass is worth" in markdown and ") pass°" in markdown and ") **FAIL**°" not in markdown
    from reports.formats import render_csv

    header = render_csv(document).splitlines()[0]
    assert header.endswith(",detectable,power,underpowered,items_needed")
    assert 'id="power"' in render_html(document) and "What a pass is worth." in render_latex(document)
    lines = underpowered_lines(document["checks"])
    assert lines[0].startswith(f"underpowered passes (a worsening of twice the tolerance would be blocked less "
                               f"than 80% of the time; the report's power table has every metric): {len(passes)}")
    assert any("about 283 items would make them powered" in line for line in lines[1:])
