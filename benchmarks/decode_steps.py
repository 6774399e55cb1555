"""How one batch's forward passes run while decoding: a growing cache, or a static cache replayed as a CUDA graph.

Why: a decode step of a 30B MoE on an H100 took 150-190 ms at 200-520 rows while its GPU work (every expert's
weights read once, the KV cache read once) is ~15-25 ms: the step is bound by the host issuing ~4,000 small
kernels through transformers' Python forward (docs/performance.md). A CUDA graph issues the whole step as one
launch. A graph replays fixed shapes and addresses, so the step needs a static KV cache (transformers'
`StaticCache`, which counts its length on the device) and a static attention mask.

- `DynamicSteps`: transformers' default `DynamicCache`, a 2-D padding mask grown by one column per step (the
  reference loop's exact inputs: same bits on CPU).
- `StaticSteps`: a `StaticCache` of prompt width + max_new_tokens slots and additive 4-D masks built here
  (transformers passes a 4-D mask through unchanged): prefill query i sees keys j <= i that are real tokens,
  a decode query sees the prompt's real tokens and every generated slot so far; left-padded queries see
  only themselves (a fully blocked row would be NaN). With `graph=True` (CUDA only) the first decode step runs
  eagerly (it warms up kernels and workspaces), the second is captured, and every later step is a replay;
  if capture fails (an op that needs the host mid-step, on some architecture), the steps stay eager and
  `USED["graph-fallback"]` counts it, with a warning: slower, never different.

Attention over a static cache sees masked slots as well, so its float sums may group differently from the
dynamic path's: tokens equal, log-probs within float rounding (tested on CPU); the graph replays exactly the
kernels of the eager static step.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import TYPE_CHECKING, Any

from benchmarks.architecture import sliding_window

if TYPE_CHECKING:
    import torch

MODES = ("dynamic", "static", "graph")
# How many batches ran in each mode in this process ("graph-fallback": capture failed, steps ran eagerly).
USED: Counter[str] = Counter()


def resolve_mode(mode: str, device: str, model: Any = None) -> str:
    """`auto`: graphs on CUDA, the dynamic cache elsewhere (CPU results stay bit-equal to the reference) and
    for sliding-window attention, whose static cache is a ring buffer the masks here do not describe."""
    if mode != "auto" and mode not in MODES:
        raise ValueError(f"decode mode must be auto or one of {', '.join(MODES)}, got {mode!r}")
    windowed = model is not None and sliding_window(model.config) is not None
    if mode == "auto":
        return "graph" if str(device).startswith("cuda") and not windowed else "dynamic"
    if mode == "graph" and not str(device).startswith("cuda"):
        raise ValueError(f"decode mode 'graph' needs a CUDA device, got {device!r}")
    if mode != "dynamic" and windowed:
        raise ValueError(f"decode mode {mode!r} does not support sliding-window attention; use 'dynamic'")
    return mode


class DynamicSteps:
    """The reference loop's inputs: DynamicCache, growing 2-D mask, explicit positions."""

    def __init__(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.model, self.mask, self.positions = model, mask, positions
        self.cache: Any = None
        self._prompt = ids

    def first(self) -> torch.Tensor:
        return self._forward(self._prompt, self.positions)

    def next(self, chosen: torch.Tensor) -> torch.Tensor:
        import torch

        self.positions = self.positions[:, -1:] + 1
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)
        return self._forward(chosen[:, None], self.positions)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return out.logits[:, -1, :].float()


class StaticSteps:
    """StaticCache + static 4-D masks; decode steps replay one CUDA graph when `graph` (see the module doc)."""

    def __init__(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 max_new_tokens: int, graph: bool) -> None:
        import torch
        from transformers import StaticCache

        rows, width = ids.shape
        self.model, self.width, self.graph_wanted = model, width, graph
        self.length = -(-(width + max_new_tokens) // 8) * 8  # mask rows of 16-byte multiples: SDPA's fast kernels
        self.cache = StaticCache(config=model.config, max_cache_len=self.length)
        dtype = next(model.parameters()).dtype
        device = ids.device
        real = torch.zeros(rows, self.length, dtype=torch.bool, device=device)
        real[:, :width] = mask.bool()
        query = torch.arange(width, device=device)[:, None]
        key = torch.arange(self.length, device=device)[None, :]
        allowed = ((key <= query)[None] & real[:, None, :]) | (key == query)[None]
        self.blocked = torch.finfo(dtype).min
        zero = torch.zeros((), dtype=dtype, device=device)
        self.prefill_mask = torch.where(allowed, zero, self.blocked)[:, None]  # [rows, 1, width, length]
        self.step_mask = torch.where(real, zero, self.blocked)[:, None, None, :].contiguous()  # [rows,1,1,length]
        self.step_ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.step_positions = positions[:, -1:].clone()
        self._prompt, self._prompt_positions = ids, positions
        self.steps = 0
        self._graph: Any = None
        self._graph_logits: torch.Tensor | None = None

    def first(self) -> torch.Tensor:
        out = self.model(input_ids=self._prompt, attention_mask=self.prefill_mask,
                         position_ids=self._prompt_positions, past_key_values=self.cache, use_cache=True,
                         logits_to_keep=1)
        del self.prefill_mask
        return out.logits[:, -1, :].float()

    def next(self, chosen: torch.Tensor) -> torch.Tensor:
        if self.steps >= self.length - self.width:
            raise RuntimeError(f"static cache of {self.length} slots is full")
        slot = self.width + self.steps
        self.steps += 1
        # Device-side updates of the static inputs (no host sync): the new token, its position, its key slot.
        self.step_ids.copy_(chosen[:, None])
        self.step_positions.add_(1)
        self.step_mask[..., slot] = 0
        if self._graph is not None:
            self._graph.replay()
            assert self._graph_logits is not None
            return self._graph_logits
        if self.graph_wanted and self.steps == 2:
            captured = self._capture()
            if captured is not None:
                return captured
        return self._step()

    def _step(self) -> torch.Tensor:
        out = self.model(input_ids=self.step_ids, attention_mask=self.step_mask, position_ids=self.step_positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float()

    def _capture(self) -> torch.Tensor | None:
        """Capture one decode step and replay it for this step; None (eager from now on) if capture fails."""
        import torch

        layers: list[Any] = list(self.cache.layers)
        lengths = [layer.cumulative_length.clone() for layer in layers]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                logits = self._step()
        except Exception as exc:  # an op that syncs with the host, or one graphs do not support
            USED["graph-fallback"] += 1
            warnings.warn(f"CUDA graph capture of a decode step failed ({type(exc).__name__}: {exc}); "
                          "decoding this batch eagerly", RuntimeWarning, stacklevel=3)
            self.graph_wanted = False
            for layer, length in zip(layers, lengths, strict=True):
                layer.cumulative_length.copy_(length)  # capture records kernels without running them
            return None
        self._graph, self._graph_logits = graph, logits
        graph.replay()
        return logits


def make_steps(mode: str, model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
               max_new_tokens: int) -> DynamicSteps | StaticSteps:
    """The step runner of a resolved `mode` (see `resolve_mode`)."""
    USED[mode] += 1
    if mode == "dynamic":
        return DynamicSteps(model, ids, mask, positions)
    return StaticSteps(model, ids, mask, positions, max_new_tokens, graph=mode == "graph")
