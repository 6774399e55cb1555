"""benchmarks/architecture.py: which fast paths are exact for an architecture, on real config shapes and on a
tiny real Qwen3-Next (hybrid linear-attention + MoE), whose shared-scorer request falls back to lm-eval's HF
backend with equal results, and whose drift run is refused at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import run_benchmarks
from benchmarks.architecture import check_drift_supported, recurrent_layers, scorer_for
from fixtures.data import DataSource
from fixtures.errors import ConfigError

pytest_plugins = ("pytester",)


@pytest.mark.parametrize(("config", "recurrent"), [
    ({"model_type": "qwen3_moe"}, False),
    ({"model_type": "gpt_oss", "layer_types": ["sliding_attention", "full_attention"]}, False),
    ({"model_type": "qwen3_next", "layer_types": ["linear_attention", "full_attention"]}, True),
    ({"model_type": "jamba"}, True),
    ({"model_type": "qwen3_vl_moe", "text_config": {"model_type": "qwen3_vl_moe_text"}}, False),
    ({"model_type": "wrapper", "text_config": {"model_type": "x", "layer_types": ["mamba", "attention"]}}, True),
])
def test_recurrent_layers_are_recognised_from_the_config(config: dict[str, object], recurrent: bool) -> None:
    assert (recurrent_layers(config) is not None) is recurrent
    assert scorer_for(config, "shared")[0] == ("hf" if recurrent else "shared")
    assert scorer_for(config, "hf") == ("hf", None)
    if recurrent:
        with pytest.raises(ConfigError, match="drift's batched generation is exact only for softmax attention"):
            check_drift_supported(config, ("bbq", "drift"))
    check_drift_supported(config, ("bbq",))


@pytest.fixture(scope="module")
def tiny_qwen3_next(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    from fixtures.tokenizer import VOCAB_SIZE, load_zoo_tokenizer

    path = tmp_path_factory.mktemp("hybrid") / "qwen3-next-tiny"
    torch.manual_seed(0)
    config = Qwen3NextConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=32, linear_num_value_heads=2,
                             linear_num_key_heads=1, linear_key_head_dim=16, linear_value_head_dim=16,
                             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                             shared_expert_intermediate_size=32, layer_types=["linear_attention", "full_attention"],
                             eos_token_id=0, pad_token_id=0, bos_token_id=None)
    Qwen3NextForCausalLM(config).save_pretrained(path)
    load_zoo_tokenizer().save_pretrained(path)
    return path


def test_a_hybrid_model_is_scored_by_the_reference_path(tiny_qwen3_next: Path, shared_data_dir: Path,
                                                        tmp_path: Path) -> None:
    source = DataSource(shared_data_dir)
    asked_shared = run_benchmarks(["crows_pairs"], tiny_qwen3_next, source, limit=12, seed=0,
                                  work_dir=tmp_path / "shared", scorer="shared")["crows_pairs"]
    reference = run_benchmarks(["crows_pairs"], tiny_qwen3_next, source, limit=12, seed=0,
                               work_dir=tmp_path / "hf", scorer="hf")["crows_pairs"]
    assert asked_shared.settings["model"] == "hf" and "linear_attention" in asked_shared.settings["scorer_fallback"]
    assert reference.settings["scorer_fallback"] is None
    assert asked_shared.metrics == reference.metrics
    assert [i.loglikelihoods for i in asked_shared.items] == [i.loglikelihoods for i in reference.items]


def test_drift_on_a_hybrid_model_stops_the_run_at_start_up(audit_project: pytest.Pytester,
                                                            tiny_qwen3_next: Path) -> None:
    import shutil

    shutil.copytree(tiny_qwen3_next, audit_project.path / "hybrid")  # option paths inside the project: rootdir
    result = audit_project.runpytest("--model", "hybrid", "--methods", "reap", "--benchmarks",
                                     "bbq,drift", "--safety-fractions", "0")
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, output[-2000:]
    assert "moe-fbs-audit: --benchmarks drift: qwen3_next has linear_attention layers" in output
