"""Batched SparseGPT against llmcompressor's per-module `sparsify_weight` on an accelerator, at expert shapes.

Prints (and writes as JSON) per structure: mask agreement, largest weight difference in bf16 steps, and the
time of both paths per expert, so the speed-up and the equivalence are measured where the suite runs them
(tests/test_sparsegpt_batched.py checks the same on the CPU). Usage:
`python -m benchmarks.perf.sparsegpt_check --device cuda --experts 16 --rows 768 --columns 2048 --out X.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def _inputs(experts: int, rows: int, columns: int, device: str) -> tuple[Any, Any]:
    import torch

    generator = torch.Generator(device="cpu").manual_seed(0)
    weights = (torch.randn(experts, rows, columns, generator=generator) * 0.02).to(torch.bfloat16)
    activations = torch.randn(experts, 4 * columns, columns, generator=generator)
    hessians = activations.transpose(1, 2) @ activations / activations.shape[1]
    return weights.to(device), hessians.to(device)


def _timed(function: Any, device: str) -> tuple[Any, float]:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def compare(experts: int, rows: int, columns: int, device: str, structure: str) -> dict[str, Any]:
    """One structure ("s50" or "2of4"): both paths on the same bf16 weights and float32 Hessians."""
    import torch
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight

    from compressors.sparsegpt_batched import sparsify_stack

    prune_n, prune_m = (2, 4) if structure == "2of4" else (0, 0)
    weights, hessians = _inputs(experts, rows, columns, device)
    modules = []
    for weight in weights:
        module = torch.nn.Linear(columns, rows, bias=False, device=device, dtype=torch.bfloat16)
        module.weight.data = weight.clone()
        modules.append(module)
    with torch.no_grad():
        reference, reference_s = _timed(lambda: torch.stack([sparsify_weight(
            module=m, hessians_dict={m: h.clone()}, sparsity=0.5, prune_n=prune_n, prune_m=prune_m,
            block_size=128, dampening_frac=0.01, preserve_sparsity_mask=False)[1] for m, h in zip(
                modules, hessians, strict=True)]), device)
        (_, batched), batched_s = _timed(lambda: sparsify_stack(weights, hessians.clone(), 0.5, prune_n, prune_m,
                                                                128, 0.01), device)
    reference32, batched32 = reference.float(), batched.float()
    step = torch.maximum(reference32.abs(), batched32.abs()).clamp_min(1e-30) * 2.0**-7  # one bf16 step
    kept_by_both = (reference != 0) & (batched != 0)  # a flipped entry is 128 steps (a weight against zero)
    return {"structure": structure, "experts": experts, "shape": [rows, columns], "device": device,
            "mask_agreement": float(((reference == 0) == (batched == 0)).float().mean()),
            "zeros_fraction": float((batched == 0).float().mean()),
            "max_diff_bf16_steps_kept": float(((reference32 - batched32).abs() / step)[kept_by_both].max()),
            "reference_s_per_expert": reference_s / experts, "batched_s_per_expert": batched_s / experts,
            "speedup": reference_s / batched_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--rows", type=int, default=768)
    parser.add_argument("--columns", type=int, default=2048)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    records = [compare(args.experts, args.rows, args.columns, args.device, s) for s in ("s50", "2of4")]
    for record in records:
        print(f"sparsegpt_check {record['structure']}: masks agree on {record['mask_agreement']:.6f}, "
              f"max diff where both keep {record['max_diff_bf16_steps_kept']:.2f} bf16 steps, "
              f"{record['reference_s_per_expert']:.3f} s "
              f"-> {record['batched_s_per_expert']:.4f} s per expert ({record['speedup']:.1f}x)")
    if args.out:
        args.out.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
