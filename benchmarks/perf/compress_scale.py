"""Compression cost at scale, as a GPU user runs it: `pytest audits` over a grid, then one record per checkpoint.

    python -m benchmarks.perf.compress_scale --model DIR --out FILE.json [--budget-s S] [--full-layers 48] \
        -- <pytest audits options: --methods ... --schemes ... --device cuda ...>

Why through pytest and not a loop over `compress`: the suite's main use is a CI job that compresses and gates
in one `pytest audits` run, so the numbers are the ones that job sees (cache, calibration mix, evaluation,
gate). Each build's phases and memory come from its cache manifest (`compressors.resources.ResourceMeter`
measures the build's own peak host RSS and CUDA peak inside the shared process); each check's verdict from
`benchmarks.perf.outcome_log`, which survives a run cut short by `--budget-s`. Records that never started are
`not run`; a build that raised is `failed` with its error. The 30B projection multiplies measured seconds by
`--full-layers / layers` for a model of the 30B's layer shape with fewer layers, else by 30.53B / the model's
parameters (the 30B's count over this model's: a linear estimate, labelled as such in each record).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.perf.outcome_log import ENV as OUTCOME_ENV

QWEN3_30B_PARAMETERS = 30.53e9
TOO_FEW_ITEMS = "fewer than min_items"
# Targets at the 30B projection on one H200 (issue 17).
BUILD_SECONDS_TARGET = 15 * 60
SAVE_BYTES_PER_SECOND_TARGET = 1e9
GPU_PEAK_OVER_MODEL = 1.3
RSS_OVER_CHECKPOINT, RSS_SLACK_MB = 1.2, 8 * 1024


def model_facts(model_dir: Path) -> dict[str, Any]:
    """Layers, parameter count (from the safetensors headers) and bytes of a local HF model."""
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    params = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shape = handle.get_slice(key).get_shape()
                count = 1
                for size in shape:
                    count *= int(size)
                params += count
    return {"layers": int(config["num_hidden_layers"]), "parameters": params,
            "bytes": sum(p.stat().st_size for p in model_dir.glob("*.safetensors")),
            "hidden_size": config.get("hidden_size"), "num_experts": config.get("num_experts")}


def projection(facts: dict[str, Any], full_layers: int | None) -> dict[str, Any]:
    if full_layers:
        return {"factor": full_layers / facts["layers"],
                "basis": f"x {full_layers}/{facts['layers']} layers of the 30B's own layer shape (projection)"}
    return {"factor": QWEN3_30B_PARAMETERS / facts["parameters"],
            "basis": f"x {QWEN3_30B_PARAMETERS / 1e9:.2f}B / {facts['parameters'] / 1e9:.2f}B parameters "
                     "(linear projection)"}


def read_outcomes(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def checks_by_checkpoint(outcomes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for line in outcomes:
        entry = found.setdefault(str(line["checkpoint"]), {"counts": Counter(), "errors": []})
        verdict = line["verdict"]
        if verdict == "error":
            verdict = "error_too_few_items" if TOO_FEW_ITEMS in str(line["error"]) else "error_other"
            if verdict == "error_other":
                entry["errors"].append(str(line["error"]))
        entry["counts"][verdict] += 1
    return found


def build_records(cache_dir: Path) -> dict[str, dict[str, Any]]:
    """Checkpoint id -> its manifest's compression facts, for every published checkpoint in the cache."""
    records = {}
    for manifest_path in sorted((cache_dir / "checkpoints").glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        records[manifest["checkpoint"]["id"]] = manifest
    return records


def record(checkpoint_id: str, manifest: dict[str, Any] | None, checks: dict[str, Any] | None,
           facts: dict[str, Any], scale: dict[str, Any], dtype: str) -> dict[str, Any]:
    counts = dict(checks["counts"]) if checks else {}
    errors = checks["errors"] if checks else []
    out: dict[str, Any] = {"checkpoint": checkpoint_id, "checks": {
        "pass": counts.get("pass", 0), "fail": counts.get("fail", 0),
        "error_other": counts.get("error_other", 0), "error_too_few_items": counts.get("error_too_few_items", 0)}}
    if manifest is None:
        out.update({"status": "failed" if errors else "not run", "error": errors[0] if errors else None})
        return out
    details = manifest["compression"]
    method = details["method"]
    setting = method.get("scheme") or f"r{round(method['ratio'] * 100):g}"
    seconds, phases = float(details["seconds"]), dict(details["phase_seconds"])
    checkpoint_bytes = int(details["size_bytes"])
    out.update({
        "method": method["method"], "setting": setting, "device": details.get("device"), "dtype": dtype,
        "status": "built", "seconds": seconds, "phase_seconds": phases,
        "peak_rss_mb": details.get("build_peak_rss_mb"), "peak_gpu_mb": details.get("peak_gpu_mb"),
        "gpu_mb_at_start": details.get("gpu_mb_at_start"),
        "checkpoint_bytes": checkpoint_bytes, "model_bytes": facts["bytes"],
        "save_gb_per_s": round(checkpoint_bytes / phases["save"] / 1e9, 3) if phases.get("save") else None,
        "reload_max_abs_logit_diff": details["verification"]["max_abs_logit_diff"],
        "reload_worst_ratio": details["verification"].get("worst_ratio"),
        "projection_30b_seconds": round(seconds * scale["factor"], 1), "projection_basis": scale["basis"],
        # the cache's file inventory (sha256 of every file, issue 23), after the build's own phases
        "inventory_seconds": manifest.get("cache", {}).get("inventory_seconds"),
    })
    out["targets"] = targets(out)
    if errors:
        out["errors"] = errors[:3]
    return out


def targets(row: dict[str, Any]) -> dict[str, bool | None]:
    """Each issue-17 target met (True), missed (False) or not measurable here (None)."""
    rss, gpu = row.get("peak_rss_mb"), row.get("peak_gpu_mb")
    return {
        "build_le_15min_30b": row["projection_30b_seconds"] <= BUILD_SECONDS_TARGET,
        "save_ge_1GBps": None if row["save_gb_per_s"] is None else row["save_gb_per_s"] * 1e9
        >= SAVE_BYTES_PER_SECOND_TARGET,
        "host_rss_le_1.2ckpt_plus_8GB": None if rss is None
        else rss <= RSS_OVER_CHECKPOINT * row["checkpoint_bytes"] / 2**20 + RSS_SLACK_MB,
        "gpu_peak_le_1.3model": None if gpu is None else gpu <= GPU_PEAK_OVER_MODEL * row["model_bytes"] / 2**20,
    }


class DiskPeak:
    """The cache directory's largest size during the run, sampled every `every_s` seconds by a thread (a
    checkpoint stays whole on disk for its save, reload check and evaluation: many samples long)."""

    def __init__(self, root: Path, every_s: float = 1.0) -> None:
        self.root, self.every_s, self.peak_bytes = root, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _size(self) -> int:
        from fixtures.cache import ArtifactCache

        try:
            return sum(usage.bytes for usage in ArtifactCache(self.root).usage())
        except OSError:  # an entry renamed while walking: the next sample counts it
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak_bytes = max(self.peak_bytes, self._size())

    def __enter__(self) -> DiskPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._size())


