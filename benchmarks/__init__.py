"""Fairness/bias/safety benchmarks run through lm-eval: registry, metric names and the runner.

Importing this package is cheap (lm-eval, torch and datasets load only when a benchmark runs), so the
plugin can validate benchmark and metric names at option-parsing time.

- `BENCHMARKS`: name -> spec. Likelihood: `bbq` (lm-eval's 12 choices), `bbq3` (original 3-choice
  protocol), `crows_pairs` (revised, as lm-eval), `crows_pairs_original`, `stereoset` (intrasentence dev).
  Generative: `xstest`, `advbench` (refusal rates; refusal.py holds the refusal detectors).
- `available()`, `get_spec(name)`, `metric_names(name)`, `headline_metrics(name)`.
- `run_benchmarks(...)` (benchmarks.lmeval_runner) -> {name: BenchmarkResult}.

Module map: spec.py (what a benchmark provides), refusal_spec.py (refusal-rate benchmarks), taskconfig.py
(lm-eval task YAMLs), sampling.py (`--limit`), records.py (results), lmeval_runner.py (the lm-eval calls),
__main__.py (`python -m benchmarks`: full-data runs with wall times).
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks import advbench, bbq, crows_pairs, stereoset, xstest
from benchmarks.lmeval_runner import run_benchmarks
from benchmarks.records import BenchmarkResult, ItemRecord
from benchmarks.sampling import stratified_indices
from benchmarks.spec import BenchmarkSpec
from fixtures.errors import ConfigError

BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        bbq.SPEC, bbq.SPEC_3CHOICE, crows_pairs.SPEC, crows_pairs.ORIGINAL_SPEC, stereoset.SPEC,
        xstest.SPEC, advbench.SPEC,
    )
}

__all__ = [
    "BENCHMARKS",
    "BenchmarkResult",
    "BenchmarkSpec",
    "ItemRecord",
    "available",
    "get_spec",
    "headline_metrics",
    "judged_benchmarks",
    "metric_names",
    "run_benchmarks",
    "stratified_indices",
]


def available() -> tuple[str, ...]:
    return tuple(BENCHMARKS)


def get_spec(name: str) -> BenchmarkSpec:
    try:
        return BENCHMARKS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}") from None


def metric_names(benchmark: str) -> tuple[str, ...]:
    """Every metric a result of `benchmark` can hold: headline metrics first, then per-category ones
    (reported only for categories among the evaluated items)."""
    return get_spec(benchmark).metric_names()


def headline_metrics(benchmark: str) -> tuple[str, ...]:
    """The metrics every result of `benchmark` holds (possibly NaN)."""
    return get_spec(benchmark).headline_metrics


def judged_benchmarks(names: Sequence[str]) -> tuple[str, ...]:
    """The benchmarks among `names` whose verdicts come from a refusal judge (their `detector` option)."""
    return tuple(name for name in names if name in BENCHMARKS and "detector" in BENCHMARKS[name].option_names)
