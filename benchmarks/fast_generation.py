"""Batched decoding that keeps the GPU busy: one host sync per batch instead of several per token.

Why: the reference loop (`benchmarks.generation._generate_batch`) picks each row's token with its own
`int(argmax)` and copies the top-k to the host at every step, so the host waits for the device B + 1 times per
step and cannot queue the next step's kernels while the current one runs; lm-eval's `generate_until` runs
`model.generate` at the evaluation batch size (16). Here every step is batched tensor work on the device
(greedy argmax for T = 0 rows, the same per-row exponential race for T > 0 rows, top-k of the raw log-probs),
the chosen tokens stay on the device, finished rows are fed the pad token exactly like the reference, and
everything is copied to the host once at the end, where each row is cut after its first stop token.
Early exit (all rows stopped) is checked every `SYNC_EVERY` steps: the extra steps never change a recorded
token, because a finished row's later tokens are discarded and its random stream is never read again.

Same semantics as the reference, so the same bits on CPU for the same batches: left padding with explicit
positions (`left_pad`), fp32 log-softmax before temperature, the row generator drawing one
Exp(1) vector per step while the row is sampled, lowest token id on argmax ties.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

SYNC_EVERY = 8


@dataclass(frozen=True)
class Decoded:
    """One row: generated tokens (stop token kept), per-step top-k ids/log-probs, whether a stop ended it."""

    tokens: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    stopped: bool


def decode_batch(model: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_ids: frozenset[int],
                 pad_id: int, device: str, temperatures: Sequence[float] | None = None, top_p: float = 1.0,
                 generators: Sequence[torch.Generator | None] | None = None, top_k: int = 0,
                 mode: str = "auto") -> list[Decoded]:
    """Decode one batch (rows in the given order). `temperatures`/`generators`: per row, T = 0 is greedy;
    `top_k` > 0 records the top-k raw log-probabilities at every step; `mode`: how forward passes run
    (`benchmarks.decode_steps`: auto = CUDA graphs over a static cache on CUDA, the dynamic cache elsewhere)."""
    import torch

    from benchmarks.decode_steps import make_steps, resolve_mode
    rows = len(prompts)
    temps = [0.0] * rows if temperatures is None else [float(t) for t in temperatures]
    sampled = [r for r, t in enumerate(temps) if t > 0.0]
    if sampled and (generators is None or any(generators[r] is None for r in sampled)):
        raise ValueError("every sampled row (T > 0) needs its own generator")
    ids, mask, positions = left_pad([tuple(p) for p in prompts], pad_id, device)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    temp_column = torch.tensor(temps, dtype=torch.float32, device=device)[:, None]
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    chosen_steps, top_id_steps, top_lp_steps = [], [], []
    steps = make_steps(resolve_mode(mode, device, model), model, ids, mask, positions, max_new_tokens)
    logits = steps.first()
    for step in range(max_new_tokens):
        if top_k:
            top = torch.log_softmax(logits, dim=-1).topk(top_k, dim=-1)
            top_id_steps.append(top.indices)
            top_lp_steps.append(top.values)
        chosen = torch.argmax(logits, dim=-1)
        if sampled:
            chosen = _sample_rows(logits, chosen, sampled, temp_column, top_p, generators or [])
        chosen = torch.where(done, torch.full_like(chosen, pad_id), chosen)
        chosen_steps.append(chosen)
        done = done | torch.isin(chosen, stops)
        if (step + 1) % SYNC_EVERY == 0 and bool(done.all()):
            break
        if step + 1 < max_new_tokens:
            logits = steps.next(chosen)
    return _cut(chosen_steps, top_id_steps, top_lp_steps, stop_ids, top_k)


def _sample_rows(logits: torch.Tensor, chosen: torch.Tensor, sampled: list[int], temp_column: torch.Tensor,
                 top_p: float, generators: Sequence[Any]) -> torch.Tensor:
    """The reference's exponential race for T > 0 rows: argmax(p / E), E ~ Exp(1) from the row's generator."""
    import torch

    index = torch.tensor(sampled, device=logits.device)
    probs = torch.softmax(logits[index] / temp_column[index], dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
        before = sorted_probs.cumsum(-1) - sorted_probs
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs * (before < top_p))
    race = torch.empty_like(probs)
    for n, row in enumerate(sampled):
        race[n].exponential_(generator=generators[row])
    return chosen.index_copy(0, index, torch.argmax(probs / race, dim=-1))


def _cut(chosen_steps: list[Any], top_id_steps: list[Any], top_lp_steps: list[Any], stop_ids: frozenset[int],
         top_k: int) -> list[Decoded]:
    """One host copy, then each row up to and including its first stop token."""
    import torch

    chosen = torch.stack(chosen_steps, dim=1).cpu().numpy()
    rows, steps = chosen.shape
    tops = (torch.stack(top_id_steps, dim=1).cpu().numpy().astype(np.int32),
            torch.stack(top_lp_steps, dim=1).cpu().numpy().astype(np.float32)) if top_k else None
    is_stop = np.isin(chosen, np.asarray(sorted(stop_ids), dtype=chosen.dtype))
    decoded = []
    for r in range(rows):
        hits = np.flatnonzero(is_stop[r])
        end = int(hits[0]) + 1 if hits.size else steps
        top_ids = tops[0][r, :end] if tops else np.zeros((end, 0), dtype=np.int32)
        top_lps = tops[1][r, :end] if tops else np.zeros((end, 0), dtype=np.float32)
        decoded.append(Decoded(chosen[r, :end].astype(np.int64), top_ids, top_lps, bool(hits.size)))
    return decoded


def greedy_tokens(model: Any, contexts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_ids: frozenset[int],
                  pad_id: int, batch_size: int, device: str, mode: str = "auto") -> list[list[int]]:
    """Greedy continuations of many prompts: batches of similar length (sorted), results in input order."""
    import torch

    order = sorted(range(len(contexts)), key=lambda i: (len(contexts[i]), i))
    size = -(-len(order) // max(1, -(-len(order) // batch_size)))  # equal batches: 450 at 384 -> 2 x 225
    results: dict[int, list[int]] = {}
    with torch.inference_mode():
        for start in range(0, len(order), size):
            batch = order[start:start + size]
            rows = decode_batch(model, [contexts[i] for i in batch], max_new_tokens=max_new_tokens,
                                stop_ids=stop_ids, pad_id=pad_id, device=device, mode=mode)
            results.update((i, row.tokens.tolist()) for i, row in zip(batch, rows, strict=True))
    return [results[i] for i in range(len(contexts))]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: str) -> tuple[torch.Tensor, ...]:
    """Left-padded ids, attention mask and position ids (0 at each row's first real token)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)
