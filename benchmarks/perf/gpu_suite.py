"""End-to-end timing of one checkpoint's audit: our path against lm-eval's HF backend on the same items.

    python -m benchmarks.perf.gpu_suite --shape qwen3-30b-a3b --device cuda --data-dir DATA --out DIR

Runs, on one random-weight model of the chosen shape (benchmarks.perf.random_model):
1. ours, full data: each of the five benchmarks (BBQ 12-choice, CrowS, StereoSet, XSTest, AdvBench) through
   `run_benchmarks` with the `moe-fbs-shared` model, then the drift protocol for one checkpoint (generate
   every prompt at T = 0 and 0.7 with top-20 log-probs, score the generations teacher-forced);
2. ours and lm-eval's HF backend (`hf`, same in-memory model, batch size 32, fp32 log-softmax) on the same
   `--subset` items per benchmark, and the reference drift engine against the fast one on the same prompts:
   the ratio is measured there, never extrapolated.
Tokens are counted twice: `forwarded` (what our path actually ran) and `request` (context + continuation
of every request, what lm-eval forwards). Prints a table; writes everything to OUT/gpu_suite.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

LIKELIHOOD = ("bbq", "crows_pairs", "stereoset")
GENERATIVE = ("xstest", "advbench")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(lm: Any, device: str) -> Any:
    """Accumulate the wall time spent inside the model's request methods (`lm.model_seconds`): the rest of a
    benchmark's wall time is lm-eval's and ours data preparation and metrics, equal for both paths."""
    lm.model_seconds = 0.0
    for name in ("loglikelihood", "generate_until"):
        method = getattr(lm, name)

        def wrapper(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
            _sync(device)
            started = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                _sync(device)
                lm.model_seconds += time.perf_counter() - started

        setattr(lm, name, wrapper)
    return lm


def run_suite(lm: Any, names: tuple[str, ...], source: Any, limit: int | None, args: argparse.Namespace,
              scorer: str, rows: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Each benchmark in its own `run_benchmarks` call: wall time, metrics and our model's work counters.
    `rows` (filled as benchmarks finish) lets a run cut short keep what it measured."""
    from benchmarks.lmeval_runner import run_benchmarks

    rows = {} if rows is None else rows
    use_kernels(lm.model, "ours" if scorer == "shared" else "transformers")
    for name in names:
        before = dict(lm.stats.to_json()) if hasattr(lm, "stats") else {}
        model_before = lm.model_seconds
        _sync(args.device)
        started = time.perf_counter()
        result = run_benchmarks([name], Path(f"random:{args.shape}"), source, limit=limit, seed=1234,
                                device=args.device, batch_size=args.baseline_batch_size, max_length=4096,
                                max_gen_toks=args.max_gen_toks, work_dir=Path(args.out) / "work",
                                scorer=scorer, lm=lm)[name]
        _sync(args.device)
        seconds = time.perf_counter() - started
        after = lm.stats.to_json() if hasattr(lm, "stats") else {}
        work = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], int | float)}
        rows[name] = {"seconds": seconds, "items": result.n_items, "metrics": dict(result.metrics),
                      "preds": [i.pred for i in result.items], "texts": [i.generation for i in result.items],
                      "work": work, "model_seconds": lm.model_seconds - model_before}
        print(f"[{scorer}] {name}: {result.n_items} items, {seconds:.1f} s", flush=True)
        if scorer == "shared" and limit == args.full_limit:
            (Path(args.out) / "partial_full.json").write_text(json.dumps(rows, default=str))
    return rows


def use_kernels(model: Any, which: str) -> None:
    """One in-memory model serves both paths: ours runs `benchmarks.fast_kernels`, lm-eval's HF backend (and the
    reference drift engine) transformers' defaults for this model."""
    from benchmarks import fast_kernels

    if which == "ours":
        fast_kernels.install(model)
    else:
        fast_kernels.uninstall(model)


def run_drift_once(model: Any, tokenizer: Any, source: Any, args: argparse.Namespace, engine: str,
                   prompts_per_benchmark: int, batch_size: int) -> dict[str, Any]:
    """One checkpoint's drift work: its generations (both temperatures) and their teacher-forced scores."""
    from benchmarks.drift import score_continuations
    from benchmarks.drift_prompts import build_drift_prompts
    from benchmarks.generation import GenerationSettings, encode_chat, generate

    prompts = build_drift_prompts(source, per_benchmark=prompts_per_benchmark, seed=42)
    ids = encode_chat(tokenizer, [p.messages() for p in prompts])
    settings = GenerationSettings(max_new_tokens=args.drift_tokens, batch_size=batch_size, dtype=args.dtype)
    use_kernels(model, "ours" if engine == "fast" else "transformers")
    _sync(args.device)
    started = time.perf_counter()
    gens = generate(model, tokenizer, ids, [p.prompt_id for p in prompts], settings, args.device, engine=engine)
    _sync(args.device)
    generated = time.perf_counter()
    score_continuations(model, [(g.prompt_ids, g.token_ids.tolist()) for g in gens], pad_id=0,
                        batch_size=args.score_batch_size, device=args.device)
    _sync(args.device)
    done = time.perf_counter()
    new_tokens = sum(g.n_tokens for g in gens)
    return {"engine": engine, "prompts": len(prompts), "generations": len(gens), "new_tokens": new_tokens,
            "generate_seconds": generated - started, "score_seconds": done - generated,
            "seconds": done - started, "tokens": [g.token_ids.tolist() for g in gens]}


