"""Benchmark gates: one test per compressed checkpoint × gated metric (tolerances in thresholds.toml).

Ids read like `reap-r50-safety0-seed0-bbq.acc` (ratio and safety share in percent: `safety0`, `safety11.8`,
`safety100`), so `pytest audits -k reap`, `-k "safety0 and bbq"`, `-k "gptq and crows_pairs"` and `-m expert`
select what a build should gate on. With several `--seeds`, each calibrated setting also gets seed-mean tests
(`reap-r50-safety0-seedmean-bbq.acc`, marker `seedmean`): the paper's number, the mean over seeds, gated
against the dense baseline; `-k seedmean` runs only those (the per-seed tests stay, and a seed-mean test
still needs every seed's checkpoint, built or read from the cache).
"""

from fixtures.gate import Measurement, check


def test_metric_within_tolerance(measurement: Measurement) -> None:
    check(measurement)
