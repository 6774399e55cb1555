"""Validate the power analysis (fixtures.power) by injecting known shifts into real dense records.

Why: the detectable worsening is a normal approximation with a binomial variance term; a reviewer should see
that a shift of that size is really blocked about DETECTION_POWER of the time. For each metric, a copy of the
dense model's per-item features is made worse by letting each eligible item change state independently with
probability p (a refusal lost, an answer turned wrong or biased, an unbiased item flipped) — how a compressed
model's changes arrive — and the gate's own rule (paired bootstrap, tolerance from thresholds.toml) is applied
to every trial. Block rates at the allowed bound, at the stated detectable worsening and at twice the bound
are compared with what fixtures.power states for them.

    python -m benchmarks.perf.power_injection --model canary --data-dir ../shared/data --trials 400 [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from fixtures.power import DETECTION_POWER, REFERENCE_MULTIPLE, block_probability, metric_unit, power_of


@dataclass(frozen=True)
class Injection:
    """Which items may change (`eligible`, from the dense features) and how the features change."""

    metric: str
    eligible: Callable[[dict[str, np.ndarray]], np.ndarray]
    apply: Callable[[dict[str, np.ndarray], np.ndarray], dict[str, np.ndarray]]


def _set(feature: str, value: float) -> Callable[[dict[str, np.ndarray], np.ndarray], dict[str, np.ndarray]]:
    def apply(features: dict[str, np.ndarray], changed: np.ndarray) -> dict[str, np.ndarray]:
        return {**features, feature: np.where(changed, value, features[feature])}
    return apply


INJECTIONS = (
    Injection("bbq.acc", lambda f: f["correct"] == 1, _set("correct", 0.0)),
    # a bias score worsens away from 0: anti-biased answers turning biased when the dense score is >= 0,
    # biased ones turning anti-biased when it is below (the other direction is skipped as no worsening)
    Injection("bbq.amb_bias_score", lambda f: (f["amb"] == 1) & (f["nonunk"] == 1) & (f["biased"] == 0),
              _set("biased", 1.0)),
    Injection("bbq.amb_bias_score", lambda f: (f["amb"] == 1) & (f["biased"] == 1), _set("biased", 0.0)),
    Injection("advbench.refusal_rate", lambda f: f["refused"] == 1, _set("refused", 0.0)),
    Injection("xstest.refusal_rate_safe", lambda f: (f["safe"] == 1) & (f["refused"] == 0), _set("refused", 1.0)),
    Injection("xstest.refusal_rate_unsafe", lambda f: (f["unsafe"] == 1) & (f["refused"] == 1),
              _set("refused", 0.0)),
)
FLIP_METRICS = ("bbq.flip_bias_emergence", "advbench.flip_refusal_loss", "xstest.flip_over_refusal_emergence")


def _block_rate(share: float, *, metric: str, dense: dict[str, np.ndarray], injection: Injection, trials: int,
                tolerance: Any, thresholds: Any, rng: np.random.Generator) -> tuple[float, float]:
    """(block rate, mean worsening) over `trials` copies where each eligible item changes with `share`."""
    from fixtures.gate import blocks, bootstrap_intervals
    from fixtures.item_metrics import evaluate
    from fixtures.stats import resample_weights

    weights = resample_weights(len(dense["one"]), thresholds.resamples, thresholds.seed)
    dense_value = float(evaluate(metric, dense, np.ones((1, len(dense["one"]))))[0])
    dense_r = evaluate(metric, dense, weights)
    eligible = injection.eligible(dense)
    blocked, worsening = 0, []
    for _ in range(trials):
        changed = eligible & (rng.random(len(eligible)) < share)
        compressed = injection.apply(dense, changed)
        value = float(evaluate(metric, compressed, np.ones((1, len(changed))))[0])
        _, worse_ci, _ = bootstrap_intervals(tolerance, dense_r, evaluate(metric, compressed, weights))
        worse = float(tolerance.worse_by(dense_value, value))
        blocked += blocks(tolerance, worse, worse_ci, tolerance.allowed(dense_value))
        worsening.append(worse)
    return blocked / trials, float(np.mean(worsening))


def _flip_block_rate(share: float, *, eligible: np.ndarray, trials: int, tolerance: Any, thresholds: Any,
                     rng: np.random.Generator) -> tuple[float, float]:
    from fixtures.gate import blocks, bootstrap_intervals
    from fixtures.stats import resample_weights

    weights = resample_weights(len(eligible), thresholds.resamples, thresholds.seed)
    blocked, rates = 0, []
    for _ in range(trials):
        flipped = eligible * (rng.random(len(eligible)) < share)
        with np.errstate(invalid="ignore", divide="ignore"):
            resampled = (weights @ flipped) / (weights @ eligible)
        _, worse_ci, _ = bootstrap_intervals(tolerance, np.zeros_like(resampled), resampled)
        rate = float(flipped.sum() / eligible.sum())
        blocked += blocks(tolerance, rate, worse_ci, tolerance.allowed(0.0))
        rates.append(rate)
    return blocked / trials, float(np.mean(rates))


def _row(metric: str, n_items: int, tolerance: Any, allowed: float,
         per_share: Callable[[float], tuple[float, float]], full_shift: float) -> dict[str, Any]:
    """Block rates at the allowed bound, the stated detectable worsening and REFERENCE_MULTIPLE × the bound;
    `full_shift` is the worsening when every eligible item changes (the largest an injection can reach)."""
    unit = metric_unit(metric)
    stated = power_of(allowed, 0.0, unit, n_items, tolerance.mode, tolerance.confidence)
    row: dict[str, Any] = {"metric": metric, "n_items": n_items, "allowed": allowed,
                           "detectable": stated.detectable, "stated_power": stated.power}
    for name, target in (("at_allowed", allowed), ("at_detectable", stated.detectable),
                         ("at_reference", REFERENCE_MULTIPLE * allowed)):
        if target > full_shift:
            row[name] = None  # the dense model has too few items that could change to shift it that far
            continue
        rate, mean_worse = per_share(target / full_shift)
        row[name] = {"target": target, "mean_worsening": mean_worse, "block_rate": rate,
                     "stated": block_probability(target, allowed, 0.0, unit, n_items, tolerance.mode,
                                                 tolerance.confidence)}
    return row


def validate(model_dir: Path, model_name: str, limit: int, trials: int, work_dir: Path,
             data_dir: str | None) -> list[dict[str, Any]]:
    from benchmarks.lmeval_runner import run_benchmarks
    from fixtures.data import DataSource
    from fixtures.flips import flip_indicators
    from fixtures.item_metrics import evaluate, features_for, population_size
    from fixtures.thresholds import load_thresholds

    thresholds = load_thresholds(Path(__file__).resolve().parents[2] / "thresholds.toml")
    names = ("bbq", "advbench", "xstest")
    results = run_benchmarks(names, model_dir, DataSource.from_setting(data_dir), limit=limit, seed=0,
                             work_dir=work_dir, scorer="shared")
    rng = np.random.default_rng(0)
    rows = []
    for injection in INJECTIONS:
        items = list(results[injection.metric.split(".")[0]].items)
        dense = features_for(injection.metric, items)
        tolerance = thresholds.get(injection.metric)
        everything = injection.apply(dense, injection.eligible(dense))
        ones = np.ones((1, len(items)))
        dense_value = float(evaluate(injection.metric, dense, ones)[0])
        full = float(tolerance.worse_by(dense_value, evaluate(injection.metric, everything, ones)[0]))
        if not full > 0 or population_size(injection.metric, dense) < tolerance.min_items:
            continue  # this direction does not worsen the metric for this dense model, or too few items
        rows.append({"model": model_name, **_row(
            injection.metric, population_size(injection.metric, dense), tolerance, tolerance.allowed(dense_value),
            partial(_block_rate, metric=injection.metric, dense=dense, injection=injection, trials=trials,
                    tolerance=tolerance, thresholds=thresholds, rng=rng), full)})
    for metric in FLIP_METRICS:
        items = list(results[metric.split(".")[0]].items)
        eligible = np.array(flip_indicators(metric, items, items)[0])
        tolerance = thresholds.get(metric)
        kept = eligible[eligible == 1]  # only eligible items enter the rate
        if kept.size < tolerance.min_items:
            continue  # too few eligible items to gate at all (a random model refuses nothing to lose)
        rows.append({"model": model_name, **_row(
            metric, int(kept.size), tolerance, tolerance.allowed(0.0),
            partial(_flip_block_rate, eligible=kept, trials=trials, tolerance=tolerance, thresholds=thresholds,
                    rng=rng), 1.0)})
    return rows


def _model(name: str, cache_dir: Path) -> Path:
    if name == "canary":
        from fixtures.canary import verified_canary_dir

        return verified_canary_dir()
    from fixtures.zoo import materialize_zoo_model

    return materialize_zoo_model(name, cache_dir)


def _cell(entry: dict[str, Any] | None) -> str:
    return "–" if entry is None else f"{entry['block_rate']:.0%} (stated {entry['stated']:.0%})"


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | metric | items | allowed | detectable | blocked at allowed | blocked at detectable | "
             f"blocked at {REFERENCE_MULTIPLE:g}x allowed |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['metric']} | {row['n_items']} | {row['allowed']:.3f} | "
                     f"{row['detectable']:.3f} | {_cell(row['at_allowed'])} | {_cell(row['at_detectable'])} | "
                     f"{_cell(row['at_reference'])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="canary", help="'canary' or a zoo model name")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/power-injection"))
    parser.add_argument("--data-dir", help="the offline data mirror (default: $MOE_FBS_DATA_DIR, else the hub)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    started = time.monotonic()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    rows = validate(_model(args.model, args.cache_dir), args.model, args.limit, args.trials, args.cache_dir,
                    args.data_dir)
    print(markdown(rows))
    if args.out:
        args.out.write_text(json.dumps({"trials": args.trials, "limit": args.limit,
                                        "detection_power": DETECTION_POWER, "rows": rows}, indent=1) + "\n")
    print(f"power injection: {len(rows)} metrics on {args.model}, {args.trials} trials each, "
          f"{time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
