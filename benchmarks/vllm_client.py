"""Talk to a vLLM server (OpenAI-compatible completions API) for log-likelihoods and greedy generations.

Why a server and not the `vllm` package: vLLM pins compressed-tensors 0.17 and llmcompressor 0.19, so they
cannot share an environment (../shared/notes/lm-eval.md §5). `make vllm-env` builds `.venv-vllm`;
`benchmarks.vllm_server` serves a checkpoint from it. Requests carry token ids (the suite's own tokenization,
as lm-eval produced it), never text, so both sides score the same tokens.

- `loglikelihoods`: batches of (context + continuation) prompts with `prompt_logprobs=1`, `max_tokens=1`;
  the continuation's summed log-probs and whether each was the top-1 token (lm-eval's is_greedy: vLLM returns
  the rank of the prompt token). vLLM 0.32 does not read the prefix cache for prompt-logprob requests.
- `greedy`: T = 0 completions with `logprobs=k` and `return_tokens_as_token_ids`, giving token ids and the
  top-k raw log-probabilities per step (vLLM V1's default `raw_logprobs`, as the drift protocol records).
  A stop token ends a row and is part of its tokens, as in the HF engines.
Tested against the HF path by tests/test_vllm.py (`make test-vllm`).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Collection, Sequence
from typing import Any

from fixtures.errors import ModelError

URL_ENV = "MOE_FBS_VLLM_URL"
MODEL_ENV = "MOE_FBS_VLLM_MODEL"
BATCH = 64  # prompts per HTTP request: one engine step batch, small enough for any timeout


def _request(url: str, path: str, payload: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as exc:  # vLLM's 400s say why (e.g. a prompt over max_model_len)
        raise ModelError(f"vLLM server {url}{path}: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc
    return body


def _post(url: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    return _request(url, "/v1/completions", payload, timeout)


def served_models(url: str, timeout: float = 30.0) -> list[str]:
    """Model names the server answers to (`--served-model-name`, by default the path it was started with)."""
    return [str(entry["id"]) for entry in _request(url, "/v1/models", None, timeout)["data"]]


def _token_id(key: str) -> int:
    """`return_tokens_as_token_ids` spells tokens "token_id:123"."""
    return int(key.rsplit(":", 1)[1])


def loglikelihoods(url: str, model: str, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                   timeout: float = 600.0) -> list[tuple[float, bool]]:
    """(sum of log P(continuation | context), is_greedy) per token pair, in order."""
    results: list[tuple[float, bool]] = []
    for start in range(0, len(pairs), BATCH):
        chunk = pairs[start:start + BATCH]
        body = _post(url, {"model": model, "prompt": [[*c, *x] for c, x in chunk], "max_tokens": 1,
                           "temperature": 0.0, "prompt_logprobs": 1, "return_tokens_as_token_ids": True}, timeout)
        choices = sorted(body["choices"], key=lambda c: c["index"])
        for (context, continuation), choice in zip(chunk, choices, strict=True):
            scored = choice["prompt_logprobs"][len(context):]
            total, greedy_ok = 0.0, True
            for token, entry in zip(continuation, scored, strict=True):
                by_id = {int(k): v for k, v in entry.items()}
                total += float(by_id[token]["logprob"])
                greedy_ok &= int(by_id[token].get("rank", 1)) == 1
            results.append((total, greedy_ok))
    return results


TopK = list[list[tuple[int, float]]]  # per step: (token id, log-prob), most probable first


def greedy(url: str, model: str, prompts: Sequence[Sequence[int]], max_tokens: int, top_k: int = 20,
           stop_ids: Collection[int] = (), timeout: float = 600.0) -> list[tuple[list[int], TopK]]:
    """Greedy token ids and per-step top-k (id, log-prob) lists for each prompt, in order.

    `stop_ids`: tokens that end a row besides the tokenizer's EOS (the generation config's EOS ids)."""
    out: list[tuple[list[int], TopK]] = []
    for start in range(0, len(prompts), BATCH):
        chunk = prompts[start:start + BATCH]
        payload: dict[str, Any] = {"model": model, "prompt": [list(p) for p in chunk], "max_tokens": max_tokens,
                                   "temperature": 0.0, "logprobs": top_k, "return_tokens_as_token_ids": True}
        if stop_ids:
            payload["stop_token_ids"] = sorted(stop_ids)
        for choice in sorted(_post(url, payload, timeout)["choices"], key=lambda c: c["index"]):
            logprobs = choice["logprobs"]
            tokens = [_token_id(t) for t in logprobs["tokens"]]
            tops = [sorted(((_token_id(k), float(v)) for k, v in step.items()), key=lambda x: -x[1])
                    for step in logprobs["top_logprobs"]]
            out.append((tokens, tops))
    return out
