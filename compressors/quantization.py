"""Expert-only weight quantization through llm-compressor: GPTQ, AWQ and dynamic FP8.

Only the routed experts' projections are quantized (`EXPERT_TARGET`); attention, routers, norms,
embeddings, lm_head and shared experts stay bit-identical (asserted in `ExpertWeightCompressor.compress`).
A method is its schemes (data: `QuantPreset`) plus the modifiers it runs (`modifiers`).

Group size: the int schemes are symmetric group-wise with group 128 (compressed-tensors presets). When an
expert projection's in_features is not a multiple of 128 (llmcompressor.md §5c: GPT-OSS hidden 2880,
expert widths of 64...), the largest group size in `GROUP_SIZES` dividing every expert in_features is used
instead, recorded per tensor in the manifest and in the saved quantization config; if none divides, a
ConfigError names the widths. The scheme name (and the pytest id) stays e.g. `w4a16`.

Storage: int schemes are saved `pack-quantized`, also W4A8, whose inferred format (`int-quantized`, one
int8 per 4-bit weight) plain transformers cannot reload (its `DecompressExperts` knows packed and FP8
experts only); FP8 is `float-quantized`. Activation quantization (W4A8, FP8 dynamic) is recorded in the
saved config and runs under vLLM / llm-compressor's `load_context`; plain transformers decompresses the
weights and does not quantize activations, which is what verification compares against (verify.py).
Mixtral cannot be reloaded from llm-compressor's per-expert keys (experts silently re-initialised: §5f),
so its experts are fake-quantized in place, repacked into the native fused layout and saved dense
(`storage: dense-fake-quant`, exactly on the quantization grid, activation quantization not stored).
GPT-OSS has the same reload problem plus an upstream repack bug (§5f): not supported here; verification
refuses its checkpoints rather than passing them.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from architectures.families import family_named
from compressors.base import MethodSpec, MoEInfo, register
from compressors.expert_weights import IGNORE, ExpertWeightCompressor
from compressors.runtime import EXPERT_TARGET, repack_experts
from fixtures.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

GROUP_SIZES = (128, 64, 32)
_QPARAM_SUFFIXES = ("_scale", "_zero_point", "_g_idx", "_global_scale")
# AWQ smoothing pair inside each expert (llmcompressor.md §5b): up_proj's output rows are divided by the
# scales that down_proj's input columns are multiplied by. The default MoE mappings also rescale
# `post_attention_layernorm` and the router `mlp.gate` (function-preserving but not bit-identical).
AWQ_EXPERT_MAPPING = (r"re:.*\.experts\.\d+\.up_proj$", [r"re:.*\.experts\.\d+\.down_proj$"])


@dataclass(frozen=True)
class QuantPreset:
    """A scheme as data: the compressed-tensors preset, its storage format, whether it is group-wise, and the
    weight width when it differs from the preset's (compressed-tensors has no 3-bit preset: W3A16 is W4A16's
    symmetric group-128 int scheme at 3 bits, packed 10 per int32 like the others)."""

    preset: str
    format: str
    grouped: bool = True
    num_bits: int | None = None


INT_PRESETS = {"w4a16": QuantPreset("W4A16", "pack-quantized"), "w8a16": QuantPreset("W8A16", "pack-quantized"),
               "w4a8": QuantPreset("W4A8", "pack-quantized"),
               "w3a16": QuantPreset("W4A16", "pack-quantized", num_bits=3)}


def choose_group_size(in_features: set[int], preferred: int = 128) -> int:
    """`preferred` if it divides every width, else the largest of GROUP_SIZES that does; else ConfigError."""
    for group in (preferred, *(g for g in GROUP_SIZES if g < preferred)):
        if all(width % group == 0 for width in in_features):
            return group
    raise ConfigError(
        f"expert in_features {sorted(in_features)} are not all multiples of any group size in "
        f"{(preferred, *GROUP_SIZES)}; group-wise int quantization cannot be applied to these experts"
    )


def expert_scheme(preset: QuantPreset, group_size: int | None) -> Any:
    """The compressed-tensors preset on the expert projections, with `group_size` and the storage format."""
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(preset.preset, [EXPERT_TARGET])
    if scheme.weights is not None and scheme.weights.group_size is not None and group_size is not None:
        scheme.weights = scheme.weights.model_copy(update={"group_size": group_size})
    if scheme.weights is not None and preset.num_bits is not None:
        scheme.weights = scheme.weights.model_copy(update={"num_bits": preset.num_bits})
    scheme.format = preset.format
    return scheme


def quantized_modules(model: PreTrainedModel) -> dict[str, Any]:
    return {name: module for name, module in model.named_modules()
            if getattr(module, "quantization_scheme", None) is not None
            and module.quantization_scheme.weights is not None}


def in_memory_schemes(model: PreTrainedModel) -> dict[str, dict[str, Any]]:
    """Per quantized module: weight bits/type/strategy/group, activation bits, and the run length within
    which a b-bit grid allows at most 2**b distinct values (for the measured bit-width)."""
    found = {}
    for name, module in quantized_modules(model).items():
        weights, acts = module.quantization_scheme.weights, module.quantization_scheme.input_activations
        found[name] = {
            "num_bits": weights.num_bits, "type": _text(weights.type), "strategy": _text(weights.strategy),
            "group_size": weights.group_size, "symmetric": weights.symmetric,
            "activation_bits": acts.num_bits if acts is not None else None,
            "levels_group": weights.group_size if weights.group_size else int(module.in_features),
        }
    return found


def _text(value: Any) -> str:
    return str(getattr(value, "value", value))  # compressed-tensors enums (str subclasses) -> their value


def fake_quantized_weight(module: Any) -> Any:
    """The weight as the quantized forward uses it (on the grid); idempotent for GPTQ's already-qdq weights."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    return forward_quantize(module, module.weight.data, "weight", module.quantization_scheme.weights)


