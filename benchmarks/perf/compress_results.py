"""One results file and one docs table from several `compress_scale` runs (a GPU call is 10 minutes at most,
so the grid is measured in parts).

    python -m benchmarks.perf.compress_results --out benchmarks/perf/results/h200-compress-scale.json \
        RUN.json[:label] ... [--unfinished 'label/method/setting/seconds/why' ...] [--table]

Every record keeps its run's model (shape, layers, parameters) and projection basis. The issue-17 grid
(`GRID`) is checked against what was built: a setting that no run built gets a `not run` record, or
`unfinished` with the seconds it had run when its call's budget cut it (`--unfinished`), so a gap is
visible in the file and the table, never silently absent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

GRID: tuple[tuple[str, str], ...] = (
    ("gptq", "w4a16"), ("gptq", "w8a16"), ("gptq", "w4a8"), ("awq", "w4a16"), ("awq", "w8a16"),
    ("fp8", "w8a8"), ("wanda", "s50"), ("wanda", "2of4"), ("sparsegpt", "s50"), ("sparsegpt", "2of4"),
    ("magnitude", "s50"), ("random", "s50"), ("reap", "r50"), ("reap-softmax", "r50"), ("frequency", "r50"),
    ("ean", "r50"), ("hcsmoe", "r50"), ("hcsmoe-shrink", "r50"),
)
GRID_LABEL = "2.8B"  # the run label whose records the grid is checked against


def load_run(spec: str) -> tuple[str, dict[str, Any]]:
    path, _, label = spec.partition(":")
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    return label or Path(path).stem, payload


def merged(runs: list[tuple[str, dict[str, Any]]], unfinished: list[str]) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    for label, payload in runs:
        for row in payload["records"]:
            records.append({**row, "run": label, "model": payload["model"], "projection": payload["projection"]})
    for spec in unfinished:
        label, method, setting, seconds, why = spec.split("/", 4)
        records.append({"run": label, "method": method, "setting": setting, "status": "unfinished",
                        "seconds_at_cut": float(seconds), "error": why})
    built = {(r["method"], r["setting"]) for r in records if r["run"] == GRID_LABEL and "method" in r}
    records += [{"run": GRID_LABEL, "method": m, "setting": s, "status": "not run"}
                for m, s in GRID if (m, s) not in built]
    return {"runs": [{"label": label, **{k: v for k, v in payload.items() if k != "records"}}
                     for label, payload in runs], "records": records}


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value / 1024:.1f}"


def _mark(value: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "–"}[value]


def table(payload: dict[str, Any]) -> str:
    """Markdown: one row per record, phases in build order, memory in GB, each target met or not."""
    lines = ["| run | method | setting | status | build s | load / oneshot or observer / save / verify / hash s "
             "| host peak GB | GPU peak GB (held at start) | ckpt GB | save GB/s | checks pass/fail/err/few "
             "| 30B projection s | ≤15 min | save ≥1 GB/s | RSS ≤1.2 ckpt+8 GB | GPU ≤1.3 model |",
             "|" + "---|" * 16]
    for row in payload["records"]:
        if row.get("status") != "built":
            seconds = f"> {row['seconds_at_cut']:.0f} (cut)" if "seconds_at_cut" in row else "–"
            lines.append(f"| {row['run']} | {row['method']} | {row['setting']} | {row['status']} | {seconds} |"
                         + " |" * 11)
            continue
        phases = row["phase_seconds"]
        middle = phases.get("oneshot", phases.get("observer", 0.0))
        breakdown = " / ".join(f"{phases.get(k, 0.0):.1f}" for k in ("load",)) + f" / {middle:.1f} / " + \
            " / ".join(f"{phases.get(k, 0.0):.1f}" for k in ("save", "verify", "hash"))
        checks, goals = row["checks"], row["targets"]
        lines.append(
            f"| {row['run']} | {row['method']} | {row['setting']} | built | {row['seconds']:.1f} | {breakdown} "
            f"| {_mb(row['peak_rss_mb'])} | {_mb(row['peak_gpu_mb'])} ({_mb(row.get('gpu_mb_at_start'))}) "
            f"| {row['checkpoint_bytes'] / 1e9:.2f} | {row['save_gb_per_s']:.2f} "
            f"| {checks['pass']}/{checks['fail']}/{checks['error_other']}/{checks['error_too_few_items']} "
            f"| {row['projection_30b_seconds']:.0f} | {_mark(goals['build_le_15min_30b'])} "
            f"| {_mark(goals['save_ge_1GBps'])} | {_mark(goals['host_rss_le_1.2ckpt_plus_8GB'])} "
            f"| {_mark(goals['gpu_peak_le_1.3model'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="compress_scale JSON files, each optionally :label")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--unfinished", action="append", default=[],
                        help="label/method/setting/seconds/why of a build its call's budget cut")
    parser.add_argument("--table", action="store_true", help="print the markdown table")
    args = parser.parse_args(argv)
    payload = merged([load_run(spec) for spec in args.runs], args.unfinished)
    args.out.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if args.table:
        print(table(payload), end="")
    missing = [r for r in payload["records"] if r["status"] != "built"]
    print(f"compress_results: {len(payload['records'])} records, {len(missing)} not built -> {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
