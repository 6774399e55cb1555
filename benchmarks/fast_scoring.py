"""`moe-fbs-shared`: lm-eval's HF model with shared-context log-likelihoods and batched greedy generation.

Why a subclass of lm-eval's `HFLM` rather than an own model: chat templates, stop sequences and
post-processing stay lm-eval's own code, so only the places where HFLM spends the time are replaced:

- `loglikelihood` tokenizes all requests of a call with batched fast-tokenizer calls and lm-eval's own split
  rule (`benchmarks.fast_tokenization`, the same token ids as `_encode_pair`; otherwise lm-eval's path).
- `_loglikelihood_tokens` receives the tokenized requests and scores them by prefix packing
  (`benchmarks.packing`): one copy of each context per group of requests sharing it, many groups per row,
  only the scored positions go through the LM head, log-softmax in `softmax_dtype` (fp32 in the audit).
  Results are (sum of log-probabilities, is_greedy) exactly as HFLM defines them; requests HFLM would
  left-truncate (longer than max_length + 1) and models with a sliding window go through HFLM itself.
- `generate_until` for greedy requests: large length-sorted batches through `benchmarks.fast_generation`
  instead of `model.generate` at lm-eval's batch size; sampled requests go through HFLM.

On CUDA, a checkpoint loaded from a path uses transformers' `grouped_mm` experts kernel unless model_args
name another `experts_implementation` (8.8x the default eager loop on a 30B MoE, ../shared/notes/gpu.md), and
then `benchmarks.fast_kernels` (the same experts' bits with fewer passes, GQA decoding without KV copies);
greedy decoding replays CUDA graphs over a static KV cache (`benchmarks.decode_steps`).

Model args beyond HFLM's: `pack_tokens` (row capacity, default 512), `batch_tokens` (rows x width per
forward; 2,048 on CPU, 32,768 on CUDA), `gen_batch_size` (generation rows per batch; 64 CPU, 512 CUDA:
520 rows of 100 new tokens ran next to a 57 GiB model on an 80 GiB H100).
`stats` counts what was forwarded: real tokens, padded slots, and the tokens lm-eval would have forwarded
for the same requests (`request_tokens`), so throughput can be reported both ways.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from benchmarks.architecture import sliding_window
from benchmarks.fast_generation import greedy_tokens
from benchmarks.fast_kernels import install
from benchmarks.fast_tokenization import batchable, encode_requests
from benchmarks.packing import attention_mask, batch_rows, layout_batch, pack_rows, plan_groups
from fixtures.errors import ModelError

MODEL_NAME = "moe-fbs-shared"
LMHEAD_CHUNK = 2048  # scored positions per LM-head matmul: bounds the [chunk, vocab] fp32 logits


@dataclass
class ScoringStats:
    """Work done by one model instance (all calls together)."""

    requests: int = 0
    groups: int = 0
    forwards: int = 0
    forwarded_tokens: int = 0
    padded_tokens: int = 0
    request_tokens: int = 0
    seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    fallback_requests: int = 0
    tokenization_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | dict(self.extra)


@register_model(MODEL_NAME)
class SharedContextLM(HFLM):
    """HFLM with shared-context scoring and batched greedy generation (see the module docstring)."""

    def __init__(self, pretrained: Any, pack_tokens: int = 512, batch_tokens: int | None = None,
                 gen_batch_size: int | None = None, **kwargs: Any) -> None:
        device = str(kwargs.get("device") or "cuda")
        on_cuda = device.startswith("cuda") and torch.cuda.is_available()
        if isinstance(pretrained, str) and on_cuda:
            kwargs.setdefault("experts_implementation", "grouped_mm")
        super().__init__(pretrained, **kwargs)
        self.pack_tokens = int(pack_tokens)
        self.batch_tokens = int(batch_tokens or (32768 if on_cuda else 2048))
        self.gen_batch_size = int(gen_batch_size or (512 if on_cuda else 64))
        if self.pack_tokens < 2 or self.batch_tokens < self.pack_tokens or self.gen_batch_size < 1:
            raise ValueError(f"need 2 <= pack_tokens <= batch_tokens and gen_batch_size >= 1, got "
                             f"{self.pack_tokens}, {self.batch_tokens}, {self.gen_batch_size}")
        self.stats = ScoringStats()
        if on_cuda:  # the model may also have been handed over loaded (benchmarks.perf.gpu_suite)
            self.stats.extra["kernels"] = install(self.model)

    # -- log-likelihoods --------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's tokenization rules (`TemplateLM.loglikelihood`, `_encode_pair`) with all distinct strings
        of the call encoded in batched fast-tokenizer calls (`benchmarks.fast_tokenization`: same token ids,
        tested); where that cannot be guaranteed, lm-eval's own per-request path with each distinct string
        encoded once per call (BBQ's context is encoded for each of its 12 choices otherwise)."""
        if not self.enable_thinking and batchable(self, (SharedContextLM.tok_encode,)):
            started = time.perf_counter()
            encoded = encode_requests(self, [tuple(r.args) for r in requests])
            self.stats.tokenization_seconds += time.perf_counter() - started
            return self._loglikelihood_tokens(encoded, disable_tqdm=disable_tqdm)
        self._encode_memo: dict[tuple[str, Any, Any], list[int]] | None = {}
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._encode_memo = None

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        memo = getattr(self, "_encode_memo", None)
        if memo is None or kwargs:
            return list(super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs))
        key = (string, add_special_tokens, left_truncate_len)
        if key not in memo:
            memo[key] = list(super().tok_encode(string, add_special_tokens, left_truncate_len))
        return list(memo[key])

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, override_bs: int | None = None,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        if self.backend != "causal" or not requests:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        started = time.perf_counter()
        fits = [len(c) + len(x) <= self.packable_length() for _, c, x in requests]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        slow = [i for i, ok in enumerate(fits) if not ok]
        if slow:
            for i, answer in zip(slow, super()._loglikelihood_tokens([requests[i] for i in slow],
                                                                      disable_tqdm=True), strict=True):
                results[i] = answer
        fast = [i for i, ok in enumerate(fits) if ok]
        scored = self._score_packed([(requests[i][1], requests[i][2]) for i in fast])
        for i, answer in zip(fast, scored, strict=True):
            results[i] = answer
            self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        self.stats.requests += len(requests)
        self.stats.fallback_requests += len(slow)
        self.stats.request_tokens += sum(min(len(c) + len(x) - 1, self.max_length) for _, c, x in requests)
        self.stats.seconds += time.perf_counter() - started
        return [r for r in results if r is not None]

    def packable_length(self) -> int:
        """The longest request (context + continuation tokens) scored packed; longer ones go to lm-eval's path.

        Beyond `max_length` lm-eval truncates. Under a sliding window a packed request sees only its context and
        its own tokens, all within its length of each other (positions restart per request, the 4-D mask hides
        the rest), so the window cannot cut anything out of a request no longer than the window: packed
        scoring equals the windowed reference there, and a longer request is scored by the reference."""
        window = sliding_window(self.model.config)
        return min(self.max_length + 1, window if window is not None else self.max_length + 1)

    def _score_packed(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """(summed log-prob, is_greedy) of each (context, continuation) token pair, in order."""
        if not pairs:
            return []
        groups = plan_groups(pairs, self.pack_tokens)
        self.stats.groups += len(groups)
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        decoder, head = decoder_and_head(self.model)
        dtype = next(self.model.parameters()).dtype
        with torch.inference_mode():
            for batch in batch_rows(pack_rows(groups, self.pack_tokens), self.batch_tokens):
                layout = layout_batch(batch, pad)
                ids = torch.tensor(layout.input_ids, device=self.device)
                positions = torch.tensor(layout.positions, device=self.device)
                mask = attention_mask(layout, dtype, self.device)
                hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                                 use_cache=False).last_hidden_state
                self._gather_scores(hidden.reshape(-1, hidden.shape[-1]), head, layout.placed, out)
                self.stats.forwards += 1
                self.stats.forwarded_tokens += layout.real_tokens
                self.stats.padded_tokens += len(layout.input_ids) * layout.width
        return out

    def _gather_scores(self, hidden: torch.Tensor, head: torch.nn.Module, placed: Sequence[Any],
                       out: list[tuple[float, bool]]) -> None:
        """LM head + log-softmax on the distinct scored positions only, then per-request sums."""
        unique = sorted({p for item in placed for p in item.positions})
        slot = {p: i for i, p in enumerate(unique)}
        rows = torch.tensor([slot[p] for item in placed for p in item.positions], device=hidden.device)
        targets = torch.tensor([t for item in placed for t in item.targets], device=hidden.device)
        owner = torch.tensor([n for n, item in enumerate(placed) for _ in item.targets], device=hidden.device)
        index = torch.tensor(unique, device=hidden.device)
        picked = torch.empty(len(targets), dtype=torch.float64, device=hidden.device)
        greedy_ok = torch.empty(len(targets), dtype=torch.bool, device=hidden.device)
        for start in range(0, len(unique), LMHEAD_CHUNK):
            chunk = index[start:start + LMHEAD_CHUNK]
            logprobs = F.log_softmax(head(hidden[chunk]), dim=-1, dtype=self.softmax_dtype)
            argmax = logprobs.argmax(dim=-1)
            use = (rows >= start) & (rows < start + len(chunk))
            local = rows[use] - start
            picked[use] = logprobs[local, targets[use]].double()
            greedy_ok[use] = argmax[local] == targets[use]
        # lm-eval sums a request's fp32 token log-probs in fp32; summing in fp64 differs by < 1e-6.
        sums = torch.zeros(len(placed), dtype=torch.float64, device=hidden.device).index_add_(0, owner, picked)
        misses = torch.zeros(len(placed), dtype=torch.long, device=hidden.device).index_add_(
            0, owner, (~greedy_ok).long())
        for item, total, miss in zip(placed, sums.tolist(), misses.tolist(), strict=True):
            out[item.request] = (float(total), miss == 0)

    # -- generation -------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy requests in large length-sorted batches; anything sampled goes through HFLM."""
        if self.backend != "causal" or not requests:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        started = time.perf_counter()
        results: list[str | None] = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_kwargs.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        for members in by_kwargs.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if kwargs.pop("do_sample", False) or kwargs.pop("temperature", 0.0) or kwargs:
                for i, text in zip(members, super().generate_until([requests[i] for i in members], True),
                                   strict=True):
                    results[i] = text
                continue
            contexts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen):] for i in members]
            tokens = self._greedy_continuations(contexts, max_gen)
            self.stats.generated_tokens += sum(len(t) for t in tokens)
            for i, cont in zip(members, tokens, strict=True):
                results[i] = self._finish_text(cont, until)
                self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
        self.stats.generation_seconds += time.perf_counter() - started
        return [r if r is not None else "" for r in results]

    def _greedy_continuations(self, contexts: list[list[int]], max_gen: int) -> list[list[int]]:
        """Greedy new tokens per context (a final stop token included); `benchmarks.vllm_lm` asks its server."""
        return greedy_tokens(self.model, contexts, max_new_tokens=max_gen, stop_ids=self._stop_ids(),
                             pad_id=self._pad_id(), batch_size=self.gen_batch_size, device=str(self.device))

    def _finish_text(self, cont: list[int], until: list[str]) -> str:
        """HFLM.generate_until's tail: thinking-token split, decode, stop-sequence cut."""
        if isinstance(self.think_end_token, int):
            marks = [i for i, t in enumerate(cont) if t == self.think_end_token]
            cont = cont[marks[-1] + 1:] if marks else cont
        text = self.tok_decode(cont)
        if isinstance(self.think_end_token, int):
            text = text.lstrip()
        think = self.think_end_token if isinstance(self.think_end_token, str) else None
        return str(postprocess_generated_text(generation=text, stop=until, think_end_token=think))

    def _stop_ids(self) -> frozenset[int]:
        """What `model.generate` stops a row on: the generation config's EOS ids (lm-eval's stop strings
        are applied to the text afterwards, which gives the same text)."""
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.eot_token_id
        return frozenset([eos] if isinstance(eos, int) else eos)

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else min(self._stop_ids()))


def decoder_and_head(model: Any) -> tuple[Any, torch.nn.Module]:
    """The decoder stack and LM head of a `...ForCausalLM` whose logits are `lm_head(hidden)` (every MoE
    family the audit knows); anything else is refused rather than scored with the wrong head."""
    decoder, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    scaled = any(getattr(model.config, name, None) for name in ("final_logit_softcapping", "logit_scale"))
    if decoder is None or head is None or scaled:
        raise ModelError(f"{type(model).__name__}: shared-context scoring needs logits = lm_head(hidden); "
                         "audit this model with --scorer hf")
    return decoder, head
