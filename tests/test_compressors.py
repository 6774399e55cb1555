"""Tests of compressors/: the registry, the llmcompressor patches (causal mask, ERNIE bias) and the reload
verification, with GPTQ and REAP checkpoints of the four zoo architectures (REAP and the other
expert-compression methods: tests/test_expert_compression.py, tests/test_observer.py; GPTQ/AWQ/FP8:
tests/test_quantization.py; Wanda/SparseGPT/magnitude/random: tests/test_sparsity.py).

Each zoo model and each checkpoint is built once per session (session-scoped builders); calibration is
16 rows x 64 tokens of generated text through the zoo tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from compress_support import capture_layer_inputs

import compressors
from compressors import MethodSpec, MoEInfo, moe_info
from compressors.llmc_patches import llmcompressor_patches, patches_active, run_oneshot
from compressors.runtime import save_checkpoint
from compressors.verify import model_logits, probe_inputs, reference, verify_checkpoint
from fixtures.errors import CompressionError, ConfigError, DataError, ModelError
from fixtures.zoo import materialize_zoo_model, read_config

ZOO_NAMES = ("qwen3-moe-tiny", "ernie45-moe-tiny", "olmoe-tiny", "mixtral-tiny")
REPO_ROOT = Path(__file__).resolve().parent.parent
ROWS, SEQ_LEN = 16, 64
GPTQ_W4 = MethodSpec("gptq", "w4a16")
REAP_50 = MethodSpec("reap", None, 0.5)
REAP_25 = MethodSpec("reap", None, 0.25)
INFO_8_TOP2 = MoEInfo("qwen3_moe", num_experts=8, top_k=2, num_layers=2, shared_experts=0)


# ----------------------------------------------------------------------------------------------------------
# session fixtures
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Built:
    path: Path
    manifest: dict[str, Any]
    dense: Path


@pytest.fixture(scope="session")
def zoo_dir(session_cache_dir: Path) -> Callable[[str], Path]:
    dirs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in dirs:
            dirs[name] = materialize_zoo_model(name, session_cache_dir)
        return dirs[name]

    return get


@pytest.fixture(scope="session")
def calibration() -> Any:
    """16 x 64 tokens of deterministic text, no padding (the shape fixtures/calibration.py delivers)."""
    import datasets

    from fixtures.tokenizer import load_zoo_tokenizer

    subjects = ("the committee", "a nurse", "my neighbour", "the engineer", "our teacher", "the driver")
    verbs = ("explained", "asked about", "wrote down", "argued over", "remembered", "questioned")
    objects = ("the budget", "a recipe", "the weather", "an old map", "the schedule", "a long story")
    text = " ".join(
        f"On day {i}, {subjects[i % 6]} {verbs[(i * 5) % 6]} {objects[(i * 7) % 6]} before noon."
        for i in range(400)
    )
    ids = load_zoo_tokenizer()(text)["input_ids"]
    assert len(ids) >= ROWS * SEQ_LEN
    rows = [ids[r * SEQ_LEN:(r + 1) * SEQ_LEN] for r in range(ROWS)]
    return datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * SEQ_LEN] * ROWS})


@pytest.fixture(scope="session")
def build(tmp_path_factory: pytest.TempPathFactory, zoo_dir: Callable[[str], Path],
          calibration: Any) -> Callable[[str, MethodSpec], Built]:
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[tuple[str, MethodSpec], Built] = {}

    def get(name: str, spec: MethodSpec) -> Built:
        if (name, spec) not in built:
            out = root / f"{name}-{spec.label()}"
            manifest = compressors.get(spec.method).compress(zoo_dir(name), calibration, out, spec, seed=0)
            built[(name, spec)] = Built(out, manifest, zoo_dir(name))
        return built[(name, spec)]

    return get


def load(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------------------------------------
# registry, specs, validation
# ----------------------------------------------------------------------------------------------------------
def test_registry_lists_and_finds_methods() -> None:
    assert {"gptq", "reap"} <= set(compressors.available())
    gptq, reap = compressors.get("gptq"), compressors.get("reap")
    assert (gptq.family, gptq.schemes, gptq.needs_calibration) == ("quantization", ("w4a16", "w8a16", "w4a8", "w3a16"),
                                                                 True)
    assert (reap.family, reap.schemes, reap.default_ratios) == ("expert", (), (0.25, 0.5))
    assert compressors.get("GPTQ") is gptq


def test_unknown_method_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown compression method 'gptx'; valid: .*gptq.*reap"):
        compressors.get("gptx")


def test_unknown_scheme_lists_valid_ones() -> None:
    gptq = compressors.get("gptq")
    with pytest.raises(ConfigError, match=r"unknown scheme 'w2a16'; valid: w4a16, w8a16"):
        gptq.validate(MethodSpec("gptq", "w2a16"), INFO_8_TOP2)
    with pytest.raises(ConfigError, match=r"valid: w4a16, w8a16"):
        gptq.expand(schemes=["w2a16"])
    with pytest.raises(ConfigError, match="takes a scheme, not a ratio"):
        gptq.validate(MethodSpec("gptq", "w4a16", 0.5), INFO_8_TOP2)
    with pytest.raises(ConfigError, match="takes a ratio, not a scheme"):
        compressors.get("reap").validate(MethodSpec("reap", "w4a16", 0.5), INFO_8_TOP2)


@pytest.mark.parametrize(("ratio", "message"), [
    (0.0, r"ratio 0 is the fraction removed and must lie in \(0, 1\)"),
    (1.0, r"ratio 1 is the fraction removed and must lie in \(0, 1\)"),
    (-0.25, r"must lie in \(0, 1\)"),
    (0.9, r"ratio 0.9 removes 7 of 8 experts per layer, leaving 1 < top_k=2"),
    (0.1, r"removes int\(8\*0.1\)=0 of 8 experts"),
])
def test_impossible_ratio_names_the_numbers(ratio: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compressors.get("reap").validate(MethodSpec("reap", None, ratio), INFO_8_TOP2)


def test_possible_ratios_validate() -> None:
    reap = compressors.get("reap")
    for ratio in (0.125, 0.25, 0.5, 0.75):
        reap.validate(MethodSpec("reap", None, ratio), INFO_8_TOP2)
    with pytest.raises(ConfigError, match="leaving 1 < top_k=2"):
        reap.validate(MethodSpec("reap", None, 0.875), INFO_8_TOP2)


def test_expand_defaults_and_requests() -> None:
    gptq, reap = compressors.get("gptq"), compressors.get("reap")
    assert gptq.expand() == (GPTQ_W4,)
    assert gptq.expand(schemes=["W8A16", "fp8", "w4a16"], ratios=[0.5]) == (
        MethodSpec("gptq", "w8a16"), GPTQ_W4)
    assert reap.expand(schemes=["w4a16"]) == (REAP_25, REAP_50)
    assert reap.expand(ratios=[0.5, 0.125]) == (REAP_50, MethodSpec("reap", None, 0.125))
    with pytest.raises(ConfigError, match="must lie in"):
        reap.expand(ratios=[1.5])


def test_spec_label_and_json() -> None:
    assert GPTQ_W4.label() == "gptq-w4a16"
    assert REAP_50.label() == "reap-r50"
    assert MethodSpec("reap", None, 0.125).label() == "reap-r12.5"
    assert MethodSpec("reap", None, 0.25).label() == "reap-r25"
    for spec in (GPTQ_W4, REAP_50):
        payload = json.loads(json.dumps(spec.to_json()))
        assert MethodSpec.from_json(payload) == spec
    with pytest.raises(ConfigError):
        MethodSpec("reap", None, float("nan"))


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_moe_info_reads_zoo_configs(name: str, zoo_dir: Callable[[str], Path]) -> None:
    from transformers import AutoConfig

    for config in (read_config(zoo_dir(name)), AutoConfig.from_pretrained(zoo_dir(name))):
        info = moe_info(config)
        assert (info.num_experts, info.top_k, info.num_layers) == (8, 2, 2)
        assert info.shared_experts == (1 if name.startswith("ernie") else 0)
        assert (info.hidden_size, info.expert_intermediate_size) == (128, 128)


def test_non_moe_config_is_a_model_error() -> None:
    from transformers import LlamaConfig

    dense = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256}
    with pytest.raises(ModelError, match="is not a Mixture-of-Experts model"):
        moe_info(dense)
    with pytest.raises(ModelError, match="is not a Mixture-of-Experts model"):
        moe_info(LlamaConfig(hidden_size=64, num_hidden_layers=1))
    with pytest.raises(ModelError, match="no valid top-k"):
        moe_info({"model_type": "x", "num_experts": 8})


def test_calibration_is_checked_before_loading(tmp_path: Path) -> None:
    import datasets

    gptq = compressors.get("gptq")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_experts": 8,
                                                       "num_experts_per_tok": 2}))
    with pytest.raises(ConfigError, match="needs calibration data"):
        gptq.compress(model_dir, None, tmp_path / "out", GPTQ_W4, seed=0)
    padded = datasets.Dataset.from_dict({"input_ids": [[5, 6, 0]], "attention_mask": [[1, 1, 0]]})
    with pytest.raises(DataError, match="unpadded"):
        gptq.compress(model_dir, padded, tmp_path / "out", GPTQ_W4, seed=0)
    ragged = datasets.Dataset.from_dict({"input_ids": [[5, 6], [7]]})
    with pytest.raises(DataError, match="one non-zero length"):
        gptq.compress(model_dir, ragged, tmp_path / "out", GPTQ_W4, seed=0)


def test_patches_are_idempotent_and_restored() -> None:
    import llmcompressor.modifiers.pruning.reap.base as reap_base
    import llmcompressor.utils.helpers as helpers

    originals = (helpers.use_eager_attention, reap_base.prune_moe_layer)
    with llmcompressor_patches():
        patched = (helpers.use_eager_attention, reap_base.prune_moe_layer)
        assert patched[0] is not originals[0] and patched[1] is not originals[1]
        with llmcompressor_patches():
            assert (helpers.use_eager_attention, reap_base.prune_moe_layer) == patched
        assert patches_active()
        assert (helpers.use_eager_attention, reap_base.prune_moe_layer) == patched
    assert not patches_active()
    assert (helpers.use_eager_attention, reap_base.prune_moe_layer) == originals


# ----------------------------------------------------------------------------------------------------------
# GPTQ/AWQ/FP8 builds: tests/test_quantization.py; Wanda/SparseGPT/magnitude/random: tests/test_sparsity.py
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bf16_mixtral_builds_and_verifies(tmp_path: Path, zoo_dir: Callable[[str], Path],
                                          calibration: Any) -> None:
    """bf16 Mixtral: llmcompressor's per-expert forward already differs from the native kernel by ~1 logit on
    the dense model, so verification must compare the reload with the repacked (native) model as saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, model_dir = zoo_dir("mixtral-tiny"), tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(source).save_pretrained(model_dir)
    for spec in (REAP_50, GPTQ_W4):
        manifest = compressors.get(spec.method).compress(model_dir, calibration, tmp_path / spec.label(), spec,
                                                         seed=0)
        verification = manifest["verification"]
        assert verification["dtype"] == "bfloat16" and verification["tolerance_rule"].startswith("16 spacings")
        assert verification["worst_ratio"] <= 1.0 and verification["off_by_more_than_one_spacing"] <= 0.02


