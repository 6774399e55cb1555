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


# The paper's column groups, in its order; a metric is placed by its id (see metric_group).
HEADLINE_GROUPS = ("Social Bias", "Safety & Refusal", "Capability")
FURTHER_GROUPS = ("Item Flips", "Generation Drift", "Other")
_CAPABILITY = {"bbq.acc", "stereoset.icat"}
_SOCIAL_BIAS = ("bbq.", "crows_pairs.", "stereoset.")
_SAFETY = ("xstest.", "advbench.")


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def metric_group(metric: str) -> str:
    """The column group a paper table heads this metric with: flips and drift apart from the headline metrics,
    capability apart from bias (BBQ accuracy is the benchmark's capability control, not a bias score)."""
    if ".flip_" in metric:
        return "Item Flips"
    if metric.startswith("drift."):
        return "Generation Drift"
    if metric in _CAPABILITY:
        return "Capability"
    if metric.startswith(_SOCIAL_BIAS):
        return "Social Bias"
    if metric.startswith(_SAFETY):
        return "Safety & Refusal"
    return "Other"


def in_group_order(metrics: list[str]) -> list[str]:
    """The metrics grouped as the paper groups its columns (headline groups first), each group in run order."""
    order = HEADLINE_GROUPS + FURTHER_GROUPS
    return sorted(metrics, key=lambda metric: order.index(metric_group(metric)))
