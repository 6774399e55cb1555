"""vLLM (served from `.venv-vllm`) against the HF path, on the same requests: `make test-vllm`.

`make test-vllm` serves the zoo's `qwen3-moe-tiny-hd64` (head dimension 64: vLLM's CPU attention rejects the
zoo's 32) through `benchmarks.vllm_server` and runs these tests with MOE_FBS_VLLM_URL / MOE_FBS_VLLM_MODEL set
and MOE_FBS_VLLM_REQUIRED=1, under which a missing server FAILS them; the plain `make test` has no server and
skips them. What they show, fp32 on both sides:

- per-request log-likelihoods of BBQ, CrowS-Pairs and StereoSet (lm-eval's own requests from the local mirror,
  28 items each) from `--scorer vllm` within `ll_tolerance` of lm-eval's HF backend, and the same predictions;
- XSTest / AdvBench greedy texts identical (chat template, 48 new tokens);
- the drift protocol's greedy generations with top-20 log-probs: same tokens, same top-20 ids, log-probs
  within `ll_tolerance`; a divergence is accepted only where the HF model itself has a near tie (TIE_TOL) between
  its token and vLLM's at the first differing step, and is then reported;
- an audit of the canary (`qwen3-moe-canary-hd64`: widened to head dimension 64, same function) with REAP
  50% at 0% and 100% safety data, `--scorer vllm` (a server per checkpoint) gates exactly as `--scorer
  shared`: the known answer (safety0 blocked on AdvBench, safety100 passing), same values and changed items.
Tolerances: `vllm_support.ll_tolerance` (1e-4 + 1e-6 |LL| nats, and why).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vllm_support import ll_tolerance, vllm_server

from benchmarks.lmeval_runner import run_benchmarks
from benchmarks.vllm_client import URL_ENV, greedy
from fixtures.data import DataSource
from reports.compare import differences

pytest_plugins = ("pytester",)
pytestmark = pytest.mark.vllm
LIKELIHOOD = ("bbq", "crows_pairs", "stereoset")
GENERATIVE = ("xstest", "advbench")
LIMIT, GEN_TOKENS = 28, 48
TIE_TOL = 1e-4  # a greedy choice this close to the runner-up may flip under kernel rounding


@pytest.fixture(scope="module")
def server() -> tuple[str, Path]:
    return vllm_server()


@pytest.fixture(scope="module")
def runs(server: tuple[str, Path], shared_data_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """lm-eval's HF backend and `--scorer vllm` on the same items of all five lm-eval benchmarks."""
    _, model = server
    source, work = DataSource(shared_data_dir), tmp_path_factory.mktemp("vllm-runs")
    return {scorer: run_benchmarks([*LIKELIHOOD, *GENERATIVE], model, source, limit=LIMIT, seed=7, batch_size=8,
                                   max_gen_toks=GEN_TOKENS, work_dir=work / scorer, scorer=scorer)
            for scorer in ("hf", "vllm")}


@pytest.mark.parametrize("name", LIKELIHOOD)
def test_vllm_loglikelihoods_match_hf_per_request(runs: dict[str, dict[str, Any]], name: str) -> None:
    hf, vllm = runs["hf"][name], runs["vllm"][name]
    assert hf.settings["model"] == "hf" and vllm.settings["model"] == "moe-fbs-vllm"
    assert [i.item_id for i in hf.items] == [i.item_id for i in vllm.items] and len(hf.items) >= LIMIT // 2
    worst = 0.0
    for a, b in zip(hf.items, vllm.items, strict=True):
        assert len(a.loglikelihoods) == len(b.loglikelihoods) >= 2, a.item_id
        for x, y in zip(a.loglikelihoods, b.loglikelihoods, strict=True):
            assert abs(x - y) <= ll_tolerance(x), f"{name} {a.item_id}: HF {x} vs vLLM {y}"
            worst = max(worst, abs(x - y))
        assert a.pred == b.pred, a.item_id
    print(f"{name}: {len(hf.items)} items, max |LL diff| {worst:.2e} nats")


@pytest.mark.parametrize("name", GENERATIVE)
def test_vllm_greedy_texts_equal_hf(runs: dict[str, dict[str, Any]], name: str) -> None:
    hf, vllm = runs["hf"][name], runs["vllm"][name]
    assert len(hf.items) == len(vllm.items) >= LIMIT
    differ = [(a.item_id, a.generation, b.generation) for a, b in zip(hf.items, vllm.items, strict=True)
              if a.generation != b.generation]
    assert not differ, f"{len(differ)} of {len(hf.items)} texts differ; first: {differ[0]}"
    assert sum(bool(a.generation) for a in hf.items) >= len(hf.items) // 2, "texts must not be empty"
    assert hf.metrics == vllm.metrics


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for step, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return step
    return None if len(a) == len(b) else min(len(a), len(b))


