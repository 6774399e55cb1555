"""Expert pruning from the shared observer pass: REAP, frequency and EAN (and the base of every EC method).

`ObservedExpertCompressor.compress` is the one template of expert compression: validate the ratio against
the model (at least top-k experts left), load the dense model, get the observer statistics (one cached pass
per model × calibration set, compressors/observer.py), let the method edit each MoE block
(compressors/expert_slicing.py), save and verify the reload. The manifest separates the observer pass from
the method's own seconds, so the cost of a second ratio or method is visible.

Pruning semantics (expert-compression.md §2-3): per layer the `int(E·ratio)` experts with the lowest score are
dropped (same count in every layer, ties broken towards the lower index, stable sort); kept experts stay in
ascending order and are renumbered; router rows are sliced without rescaling; top-k and shared experts are
untouched. Scores: REAP `S_i = mean over routed (token, slot) of g_i(x)·‖E_i(x)‖₂`, every layer scored on the
**dense** model; frequency = routed slots; EAN = Σ over routed slots of ‖E_i(x)‖₂ (the REAP paper's EAN).

REAP's gate g (`gate`): "model" (default) = the model's own top-k combine weight — renormalised iff the model
renormalises (Qwen3 `norm_topk_prob`, Mixtral, ERNIE; raw softmax for OLMoE), ERNIE selection with its
correction bias. This is what llmcompressor 0.14's `REAPPruningModifier` uses (known-answer test in
tests/test_observer.py). "softmax" = softmax over all E logits, the paper's runs (`reap-softmax`).
`backend = "llmcompressor"` runs that modifier instead (sequential pipeline, `propagate_error=False` so every
layer is scored on dense inputs, ERNIE bias fix and causal-mask fix from llmc_patches, repack before save):
the tested reference of the observer path, kept selectable.
"""

from __future__ import annotations

import json
import tempfile
from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from architectures.blocks import MoEBlock, moe_blocks
from compressors.base import ExpertCompressor, MethodSpec, MoEInfo, register
from compressors.expert_slicing import prune_block, save_verified
from compressors.observer import GATES, LayerStats, check_layers, observation_for
from compressors.runtime import (
    Stopwatch,
    calibration_record,
    check_calibration,
    expert_linears,
    load_model,
    measurements,
    read_moe_info,
    seed_everything,
)
from fixtures.errors import CompressionError, ConfigError

if TYPE_CHECKING:
    import datasets
    import torch


class ObservedExpertCompressor(ExpertCompressor):
    """An expert-compression method fed by the observer statistics; subclasses implement `edit`."""

    default_ratios: ClassVar[tuple[float, ...]] = (0.25, 0.5)
    needs_calibration: ClassVar[bool] = True

    @abstractmethod
    def edit(self, blocks: list[MoEBlock], stats: Mapping[str, LayerStats], info: MoEInfo,
             removed: int) -> tuple[int, dict[str, Any]]:
        """Edit every block in place; return (routed experts per layer afterwards, manifest details)."""

    def prepare(self, model_dir: Path, calibration: datasets.Dataset | None, spec: MethodSpec,
                seed: int) -> tuple[MoEInfo, int, datasets.Dataset]:
        """Everything checked before loading a model: the ratio against its config (ConfigError when fewer
        than top-k experts would be left), the calibration rows; then seed. Returns (info, removed, rows)."""
        info = read_moe_info(model_dir)
        self.validate(spec, info)
        assert spec.ratio is not None
        dataset = check_calibration(calibration, self.name)
        seed_everything(seed)
        return info, self.experts_removed(info.num_experts, spec.ratio), dataset

    def compress(self, model_dir: Path, calibration: datasets.Dataset | None, out_dir: Path,
                 spec: MethodSpec, *, seed: int, cache_dir: Path | None = None,
                 device: str = "cpu") -> dict[str, Any]:
        watch = Stopwatch()
        info, removed, dataset = self.prepare(model_dir, calibration, spec, seed)
        with watch.phase("load"):
            model, tokenizer = load_model(model_dir, device)
            blocks = moe_blocks(model)
        with watch.phase("observer"):
            observation, observer = observation_for(model, model_dir, dataset, cache_dir)
        with watch.phase("edit"):
            experts_after, details = self.edit(blocks, check_layers(observation, blocks), info, removed)
        verification, count_keys = save_verified(model, tokenizer, out_dir, num_experts=experts_after,
                                                 seed=seed, watch=watch)
        sizes = measurements(watch, model_dir, out_dir)
        observer["load_seconds"] = watch.phases["observer"]  # this run: the pass, or reading the cache entry
        return {
            **base_manifest(self, spec, info, removed), "experts_after": experts_after, **details,
            "observer": observer,
            "method_seconds": round(sizes["seconds"] - watch.phases["observer"], 3),
            "config_count_keys": count_keys, "calibration_rows": len(dataset),
            "calibration": calibration_record(dataset), "seed": seed, "verification": verification, **sizes,
        }


