"""Which of the suite's fast paths are exact for a model's architecture, read from its config.json.

Why: the shared-context scorer packs several continuations of one context into one row, isolated by a 4-D
attention mask, and the fast generation and drift engines batch prompts with padding. Both are exact only
where every token mixing layer is softmax attention (full or sliding window): a recurrent layer (linear
attention, state-space, short convolution) carries one continuation's tokens, or a pad, into the state the
next one reads. Measured on a tiny Qwen3-Next (issue 19): CrowS `pct_stereotype` 0.357 against lm-eval's
0.393 on the same items, with no error. So a hybrid or recurrent model is scored by lm-eval's own HF backend
(the reference, one request per row) and is refused for drift at start-up, never scored wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fixtures.errors import ConfigError

SOFTMAX_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "attention", "chunked_attention"})
# Families whose token mixers are (partly) recurrent even where the config lists no layer_types.
RECURRENT_MODEL_TYPES = frozenset({
    "qwen3_next", "jamba", "granitemoehybrid", "bamba", "falcon_h1", "mamba", "mamba2", "nemotron_h", "zamba",
    "zamba2", "lfm2", "lfm2_moe", "minimax", "rwkv", "recurrent_gemma", "xlstm",
})


def recurrent_layers(config: Mapping[str, Any]) -> str | None:
    """Why the model is not softmax attention throughout (None when it is): its family, or the layer types
    outside softmax attention. A multimodal wrapper is judged by its `text_config`."""
    nested = config.get("text_config")
    text: Mapping[str, Any] = nested if isinstance(nested, Mapping) else config
    model_type = str(text.get("model_type") or config.get("model_type") or "")
    layer_types = [str(t) for t in text.get("layer_types") or ()]
    other = sorted(set(layer_types) - SOFTMAX_LAYER_TYPES)
    if other:
        return f"{model_type or 'this model'} has {', '.join(other)} layers"
    if model_type in RECURRENT_MODEL_TYPES:
        return f"{model_type} has recurrent (non-softmax-attention) layers"
    return None


def scorer_for(config: Mapping[str, Any], requested: str) -> tuple[str, str | None]:
    """(scorer to use, why it differs from `requested`): "shared" falls back to "hf" on recurrent layers."""
    reason = recurrent_layers(config)
    if requested == "shared" and reason is not None:
        return "hf", f"{reason}: shared-context packing and padded batches are exact only for softmax attention"
    return requested, None


def check_drift_supported(config: Mapping[str, Any], benchmarks: tuple[str, ...]) -> None:
    """Drift's batched generation is not proven exact on recurrent layers: refuse it before any work."""
    reason = recurrent_layers(config)
    if "drift" in benchmarks and reason is not None:
        raise ConfigError(f"--benchmarks drift: {reason}; drift's batched generation is exact only for softmax "
                          "attention, so it is not run on this model (drop drift; the other benchmarks fall "
                          "back to lm-eval's one-request-per-row HF scorer)")


def sliding_window(config: Any) -> int | None:
    """The attention window some layer of the model applies (None: every layer sees the whole context).

    A config may carry `sliding_window` without using it: Qwen2-MoE keeps `sliding_window=0` with
    `use_sliding_window=False` and only full-attention layers. The window applies where `layer_types` lists a
    sliding layer, or, without layer types, where `use_sliding_window` is not false."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return int(window) if "sliding_attention" in layer_types else None
    return int(window) if getattr(config, "use_sliding_window", True) else None

