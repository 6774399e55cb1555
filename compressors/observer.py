"""One observer pass per (model, calibration set): the routing statistics every expert-compression method needs.

Why one pass: REAP, frequency and EAN pruning and HC-SMoE merging all read the same per-layer statistics of
the *unmodified dense* model (expert-compression.md §5), so a second ratio or method must not cost another
calibration forward. The pass runs the dense model row by row (batch 1, unpadded rows, as llmcompressor
calibrates), hooks each MoE block's router (softmax over all E logits) and its experts module (which receives
the model's own `top_k_index` / `top_k_weights`: ERNIE's selection includes `e_score_correction_bias`,
renormalisation is the model's own), runs **every expert on every token** (the HC-SMoE feature needs it) and
accumulates in float64 (norms in float32, as REAP):

- `n_tokens`, `routed[i]`: routed (token, slot) count; `reap_sum[i]` = Σ over routed slots of g_i(x)·‖E_i(x)‖₂
  with g the model's combine weight (what llmcompressor's REAPPruningModifier uses); `reap_softmax_sum[i]` the
  same with g = softmax over all E logits (the paper's gate); `ean_sum[i]` = Σ over routed slots ‖E_i(x)‖₂;
- `mean_output[i]` = mean E_i(x) over all tokens (ungated); `mean_prob[i]` = mean router probability.

Stored as safetensors (never pickle) in the audit cache (`<cache_dir>/observer/<key>/`), key = sha256 of the
model fingerprint, the calibration token ids, OBSERVER_FORMAT and the torch/transformers versions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from architectures.blocks import MoEBlock, moe_blocks
from fixtures.errors import CompressionError

if TYPE_CHECKING:
    import datasets
    import torch
    from transformers import PreTrainedModel

OBSERVER_FORMAT = 1  # bump when a statistic's definition or the file layout changes
OBSERVER_FILE = "observer.safetensors"
STATS = ("routed", "reap_sum", "reap_softmax_sum", "ean_sum", "mean_output", "mean_prob")
GATES = ("model", "softmax")
CHUNK_ELEMENTS = 1 << 26  # expert activations computed at once (256 MiB in fp32), bounds memory on big models


@dataclass(frozen=True)
class LayerStats:
    """Statistics of one MoE block over the calibration tokens (float64 tensors, E = routed experts)."""

    n_tokens: int
    routed: torch.Tensor  # [E]
    reap_sum: torch.Tensor  # [E]
    reap_softmax_sum: torch.Tensor  # [E]
    ean_sum: torch.Tensor  # [E]
    mean_output: torch.Tensor  # [E, H]
    mean_prob: torch.Tensor  # [E]

    def reap_saliency(self, gate: str = "model") -> torch.Tensor:
        """S_i = mean over routed slots of g_i·‖E_i(x)‖₂; 0 for a never-routed expert (pruned first)."""
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        total = self.reap_sum if gate == "model" else self.reap_softmax_sum
        return total / self.routed.clamp(min=1.0)

    @property
    def frequency(self) -> torch.Tensor:
        """f_i = routed slots / tokens (sums to top-k), HC-SMoE's merge weight."""
        return self.routed / max(self.n_tokens, 1)


@dataclass(frozen=True)
class Observation:
    layers: dict[str, LayerStats]  # by MoE block name, e.g. "model.layers.0.mlp"
    n_rows: int
    seq_len: int


