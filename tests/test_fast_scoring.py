"""Shared-context scoring (`moe-fbs-shared`) equals lm-eval's HF backend: per request, per item, per metric.

CPU, fp32 log-softmax, the zoo's tiny models, real BBQ / CrowS-Pairs / StereoSet requests built by lm-eval
from the local mirror. Tolerance per request: 1e-5 + 5e-7 * |LL| (lm-eval sums a request's fp32 token
log-probs in fp32; at |LL| = 500 one fp32 ulp is 6e-5, so a tighter absolute bound would test rounding).
is_greedy is checked on requests built from the model's own greedy continuations, so True occurs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from routing_reference import SOFTMAX_ZOO

from benchmarks import get_spec
from benchmarks.fast_generation import greedy_tokens
from benchmarks.fast_scoring import SharedContextLM
from benchmarks.lmeval_runner import prepare_requests, run_benchmarks
from fixtures.data import DataSource
from fixtures.zoo import materialize_zoo_model

NAMES = ("bbq", "crows_pairs", "stereoset")
OPTIONS = {"bbq": {"categories": ["Religion", "Sexual_orientation"]}, "crows_pairs": {}, "stereoset": {}}
LM_ARGS = {"dtype": "float32", "softmax_dtype": "float32", "max_length": 2048, "device": "cpu", "batch_size": 16}
# Small rows and batches, so several groups share a row and a run spans several forwards.
PACKED = {"pack_tokens": 160, "batch_tokens": 640}


class _Request:
    """What `loglikelihood` reads of lm-eval's Instance."""

    def __init__(self, args: tuple[str, str]) -> None:
        self.args = args


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 + 5e-7 * abs(a)


@pytest.fixture(scope="module")
def source(shared_data_dir: Path) -> DataSource:
    return DataSource(shared_data_dir)


