"""The experts and attention functions the audit runs on CUDA, registered through transformers' own interfaces.

Why not transformers' `grouped_mm` experts as they are: on a 30B MoE (H200, 32k tokens per forward) its
two grouped GEMMs took 3.9 ms of the experts' 12.8 ms; three `masked_fill` passes over the [tokens x top-k,
width] buffers (for expert-parallel sentinel ids, which a single-process audit never has: the router's top-k
ids are always below `num_experts`) and an fp32 gather of the weighted outputs took most of the rest
(docs/performance.md). `moe_fbs_grouped` does the same arithmetic in the same order without them:

    sort by expert -> gather rows -> grouped GEMM up (+ bias) -> gate -> grouped GEMM down (+ bias)
    -> rows back to (token, k) order (bf16 gather) -> x routing weight (promoted like transformers) -> sum over k

so its outputs are bitwise transformers' `grouped_mm` outputs (the masked rows are never sentinels, and a
gather commutes with the elementwise weighting); tested against it and against the eager loop.

Why an own attention entry: with a mask, transformers' `sdpa` repeats each key/value head for its query heads
(`repeat_kv`, GQA is only passed to SDPA without a mask), a copy of the whole KV cache per layer and step while
decoding. At one query position the query heads that share a key/value head are just that head's queries, so
`moe_fbs_sdpa` runs decode steps as SDPA over [batch, kv heads, queries per kv head, dim] against the cache as
it is, mask broadcast over the group; every other call is transformers' `sdpa` unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

EXPERTS = "moe_fbs_grouped"
ATTENTION = "moe_fbs_sdpa"
# What changes GPU bits besides the libraries: these kernels and `benchmarks.decode_steps`' graph decoding.
# Part of the cache keys of GPU evaluations, so results of an older engine are never paired with newer ones.
ENGINE = "moe-fbs-gpu/2"


def engine_key(device: str) -> dict[str, str]:
    """The cache-key entry of the GPU engine; empty on the CPU, whose results and keys it does not change."""
    return {"engine": ENGINE} if str(device).startswith("cuda") else {}


def grouped_experts_forward(self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' `grouped_mm_experts_forward` without sentinel masking and with a bf16 combine gather."""
    import torch
    from transformers.integrations.moe import _grouped_linear

    num_tokens, width = hidden_states.shape
    top_k = top_k_index.size(-1)
    expert_ids, order = torch.sort(top_k_index.reshape(-1))
    rows = hidden_states[order // top_k]
    histc_input = expert_ids.float() if hidden_states.device.type in ("cpu", "mps") else expert_ids.int()
    per_expert = torch.histc(histc_input, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(per_expert, dim=0, dtype=torch.int32)
    up_weight, up_bias = (self.gate_up_proj, "gate_up_proj_bias") if self.has_gate else (self.up_proj, "up_proj_bias")
    projected = _grouped_linear(rows, up_weight, offsets, bias=getattr(self, up_bias)[expert_ids]
                                if self.has_bias else None, is_transposed=self.is_transposed)
    projected = self._apply_gate(projected) if self.has_gate else self.act_fn(projected)
    projected = _grouped_linear(projected, self.down_proj, offsets, bias=self.down_proj_bias[expert_ids]
                                if self.has_bias else None, is_transposed=self.is_transposed)
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device=order.device)
    weighted = projected[back] * top_k_weights.reshape(-1).unsqueeze(-1)
    return weighted.view(num_tokens, top_k, width).sum(dim=1).to(hidden_states.dtype)


def gqa_decode_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """One query position with grouped key/value heads: SDPA per key/value head; anything else: `sdpa`."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, positions, dim = query.shape
    kv_heads = key.shape[1]
    if positions != 1 or kv_heads == heads or dropout or kwargs.get("position_bias") is not None \
            or key.shape[-1] != value.shape[-1] or heads % kv_heads:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # head h uses kv head h // group (repeat_kv)
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make both names known to transformers (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS, grouped_experts_forward)
    ALL_ATTENTION_FUNCTIONS.register(ATTENTION, gqa_decode_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def install(model: Any) -> dict[str, str]:
    """Switch a loaded model to these functions where it uses transformers' fused experts and `sdpa`; returns
    what it uses afterwards (recorded with results). Models with other kernels are left as they are."""
    register()
    config = model.config
    if getattr(config, "_experts_implementation", None) in ("grouped_mm", "eager") and _has_fused_experts(model):
        model.set_experts_implementation(EXPERTS)
    if getattr(config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(ATTENTION)
    return {"experts": str(getattr(config, "_experts_implementation", None)),
            "attention": str(getattr(config, "_attn_implementation", None))}


def uninstall(model: Any) -> None:
    """Back to transformers' defaults for a fused-experts model (grouped_mm experts, sdpa attention): what
    lm-eval's HF backend runs; the perf scripts time both paths on one in-memory model."""
    model.set_experts_implementation("grouped_mm")
    model.set_attn_implementation("sdpa")


def _has_fused_experts(model: Any) -> bool:
    return any(hasattr(module, "has_gate") and hasattr(module, "num_experts") for module in model.modules())