class _Accumulator:
    """Hooks of one block: the router hook keeps the softmax, the experts pre-hook does the work."""

    def __init__(self, block: MoEBlock) -> None:
        import torch

        self.block = block
        experts, hidden = block.num_experts, block.hidden_size
        self.sums = {name: torch.zeros(experts, dtype=torch.float64) for name in STATS if name != "mean_output"}
        self.sums["mean_output"] = torch.zeros(experts, hidden, dtype=torch.float64)
        self.n_tokens = 0
        self._probs: torch.Tensor | None = None

    def on_router(self, module: Any, args: Any, output: Any) -> None:
        import torch

        self._probs = torch.softmax(self.block.router_logits(output).float(), dim=-1)

    def on_experts(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import torch

        x, index, weights = self.block.call_arguments(args, kwargs)
        probs, self._probs = self._probs, None
        if probs is None or probs.shape[0] != x.shape[0]:
            raise CompressionError(f"{self.block.name}: experts called without a matching router call")
        sums, tokens = self.sums, x.shape[0]
        # Every (token, slot) as flat lists: expert, token, combine weight.
        slot_expert = index.reshape(-1).long()
        slot_token = torch.arange(tokens, device=x.device).repeat_interleave(index.shape[1])
        slot_weight = weights.reshape(-1).double()
        chunk = max(1, CHUNK_ELEMENTS // (tokens * 2 * self.block.intermediate_size))
        with torch.no_grad():
            for start in range(0, self.block.num_experts, chunk):  # all experts of a chunk at once: [c, T, .]
                stop = min(start + chunk, self.block.num_experts)
                out = self.block.expert_outputs(x, start, stop)
                norms = out.float().norm(dim=-1).double()  # fp32 norms, as REAP
                sums["mean_output"][start:stop] += out.double().sum(dim=1).cpu()
                hit = (slot_expert >= start) & (slot_expert < stop)
                expert, token = slot_expert[hit], slot_token[hit]
                routed = norms[expert - start, token]
                add = {"routed": torch.ones_like(routed), "reap_sum": slot_weight[hit] * routed,
                       "reap_softmax_sum": probs[token, expert].double() * routed, "ean_sum": routed}
                for name, values in add.items():
                    sums[name].index_add_(0, expert.cpu(), values.cpu())
            sums["mean_prob"] += probs.double().sum(dim=0).cpu()
        self.n_tokens += int(x.shape[0])

    def result(self) -> LayerStats:
        n = max(self.n_tokens, 1)
        means = {name: self.sums[name] / n for name in ("mean_output", "mean_prob")}
        return LayerStats(n_tokens=self.n_tokens, **{**self.sums, **means})


def observe(model: PreTrainedModel, input_ids: torch.Tensor) -> Observation:
    """Run the dense `model` once over the rows of `input_ids` [N, L] (batch 1) and collect LayerStats."""
    import torch

    accumulators = [_Accumulator(block) for block in moe_blocks(model)]
    handles = []
    for acc in accumulators:
        handles.append(acc.block.router.register_forward_hook(acc.on_router))
        handles.append(acc.block.experts.register_forward_pre_hook(acc.on_experts, with_kwargs=True))
    model.eval()
    try:
        with torch.no_grad():
            for row in input_ids:
                model(input_ids=row[None].to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    n_rows, seq_len = (int(d) for d in input_ids.shape)
    return Observation({acc.block.name: acc.result() for acc in accumulators}, n_rows, seq_len)


def save_observation(observation: Observation, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {f"{layer}/{name}": getattr(stats, name).contiguous()
               for layer, stats in observation.layers.items() for name in STATS}
    meta = {"format": OBSERVER_FORMAT, "n_rows": observation.n_rows, "seq_len": observation.seq_len,
            "n_tokens": {layer: stats.n_tokens for layer, stats in observation.layers.items()}}
    save_file(tensors, str(path), metadata={"observer": json.dumps(meta, sort_keys=True)})


def load_observation(path: Path) -> Observation:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {}).get("observer", "{}"))
        if meta.get("format") != OBSERVER_FORMAT:
            raise CompressionError(f"{path}: observer format {meta.get('format')} != {OBSERVER_FORMAT}")
        layers = {layer: LayerStats(n_tokens=int(n), **{s: handle.get_tensor(f"{layer}/{s}") for s in STATS})
                  for layer, n in meta["n_tokens"].items()}
    return Observation(layers, int(meta["n_rows"]), int(meta["seq_len"]))


def calibration_ids(dataset: datasets.Dataset) -> torch.Tensor:
    import torch

    return torch.tensor(dataset["input_ids"], dtype=torch.long)


def observer_key(model_dir: Path, input_ids: torch.Tensor, device_type: str = "cpu") -> str:
    """What makes two observations the same: model bytes, token ids, statistic definitions, numerics (the
    device type among them: a GPU's bf16 matmuls are not the CPU's)."""
    import numpy as np
    import torch
    import transformers

    from fixtures.hashing import sha256_bytes, sha256_json
    from fixtures.zoo import model_fingerprint

    rows = np.ascontiguousarray(input_ids.cpu().numpy().astype(np.int64))
    return sha256_json({"model": model_fingerprint(Path(model_dir)), "rows": sha256_bytes(rows.tobytes()),
                        "shape": list(rows.shape), "format": OBSERVER_FORMAT, "device": device_type,
                        "versions": {"torch": torch.__version__, "transformers": transformers.__version__}})


def observation_for(model: PreTrainedModel, model_dir: Path, dataset: datasets.Dataset,
                    cache_dir: Path | None) -> tuple[Observation, dict[str, Any]]:
    """The observation of dense `model` (loaded from `model_dir`) on `dataset`, from the cache when present.

    Returns it with a record: key, whether a cached pass was reused, and `pass_seconds` (the time of the pass
    that produced it, even when reused). Without `cache_dir` the pass runs in-process every time."""
    ids = calibration_ids(dataset)
    key = observer_key(model_dir, ids, model.device.type)

    def run() -> tuple[Observation, float]:
        started = time.perf_counter()
        observation = observe(model, ids)
        return observation, round(time.perf_counter() - started, 3)

    if cache_dir is None:
        observation, seconds = run()
        return observation, {"key": key, "cached": False, "reused": False, "pass_seconds": seconds}

    from fixtures.cache import ArtifactCache

    def build(out: Path) -> dict[str, Any]:
        observation, seconds = run()
        save_observation(observation, out / OBSERVER_FILE)
        return {"observer_format": OBSERVER_FORMAT, "pass_seconds": seconds, "n_rows": observation.n_rows,
                "seq_len": observation.seq_len, "layers": sorted(observation.layers)}

    entry = ArtifactCache(Path(cache_dir)).get_or_build("observer", key, build)
    record = {"key": key, "cached": True, "reused": not entry.built_now, "path": str(entry.path),
              "pass_seconds": entry.manifest["pass_seconds"]}
    return load_observation(entry.path / OBSERVER_FILE), record


def check_layers(observation: Observation, blocks: list[MoEBlock]) -> Mapping[str, LayerStats]:
    """The observation must cover exactly the model's MoE blocks, with matching expert counts."""
    names = [block.name for block in blocks]
    if sorted(observation.layers) != sorted(names):
        raise CompressionError(f"observer layers {sorted(observation.layers)} != MoE blocks {sorted(names)}")
    for block in blocks:
        stats = observation.layers[block.name]
        if stats.routed.shape[0] != block.num_experts or stats.n_tokens == 0:
            raise CompressionError(f"{block.name}: observer has {stats.routed.shape[0]} experts and "
                                   f"{stats.n_tokens} tokens; the block has {block.num_experts} experts")
    return observation.layers
