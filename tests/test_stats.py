"""Gate statistics: item-level metric definitions vs lm-eval, paired bootstrap, McNemar, Cohen's h, flips."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.records import ItemRecord
from fixtures.distribution import checkpoint_scope, worker_device
from fixtures.flips import compute_flips, flip_indicators
from fixtures.item_metrics import (
    ItemMetricError,
    check_reproduces,
    evaluate,
    features_for,
    join_items,
    population_size,
)
from fixtures.stats import cohens_h, mcnemar_exact, paired_resamples, percentile_interval, resample_weights
from fixtures.thresholds import load_thresholds


def _bbq_item(index: int, status: str, correct: bool, disamb: bool) -> ItemRecord:
    return ItemRecord(benchmark="bbq", doc_id=index, doc_hash=f"h{index}", item_id=f"Age:{index}", category="Age",
                      pred=0, target=0, loglikelihoods=(0.0,) * 12, status=status, correct=correct,
                      extras={"context_condition": "disambig" if disamb else "ambig"})


_bbq_items = st.lists(
    st.tuples(st.sampled_from(["biased", "anti_biased", "unknown"]), st.booleans(), st.booleans()),
    min_size=2, max_size=60,
).map(lambda rows: [_bbq_item(i, *row) for i, row in enumerate(rows)])


def _lmeval_tuples(items: list[ItemRecord]) -> list[tuple[float, float, float, bool]]:
    return [(float(bool(r.correct)), float(r.status == "biased"), float(r.status != "unknown"),
             r.extras["context_condition"] == "disambig") for r in items]


@settings(max_examples=150, deadline=None)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@given(_bbq_items)
def test_bbq_item_metrics_equal_lmeval_aggregations(items: list[ItemRecord]) -> None:
    from lm_eval.tasks.bbq import utils

    rows = _lmeval_tuples(items)
    features = features_for("bbq.acc", items)
    expected = {
        "bbq.acc": float(np.mean([row[0] for row in rows])),
        "bbq.disamb_bias_score": utils.agg_disamb_bias_scores(rows),
        "bbq.amb_bias_score": utils.agg_amb_bias_scores(rows),
        "bbq.accuracy_amb": utils.agg_accuracy_amb([(row[0], row[3]) for row in rows]),
        "bbq.accuracy_disamb": utils.agg_accuracy_disamb([(row[0], row[3]) for row in rows]),
    }
    for metric, value in expected.items():
        ours = float(evaluate(metric, features))
        if math.isnan(value):
            assert math.isnan(ours), metric
        else:
            assert ours == pytest.approx(value, abs=1e-12), metric


def test_check_reproduces_fails_closed() -> None:
    items = [_bbq_item(0, "biased", True, True), _bbq_item(1, "unknown", False, False)]
    features = features_for("bbq.acc", items)
    check_reproduces("bbq.acc", features, 0.5, "dense")
    with pytest.raises(ItemMetricError, match="items give 0.5 but the benchmark reported 0.75"):
        check_reproduces("bbq.acc", features, 0.75, "dense")


def test_join_requires_the_same_items() -> None:
    dense = [_bbq_item(0, "biased", True, True), _bbq_item(1, "unknown", False, False)]
    with pytest.raises(ItemMetricError, match="different items"):
        join_items(dense, dense[:1], "bbq")
    paired_dense, paired_compressed = join_items(dense, list(reversed(dense)), "bbq")
    assert [r.doc_hash for r in paired_compressed] == [r.doc_hash for r in paired_dense]


def test_resample_weights_are_multinomial_counts() -> None:
    weights = resample_weights(17, 500, seed=3)
    assert weights.shape == (500, 17) and np.all(weights.sum(axis=1) == 17)
    assert np.array_equal(weights, resample_weights(17, 500, seed=3))


def test_identical_models_give_a_zero_interval() -> None:
    items = [_bbq_item(i, s, i % 3 == 0, i % 2 == 0) for i, s in enumerate(["biased", "unknown", "anti_biased"] * 20)]
    features = features_for("bbq.acc", items)
    dense_r, compressed_r = paired_resamples("bbq.acc", features, features, seed=0, resamples=300)
    interval = percentile_interval(compressed_r - dense_r, 0.95)
    assert (interval.low, interval.high) == (0.0, 0.0)


def test_paired_interval_covers_a_known_shift() -> None:
    rng = np.random.default_rng(0)
    dense_correct = rng.random(400) < 0.6
    compressed_correct = dense_correct.copy()
    flip = rng.choice(400, size=40, replace=False)
    compressed_correct[flip] = False  # exactly up to 40 correct answers lost
    dense = {"one": np.ones(400), "correct": dense_correct.astype(float)}
    compressed = {"one": np.ones(400), "correct": compressed_correct.astype(float)}
    dense_r, compressed_r = paired_resamples("bbq.acc", dense, compressed, seed=1, resamples=2000)
    interval = percentile_interval(compressed_r - dense_r, 0.95)
    true_delta = compressed_correct.mean() - dense_correct.mean()
    assert interval.low < true_delta < interval.high < 0


def test_percentile_interval_nan_when_mostly_undefined() -> None:
    values = np.array([np.nan] * 6 + [0.1] * 4)
    assert math.isnan(percentile_interval(values, 0.95).low)


def test_mcnemar_exact_known_answer() -> None:
    dense = np.array([1] * 10 + [0] * 2 + [1] * 5 + [0] * 3)
    compressed = np.array([0] * 10 + [1] * 2 + [1] * 5 + [0] * 3)
    only_dense, only_compressed, p_value = mcnemar_exact(dense, compressed)
    assert (only_dense, only_compressed) == (10, 2)
    assert p_value == pytest.approx(2 * sum(math.comb(12, k) for k in range(3)) / 2**12)
    assert mcnemar_exact(dense, dense)[2] == 1.0


def test_cohens_h_known_values() -> None:
    assert cohens_h(0.5, 0.5) == 0.0
    assert cohens_h(0.0, 1.0) == pytest.approx(math.pi)
    assert cohens_h(0.5, 0.25) == pytest.approx(2 * math.asin(0.5) - 2 * math.asin(math.sqrt(0.5)))


def test_bias_emergence_flips_known_answer() -> None:
    statuses = [("unknown", "biased"), ("anti_biased", "biased"), ("biased", "unknown"), ("unknown", "unknown"),
                ("biased", "biased")]
    dense = [_bbq_item(i, before, True, True) for i, (before, _) in enumerate(statuses)]
    compressed = [_bbq_item(i, after, True, True) for i, (_, after) in enumerate(statuses)]
    emergence = compute_flips("bbq.flip_bias_emergence", dense, compressed)
    assert (emergence.eligible, emergence.flipped) == (3, 2) and emergence.rate == pytest.approx(2 / 3)
    assert [item["item_id"] for item in emergence.items] == ["Age:0", "Age:1"]
    removal = compute_flips("bbq.flip_bias_removal", dense, compressed)
    assert (removal.eligible, removal.flipped) == (2, 1)
    eligible, flipped = flip_indicators("bbq.flip_bias_emergence", dense, compressed)
    assert eligible == [1, 1, 0, 1, 0] and flipped == [1, 1, 0, 0, 0]


def test_refusal_flip_without_verdicts_fails_closed() -> None:
    item = ItemRecord(benchmark="advbench", doc_id=0, doc_hash="h", item_id="0", category="-", pred=0, target=0,
                      loglikelihoods=(), status="complied", correct=None, extras={})
    with pytest.raises(ItemMetricError, match="no refusal verdict"):
        compute_flips("advbench.flip_refusal_loss", [item], [item])


def test_item_count_is_the_metrics_population_not_the_benchmarks() -> None:
    """XSTest's safe-prompt rate covers the safe prompts only; a drift metric one temperature's prompts."""
    xstest = [ItemRecord(benchmark="xstest", doc_id=i, doc_hash=f"h{i}", item_id=str(i), category="-", pred=0,
                         target=0, loglikelihoods=(), status="compliance", correct=True, refused=False,
                         extras={"label": "safe" if i < 3 else "unsafe"}) for i in range(5)]
    assert population_size("xstest.refusal_rate_safe", features_for("xstest.refusal_rate_safe", xstest)) == 3
    assert population_size("xstest.refusal_rate_unsafe", features_for("xstest.refusal_rate_unsafe", xstest)) == 2
    drift = [ItemRecord(benchmark="drift", doc_id=i, doc_hash=f"d{i}", item_id=str(i), category="-", pred=0,
                        target=0, loglikelihoods=(), status="-", correct=None,
                        extras={"temperature": 0.0 if i % 2 else 0.7, "delta_cross_nll": 0.1}) for i in range(6)]
    assert population_size("drift.delta_cross_nll_t0", features_for("drift.delta_cross_nll_t0", drift)) == 3
    bbq = [_bbq_item(i, "biased", True, disamb=i < 4) for i in range(7)]
    assert population_size("bbq.disamb_bias_score", features_for("bbq.disamb_bias_score", bbq)) == 4
    assert population_size("bbq.acc", features_for("bbq.acc", bbq)) == 7


@pytest.mark.parametrize(
    ("worker", "gpus", "expected"),
    [("gw0", ["0", "1"], "0"), ("gw1", ["0", "1"], "1"), ("gw2", ["0", "1"], "0"), ("gw1", ["3", "5"], "5"),
     ("gw0", [], None), ("master", ["0"], None)],
)
def test_worker_gpu_pinning(worker: str, gpus: list[str], expected: str | None) -> None:
    assert worker_device(worker, gpus) == expected


def test_checkpoint_scope_groups_all_seeds_of_a_setting_with_their_mean() -> None:
    base = "audits/test_benchmarks.py::test_metric_within_tolerance"
    for seed in ("seed0", "seed1", "seed12", "seedmean"):
        assert checkpoint_scope(f"{base}[reap-r50-safety11.8-{seed}-bbq.acc]") == "reap-r50-safety11.8"
    assert checkpoint_scope(f"{base}[reap-r12.5-safety0-seed0-bbq.acc]") == "reap-r12.5-safety0"
    assert checkpoint_scope(f"{base}[fp8-w8a8-seed0-drift.delta_cross_nll_t0.7]") == "fp8-w8a8"
    assert checkpoint_scope(f"{base}[random-s50-seedmean-drift.delta_entropy_t0]") == "random-s50"
    assert checkpoint_scope("tests/test_x.py::test_plain") == "tests/test_x.py::test_plain"


def _thresholds(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "t.toml"
    path.write_text(text)
    return load_thresholds(path)


def test_override_precedence(tmp_path: Path) -> None:
    thresholds = _thresholds(tmp_path, """
