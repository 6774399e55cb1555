"""Each family's routing and expert arithmetic written out by hand from its published definition, for
tests/test_families.py: independent of transformers' modules and of `architectures.blocks` (only the raw
parameters and config are read), so the observer's statistics can be checked against them."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _softmax_topk(logits: torch.Tensor, k: int, renormalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    probs = logits.float().softmax(-1)
    weights, index = probs.topk(k, dim=-1)
    return index, weights / weights.sum(-1, keepdim=True) if renormalise else weights


def _topk_then_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, index = logits.float().topk(k, dim=-1)
    return index, values.softmax(-1)


def _grouped_sigmoid(logits: torch.Tensor, bias: torch.Tensor, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 / GLM-4.5: groups scored by the sum of their two best biased sigmoid scores; top-k inside
    the `topk_group` best groups; weights = unbiased sigmoid scores, renormalised, × routed_scaling_factor."""
    scores = logits.float().sigmoid()
    choice = scores + bias
    tokens, experts = choice.shape
    groups = config.n_group
    group_scores = choice.view(tokens, groups, experts // groups).topk(2, dim=-1).values.sum(-1)
    picked = group_scores.topk(config.topk_group, dim=-1).indices
    allowed = torch.zeros(tokens, groups, dtype=torch.bool).scatter_(1, picked, True)
    allowed = allowed.repeat_interleave(experts // groups, dim=1)
    index = choice.masked_fill(~allowed, float("-inf")).topk(config.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, index)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return index, weights * config.routed_scaling_factor


def _sparsemixer_eval(logits: torch.Tensor, jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparsemixer at inference: per slot, the best remaining expert, weighted by the softmax over the
    experts within a relative distance 2·jitter of it."""
    scores = logits.float()
    index, weights, masked = [], [], scores.clone()
    for _ in range(2):
        best, arg = masked.max(-1, keepdim=True)
        near = ((best - scores) / scores.abs().clamp(min=best)) <= 2 * jitter
        gates = masked.masked_fill(~near, float("-inf")).softmax(-1)
        index.append(arg)
        weights.append(gates.gather(-1, arg))
        masked = masked.scatter(-1, arg, float("-inf"))
    return torch.cat(index, -1), torch.cat(weights, -1)


def routing(model_type: str, block: Any, config: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(selected experts [T, k], combine weights [T, k]) of `block` on tokens `x` [T, H]."""
    router = block.router if hasattr(block, "router") else block.gate
    k = config.num_experts_per_tok
    if model_type == "gpt_oss":
        return _topk_then_softmax(F.linear(x, router.weight, router.bias), k)
    logits = F.linear(x.float(), router.weight.float())
    if model_type in ("mixtral", "granitemoe"):
        return _topk_then_softmax(logits, k)
    if model_type in ("qwen3_moe", "qwen2_moe", "qwen3_next", "olmoe"):
        return _softmax_topk(logits, k, bool(config.norm_topk_prob))
    if model_type in ("deepseek_v3", "glm4_moe"):
        return _grouped_sigmoid(logits, router.e_score_correction_bias.float(), config)
    if model_type == "phimoe":
        return _sparsemixer_eval(logits, config.router_jitter_noise)
    if model_type == "ernie4_5_moe":
        probs = logits.softmax(-1)
        index = (probs + router.moe_statics.e_score_correction_bias.float()[0]).topk(k, dim=-1).indices
        weights = probs.gather(1, index)
        return index, weights / weights.sum(-1, keepdim=True).clamp(min=config.moe_norm_min)
    raise KeyError(model_type)


def expert_output(model_type: str, experts: Any, e: int, x: torch.Tensor) -> torch.Tensor:
    """E_e(x) [T, H] from the raw fused parameters."""
    if model_type == "gpt_oss":  # [H, 2I] with gate/up interleaved, biases, clamped SwiGLU with a +1 on up
        gate_up = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
        gate, up = gate_up[:, 0::2].clamp(max=experts.limit), gate_up[:, 1::2].clamp(-experts.limit, experts.limit)
        hidden = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
        return hidden @ experts.down_proj[e] + experts.down_proj_bias[e]
    inner = experts.gate_up_proj.shape[1] // 2
    gate, up = x @ experts.gate_up_proj[e, :inner].T, x @ experts.gate_up_proj[e, inner:].T
    return (F.silu(gate) * up) @ experts.down_proj[e].T


# One tiny zoo member per supported family (tests parametrize over these).
FAMILY_ZOO = {
    "qwen3_moe": "qwen3-moe-tiny", "qwen2_moe": "qwen2-moe-tiny", "qwen3_next": "qwen3-next-tiny",
    "olmoe": "olmoe-tiny", "mixtral": "mixtral-tiny", "ernie4_5_moe": "ernie45-moe-tiny",
    "deepseek_v3": "deepseek-v3-tiny", "glm4_moe": "glm4-moe-tiny", "phimoe": "phimoe-tiny",
    "gpt_oss": "gpt-oss-tiny", "granitemoe": "granitemoe-tiny",
}
# Families whose token mixers are all softmax attention: the shared scorer and the fast engines apply.
SOFTMAX_ZOO = tuple(name for family, name in FAMILY_ZOO.items() if family != "qwen3_next")