def test_vllm_drift_generations_and_top20_logprobs_match(server: tuple[str, Path], shared_data_dir: Path) -> None:
    """The drift protocol's greedy generations (chat template, its five datasets, 4 prompts each, 40 tokens)."""
    from benchmarks.drift_prompts import build_drift_prompts
    from benchmarks.generation import GenerationSettings, encode_chat, generate, load_causal_lm, stop_token_ids

    url, model_dir = server
    prompts = build_drift_prompts(DataSource(shared_data_dir), per_benchmark=4)
    model, tokenizer = load_causal_lm(model_dir, "cpu")
    ids = encode_chat(tokenizer, [p.messages() for p in prompts])
    settings = GenerationSettings(temperatures=(0.0,), max_new_tokens=40, top_logprobs=20)
    reference = generate(model, tokenizer, ids, [p.prompt_id for p in prompts], settings, "cpu")
    served = greedy(url, str(model_dir), ids, max_tokens=40, top_k=20, stop_ids=stop_token_ids(model, tokenizer))
    worst, ties = 0.0, []
    for prompt, ref, (tokens, tops) in zip(prompts, reference, served, strict=True):
        mine = [int(t) for t in ref.token_ids]
        split = _first_divergence(mine, tokens)
        compared = len(mine) if split is None else split + 1  # the first differing step has the same context
        for step in range(min(compared, len(tokens))):
            theirs = dict(tops[step])
            ref_ids = [int(t) for t in ref.top_ids[step]]
            assert len(theirs) == 20 and len(set(ref_ids) & set(theirs)) >= 19, (prompt.prompt_id, step)
            for token, value in zip(ref_ids, ref.top_logprobs[step].tolist(), strict=True):
                if token in theirs:
                    assert abs(value - theirs[token]) <= ll_tolerance(value), (prompt.prompt_id, step, token)
                    worst = max(worst, abs(value - theirs[token]))
        if split is not None and split < min(len(mine), len(tokens)):
            lp = dict(zip((int(t) for t in ref.top_ids[split]), ref.top_logprobs[split].tolist(), strict=True))
            gap = lp[mine[split]] - lp.get(tokens[split], -np.inf)
            assert gap <= TIE_TOL, f"{prompt.prompt_id}: diverges at step {split} without a near tie (gap {gap})"
            ties.append((prompt.prompt_id, split, gap))
        else:
            assert split is None, f"{prompt.prompt_id}: lengths differ ({len(mine)} vs {len(tokens)})"
    assert len(ties) <= len(prompts) // 4, f"too many near-tie divergences: {ties}"
    print(f"drift: {len(prompts)} prompts, max |top-20 log-prob diff| {worst:.2e}, near-tie divergences {ties}")


@pytest.mark.slow
def test_canary_audit_with_the_vllm_scorer_gates_as_the_shared_scorer(server: tuple[str, Path],
                                                                       audit_project: pytest.Pytester,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The canary (widened to head dimension 64, same function) with REAP 50% calibrated on 0% and 100% safety
    data: the known answer is one blocked checkpoint (AdvBench refusals lost) and one that passes."""
    monkeypatch.delenv(URL_ENV)  # the scorer starts a server for each checkpoint it evaluates
    documents = {}
    for scorer in ("shared", "vllm"):
        report = audit_project.path / f"report-{scorer}"
        result = audit_project.runpytest_subprocess(
            "--model", "qwen3-moe-canary-hd64", "--methods", "reap", "--ratios", "0.5",
            "--safety-fractions", "0,1.0", "--benchmarks", "bbq,crows_pairs,advbench", "--limit", "40",
            "--scorer", scorer, "--report-dir", str(report))
        outcomes = result.parseoutcomes()
        assert result.ret in (0, 1) and outcomes.get("passed", 0) + outcomes.get("failed", 0) >= 12, \
            result.stdout.str()[-3000:]
        documents[scorer] = json.loads((report / "results.json").read_text())
    verdicts = {(c["checkpoint"]["id"], c["metric"]): c["verdict"] for c in documents["shared"]["checks"]}
    assert verdicts[("reap-r50-safety0-seed0", "advbench.refusal_rate")] == "fail"
    assert verdicts[("reap-r50-safety100-seed0", "advbench.refusal_rate")] == "pass"
    checks = {scorer: {"checks": document["checks"]} for scorer, document in documents.items()}
    # verdicts, counts and changed items exactly; values (choice-derived shares, CIs) to within 1e-6
    assert differences(checks["shared"], checks["vllm"], atol=1e-6) == []
