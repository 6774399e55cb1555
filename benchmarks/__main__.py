"""`python -m benchmarks`: evaluate one model on benchmarks outside pytest, print metrics and wall times.

Why: full-data runs (all 17,628 local BBQ items, 520 AdvBench generations...) are too slow for the test suite
but are how a benchmark's cost and baseline numbers are measured. `--separately` runs each benchmark in its
own `run_benchmarks` call so every benchmark gets its own wall time (benchmarks evaluated together share one
lm-eval call and one time). The process CPU time is printed too: on a shared box it is the steadier number
(with OMP_NUM_THREADS=1 it is close to the wall time of an idle machine).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python -m benchmarks \\
        --model qwen3-moe-tiny --data-dir ../shared/data --separately --out full.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks import available, get_spec, run_benchmarks
from benchmarks.records import BenchmarkResult
from benchmarks.refusal_spec import DEFAULT_MAX_GEN_TOKS


def _model_dir(model: str, cache_dir: Path) -> Path:
    from fixtures.zoo import materialize_zoo_model, zoo_names

    return materialize_zoo_model(model, cache_dir) if model in zoo_names() else Path(model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3-moe-tiny", help="zoo name or local HF directory")
    parser.add_argument("--benchmarks", default="bbq,crows_pairs,stereoset,xstest,advbench",
                        help=f"comma-separated, from {', '.join(available())}")
    parser.add_argument("--data-dir", default=None, help="data mirror (default: $MOE_FBS_DATA_DIR, else hub)")
    parser.add_argument("--limit", type=int, default=None, help="items per benchmark (default: all)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-gen-toks", type=int, default=DEFAULT_MAX_GEN_TOKS)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/moe-fbs-audit"))
    parser.add_argument("--separately", action="store_true", help="one run_benchmarks call per benchmark")
    parser.add_argument("--out", type=Path, default=None, help="write every result (with items) as JSON")
    args = parser.parse_args(argv)

    from fixtures.data import DataSource

    names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    for name in names:
        get_spec(name)  # unknown names fail before the model is built
    source = DataSource.from_setting(args.data_dir)
    model_dir = _model_dir(args.model, args.cache_dir)
    runs = [[n] for n in names] if args.separately else [names]
    results: dict[str, BenchmarkResult] = {}
    walls: dict[str, float] = {}
    cpus: dict[str, float] = {}
    for run in runs:
        started, cpu_started = time.perf_counter(), time.process_time()
        results.update(run_benchmarks(
            run, model_dir, source, limit=args.limit, seed=args.seed, device=args.device,
            batch_size=args.batch_size, work_dir=args.cache_dir / "bench-cli", max_gen_toks=args.max_gen_toks,
        ))
        walls.update(dict.fromkeys(run, time.perf_counter() - started))
        cpus.update(dict.fromkeys(run, time.process_time() - cpu_started))
    for name in names:
        result = results[name]
        print(f"{name}: {result.n_items} items, lm-eval {result.seconds:.1f} s, "
              f"run_benchmarks {walls[name]:.1f} s wall / {cpus[name]:.1f} s cpu")
        for metric in get_spec(name).headline_metrics:
            print(f"  {metric} = {result.metrics[metric]:.4f}")
    if args.out is not None:
        payload = {"model": args.model, "walls": walls, "cpu_seconds": cpus,
                   "results": {n: r.to_json() for n, r in results.items()}}
        args.out.write_text(json.dumps(payload, allow_nan=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
