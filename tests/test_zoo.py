"""Embedded zoo: real transformers MoE classes, deterministic weights, committed tokenizer, model resolution."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fixtures.errors import ModelError
from fixtures.hashing import sha256_file
from fixtures.tokenizer import ASSET, load_zoo_tokenizer, train_tokenizer_json
from fixtures.zoo import ZOO, build_zoo_model, materialize_zoo_model

EXPECTED_CLASSES = {
    "qwen3-moe-tiny": "Qwen3MoeForCausalLM",
    "qwen3-moe-tiny-hd64": "Qwen3MoeForCausalLM",
    "ernie45-moe-tiny": "Ernie4_5_MoeForCausalLM",
    "olmoe-tiny": "OlmoeForCausalLM",
    "mixtral-tiny": "MixtralForCausalLM",
    "qwen3-moe-small": "Qwen3MoeForCausalLM",
    "qwen2-moe-tiny": "Qwen2MoeForCausalLM",
    "glm4-moe-tiny": "Glm4MoeForCausalLM",
    "deepseek-v3-tiny": "DeepseekV3ForCausalLM",
    "phimoe-tiny": "PhimoeForCausalLM",
    "gpt-oss-tiny": "GptOssForCausalLM",
    "granitemoe-tiny": "GraniteMoeForCausalLM",
    "qwen3-next-tiny": "Qwen3NextForCausalLM",
}


def test_zoo_lists_the_real_architectures() -> None:
    assert set(ZOO) == set(EXPECTED_CLASSES)


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_zoo_model_builds_reloads_and_runs(name: str, session_cache_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = materialize_zoo_model(name, session_cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert type(model).__name__ == EXPECTED_CLASSES[name]
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Is the sky blue?"}], tokenize=False,
                                           add_generation_prompt=True)
    batch = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        reloaded = model(**batch).logits
        fresh = build_zoo_model(ZOO[name])(**batch).logits
    # The same weights in two model instances: equal up to float rounding (a linear-attention layer's kernels
    # can take another path on another memory layout: 1.4e-6 seen on an AMD EPYC box); a weight that did not
    # reload moves the logits by orders of magnitude more.
    torch.testing.assert_close(reloaded, fresh, rtol=0, atol=1e-5,
                               msg="saved weights must reload to the freshly built model")
    assert reloaded.std() > 0.1, "a degenerate (constant) model cannot show compression drift"
    for size_key in ("hidden_size", "moe_intermediate_size", "intermediate_size"):
        if size_key in model.config.to_dict() and model.config.to_dict()[size_key] is not None:
            assert model.config.to_dict()[size_key] % 128 == 0, f"{size_key} must suit group size 128"


def test_zoo_build_is_deterministic_across_cache_dirs(tmp_path: Path) -> None:
    first = materialize_zoo_model("qwen3-moe-tiny", tmp_path / "a")
    second = materialize_zoo_model("qwen3-moe-tiny", tmp_path / "b")
    assert sha256_file(first / "model.safetensors") == sha256_file(second / "model.safetensors")


def test_zoo_members_do_not_share_weights(session_cache_dir: Path) -> None:
    hashes = {sha256_file(materialize_zoo_model(name, session_cache_dir) / "model.safetensors") for name in ZOO}
    assert len(hashes) == len(ZOO)


def test_ernie_has_shared_experts_and_correction_bias() -> None:
    model = build_zoo_model(ZOO["ernie45-moe-tiny"])
    names = dict(model.named_parameters())
    assert "model.layers.0.mlp.shared_experts.gate_proj.weight" in names
    bias = names["model.layers.0.mlp.gate.moe_statics.e_score_correction_bias"]
    assert bias.abs().sum() > 0, "a zero correction bias would not exercise ERNIE's biased selection"


def test_tokenizer_asset_is_reproducible_from_the_mirror(shared_data_dir: Path) -> None:
    assert train_tokenizer_json(shared_data_dir) == ASSET.read_text(encoding="utf-8")


def test_tokenizer_chat_template_and_specials() -> None:
    tokenizer = load_zoo_tokenizer()
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 0
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer("naïve café")["input_ids"]) == "naïve café"


def test_resolve_model_errors(tmp_path: Path, session_cache_dir: Path) -> None:
    from fixtures.models import resolve_model

    with pytest.raises(ModelError, match="neither a zoo model"):
        resolve_model("no-such-thing", session_cache_dir)
    dense_dir = tmp_path / "dense"
    dense_dir.mkdir()
    (dense_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))
    (dense_dir / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="not a Mixture-of-Experts"):
        resolve_model(str(dense_dir), session_cache_dir)


def test_resolve_model_refuses_remote_code_and_pickles(tmp_path: Path, session_cache_dir: Path) -> None:
    from fixtures.models import resolve_model

    source = materialize_zoo_model("qwen3-moe-tiny", session_cache_dir)
    remote = tmp_path / "remote"
    shutil.copytree(source, remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(ModelError, match="--trust-remote-code"):
        resolve_model(str(remote), session_cache_dir)
    assert resolve_model(str(remote), session_cache_dir, trust_remote_code=True).num_experts == 8
    pickled = tmp_path / "pickled"
    shutil.copytree(source, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ModelError, match="safetensors"):
        resolve_model(str(pickled), session_cache_dir)


def test_resolve_zoo_model_handle(session_cache_dir: Path) -> None:
    from fixtures.models import resolve_model

    handle = resolve_model("ernie45-moe-tiny", session_cache_dir)
    assert (handle.num_experts, handle.top_k, handle.is_zoo) == (8, 2, True)
    assert handle.fingerprint == resolve_model("ernie45-moe-tiny", session_cache_dir).fingerprint


def test_hub_id_offline_is_a_clear_error(session_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fixtures.models import resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot download 'Qwen/Qwen3-30B-A3B'"):
        resolve_model("Qwen/Qwen3-30B-A3B", session_cache_dir)
