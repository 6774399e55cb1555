"""Behavioural drift: a checkpoint's own generations scored by its dense model (the paper's second finding).

Why: a compressed model can keep its benchmark scores while what it *writes* moves away from the dense
model. The protocol generates from the checkpoint and from the dense model on one fixed prompt set
(`benchmarks.drift_prompts`) and scores both under the dense model:

- cross-NLL H(y|p) = -1/T sum_t log P_dense(y_t | p, y_<t) over the T generated tokens only (the prompt is
  context, not scored; a final stop token counts), teacher-forced, fp32 log-softmax; cross-perplexity
  exp(H) per generation, averaged over prompts;
- delta cross-NLL = H(checkpoint's output) - H(dense model's own output), per prompt and temperature; with
  common random numbers (`benchmarks.generation`) a model identical to the dense one gives exactly 0;
- top-k entropy proxy: per step, the entropy of the top-20 raw log-probabilities renormalised over their
  own mass, averaged over the generation's steps; delta entropy against the dense model's generation.
Means are over prompts, per temperature, overall and per dataset (metric suffix ".<dataset>").

A sequence that is token-identical to the dense model's generation for the same prompt and temperature reuses
the dense score instead of being re-scored in another batch: one sequence has one cross-NLL, and batching
rounding must not turn "no drift" into a 1e-7 drift.

Cost: dense generations and every dense scoring are cached (`ArtifactCache` kinds "drift-generations" and
"drift-scores", keyed by model fingerprints, the prompt-set fingerprint, the settings and library versions),
so each run generates once from the checkpoint and scores only its new sequences.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.drift_prompts import DriftPromptSet
from benchmarks.fast_generation import left_pad
from benchmarks.fast_kernels import engine_key
from benchmarks.generation import (
    Generation,
    GenerationSettings,
    encode_chat,
    generate,
    load_causal_lm,
    load_generations,
    save_generations,
)
from benchmarks.records import BenchmarkResult, ItemRecord
from fixtures.cache import ArtifactCache
from fixtures.errors import ModelError
from fixtures.hashing import sha256_json
from fixtures.zoo import model_fingerprint as fingerprint_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel

BENCHMARK = "drift"
PROTOCOL = "moe-fbs-audit/drift/v1"
_PER_PROMPT = ("cross_nll", "cross_ppl", "delta_cross_nll", "entropy", "delta_entropy", "mean_tokens", "identical")


def temperature_label(temperature: float) -> str:
    """"t0", "t0.7": the temperature part of every metric name."""
    return f"t{temperature:g}"


def metric_names(temperatures: Sequence[float], datasets: Sequence[str] = ()) -> tuple[str, ...]:
    """Every metric a drift result holds: per temperature overall, then per dataset ("<name>.<dataset>")."""
    overall = tuple(f"{m}_{temperature_label(t)}" for t in temperatures for m in _PER_PROMPT)
    return overall + tuple(f"{name}.{d}" for d in datasets for name in overall)


def topk_entropy(top_logprobs: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row's top-k distribution renormalised over its returned mass: [..., k] -> [...].

    Renormalising makes the proxy independent of how much mass lies outside the top k; k equal entries give
    log k. -inf entries (zero probability) contribute 0.
    """
    lp = np.asarray(top_logprobs, dtype=np.float64)
    peak = np.max(lp, axis=-1, keepdims=True)
    shifted = lp - peak
    log_norm = np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
    log_p = shifted - log_norm
    p = np.exp(log_p)
    terms = np.where(p > 0, -p * np.where(p > 0, log_p, 0.0), 0.0)
    return np.asarray(np.sum(terms, axis=-1))


def mean_step_entropy(generation: Generation) -> float:
    """The generation's entropy proxy: the top-k entropy averaged over its steps (NaN with no steps)."""
    if generation.n_tokens == 0:
        return math.nan
    return float(np.mean(topk_entropy(generation.top_logprobs)))


def score_continuations(model: PreTrainedModel, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                        *, pad_id: int, batch_size: int, device: str) -> list[float]:
    """Summed log P_model(continuation | prompt), teacher-forced, fp32 log-softmax, prompt masked.

    Rows are left-padded, so every continuation ends at the last position and only the last max(T)+1
    positions' logits are computed (`logits_to_keep`): memory grows with T, not with the prompt.
    """
    import torch

    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    sums: dict[int, float] = {}
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            lengths = [len(pairs[i][1]) for i in batch]
            keep = max(lengths) + 1
            ids, mask, positions = left_pad([tuple(pairs[i][0]) + tuple(pairs[i][1]) for i in batch], pad_id,
                                            device)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           logits_to_keep=keep).logits
            for row, (index, length) in enumerate(zip(batch, lengths, strict=True)):
                if length == 0:
                    sums[index] = 0.0
                    continue
                window = logits[row, keep - length - 1:keep - 1].float()
                targets = torch.as_tensor(list(pairs[index][1]), dtype=torch.long, device=window.device)
                picked = torch.log_softmax(window, dim=-1).gather(-1, targets[:, None])[:, 0]
                sums[index] = float(picked.double().sum())
    return [sums[i] for i in range(len(pairs))]


