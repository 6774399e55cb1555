"""Start-up checks of benchmark settings that would otherwise fail only after every checkpoint is built.

Why: `--limit` draws a stratified sample (one item per stratum at least); a limit below a benchmark's number of
strata used to pass start-up, build the whole grid and then error in every check. The sample depends only on
the data, the limit and the seed, so it is drawn here on the data alone, before any model is touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fixtures.data import DataSource
from fixtures.errors import ConfigError


def _sample(name: str, source: DataSource, limit: int, seed: int) -> list[Mapping[str, Any]]:
    """The rows `--limit` selects for a benchmark: the same stratified draw its evaluation makes; ConfigError
    (from the benchmark's own selection) when the limit cannot cover its strata."""
    from benchmarks import get_spec

    spec = get_spec(name)
    data = spec.load_data(source, spec.check_options({}))
    columns = [[row[column] for row in data.rows] for column in spec.stratum_columns]
    try:
        indices, _ = spec.select(columns, len(data.rows), limit, seed)
    except ConfigError as exc:
        raise ConfigError(f"--limit {limit} is too small for {name}: {exc}") from None
    return [data.rows[i] for i in indices]


def check_limit(names: Sequence[str], min_items: Mapping[str, int], source: DataSource, limit: int | None,
                seed: int) -> None:
    """Raise ConfigError when `--limit` cannot cover a benchmark's strata, or leaves a gated metric fewer items
    than its `min_items`: each benchmark's sample is drawn once, on the data alone.

    `min_items` maps each gated metric to the largest min_items any checkpoint of the grid gives it. Only
    metrics whose population is known from the data are counted here (a bias score's context, XSTest's
    safe/unsafe label, a whole benchmark); a flip metric's eligible items depend on the dense model's answers
    and are checked when it is measured.
    """
    if limit is None:
        return
    from fixtures.item_metrics import has_item_metric, item_metric

    short = []
    for name in (n for n in names if n != "drift"):
        rows = _sample(name, source, limit, seed)
        metrics = [m for m in min_items if m.startswith(name + ".") and ".flip_" not in m and has_item_metric(m)]
        for metric in metrics:
            belongs = item_metric(metric).row_in_population
            count = len(rows) if belongs is None else sum(1 for row in rows if belongs(row))
            if count < min_items[metric]:
                needed = f"; about --limit {-(-min_items[metric] * len(rows) // count)} would" if count else ""
                short.append(f"{metric} gets {count} of the {len(rows)} sampled items, fewer than its min_items "
                             f"{min_items[metric]}{needed}")
    if short:
        raise ConfigError(f"--limit {limit} is too small: " + "; ".join(short)
                          + " (or lower min_items in the thresholds file)")


def check_limit_covers_min_items(min_items: Mapping[str, int], source: DataSource, limit: int | None,
                                 seed: int) -> None:
    """`check_limit` for the benchmarks of these metrics."""
    check_limit(list(dict.fromkeys(metric.split(".", 1)[0] for metric in min_items)), min_items, source, limit,
                seed)
