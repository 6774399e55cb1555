"""A Mixture-of-Experts of a real model's shape (Qwen3-MoE, GPT-OSS, Granite) with random weights, built on the
target device.

Why random weights: the throughput of a 30B MoE depends on its shape (layers, experts, top-k, widths,
vocabulary), not on trained values, and no pretrained checkpoint is reachable from the GPU machine. The model
is the real transformers class built from a config (`from_config` under a device context: weights are
allocated and initialised on the GPU, no CPU pass over 57 GiB). Token ids come from the zoo tokenizer
(4,096 ids) while the vocabulary keeps the real size: LM-head rows of ids the tokenizer cannot decode are
zeroed, so their logits are exactly 0 and the argmax of a step stays on decodable ids (the maximum of 4,096
random logits is positive) while the LM head still costs the full 151,936-row matmul.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

# The zoo tokenizer's ids (fixtures/tokenizer.py): EOS = pad = 0, no BOS.
ZOO_TOKEN_IDS: dict[str, Any] = {"eos_token_id": 0, "pad_token_id": 0, "bos_token_id": None}
SHAPES: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-30B-A3B config.json (the fields that set compute and memory).
    "qwen3-30b-a3b": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                      "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
                      "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
                      "norm_topk_prob": True, "max_position_embeddings": 40960, "rope_theta": 1e6,
                      "tie_word_embeddings": False, "decoder_sparse_step": 1, "mlp_only_layers": []},
    # A mid-size MoE (2.8B parameters, 2.4B of them in 16 x 64 experts): the multi-GPU audit run (issue 11),
    # small enough that one H200 builds and evaluates a checkpoint in about a minute.
    "qwen3-moe-3b": {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
                     "moe_intermediate_size": 768, "num_hidden_layers": 16, "num_attention_heads": 16,
                     "num_key_value_heads": 4, "head_dim": 128, "num_experts": 64, "num_experts_per_tok": 8,
                     "norm_topk_prob": True, "max_position_embeddings": 40960, "rope_theta": 1e6,
                     "tie_word_embeddings": False, "decoder_sparse_step": 1, "mlp_only_layers": []},
    # openai/gpt-oss-20b config.json (transposed interleaved experts with biases, sliding/full attention, sinks);
    # hidden 2880 is no multiple of 128 (group size 64 is chosen). Run with --layers: 4 layers are 4.3B.
    "gpt-oss-20b": {"config_class": "GptOssConfig", "vocab_size": 201088, "hidden_size": 2880,
                    "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4,
                    "sliding_window": 128, "max_position_embeddings": 131072, "tie_word_embeddings": False},
    # ibm-granite/granite-3.0-3b-a800m config.json (`block_sparse_moe`, router returning indices first): 3.3B.
    "granite-3b-a800m": {"config_class": "GraniteMoeConfig", "vocab_size": 49155, "hidden_size": 1536,
                         "intermediate_size": 512, "num_hidden_layers": 32, "num_attention_heads": 24,
                         "num_key_value_heads": 8, "num_local_experts": 40, "num_experts_per_tok": 8,
                         "max_position_embeddings": 4096, "tie_word_embeddings": True, "embedding_multiplier": 12.0,
                         "logits_scaling": 6.0, "residual_multiplier": 0.22, "attention_multiplier": 0.015625},
    # deepseek-ai/DeepSeek-V3 config.json with every layer an MoE layer (first_k_dense_replace 0): MLA attention,
    # 256 experts top-8 in 8 groups (4 picked), sigmoid routing with a correction bias. One layer is 13.4B.
    "deepseek-v3": {"config_class": "DeepseekV3Config", "vocab_size": 129280, "hidden_size": 7168,
                    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
                    "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
                    "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
                    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8,
                    "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                    "first_k_dense_replace": 0, "max_position_embeddings": 163840, "tie_word_embeddings": False},
    # Same code path at CPU size, for developing and testing the script.
    "tiny": {"vocab_size": 8192, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
             "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True, "max_position_embeddings": 4096,
             "tie_word_embeddings": False, "decoder_sparse_step": 1, "mlp_only_layers": []},
}


def build_random_model(shape: str, device: str, dtype: str, decodable_ids: int, seed: int = 0,
                       layers: int | None = None) -> Any:
    """The MoE of `shape` (Qwen3-MoE unless the shape names its config class) on `device` in `dtype`, eval
    mode, grouped_mm experts on CUDA. `layers` keeps the shape's layer geometry with fewer decoder layers
    (per-layer costs are the full model's)."""
    import torch
    import transformers

    fields = {**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}
    config_class = getattr(transformers, fields.pop("config_class", "Qwen3MoeConfig"))
    config = config_class(**fields, **ZOO_TOKEN_IDS)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    if device.startswith("cuda"):
        model.set_experts_implementation("grouped_mm")
    with torch.no_grad():
        model.lm_head.weight[decodable_ids:].zero_()
    return model.eval()


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def save_random_model(shape: str, out_dir: Path, device: str, dtype: str, seed: int = 0,
                      layers: int | None = None) -> int:
    """Write the model of `shape` with the zoo tokenizer as a local HF directory (`--model DIR` of the audit).

    Built on `device` (a GPU initialises 3B parameters in seconds), saved as safetensors; returns the parameter
    count. The directory is written under a temporary name and renamed, so a cut-short run leaves no model."""
    import shutil

    from fixtures.tokenizer import VOCAB_SIZE, load_zoo_tokenizer

    model = build_random_model(shape, device, dtype, VOCAB_SIZE, seed=seed, layers=layers)
    if device.startswith("cuda"):
        model.set_experts_implementation("eager")  # the saved config keeps transformers' default
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    load_zoo_tokenizer().save_pretrained(partial)
    partial.rename(out_dir)
    return parameter_count(model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="save a random-weight MoE of a real shape for --model")
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's own)")
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"random model: {args.out} exists, kept")
        return 0
    started = time.perf_counter()
    count = save_random_model(args.shape, args.out, args.device, args.dtype, layers=args.layers)
    print(f"random model {args.shape}: {count / 1e9:.2f}B parameters saved to {args.out} "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
