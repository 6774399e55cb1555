"""SparseGPT over a stack of same-shaped experts at once: llmcompressor's `sparsify_weight`, batched.

Why: measured on an H200 (2.81B random-weight Qwen3-MoE, bf16; docs/performance.md), SparseGPT s50 did not
finish in 540 s, 400 s of it the Python column loop of `sparsify_weight`: it runs once per column of every
expert projection (~7.5M columns for 24 layers x 64 experts x 3 projections), each step a handful of tiny
kernels plus a host sync (`q[mask] = 0` is boolean indexing). An MoE layer's experts all have the same shapes,
so stacking them turns the loop into one pass per column for the whole layer: the same arithmetic as
`llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify.sparsify_weight` (Frantar & Alistarh 2023, §3.4:
per 128-column block, mask by w^2 / Hinv_ii^2, then the OBS update), on [B, rows, columns] instead of
[rows, columns]. Equal to the reference per expert (tests/test_sparsegpt_batched.py; on CPU bit for bit).

Only what the suite runs on an accelerator is batched: `torch.nn.Linear`, `preserve_sparsity_mask=False`, on
a non-CPU device. Everything else, the CPU included, takes llmcompressor's own per-module path unchanged: the
batched matmuls reassociate float32 sums (<= 9e-7 relative), and the CPU path stays bit for bit the
reference (issue 17, item 6), like the calibration batch size (`llmc_patches.calibration_batch_size`).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

STACK_BYTES = 2 << 30  # most float32 Hessian bytes stacked at once (2 GiB: 128 experts of 2,048 columns)


def inverse_hessian_factors(hessians: torch.Tensor, dampening_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factors of the damped inverse Hessians [B, C, C] (consumes `hessians`), and the dead
    columns [B, C] (zero Hessian diagonal: no calibration input reached them). A Hessian whose inversion fails
    gets the identity, as the reference does, with the same warning."""
    import torch
    from loguru import logger

    diagonal = hessians.diagonal(dim1=-2, dim2=-1)
    dead = diagonal == 0
    diagonal.masked_fill_(dead, 1)
    diagonal.add_(dampening_frac * diagonal.mean(dim=-1, keepdim=True))
    lower, info = torch.linalg.cholesky_ex(hessians)
    factors, info_upper = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    failed = (info != 0) | (info_upper != 0)
    if bool(failed.any()):
        logger.warning(f"Failed to invert {int(failed.sum())} of {len(failed)} Hessians (numerical instability); "
                       "those experts are pruned with the identity. Consider a larger dampening_frac or more "
                       "calibration samples")
    identity = torch.eye(hessians.shape[-1], dtype=hessians.dtype, device=hessians.device)
    return torch.where(failed[:, None, None], identity, factors), dead


def sparsify_stack(weights: torch.Tensor, hessians: torch.Tensor, sparsity: float, prune_n: int, prune_m: int,
                   block_size: int, dampening_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses [B], sparsified weights [B, R, C] in the input dtype) for weights [B, R, C] and their
    accumulated Hessians [B, C, C] (consumed). `prune_n == 0`: unstructured at `sparsity` per block;
    otherwise N:M (`prune_n` zeros in every `prune_m` consecutive inputs)."""
    import torch

    work = weights.to(torch.float32).clone()
    hinv, dead = inverse_hessian_factors(hessians.to(torch.float32), dampening_frac)
    work.masked_fill_(dead[:, None, :], 0)
    count_b, rows, columns = work.shape
    losses = torch.zeros(count_b, rows, dtype=torch.float32, device=work.device)
    for start in range(0, columns, block_size):
        stop = min(start + block_size, columns)
        block, err, block_losses = _sparsify_block(work[:, :, start:stop].clone(), hinv[:, start:stop, start:stop],
                                                   sparsity, prune_n, prune_m)
        work[:, :, start:stop] = block
        losses += block_losses.sum(dim=2) / 2
        work[:, :, stop:] -= err.matmul(hinv[:, start:stop, stop:])
    return losses.sum(dim=1), work.to(weights.dtype)


def _sparsify_block(block: torch.Tensor, hinv: torch.Tensor, sparsity: float, prune_n: int,
                    prune_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of columns [B, R, n], pruned column by column with the OBS update inside the block:
    (pruned block, scaled errors to propagate to later columns, per-entry losses)."""
    import torch

    hinv_diagonal = hinv.diagonal(dim1=-2, dim2=-1)  # [B, n]
    if prune_n == 0:
        scores = (block**2 / hinv_diagonal[:, None, :] ** 2).flatten(1)
        threshold = torch.sort(scores, dim=1)[0][:, int(scores.shape[1] * sparsity)]
        mask = scores.reshape(block.shape) <= threshold[:, None, None]
    else:
        mask = torch.zeros_like(block, dtype=torch.bool)
    pruned, err, losses = torch.zeros_like(block), torch.zeros_like(block), torch.zeros_like(block)
    for column in range(block.shape[2]):
        if prune_n != 0 and column % prune_m == 0:
            group = block[:, :, column:column + prune_m] ** 2 / hinv_diagonal[:, None, column:column + prune_m] ** 2
            mask.scatter_(2, column + torch.topk(group, prune_n, dim=2, largest=False)[1], True)
        weight = block[:, :, column]
        kept = weight.masked_fill(mask[:, :, column], 0)
        pivot = hinv[:, column, column][:, None]
        pruned[:, :, column] = kept
        losses[:, :, column] = (weight - kept) ** 2 / pivot**2
        scaled_error = (weight - kept) / pivot
        block[:, :, column:] -= scaled_error[:, :, None].matmul(hinv[:, column:column + 1, column:])
        err[:, :, column] = scaled_error
    return pruned, err, losses


