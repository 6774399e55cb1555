"""Batched request tokenization (`benchmarks.fast_tokenization`) gives lm-eval's `_encode_pair` token ids.

The reference is lm-eval's own path on the same model object (`HFLM.loglikelihood` -> `TemplateLM.loglikelihood`
-> `_encode_pair` -> `HFLM.tok_encode`), ours `SharedContextLM.loglikelihood`; both hand their token requests to
`_loglikelihood_tokens`, which is replaced here by a recorder (no scoring, so the test is fast). Checked on real
BBQ / CrowS-Pairs / StereoSet requests built by lm-eval, on adversarial strings (empty, whitespace-only and
trailing-whitespace contexts, leading-space and empty continuations, unicode, special-token text, strings
starting with the prefix token) and on seeded random strings, with the zoo tokenizer as is (no BOS, like Qwen)
and with a BOS-adding post-processor under every `add_bos_token` setting.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from benchmarks import get_spec
from benchmarks.fast_scoring import SharedContextLM
from benchmarks.fast_tokenization import batchable, encode_requests
from benchmarks.lmeval_runner import prepare_requests
from fixtures.data import DataSource
from fixtures.tokenizer import EOS, IM_START
from fixtures.zoo import materialize_zoo_model

NAMES = ("bbq", "crows_pairs", "stereoset")
OPTIONS = {"bbq": {"categories": ["Religion", "Sexual_orientation"]}, "crows_pairs": {}, "stereoset": {}}
ADVERSARIAL = [
    ("The answer is", " yes"), ("The answer is ", "yes"), ("The answer is  \t", " yes"), ("Q:\n\n", "A"),
    ("   ", "x"), ("a", ""), ("a ", ""), ("", "hello"), ("", " hello"), ("", EOS + "x"), ("", IM_START + " y"),
    ("Größe 東京 ", "😀 naïve"), ("e\u0301", "\u0301"), ("ends with nbsp\xa0", "x"), ("cjk\u3000", "中文"),
    ("mid " + EOS + " text", EOS), (EOS + "starts with eos", " z"), (IM_START + "starts with bos", " q"),
    (IM_START, " only"), ("hello", "world"), ("don't", "'t"), ("x\r\n", "\r\ny"), ("1234", "5678"),
]
SEEDS = {(bos, flag): n for n, (bos, flag) in enumerate((b, f) for b in (False, True) for f in (None, True, False))}


class _Request:
    """What `loglikelihood` reads of lm-eval's Instance."""

    def __init__(self, args: tuple[str, str]) -> None:
        self.args = args