def decompressed_dtype(module: Any) -> Any:
    """The dtype plain transformers decompresses this module's weight to: bf16 for FP8 experts whatever
    `dtype` asks (transformers `DecompressExperts`, llmcompressor.md §5f), else the module's own."""
    import torch

    weights = module.quantization_scheme.weights
    return torch.bfloat16 if _text(weights.type) == "float" and weights.num_bits == 8 else module.weight.dtype


@contextlib.contextmanager
def plain_reload_view(model: PreTrainedModel) -> Iterator[None]:
    """Within the block the model computes what plain transformers computes after reloading it: expert
    weights fake-quantized and rounded to their decompressed dtype, quantization (hence activation
    quantization) off. Restored on exit, so what is saved is untouched."""
    from compressed_tensors.utils import patch_attr

    with contextlib.ExitStack() as stack:
        for module in quantized_modules(model).values():
            weight = fake_quantized_weight(module)
            weight = weight.to(decompressed_dtype(module)).to(module.weight.dtype)
            stack.enter_context(patch_attr(module.weight, "data", weight))
            stack.enter_context(patch_attr(module, "quantization_enabled", False))
        yield


def strip_qparams_after_repack(model: PreTrainedModel) -> list[str]:
    """Remove the `*_scale`/`*_zero_point` leftovers `repack_moe` puts on fused experts: the fused weights
    already hold the dequantized values, and the leftovers would be UNEXPECTED keys on reload (§5f)."""
    removed = []
    for module_name, module in model.named_modules():
        own = [*dict(module.named_parameters(recurse=False)), *dict(module.named_buffers(recurse=False))]
        if "gate_up_proj" not in own and "down_proj" not in own:
            continue  # not a fused experts module
        for name in own:
            if name.endswith(_QPARAM_SUFFIXES):
                delattr(module, name)
                removed.append(f"{module_name}.{name}")
    return removed