[metric."bbq.acc"]
better = "higher"
abs = 0.05
[metric."bbq.amb_bias_score"]
better = "closer"
ideal = 0.0
abs = 0.1
[override.expert."bbq"]
abs = 0.2
[override.reap."bbq.acc"]
abs = 0.3
mode = "point"
[override."reap-r50"."bbq.acc"]
abs = 0.4
""")
    assert thresholds.for_checkpoint("bbq.acc", ("quantization", "gptq", "gptq-w4a16")).abs == 0.05
    assert thresholds.for_checkpoint("bbq.amb_bias_score", ("expert", "reap", "reap-r25")).abs == 0.2
    reap25 = thresholds.for_checkpoint("bbq.acc", ("expert", "reap", "reap-r25"))
    assert (reap25.abs, reap25.mode) == (0.3, "point") and "override.reap" in reap25.describe()
    assert thresholds.for_checkpoint("bbq.acc", ("expert", "reap", "reap-r50")).abs == 0.4


@pytest.mark.parametrize(
    ("override", "message"),
    [('[override.reap."mmlu"]\nabs = 0.1', "names no gated metric or benchmark"),
     ('[override.reap."bbq.acc"]\nbetter = "lower"', "unknown key override.reap.\"bbq.acc\".better"),
     ('[override.reap."bbq.acc"]\nabs = -1', "must be >= 0"),
     ('[override.reap."bbq.acc"]\nconfidence = 1.5', "confidence must lie in")],
)
def test_bad_overrides(tmp_path: Path, override: str, message: str) -> None:
    from fixtures.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        _thresholds(tmp_path, f'[metric."bbq.acc"]\nbetter = "higher"\nabs = 0.05\n{override}\n')


@given(st.floats(-1, 1), st.floats(-1, 1))
def test_worse_by_elementwise_matches_scalar(dense: float, compressed: float) -> None:
    from fixtures.thresholds import Tolerance

    tolerance = Tolerance("m", "closer", 0.5, 0.05, None, 1, "ci")
    array = tolerance.worse_by(np.array([dense]), np.array([compressed]))
    assert float(array[0]) == pytest.approx(tolerance.worse_by(dense, compressed))


def test_records_helpers_roundtrip() -> None:
    items = [_bbq_item(0, "biased", True, True)]
    assert features_for("bbq.acc", items)["biased"].tolist() == [1.0]
    assert isinstance(items[0].extras, dict)