@pytest.fixture(scope="module")
def real_pairs(shared_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    """lm-eval's own (context, continuation) requests for 30 items of each likelihood benchmark."""
    _, prepared = prepare_requests([get_spec(n) for n in NAMES], OPTIONS, DataSource(shared_data_dir),
                           tmp_path_factory.mktemp("ft-work"), limit=30, seed=3, max_gen_toks=16)
    pairs: list[tuple[str, str]] = []
    for p in prepared:
        p.task.build_all_requests(samples=p.selection)
        pairs += [tuple(inst.args) for inst in p.task.instances]
    return pairs


@pytest.fixture(scope="module")
def lm(session_cache_dir: Path) -> SharedContextLM:
    path = str(materialize_zoo_model("qwen3-moe-tiny", session_cache_dir))
    return SharedContextLM(pretrained=path, dtype="float32", device="cpu", batch_size=4, max_length=2048)


def _random_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Short strings over an alphabet that stresses merges, whitespace moves and special-token text."""
    pieces = ["a", "b", "the", " ", "  ", "\n", "\t", "é", "😀", "'s", ".", EOS, IM_START, "\xa0", "12"]
    rng = random.Random(seed)

    def text() -> str:
        return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))

    return [(text(), text() or "x") for _ in range(n)]


def _token_requests(lm: SharedContextLM, pairs: list[tuple[str, str]], *, reference: bool) -> list[Any]:
    """What lm-eval's (reference) or our `loglikelihood` passes to `_loglikelihood_tokens`."""
    from lm_eval.models.huggingface import HFLM

    seen: list[Any] = []

    def record(reqs: list[Any], **_: Any) -> list[tuple[float, bool]]:
        seen.extend(reqs)
        return [(0.0, False)] * len(reqs)

    lm._loglikelihood_tokens = record  # type: ignore[method-assign]
    try:
        requests = [_Request(p) for p in pairs]
        (HFLM.loglikelihood if reference else SharedContextLM.loglikelihood)(lm, requests, disable_tqdm=True)
    finally:
        del lm._loglikelihood_tokens
    return seen


def _bos_tokenizer(lm: SharedContextLM) -> Any:
    """The zoo tokenizer with a post-processor that prepends IM_START as BOS (as Llama-style tokenizers do)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(lm.tokenizer.backend_tokenizer.to_str())
    bos_id = raw.token_to_id(IM_START)
    raw.post_processor = processors.TemplateProcessing(single=f"{IM_START} $A", special_tokens=[(IM_START, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=IM_START, eos_token=EOS, pad_token=EOS)


def _assert_same(lm: SharedContextLM, pairs: list[tuple[str, str]]) -> None:
    assert batchable(lm, (SharedContextLM.tok_encode,))
    want = _token_requests(lm, pairs, reference=True)
    got = _token_requests(lm, pairs, reference=False)
    assert len(got) == len(want) == len(pairs)
    bad = [(w, g) for w, g in zip(want, got, strict=True) if w != g]
    assert not bad, bad[:3]


def test_real_requests_equal_lm_eval(lm: SharedContextLM, real_pairs: list[tuple[str, str]]) -> None:
    started = lm.stats.tokenization_seconds
    _assert_same(lm, real_pairs)
    assert lm.stats.tokenization_seconds > started  # the batched path really ran
    assert len(real_pairs) > 500


@pytest.mark.parametrize("add_bos_token", [None, True, False])
@pytest.mark.parametrize("bos", [False, True], ids=["zoo", "bos-tokenizer"])
def test_adversarial_and_random_strings_equal_lm_eval(lm: SharedContextLM, bos: bool,
                                                      add_bos_token: bool | None,
                                                      real_pairs: list[tuple[str, str]]) -> None:
    tokenizer, flag = lm.tokenizer, lm.add_bos_token
    try:
        if bos:
            lm.tokenizer = _bos_tokenizer(lm)
        lm.add_bos_token = add_bos_token
        _assert_same(lm, ADVERSARIAL + _random_pairs(400, seed=SEEDS[bos, add_bos_token])
                     + real_pairs[::25])
    finally:
        lm.tokenizer, lm.add_bos_token = tokenizer, flag


def test_empty_context_and_continuation_fails_like_lm_eval(lm: SharedContextLM) -> None:
    """lm-eval indexes the continuation's first token when the context is empty: IndexError in both paths."""
    with pytest.raises(IndexError):
        _token_requests(lm, [("", "")], reference=True)
    with pytest.raises(IndexError):
        encode_requests(lm, [("", "")])


def test_unbatchable_models_keep_lm_eval_path(lm: SharedContextLM) -> None:
    """A subclass with its own `_encode_pair` (or a non-causal backend) is not batched, and still gets lm-eval's
    tokens through the per-request path."""

    class OwnPair(SharedContextLM):
        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            return super()._encode_pair(context, continuation)

    assert batchable(lm, (SharedContextLM.tok_encode,))
    assert not batchable(lm)  # our memoizing tok_encode must be named to be accepted
    original = type(lm)
    try:
        lm.__class__ = OwnPair
        assert not batchable(lm, (SharedContextLM.tok_encode,))
        started = lm.stats.tokenization_seconds
        _assert_unbatched_equal(lm, ADVERSARIAL)
        assert lm.stats.tokenization_seconds == started
    finally:
        lm.__class__ = original


def _assert_unbatched_equal(lm: SharedContextLM, pairs: list[tuple[str, str]]) -> None:
    want = _token_requests(lm, pairs, reference=True)
    assert _token_requests(lm, pairs, reference=False) == want


@pytest.mark.parametrize("outside", [None, "false", "true"])
def test_rust_threads_are_scoped_to_the_batch_calls(lm: SharedContextLM, real_pairs: list[tuple[str, str]],
                                                    monkeypatch: pytest.MonkeyPatch, outside: str | None) -> None:
    """The thread pool is on inside the batch calls whatever the variable says outside, the variable is
    restored afterwards (also when unset), and the ids equal lm-eval's (the pool keeps the input order)."""
    import os

    from benchmarks import fast_tokenization

    if outside is None:
        monkeypatch.delenv(fast_tokenization.PARALLELISM, raising=False)
    else:
        monkeypatch.setenv(fast_tokenization.PARALLELISM, outside)
    seen: list[str | None] = []
    real_call = type(lm.tokenizer).__call__

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(os.environ.get(fast_tokenization.PARALLELISM))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(type(lm.tokenizer), "__call__", spy)
    batched = encode_requests(lm, real_pairs[:400])
    assert seen and set(seen) == {"true"}
    assert os.environ.get(fast_tokenization.PARALLELISM) == outside
    monkeypatch.setattr(type(lm.tokenizer), "__call__", real_call)
    assert batched == _token_requests(lm, real_pairs[:400], reference=True)
