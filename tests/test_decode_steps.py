"""Decode step runners (`benchmarks.decode_steps`): the static cache and its masks give the dynamic cache's
tokens, and the GPU kernels (`benchmarks.fast_kernels`) compute transformers' functions (CPU, fp32).

The CUDA-graph replay itself needs a GPU: it replays the static step's kernels, and its tokens were compared
with the eager static step on an H200 (docs/performance.md). Here the static path is checked, which is what the
graph captures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from routing_reference import SOFTMAX_ZOO

from benchmarks import fast_kernels
from benchmarks.architecture import sliding_window
from benchmarks.decode_steps import StaticSteps, make_steps, resolve_mode
from benchmarks.fast_generation import decode_batch, left_pad
from benchmarks.generation import encode_chat, load_causal_lm
from fixtures.zoo import materialize_zoo_model

ZOO = SOFTMAX_ZOO
LOGPROB_ATOL = 1e-5  # fp32 rounding of the same function by another kernel or cache layout
QUESTIONS = ["How do I bake bread?", "Tell me about rivers.", "Why is the sky blue at noon?", "Hi",
             "Write a poem about a cat who cannot sleep at night."]


def _decode(model: Any, prompts: list[tuple[int, ...]], mode: str) -> list[Any]:
    temperatures = [0.7 if i % 2 else 0.0 for i in range(len(prompts))]
    generators = [torch.Generator().manual_seed(i) if t else None for i, t in enumerate(temperatures)]
    with torch.inference_mode():
        return decode_batch(model, prompts, max_new_tokens=24, stop_ids=frozenset([0]), pad_id=0, device="cpu",
                            temperatures=temperatures, generators=generators, top_k=20, mode=mode)


@pytest.mark.parametrize("zoo", ZOO)
def test_static_cache_and_our_kernels_give_the_dynamic_tokens(zoo: str, session_cache_dir: Path) -> None:
    """Greedy and sampled rows of different prompt lengths (left padding): same tokens, same top-20 ids,
    log-probs within float rounding, for the static cache and for `fast_kernels` on either cache."""
    model, tokenizer = load_causal_lm(materialize_zoo_model(zoo, session_cache_dir), "cpu")
    model.set_experts_implementation("grouped_mm")
    prompts = encode_chat(tokenizer, [[{"role": "user", "content": q}] for q in QUESTIONS])
    reference = _decode(model, prompts, "dynamic")
    # A sliding window (GPT-OSS) decodes on the dynamic cache only (resolve_mode refuses the static one).
    modes = ("dynamic",) if sliding_window(model.config) is not None else ("dynamic", "static")
    runs = {"static": _decode(model, prompts, "static")} if "static" in modes else {}
    fast_kernels.install(model)
    runs |= {f"{mode}+kernels": _decode(model, prompts, mode) for mode in modes}
    for name, rows in runs.items():
        for ours, ref in zip(rows, reference, strict=True):
            assert np.array_equal(ours.tokens, ref.tokens), name
            assert np.allclose(ours.top_logprobs, ref.top_logprobs, rtol=0, atol=LOGPROB_ATOL), name
            assert_same_top_ids(ours, ref, name)
            assert ours.stopped == ref.stopped


def assert_same_top_ids(ours: Any, ref: Any, name: str) -> None:
    """The same top-20 ids with the same log-probs, except where two log-probs tie within float rounding: their
    order may swap, and a tie at the cut may bring in the other token (seen on an AMD EPYC box: -6.188300 vs
    -6.188301). A wrong kernel moves log-probs by far more than LOGPROB_ATOL and fails here."""
    for step, (ids, logprobs, ref_ids, ref_logprobs) in enumerate(
            zip(ours.top_ids, ours.top_logprobs, ref.top_ids, ref.top_logprobs, strict=True)):
        mine = dict(zip(ids.tolist(), logprobs.tolist(), strict=True))
        theirs = dict(zip(ref_ids.tolist(), ref_logprobs.tolist(), strict=True))
        for token in mine.keys() & theirs.keys():
            assert abs(mine[token] - theirs[token]) <= LOGPROB_ATOL, (name, step, token)
        cut = float(ref_logprobs.min())
        for token in mine.keys() ^ theirs.keys():
            assert abs({**theirs, **mine}[token] - cut) <= LOGPROB_ATOL, (name, step, token, "not a tie at the cut")


def test_static_masks_follow_the_padding_rules(session_cache_dir: Path) -> None:
    model, _ = load_causal_lm(materialize_zoo_model("qwen3-moe-tiny", session_cache_dir), "cpu")
    ids, mask, positions = left_pad([(5, 6, 7), (8,)], 0, "cpu")
    steps = StaticSteps(model, ids, mask, positions, max_new_tokens=3, graph=False)
    assert steps.length == 8  # 3 + 3 slots, rounded up to 8 (16-byte mask rows for SDPA's fast kernels)
    allowed = steps.prefill_mask[:, 0] == 0
    assert allowed[0, :, :3].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # The padded row: its two pad queries see only themselves, its token sees only itself (slot 2).
    assert allowed[1, :, :3].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert not allowed[:, :, 3:].any()  # no query sees a slot that is not written yet
    with torch.inference_mode():
        chosen = steps.first().argmax(-1)
        steps.next(chosen)
    visible = (steps.step_mask[:, 0, 0] == 0).tolist()
    assert visible == [[True, True, True, True, False, False, False, False],
                       [False, False, True, True, False, False, False, False]]
    with torch.inference_mode(), pytest.raises(RuntimeError, match="full"):
        for _ in range(6):
            steps.next(chosen)


def test_modes_resolve_and_refuse(session_cache_dir: Path) -> None:
    assert resolve_mode("auto", "cpu") == "dynamic"
    assert resolve_mode("auto", "cuda:1") == "graph"
    assert resolve_mode("static", "cpu") == "static"
    with pytest.raises(ValueError, match="one of dynamic, static, graph"):
        resolve_mode("turbo", "cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_mode("graph", "cpu")
    model, _ = load_causal_lm(materialize_zoo_model("mixtral-tiny", session_cache_dir), "cpu")
    model.config.sliding_window = 4096
    assert resolve_mode("auto", "cuda", model) == "dynamic"
    with pytest.raises(ValueError, match="sliding-window"):
        resolve_mode("static", "cpu", model)
    ids, mask, positions = left_pad([(1, 2)], 0, "cpu")
    assert type(make_steps("dynamic", model, ids, mask, positions, 2)).__name__ == "DynamicSteps"


@pytest.mark.parametrize("zoo", ZOO)
def test_our_experts_are_transformers_grouped_mm_bit_for_bit(zoo: str, session_cache_dir: Path) -> None:
    model, _ = load_causal_lm(materialize_zoo_model(zoo, session_cache_dir), "cpu")
    ids = torch.randint(1, 4000, (3, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    logits = {}
    with torch.inference_mode():
        for name in ("eager", "grouped_mm", fast_kernels.EXPERTS):
            fast_kernels.register()
            model.set_experts_implementation(name)
            logits[name] = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(logits[fast_kernels.EXPERTS], logits["grouped_mm"])
    torch.testing.assert_close(logits[fast_kernels.EXPERTS], logits["eager"], rtol=1e-5, atol=1e-5)


class _Attention(torch.nn.Module):
    def __init__(self, group: int) -> None:
        super().__init__()
        self.num_key_value_groups = group
        self.is_causal = True


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.integers(1, 4), keys=st.integers(1, 19),
       positions=st.sampled_from([1, 1, 2]), seed=st.integers(0, 2**16))
def test_gqa_decode_attention_equals_sdpa_with_repeated_heads(batch: int, kv_heads: int, group: int, keys: int,
                                                               positions: int, seed: int) -> None:
    """Any mask (each query sees at least one key): the per-kv-head SDPA of one query position equals
    transformers' `sdpa` over repeated key/value heads; more positions go to `sdpa` itself."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * group, positions, 8, generator=generator)
    key, value = (torch.randn(batch, kv_heads, keys, 8, generator=generator) for _ in range(2))
    visible = torch.rand(batch, 1, positions, keys, generator=generator) < 0.6
    visible[..., 0] = True
    mask = torch.where(visible, 0.0, torch.finfo(torch.float32).min)
    module = _Attention(group)
    ours, _ = fast_kernels.gqa_decode_sdpa(module, query, key, value, mask, scaling=0.3)
    reference, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert ours.shape == reference.shape == (batch, positions, kv_heads * group, 8)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_engine_key_and_install(session_cache_dir: Path) -> None:
    assert fast_kernels.engine_key("cpu") == {}
    assert fast_kernels.engine_key("cuda:0") == {"engine": fast_kernels.ENGINE}
    model, _ = load_causal_lm(materialize_zoo_model("olmoe-tiny", session_cache_dir), "cpu")
    assert fast_kernels.install(model) == {"experts": fast_kernels.EXPERTS, "attention": fast_kernels.ATTENTION}