def base_manifest(method: ExpertCompressor, spec: MethodSpec, info: MoEInfo, removed: int) -> dict[str, Any]:
    return {"method": spec.to_json(), "label": spec.label(), "family": method.family,
            "model": {"architecture": info.architecture, "num_experts": info.num_experts, "top_k": info.top_k,
                      "shared_experts": info.shared_experts},
            "experts_before": info.num_experts, "experts_removed_per_layer": removed}


def lowest(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` lowest scores; ties go to the lower index (stable sort), deterministic."""
    import torch

    order = torch.sort(scores.double(), stable=True).indices
    return sorted(int(i) for i in order[:count])


def lowest_per_group(scores: torch.Tensor, count: int, groups: int) -> list[int]:
    """`lowest` within each of `groups` equal consecutive groups (count / groups each), so group-limited routing
    keeps its groups (`check_groups` has made count divisible); one group is `lowest` itself."""
    size, per_group = len(scores) // groups, count // groups
    return sorted(g * size + i for g in range(groups)
                  for i in lowest(scores[g * size:(g + 1) * size], per_group))


class ExpertPruner(ObservedExpertCompressor):
    """Drop the `int(E·ratio)` lowest-scoring experts per layer."""

    criterion: ClassVar[str]
    statistic: ClassVar[str]  # the LayerStats tensor that scores the experts, unless `scores` is overridden

    def scores(self, stats: LayerStats) -> torch.Tensor:
        """Per-expert score of one layer: higher = more worth keeping."""
        score: torch.Tensor = getattr(stats, self.statistic)
        return score

    def edit(self, blocks: list[MoEBlock], stats: Mapping[str, LayerStats], info: MoEInfo,
             removed: int) -> tuple[int, dict[str, Any]]:
        kept, dropped, scores = {}, {}, {}
        for block in blocks:
            layer_scores = self.scores(stats[block.name])
            dropped[block.name] = lowest_per_group(layer_scores, removed, info.expert_groups)
            kept[block.name] = [e for e in range(block.num_experts) if e not in dropped[block.name]]
            scores[block.name] = [float(s) for s in layer_scores]
            prune_block(block, kept[block.name])
        return info.num_experts - removed, {
            "criterion": self.criterion, "kept_experts": kept, "dropped_experts": dropped, "scores": scores,
            "routed_slots": {name: [int(c) for c in stats[name].routed] for name in kept},
        }


@register
class REAPCompressor(ExpertPruner):
    """REAP (Lasby et al. 2025, arXiv 2510.13999): router-weighted expert activation pruning."""

    name: ClassVar[str] = "reap"
    criterion: ClassVar[str] = "reap: mean over routed slots of g·||E_i(x)||_2, g = the model's combine weight"
    gate: ClassVar[str] = "model"

    def __init__(self, *, backend: str = "observer") -> None:
        if backend not in ("observer", "llmcompressor"):
            raise ConfigError(f"{self.name}: backend must be 'observer' or 'llmcompressor', got {backend!r}")
        if backend == "llmcompressor" and self.gate != "model":
            raise ConfigError(f"{self.name}: llmcompressor's modifier only offers the model's combine weight")
        assert self.gate in GATES
        self.backend = backend

    def scores(self, stats: LayerStats) -> torch.Tensor:
        return stats.reap_saliency(self.gate)

    def edit(self, blocks: list[MoEBlock], stats: Mapping[str, LayerStats], info: MoEInfo,
             removed: int) -> tuple[int, dict[str, Any]]:
        experts_after, details = super().edit(blocks, stats, info, removed)
        return experts_after, {**details, "gate": self.gate, "saliency": details["scores"], "backend": "observer"}

    def compress(self, model_dir: Path, calibration: datasets.Dataset | None, out_dir: Path,
                 spec: MethodSpec, *, seed: int, cache_dir: Path | None = None,
                 device: str = "cpu") -> dict[str, Any]:
        if self.backend == "observer":
            return super().compress(model_dir, calibration, out_dir, spec, seed=seed, cache_dir=cache_dir,
                                    device=device)
        return compress_with_modifier(self, model_dir, calibration, out_dir, spec, seed=seed)


@register
class REAPSoftmaxCompressor(REAPCompressor):
    """REAP with the paper's gate: g = softmax over all E router logits (not the renormalised top-k)."""

    name: ClassVar[str] = "reap-softmax"
    criterion: ClassVar[str] = "reap: mean over routed slots of g·||E_i(x)||_2, g = softmax over all experts"
    gate: ClassVar[str] = "softmax"


@register
class FrequencyCompressor(ExpertPruner):
    """Frequency pruning: drop the experts routed the fewest (token, slot)s (REAP paper baseline)."""

    name: ClassVar[str] = "frequency"
    criterion: ClassVar[str] = "frequency: routed (token, slot) count"
    statistic: ClassVar[str] = "routed"


@register
class EANCompressor(ExpertPruner):
    """EAN pruning: drop the experts with the smallest summed output norm over their routed slots."""

    name: ClassVar[str] = "ean"
    criterion: ClassVar[str] = "ean: sum over routed slots of ||E_i(x)||_2"
    statistic: ClassVar[str] = "ean_sum"


# --------------------------------------------------------------------------------------------------------------
# reference backend: llmcompressor's REAPPruningModifier
# --------------------------------------------------------------------------------------------------------------
def recording_reap_modifier(sparsity: float, report_path: str) -> Any:
    """`REAPPruningModifier` that also keeps, per layer, the saliency vector and routed (token, slot) counts
    it pruned on (its own trackers, read just before each layer is pruned) — for the manifest and tests."""
    import torch
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
    from pydantic import PrivateAttr

    class RecordingREAPPruningModifier(REAPPruningModifier):
        _records: dict[str, dict[str, list[float]]] = PrivateAttr(default_factory=dict)

        # Same signature as REAPPruningModifier's own override (Modifier's names `modules` explicitly).
        def on_sequential_epoch_end(self, state: Any, event: Any, **kwargs: Any) -> None:  # type: ignore[override]
            for layer, tracker in self._saliency_trackers.items():
                if tracker.total_count > 0:
                    count = tracker.count.to("cpu", torch.float64) if tracker.count is not None else None
                    self._records[layer] = {
                        "saliency": [float(v) for v in tracker.mean_saliency],
                        "routed": [int(v) for v in count] if count is not None else [],
                    }
            super().on_sequential_epoch_end(state, event, **kwargs)

    return RecordingREAPPruningModifier(sparsity=sparsity, report_path=report_path)


def check_kept(kept: dict[str, list[int]], info: MoEInfo, removed: int) -> None:
    """The modifier's report must name, per MoE layer, E - removed distinct ascending indices in [0, E)."""
    if not kept:
        raise CompressionError("REAP pruned no layer (empty report): no MoE layer was found or calibrated")
    want = info.num_experts - removed
    for layer, indices in kept.items():
        if len(indices) != want or indices != sorted(set(indices)) or not all(0 <= i < info.num_experts
                                                                                for i in indices):
            raise CompressionError(f"REAP report for {layer}: kept {indices}, expected {want} distinct "
                                   f"ascending indices in [0, {info.num_experts})")


def compress_with_modifier(method: REAPCompressor, model_dir: Path, calibration: datasets.Dataset | None,
                           out_dir: Path, spec: MethodSpec, *, seed: int) -> dict[str, Any]:
    """REAP by llmcompressor's modifier (single pass on dense inputs), repacked to the native fused layout."""
    from compressors.llmc_patches import release_session, run_oneshot
    from compressors.runtime import repack_experts

    watch = Stopwatch()
    info, removed, dataset = method.prepare(model_dir, calibration, spec, seed)
    assert spec.ratio is not None
    with watch.phase("load"):
        model, tokenizer = load_model(model_dir)
        expert_linears(model)  # linearize now: the modifier only sees LinearExperts2D layers
    with watch.phase("oneshot"), tempfile.TemporaryDirectory(prefix="reap-") as tmp:
        report = Path(tmp) / "kept_experts.json"
        recipe = recording_reap_modifier(spec.ratio, str(report))
        # All-experts calibration is not needed by REAP (same kept sets, §3) and costs E× the expert work.
        run_oneshot(model, tokenizer, dataset, recipe, calibrate_all_experts=False, propagate_error=False)
        if not report.is_file():
            raise CompressionError(f"REAP wrote no report at {report}")
        kept: dict[str, list[int]] = json.loads(report.read_text(encoding="utf-8"))
    check_kept(kept, info, removed)
    records = recipe._records
    if set(records) != set(kept):
        raise CompressionError(f"REAP saliency recorded for {sorted(records)} but pruned {sorted(kept)}")
    with watch.phase("finish"):
        repack_experts(model)  # Mixtral reloads silently wrong from per-expert Linear keys (llmcompressor.md §5f)
    verification, count_keys = save_verified(model, tokenizer, out_dir, num_experts=info.num_experts - removed,
                                             seed=seed, watch=watch)
    del model, recipe
    release_session()
    return {
        **base_manifest(method, spec, info, removed), "experts_after": info.num_experts - removed,
        "criterion": method.criterion, "gate": "model", "backend": "llmcompressor", "kept_experts": kept,
        "dropped_experts": {layer: sorted(set(range(info.num_experts)) - set(indices))
                            for layer, indices in kept.items()},
        "saliency": {layer: records[layer]["saliency"] for layer in kept},
        "routed_slots": {layer: records[layer]["routed"] for layer in kept},
        "config_count_keys": count_keys, "calibration_rows": len(dataset),
        "calibration": calibration_record(dataset), "seed": seed, "verification": verification,
        **measurements(watch, model_dir, out_dir),
    }
