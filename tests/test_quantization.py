"""Tests of compressors/quantization.py: GPTQ (W4A16, W8A16, W4A8), AWQ (W4A16, W8A16), dynamic FP8 (W8A8).

Every method x scheme builds, verifies (plain-transformers reload vs in-memory model) and reloads on
qwen3-moe-tiny; every method also on the other three zoo architectures (one scheme each: W4A8 for GPTQ,
so activation quantization and Mixtral's dense-fake-quant storage meet; all schemes on all architectures
would double the suite's compression time for code paths that do not depend on the architecture). Also:
expert-only targeting, the achieved bit-width on the reload, determinism, the calibration mix's effect,
the verification reference for activation-quantized and FP8 checkpoints, the AWQ CPU patch, the causal
mask in each calibrated pipeline, and the ids the audit grid collects.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from compress_support import (
    SAFETY,
    ZOO_NAMES,
    Builder,
    assert_only_experts_changed,
    calibration_input_error,
    load,
    per_expert_weights,
    shared_builder,
    verified_summary,
)

import compressors
from compressors import MethodSpec, MoEInfo
from compressors.llmc_patches import llmcompressor_patches, release_session, run_oneshot
from compressors.quantization import choose_group_size, plain_reload_view
from compressors.runtime import (
    check_untouched,
    expert_linears,
    load_model,
    non_expert_state,
    save_checkpoint,
)
from compressors.verify import model_logits, probe_inputs, reference, verify_checkpoint, widen_to_reference
from fixtures.calibration_set import ids_digest
from fixtures.errors import CompressionError, ConfigError
from fixtures.zoo import read_config

REPO_ROOT = Path(__file__).resolve().parent.parent
ALL_SCHEMES = [MethodSpec(m, s) for m in ("gptq", "awq", "fp8") for s in compressors.get(m).schemes]
OTHER_ARCH_SPECS = [MethodSpec("gptq", "w4a8"), MethodSpec("awq", "w4a16"), MethodSpec("fp8", "w8a8")]
CASES = [("qwen3-moe-tiny", spec) for spec in ALL_SCHEMES] + [
    (name, spec) for name in ZOO_NAMES[1:] for spec in OTHER_ARCH_SPECS]
BITS = {"w4a16": 4, "w8a16": 8, "w4a8": 4, "w8a8": 8, "w3a16": 3}
GPTQ_W4 = MethodSpec("gptq", "w4a16")
FP8 = MethodSpec("fp8", "w8a8")


@pytest.fixture(scope="session")
def builder(session_cache_dir: Path, shared_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Builder:
    return shared_builder(session_cache_dir, shared_data_dir, tmp_path_factory)


def case_id(case: tuple[str, MethodSpec]) -> str:
    return f"{case[0]}-{case[1].label()}"


def distinct_per_group(weight: torch.Tensor, group: int) -> torch.Tensor:
    """Distinct values in each run of `group` consecutive input features (last dim) of a weight."""
    rows = weight.reshape(-1, group).sort(dim=1).values
    return 1 + (rows[:, 1:] != rows[:, :-1]).sum(dim=1)


# ----------------------------------------------------------------------------------------------------------
# registry and schemes (no model)
# ----------------------------------------------------------------------------------------------------------
def test_quantization_methods_are_registered_as_data() -> None:
    gptq, awq, fp8 = (compressors.get(n) for n in ("gptq", "awq", "fp8"))
    assert (gptq.family, gptq.schemes, gptq.needs_calibration) == ("quantization", ("w4a16", "w8a16", "w4a8", "w3a16"),
                                                                 True)
    assert (awq.family, awq.schemes, awq.needs_calibration) == ("quantization", ("w4a16", "w8a16", "w3a16"), True)
    assert (fp8.family, fp8.schemes, fp8.needs_calibration) == ("quantization", ("w8a8",), False)
    assert [s.label() for s in fp8.expand()] == ["fp8-w8a8"]
    assert [s.label() for s in gptq.expand(schemes=["W4A8", "s50", "w8a8"])] == ["gptq-w4a8"]
    with pytest.raises(ConfigError, match=r"awq: unknown scheme 'w4a8'; valid: w4a16, w8a16, w3a16"):
        awq.validate(MethodSpec("awq", "w4a8"), MoEInfo("x", 8, 2, 2, 0, 128, 128))
    fp8.validate(FP8, MoEInfo("x", 8, 2, 2, 0, 2880, 100))  # FP8 is per channel: no group size to fit


def test_group_size_choice() -> None:
    assert choose_group_size({128, 256}) == 128
    assert choose_group_size({2880, 128}) == 64  # GPT-OSS hidden size
    assert choose_group_size({96}) == 32
    with pytest.raises(ConfigError, match=r"in_features \[100\]"):
        choose_group_size({100})
    with pytest.raises(ConfigError, match=r"in_features \[100, 128\]"):
        compressors.get("gptq").validate(GPTQ_W4, MoEInfo("x", 8, 2, 2, 0, 128, 100))


def test_awq_cpu_patch_is_needed_and_restored() -> None:
    """llmcompressor.md §5b: `IntermediatesCache.pin_memory` raises on a CPU-only machine; the patch skips
    it there (and only inside `llmcompressor_patches`). If the control starts passing, upstream fixed it."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    cache = IntermediatesCache.empty(1, torch.device("cpu"))
    cache.update(0, {"hidden": torch.ones(2)})
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="accelerator"):
            cache.pin_memory(0)
    with llmcompressor_patches(), llmcompressor_patches():
        assert IntermediatesCache.pin_memory is not original
        cache.pin_memory(0)
    assert IntermediatesCache.pin_memory is original


