"""Where a 30B MoE's scoring and decoding time goes on one GPU: the measurements behind docs/performance.md.

    python -m benchmarks.perf.probe --shape qwen3-30b-a3b --out DIR [--sections decode,prefill,kernel,tokenize]

- decode: per-step time of `benchmarks.decode_steps`' dynamic cache, static cache and CUDA-graph modes at
  several batch sizes (greedy, random prompts of 40-120 tokens), and whether the modes give the same tokens;
- prefill: one packed forward of BBQ-like groups (context + 12 short continuations) through the decoder with
  the 4-D packing mask, at several `batch_tokens`; a torch.profiler table of the largest one;
- kernel: the experts' two grouped GEMMs alone against the whole experts forward at the same token count, in
  TFLOP/s, so the gap between transformers' experts path and the matmul kernel is a number;
- tokenize: batched request tokenization of local BBQ with the Rust tokenizer's thread pool off and on.
Prints one table per section and writes probe.json (and the profiler table) to OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Any, repeat: int = 3) -> float:
    """Median seconds of `repeat` calls after one warm-up call."""
    fn()
    _sync()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def kernels(model: Any, mode: str) -> None:
    """`+ours` in a mode name: benchmarks.fast_kernels' experts and attention; otherwise transformers'."""
    from benchmarks.perf.gpu_suite import use_kernels

    use_kernels(model, "ours" if mode.endswith("+ours") else "transformers")


def decode_section(model: Any, device: str, batches: list[int], new_tokens: int,
                   decode_modes: tuple[str, ...], out_dir: Path) -> list[dict[str, Any]]:
    import torch

    from benchmarks.decode_steps import USED, make_steps
    from benchmarks.fast_generation import decode_batch, left_pad

    rng = random.Random(0)
    rows: list[dict[str, Any]] = []
    modes = decode_modes if device.startswith("cuda") else ("dynamic", "static")
    for batch in batches:
        prompts = [[rng.randrange(1, 4096) for _ in range(rng.randrange(40, 121))] for _ in range(batch)]
        tokens: dict[str, Any] = {}
        for mode in modes:
            kernels(model, mode)
            before = USED["graph-fallback"]
            seconds: list[float] = []
            for _ in range(2):  # the first run of a shape pays kernel selection and allocator growth
                _sync()
                started = time.perf_counter()
                with torch.inference_mode():
                    out = decode_batch(model, prompts, max_new_tokens=new_tokens, stop_ids=frozenset([-1]),
                                       pad_id=0, device=device, mode=mode.removesuffix("+ours"))
                _sync()
                seconds.append(time.perf_counter() - started)
            tokens[mode] = [o.tokens.tolist() for o in out]
            generated = sum(len(t) for t in tokens[mode])
            rows.append({"batch": batch, "mode": mode, "seconds": seconds, "new_tokens": generated,
                         "tokens_per_s": generated / seconds[-1], "step_ms": 1000 * seconds[-1] / new_tokens,
                         "fallback": USED["graph-fallback"] > before})
        for row in rows[-len(modes):]:
            row["same_as_static"] = tokens[row["mode"]] == tokens.get("static")
            row["same_as_dynamic"] = tokens[row["mode"]] == tokens.get("dynamic")
            print(json.dumps(row), flush=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if device.startswith("cuda"):  # where a decode step's GPU time goes: the static step, eagerly, profiled
        kernels(model, decode_modes[-1])
        with torch.inference_mode():
            ids, mask, positions = left_pad(prompts, 0, device)
            steps = make_steps("static", model, ids, mask, positions, 8)
            chosen = steps.first().argmax(-1)
            chosen = steps.next(chosen).argmax(-1)
            _sync()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    chosen = steps.next(chosen).argmax(-1)
                _sync()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20)
        (out_dir / "decode_profile.txt").write_text(table)
        print(table, flush=True)
    return rows


def _bbq_like_pairs(count: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token pairs shaped like BBQ's: ~95-token contexts, 12 choices of 1-4 tokens."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        context = [rng.randrange(1, 4096) for _ in range(rng.randrange(70, 121))]
        pairs += [(context, [rng.randrange(1, 4096) for _ in range(rng.randrange(1, 5))]) for _ in range(12)]
    return pairs


def prefill_section(model: Any, device: str, batch_tokens: list[int], out: Path,
                    variants: tuple[str, ...]) -> list[dict[str, Any]]:
    import torch

    from benchmarks.packing import attention_mask, batch_rows, layout_batch, pack_rows, plan_groups

    decoder = model.model
    dtype = next(model.parameters()).dtype
    groups = plan_groups(_bbq_like_pairs(1500), 512)
    rows_all = pack_rows(groups, 512)
    results = []
    for budget in batch_tokens:
        batch = batch_rows(rows_all, budget)[1]  # a full batch (the first holds the longest rows)
        layout = layout_batch(batch, 0)
        ids = torch.tensor(layout.input_ids, device=device)
        positions = torch.tensor(layout.positions, device=device)
        mask = attention_mask(layout, dtype, device)

        def forward(ids: Any = ids, positions: Any = positions, mask: Any = mask) -> None:
            with torch.inference_mode():
                decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)

        def causal(ids: Any = ids) -> None:
            with torch.inference_mode():
                decoder(input_ids=ids, use_cache=False)

        for variant in variants:
            kernels(model, "+ours" if variant == "ours" else "")
            masked_s, causal_s = _timed(forward), _timed(causal)
            results.append({"batch_tokens": budget, "kernels": variant, "rows": len(batch), "width": layout.width,
                            "real_tokens": layout.real_tokens, "masked_s": masked_s, "causal_s": causal_s,
                            "real_tokens_per_s": layout.real_tokens / masked_s,
                            "slots_per_s_causal": len(batch) * layout.width / causal_s})
            print(json.dumps(results[-1]), flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        forward()
        _sync()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    (out / "prefill_profile.txt").write_text(table)
    print(table, flush=True)
    return results


def kernel_section(model: Any, tokens: list[int]) -> list[dict[str, Any]]:
    """Experts forward vs its two grouped GEMMs at the same routing (random router inputs of one layer)."""
    import torch
    from transformers.integrations.moe import _grouped_mm

    from benchmarks import fast_kernels

    model.set_experts_implementation("grouped_mm")
    block = model.model.layers[0].mlp
    experts = block.experts
    hidden = model.config.hidden_size
    inter = model.config.moe_intermediate_size
    top_k = model.config.num_experts_per_tok
    results = []
    for count in tokens:
        states = torch.randn(count, hidden, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            _, weights, index = block.gate(states)
            pairs = count * top_k
            expert_ids, perm = torch.sort(index.reshape(-1))
            per_expert = torch.histc(expert_ids.int(), bins=experts.num_experts, min=0, max=experts.num_experts - 1)
            offsets = torch.cumsum(per_expert, 0, dtype=torch.int32)
            gathered = states[perm // top_k]
            middle = torch.randn(pairs, inter, device="cuda", dtype=torch.bfloat16)

            def whole(states: Any = states, index: Any = index, weights: Any = weights) -> None:
                with torch.inference_mode():
                    experts(states, index, weights)

            def gemms(gathered: Any = gathered, middle: Any = middle, offsets: Any = offsets) -> None:
                with torch.inference_mode():
                    _grouped_mm(gathered, experts.gate_up_proj.transpose(-2, -1), offsets)
                    _grouped_mm(middle, experts.down_proj.transpose(-2, -1), offsets)

            whole_s, gemm_s = _timed(whole, 5), _timed(gemms, 5)
            reference = experts(states, index, weights)
            ours = fast_kernels.grouped_experts_forward(experts, states, index, weights)
            def ours_call(states: Any = states, index: Any = index, weights: Any = weights) -> None:
                with torch.inference_mode():
                    fast_kernels.grouped_experts_forward(experts, states, index, weights)

            ours_s = _timed(ours_call, 5)
        flops = 2 * pairs * hidden * 3 * inter
        results.append({"tokens": count, "pairs": pairs, "experts_forward_ms": 1000 * whole_s,
                        "ours_ms": 1000 * ours_s, "gemms_ms": 1000 * gemm_s,
                        "experts_tflops": flops / whole_s / 1e12, "ours_tflops": flops / ours_s / 1e12,
                        "gemm_tflops": flops / gemm_s / 1e12, "ours_bitwise_equal": bool(torch.equal(ours, reference))})
        print(json.dumps(results[-1]), flush=True)
    return results


def tokenize_section(data_dir: Path, out: Path) -> list[dict[str, Any]]:
    """BBQ's 211,536 requests through `encode_requests`, with its Rust thread pool and without (same ids)."""
    from benchmarks import fast_tokenization
    from benchmarks.fast_scoring import SharedContextLM
    from benchmarks.perf.tokenization import benchmark_requests
    from fixtures.zoo import materialize_zoo_model

    started = time.perf_counter()
    requests = [tuple(r.args) for r in benchmark_requests("bbq", data_dir, out / "work")]
    built = time.perf_counter() - started
    lm = SharedContextLM(pretrained=str(materialize_zoo_model("qwen3-moe-tiny", out / "cache")), dtype="float32",
                         device="cpu", batch_size=1)
    results: list[dict[str, Any]] = [{"requests": len(requests), "build_requests_s": built,
                                      "cores": os.cpu_count()}]
    ids = {}
    for threads in (False, True):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        started = time.perf_counter()
        ids[threads] = fast_tokenization.encode_requests(lm, requests, threads=threads)
        results.append({"rust_threads": threads, "seconds": time.perf_counter() - started})
        print(json.dumps(results[-1]), flush=True)
    results.append({"same_ids": ids[False] == ids[True]})
    print(json.dumps(results[0] | results[-1]), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen3-30b-a3b")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=Path(".perfdata"))
    parser.add_argument("--sections", default="decode,prefill,kernel,tokenize")
    parser.add_argument("--decode-batches", default="64,256,512")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--decode-modes", default="dynamic,static,graph,graph+ours",
                        help="decode_steps modes; '+ours' with benchmarks.fast_kernels")
    parser.add_argument("--prefill-kernels", default="transformers,ours")
    parser.add_argument("--batch-tokens", default="16384,32768,65536")
    parser.add_argument("--kernel-tokens", default="4096,32768")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    if "tokenize" in sections:  # CPU only: before the model takes the host's memory bandwidth
        report["tokenize"] = tokenize_section(args.data_dir, args.out)
    if set(sections) - {"tokenize"}:
        import torch

        from benchmarks.perf.random_model import build_random_model
        from fixtures.tokenizer import VOCAB_SIZE

        device = "cuda" if torch.cuda.is_available() else "cpu"
        report["gpu"] = torch.cuda.get_device_name() if device == "cuda" else "none"
        started = time.perf_counter()
        model = build_random_model(args.shape, device, "bfloat16" if device == "cuda" else "float32", VOCAB_SIZE)
        _sync()
        print(f"model built in {time.perf_counter() - started:.1f} s", flush=True)
        ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
        runs = {"kernel": lambda: kernel_section(model, ints(args.kernel_tokens)),
                "decode": lambda: decode_section(model, device, ints(args.decode_batches), args.new_tokens,
                                                 tuple(args.decode_modes.split(",")), args.out),
                "prefill": lambda: prefill_section(model, device, ints(args.batch_tokens), args.out,
                                                   tuple(args.prefill_kernels.split(",")))}
        for name, run in runs.items():
            if name in sections:
                try:  # one failing section keeps the others' numbers
                    report[name] = run()
                except Exception as exc:
                    report[name] = {"error": f"{type(exc).__name__}: {exc}"}
                    print(f"{name} failed: {report[name]['error']}", flush=True)
                (args.out / "probe.json").write_text(json.dumps(report, indent=1))
    (args.out / "probe.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
