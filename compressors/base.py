"""Method specs, MoE facts read from a config, the `Compressor` interface and the method registry.

A compression method is a small class configured by data (like an llm-compressor recipe): the grid is
`MethodSpec`s (method × scheme | ratio); `get(name)` returns the class that validates a spec against a model
(`MoEInfo`) and builds the checkpoint. New methods subclass `Compressor` (or `ExpertCompressor`) and
decorate themselves with `@register`. Heavy libraries are imported inside `compress` only.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from architectures.families import family_named
from fixtures.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import datasets

FAMILIES = ("quantization", "sparsity", "expert")

# Config keys, in the order tried. Count of routed experts: Qwen/OLMoE `num_experts`, Mixtral
# `num_local_experts`, ERNIE-4.5 `moe_num_experts`, DeepSeek `n_routed_experts`.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "moe_num_experts", "n_routed_experts")
# Never `top_k`: old configs carry it as a sampling parameter.
TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_top_k")
SHARED_EXPERT_KEYS = ("moe_num_shared_experts", "n_shared_experts", "num_shared_experts")


@dataclass(frozen=True)
class MethodSpec:
    """One point of the grid: what to build. `ratio` is the fraction removed (pruning/merging)."""

    method: str
    scheme: str | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ConfigError(f"method must be a non-empty string, got {self.method!r}")
        if self.scheme is not None and not isinstance(self.scheme, str):
            raise ConfigError(f"{self.method}: scheme must be a string, got {self.scheme!r}")
        ratio = self.ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, int | float)
                                  or not math.isfinite(ratio)):
            raise ConfigError(f"{self.method}: ratio must be a finite number, got {self.ratio!r}")

    def label(self) -> str:
        """`gptq-w4a16`, `reap-r50`, `reap-r12.5`: the pytest id part."""
        parts = [self.method]
        if self.scheme is not None:
            parts.append(self.scheme)
        if self.ratio is not None:
            parts.append(f"r{format_percent(self.ratio)}")
        return "-".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "scheme": self.scheme, "ratio": self.ratio}

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> MethodSpec:
        return cls(str(payload["method"]), payload.get("scheme"), payload.get("ratio"))


def format_percent(ratio: float) -> str:
    """0.5 -> '50', 0.125 -> '12.5', 1/3 -> '33.3333' (6 significant digits, no trailing zeros)."""
    return f"{round(ratio * 100, 4):g}"


@dataclass(frozen=True)
class MoEInfo:
    """What the compressors need to know about a Mixture-of-Experts model, read from its config."""

    architecture: str  # config `model_type`, e.g. "qwen3_moe"
    num_experts: int  # routed experts per MoE layer
    top_k: int  # experts selected per token
    num_layers: int  # decoder layers (`num_hidden_layers`)
    shared_experts: int  # always-on experts (not routed, never pruned)
    hidden_size: int | None = None
    expert_intermediate_size: int | None = None
    expert_groups: int = 1  # group-limited routing (DeepSeek-V3, GLM-4.5 `n_group`): experts per group = E / groups
    groups_selected: int = 1  # groups a token may pick from (`topk_group`)


def moe_info(config: Mapping[str, Any] | Any) -> MoEInfo:
    """Read `MoEInfo` from a config.json mapping or a `PretrainedConfig`; ModelError if it is not an MoE."""
    raw: dict[str, Any] = dict(config) if isinstance(config, Mapping) else dict(config.to_dict())
    text = raw.get("text_config")
    if isinstance(text, Mapping):  # multimodal wrappers keep the language model in `text_config`
        raw = {**raw, **dict(text)}
    arch = str(raw.get("model_type") or (raw.get("architectures") or ["unknown"])[0])
    name = raw.get("_name_or_path") or arch
    experts = _first_int(raw, EXPERT_COUNT_KEYS)
    if experts is None or experts < 2:
        raise ModelError(
            f"{name} (model_type {arch!r}) is not a Mixture-of-Experts model: none of the config keys "
            f"{', '.join(EXPERT_COUNT_KEYS)} gives 2 or more routed experts"
        )
    top_k = _first_int(raw, TOP_K_KEYS)
    if top_k is None or not 1 <= top_k <= experts:
        raise ModelError(
            f"{name} (model_type {arch!r}) has {experts} experts but no valid top-k "
            f"(keys {', '.join(TOP_K_KEYS)}; got {top_k})"
        )
    shared = _first_int(raw, SHARED_EXPERT_KEYS)
    if shared is None:  # Qwen2-MoE style: one shared expert when it has a width
        shared = 1 if (_first_int(raw, ("shared_expert_intermediate_size",)) or 0) > 0 else 0
    return MoEInfo(
        architecture=arch,
        num_experts=experts,
        top_k=top_k,
        num_layers=_first_int(raw, ("num_hidden_layers", "num_layers", "n_layer")) or 0,
        shared_experts=shared,
        hidden_size=_first_int(raw, ("hidden_size", "d_model")),
        expert_intermediate_size=_first_int(raw, ("moe_intermediate_size", "intermediate_size")),
        expert_groups=_first_int(raw, ("n_group",)) or 1,
        groups_selected=_first_int(raw, ("topk_group",)) or 1,
    )


def _first_int(raw: Mapping[str, Any], keys: Sequence[str]) -> int | None:
    for key in keys:
        value = raw.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class Compressor(ABC):
    """A compression method. Subclasses set the class variables and implement `compress`."""

    name: ClassVar[str]
    family: ClassVar[str]  # "quantization" | "sparsity" | "expert"
    schemes: ClassVar[tuple[str, ...]] = ()  # empty: not a scheme method (takes a ratio instead)
    default_schemes: ClassVar[tuple[str, ...]] = ()
    default_ratios: ClassVar[tuple[float, ...]] = ()
    needs_calibration: ClassVar[bool] = True

    @property
    def uses_ratio(self) -> bool:
        return not self.schemes

    def expand(self, *, schemes: Sequence[str] | None = None,
               ratios: Sequence[float] | None = None) -> tuple[MethodSpec, ...]:
        """The specs this method contributes to a grid. Scheme methods ignore `ratios` and vice versa.

        Requested schemes this method does not know are skipped (another method may take them); none
        left is a ConfigError listing the valid ones.
        """
        if not self.uses_ratio:
            if schemes is None:
                return tuple(MethodSpec(self.name, s) for s in self.default_schemes)
            wanted = [s.lower() for s in schemes if s.lower() in self.schemes]
            if not wanted:
                raise ConfigError(
                    f"{self.name}: none of the schemes {', '.join(schemes)} is supported; "
                    f"valid: {', '.join(self.schemes)}"
                )
            return tuple(MethodSpec(self.name, s) for s in dict.fromkeys(wanted))
        chosen = self.default_ratios if ratios is None else tuple(ratios)
        for ratio in chosen:
            self.check_ratio(ratio)
        return tuple(MethodSpec(self.name, None, float(r)) for r in dict.fromkeys(chosen))

    def check_ratio(self, ratio: float | None) -> None:
        """Model-independent ratio check: the fraction removed must lie in (0, 1)."""
        if ratio is None:
            raise ConfigError(f"{self.name}: a ratio (fraction removed, in (0, 1)) is required")
        if not 0.0 < ratio < 1.0:
            raise ConfigError(f"{self.name}: ratio {ratio:g} is the fraction removed and must lie in (0, 1)")

    def validate(self, spec: MethodSpec, model_info: MoEInfo) -> None:
        """ConfigError if `spec` cannot be built for this model (unknown scheme, impossible ratio...)."""
        if spec.method != self.name:
            raise ConfigError(f"spec for method {spec.method!r} given to the {self.name!r} compressor")
        family = family_named(model_info.architecture)
        reason = family.refusal(self.name) if family is not None else None
        if family is not None and reason is not None:
            raise ConfigError(f"{self.name} is not supported on {family.name} ({family.model_type}): {reason}")
        if self.uses_ratio:
            if spec.scheme is not None:
                raise ConfigError(f"{self.name} takes a ratio, not a scheme (got scheme {spec.scheme!r})")
            self.check_ratio(spec.ratio)
        else:
            if spec.scheme is None or spec.scheme.lower() not in self.schemes:
                raise ConfigError(
                    f"{self.name}: unknown scheme {spec.scheme!r}; valid: {', '.join(self.schemes)}"
                )
            if spec.ratio is not None:
                raise ConfigError(f"{self.name} takes a scheme, not a ratio (got ratio {spec.ratio:g})")

    @abstractmethod
    def compress(self, model_dir: Path, calibration: datasets.Dataset | None, out_dir: Path,
                 spec: MethodSpec, *, seed: int, cache_dir: Path | None = None,
                 device: str = "cpu") -> dict[str, Any]:
        """Write a reloadable HF checkpoint into `out_dir`; return the manifest details (JSON-ready).

        `cache_dir` is the audit's cache root, for intermediate artefacts shared between checkpoints
        (e.g. one observer pass feeding several expert-compression methods and ratios). `device` is where
        methods of our own compute (the observer pass over a few-billion-parameter MoE is hours on a CPU,
        seconds on a GPU); llmcompressor's `oneshot` places each layer itself (on a visible GPU).
        """


class ExpertCompressor(Compressor):
    """Pruning/merging of whole routed experts: the ratio must leave at least top-k experts per layer."""

    family: ClassVar[str] = "expert"
    # False where every expert slot survives (HC-SMoE with all router rows kept): no group constraint applies.
    removes_experts: ClassVar[bool] = True

    @staticmethod
    def experts_removed(num_experts: int, ratio: float) -> int:
        """Experts dropped per layer: `int(E * ratio)`, exactly as REAP and llm-compressor count them
        (so 0.3 of 10 drops 2, since 0.3 * 10 == 2.9999999999999996: kept identical on purpose)."""
        return int(num_experts * ratio)

    def validate(self, spec: MethodSpec, model_info: MoEInfo) -> None:
        super().validate(spec, model_info)
        assert spec.ratio is not None
        e, k = model_info.num_experts, model_info.top_k
        removed = self.experts_removed(e, spec.ratio)
        if removed < 1:
            raise ConfigError(
                f"{self.name}: ratio {spec.ratio:g} removes int({e}*{spec.ratio:g})=0 of {e} experts per "
                f"layer; the smallest useful ratio is {1 / e:g}"
            )
        if e - removed < k:
            raise ConfigError(
                f"{self.name}: ratio {spec.ratio:g} removes {removed} of {e} experts per layer, leaving "
                f"{e - removed} < top_k={k} experts the router must select per token"
            )
        if self.removes_experts and model_info.expert_groups > 1:
            check_groups(self.name, spec.ratio, model_info, removed)


def check_groups(method: str, ratio: float, info: MoEInfo, removed: int) -> None:
    """Group-limited routing (DeepSeek-V3, GLM-4.5) reshapes the experts into `n_group` equal groups, scores a
    group by its two best experts and picks `topk_group` groups: pruning must drop the same count from every
    group (kept experts stay in their group) and leave >= 2 per group and >= top_k in the picked groups."""
    groups, picked = info.expert_groups, info.groups_selected
    per_group = (info.num_experts - removed) // groups
    if removed % groups:
        raise ConfigError(f"{method}: ratio {ratio:g} removes {removed} experts per layer, not a multiple of the "
                          f"{groups} expert groups of {info.architecture}'s group-limited routing")
    if per_group < 2 or picked * per_group < info.top_k:
        raise ConfigError(f"{method}: ratio {ratio:g} leaves {per_group} experts in each of {groups} groups; "
                          f"{info.architecture}'s routing needs >= 2 per group and topk_group={picked} groups "
                          f"holding >= top_k={info.top_k} experts")


_REGISTRY: dict[str, type[Compressor]] = {}
_INSTANCES: dict[str, Compressor] = {}


def register(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: make a method available under `cls.name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name != name.lower():
        raise ConfigError(f"{cls.__name__}: `name` must be a non-empty lower-case string, got {name!r}")
    if getattr(cls, "family", None) not in FAMILIES:
        raise ConfigError(f"{cls.__name__}: family must be one of {', '.join(FAMILIES)}")
    existing = _REGISTRY.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ConfigError(
            f"method name {name!r} registered twice ({existing.__qualname__}, {cls.__qualname__})"
        )
    _REGISTRY[name] = cls
    _INSTANCES.pop(name, None)
    return cls


def available() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get(name: str) -> Compressor:
    """The registered method `name` (an instance); ConfigError listing the valid names otherwise."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ConfigError(f"unknown compression method {name!r}; valid: {', '.join(available())}")
    if key not in _INSTANCES:
        _INSTANCES[key] = _REGISTRY[key]()
    return _INSTANCES[key]
