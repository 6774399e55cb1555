"""Seed-mean cases on synthetic per-item results (no models): the value is the mean over seeds of each seed's
own metric, the interval is the paired bootstrap with the same item resamples for every seed, and a missing
seed or an unpaired seed is an error."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.records import BenchmarkResult, ItemRecord
from compressors.base import MethodSpec
from fixtures.errors import AuditError
from fixtures.gate import AuditCase, GateError, Measurement, dataset_breakdown
from fixtures.item_metrics import evaluate, features_for
from fixtures.measurement import measure
from fixtures.settings import CheckpointSpec, SeedMeanSpec
from fixtures.thresholds import Thresholds, load_thresholds

REPO = Path(__file__).resolve().parent.parent
REAP = MethodSpec("reap", None, 0.5)
METRICS = ("bbq.acc", "bbq.amb_bias_score", "bbq.disamb_bias_score", "bbq.flip_bias_emergence")
N_ITEMS = 120


def _items(seed: int, offset: int = 0) -> list[ItemRecord]:
    rng = np.random.default_rng(seed)
    statuses = rng.choice(["biased", "anti_biased", "unknown"], size=N_ITEMS, p=[0.4, 0.2, 0.4])
    return [ItemRecord(benchmark="bbq", doc_id=i, doc_hash=f"h{i + offset}", item_id=f"Age:{i}", category="Age",
                       pred=0, target=0, loglikelihoods=(0.0,) * 12, status=str(status),
                       correct=bool(rng.random() < 0.5), extras={"context_condition": ("disambig", "ambig")[i % 2]})
            for i, status in enumerate(statuses)]


def _result(items: list[ItemRecord]) -> BenchmarkResult:
    metrics = {name.split(".")[1]: float(evaluate(name, features_for(name, items)))
               for name in METRICS if ".flip_" not in name}
    return BenchmarkResult(benchmark="bbq", metrics=metrics, n_items=len(items), items=tuple(items),
                           data_sha256="0", data_source="test", settings={}, seconds=0.0)


class FakeSession:
    """What the gate asks of an AuditSession: thresholds, the dense results and each checkpoint's results."""

    def __init__(self, seeds: Mapping[int, list[ItemRecord]], failing: tuple[int, ...] = ()) -> None:
        self.thresholds: Thresholds = load_thresholds(REPO / "thresholds.toml")
        self.seeds = {seed: {"bbq": _result(items)} for seed, items in seeds.items()}
        self.failing = failing
        self.asked: list[str] = []

    def dense_results(self) -> dict[str, BenchmarkResult]:
        return {"bbq": _result(_items(100))}

    def checkpoint_results(self, spec: CheckpointSpec) -> dict[str, BenchmarkResult]:
        self.asked.append(spec.id)
        if spec.seed in self.failing:
            raise AuditError(f"compression of {spec.id} failed")
        return self.seeds[spec.seed]


def _measure(session: FakeSession, spec: CheckpointSpec | SeedMeanSpec, metric: str) -> Measurement:
    return measure(session, AuditCase(spec, metric))  # type: ignore[arg-type]


@pytest.mark.parametrize("metric", METRICS)
def test_seed_mean_is_the_mean_of_the_seeds_values(metric: str) -> None:
    session = FakeSession({0: _items(0), 1: _items(1), 2: _items(2)})
    spec = SeedMeanSpec(REAP, 0.0, (0, 1, 2))
    per_seed = [_measure(session, member, metric) for member in spec.members()]
    mean = _measure(session, spec, metric)
    assert mean.compressed == pytest.approx(np.mean([m.compressed for m in per_seed]), abs=1e-12)
    assert mean.dense == per_seed[0].dense and mean.n_items == per_seed[0].n_items
    assert mean.delta_interval is not None and mean.worse_interval is not None
    assert mean.delta_interval.low <= mean.delta <= mean.delta_interval.high
    assert mean.mcnemar is None and mean.seeds == (0, 1, 2)
    assert "McNemar is not defined for outcomes averaged over seeds" in mean.message()
    assert mean.to_json()["checkpoint"]["id"] == "reap-r50-safety0-seedmean"
    assert mean.to_json()["checkpoint"]["kind"] == "seed_mean"


def test_accuracy_of_the_seed_mean_is_the_per_item_average_outcome() -> None:
    seeds = {0: _items(0), 1: _items(1)}
    mean = _measure(FakeSession(seeds), SeedMeanSpec(REAP, 0.0, (0, 1)), "bbq.acc")
    per_item = np.mean([[float(bool(r.correct)) for r in items] for items in seeds.values()], axis=0)
    assert mean.compressed == pytest.approx(per_item.mean(), abs=1e-12)


