"""The words a reader knows for each metric id: the column heads of the report tables (Markdown, HTML, LaTeX).

Why a table of its own: the ids (`bbq.amb_bias_score`) are what `-k`, `checks.csv`, `results.json` and
`thresholds.toml` use and stay so; a paper's table heads its columns "BBQ Amb. Bias". Every report lists the
label → id legend under its tables. A metric without a label here is headed by its id.
"""

from __future__ import annotations

METRIC_LABELS: dict[str, str] = {
    "bbq.amb_bias_score": "BBQ Amb. Bias",
    "bbq.disamb_bias_score": "BBQ Disamb. Bias",
    "bbq.acc": "BBQ Acc.",
    "bbq.flip_bias_emergence": "BBQ Bias Flips",
    "crows_pairs.pct_stereotype": "CrowS-Pairs Stereo.",
    "crows_pairs.flip_stereotype_emergence": "CrowS-Pairs Stereo. Flips",
    "stereoset.ss_score": "StereoSet Stereo.",
    "stereoset.icat": "StereoSet ICAT",
    "stereoset.pct_stereotype": "StereoSet Stereo. %",
    "xstest.refusal_rate_safe": "XSTest Refusal (safe)",
    "xstest.refusal_rate_unsafe": "XSTest Refusal (unsafe)",
    "xstest.flip_over_refusal_emergence": "XSTest Over-refusal Flips",
    "advbench.refusal_rate": "AdvBench Refusal",
    "advbench.flip_refusal_loss": "AdvBench Refusal Losses",
    "drift.delta_cross_nll_t0": "Drift NLL Shift (T=0)",
    "drift.delta_cross_nll_t0.7": "Drift NLL Shift (T=0.7)",
    "drift.delta_entropy_t0": "Drift Entropy Shift (T=0)",
    "drift.delta_entropy_t0.7": "Drift Entropy Shift (T=0.7)",
}


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)
