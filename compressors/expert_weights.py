"""The one flow every expert-weight method runs (quantization and weight sparsity), so a method is data.

Why one flow: the pitfalls are the same for every method that rewrites the routed experts' weights through
llm-compressor's `oneshot` (llmcompressor.md §5): the causal mask and the CPU pin_memory patches, all-experts
calibration, expert-only targets, the Mixtral/GPT-OSS repack before saving, the plain-transformers reload
check and the measurements. Each lives here or in the helpers it calls, once; a method class contributes
its schemes, its llm-compressor modifiers (`recipe`) and how its model is saved (`finish`).

Flow: load (dtype as stored) -> linearize the fused experts -> hash every non-expert tensor -> `oneshot`
(sequential pipeline over the calibration rows, or data-free) -> assert the non-expert tensors are
bit-identical -> `finish` (repack where needed) -> reference logits in the reload's semantics -> save ->
plain reload, compare, measure every expert projection on the reload -> manifest.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from compressors.base import Compressor, MethodSpec, MoEInfo
from compressors.llmc_patches import release_session, run_oneshot
from compressors.measure import measure_reloaded, stored_bits, summarize
from compressors.resources import release_accelerator_memory
from compressors.runtime import (
    EXPERT_TARGET,
    Stopwatch,
    calibration_record,
    check_calibration,
    check_untouched,
    checkpoint_sha256,
    expert_linears,
    load_model,
    measurements,
    non_expert_state,
    read_moe_info,
    save_checkpoint,
    seed_everything,
)
from compressors.verify import reference, verify_checkpoint
from fixtures.errors import CompressionError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel

IGNORE = ["lm_head"]  # never a target (the expert regex cannot match it); named for the recipe record


class ExpertWeightCompressor(Compressor):
    """Expert-only weight compression through `oneshot`; subclasses provide `recipe` (and `finish`)."""

    save_compressed: ClassVar[bool] = False  # True: compressed-tensors format (quantization)
    # True where the result depends on the seed beyond the calibration rows (random pruning): the grid must
    # then build one checkpoint per seed even for a data-free method.
    seed_dependent: ClassVar[bool] = False

    @abstractmethod
    def recipe(self, spec: MethodSpec, linears: dict[str, Any], seed: int) -> tuple[list[Any], dict[str, Any]]:
        """The llm-compressor modifiers building `spec` on these expert projections, and the settings to
        record in the manifest (group size, sparsity, mask structure...)."""

    def finish(self, model: PreTrainedModel, info: MoEInfo,
               settings: dict[str, Any]) -> tuple[str, dict[str, dict[str, Any]]]:
        """Bring the compressed model into the form it is saved in; return the storage name and per-tensor
        scheme facts (read before a repack drops them). Default: nothing to do, dense storage."""
        return "dense", {}

    @contextlib.contextmanager
    def reference_view(self, model: PreTrainedModel) -> Iterator[None]:
        """The model as plain transformers will compute it after reload (default: as it is)."""
        yield

    def compress(self, model_dir: Path, calibration: datasets.Dataset | None, out_dir: Path,
                 spec: MethodSpec, *, seed: int, cache_dir: Path | None = None,
                 device: str = "cpu") -> dict[str, Any]:
        watch = Stopwatch()
        info = read_moe_info(model_dir)
        self.validate(spec, info)
        dataset = check_calibration(calibration, self.name) if self.needs_calibration else None
        seed_everything(seed)
        with watch.phase("load"):
            model, tokenizer = load_model(model_dir, device)
            linears = expert_linears(model)
        with watch.phase("hash"):
            untouched = non_expert_state(model)
        with watch.phase("oneshot"):
            modifiers, settings = self.recipe(spec, linears, seed)
            run_oneshot(model, tokenizer, dataset, modifiers, calibrate_all_experts=True)
        with watch.phase("hash"):
            check_untouched(untouched, model, self.name)
        with watch.phase("finish"):
            storage, args = self.finish(model, info, settings)
        with watch.phase("reference"), self.reference_view(model):
            ref = reference(model, seed=seed)
        with watch.phase("save"):
            save_checkpoint(model, tokenizer, out_dir, compressed=self.save_compressed)
        recipe_names = [type(m).__name__ for m in modifiers]
        linear_names = set(linears)
        del model, modifiers, linears  # the modules would keep the in-memory weights alive during the reload
        release_accelerator_memory()
        release_session()
        groups = {name: facts.get("levels_group") for name, facts in args.items()}
        with watch.phase("verify"):
            verification = verify_checkpoint(out_dir, ref, expected_num_experts=info.num_experts,
                                             inspect=lambda reloaded: measure_reloaded(reloaded, groups))
        tensors = expert_tensor_records(out_dir, storage, linear_names, args, verification.pop("inspected"),
                                        self.name)
        with watch.phase("hash"):
            weights_sha256 = checkpoint_sha256(out_dir)
        return {
            "method": spec.to_json(), "label": spec.label(), "family": self.family,
            "model": {"architecture": info.architecture, "num_experts": info.num_experts, "top_k": info.top_k,
                      "shared_experts": info.shared_experts},
            "targets": [EXPERT_TARGET], "ignore": IGNORE, "recipe": recipe_names, "settings": settings,
            "storage": storage, "untouched": {"tensors": len(untouched), "bit_identical": True},
            "summary": summarize(tensors), "expert_tensors": tensors,
            "calibration": calibration_record(dataset), "calibration_rows": len(dataset) if dataset is not None else 0,
            "seed": seed, "seed_dependent": self.seed_dependent, "weights_sha256": weights_sha256,
            "verification": verification, **measurements(watch, model_dir, out_dir),
        }


def expert_tensor_records(out_dir: Path, storage: str, names: set[str], args: dict[str, dict[str, Any]],
                          measured: dict[str, dict[str, Any]], method: str) -> dict[str, dict[str, Any]]:
    """One record per expert projection: scheme facts + storage + measurements. Every projection must be
    in the reload, and in a compressed save under its own name (a missing one is an error, never a gap);
    dense storage costs the reloaded dtype's bits."""
    stored = stored_bits(out_dir)
    found = {"the reloaded model": set(measured)}
    if not storage.startswith("dense"):
        found["the saved compressed tensors"] = set(stored)
    for source, present in found.items():
        if not names <= present:
            raise CompressionError(f"{method}: expert projections missing from {source}, e.g. "
                                   f"{sorted(names - present)[:3]} ({len(names - present)} of {len(names)})")
    if args and set(args) != names:
        raise CompressionError(f"{method}: {len(args)} expert tensors carry a scheme, expected the "
                               f"{len(names)} expert projections (e.g. missing {sorted(names - set(args))[:3]})")
    records = {}
    for name in sorted(names):
        dense = {"stored_dtype": measured[name]["reload_dtype"],
                 "effective_bits": float(measured[name]["reload_bits"])}
        record = {**args.get(name, {}), **stored.get(name, dense), **measured[name]}
        record.setdefault("num_bits", round(record["effective_bits"]))  # dense storage: the dtype's bits
        records[name] = record
    return records
