"""Structural edits of transformers-5 fused MoE blocks, shared by every expert-compression method.

Why one routine: pruning (REAP, frequency, EAN) and merging (HC-SMoE) differ only in *which* new expert is
built from which old ones, so both are a `remap` of the expert axis (expert-compression.md §1): each new
expert is a list of (old index, weight) terms. A single term of weight 1 is a copy (bit-exact, no
arithmetic); several terms are a weighted sum in float64, cast back to the tensor's dtype. The same map is
applied to every per-expert tensor of the block (`architectures.blocks.MoEBlock.per_expert_tensors`: the
fused experts in any layout and their biases, the router rows and bias, the selection-correction biases) and
every integer expert-count attribute, so a block can never be left half edited. Shared experts,
`top_k` and everything outside `experts`/router are never touched.

The edited model stays in transformers' native fused layout, so `save_pretrained` writes the per-expert keys
each architecture reloads (Mixtral's `block_sparse_moe.experts.N.w1/w2/w3` included): no llmcompressor
linearize/repack round trip. `save_verified` reloads the checkpoint with plain transformers and compares
logits with the in-memory model (compressors.verify).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from architectures.blocks import MoEBlock
from compressors.runtime import Stopwatch, save_checkpoint, set_expert_count
from compressors.verify import reference, verify_checkpoint
from fixtures.errors import CompressionError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# One new expert = [(old index, weight), ...]; a map lists the new experts in order.
Terms = Sequence[tuple[int, float]]
ExpertMap = Sequence[Terms]

COUNT_ATTRS = ("num_experts", "n_experts", "n_routed_experts", "num_local_experts")


def copies(indices: Sequence[int]) -> list[list[tuple[int, float]]]:
    """The map that keeps `indices` unchanged, in that order (pruning)."""
    return [[(int(i), 1.0)] for i in indices]


def _remap(tensor: torch.Tensor, dim: int, mapping: ExpertMap) -> torch.Tensor:
    import torch

    parts = []
    for terms in mapping:
        if len(terms) == 1 and terms[0][1] == 1.0:
            parts.append(tensor.select(dim, terms[0][0]))  # a copy: bit-exact
        else:
            merged = sum((weight * tensor.select(dim, index).double() for index, weight in terms),
                         torch.zeros_like(tensor.select(dim, 0), dtype=torch.float64))
            parts.append(merged.to(tensor.dtype))
    return torch.stack(parts, dim=dim).contiguous()


def _replace(owner: Any, attr: str, value: torch.Tensor) -> None:
    """Swap a parameter or buffer for a new tensor, keeping its kind (and requires_grad)."""
    import torch

    old = getattr(owner, attr)
    if isinstance(old, torch.nn.Parameter):
        setattr(owner, attr, torch.nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(owner, attr, value)


def _check_map(mapping: ExpertMap, num_experts: int, what: str) -> None:
    if not mapping or any(not terms or any(not 0 <= i < num_experts for i, _ in terms) for terms in mapping):
        raise CompressionError(f"{what}: every new expert needs terms with indices in [0, {num_experts})")


def remap_block(block: MoEBlock, experts: ExpertMap, router: ExpertMap | None) -> None:
    """Rebuild the block's experts by `experts` and its router rows by `router` (None: router unchanged,
    which requires as many new experts as before). Updates every expert-count attribute."""
    old = block.num_experts
    _check_map(experts, old, f"{block.name} experts")
    if router is None:
        if len(experts) != old:
            raise CompressionError(f"{block.name}: {len(experts)} experts but the router keeps {old} rows")
    else:
        _check_map(router, old, f"{block.name} router")
        if len(router) != len(experts):
            raise CompressionError(f"{block.name}: {len(router)} router rows for {len(experts)} experts")
    for owner, attr, dim in block.per_expert_tensors():
        mapping = experts if owner is block.experts else router
        if mapping is not None:
            _replace(owner, attr, _remap(getattr(owner, attr).detach(), dim, mapping))
    for owner in (block.module, block.router, block.experts):
        for attr in COUNT_ATTRS:
            if isinstance(getattr(owner, attr, None), int) and not isinstance(getattr(owner, attr), bool):
                setattr(owner, attr, len(experts))


def prune_block(block: MoEBlock, keep: Sequence[int]) -> None:
    """Keep the experts `keep` (distinct, ascending; renumbered 0..len-1) and their router rows."""
    keep = [int(i) for i in keep]
    if keep != sorted(set(keep)):
        raise CompressionError(f"{block.name}: kept experts must be distinct and ascending, got {keep}")
    remap_block(block, copies(keep), copies(keep))


def save_verified(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, *,
                  num_experts: int, seed: int, watch: Stopwatch | None = None) -> tuple[dict[str, Any], list[str]]:
    """Write the new expert count to the config, save, reload with plain transformers and compare logits.

    Returns (verification record, config keys written); CompressionError on any discrepancy. With `watch`,
    the reference forward, the save and the reload check are timed as phases of their own."""
    watch = watch or Stopwatch()
    count_keys = set_expert_count(model, num_experts)
    with watch.phase("reference"):
        ref = reference(model, seed=seed)
    with watch.phase("save"):
        save_checkpoint(model, tokenizer, out_dir, compressed=False)
    with watch.phase("verify"):
        return verify_checkpoint(out_dir, ref, expected_num_experts=num_experts), count_keys
