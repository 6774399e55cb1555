"""Expert-only weight sparsity through llm-compressor: Wanda, SparseGPT, magnitude and random pruning.

Only the routed experts' projections are pruned (`EXPERT_TARGET`); everything else stays bit-identical
(asserted in `ExpertWeightCompressor.compress`). Sparse checkpoints are saved dense (compressed-tensors
dropped sparse compression; zeros and 2:4 patterns survive exactly, llmcompressor.md §5f), with the experts
repacked into the native fused layout, exactly as REAP does (uniform across architectures; Mixtral reloads
silently wrong from per-expert keys otherwise).

Schemes: `s50` (50% unstructured) and `2of4` (2:4: two zeros in every run of four input weights) for the
calibrated methods (Wanda, SparseGPT; the paper's settings). Magnitude and random pruning take `sNN` for any
integer percent NN in 10..70, for dose-response curves; they use no data (`needs_calibration = False`: one
checkpoint per scheme, ids without a safety part). llm-compressor's `MagnitudePruningModifier` is a
training-time modifier: under `oneshot` it computes masks but never applies them (the weights stay dense;
tests/test_sparsity.py keeps that control), so both run `ExpertMaskPruningModifier` below, a small
data-free modifier, through the same `oneshot` call as every other method.

Exactness: magnitude/random zero exactly floor(numel * NN / 100) entries of every expert tensor (integer
arithmetic; ties broken by position, so the count never drifts). Wanda prunes exactly half of every row.
SparseGPT's unstructured mask prunes one entry more per 128-column block than half (its threshold is the
k-th smallest score *inclusive*): 0.5 + blocks/numel, recorded as measured. On an accelerator its
per-expert column loop runs over stacks of a layer's experts (compressors/sparsegpt_batched.py).
"""

from __future__ import annotations

import functools
import hashlib
import re
from abc import abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from compressors.base import MethodSpec, MoEInfo, register
from compressors.expert_weights import IGNORE, ExpertWeightCompressor
from compressors.runtime import EXPERT_TARGET, repack_experts
from fixtures.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from transformers import PreTrainedModel

SPARSITY_SCHEME = re.compile(r"^s(\d{2})$")
PERCENT_RANGE = (10, 70)
SCHEME_FORM = f"sNN with NN an integer percent in {PERCENT_RANGE[0]}..{PERCENT_RANGE[1]} (e.g. s30)"


def prune_lowest(weight: torch.Tensor, scores: torch.Tensor, percent: int) -> torch.Tensor:
    """`weight` with exactly floor(numel * percent / 100) entries zeroed: those of lowest score (ties: the
    earlier position first, by a stable sort)."""
    import torch

    count = weight.numel() * percent // 100
    order = torch.argsort(scores.reshape(-1), stable=True)[:count]
    pruned = weight.detach().clone().reshape(-1)
    pruned[order] = 0
    return pruned.reshape(weight.shape)


def mask_scores(weight: torch.Tensor, criterion: str, seed: int, name: str) -> torch.Tensor:
    """|w| (magnitude), or uniform noise from a generator seeded by (seed, tensor name) (random): the same
    seed gives the same mask for a tensor whatever the order the tensors are visited in."""
    import torch

    if criterion == "magnitude":
        return weight.detach().abs().float()
    stream = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    # Drawn on the CPU (the mask is the same on every device), ranked where the weight lives: sorting 3,072
    # expert tensors on the host and indexing a GPU tensor with host indices took > 300 s at 2.8B on an H200.
    return torch.rand(weight.shape, generator=torch.Generator().manual_seed(stream)).to(weight.device)


@functools.cache
def mask_pruning_modifier_class() -> type:
    """`ExpertMaskPruningModifier` (built on first use: llm-compressor is imported lazily)."""
    import torch
    from compressed_tensors.utils import align_module_device, match_named_modules, update_offload_parameter
    from llmcompressor.modifiers import Modifier

    class ExpertMaskPruningModifier(Modifier):
        """Data-free one-shot pruning of the `targets` weights: `prune_lowest` by `mask_scores`."""

        targets: list[str]
        percent: int
        criterion: Literal["magnitude", "random"]
        seed: int = 0

        def on_initialize(self, state: Any, **kwargs: Any) -> bool:
            return True

        def on_calibration_start(self, state: Any, event: Any, **kwargs: Any) -> None:
            for name, module in match_named_modules(state.model, self.targets):
                with torch.no_grad(), align_module_device(module):
                    scores = mask_scores(module.weight, self.criterion, self.seed, name)
                    pruned = prune_lowest(module.weight, scores, self.percent)
                update_offload_parameter(module, "weight", pruned)

    return ExpertMaskPruningModifier


class WeightPruner(ExpertWeightCompressor):
    """Shared recipe/saving of the expert-only pruners; subclasses map schemes to (sparsity, structure)."""

    family: ClassVar[str] = "sparsity"
    structures: ClassVar[dict[str, tuple[float, str]]] = {}  # scheme -> (sparsity, llm-compressor mask)

    def target(self, scheme: str) -> tuple[float, str]:
        return self.structures[scheme.lower()]

    @abstractmethod
    def modifiers(self, sparsity: float, structure: str, seed: int) -> list[Any]:
        ...

    def recipe(self, spec: MethodSpec, linears: dict[str, Any], seed: int) -> tuple[list[Any], dict[str, Any]]:
        assert spec.scheme is not None
        sparsity, structure = self.target(spec.scheme)
        settings = {"sparsity": sparsity, "mask_structure": structure}
        return self.modifiers(sparsity, structure, seed), settings

    def finish(self, model: PreTrainedModel, info: MoEInfo,
               settings: dict[str, Any]) -> tuple[str, dict[str, dict[str, Any]]]:
        repack_experts(model)
        return "dense", {}