def test_untouched_check_names_the_changed_tensor(builder: Builder) -> None:
    model, _ = load_model(builder.zoo("ernie45-moe-tiny"))
    expert_linears(model)
    before = non_expert_state(model)
    assert not any(".mlp.experts." in key for key in before)
    assert any("shared_experts" in key for key in before) and any("mlp.gate.weight" in key for key in before)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight.mul_(1.5)
    with pytest.raises(CompressionError, match=r"changed \['model.layers.1.mlp.gate.weight'\]"):
        check_untouched(before, model, "test")


class _StopAtOneshot(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq", "fp8", "wanda", "sparsegpt", "magnitude", "random"])
def test_every_expert_weight_method_runs_the_patched_oneshot(method: str, builder: Builder,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    """Each method reaches llm-compressor's `oneshot` through `run_oneshot`: patches active (causal mask,
    CPU pin_memory), expert-only targets, and for calibrated methods the sequential pipeline over every
    row in order with all-experts calibration (llmcompressor.md §5d); data-free methods get no data."""
    import llmcompressor
    from llmcompressor.pipelines.cache import IntermediatesCache

    from compressors.llmc_patches import patches_active

    original_pin, calls = IntermediatesCache.pin_memory, []

    def spy(**kwargs: Any) -> None:
        calls.append({**kwargs, "patched": patches_active() and IntermediatesCache.pin_memory is not original_pin})
        raise _StopAtOneshot

    monkeypatch.setattr(llmcompressor, "oneshot", spy)
    compressor = compressors.get(method)
    spec = compressor.expand()[0]
    data = builder.mix("qwen3-moe-tiny").to_dataset() if compressor.needs_calibration else None
    with pytest.raises(_StopAtOneshot):
        compressor.compress(builder.zoo("qwen3-moe-tiny"), data, tmp_path / "out", spec, seed=0)
    (call,) = calls
    assert call["patched"]
    modifiers = call["recipe"] if isinstance(call["recipe"], list) else [call["recipe"]]
    for modifier in modifiers:
        if getattr(modifier, "config_groups", None):  # quantization: the groups' targets apply
            targets = [target for group in modifier.config_groups.values() for target in group.targets]
        elif getattr(modifier, "mappings", None):  # AWQ smoothing pairs
            targets = [t for m in modifier.mappings for t in (m.smooth_layer, *m.balance_layers)]
        else:
            targets = list(modifier.targets)
        assert targets and all(t.startswith(r"re:.*\.experts\.\d+\.") for t in targets), targets
    if compressor.needs_calibration:
        assert (call["pipeline"], call["moe_calibrate_all_experts"], call["batch_size"]) == ("sequential", True, 1)
        assert (call["num_calibration_samples"], call["shuffle_calibration_samples"]) == (16, False)
    else:
        assert call["pipeline"] == "datafree" and "dataset" not in call


# ----------------------------------------------------------------------------------------------------------
# every method x scheme builds, verifies and reloads
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_builds_verifies_and_reloads(case: tuple[str, MethodSpec], builder: Builder) -> None:
    name, spec = case
    built = builder.build(name, spec)
    manifest, summary = built.manifest, verified_summary(built)
    bits = BITS[spec.scheme or ""]
    assert summary["bits"] == {str(bits): 48}
    # measured on the reload: a b-bit grid, and not a coarser one (a 128-weight group holds <= 128 values)
    assert 2 ** (bits // 2) < summary["levels_max"] <= 2**bits
    assert manifest["size_bytes"] > 0 and manifest["dense_size_bytes"] > manifest["size_bytes"] * 0.99
    if spec.method == "fp8":
        assert manifest["calibration"] is None and manifest["settings"]["group_size"] is None
    else:
        calibration = manifest["calibration"]
        assert (calibration["rows"], calibration["seq_len"]) == (16, 64)
        assert calibration["ids_sha256"] == ids_digest(builder.mix(name).input_ids)  # the rows it saw
        assert summary["group_size"] == {"128": 48}
    if name == "mixtral-tiny":  # repacked: stored dense on the grid (llmcompressor.md §5f)
        assert manifest["storage"] == "dense-fake-quant" and summary["mean_effective_bits"] == 32
        assert manifest["size_ratio"] == pytest.approx(1, abs=1e-3)
        assert "quantization_config" not in read_config(built.path)
    else:
        qconfig = read_config(built.path)["quantization_config"]
        assert qconfig["format"] == manifest["storage"] == manifest["settings"]["format"]
        assert summary["mean_effective_bits"] == bits + 0.25  # one fp32 scale per 128 weights / per row
        assert manifest["size_ratio"] < (0.6 if bits == 4 else 0.65)
        group = next(iter(qconfig["config_groups"].values()))
        assert group["targets"] == manifest["targets"]
        activations = group["input_activations"]
        if spec.scheme in ("w4a8", "w8a8"):  # recorded for vLLM / load_context; plain transformers skips it
            assert (activations["num_bits"], activations["dynamic"], activations["strategy"]) == (8, True, "token")
        else:
            assert activations is None
    assert (built.path / "chat_template.jinja").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_touches_only_experts_and_uses_the_grid(case: tuple[str, MethodSpec], builder: Builder) -> None:
    """Reloaded with plain transformers: only the experts changed, and every expert weight lies on the
    scheme's grid — checked against the saved scales (int: w / scale is an integer within b bits; FP8: the
    reload is exactly the saved e4m3 codes times their scale), or, for Mixtral's dense storage, by the
    count of distinct values (int4) and e4m3-representability of w / (row absmax / 448) (FP8)."""
    from safetensors.torch import load_file

    name, spec = case
    built = builder.build(name, spec)
    dense, quant = assert_only_experts_changed(built)
    bits = BITS[spec.scheme or ""]
    saved = {} if name == "mixtral-tiny" else load_file(built.path / "model.safetensors")
    for (layer, expert, proj), weight in projections(quant).items():
        prefix = f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj"
        if spec.method == "fp8" and saved:
            assert saved[f"{prefix}.weight"].dtype == torch.float8_e4m3fn
            codes, scale = saved[f"{prefix}.weight"].float(), saved[f"{prefix}.weight_scale"]
            assert torch.equal((codes * scale).bfloat16().float(), weight), prefix
        elif spec.method == "fp8":
            codes = weight / (weight.abs().amax(dim=1, keepdim=True) / 448)
            torch.testing.assert_close(codes.to(torch.float8_e4m3fn).float(), codes, rtol=1e-6, atol=0)
        elif saved:
            scale = saved[f"{prefix}.weight_scale"]  # [out, in / group]
            codes = weight.reshape(*scale.shape, -1) / scale[..., None]
            assert float((codes - codes.round()).abs().max()) < 1e-3, prefix
            assert -(2 ** (bits - 1)) <= int(codes.round().min()) and int(codes.round().max()) < 2 ** (bits - 1)
        else:
            assert int(distinct_per_group(weight, 128).max()) <= 2**bits, prefix
    first = next(iter(projections(dense).values()))
    assert int(distinct_per_group(first, 128).min()) > 16  # the dense weights are on no 4-bit grid


def projections(state: dict[str, torch.Tensor]) -> dict[tuple[int, int, str], torch.Tensor]:
    """(layer, expert, "gate"|"up"|"down") -> [out, in] weight, from `per_expert_weights`' fused slices."""
    found = {}
    for key, weight in per_expert_weights(state).items():
        layer = int(key.split("layers.")[1].split(".")[0])
        expert = int(key.split("[")[1].split("]")[0])
        proj = key.rsplit(".", 1)[1] if key.endswith((".gate", ".up")) else "down"
        found[(layer, expert, proj)] = weight
    return found


@pytest.mark.slow
def test_gptq_picks_a_dividing_group_size(tmp_path: Path, builder: Builder) -> None:
    """Expert width 64 (< 128): group 64 is used, recorded, saved in the config and reloads exactly."""
    from fixtures.tokenizer import load_zoo_tokenizer
    from fixtures.zoo import ZOO, ZooSpec, build_zoo_model

    base = ZOO["qwen3-moe-tiny"]
    spec = ZooSpec("qwen3-moe-i64", base.config_class, {**base.config, "moe_intermediate_size": 64})
    model_dir = tmp_path / "dense"
    build_zoo_model(spec).save_pretrained(model_dir)
    load_zoo_tokenizer().save_pretrained(model_dir)
    data = builder.mix("qwen3-moe-tiny").to_dataset()
    manifest = compressors.get("gptq").compress(model_dir, data, tmp_path / "out", GPTQ_W4, seed=0)
    assert manifest["settings"]["group_size"] == 64 and manifest["summary"]["group_size"] == {"64": 48}
    assert manifest["verification"]["max_abs_logit_diff"] <= 1e-4 and manifest["summary"]["levels_max"] <= 16
    groups = read_config(tmp_path / "out")["quantization_config"]["config_groups"]
    assert [g["weights"]["group_size"] for g in groups.values()] == [64]
    weight = load(tmp_path / "out").state_dict()["model.layers.0.mlp.experts.gate_up_proj"]
    assert int(distinct_per_group(weight, 64).max()) <= 16


# ----------------------------------------------------------------------------------------------------------
# verification reference: what plain transformers computes after reload
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_reference_is_the_plain_reload_not_the_fake_quant_model(tmp_path: Path, builder: Builder) -> None:
    """FP8 dynamic in memory quantizes activations per token; the plain reload does not, and holds the
    experts in bf16. Without `plain_reload_view` the comparison is off by ~1 logit (no tolerance could
    catch a corrupted tensor); with it the reload matches exactly once widened to fp32."""
    model_dir = builder.zoo("qwen3-moe-tiny")
    model, tokenizer = load_model(model_dir)
    modifiers, _ = compressors.get("fp8").recipe(FP8, expert_linears(model), 0)
    run_oneshot(model, tokenizer, None, modifiers, calibrate_all_experts=True)
    ids = probe_inputs(4096)
    fake_quant = model_logits(model, ids)
    with plain_reload_view(model):
        ref = reference(model)
    assert torch.equal(model_logits(model, ids), fake_quant)  # the view is undone on exit
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", compressed=True)
    release_session()
    reloaded = load(tmp_path / "ckpt")
    assert {str(p.dtype) for n, p in reloaded.named_parameters() if ".mlp.experts." in n} == {"torch.bfloat16"}
    assert float((model_logits(reloaded, ids) - fake_quant).abs().max()) > 0.5
    widened = widen_to_reference(reloaded, ref)
    assert widened["widened"]["from"] == ["bfloat16"] and 0 < widened["max_abs_logit_diff_as_loaded"] < 0.1
    assert torch.equal(model_logits(reloaded, ids), ref["logits"])
    with torch.no_grad():
        reloaded.model.norm.weight.data = reloaded.model.norm.weight.data.bfloat16()
    with pytest.raises(CompressionError, match=r"non-expert tensors in a dtype other than .*\['model.norm.weight'\]"):
        widen_to_reference(reloaded, ref)


@pytest.mark.slow
def test_fp8_verification_still_catches_a_corrupt_expert(tmp_path: Path, builder: Builder) -> None:
    from safetensors.torch import load_file, save_file

    built = builder.build("qwen3-moe-tiny", FP8)
    reloaded = load(built.path)
    torch.nn.Module.float(reloaded)
    ref = reference(reloaded)
    copy = tmp_path / "ckpt"
    shutil.copytree(built.path, copy)
    assert verify_checkpoint(copy, ref, expected_num_experts=8)["max_abs_logit_diff"] == 0.0
    tensors = load_file(copy / "model.safetensors")
    key = "model.layers.0.mlp.experts.1.down_proj.weight_scale"
    assert tensors["model.layers.0.mlp.experts.1.down_proj.weight"].dtype == torch.float8_e4m3fn
    tensors[key] = tensors[key] * 3
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CompressionError, match=r"reloaded logits differ .* > tolerance 0.0001"):
        verify_checkpoint(copy, ref, expected_num_experts=8)


# ----------------------------------------------------------------------------------------------------------
# determinism and the calibration mix
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("spec", [GPTQ_W4, FP8], ids=MethodSpec.label)
def test_same_seed_same_weights(spec: MethodSpec, builder: Builder) -> None:
    first = builder.build("qwen3-moe-tiny", spec)
    again = builder.build("qwen3-moe-tiny", spec, fresh=True)
    assert again.path != first.path
    assert again.manifest["weights_sha256"] == first.manifest["weights_sha256"]


@pytest.mark.slow
def test_safety_fraction_changes_calibration_and_checkpoint(builder: Builder) -> None:
    general = builder.build("qwen3-moe-tiny", GPTQ_W4, fraction=0.0)
    mixed = builder.build("qwen3-moe-tiny", GPTQ_W4, fraction=SAFETY)
    assert builder.mix("qwen3-moe-tiny", 0.0).fingerprint != builder.mix("qwen3-moe-tiny", SAFETY).fingerprint
    assert general.manifest["calibration"]["ids_sha256"] != mixed.manifest["calibration"]["ids_sha256"]
    assert general.manifest["weights_sha256"] != mixed.manifest["weights_sha256"]
    # data-free: the audit grid gives it no calibration, so the checkpoint cannot depend on the mix
    assert builder.build("qwen3-moe-tiny", FP8).manifest["calibration"] is None


# ----------------------------------------------------------------------------------------------------------
# the causal-mask patch is active in every calibrated quantization pipeline (llmcompressor.md §5a)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("spec", [GPTQ_W4, MethodSpec("awq", "w4a16")], ids=MethodSpec.label)
def test_calibration_layer_inputs_equal_plain_forward(spec: MethodSpec, builder: Builder) -> None:
    diffs = calibration_input_error(builder, "qwen3-moe-tiny", spec)
    release_session()
    assert max(diffs) <= 1e-5, f"layer inputs during {spec.label()} calibration differ from a plain forward: {diffs}"


# ----------------------------------------------------------------------------------------------------------
# the audit grid
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_audit_collects_every_method_and_scheme(shared_data_dir: Path, tmp_path: Path) -> None:
    args = ["--collect-only", "-q", "--methods", "awq,gptq,fp8,wanda,sparsegpt,magnitude,random",
            "--schemes", "w4a16,w8a16,w4a8,w8a8,s50,2of4", "--ratios", "0.5", "-p", "no:cacheprovider"]
    env = {**os.environ, "MOE_FBS_DATA_DIR": str(shared_data_dir), "MOE_FBS_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "pytest", "audits", *args], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ids = {line.split("[", 1)[1].rsplit("-", 1)[0] for line in result.stdout.splitlines() if "[" in line}
    calibrated = [f"{m}-{s}" for m in ("awq", "gptq") for s in ("w4a16", "w8a16")] + [
        "gptq-w4a8", *(f"{m}-{s}" for m in ("wanda", "sparsegpt") for s in ("s50", "2of4"))]
    want = {f"{label}-safety{f}-seed0" for label in calibrated for f in ("0", "11.8", "100")}
    want |= {"fp8-w8a8-seed0", "magnitude-s50-seed0", "random-s50-seed0"}
    assert ids == want


def test_stored_bits_reads_a_module_whose_weight_and_scale_are_in_different_shards(tmp_path: Path) -> None:
    """A large checkpoint is saved in several shards, and a module's weight and its scale can land in different
    files (measured: FP8 on a 13B DeepSeek-V3 layer failed with a KeyError before the shards were indexed
    together). 8-bit weights [4, 8] with one bf16 scale per row: 8 + 4·16/32 = 10 bits per weight."""
    from safetensors.torch import save_file

    from compressors.measure import stored_bits

    module = "model.layers.0.mlp.experts.0.gate_proj"
    save_file({f"{module}.weight": torch.zeros(4, 8).to(torch.float8_e4m3fn)}, str(tmp_path / "a.safetensors"))
    save_file({f"{module}.weight_scale": torch.ones(4, 1, dtype=torch.bfloat16)}, str(tmp_path / "b.safetensors"))
    assert stored_bits(tmp_path) == {module: {"stored_dtype": "F8_E4M3", "effective_bits": 10.0}}
