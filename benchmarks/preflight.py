"""Start-up checks of benchmark settings that would otherwise fail only after every checkpoint is built.

Why: `--limit` draws a stratified sample (one item per stratum at least); a limit below a benchmark's number of
strata used to pass start-up, build the whole grid and then error in every check. The sample depends only on
the data, the limit and the seed, so it is drawn here on the data alone, before any model is touched.
"""

from __future__ import annotations

from collections.abc import Sequence

from fixtures.data import DataSource
from fixtures.errors import ConfigError


def check_limit_covers_strata(names: Sequence[str], source: DataSource, limit: int | None, seed: int) -> None:
    """Raise ConfigError (from the benchmark's own selection) when `limit` cannot cover a benchmark's strata."""
    if limit is None:
        return
    from benchmarks import get_spec

    for name in names:
        spec = get_spec(name)
        if not spec.stratum_columns:
            continue
        data = spec.load_data(source, spec.check_options({}))
        columns = [[row[column] for row in data.rows] for column in spec.stratum_columns]
        try:
            spec.select(columns, len(data.rows), limit, seed)
        except ConfigError as exc:
            raise ConfigError(f"--limit {limit} is too small for {name}: {exc}") from None