class CalibratedPruner(WeightPruner):
    """The paper's calibrated pruners: 50% unstructured or 2:4, by an llm-compressor pruning modifier."""

    schemes: ClassVar[tuple[str, ...]] = ("s50", "2of4")
    default_schemes: ClassVar[tuple[str, ...]] = ("s50", "2of4")
    structures: ClassVar[dict[str, tuple[float, str]]] = {"s50": (0.5, "0:0"), "2of4": (0.5, "2:4")}
    modifier: ClassVar[str]  # class name in llmcompressor.modifiers.pruning

    def modifiers(self, sparsity: float, structure: str, seed: int) -> list[Any]:
        from llmcompressor.modifiers import pruning

        modifier = getattr(pruning, self.modifier)
        return [modifier(targets=[EXPERT_TARGET], ignore=IGNORE, sparsity=sparsity, mask_structure=structure)]


@register
class WandaCompressor(CalibratedPruner):
    """Wanda (Sun et al. 2024): prune by |w|·||x|| per output row, via `WandaPruningModifier`."""

    name: ClassVar[str] = "wanda"
    modifier: ClassVar[str] = "WandaPruningModifier"


@register
class SparseGPTCompressor(CalibratedPruner):
    """SparseGPT (Frantar & Alistarh 2023): OBS-style pruning with weight reconstruction."""

    name: ClassVar[str] = "sparsegpt"
    modifier: ClassVar[str] = "SparseGPTModifier"


class DoseResponsePruner(WeightPruner):
    """Data-free pruning at any `sNN`, NN in 10..70: the scheme is a pattern, not a list."""

    schemes: ClassVar[tuple[str, ...]] = (f"s{PERCENT_RANGE[0]}..s{PERCENT_RANGE[1]}",)  # for --audit-list
    default_schemes: ClassVar[tuple[str, ...]] = ("s30", "s50", "s70")
    needs_calibration: ClassVar[bool] = False
    criterion: ClassVar[Literal["magnitude", "random"]]

    def target(self, scheme: str) -> tuple[float, str]:
        return parse_percent(self.name, scheme) / 100, "0:0"

    def expand(self, *, schemes: Sequence[str] | None = None,
               ratios: Sequence[float] | None = None) -> tuple[MethodSpec, ...]:
        """Requested `s<digits>` schemes are validated (out of range: ConfigError); others are skipped, as
        in the base class (another method may take them); none left is a ConfigError."""
        if schemes is None:
            return tuple(MethodSpec(self.name, s) for s in self.default_schemes)
        wanted = [s.lower() for s in schemes if re.fullmatch(r"s\d+", s.lower())]
        for scheme in wanted:
            parse_percent(self.name, scheme)
        if not wanted:
            raise ConfigError(f"{self.name}: none of the schemes {', '.join(schemes)} is supported; "
                              f"valid: {SCHEME_FORM}")
        return tuple(MethodSpec(self.name, s) for s in dict.fromkeys(wanted))

    def validate(self, spec: MethodSpec, model_info: MoEInfo) -> None:
        if spec.method != self.name:
            raise ConfigError(f"spec for method {spec.method!r} given to the {self.name!r} compressor")
        if spec.ratio is not None:
            raise ConfigError(f"{self.name} takes a scheme, not a ratio (got ratio {spec.ratio:g})")
        parse_percent(self.name, spec.scheme)

    def modifiers(self, sparsity: float, structure: str, seed: int) -> list[Any]:
        percent = round(sparsity * 100)
        return [mask_pruning_modifier_class()(targets=[EXPERT_TARGET], percent=percent,
                                              criterion=self.criterion, seed=seed)]


def parse_percent(method: str, scheme: str | None) -> int:
    """`s30` -> 30; anything else (or NN outside 10..70) is a ConfigError naming the valid form."""
    match = SPARSITY_SCHEME.match(scheme.lower()) if isinstance(scheme, str) else None
    if match is None or not PERCENT_RANGE[0] <= int(match[1]) <= PERCENT_RANGE[1]:
        raise ConfigError(f"{method}: unknown scheme {scheme!r}; valid: {SCHEME_FORM}")
    return int(match[1])


@register
class MagnitudePruningCompressor(DoseResponsePruner):
    """Magnitude pruning (Han et al. 2015), per expert tensor: the smallest |w| go. Uses no data and no
    randomness: the seed does not change the checkpoint."""

    name: ClassVar[str] = "magnitude"
    criterion: ClassVar[Literal["magnitude", "random"]] = "magnitude"


@register
class RandomPruningCompressor(DoseResponsePruner):
    """Random pruning, per expert tensor, with a mask drawn from the seed: the control every data-aware
    method should beat. Uses no data, but each seed is a different checkpoint (`seed_dependent`)."""

    name: ClassVar[str] = "random"
    criterion: ClassVar[Literal["magnitude", "random"]] = "random"
    seed_dependent: ClassVar[bool] = True