class _Models:
    """Loads a model only when something is not cached, and keeps one model in memory at a time."""

    def __init__(self, dense_dir: Path, device: str, dtype: str) -> None:
        self.dense_dir, self.device, self.dtype = dense_dir, device, dtype
        self._loaded: dict[Path, tuple[PreTrainedModel, Any]] = {}

    def get(self, path: Path) -> tuple[PreTrainedModel, Any]:
        if path not in self._loaded:
            self._loaded.clear()
            self._loaded[path] = load_causal_lm(path, self.device, self.dtype)
        return self._loaded[path]


def _versions() -> dict[str, str]:
    """The libraries that change generation and scoring numerics (compressed-tensors decompresses
    quantized checkpoints at load): part of every drift cache key."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "compressed-tensors"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "absent"
    return found


def _generations(models: _Models, path: Path, fingerprint: str, prompts: DriftPromptSet,
                 prompt_ids: list[tuple[int, ...]], settings: GenerationSettings,
                 cache: ArtifactCache | None) -> tuple[list[Generation], str]:
    key = sha256_json({"protocol": PROTOCOL, "model": fingerprint, "prompts": prompts.fingerprint,
                       "prompt_ids": sha256_json(prompt_ids), "settings": settings.to_json(),
                       "device": models.device, "versions": _versions(), **engine_key(models.device)})

    def compute() -> list[Generation]:
        model, tokenizer = models.get(path)
        return generate(model, tokenizer, prompt_ids, [p.prompt_id for p in prompts], settings, models.device)

    if cache is None:
        return compute(), key

    def build(out: Path) -> dict[str, Any]:
        started = time.perf_counter()
        save_generations(out / "generations.npz", compute())
        return {"protocol": PROTOCOL, "model": fingerprint, "prompts": prompts.to_json(),
                "settings": settings.to_json(), "device": models.device,
                "generation_seconds": round(time.perf_counter() - started, 3)}

    entry = cache.get_or_build("drift-generations", key, build)
    return load_generations(entry.path / "generations.npz"), key


def _dense_scores(models: _Models, dense_fp: str, generations: list[Generation], generations_key: str,
                  settings: GenerationSettings, reuse: list[float | None], cache: ArtifactCache | None) -> list[float]:
    """Dense log-likelihood of every generation; entries of `reuse` that are set are taken as they are."""

    def compute() -> list[float]:
        todo = [i for i, known in enumerate(reuse) if known is None]
        merged = list(reuse)
        if todo:
            model, tokenizer = models.get(models.dense_dir)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            pairs = [(generations[i].prompt_ids, generations[i].token_ids.tolist()) for i in todo]
            scored = score_continuations(model, pairs, pad_id=pad, batch_size=settings.batch_size,
                                         device=models.device)
            for i, value in zip(todo, scored, strict=True):
                merged[i] = value
        return [float(x) for x in merged if x is not None]

    if cache is None:
        return compute()
    key = sha256_json({"protocol": PROTOCOL, "scorer": dense_fp, "generations": generations_key,
                       "batch_size": settings.batch_size, "dtype": settings.dtype, "device": models.device,
                       "versions": _versions(), **engine_key(models.device)})
    entry = cache.get_or_build("drift-scores", key, lambda out: {"log_likelihoods": compute(),
                                                                 "scorer": dense_fp})
    return [float(x) for x in entry.manifest["log_likelihoods"]]


def run_drift(dense_dir: Path, model_dir: Path | None, prompts: DriftPromptSet, *,
              temperatures: Sequence[float] = (0.0, 0.7), max_new_tokens: int = 100, seed: int = 42,
              device: str = "cpu", batch_size: int = 64, top_p: float = 1.0, top_logprobs: int = 20,
              dtype: str = "float32", cache: ArtifactCache | None = None, dense_fingerprint: str | None = None,
              fingerprint: str | None = None) -> BenchmarkResult:
    """The drift result of `model_dir` (None: the dense model itself) against `dense_dir`.

    Fingerprints default to `fixtures.zoo.model_fingerprint` (hashing the weights); pass the ones the
    session already has to skip re-hashing large checkpoints.
    """
    started = time.perf_counter()
    settings = GenerationSettings(tuple(float(t) for t in temperatures), max_new_tokens, seed, top_p,
                                  top_logprobs, batch_size, dtype)
    dense_dir = Path(dense_dir)
    target_dir = dense_dir if model_dir is None else Path(model_dir)
    dense_fp = dense_fingerprint or fingerprint_of(dense_dir)
    target_fp = dense_fp if model_dir is None else (fingerprint or fingerprint_of(target_dir))
    models = _Models(dense_dir, device, dtype)
    dense_tokenizer = _tokenizer(dense_dir)
    tokenizer = dense_tokenizer if target_dir == dense_dir else _tokenizer(target_dir)
    prompt_ids = _prompt_ids(dense_tokenizer, tokenizer, prompts, target_dir)

    dense_gens, dense_key = _generations(models, dense_dir, dense_fp, prompts, prompt_ids, settings, cache)
    dense_lls = _dense_scores(models, dense_fp, dense_gens, dense_key, settings, [None] * len(dense_gens), cache)
    if model_dir is None:
        gens, lls = dense_gens, dense_lls
    else:
        gens, key = _generations(models, target_dir, target_fp, prompts, prompt_ids, settings, cache)
        reuse = [ll if g.same_tokens(d) else None for g, d, ll in zip(gens, dense_gens, dense_lls, strict=True)]
        lls = _dense_scores(models, dense_fp, gens, key, settings, reuse, cache)
    items = _items(prompts, settings, gens, lls, dense_gens, dense_lls, tokenizer)
    metrics, counts = _metrics(items, settings.temperatures, prompts.datasets)
    return BenchmarkResult(
        benchmark=BENCHMARK, metrics=metrics, n_items=len(items), items=tuple(items),
        data_sha256=prompts.fingerprint, data_source=prompts.data_source,
        settings={"protocol": PROTOCOL, **settings.to_json(), "device": device, "dense_fingerprint": dense_fp,
                  "model_fingerprint": target_fp, "prompt_fingerprint": prompts.fingerprint,
                  "prompts_per_dataset": prompts.counts(), "data_sha256": dict(prompts.data_sha256),
                  "metric_items": counts, "versions": _versions()},
        seconds=round(time.perf_counter() - started, 3),
    )


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _prompt_ids(dense_tokenizer: Any, tokenizer: Any, prompts: DriftPromptSet,
                target_dir: Path) -> list[tuple[int, ...]]:
    """The dense tokenizer's prompt ids; a checkpoint whose tokenizer encodes them differently is refused,
    because its token ids could not be scored by the dense model."""
    messages = [p.messages() for p in prompts]
    ids = encode_chat(dense_tokenizer, messages)
    if tokenizer is not dense_tokenizer and (
            tokenizer.get_vocab() != dense_tokenizer.get_vocab() or encode_chat(tokenizer, messages) != ids):
        raise ModelError(f"{target_dir}: tokenizer or chat template differs from the dense model's; "
                         "its generations cannot be scored by the dense model")
    return ids


def _items(prompts: DriftPromptSet, settings: GenerationSettings, gens: list[Generation], lls: list[float],
           dense_gens: list[Generation], dense_lls: list[float], tokenizer: Any) -> list[ItemRecord]:
    items = []
    by_index = [(p, t) for p in prompts for t in settings.temperatures]
    for index, ((prompt, temperature), gen, ll, dense, dense_ll) in enumerate(
            zip(by_index, gens, lls, dense_gens, dense_lls, strict=True)):
        if gen.prompt_id != prompt.prompt_id or gen.temperature != temperature:
            raise ModelError(f"generation {index} is {gen.prompt_id}@{gen.temperature}, expected "
                             f"{prompt.prompt_id}@{temperature} (corrupt cache entry?)")
        nll = -ll / gen.n_tokens if gen.n_tokens else math.nan
        dense_nll = -dense_ll / dense.n_tokens if dense.n_tokens else math.nan
        entropy, dense_entropy = mean_step_entropy(gen), mean_step_entropy(dense)
        label = temperature_label(temperature)
        items.append(ItemRecord(
            benchmark=BENCHMARK, doc_id=index,
            doc_hash=sha256_json({"prompt": prompt.to_json(), "temperature": temperature}),
            item_id=f"{prompt.prompt_id}@{label}", category=prompt.dataset, pred=-1, target=-1,
            loglikelihoods=(ll,), status=gen.finish, correct=None,
            extras={"dataset": prompt.dataset, "prompt_id": prompt.prompt_id, "temperature": temperature,
                    "text": tokenizer.decode(gen.token_ids.tolist(), skip_special_tokens=True),
                    "n_tokens": gen.n_tokens, "cross_nll": nll, "cross_ppl": math.exp(nll),
                    "delta_cross_nll": nll - dense_nll, "entropy": entropy,
                    "delta_entropy": entropy - dense_entropy, "dense_cross_nll": dense_nll,
                    "identical": gen.same_tokens(dense)},
        ))
    return items


def _metrics(items: list[ItemRecord], temperatures: Sequence[float],
             datasets: Sequence[str]) -> tuple[dict[str, float], dict[str, int]]:
    """Means over prompts per temperature (overall and per dataset), and how many items each mean covers."""
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    for temperature in temperatures:
        label = temperature_label(temperature)
        for suffix, dataset in (("", None), *((f".{d}", d) for d in datasets)):
            chosen = [i.extras for i in items if i.extras["temperature"] == temperature
                      and (dataset is None or i.category == dataset)]
            for name in _PER_PROMPT:
                field = "n_tokens" if name == "mean_tokens" else name
                values = [float(x[field]) for x in chosen]
                metric = f"{name}_{label}{suffix}"
                metrics[metric] = float(np.mean(values)) if values else math.nan
                counts[metric] = len(values)
    return metrics, counts