def _lm(kind: str, model: Any, tokenizer: Any, args: argparse.Namespace) -> Any:
    common = {"pretrained": model, "tokenizer": tokenizer, "batch_size": args.baseline_batch_size,
              "softmax_dtype": "float32", "max_length": 4096, "enable_thinking": False}
    if kind == "hf":
        from lm_eval.models.huggingface import HFLM

        return timed(HFLM(**common), args.device)
    from benchmarks.fast_scoring import SharedContextLM

    return timed(SharedContextLM(pack_tokens=args.pack_tokens, batch_tokens=args.batch_tokens,
                                 gen_batch_size=args.gen_batch_size, **common), args.device)


def _agreement(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """How far ours and lm-eval's agree on the subset (bf16 on a GPU: batch shapes move near-ties)."""
    same_preds = sum(x == y for x, y in zip(a["preds"], b["preds"], strict=True)) / max(1, len(a["preds"]))
    same_texts = sum(x == y for x, y in zip(a["texts"], b["texts"], strict=True)) / max(1, len(a["texts"]))
    deltas = {m: a["metrics"][m] - b["metrics"].get(m, float("nan")) for m in a["metrics"]}
    return {"same_pred_share": same_preds, "same_text_share": same_texts, "metric_deltas": deltas}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen3-30b-a3b", choices=("qwen3-30b-a3b", "tiny"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--full-limit", type=int, default=None, help="items per benchmark of the full run (all)")
    parser.add_argument("--subset", type=int, default=200, help="items per benchmark where both paths run")
    parser.add_argument("--gen-subset", type=int, default=32, help="XSTest/AdvBench items where both run")
    parser.add_argument("--drift-prompts", type=int, default=20)
    parser.add_argument("--drift-subset", type=int, default=4, help="prompts per benchmark, reference engine")
    parser.add_argument("--drift-tokens", type=int, default=100)
    parser.add_argument("--max-gen-toks", type=int, default=100)
    parser.add_argument("--pack-tokens", type=int, default=512)
    parser.add_argument("--batch-tokens", type=int, default=None)
    parser.add_argument("--gen-batch-size", type=int, default=None)
    parser.add_argument("--drift-batch-size", type=int, default=256)
    parser.add_argument("--score-batch-size", type=int, default=32)
    parser.add_argument("--baseline-batch-size", type=int, default=32)
    parser.add_argument("--skip", default="", help="comma list of phases to skip: full, baseline, drift")
    parser.add_argument("--order", default="full,drift,baseline", help="phase order (a run cut short keeps "
                        "the phases done: gpu_suite.json is written after each)")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    import torch

    from benchmarks.perf.random_model import build_random_model, parameter_count
    from fixtures.data import DataSource
    from fixtures.tokenizer import VOCAB_SIZE, load_zoo_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"args": vars(args), "torch": torch.__version__}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    started = time.perf_counter()
    model = build_random_model(args.shape, args.device, args.dtype, VOCAB_SIZE)
    _sync(args.device)
    report["build_seconds"] = time.perf_counter() - started
    report["parameters"] = parameter_count(model)
    print(f"model {args.shape}: {report['parameters'] / 1e9:.2f}B params, built in {report['build_seconds']:.1f} s",
          flush=True)
    tokenizer = load_zoo_tokenizer()
    source = DataSource(Path(args.data_dir))
    ours = _lm("shared", model, tokenizer, args)

    def save() -> None:
        (out / "gpu_suite.json").write_text(json.dumps(report, indent=1, default=str))

    def baseline() -> None:
        sub: dict[str, dict[str, Any]] = {"shared": {}, "hf": {}}
        for kind in ("shared", "hf"):
            lm = ours if kind == "shared" else _lm("hf", model, tokenizer, args)
            sub[kind].update(run_suite(lm, LIKELIHOOD, source, args.subset, args, kind))
            sub[kind].update(run_suite(lm, GENERATIVE, source, args.gen_subset, args, kind))
            save()
        report["subset"] = sub
        report["subset_agreement"] = {n: _agreement(sub["shared"][n], sub["hf"][n]) for n in sub["hf"]}
        fast = run_drift_once(model, tokenizer, source, args, "fast", args.drift_subset, args.drift_batch_size)
        ref = run_drift_once(model, tokenizer, source, args, "reference", args.drift_subset, 64)
        report["drift_subset"] = {"fast": fast, "reference": ref,
                                  "same_tokens": fast.pop("tokens") == ref.pop("tokens")}

    phases = {
        "full": lambda: run_suite(ours, LIKELIHOOD + GENERATIVE, source, args.full_limit, args, "shared",
                                  report.setdefault("full", {})),
        "drift": lambda: report.update(drift_full=run_drift_once(model, tokenizer, source, args, "fast",
                                                                 args.drift_prompts, args.drift_batch_size)),
        "baseline": baseline,
    }
    for phase in args.order.split(","):
        if phase not in skip:
            phases[phase]()
            save()
    if "drift_full" in report:
        report["drift_full"].pop("tokens", None)
    save()
    from benchmarks.perf.summary import summarize

    print(summarize(report))
    (out / "summary.md").write_text(summarize(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
