"""Batched generation with per-step top-k log-probabilities, for the behavioural-drift protocol.

Why an own decode loop instead of `model.generate`: the protocol needs (a) per-prompt random streams so a
checkpoint and its dense model sample with *common random numbers* (any difference in their outputs then
comes from the models, not from the dice), (b) the same stream whatever batch a prompt lands in, and (c) the
top-k of the raw distribution at every step. `generate` draws from one global generator across the batch.

Conventions (documented here because the drift metrics depend on them):
- Prompts are the tokenizer's chat template with `add_generation_prompt=True` and `enable_thinking=False`
  (a Jinja variable: templates that do not use it ignore it). Batches are left-padded with explicit
  position ids, so a padded row sees the same positions as an unpadded one.
- T = 0 is greedy (argmax, lowest token id on ties). T > 0 samples softmax(logits / T), nucleus-filtered
  when top_p < 1, by the exponential race argmax(p / E) with E ~ Exp(1) drawn from the row's own
  `torch.Generator`, seeded from sha256(seed, prompt_id, temperature): the draws depend on the prompt and
  the step only, never on the batch.
- Recorded log-probabilities are those of the **raw** model distribution (fp32 log-softmax of the logits,
  before temperature and top-p), as vLLM V1 returns for `logprobs=20` with its default
  `logprobs_mode="raw_logprobs"` (V1's sampler computes them before any processing; V0 returned processed
  ones). At T = 0 raw and processed coincide up to the argmax.
- Generation stops after a stop token (the generation config's EOS ids, the tokenizer's EOS and the chat
  end-of-turn token when the vocabulary has one), which is kept as the last generated token, because the
  decision to stop is behaviour too; `finish` says "stop" or "length".
Batch invariance: the random streams are exactly batch-invariant; the logits are not guaranteed to be (the
padded width and which tokens share an expert's matmul change float summation order), so a near-tie can
flip between batch compositions. Rows are batched in a fixed order (sorted by prompt length), so a given
prompt set, batch size and device always give the same bits on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fixtures.errors import ModelError
from fixtures.hashing import sha256_json

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that changes a generation's bits except the model and the prompts (part of cache keys)."""

    temperatures: tuple[float, ...] = (0.0, 0.7)
    max_new_tokens: int = 100
    seed: int = 42
    top_p: float = 1.0
    top_logprobs: int = 20
    batch_size: int = 16
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be a non-empty list of values >= 0, got {self.temperatures}")
        if len(set(self.temperatures)) != len(self.temperatures):
            raise ValueError(f"temperatures must be distinct, got {self.temperatures}")
        if self.max_new_tokens < 1 or self.top_logprobs < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens, top_logprobs and batch_size must be >= 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def to_json(self) -> dict[str, Any]:
        return {"temperatures": list(self.temperatures), "max_new_tokens": self.max_new_tokens,
                "seed": self.seed, "top_p": self.top_p, "top_logprobs": self.top_logprobs,
                "batch_size": self.batch_size, "dtype": self.dtype, "logprobs_mode": "raw_logprobs"}


@dataclass(frozen=True)
class Generation:
    """One continuation: `token_ids` [T], `top_ids`/`top_logprobs` [T, k] (raw distribution, descending)."""

    prompt_id: str
    temperature: float
    prompt_ids: tuple[int, ...]
    token_ids: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    finish: str  # "stop" | "length"

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def same_tokens(self, other: Generation) -> bool:
        return self.prompt_ids == other.prompt_ids and np.array_equal(self.token_ids, other.token_ids)


def row_seed(seed: int, prompt_id: str, temperature: float) -> int:
    """The row's generator seed: a function of the prompt and temperature only (common random numbers)."""
    return int(sha256_json([seed, prompt_id, float(temperature)])[:15], 16)