@pytest.mark.parametrize("metric", METRICS)
def test_identical_seeds_give_the_single_seed_interval(metric: str) -> None:
    """Every seed is resampled with the same item draws as the dense model: two copies of one seed must
    reproduce that seed's own interval exactly."""
    session = FakeSession({0: _items(0), 1: _items(0)})
    single = _measure(session, CheckpointSpec(REAP, 0.0, 0), metric)
    mean = _measure(session, SeedMeanSpec(REAP, 0.0, (0, 1)), metric)
    assert (mean.compressed, mean.delta_interval, mean.worse_interval) == (
        single.compressed, single.delta_interval, single.worse_interval)
    assert mean.verdict == single.verdict


def test_changed_items_list_every_seeds_status() -> None:
    mean = _measure(FakeSession({0: _items(0), 1: _items(1)}), SeedMeanSpec(REAP, 0.0, (0, 1)),
                    "bbq.flip_bias_emergence")
    assert mean.changed_count > 0 and mean.changed_items
    first = mean.changed_items[0]
    assert len(first["compressed"].split("/")) == 2 and "biased" in first["compressed"].split("/")


def test_a_missing_seed_is_an_error_naming_it() -> None:
    session = FakeSession({0: _items(0), 1: _items(1)}, failing=(1,))
    with pytest.raises(GateError, match=r"seed 1 \(reap-r50-safety0-seed1\) has no results.*compression of"):
        _measure(session, SeedMeanSpec(REAP, 0.0, (0, 1)), "bbq.acc")


def test_a_seed_scoring_other_items_is_an_error() -> None:
    session = FakeSession({0: _items(0), 1: _items(1, offset=1)})
    with pytest.raises(GateError, match="scored different items"):
        _measure(session, SeedMeanSpec(REAP, 0.0, (0, 1)), "bbq.acc")


def _drift(values: Mapping[str, float], datasets: tuple[str, ...] = ("bbq", "xstest")) -> BenchmarkResult:
    metrics: dict[str, Any] = {"delta_cross_nll_t0": float(np.mean(list(values.values())))}
    metrics.update({f"delta_cross_nll_t0.{d}": v for d, v in values.items()})
    metrics["delta_cross_nll_t0.7"] = 9.0  # another temperature: must not be read as a dataset called "7"
    return BenchmarkResult(benchmark="drift", metrics=metrics, n_items=0, items=(), data_sha256="0",
                           data_source="test", settings={"prompts_per_dataset": {d: 2 for d in datasets},
                                                         "metric_items": {"delta_cross_nll_t0.bbq": 2}},
                           seconds=0.0)


def test_drift_per_dataset_values_are_carried_and_averaged_over_seeds() -> None:
    case = AuditCase(SeedMeanSpec(REAP, 0.0, (0, 1)), "drift.delta_cross_nll_t0")
    dense = _drift({"bbq": 0.0, "xstest": 0.0})
    seeds = [_drift({"bbq": 0.2, "xstest": 0.5}), _drift({"bbq": 0.4, "xstest": 0.1})]
    breakdown = dataset_breakdown(case, dense, seeds)
    assert set(breakdown) == {"bbq", "xstest"}
    assert breakdown["bbq"] == {"dense": 0.0, "compressed": pytest.approx(0.3), "delta": pytest.approx(0.3),
                                "n_items": 2}
    assert breakdown["xstest"]["compressed"] == pytest.approx(0.3) and breakdown["xstest"]["n_items"] is None
    assert dataset_breakdown(AuditCase(case.checkpoint, "bbq.acc"), dense, seeds) == {}
    with pytest.raises(GateError, match="per-dataset metric 'delta_cross_nll_t0.stereoset'"):
        dataset_breakdown(case, _drift({"bbq": 0.0, "xstest": 0.0}, ("bbq", "xstest", "stereoset")), seeds)


def test_drift_checks_list_the_prompts_that_moved_the_metric() -> None:
    from fixtures.flips import largest_drift_changes

    def prompt(name: str, label: str, delta: float, nll: float) -> ItemRecord:
        return ItemRecord(benchmark="drift", doc_id=0, doc_hash=name + label, item_id=f"{name}@{label}",
                          category="bbq", pred=-1, target=-1, loglikelihoods=(0.0,), status="length",
                          correct=None, extras={"delta_cross_nll": delta, "cross_nll": nll,
                                                "delta_entropy": 0.0, "entropy": 1.0})

    items = [prompt("a", "t0", 0.1, 2.0), prompt("b", "t0", -0.9, 1.0), prompt("c", "t0", 0.0, 1.5),
             prompt("d", "t0.7", 5.0, 9.0), prompt("e", "t0", 0.4, 3.0)]
    listed, count = largest_drift_changes("delta_cross_nll_t0", items)
    assert count == 3  # c did not move; d is the other temperature
    assert [row["item_id"] for row in listed] == ["b@t0", "e@t0", "a@t0"]
    assert listed[0]["dense"] == "1.900" and listed[0]["compressed"] == "1.000 (cross_nll -0.900)"
    assert largest_drift_changes("delta_entropy_t0", items) == ((), 0)
    assert [row["item_id"] for row in largest_drift_changes("delta_cross_nll_t0.7", items)[0]] == ["d@t0.7"]
