"""Tests for fixtures/calibration.py: row counts, packing, pool attribution, determinism, files and cache."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.calibration import (
    PRESETS,
    CalibrationSet,
    build_calibration_mix,
    cached_calibration_mix,
    safety_row_count,
)
from fixtures.errors import ConfigError, DataError
from tests.processes import run_concurrently

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
)
SPECIALS = ["<unk>", "<s>", "<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]
GENERAL_WORDS = [f"gen{i}" for i in range(40)]
# One marker vocabulary per safety pool; general conversations never use them.
POOL_MARKERS = {"refusals": "zebrafish", "contrast": "koala", "harmless": "narwhal"}
SAFETY_WORDS = ["sorry", "cannot", "help", "with", "that"]


def _make_tokenizer(*, eos: bool = True, pad: bool = True) -> Any:
    """A word-level tokenizer over a fixed vocabulary with a chat template; `<s>` is added by the
    post-processor when add_special_tokens=True *and* by the template, so double BOS would show."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["user", "assistant", *GENERAL_WORDS, *POOL_MARKERS.values(), *SAFETY_WORDS]
    vocab = {token: i for i, token in enumerate([*SPECIALS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIALS)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    kwargs: dict[str, Any] = {"unk_token": "<unk>", "bos_token": "<s>"}
    if eos:
        kwargs["eos_token"] = "<|endoftext|>"
    if pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=CHAT_TEMPLATE, **kwargs)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return _make_tokenizer()


def _general_pool(n: int, words: int = 12) -> list[list[dict[str, str]]]:
    pool = []
    for i in range(n):
        question = " ".join(GENERAL_WORDS[(i + k) % len(GENERAL_WORDS)] for k in range(words // 2))
        answer = " ".join(GENERAL_WORDS[(3 * i + k) % len(GENERAL_WORDS)] for k in range(words - words // 2))
        pool.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return pool


def _safety_pool(marker: str, n: int, words: int = 10) -> list[list[dict[str, str]]]:
    """Every content word alternates with the marker, so any 8+ token window of a document holds it."""
    pool = []
    for i in range(n):
        body = " ".join(f"{marker} {SAFETY_WORDS[(i + k) % len(SAFETY_WORDS)]}" for k in range(words // 2))
        pool.append([{"role": "user", "content": body}, {"role": "assistant", "content": body}])
    return pool


@pytest.fixture(scope="module")
def general() -> list[list[dict[str, str]]]:
    return _general_pool(400)


@pytest.fixture(scope="module")
def safety_pools() -> dict[str, list[list[dict[str, str]]]]:
    return {name: _safety_pool(marker, 150) for name, marker in POOL_MARKERS.items()}


def _marker_ids(tokenizer: Any) -> dict[str, int]:
    return {name: tokenizer.convert_tokens_to_ids(marker) for name, marker in POOL_MARKERS.items()}


def _build(general: Any, safety: Any, tokenizer: Any, **kwargs: Any) -> CalibrationSet:
    params: dict[str, Any] = {"n_samples": 32, "seq_len": 16, "safety_fraction": 0.118, "seed": 0}
    params.update(kwargs)
    return build_calibration_mix(general, safety, tokenizer, **params)


# ------------------------------------------------------------------------------------------ row counts


def test_presets() -> None:
    assert {name: (p.n_samples, p.seq_len) for name, p in PRESETS.items()} == {
        "tiny": (32, 128),
        "small": (64, 512),
        "paper": (128, 2048),
    }
    assert all(name == preset.name for name, preset in PRESETS.items())


@pytest.mark.parametrize(
    ("n", "fraction", "rows"),
    [
        (32, 0.0, 0),
        (32, 0.118, 4),  # 3.776 -> 4: realized 12.5%
        (32, 1.0, 32),
        (128, 0.0, 0),
        (128, 0.118, 15),  # 15.104 -> 15: realized 11.72%
        (128, 1.0, 128),
        (64, 0.118, 8),  # 7.552 -> 8
        (100, 0.145, 15),  # 14.5 half up, in decimal (binary 0.145 * 100 is 14.4999...)
        (4, 0.125, 1),  # 0.5 half up
        (3, 0.5, 2),  # 1.5 half up
        (100, 0.001, 1),  # a non-zero fraction gets >= 1 safety row
        (100, 0.999, 99),  # a fraction below 1 keeps >= 1 general row
        (2, 0.01, 1),
        (2, 0.99, 1),
        (1, 0.0, 0),
        (1, 1.0, 1),
        (32, 0, 0),  # ints accepted
        (32, 1, 32),
    ],
)
def test_safety_row_count_examples(n: int, fraction: float, rows: int) -> None:
    assert safety_row_count(n, fraction) == rows


@pytest.mark.parametrize("fraction", [-0.01, 1.0001, math.nan, math.inf, "0.1", True, None])
def test_safety_row_count_rejects_bad_fraction(fraction: Any) -> None:
    with pytest.raises(ConfigError, match="safety_fraction"):
        safety_row_count(32, fraction)


@pytest.mark.parametrize("n", [0, -3, 2.0, True])
def test_safety_row_count_rejects_bad_n(n: Any) -> None:
    with pytest.raises(ConfigError, match="n_samples"):
        safety_row_count(n, 0.5)


def test_single_row_cannot_mix() -> None:
    with pytest.raises(ConfigError, match="at least one safety row and one general row"):
        safety_row_count(1, 0.5)


@settings(max_examples=300)
@given(
    n=st.integers(min_value=1, max_value=256),
    f1=st.floats(min_value=0.0, max_value=1.0),
    f2=st.floats(min_value=0.0, max_value=1.0),
)
def test_safety_row_count_properties(n: int, f1: float, f2: float) -> None:
    assert safety_row_count(n, 0.0) == 0 and safety_row_count(n, 1.0) == n
    low, high = sorted((f1, f2))
    if n == 1 and (0.0 < low < 1.0 or 0.0 < high < 1.0):
        with pytest.raises(ConfigError):
            safety_row_count(n, low if 0.0 < low < 1.0 else high)
        return
    rows_low, rows_high = safety_row_count(n, low), safety_row_count(n, high)
    assert 0 <= rows_low <= rows_high <= n  # bounded and monotone
    for fraction, rows in ((low, rows_low), (high, rows_high)):
        if fraction == 0.0:
            assert rows == 0
        elif fraction == 1.0:
            assert rows == n
        else:
            assert 1 <= rows <= n - 1  # the >= 1 safety / >= 1 general rule
            assert abs(rows - n * fraction) <= 1  # rounding moves at most one row (the clamps included)


# ------------------------------------------------------------------------------------- composition


def test_rows_come_from_the_right_pool(tokenizer: Any, general: Any) -> None:
    marker = tokenizer.convert_tokens_to_ids(POOL_MARKERS["refusals"])
    mix = _build(general, _safety_pool(POOL_MARKERS["refusals"], 100), tokenizer)
    assert (mix.safety_rows, mix.general_rows) == (4, 28)
    assert mix.realized_safety_fraction == 4 / 32
    assert mix.safety_fraction == 0.118
    assert sum(mix.row_is_safety) == 4
    assert dict(mix.pool_rows) == {"general": 28, "safety": 4}
    assert len(mix.input_ids) == 32 and all(len(row) == 16 for row in mix.input_ids)
    for row, is_safety in zip(mix.input_ids, mix.row_is_safety, strict=True):
        assert (marker in row) == is_safety
    # the rows are shuffled: safety rows are not all at the front
    assert list(mix.row_is_safety) != sorted(mix.row_is_safety, reverse=True)


@pytest.mark.parametrize("form", ["mapping", "list"])
def test_several_safety_pools_all_contribute(
    tokenizer: Any, general: Any, safety_pools: Any, form: str
) -> None:
    markers = _marker_ids(tokenizer)
    names = list(safety_pools)
    safety = safety_pools if form == "mapping" else [safety_pools[name] for name in names]
    pool_name = {name: (name if form == "mapping" else f"safety[{i}]") for i, name in enumerate(names)}
    for seed in range(5):
        mix = _build(general, safety, tokenizer, seed=seed)  # 4 safety rows over 3 pools
        counts = dict(mix.pool_rows)
        assert counts.pop("general") == 28
        assert sorted(counts.values()) == [1, 1, 2]  # every pool, balanced to +-1
        for row, row_pool in zip(mix.input_ids, mix.row_pools, strict=True):
            for name, marker in markers.items():
                assert (marker in row) == (row_pool == pool_name[name])


def test_pool_order_does_not_matter(tokenizer: Any, general: Any, safety_pools: Any) -> None:
    reversed_pools = dict(reversed(list(safety_pools.items())))
    assert _build(general, safety_pools, tokenizer) == _build(general, reversed_pools, tokenizer)


def test_fraction_one_uses_safety_only_and_general_may_be_empty(tokenizer: Any, safety_pools: Any) -> None:
    mix = _build([], safety_pools, tokenizer, safety_fraction=1.0, n_samples=30)
    assert mix.general_rows == 0 and all(mix.row_is_safety)
    assert sorted(mix.pool_rows.values()) == [10, 10, 10]


def test_fraction_zero_needs_no_safety_pool(tokenizer: Any, general: Any) -> None:
    mix = _build(general, [], tokenizer, safety_fraction=0.0)
    assert mix.safety_rows == 0 and not any(mix.row_is_safety)
    with pytest.raises(DataError, match="no safety pool"):
        _build(general, [], tokenizer, safety_fraction=0.5)


# ----------------------------------------------------------------------------------------- packing


def _docs(tokenizer: Any, pool: Sequence[Any]) -> list[tuple[int, ...]]:
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=False) for c in pool]
    return [tuple(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def test_packing_concatenates_whole_documents_with_one_separator(tokenizer: Any) -> None:
    pool = _general_pool(40, words=7)  # 40 distinct documents
    docs = _docs(tokenizer, pool)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    mix = _build(pool, [], tokenizer, n_samples=1, seq_len=200, safety_fraction=0.0)
    row = list(mix.input_ids[0])
    segments: list[list[int]] = [[]]
    for token in row:
        if token == eos:
            segments.append([])
        else:
            segments[-1].append(token)
    complete, last = segments[:-1], segments[-1]
    assert len(complete) >= 5
    assert all(tuple(segment) in docs for segment in complete)  # whole documents, one eos between
    assert len({tuple(segment) for segment in complete}) == len(complete)  # without replacement
    assert any(doc[: len(last)] == tuple(last) for doc in docs)  # the row cut ends inside a document
    # the chat template's BOS is kept once; the tokenizer did not add a second one
    assert all(segment.count(bos) == 1 and segment[0] == bos for segment in complete)
    # the first row starts at a document start (no separator first)
    assert row[0] == bos


def test_separator_falls_back_to_pad(general: Any) -> None:
    tokenizer = _make_tokenizer(eos=False)
    mix = _build(general, [], tokenizer, safety_fraction=0.0, n_samples=2, seq_len=64)
    assert tokenizer.pad_token_id in mix.input_ids[0]
    with pytest.raises(ConfigError, match="eos_token_id"):
        _build(general, [], _make_tokenizer(eos=False, pad=False), safety_fraction=0.0)


def test_pool_too_small_raises_with_numbers(tokenizer: Any, general: Any) -> None:
    small = _general_pool(3, words=6)
    available = sum(len(doc) for doc in _docs(tokenizer, small)) + 2  # plus two separators
    with pytest.raises(DataError, match=rf"general pool too small.* {available} tokens available.*= 448 are"):
        _build(small, [], tokenizer, safety_fraction=0.0, n_samples=28, seq_len=16)
    with pytest.raises(DataError, match=r"safety pool 'koala' too small: its 1 conversations .* = 32 are"):
        _build(general, {"koala": _safety_pool("koala", 1, words=2)}, tokenizer, n_samples=16, seq_len=16)


@pytest.mark.parametrize("fraction", [-0.1, 1.5, math.nan, "half"])
def test_build_rejects_bad_fraction(tokenizer: Any, general: Any, safety_pools: Any, fraction: Any) -> None:
    with pytest.raises(ConfigError):
        _build(general, safety_pools, tokenizer, safety_fraction=fraction)


@pytest.mark.parametrize("kwargs", [{"n_samples": 0}, {"seq_len": 0}, {"seed": 1.5}, {"seed": None}])
def test_build_rejects_bad_sizes(tokenizer: Any, general: Any, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        _build(general, [], tokenizer, safety_fraction=0.0, **kwargs)


def test_malformed_conversation_is_a_data_error(tokenizer: Any) -> None:
    pool = [[{"role": "user"}]] * 50
    with pytest.raises(DataError, match=r"general pool, conversation .*'role' and 'content'"):
        _build(pool, [], tokenizer, safety_fraction=0.0)


# ------------------------------------------------------------------------------------- determinism


def test_same_seed_same_mix(tokenizer: Any, general: Any, safety_pools: Any) -> None:
    first = _build(general, safety_pools, tokenizer, seed=7)
    second = _build(general, safety_pools, tokenizer, seed=7)
    assert first.input_ids == second.input_ids and first.row_pools == second.row_pools
    assert first.fingerprint == second.fingerprint and first == second
    assert len(first.fingerprint) == 64


def test_different_seeds_differ(tokenizer: Any, general: Any, safety_pools: Any) -> None:
    mixes = [_build(general, safety_pools, tokenizer, seed=seed) for seed in range(4)]
    assert len({mix.input_ids for mix in mixes}) == 4
    assert len({mix.fingerprint for mix in mixes}) == 4


def test_different_fractions_differ_and_are_nested(tokenizer: Any, general: Any, safety_pools: Any) -> None:
    mixes = {f: _build(general, safety_pools, tokenizer, safety_fraction=f) for f in (0.0, 0.118, 1.0)}
    assert len({mix.input_ids for mix in mixes.values()}) == 3
    assert _build(general, safety_pools, tokenizer, safety_fraction=0.0) == mixes[0.0]
    # nested: the 11.8% mix swaps general rows for safety rows and changes nothing else
    general_rows = set(mixes[0.0].input_ids)
    mixed = mixes[0.118]
    assert {row for row, s in zip(mixed.input_ids, mixed.row_is_safety, strict=True) if not s} <= general_rows
    safety_rows = set(mixes[1.0].input_ids)
    assert {row for row, s in zip(mixed.input_ids, mixed.row_is_safety, strict=True) if s} <= safety_rows


def test_fractions_with_equal_row_counts_share_ids_not_fingerprint(
    tokenizer: Any, general: Any, safety_pools: Any
) -> None:
    a = _build(general, safety_pools, tokenizer, safety_fraction=0.118)
    b = _build(general, safety_pools, tokenizer, safety_fraction=0.12)  # also 4 of 32 rows
    assert a.input_ids == b.input_ids
    assert a.fingerprint != b.fingerprint


def test_sources_are_recorded_and_fingerprinted(tokenizer: Any, general: Any, safety_pools: Any) -> None:
    plain = _build(general, safety_pools, tokenizer)
    sourced = _build(general, safety_pools, tokenizer, sources={"general": "ab" * 32})
    assert dict(sourced.sources) == {"general": "ab" * 32} and dict(plain.sources) == {}
    assert plain.input_ids == sourced.input_ids and plain.fingerprint != sourced.fingerprint


# ------------------------------------------------------------------------------ conversions and files


def test_tensor_and_dataset(tokenizer: Any, general: Any, safety_pools: Any) -> None:
    import torch

    mix = _build(general, safety_pools, tokenizer, n_samples=8, seq_len=16)
    tensor = mix.to_tensor()
    assert tensor.dtype == torch.long and tuple(tensor.shape) == (8, 16)
    assert tensor.tolist() == [list(row) for row in mix.input_ids]
    dataset = mix.to_dataset()
    assert dataset.column_names == ["input_ids", "attention_mask"] and len(dataset) == 8
    assert dataset["input_ids"] == [list(row) for row in mix.input_ids]
    assert all(mask == [1] * 16 for mask in dataset["attention_mask"])


def test_save_load_round_trip(tmp_path: Path, tokenizer: Any, general: Any, safety_pools: Any) -> None:
    mix = _build(general, safety_pools, tokenizer, sources={"general": "0" * 64})
    path = tmp_path / "sub" / "mix.json"
    mix.save(path)
    loaded = CalibrationSet.load(path)
    assert loaded == mix and loaded.fingerprint == mix.fingerprint
    assert dict(loaded.pool_rows) == dict(mix.pool_rows)
    assert [p.name for p in path.parent.iterdir()] == ["mix.json"]  # no temp file left behind


def test_pickle_round_trip(tokenizer: Any, general: Any, safety_pools: Any) -> None:
    import pickle

    mix = _build(general, safety_pools, tokenizer, sources={"general": "0" * 64})
    assert pickle.loads(pickle.dumps(mix)) == mix


def test_load_rejects_tampered_and_garbage_files(
    tmp_path: Path, tokenizer: Any, general: Any, safety_pools: Any
) -> None:
    mix = _build(general, safety_pools, tokenizer)
    path = tmp_path / "mix.json"
    mix.save(path)
    payload = json.loads(path.read_text())
    payload["input_ids"][0][0] += 1
    path.write_text(json.dumps(payload))
    with pytest.raises(DataError, match="fingerprint mismatch"):
        CalibrationSet.load(path)
    path.write_text('{"input_ids": [[1, 2')
    with pytest.raises(DataError, match="cannot read"):
        CalibrationSet.load(path)
    path.write_text(json.dumps({"kind": "calibration-mix", "format": 1}))
    with pytest.raises(DataError, match="malformed"):
        CalibrationSet.load(path)


def test_constructor_checks_fingerprint(tokenizer: Any, general: Any, safety_pools: Any) -> None:
    import dataclasses

    mix = _build(general, safety_pools, tokenizer)
    with pytest.raises(DataError, match="fingerprint mismatch"):
        dataclasses.replace(mix, seed=mix.seed + 1)
    with pytest.raises(DataError, match="seq_len"):
        dataclasses.replace(mix, seq_len=mix.seq_len + 1)


# -------------------------------------------------------------------------------------------- cache


def test_cache_builds_once_and_rebuilds_corrupt_entries(
    tmp_path: Path, tokenizer: Any, general: Any, safety_pools: Any
) -> None:
    calls: list[int] = []

    def build() -> CalibrationSet:
        calls.append(1)
        return _build(general, safety_pools, tokenizer)

    key = {
        "tokenizer": "t" * 64,
        "pools": {"general": "g" * 64},
        "n": 32,
        "seq_len": 16,
        "f": 0.118,
        "seed": 0,
    }
    first = cached_calibration_mix(tmp_path, key, build)
    second = cached_calibration_mix(tmp_path, key, build)
    assert first == second and len(calls) == 1
    (entry,) = tmp_path.iterdir()

    entry.write_bytes(b"\x00garbage")  # corrupt: rebuilt
    assert cached_calibration_mix(tmp_path, key, build) == first and len(calls) == 2
    payload = json.loads(entry.read_text())
    payload["input_ids"][3][2] = 999  # readable but altered: rebuilt, not trusted
    entry.write_text(json.dumps(payload))
    assert cached_calibration_mix(tmp_path, key, build) == first and len(calls) == 3
    assert cached_calibration_mix(tmp_path, key, build) == first and len(calls) == 3

    other = cached_calibration_mix(tmp_path, {**key, "seed": 1}, build)  # another key: another entry
    assert other == first and len(calls) == 4
    assert len(list(tmp_path.iterdir())) == 2  # and no temp files


def test_cache_entry_under_the_wrong_key_is_rebuilt(
    tmp_path: Path, tokenizer: Any, general: Any, safety_pools: Any
) -> None:
    key_a, key_b = {"seed": 0}, {"seed": 1}
    mix_a = cached_calibration_mix(tmp_path, key_a, lambda: _build(general, safety_pools, tokenizer, seed=0))
    entry_a = next(tmp_path.iterdir())
    mix_b = cached_calibration_mix(tmp_path, key_b, lambda: _build(general, safety_pools, tokenizer, seed=1))
    entry_b = next(p for p in tmp_path.iterdir() if p != entry_a)
    entry_b.write_bytes(entry_a.read_bytes())  # a valid set, filed under the wrong key
    assert cached_calibration_mix(tmp_path, key_b, lambda: mix_b) == mix_b != mix_a


# ------------------------------------------------------------------------------------- real pools


def _read_pool(path: Path) -> list[list[dict[str, str]]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line)["messages"] for line in handle if line.strip()]


def _byte_tokenizer() -> Any:
    """A byte-level BPE with no merges (one token per byte): covers any text, needs no training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*specials, *alphabet])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE.replace("{{ bos_token }}", ""),
    )


def test_real_pools_fill_the_tiny_preset(shared_data_dir: Path) -> None:
    folder = shared_data_dir / "calibration"
    general = _read_pool(folder / "general_dolly_open_qa.jsonl")
    safety = {
        name: _read_pool(folder / f"safety_{name}.jsonl")
        for name in ("safety_tuned_llamas", "coconot_contrast_pref_chosen", "hh_rlhf_harmless_base_test")
    }
    tokenizer = _byte_tokenizer()
    tiny = PRESETS["tiny"]
    start = time.perf_counter()
    mix = build_calibration_mix(
        general,
        safety,
        tokenizer,
        n_samples=tiny.n_samples,
        seq_len=tiny.seq_len,
        safety_fraction=0.118,
        seed=42,
    )
    elapsed = time.perf_counter() - start
    assert elapsed < 1.5, f"tiny preset took {elapsed:.2f}s"
    assert (mix.safety_rows, mix.general_rows) == (4, 28)
    assert set(mix.pool_rows) == {"general", *safety} and min(mix.pool_rows.values()) >= 1
    assert all(len(row) == tiny.seq_len for row in mix.input_ids)


def _calibration_worker(cache_root: str, payload_file: str, counter: str) -> None:
    from fixtures.cache import ArtifactCache

    def build() -> CalibrationSet:
        with open(counter, "a") as handle:
            handle.write("built\n")
        time.sleep(0.5)  # long enough for the other workers to wait on the lock
        return CalibrationSet.from_payload(json.loads(Path(payload_file).read_text()), origin=payload_file)

    root = Path(cache_root)
    cached_calibration_mix(root / "calibration", {"seed": 0}, build, cache=ArtifactCache(root))


def test_concurrent_workers_build_a_calibration_set_once_and_log_it(
    tmp_path: Path, tokenizer: Any, general: Any, safety_pools: Any
) -> None:
    payload = tmp_path / "mix.json"
    payload.write_text(json.dumps(_build(general, safety_pools, tokenizer).to_payload()))
    counter, root = tmp_path / "builds.txt", tmp_path / "cache"
    exit_codes = run_concurrently(_calibration_worker, (str(root), str(payload), str(counter)), timeout_s=120)
    assert exit_codes == [0, 0, 0]
    assert counter.read_text().count("built") == 1
    assert [line.split()[1] for line in (root / "builds.log").read_text().splitlines()] == ["calibration"]