def load_causal_lm(model_dir: Path, device: str, dtype: str = "float32") -> tuple[PreTrainedModel, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fixtures.distribution import load_placement

    # On CUDA the grouped_mm experts kernel: 8.8x transformers' default loop on a 30B MoE (docs/performance.md);
    # weights straight onto the GPU(s) `load_placement` picks (split over several when one is too small).
    extra = {"experts_implementation": "grouped_mm"} if device.startswith("cuda") else {}
    placement = load_placement(model_dir, device)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), **extra, **placement)
    if not placement:
        model.to(device)
    model.eval()
    if device.startswith("cuda"):
        from benchmarks.fast_kernels import install

        install(model)  # the same bits as grouped_mm experts, fewer passes; GQA decode without KV copies
    return model, AutoTokenizer.from_pretrained(model_dir)


def encode_chat(tokenizer: PreTrainedTokenizerBase,
                messages: Sequence[Sequence[dict[str, str]]]) -> list[tuple[int, ...]]:
    """Token ids of each conversation rendered by the chat template, ready for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("the drift protocol prompts through the chat template, and this tokenizer has none")
    encoded = []
    for conversation in messages:
        text = tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
        encoded.append(tuple(tokenizer(str(text), add_special_tokens=False)["input_ids"]))
    return encoded


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is not None:
            ids.update([source] if isinstance(source, int) else source)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    if not ids:
        raise ModelError("no stop token: neither the generation config nor the tokenizer names an EOS")
    return frozenset(ids)


def _choose(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    import torch

    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs * (before < top_p))
    race = torch.empty_like(probs).exponential_(generator=generator)
    return int(torch.argmax(probs / race))


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[tuple[int, ...]],
             prompt_keys: Sequence[str], settings: GenerationSettings, device: str,
             engine: str = "fast") -> list[Generation]:
    """Generate every (prompt, temperature) pair; returns them prompt-major, temperatures in settings order.

    `engine`: "fast" (`benchmarks.fast_generation`, batched on the device) or "reference" (the per-row loop
    below, kept as the specification the fast engine is tested against); same batches, same bits on CPU."""
    import torch

    if engine not in ("fast", "reference"):
        raise ValueError(f"engine must be 'fast' or 'reference', got {engine!r}")
    run_batch = _generate_batch_fast if engine == "fast" else _generate_batch

    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    requests = [(i, t) for i in range(len(prompt_ids)) for t in settings.temperatures]
    order = sorted(range(len(requests)), key=lambda r: len(prompt_ids[requests[r][0]]))
    results: dict[int, Generation] = {}
    with torch.inference_mode():
        for start in range(0, len(order), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            rows = [requests[r] for r in batch]
            outs = run_batch(model, [prompt_ids[i] for i, _ in rows],
                                   [(prompt_keys[i], t) for i, t in rows], settings, stops, pad, device)
            results.update(zip(batch, outs, strict=True))
    return [results[r] for r in range(len(requests))]


def _generate_batch_fast(model: PreTrainedModel, prompts: list[tuple[int, ...]], keys: list[tuple[str, float]],
                         settings: GenerationSettings, stops: frozenset[int], pad: int,
                         device: str) -> list[Generation]:
    import torch

    from benchmarks.fast_generation import decode_batch

    generators = [torch.Generator(device=device).manual_seed(row_seed(settings.seed, key, temperature))
                  if temperature > 0 else None for key, temperature in keys]
    rows = decode_batch(model, prompts, max_new_tokens=settings.max_new_tokens, stop_ids=stops, pad_id=pad,
                        device=device, temperatures=[t for _, t in keys], top_p=settings.top_p,
                        generators=generators, top_k=settings.top_logprobs)
    return [Generation(prompt_id=key, temperature=temperature, prompt_ids=prompt, token_ids=row.tokens,
                       top_ids=row.top_ids, top_logprobs=row.top_logprobs,
                       finish="stop" if row.stopped else "length")
            for prompt, (key, temperature), row in zip(prompts, keys, rows, strict=True)]


def _generate_batch(model: PreTrainedModel, prompts: list[tuple[int, ...]], keys: list[tuple[str, float]],
                    settings: GenerationSettings, stops: frozenset[int], pad: int, device: str) -> list[Generation]:
    import torch

    from benchmarks.fast_generation import left_pad

    ids, mask, positions = left_pad(prompts, pad, device)
    generators = [torch.Generator(device=device).manual_seed(row_seed(settings.seed, key, temperature))
                  for key, temperature in keys]
    tokens: list[list[int]] = [[] for _ in prompts]
    tops: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    cache = None
    step_ids, step_positions = ids, positions
    for _ in range(settings.max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        top = logprobs.topk(settings.top_logprobs, dim=-1)
        top_values, top_indices = top.values.cpu().numpy(), top.indices.cpu().numpy()
        chosen = []
        for row, (_, temperature) in enumerate(keys):
            if done[row]:
                chosen.append(pad)
                continue
            token = _choose(logits[row], temperature, settings.top_p, generators[row])
            tokens[row].append(token)
            tops[row].append((top_indices[row].astype(np.int32), top_values[row].astype(np.float32)))
            done[row] = token in stops
            chosen.append(token)
        if all(done):
            break
        step_ids = torch.tensor(chosen, dtype=torch.long, device=device)[:, None]
        step_positions = step_positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    k = settings.top_logprobs
    return [
        Generation(prompt_id=key, temperature=temperature, prompt_ids=prompt,
                   token_ids=np.asarray(tokens[row], dtype=np.int64),
                   top_ids=np.asarray([t[0] for t in tops[row]], dtype=np.int32).reshape(-1, k),
                   top_logprobs=np.asarray([t[1] for t in tops[row]], dtype=np.float32).reshape(-1, k),
                   finish="stop" if done[row] else "length")
        for row, (prompt, (key, temperature)) in enumerate(zip(prompts, keys, strict=True))
    ]


def save_generations(path: Path, generations: Sequence[Generation]) -> None:
    """One .npz: ragged arrays concatenated with offsets (compact and exact, unlike JSON floats)."""
    if not generations:
        raise ValueError("no generations to save")
    lengths = np.asarray([g.n_tokens for g in generations], dtype=np.int64)
    prompt_lengths = np.asarray([len(g.prompt_ids) for g in generations], dtype=np.int64)
    np.savez_compressed(
        path,
        prompt_id=np.asarray([g.prompt_id for g in generations], dtype=str),
        temperature=np.asarray([g.temperature for g in generations], dtype=np.float64),
        finish=np.asarray([g.finish for g in generations], dtype=str),
        lengths=lengths, prompt_lengths=prompt_lengths,
        prompt_ids=np.concatenate([np.asarray(g.prompt_ids, dtype=np.int64) for g in generations]),
        token_ids=np.concatenate([g.token_ids for g in generations]).astype(np.int64),
        top_ids=np.concatenate([g.top_ids for g in generations]).astype(np.int32),
        top_logprobs=np.concatenate([g.top_logprobs for g in generations]).astype(np.float32),
    )


def load_generations(path: Path) -> list[Generation]:
    with np.load(path, allow_pickle=False) as npz:
        data = {name: npz[name] for name in npz.files}  # each npz[name] access decompresses again
    ends, prompt_ends = np.cumsum(data["lengths"]), np.cumsum(data["prompt_lengths"])
    starts, prompt_starts = ends - data["lengths"], prompt_ends - data["prompt_lengths"]
    return [
        Generation(prompt_id=str(data["prompt_id"][i]), temperature=float(data["temperature"][i]),
                   prompt_ids=tuple(int(x) for x in data["prompt_ids"][prompt_starts[i]:prompt_ends[i]]),
                   token_ids=data["token_ids"][starts[i]:ends[i]].copy(),
                   top_ids=data["top_ids"][starts[i]:ends[i]].copy(),
                   top_logprobs=data["top_logprobs"][starts[i]:ends[i]].copy(), finish=str(data["finish"][i]))
        for i in range(len(data["lengths"]))
    ]
