"""Fast decoding equals the reference loop, packing plans are sound, device placement decisions (CPU only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from routing_reference import SOFTMAX_ZOO

from benchmarks.generation import GenerationSettings, encode_chat, generate, load_causal_lm
from benchmarks.packing import attention_mask, batch_rows, layout_batch, pack_rows, plan_groups
from fixtures.distribution import placement
from fixtures.zoo import materialize_zoo_model

GIB = 2**30


@pytest.mark.parametrize("zoo", SOFTMAX_ZOO)
def test_fast_engine_equals_reference(zoo: str, session_cache_dir: Path) -> None:
    """Same tokens, same top-20 ids and log-probs, same finish reasons, greedy and sampled (CPU, fp32)."""
    model, tokenizer = load_causal_lm(materialize_zoo_model(zoo, session_cache_dir), "cpu")
    questions = ["How do I bake bread?", "Tell me about rivers.", "Why is the sky blue at noon?", "Hi",
                 "Write a poem about a cat who cannot sleep at night."]
    prompts = encode_chat(tokenizer, [[{"role": "user", "content": q}] for q in questions])
    settings = GenerationSettings(temperatures=(0.0, 0.7), max_new_tokens=24, batch_size=4, top_p=0.9)
    keys = [f"p{i}" for i in range(len(prompts))]
    fast = generate(model, tokenizer, prompts, keys, settings, "cpu", engine="fast")
    reference = generate(model, tokenizer, prompts, keys, settings, "cpu", engine="reference")
    for a, b in zip(fast, reference, strict=True):
        assert (a.prompt_id, a.temperature, a.finish) == (b.prompt_id, b.temperature, b.finish)
        assert np.array_equal(a.token_ids, b.token_ids)
        assert np.array_equal(a.top_ids, b.top_ids) and np.allclose(a.top_logprobs, b.top_logprobs, atol=1e-6)
    with pytest.raises(ValueError, match="engine"):
        generate(model, tokenizer, prompts, keys, settings, "cpu", engine="turbo")


def test_groups_rows_and_batches() -> None:
    requests = [([1, 2, 3], [4]), ([1, 2, 3], [5, 6]), ([7, 8], [9, 10, 11]), ([1, 2, 3], [4, 4, 4, 4])]
    groups = plan_groups(requests, pack_tokens=6)
    assert [g.members for g in groups] == [(0, 1), (3,), (2,)]  # 3 + 0 + 1 fits, + 3 more would not
    assert [g.length for g in groups] == [4, 6, 4]
    rows = pack_rows(groups, pack_tokens=6)
    assert [sum(g.length for g in row) for row in rows] == [6, 4, 4]
    assert [len(b) for b in batch_rows(rows, batch_tokens=16)] == [2, 1]
    assert [len(b) for b in batch_rows(rows, batch_tokens=11)] == [1, 2]
    assert [[g.members for g in row] for row in pack_rows(groups, pack_tokens=8)] == [[(3,)], [(0, 1), (2,)]]
    with pytest.raises(ValueError, match="empty"):
        plan_groups([([1], [])], 8)


def test_layout_and_mask_follow_the_packing_rules() -> None:
    (group,) = plan_groups([([1, 2, 3], [4, 5]), ([1, 2, 3], [6, 7, 8])], pack_tokens=16)
    layout = layout_batch([[group]], pad_id=0)
    assert layout.input_ids == [[1, 2, 3, 4, 6, 7]]
    assert layout.positions == [[0, 1, 2, 3, 3, 4]]
    assert [p.positions for p in layout.placed] == [(2, 3), (2, 4, 5)]
    assert [p.targets for p in layout.placed] == [(4, 5), (6, 7, 8)]
    allowed = attention_mask(layout, torch.float32, "cpu")[0, 0] == 0
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 0, 1, 0], [1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def test_placement_decisions() -> None:
    assert placement(10 * GIB, []) == {"device_map": "cpu"}
    assert placement(57 * GIB, [80 * GIB]) == {"device_map": {"": 0}}
    assert placement(57 * GIB, [20 * GIB, 80 * GIB]) == {"device_map": {"": 1}}
    split = placement(100 * GIB, [80 * GIB, 80 * GIB])
    assert split["device_map"] == "auto" and split["max_memory"] == {0: 64 * GIB, 1: 64 * GIB}
    with pytest.raises(ValueError, match="does not fit"):
        placement(200 * GIB, [80 * GIB, 80 * GIB])
    with pytest.raises(ValueError, match="bad placement"):
        placement(1, [GIB], headroom=1.0)