class WeightQuantizer(ExpertWeightCompressor):
    """Shared recipe/saving of the expert-only weight quantizers; subclasses give presets and modifiers."""

    family: ClassVar[str] = "quantization"
    save_compressed: ClassVar[bool] = True
    presets: ClassVar[dict[str, QuantPreset]]  # scheme -> preset

    @abstractmethod
    def modifiers(self, scheme: Any, device_type: str = "cpu") -> list[Any]:
        """The llm-compressor modifiers applying the compressed-tensors `scheme` to the experts, for experts
        held on a `device_type` device."""
        ...

    def validate(self, spec: MethodSpec, model_info: MoEInfo) -> None:
        super().validate(spec, model_info)
        widths = {w for w in (model_info.hidden_size, model_info.expert_intermediate_size) if w}
        if widths and spec.scheme is not None and self.presets[spec.scheme.lower()].grouped:
            choose_group_size(widths)  # fail before loading when no group size fits (else chosen at load)

    def recipe(self, spec: MethodSpec, linears: dict[str, Any], seed: int) -> tuple[list[Any], dict[str, Any]]:
        assert spec.scheme is not None
        preset = self.presets[spec.scheme.lower()]
        group = choose_group_size({int(m.in_features) for m in linears.values()}) if preset.grouped else None
        settings = {"preset": preset.preset, "format": preset.format, "group_size": group}
        device_type = next(iter(linears.values())).weight.device.type if linears else "cpu"
        return self.modifiers(expert_scheme(preset, group), device_type), settings

    def finish(self, model: PreTrainedModel, info: MoEInfo,
               settings: dict[str, Any]) -> tuple[str, dict[str, dict[str, Any]]]:
        schemes = in_memory_schemes(model)
        family = family_named(info.architecture)
        if family is None or not family.repack_quantized:
            return settings["format"], schemes
        for module in quantized_modules(model).values():  # bake the grid in: the repack drops the qparams
            module.weight.data = fake_quantized_weight(module)
        repack_experts(model)
        strip_qparams_after_repack(model)
        return "dense-fake-quant", schemes

    @contextlib.contextmanager
    def reference_view(self, model: PreTrainedModel) -> Iterator[None]:
        with plain_reload_view(model):
            yield


@register
class GPTQCompressor(WeightQuantizer):
    """GPTQ (Frantar et al. 2022) on the routed experts, via `GPTQModifier` in the sequential pipeline."""

    name: ClassVar[str] = "gptq"
    schemes: ClassVar[tuple[str, ...]] = ("w4a16", "w8a16", "w4a8", "w3a16")
    default_schemes: ClassVar[tuple[str, ...]] = ("w4a16",)
    presets: ClassVar[dict[str, QuantPreset]] = INT_PRESETS

    def modifiers(self, scheme: Any, device_type: str = "cpu") -> list[Any]:
        from llmcompressor.modifiers.quantization import GPTQModifier

        return [GPTQModifier(config_groups={"group_0": scheme}, ignore=IGNORE)]


@register
class AWQCompressor(WeightQuantizer):
    """AWQ (Lin et al. 2024): activation-aware smoothing inside each expert (up_proj -> down_proj), then
    round-to-nearest quantization with the smoothed weights; CPU needs the pin_memory patch (§5b)."""

    name: ClassVar[str] = "awq"
    schemes: ClassVar[tuple[str, ...]] = ("w4a16", "w8a16", "w3a16")
    default_schemes: ClassVar[tuple[str, ...]] = ("w4a16",)
    presets: ClassVar[dict[str, QuantPreset]] = {k: INT_PRESETS[k] for k in schemes}

    def modifiers(self, scheme: Any, device_type: str = "cpu") -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQMapping, AWQModifier

        # On an accelerator the per-expert input cache stays there: AWQ's grid search replays it for each of
        # its 20 grid points, and from host memory (llmcompressor's MoE default) that is ~20 copies of every
        # layer's activations per expert over PCIe (the 2.8B model's AWQ took > 500 s that way). On the CPU
        # llmcompressor's default (host) is the only choice anyway.
        placement: dict[str, Any] = {} if device_type == "cpu" else {"offload_device": None}
        return [AWQModifier(mappings=[AWQMapping(*AWQ_EXPERT_MAPPING)], **placement),
                QuantizationModifier(config_groups={"group_0": scheme}, ignore=IGNORE)]


@register
class FP8Compressor(WeightQuantizer):
    """Dynamic FP8 (W8A8): e4m3 weights with per-channel scales, per-token activation scales computed at run
    time. Data-free, so one checkpoint whatever the calibration mix (id `fp8-w8a8-seed0`)."""

    name: ClassVar[str] = "fp8"
    schemes: ClassVar[tuple[str, ...]] = ("w8a8",)
    default_schemes: ClassVar[tuple[str, ...]] = ("w8a8",)
    presets: ClassVar[dict[str, QuantPreset]] = {"w8a8": QuantPreset("FP8_DYNAMIC", "float-quantized", False)}
    needs_calibration: ClassVar[bool] = False

    def modifiers(self, scheme: Any, device_type: str = "cpu") -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [QuantizationModifier(config_groups={"group_0": scheme}, ignore=IGNORE)]
