"""The MoE families the suite supports, as data: how each one routes, and what each method may do with it.

Why a table: the differences between families are few and factual (where the router puts its logits, whether
selection is group-limited, whether plain transformers reloads per-expert compressed keys, which methods are
mathematically invalid on a layout); stating them once per family keeps every method free of special cases,
lets the plugin refuse an unsupported family × method at start-up, and generates the README's support table.
The tensor layout itself (fused/transposed/interleaved, biases) is read from the experts module
(`architectures.blocks`), not listed here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fixtures.errors import ConfigError

# Why a method is refused on a family: the reason is printed at start-up and in the README table.
AWQ_CLAMPED_SWIGLU = ("AWQ smooths up_proj rows into down_proj columns, which preserves the function only when "
                      "the expert is linear in up; GPT-OSS computes (clamp(up) + 1)·glu(gate), so the smoothed "
                      "model would compute something else")
SHRINK_GROUPED = ("hcsmoe-shrink merges router rows across clusters, but group-limited routing needs every "
                  "kept expert to stay in its group; use hcsmoe (all router rows kept)")


@dataclass(frozen=True)
class Family:
    """One MoE family (config `model_type`) and its facts."""

    model_type: str
    name: str
    routing: str  # how the router selects and weights experts (for the README and manifests)
    router_logits: int = 0  # position of the raw router logits [T, E] in the router's output tuple
    repack_quantized: bool = False  # per-expert compressed keys do not reload: fake-quantize, repack, save dense
    refused: Mapping[str, str] = field(default_factory=dict)  # method -> why it cannot be applied

    def refusal(self, method: str) -> str | None:
        return self.refused.get(method)


SOFTMAX_RENORM = "softmax over all experts, top-k, renormalised"
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("qwen3_moe", "Qwen3-MoE", f"{SOFTMAX_RENORM} (iff norm_topk_prob)"),
    Family("qwen2_moe", "Qwen2-MoE", f"{SOFTMAX_RENORM} (iff norm_topk_prob); shared expert with sigmoid gate"),
    Family("qwen3_next", "Qwen3-Next", f"{SOFTMAX_RENORM}; shared expert with gate; hybrid linear attention"),
    Family("olmoe", "OLMoE", "softmax over all experts, top-k, raw (norm_topk_prob false)"),
    Family("mixtral", "Mixtral", "top-k of the logits, softmax over the k", repack_quantized=True),
    Family("ernie4_5_moe", "ERNIE-4.5-MoE", "softmax; top-k on softmax + correction bias, unbiased weights "
           "renormalised; shared experts"),
    Family("deepseek_v3", "DeepSeek-V3", "sigmoid; group-limited top-k on sigmoid + correction bias, weights "
           "renormalised × routed_scaling_factor; shared experts", refused={"hcsmoe-shrink": SHRINK_GROUPED}),
    Family("glm4_moe", "GLM-4.5", "sigmoid; group-limited top-k on sigmoid + correction bias, weights "
           "renormalised × routed_scaling_factor; shared experts", refused={"hcsmoe-shrink": SHRINK_GROUPED}),
    Family("phimoe", "PhiMoE", "sparsemixer top-2 (masked softmax per slot)", repack_quantized=True),
    Family("gpt_oss", "GPT-OSS", "top-k of the biased logits, softmax over the k; experts with biases, "
           "clamped SwiGLU, interleaved gate/up", repack_quantized=True, refused={"awq": AWQ_CLAMPED_SWIGLU}),
    Family("granitemoe", "Granite-MoE", "top-k of the logits, softmax over the k", router_logits=2,
           repack_quantized=True),
)}


def family_named(model_type: str) -> Family | None:
    """The family of a `model_type` (None: not in the table)."""
    return FAMILIES.get(model_type)


def family_of(config: Mapping[str, Any]) -> Family:
    """The family of a model's config.json, or ConfigError saying why the suite cannot audit it: a multimodal
    wrapper (its text model is audited on its own), or a family outside the table."""
    model_type = str(config.get("model_type") or "")
    text = config.get("text_config")
    if isinstance(text, Mapping):
        raise ConfigError(
            f"{model_type} is a multimodal wrapper (text model {text.get('model_type')!r}); the suite audits "
            "text-only causal LMs: save the language model with its text config and audit that directory")
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(f"model_type {model_type!r} is not a supported MoE family; supported: "
                          f"{', '.join(sorted(FAMILIES))} (a family is one entry in architectures/families.py)")
    return family
