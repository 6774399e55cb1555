"""Tests of compressors/sparsegpt_batched.py: the stacked SparseGPT equals llmcompressor's `sparsify_weight`.

The reference is llmcompressor's own per-module function, run on the same weights and Hessians. Masks must be
identical; weights agree to float32 rounding (batched and single matmuls may sum in another order: measured
<= 9e-7 relative over 600 random cases), so they are compared at 1e-5 relative, far below what one wrong
OBS update or one flipped mask entry changes (order 1). bf16 weights: at most one bf16 rounding step apart.
Also: dead columns, a Hessian that cannot be inverted (identity, as the reference), 2:4 structure, stacking
by shape, and the patched `SparseGPTModifier.compress_modules` leaving the same weights and state as the
unpatched one (the whole `oneshot` path: tests/test_sparsity.py, whose exact zero counts it must keep).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight

from compressors import sparsegpt_batched
from compressors.sparsegpt_batched import sparsify_stack, stack_groups

FLOAT32_RTOL, FLOAT32_ATOL = 1e-5, 1e-6  # float32 reassociation, with margin (measured: <= 9e-7 relative)
BF16_RTOL = 2.0**-7  # one bf16 rounding step: a reassociated float32 value can round to the neighbour


def _case(seed: int, count: int, rows: int, columns: int, dead: int = 0) -> tuple[list[torch.nn.Linear],
                                                                                  list[torch.Tensor]]:
    """`count` Linear modules [rows, columns] and Hessians X^T X of random inputs (`dead` zeroed inputs)."""
    generator = torch.Generator().manual_seed(seed)
    modules, hessians = [], []
    for _ in range(count):
        module = torch.nn.Linear(columns, rows, bias=False)
        module.weight.data = torch.randn(rows, columns, generator=generator)
        inputs = torch.randn(3 * columns, columns, generator=generator)
        inputs[:, :dead] = 0
        modules.append(module)
        hessians.append(inputs.T @ inputs / inputs.shape[0])
    return modules, hessians


def _reference(module: torch.nn.Linear, hessian: torch.Tensor, **options: object) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        loss, weight = sparsify_weight(module=module, hessians_dict={module: hessian.clone()},
                                       preserve_sparsity_mask=False, **options)  # type: ignore[arg-type]
    return float(loss), weight


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), count=st.integers(1, 4), rows=st.integers(1, 12),
       blocks=st.integers(1, 3), block_size=st.sampled_from([4, 8, 16]), structure=st.sampled_from(["s50", "2of4"]),
       dead=st.integers(0, 3))
def test_stack_equals_the_reference_per_module(seed: int, count: int, rows: int, blocks: int, block_size: int,
                                               structure: str, dead: int) -> None:
    columns = blocks * block_size
    modules, hessians = _case(seed, count, rows, columns, dead)
    prune_n, prune_m = (2, 4) if structure == "2of4" else (0, 0)
    options = {"sparsity": 0.5, "prune_n": prune_n, "prune_m": prune_m, "block_size": block_size,
               "dampening_frac": 0.01}
    expected = [_reference(m, h, **options) for m, h in zip(modules, hessians, strict=True)]
    with torch.no_grad():
        losses, sparsified = sparsify_stack(torch.stack([m.weight.data for m in modules]), torch.stack(hessians),
                                            0.5, prune_n, prune_m, block_size, 0.01)
    for index, (loss, weight) in enumerate(expected):
        assert torch.equal(sparsified[index] == 0, weight == 0), "pruning masks differ"
        torch.testing.assert_close(sparsified[index], weight, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)
        assert float(losses[index]) == pytest.approx(loss, rel=1e-5)
        if structure == "2of4":
            zeros = (weight == 0).reshape(rows, -1, 4).sum(dim=2)
            assert bool((zeros >= 2).all())


def test_a_hessian_that_cannot_be_inverted_gets_the_identity_like_the_reference() -> None:
    modules, hessians = _case(7, 2, 6, 8)
    hessians[1] = -torch.eye(8) * 0.001  # negative definite even after dampening: Cholesky fails
    options = {"sparsity": 0.5, "prune_n": 0, "prune_m": 0, "block_size": 8, "dampening_frac": 0.01}
    expected = [_reference(m, h, **options)[1] for m, h in zip(modules, hessians, strict=True)]
    _, sparsified = sparsify_stack(torch.stack([m.weight.data for m in modules]), torch.stack(hessians),
                                   0.5, 0, 0, 8, 0.01)
    for index in range(2):
        assert torch.equal(sparsified[index] == 0, expected[index] == 0)
        torch.testing.assert_close(sparsified[index], expected[index], rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)
    # with the identity there is no reconstruction: the kept weights are the originals
    kept = sparsified[1] != 0
    assert torch.equal(sparsified[1][kept], modules[1].weight.data[kept])


def test_bf16_weights_come_back_in_bf16_with_the_reference_mask() -> None:
    modules, hessians = _case(3, 3, 8, 16)
    for module in modules:
        module.weight.data = module.weight.data.to(torch.bfloat16)
    options = {"sparsity": 0.5, "prune_n": 2, "prune_m": 4, "block_size": 8, "dampening_frac": 0.01}
    expected = [_reference(m, h, **options)[1] for m, h in zip(modules, hessians, strict=True)]
    _, sparsified = sparsify_stack(torch.stack([m.weight.data for m in modules]), torch.stack(hessians),
                                   0.5, 2, 4, 8, 0.01)
    assert sparsified.dtype == torch.bfloat16
    assert torch.equal(sparsified == 0, torch.stack(expected) == 0)
    torch.testing.assert_close(sparsified, torch.stack(expected), rtol=BF16_RTOL, atol=0)


def test_stacks_hold_only_same_shaped_modules_and_respect_the_byte_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    wide, _ = _case(0, 5, 4, 16)
    narrow, _ = _case(1, 2, 4, 8)
    modules = [wide[0], narrow[0], *wide[1:], narrow[1]]
    hessians = {m: torch.zeros(m.in_features, m.in_features) for m in modules}
    sparsities = {m: 0.5 for m in modules}
    assert [len(s) for s in stack_groups(modules, sparsities, hessians)] == [5, 2]
    monkeypatch.setattr(sparsegpt_batched, "STACK_BYTES", 2 * 4 * 16 * 16)
    stacks = stack_groups(modules, sparsities, hessians)
    assert [len(s) for s in stacks] == [2, 2, 1, 2]
    assert stacks[0] == wide[:2] and stacks[3] == narrow
    sparsities[wide[4]] = 0.6
    assert [len(s) for s in stack_groups(modules, sparsities, {**hessians})] == [2, 2, 2, 1]


@pytest.mark.parametrize("batched_here", [True, False], ids=["batched", "cpu-reference"])
def test_patched_compress_modules_equals_the_unpatched_modifier(batched_here: bool,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The patch through llmcompressor's own modifier state: same weights as its per-module loop; where it
    does not batch (the CPU), bit for bit the same (the CPU path is kept exactly)."""
    from llmcompressor.modifiers.pruning.sparsegpt.base import SparseGPTModifier

    stacks: list[int] = []
    real_compress_stack = sparsegpt_batched.compress_stack
    monkeypatch.setattr(sparsegpt_batched, "compress_stack",
                        lambda modifier, stack: (stacks.append(len(stack)), real_compress_stack(modifier, stack)))
    if batched_here:
        monkeypatch.setattr(sparsegpt_batched, "batches_on", lambda device: True)
    assert sparsegpt_batched.batches_on(torch.device("cpu")) is batched_here

    modules, hessians = _case(11, 4, 6, 16)
    extra, extra_hessians = _case(12, 1, 3, 8)
    modules, hessians = modules + extra, hessians + extra_hessians

    def run(compress: object) -> list[torch.Tensor]:
        copies = [copy.deepcopy(m) for m in modules]
        modifier = SparseGPTModifier(sparsity=0.5, mask_structure="2:4", block_size=8)
        modifier._prune_n, modifier._prune_m = 2, 4
        for index, module in enumerate(copies):
            modifier._num_samples[module] = 3
            modifier._hessians[module] = hessians[index].clone()
            modifier._module_names[module] = f"experts.{index}.down_proj"
            modifier._module_sparsities[module] = 0.5  # type: ignore[assignment]
        compress(modifier)  # type: ignore[operator]
        assert not modifier._num_samples and not modifier._hessians
        return [m.weight.data for m in copies]

    original = SparseGPTModifier.compress_modules
    batched = sparsegpt_batched.make_batched_compress_modules(original)
    got_weights = run(batched)
    assert stacks == ([4, 1] if batched_here else [])
    for got, expected in zip(got_weights, run(original), strict=True):
        assert torch.equal(got == 0, expected == 0)
        if batched_here:
            torch.testing.assert_close(got, expected, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)
        else:
            assert torch.equal(got, expected)


def test_the_patch_is_installed_inside_llmcompressor_patches_only() -> None:
    from llmcompressor.modifiers.pruning.sparsegpt.base import SparseGPTModifier

    from compressors.llmc_patches import llmcompressor_patches

    original = SparseGPTModifier.__dict__["compress_modules"]
    with llmcompressor_patches():
        assert SparseGPTModifier.__dict__["compress_modules"].__wrapped__ is original
    assert SparseGPTModifier.__dict__["compress_modules"] is original
