"""The markdown table of a `gpu_suite` report (also used to render docs/performance.md's numbers).

Why separate: the report JSON is what the GPU run brings back; the table can be re-rendered from it on any
machine (`python -m benchmarks.perf.summary OUT/gpu_suite.json`) without re-running anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

FULL_BBQ_ITEMS = 58492  # all 11 categories; the local mirror has 7 (17,628 items)
TARGETS = {"scoring_tokens_per_s": 60000, "bbq_full_seconds": 300, "generation_tokens_per_s": 5000,
           "suite_seconds": 600, "speedup": 15}


def _rate(n: float, seconds: float) -> str:
    return f"{n / seconds:,.0f}" if seconds > 0 else "-"


def full_rows(report: dict[str, Any]) -> list[str]:
    rows = ["| benchmark | items | wall s | forwarded tok/s | request tok/s | new tok/s |",
            "|---|---|---|---|---|---|"]
    for name, row in report.get("full", {}).items():
        work, s = row["work"], row["seconds"]
        rows.append(f"| {name} | {row['items']:,} | {s:.1f} | {_rate(work.get('forwarded_tokens', 0), s)} | "
                    f"{_rate(work.get('request_tokens', 0), s)} | {_rate(work.get('generated_tokens', 0), s)} |")
    drift = report.get("drift_full")
    if drift:
        rows.append(f"| drift ({drift['generations']} generations + scoring) | {drift['prompts']} prompts | "
                    f"{drift['seconds']:.1f} | - | - | {_rate(drift['new_tokens'], drift['generate_seconds'])} |")
    return rows


def subset_rows(report: dict[str, Any]) -> list[str]:
    sub = report.get("subset")
    if not sub:
        return []
    rows = ["| benchmark (same items) | items | ours s (model) | lm-eval hf s (model) | ratio (model) | "
            "same preds/texts |", "|---|---|---|---|---|---|"]
    for name, theirs in sub["hf"].items():
        mine, agree = sub["shared"][name], report["subset_agreement"][name]
        # generation benchmarks compare texts, scoring ones predictions (stored results keep neither list)
        share = agree["same_text_share"] if mine.get("work", {}).get("generated_tokens") \
            else agree["same_pred_share"]
        ratio, model_ratio = theirs["seconds"] / mine["seconds"], theirs["model_seconds"] / mine["model_seconds"]
        rows.append(f"| {name} | {mine['items']} | {mine['seconds']:.1f} ({mine['model_seconds']:.1f}) | "
                    f"{theirs['seconds']:.1f} ({theirs['model_seconds']:.1f}) | {ratio:.1f}x ({model_ratio:.1f}x) | "
                    f"{share:.0%} |")
    drift = report["drift_subset"]
    rows.append(f"| drift ({drift['fast']['generations']} generations; reference engine vs fast) | "
                f"{drift['fast']['prompts']} | {drift['fast']['seconds']:.1f} | {drift['reference']['seconds']:.1f} | "
                f"{drift['reference']['seconds'] / drift['fast']['seconds']:.1f}x | "
                f"{'identical' if drift['same_tokens'] else 'differ'} |")
    return rows


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """Each target's measured value (None where the run did not measure it)."""
    full, drift, sub = report.get("full", {}), report.get("drift_full"), report.get("subset")
    got: dict[str, Any] = dict.fromkeys(TARGETS)
    if "bbq" in full:
        bbq = full["bbq"]
        got["scoring_tokens_per_s"] = bbq["work"]["request_tokens"] / bbq["seconds"]
        got["scoring_forwarded_tokens_per_s"] = bbq["work"]["forwarded_tokens"] / bbq["seconds"]
        got["bbq_local_seconds"] = bbq["seconds"]
        got["bbq_full_seconds"] = bbq["seconds"] * FULL_BBQ_ITEMS / bbq["items"]  # linear estimate, stated
    gen_tokens = sum(full[n]["work"].get("generated_tokens", 0) for n in ("xstest", "advbench") if n in full)
    gen_seconds = sum(full[n]["seconds"] for n in ("xstest", "advbench") if n in full)
    if drift:
        gen_tokens, gen_seconds = gen_tokens + drift["new_tokens"], gen_seconds + drift["generate_seconds"]
    if gen_seconds:
        got["generation_tokens_per_s"] = gen_tokens / gen_seconds
    if full and drift:
        got["suite_seconds"] = sum(r["seconds"] for r in full.values()) + drift["seconds"]
    if sub:
        ours = sum(r["seconds"] for r in sub["shared"].values()) + report["drift_subset"]["fast"]["seconds"]
        theirs = sum(r["seconds"] for r in sub["hf"].values()) + report["drift_subset"]["reference"]["seconds"]
        got["speedup"] = theirs / ours  # measured, end to end on the subset (fixed data-preparation costs included)
        got["speedup_model_time_subset"] = (
            (sum(r["model_seconds"] for r in sub["hf"].values()) + report["drift_subset"]["reference"]["seconds"])
            / (sum(r["model_seconds"] for r in sub["shared"].values()) + report["drift_subset"]["fast"]["seconds"]))
        if full and drift and got["suite_seconds"]:
            got["hf_full_suite_seconds_estimate"] = hf_full_estimate(report)
            got["speedup_full_suite_estimate"] = got["hf_full_suite_seconds_estimate"] / got["suite_seconds"]
    return got


def hf_full_estimate(report: dict[str, Any]) -> float:
    """lm-eval's full-data suite time, ESTIMATED (labelled so everywhere): per benchmark its measured
    non-model time on the subset plus its model time per item on the subset times the full item count; drift's
    reference engine scaled by prompts."""
    total = 0.0
    for name, row in report["subset"]["hf"].items():
        full_items = report["full"][name]["items"]
        total += row["seconds"] - row["model_seconds"] + row["model_seconds"] * full_items / row["items"]
    ref, drift = report["drift_subset"]["reference"], report["drift_full"]
    return total + ref["seconds"] * drift["prompts"] / ref["prompts"]


def summarize(report: dict[str, Any]) -> str:
    lines = [f"GPU: {report.get('gpu', 'cpu')}, shape {report['args']['shape']}, "
             f"{report.get('parameters', 0) / 1e9:.2f}B parameters, {report['args']['dtype']}", ""]
    lines += [*full_rows(report), "", *subset_rows(report), "", "| target | goal | measured |", "|---|---|---|"]
    for name, value in targets(report).items():
        goal = TARGETS.get(name, "")
        lines.append(f"| {name} | {goal} | {'-' if value is None else f'{value:,.1f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(json.loads(Path(sys.argv[1]).read_text())))
