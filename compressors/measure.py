"""What a compressed checkpoint achieved, per routed-expert projection: bits, sparsity, 2:4 pattern, size.

Why measured instead of copied from the recipe: a recipe says what was asked; the audit gates on what the
checkpoint holds. So the weights are measured on the *verified plain-transformers reload* (what a user
gets), after linearizing its fused experts back into per-expert Linear layers (`runtime.expert_linears`, so
every architecture's fused layout is handled by llm-compressor's own mapping), and the storage cost is read
from the saved safetensors. Used by every expert-weight method (quantization and sparsity alike).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compressors.runtime import EXPERT_PATTERN, expert_linears

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

_EXPERT = re.compile(EXPERT_PATTERN)
# Stored bytes of a per-expert projection: the (packed) weight and its quantization parameters. The
# `weight_shape` metadata (two int64) is not weight storage.
_STORED = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_global_scale")
_ITEMSIZE = {"I64": 8, "F64": 8, "I32": 4, "F32": 4, "BF16": 2, "F16": 2, "I16": 2, "I8": 1, "U8": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}


def weight_stats(weight: torch.Tensor, group: int | None = None) -> dict[str, Any]:
    """Zeros, sparsity and 2:4 compliance of a [out, in] weight; with `group`, the most distinct values in
    any run of `group` input features (a b-bit grid allows at most 2**b: the achieved bit-width)."""
    zero = weight.detach() == 0
    stats: dict[str, Any] = {"numel": zero.numel(), "zeros": int(zero.sum()),
                             "sparsity": float(zero.double().mean()),
                             "reload_dtype": str(weight.dtype).removeprefix("torch."),
                             "reload_bits": weight.element_size() * 8}
    if weight.shape[-1] % 4 == 0:  # 2:4 runs along the input dimension, as llm-compressor's "2:4" masks
        stats["two_of_four"] = float((zero.reshape(-1, 4).sum(dim=1) >= 2).double().mean())
    if group:
        rows = weight.detach().reshape(-1, group).sort(dim=1).values
        stats["levels_max"] = int((1 + (rows[:, 1:] != rows[:, :-1]).sum(dim=1)).max())
    return stats


def measure_reloaded(model: PreTrainedModel, groups: dict[str, int | None]) -> dict[str, dict[str, Any]]:
    """`weight_stats` of every expert projection of a reloaded model; `groups[name]` is the run length for
    the distinct-value count (quantized tensors; None: not counted)."""
    return {name: weight_stats(module.weight, groups.get(name))
            for name, module in expert_linears(model).items()}


def stored_bits(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Per expert projection saved under its own (llm-compressor module) name — the compressed formats —:
    stored dtype and effective bits per weight on disk, quantization parameters included. Dense saves are
    written by transformers under the architecture's own key names (Mixtral `block_sparse_moe...w1`), so
    for them the caller takes the reloaded dtype, which `dtype="auto"` keeps exactly as stored."""
    from safetensors import safe_open

    # One index over every shard first: a module's weight and its scale can land in different shard files.
    shapes: dict[str, tuple[list[int], str]] = {}
    shape_of: dict[str, list[int]] = {}
    for file in sorted(Path(out_dir).glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[key] = (handle.get_slice(key).get_shape(), handle.get_slice(key).get_dtype())
                if key.endswith(".weight_shape"):
                    shape_of[key.removesuffix(".weight_shape")] = [int(d) for d in handle.get_tensor(key).tolist()]
    per_module: dict[str, int] = Counter()
    for key, (shape, dtype) in shapes.items():
        module, leaf = key.rsplit(".", 1)
        if _EXPERT.match(module) and leaf in _STORED:
            per_module[module] += _numel(shape) * _ITEMSIZE[dtype]
    stored: dict[str, dict[str, Any]] = {}
    for module, nbytes in per_module.items():
        packed = f"{module}.weight_packed" in shapes
        shape, dtype = shapes[f"{module}.weight_packed" if packed else f"{module}.weight"]
        numel = _numel(shape_of.get(module, shape))
        stored[module] = {"stored_dtype": dtype, "effective_bits": round(8 * nbytes / numel, 4)}
    return stored


def _numel(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= int(dim)
    return total


def summarize(tensors: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Counts and ranges over the per-tensor records (the manifest's one-glance view)."""

    def count(field: str) -> dict[str, int]:
        return dict(sorted(Counter(str(t.get(field)) for t in tensors.values()).items()))

    def spread(field: str) -> dict[str, float] | None:
        values = [float(t[field]) for t in tensors.values() if field in t]
        if not values:
            return None
        return {"min": min(values), "mean": round(sum(values) / len(values), 6), "max": max(values)}

    levels = [int(t["levels_max"]) for t in tensors.values() if "levels_max" in t]
    effective = spread("effective_bits")
    return {"expert_tensors": len(tensors), "bits": count("num_bits"), "group_size": count("group_size"),
            "mean_effective_bits": effective["mean"] if effective else None,
            "sparsity": spread("sparsity"), "two_of_four": spread("two_of_four"),
            "levels_max": max(levels) if levels else None}
