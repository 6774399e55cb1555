"""One view of a sparse MoE block, whatever its family's layout: what compressors and the observer use.

Why: transformers 5 fuses every family's routed experts into 3-D parameters, but not in one layout. Most
store `gate_up_proj [E, 2I, H]` (gate rows first) and `down_proj [E, H, I]`; GPT-OSS stores them transposed
(`[E, H, 2I]`, `[E, I, H]`), gate and up interleaved (even/odd columns), with per-expert biases and a clamped
SwiGLU; routers return (logits, weights, indices) except Granite's (indices, weights, logits); routers and
blocks keep selection biases under three different names. `MoEBlock` reads the layout from the experts module's
own `use_experts_implementation` flags (`is_transposed`, `is_concatenated`, `has_bias`) and the router's output
order from the family table, and offers: every tensor indexed by routed expert (to prune or merge a block as a
whole), each expert's output on given tokens (computed with the module's own gate function, so GPT-OSS's clamp
and interleaving are the model's), the router logits, and the experts' call arguments.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from architectures.families import FAMILIES, Family
from fixtures.errors import CompressionError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

ROUTER_ATTRS = ("gate", "router")
FUSED_EXPERT_TENSORS = ("gate_up_proj", "down_proj")
EXPERT_BIASES = ("gate_up_proj_bias", "down_proj_bias")
GENERIC = Family("generic", "generic", "read from the module")  # a model outside the table (tests, new families)


@dataclass(frozen=True)
class MoEBlock:
    """One sparse MoE block: its module name (`model.layers.3.mlp`), the block, fused experts and router."""

    name: str
    module: Any
    experts: Any
    router: Any
    family: Family = GENERIC

    @property
    def num_experts(self) -> int:
        return int(self.experts.gate_up_proj.shape[0])

    @property
    def transposed(self) -> bool:
        return bool(getattr(self.experts, "is_transposed", False))

    @property
    def has_bias(self) -> bool:
        return bool(getattr(self.experts, "has_bias", False))

    @property
    def hidden_size(self) -> int:
        return int(self.experts.down_proj.shape[2 if self.transposed else 1])

    @property
    def intermediate_size(self) -> int:
        return int(self.experts.down_proj.shape[1 if self.transposed else 2])

    def per_expert_tensors(self) -> list[tuple[Any, str, int]]:
        """(owner, attribute, expert axis) of every tensor indexed by routed expert: the fused experts (and
        their biases), the router rows and bias, and the selection-correction biases wherever a family keeps
        them (DeepSeek/GLM router, block level, ERNIE `gate.moe_statics` [1, E])."""
        import torch

        names = FUSED_EXPERT_TENSORS + (EXPERT_BIASES if self.has_bias else ())
        found: list[tuple[Any, str, int]] = [(self.experts, name, 0) for name in names]
        candidates = [(self.router, "weight", 0), (self.router, "bias", 0),
                      (self.router, "e_score_correction_bias", 0), (self.module, "e_score_correction_bias", 0),
                      (getattr(self.router, "moe_statics", None), "e_score_correction_bias", -1)]
        found += [(owner, attr, dim) for owner, attr, dim in candidates
                  if owner is not None and isinstance(getattr(owner, attr, None), torch.Tensor)]
        return found

    def router_logits(self, output: Any) -> torch.Tensor:
        """The raw logits [tokens, E] in the router's output (its position is the family's)."""
        if not isinstance(output, tuple) or len(output) != 3:
            raise CompressionError(f"{self.name}: router must return a (logits, weights, indices) triple in "
                                   f"some order, got {type(output).__name__}")
        logits = output[self.family.router_logits]
        if logits.shape[-1] != self.num_experts or not logits.is_floating_point():
            raise CompressionError(f"{self.name}: router output {self.family.router_logits} has shape "
                                   f"{tuple(logits.shape)}, not the logits over {self.num_experts} experts")
        return logits.detach().reshape(-1, self.num_experts)

    @cached_property
    def _experts_signature(self) -> inspect.Signature:
        return inspect.signature(self.experts.forward)  # read once: the observer asks on every forward

    def call_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
        """(hidden_states [T, H], selected indices [T, k], combine weights [T, k]) of an experts call, whatever
        the family names them (`top_k_index`/`top_k_weights`, GPT-OSS `router_indices`/`routing_weights`)."""
        bound = self._experts_signature.bind(*args, **kwargs)
        values = list(bound.arguments.values())
        if len(values) < 3:
            raise CompressionError(f"{self.name}: experts called with {len(values)} arguments, expected "
                                   "hidden states, expert indices and combine weights")
        return values[0], values[1], values[2]

    def expert_outputs(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """E_i(x) for experts start..stop-1 on every token of `x` [T, H]: [stop-start, T, H], in the layout's
        own arithmetic (the module's gate function; biases where it has them)."""
        import torch

        experts, weights = self.experts, self.experts.gate_up_proj[start:stop]
        projected = torch.matmul(x, weights if self.transposed else weights.transpose(1, 2))
        if self.has_bias:
            projected = projected + experts.gate_up_proj_bias[start:stop, None, :]
        hidden = experts._apply_gate(projected)
        down = experts.down_proj[start:stop]
        out = torch.matmul(hidden, down if self.transposed else down.transpose(1, 2))
        if self.has_bias:
            out = out + experts.down_proj_bias[start:stop, None, :]
        return out


def _check_shapes(block: MoEBlock) -> None:
    gate_up, down = (getattr(block.experts, t) for t in FUSED_EXPERT_TENSORS)
    count, hidden, inner = block.num_experts, block.hidden_size, block.intermediate_size
    want_gate_up = (count, hidden, 2 * inner) if block.transposed else (count, 2 * inner, hidden)
    router = getattr(block.router, "weight", None)
    if tuple(gate_up.shape) != want_gate_up or router is None or tuple(router.shape) != (count, hidden):
        raise CompressionError(f"{block.name}: inconsistent expert shapes gate_up {tuple(gate_up.shape)}, down "
                               f"{tuple(down.shape)}, router {None if router is None else tuple(router.shape)}")
    for name, want in zip(EXPERT_BIASES, ((count, 2 * inner), (count, hidden)), strict=True):
        bias = getattr(block.experts, name, None)
        if block.has_bias and (bias is None or tuple(bias.shape) != want):
            raise CompressionError(f"{block.name}: {name} should be {want}, got {getattr(bias, 'shape', None)}")


def moe_blocks(model: PreTrainedModel) -> list[MoEBlock]:
    """Every routed MoE block of `model`, in module order; CompressionError for an unsupported layout.

    A block is a module with an `experts` child holding fused `gate_up_proj`/`down_proj` 3-D parameters (any
    of transformers' layouts) and a `gate`/`router` child with `weight [E, H]`."""
    family = FAMILIES.get(str(getattr(getattr(model, "config", None), "model_type", "")), GENERIC)
    blocks = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        router = next((getattr(module, a) for a in ROUTER_ATTRS if hasattr(module, a)), None)
        if experts is None or router is None:
            continue
        tensors = [getattr(experts, t, None) for t in FUSED_EXPERT_TENSORS]
        if any(t is None or t.dim() != 3 for t in tensors) or not hasattr(experts, "_apply_gate"):
            raise CompressionError(
                f"{name}: unsupported expert layout {type(experts).__name__} (need transformers' fused experts: "
                "3-D gate_up_proj and down_proj with a gate function)"
            )
        if not getattr(experts, "has_gate", True):
            raise CompressionError(f"{name}: {type(experts).__name__} has no gate projection (up_proj only)")
        block = MoEBlock(name, module, experts, router, family)
        _check_shapes(block)
        blocks.append(block)
    if not blocks:
        raise CompressionError(f"{type(model).__name__}: no MoE block (a module with `experts` and a router)")
    return blocks