@pytest.fixture(scope="module")
def requests(source: DataSource, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    """lm-eval's own (context, continuation) requests for 14 items of each likelihood benchmark."""
    _, prepared = prepare_requests([get_spec(n) for n in NAMES], OPTIONS, source, tmp_path_factory.mktemp("fs-work"),
                           limit=14, seed=5, max_gen_toks=16)
    args: list[tuple[str, str]] = []
    for p in prepared:
        p.task.build_all_requests(samples=p.selection)
        args += [tuple(inst.args) for inst in p.task.instances]
    return args


def _pair(name: str, cache: Path, **overrides: Any) -> tuple[Any, SharedContextLM]:
    from lm_eval.models.huggingface import HFLM

    path, args = str(materialize_zoo_model(name, cache)), {**LM_ARGS, **overrides}
    return HFLM(pretrained=path, **args), SharedContextLM(pretrained=path, **args, **PACKED)


@pytest.mark.parametrize("zoo", SOFTMAX_ZOO)
def test_loglikelihoods_equal_hflm(zoo: str, requests: list[tuple[str, str]], session_cache_dir: Path) -> None:
    reference, ours = _pair(zoo, session_cache_dir)
    chosen = requests if zoo == "qwen3-moe-tiny" else requests[::3]
    want = reference.loglikelihood([_Request(a) for a in chosen], disable_tqdm=True)
    got = ours.loglikelihood([_Request(a) for a in chosen], disable_tqdm=True)
    bad = [(a, w, g) for a, w, g in zip(chosen, want, got, strict=True) if not _close(w[0], g[0]) or w[1] != g[1]]
    assert not bad, bad[:3]
    stats, longest = ours.stats, ours.packable_length()
    too_long = sum(len(ours.tok_encode(c)) + len(ours.tok_encode(x)) > longest for c, x in chosen)
    assert stats.requests == len(chosen) and stats.fallback_requests == too_long and stats.forwards > 1
    assert stats.forwarded_tokens < stats.request_tokens  # BBQ's 12 choices share their context


def test_is_greedy_and_truncation_fallback(requests: list[tuple[str, str]], session_cache_dir: Path) -> None:
    """Continuations the model itself would generate (is_greedy True), one wrong last token (False), and a
    request longer than max_length that both paths left-truncate (ours hands it to HFLM)."""
    reference, ours = _pair("qwen3-moe-tiny", session_cache_dir, max_length=320)
    contexts = sorted({tuple(reference.tok_encode(c)) for c, _ in requests[:60:12]}, key=len)
    continuations = greedy_tokens(reference.model, contexts, max_new_tokens=4, stop_ids=frozenset([-1]), pad_id=0,
                                  batch_size=8, device="cpu")
    token_requests: list[tuple[tuple[str, str], list[int], list[int]]] = []
    for context, cont in zip(contexts, continuations, strict=True):
        token_requests += [(("", ""), list(context), cont[:k]) for k in (1, 2, 4)]
        token_requests.append((("", ""), list(context), [*cont[:2], (cont[2] + 1) % 4096]))
    long_context = [t for c in contexts for t in c] * 20
    token_requests.append((("", ""), long_context[:330], continuations[0][:3]))
    want = reference._loglikelihood_tokens(token_requests, disable_tqdm=True)
    got = ours._loglikelihood_tokens(token_requests, disable_tqdm=True)
    assert [w[1] for w in want] == [g[1] for g in got]
    assert sum(w[1] for w in want) >= len(contexts) * 3  # the greedy ones really are greedy
    assert all(_close(w[0], g[0]) for w, g in zip(want, got, strict=True))
    assert ours.stats.fallback_requests == 1


def _metrics_equal(mine: dict[str, float], theirs: dict[str, float]) -> list[str]:
    """Choice-derived metrics must be identical; log-likelihood averages (`likelihood_diff`) agree to 1e-6."""
    differ = []
    for name, value in theirs.items():
        other = mine[name]
        if math.isnan(value) and math.isnan(other):
            continue
        tolerance = 1e-6 * max(1.0, abs(value)) if "likelihood_diff" in name else 0.0
        if abs(value - other) > tolerance:
            differ.append(f"{name}: {value} vs {other}")
    return differ


def test_benchmark_metrics_and_generations_equal(source: DataSource, session_cache_dir: Path,
                                                 tmp_path: Path) -> None:
    """Our runner with scorer="shared" reports lm-eval's metrics, item predictions and generated texts."""
    model_dir = materialize_zoo_model("qwen3-moe-tiny", session_cache_dir)
    names = [*NAMES, "xstest", "advbench"]
    options = {"bbq": OPTIONS["bbq"]}
    runs = {scorer: run_benchmarks(names, model_dir, source, limit=14, seed=11, batch_size=8, max_gen_toks=24,
                                   work_dir=tmp_path / scorer, options=options, scorer=scorer)
            for scorer in ("hf", "shared")}
    for name in names:
        mine, theirs = runs["shared"][name], runs["hf"][name]
        assert mine.settings["model"] == "moe-fbs-shared" and theirs.settings["model"] == "hf"
        assert not _metrics_equal(dict(mine.metrics), dict(theirs.metrics)), name
        assert [i.pred for i in mine.items] == [i.pred for i in theirs.items], name
        assert [i.generation for i in mine.items] == [i.generation for i in theirs.items], name
        for a, b in zip(mine.items, theirs.items, strict=True):
            assert all(_close(x, y) for x, y in zip(b.loglikelihoods, a.loglikelihoods, strict=True)), name


def test_unknown_scorer_is_a_config_error(source: DataSource, tmp_path: Path) -> None:
    from fixtures.errors import ConfigError

    with pytest.raises(ConfigError, match="scorer must be one of"):
        run_benchmarks(["bbq"], tmp_path, source, limit=14, seed=0, work_dir=tmp_path, scorer="vllm-fast")


def test_a_model_whose_logits_are_not_the_plain_head_is_refused() -> None:
    """A soft-capped or scaled head would be scored wrongly by packing at the hidden state: refused, with the
    way out named."""
    from types import SimpleNamespace

    from benchmarks.fast_scoring import decoder_and_head
    from fixtures.errors import ModelError

    capped = SimpleNamespace(model=object(), lm_head=object(), config=SimpleNamespace(final_logit_softcapping=30.0))
    with pytest.raises(ModelError, match="--scorer hf"):
        decoder_and_head(capped)
    headless = SimpleNamespace(model=object(), config=SimpleNamespace())
    with pytest.raises(ModelError, match="lm_head"):
        decoder_and_head(headless)