def stack_groups(modules: list[Any], sparsities: dict[Any, float], hessians: dict[Any, torch.Tensor],
                 ) -> list[list[Any]]:
    """The modules in stacks that `sparsify_stack` can take together: same weight shape, dtype, device and
    sparsity, at most `STACK_BYTES` of Hessians each, in calibration order."""
    groups: dict[tuple[Any, ...], list[Any]] = defaultdict(list)
    for module in modules:
        weight = module.weight
        groups[(tuple(weight.shape), weight.dtype, str(weight.device), sparsities[module])].append(module)
    stacks = []
    for members in groups.values():
        per_stack = max(1, STACK_BYTES // (4 * hessians[members[0]].numel()))
        stacks += [members[i:i + per_stack] for i in range(0, len(members), per_stack)]
    return stacks


def batches_on(device: torch.device) -> bool:
    """Whether modules on `device` are sparsified in stacks: on accelerators only (the module docstring)."""
    return device.type != "cpu"


def make_batched_compress_modules(original: Callable[..., Any]) -> Callable[..., Any]:
    """`SparseGPTModifier.compress_modules`, batched over stacks of same-shaped Linear modules."""
    import torch

    def compress_modules(self: Any) -> None:
        if self.preserve_sparsity_mask:
            return original(self)
        from compressed_tensors.offload import get_execution_device

        linear = [m for m in self._num_samples
                  if type(m) is torch.nn.Linear and batches_on(get_execution_device(m))]
        for stack in stack_groups(linear, self._module_sparsities, self._hessians):
            compress_stack(self, stack)
        if self._num_samples:  # anything not batched (CPU, convolutions, Conv1D): the reference, one by one
            original(self)

    compress_modules.__wrapped__ = original  # type: ignore[attr-defined]
    return compress_modules


def compress_stack(modifier: Any, stack: list[Any]) -> None:
    """Sparsify one stack in place and drop its calibration state, as the reference does per module."""
    import torch
    from compressed_tensors.offload import align_module_device, get_execution_device, update_offload_parameter
    from loguru import logger

    first = stack[0]
    logger.info(f"Sparsifying {len(stack)} x {modifier._module_names[first]} "
                f"using {modifier._num_samples[first]} samples (batched)")
    with torch.no_grad(), contextlib.ExitStack() as onloaded:
        for module in stack:
            onloaded.enter_context(align_module_device(module))
        device = get_execution_device(first)
        weights = torch.stack([module.weight.to(device) for module in stack])
        hessians = torch.stack([modifier._hessians.pop(module).to(device) for module in stack])
        losses, sparsified = sparsify_stack(weights, hessians, modifier._module_sparsities[first],
                                            modifier._prune_n, modifier._prune_m, modifier.block_size,
                                            modifier.dampening_frac)
        del weights, hessians
    for module, weight in zip(stack, sparsified, strict=True):
        update_offload_parameter(module, "weight", weight)
        del modifier._num_samples[module]
    logger.info(f"SGPT loss over the stack: {float(losses.sum()):.4g}")