# ----------------------------------------------------------------------------------------------------------
# llmcompressor patches: causal mask during sequential calibration (llmcompressor.md §5a)
# ----------------------------------------------------------------------------------------------------------
def _calibration_vs_plain_inputs(model_dir: Path, calibration: Any, patched: bool) -> list[float]:
    """Max |Δ| per decoder layer (and final norm) between the inputs seen in oneshot's calibration pass
    (REAP, propagate_error=False: each layer sees dense activations) and a plain forward, row by row."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
    from transformers import AutoTokenizer

    dense, model = load(model_dir), load(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(calibration["input_ids"])

    def plain() -> None:
        with torch.no_grad():
            for row in ids:
                dense(input_ids=row[None])

    def calibrate() -> None:
        recipe = REAPPruningModifier(sparsity=0.25)
        if patched:
            run_oneshot(model, tokenizer, calibration, recipe, calibrate_all_experts=False,
                        propagate_error=False)
        else:  # the same call without the patches
            assert not patches_active()
            oneshot(model=model, processor=tokenizer, dataset=calibration, recipe=recipe,
                    num_calibration_samples=ROWS, max_seq_length=SEQ_LEN, shuffle_calibration_samples=False,
                    batch_size=1, pipeline="sequential", moe_calibrate_all_experts=False,
                    propagate_error=False)

    want = capture_layer_inputs([*dense.model.layers, dense.model.norm], plain, ROWS)
    got = capture_layer_inputs([*model.model.layers, model.model.norm], calibrate, ROWS)
    return [float((g - w).abs().max()) for g, w in zip(got, want, strict=True)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_calibration_layer_inputs_equal_plain_forward(name: str, zoo_dir: Callable[[str], Path],
                                                      calibration: Any) -> None:
    diffs = _calibration_vs_plain_inputs(zoo_dir(name), calibration, patched=True)
    assert max(diffs) <= 1e-5, f"layer inputs during calibration differ from a plain forward: {diffs}"


@pytest.mark.slow
def test_unpatched_pipeline_still_drops_the_causal_mask(zoo_dir: Callable[[str], Path],
                                                        calibration: Any) -> None:
    """Control: without the patch Qwen3-MoE layers are calibrated on non-causal attention (so the test above
    can fail). If this starts failing, llmcompressor fixed §5a and the patch can go."""
    diffs = _calibration_vs_plain_inputs(zoo_dir("qwen3-moe-tiny"), calibration, patched=False)
    assert diffs[0] == 0.0 and diffs[1] > 1e-2, diffs


# ----------------------------------------------------------------------------------------------------------
# verification catches bad checkpoints
# ----------------------------------------------------------------------------------------------------------
def _rewrite_safetensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.slow
@pytest.mark.parametrize("spec", [REAP_50, GPTQ_W4])
def test_verification_catches_a_corrupt_expert(spec: MethodSpec, tmp_path: Path,
                                               build: Callable[[str, MethodSpec], Built]) -> None:
    built = build("qwen3-moe-tiny", spec)
    experts = built.manifest["verification"]["num_experts"]
    ref = reference(load(built.path))
    copy = tmp_path / "ckpt"
    shutil.copytree(built.path, copy)
    assert verify_checkpoint(copy, ref, expected_num_experts=experts)["max_abs_logit_diff"] == 0.0
    key = "model.layers.0.mlp.experts.1.down_proj." + ("weight" if spec.method == "reap" else "weight_scale")

    def corrupt(tensors: dict[str, torch.Tensor]) -> None:
        assert key in tensors, sorted(tensors)[:8]
        tensors[key] = tensors[key] * 3

    _rewrite_safetensors(copy, corrupt)
    with pytest.raises(CompressionError, match=r"reloaded logits differ .* max \|Δ\| .* > tolerance 0.0001"):
        verify_checkpoint(copy, ref, expected_num_experts=experts)


@pytest.mark.slow
def test_verification_catches_load_report_and_count(tmp_path: Path,
                                                    build: Callable[[str, MethodSpec], Built]) -> None:
    built = build("olmoe-tiny", REAP_50)
    ref = reference(load(built.path))
    with pytest.raises(CompressionError, match="4 experts per layer, expected 8"):
        verify_checkpoint(built.path, ref, expected_num_experts=8)
    copy = tmp_path / "ckpt"
    shutil.copytree(built.path, copy)

    def rename(old: str, new: str) -> Callable[[dict[str, torch.Tensor]], None]:
        return lambda tensors: tensors.__setitem__(new, tensors.pop(old))

    # a renamed plain tensor: MISSING + UNEXPECTED in transformers' load report
    q_proj, renamed = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.q.weight"
    _rewrite_safetensors(copy, rename(q_proj, renamed))
    with pytest.raises(CompressionError, match=r"reload report not clean.*missing_keys.*unexpected_keys"):
        verify_checkpoint(copy, ref, expected_num_experts=4)
    # a renamed per-expert tensor: transformers' expert merge fails outright
    _rewrite_safetensors(copy, rename(renamed, q_proj))
    _rewrite_safetensors(copy, rename("model.layers.1.mlp.experts.3.up_proj.weight",
                                      "model.layers.1.mlp.experts.3.extra.weight"))
    with pytest.raises(CompressionError, match="plain transformers reload failed"):
        verify_checkpoint(copy, ref, expected_num_experts=4)
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer_config.json").unlink()
    with pytest.raises(CompressionError, match="missing tokenizer"):
        verify_checkpoint(copy, ref, expected_num_experts=4)


@pytest.mark.slow
def test_verification_catches_mixtral_saved_without_repack(tmp_path: Path, zoo_dir: Callable[[str], Path],
                                                           calibration: Any) -> None:
    """llmcompressor.md §5f: llmcompressor's per-expert Mixtral keys reload silently wrong (experts
    re-initialised); verification must refuse such a checkpoint (the compressors repack before saving)."""
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
    from transformers import AutoTokenizer

    model_dir = zoo_dir("mixtral-tiny")
    model, tokenizer = load(model_dir), AutoTokenizer.from_pretrained(model_dir)
    run_oneshot(model, tokenizer, calibration, REAPPruningModifier(sparsity=0.5), calibrate_all_experts=False,
                propagate_error=False)
    ref = reference(model)
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", compressed=False)  # what REAP does, minus the repack
    with pytest.raises(CompressionError, match="reload report not clean"):
        verify_checkpoint(tmp_path / "ckpt", ref, expected_num_experts=4)


@pytest.mark.slow
def test_checkpoints_reload_identically_in_a_fresh_process(build: Callable[[str, MethodSpec], Built],
                                                           tmp_path: Path) -> None:
    """The in-process reload could profit from global state llmcompressor left in transformers; a fresh
    interpreter that never imports llmcompressor must load every checkpoint to the same logits."""
    dirs = [str(build(name, spec).path) for name in ZOO_NAMES for spec in (GPTQ_W4, REAP_50)]
    out = tmp_path / "logits.pt"
    script = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from compressors.verify import model_logits, probe_inputs\n"
        "dirs, out = json.loads(sys.argv[1]), sys.argv[2]\n"
        "ids = probe_inputs(4096)\n"
        "load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype='auto')\n"
        "logits = {d: model_logits(load(d), ids) for d in dirs}\n"
        "assert 'llmcompressor' not in sys.modules\n"
        "torch.save(logits, out)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script, json.dumps(dirs), str(out)], check=True, env=env,
                   cwd=REPO_ROOT, timeout=300)
    fresh = torch.load(out)
    ids = probe_inputs(4096)
    for path in dirs:
        torch.testing.assert_close(fresh[path], model_logits(load(Path(path)), ids), rtol=0, atol=1e-6)