def disk_record(peak_cache_bytes: int, rows: list[dict[str, Any]], facts: dict[str, Any]) -> dict[str, Any]:
    """Peak disk of the run (dense model + the cache's peak) against dense + 2 checkpoints (issue 17 item 5)."""
    largest = max((int(row["checkpoint_bytes"]) for row in rows if row.get("checkpoint_bytes")), default=0)
    bound = facts["bytes"] + 2 * largest
    return {"peak_cache_bytes": peak_cache_bytes, "dense_model_bytes": facts["bytes"],
            "largest_checkpoint_bytes": largest, "peak_disk_bytes": facts["bytes"] + peak_cache_bytes,
            "bound_dense_plus_2_checkpoints": bound,
            "within_bound": facts["bytes"] + peak_cache_bytes <= bound if largest else None}


def run_pytest(pytest_args: list[str], model_dir: Path, cache_dir: Path, report_dir: Path, outcomes: Path,
               budget_s: float | None) -> tuple[int | None, float]:
    command = [sys.executable, "-m", "pytest", "audits", "-p", "no:cacheprovider", "-p", "benchmarks.perf.outcome_log",
               "--model", str(model_dir), "--cache-dir", str(cache_dir), "--report-dir", str(report_dir), "-q",
               *pytest_args]
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env={**os.environ, OUTCOME_ENV: str(outcomes)}, timeout=budget_s, check=False)
        status: int | None = done.returncode
    except subprocess.TimeoutExpired:
        status = None
        print(f"compress_scale: pytest stopped at the {budget_s:.0f} s budget", flush=True)
    return status, round(time.perf_counter() - started, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the records JSON ({'records': [...]})")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/compress-scale-cache"))
    parser.add_argument("--report-dir", type=Path, default=Path("/tmp/compress-scale-report"))
    parser.add_argument("--budget-s", type=float, help="stop pytest after this many seconds (records so far)")
    parser.add_argument("--full-layers", type=int, help="layers of the full model this one is a cut of")
    parser.add_argument("--dtype", default="bfloat16", help="the audit's --dtype (recorded)")
    parser.add_argument("--machine", default="unknown")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    pytest_args = [a for a in args.pytest_args if a != "--"]
    outcomes = args.out.with_suffix(".outcomes.jsonl")
    outcomes.unlink(missing_ok=True)
    with DiskPeak(args.cache_dir) as disk:
        status, wall = run_pytest(pytest_args, args.model, args.cache_dir, args.report_dir, outcomes,
                                  args.budget_s)
    facts = model_facts(args.model)
    scale = projection(facts, args.full_layers)
    checks = checks_by_checkpoint(read_outcomes(outcomes))
    built = build_records(args.cache_dir)
    ids = sorted(set(built) | set(checks) - {"dense", "None"})
    rows = [record(i, built.get(i), checks.get(i), facts, scale, args.dtype) for i in ids]
    payload = {"machine": args.machine, "model": facts, "pytest_args": pytest_args, "pytest_exit": status,
               "wall_seconds": wall, "projection": scale, "records": rows,
               "disk": disk_record(disk.peak_bytes, rows, facts)}
    args.out.write_text(json.dumps(payload, indent=2, sort_keys=True), encoding="utf-8")
    states = Counter(row["status"] for row in rows)
    print(f"compress_scale: {len(rows)} checkpoints ({dict(states)}), pytest exit {status}, {wall} s -> {args.out}")
    return 0 if rows and set(states) == {"built"} else 1


if __name__ == "__main__":
    sys.exit(main())
