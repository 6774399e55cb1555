"""Prefix packing of log-likelihood requests: the plan (pure Python) and the tensors of one forward pass.

Why: lm-eval scores every multiple-choice option as its own row, context included, so BBQ's 12 choices run
each context 12 times. Requests with the same context tokens are scored from one copy of the context here:

    row:      [ ctx_1 ... ctx_n | a_1 ... a_(A-1) | b_1 ... b_(B-1) | ... ]  [ next group ... ]  [pad]
    position:   0   ...  n-1    |  n  ...  n+A-2  |  n  ...  n+B-2  | ...     0 ...
    attends:    causal in ctx   |  ctx + causally itself  (never another continuation or group)

The logits at ctx_n predict every continuation's first token; the logits at a_i predict a_(i+1). A
continuation's last token is never an input, so a group costs n + sum(len(cont) - 1) tokens instead of lm-eval's
sum(n + len(cont) - 1). Groups are packed into rows of at most `pack_tokens` tokens (largest first, each row
filled with the largest groups that still fit), a block-diagonal 4-D mask keeps them apart, and rows are
batched under a `batch_tokens` budget (rows x padded length). Attention sees exactly the keys and positions
lm-eval's row for the same request sees, so the scores agree up to float summation order.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Tokens = tuple[int, ...]


@dataclass(frozen=True)
class Group:
    """Requests (indices into the caller's list) scored from one copy of `context`."""

    context: Tokens
    members: tuple[int, ...]
    continuations: tuple[Tokens, ...]

    @property
    def length(self) -> int:
        """Tokens this group occupies in a row."""
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


@dataclass(frozen=True)
class Placed:
    """Where each scored token of a request sits in a batch: `positions` are flat indices into the
    [rows * width] hidden states whose logits predict `targets` (one per continuation token)."""

    request: int
    positions: tuple[int, ...]
    targets: Tokens


def plan_groups(requests: Sequence[tuple[Sequence[int], Sequence[int]]], pack_tokens: int) -> list[Group]:
    """Group requests by identical context tokens, in first-seen order; a group longer than `pack_tokens`
    is split (each part runs the context again). Every continuation must be non-empty."""
    by_context: dict[Tokens, list[int]] = {}
    for index, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError(f"request {index}: empty context or continuation (lm-eval never sends one)")
        by_context.setdefault(tuple(context), []).append(index)
    groups = []
    for context, members in by_context.items():
        part: list[int] = []
        used = len(context)
        for index in members:
            extra = len(requests[index][1]) - 1
            if part and used + extra > pack_tokens:
                groups.append(_group(context, part, requests))
                part, used = [], len(context)
            part.append(index)
            used += extra
        groups.append(_group(context, part, requests))
    return groups


def _group(context: Tokens, members: list[int], requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Group:
    return Group(context, tuple(members), tuple(tuple(requests[i][1]) for i in members))


def pack_rows(groups: Sequence[Group], pack_tokens: int) -> list[list[Group]]:
    """Rows of groups, each at most `pack_tokens` long (a longer single group gets a row of its own).

    Largest group first, then the largest remaining groups that still fit: few, nearly full rows. The
    order only depends on the lengths (ties by first-seen order), so a run is reproducible."""
    order = sorted(range(len(groups)), key=lambda i: (groups[i].length, -i))
    lengths = [groups[i].length for i in order]
    rows = []
    while order:
        first = order.pop()
        lengths.pop()
        row, room = [groups[first]], pack_tokens - groups[first].length
        while order:
            fit = bisect.bisect_right(lengths, room) - 1
            if fit < 0:
                break
            row.append(groups[order.pop(fit)])
            room -= lengths.pop(fit)
        rows.append(row)
    return rows


def batch_rows(rows: Sequence[list[Group]], batch_tokens: int) -> list[list[list[Group]]]:
    """Batches of rows, longest rows first, each batch's rows x longest row <= `batch_tokens` (at least one row)."""
    ordered = sorted(rows, key=lambda row: -sum(g.length for g in row))
    batches: list[list[list[Group]]] = []
    for row in ordered:
        if batches and (len(batches[-1]) + 1) * sum(g.length for g in batches[-1][0]) <= batch_tokens:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


@dataclass(frozen=True)
class BatchLayout:
    """Token ids, positions, group and segment ids ([rows][width], python lists) and the scored tokens."""

    input_ids: list[list[int]]
    positions: list[list[int]]
    group_ids: list[list[int]]  # -1 = padding
    segment_ids: list[list[int]]  # 0 = context, k = k-th continuation of its group
    placed: list[Placed]

    @property
    def width(self) -> int:
        return len(self.input_ids[0])

    @property
    def real_tokens(self) -> int:
        return sum(1 for row in self.group_ids for g in row if g >= 0)


def layout_batch(batch: Sequence[list[Group]], pad_id: int) -> BatchLayout:
    """Lay a batch of rows out token by token (see the module docstring's picture)."""
    width = max(sum(g.length for g in row) for row in batch)
    ids, positions, group_ids, segments, placed = [], [], [], [], []
    group_counter = 0
    for r, row in enumerate(batch):
        row_ids: list[int] = []
        row_pos: list[int] = []
        row_group: list[int] = []
        row_seg: list[int] = []
        for group in row:
            start, n = len(row_ids), len(group.context)
            row_ids += group.context
            row_pos += range(n)
            row_group += [group_counter] * n
            row_seg += [0] * n
            last_context = r * width + start + n - 1
            for k, (member, cont) in enumerate(zip(group.members, group.continuations, strict=True), start=1):
                seg_start = len(row_ids)
                row_ids += cont[:-1]
                row_pos += range(n, n + len(cont) - 1)
                row_group += [group_counter] * (len(cont) - 1)
                row_seg += [k] * (len(cont) - 1)
                flat = (last_context, *(r * width + seg_start + i for i in range(len(cont) - 1)))
                placed.append(Placed(member, flat, cont))
            group_counter += 1
        pad = width - len(row_ids)
        ids.append(row_ids + [pad_id] * pad)
        positions.append(row_pos + [0] * pad)
        group_ids.append(row_group + [-1] * pad)
        segments.append(row_seg + [0] * pad)
    return BatchLayout(ids, positions, group_ids, segments, placed)


def attention_mask(layout: BatchLayout, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Additive [rows, 1, width, width] mask (0 = attend, dtype's min = blocked), accepted as-is by
    transformers' `create_causal_mask` (4-D masks skip mask creation) and by eager and SDPA attention.

    Query q attends key k iff both are in one group, k <= q, and k is context or in q's own continuation.
    Padding attends only itself (a fully blocked row would give NaN)."""
    import torch

    groups = torch.tensor(layout.group_ids, device=device)
    segments = torch.tensor(layout.segment_ids, device=device)
    width = groups.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    same_group = (groups[:, :, None] == groups[:, None, :]) & (groups[:, :, None] >= 0)
    visible = (segments[:, None, :] == 0) | (segments[:, :, None] == segments[:, None, :])
    allowed = (same_group & visible & causal) | torch.eye(width, dtype=torch.bool, device=device)
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=device), blocked)[:, None]
