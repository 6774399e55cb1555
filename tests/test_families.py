"""Every supported MoE family (architectures/): the observer sees each family's own routing (against a hand
computation), pruning edits every per-expert tensor (router and correction biases, grouped routing kept),
every method builds and reloads on the tiny instance of each family, and what is refused stops at start-up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from expert_helpers import calibration, calibration_ids
from routing_reference import FAMILY_ZOO, expert_output, routing
from transformers import AutoModelForCausalLM  # imported before the in-process pytester runs (sys.modules snapshot)

import compressors
from architectures import FAMILIES, moe_blocks
from architectures.support import support_table
from compressors import MethodSpec
from compressors.expert_slicing import prune_block
from compressors.observer import observe
from fixtures.errors import ConfigError
from fixtures.zoo import materialize_zoo_model

pytest_plugins = ("pytester",)
REPO_ROOT = Path(__file__).resolve().parent.parent
NEW_FAMILIES = ("qwen2_moe", "glm4_moe", "deepseek_v3", "phimoe", "gpt_oss", "granitemoe", "qwen3_next")
# One build per registered method (its first default scheme, or ratio 0.5): the README table's ✓ is a test.
METHODS = tuple(MethodSpec(name, compressors.get(name).default_schemes[0]) if compressors.get(name).schemes
                else MethodSpec(name, None, 0.5) for name in compressors.available())


def _load(family: str, cache: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(materialize_zoo_model(FAMILY_ZOO[family], cache),
                                                dtype=torch.float32).eval()


def test_every_family_has_a_zoo_member_and_a_table_entry() -> None:
    assert set(FAMILY_ZOO) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILY_ZOO))
def test_observer_uses_the_familys_own_routing(family: str, session_cache_dir: Path) -> None:
    """Routed counts and REAP sums of layer 0 equal the family's routing and experts written out by hand."""
    model = _load(family, session_cache_dir)
    block = moe_blocks(model)[0]
    seen: list[torch.Tensor] = []
    handle = block.module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        stats = observe(model, calibration_ids()[:1, :24]).layers[block.name]
    finally:
        handle.remove()
    x = seen[0].reshape(-1, block.hidden_size)
    index, weights = routing(family, block.module, model.config, x)
    with torch.no_grad():
        norms = torch.stack([expert_output(family, block.experts, e, x).norm(dim=-1)
                             for e in range(block.num_experts)]).double()
    routed = torch.bincount(index.reshape(-1), minlength=block.num_experts).double()
    reap = torch.zeros(block.num_experts, dtype=torch.float64)
    reap.index_add_(0, index.reshape(-1), weights.reshape(-1).double() * norms[index.reshape(-1),
                    torch.arange(x.shape[0]).repeat_interleave(index.shape[1])])
    assert torch.equal(stats.routed, routed)
    torch.testing.assert_close(stats.reap_sum, reap, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.frequency, routed / x.shape[0])


@pytest.mark.parametrize("family", sorted(FAMILY_ZOO))
def test_pruning_edits_every_tensor_indexed_by_expert(family: str, session_cache_dir: Path) -> None:
    """Every tensor of a block with an axis of E entries (fused experts and their biases, router rows and bias,
    correction biases) keeps exactly the kept experts; everything else is untouched; the model still runs."""
    model = _load(family, session_cache_dir)
    block = moe_blocks(model)[0]
    count = block.num_experts
    keep = [0, 2, 5, 7]  # two per group where routing is grouped (2 groups of 4)
    before = {k: v.clone() for k, v in block.module.state_dict().items()}
    prune_block(block, keep)
    after = block.module.state_dict()
    assert set(after) == set(before)
    for key, old in before.items():
        axes = [d for d, size in enumerate(old.shape) if size == count]
        if axes:
            index = torch.tensor(keep)
            assert torch.equal(after[key], old.index_select(axes[0], index)), key
        else:
            assert torch.equal(after[key], old), key
    with torch.no_grad():
        model(input_ids=calibration_ids()[:1, :16])


@pytest.mark.parametrize("spec", METHODS, ids=lambda s: s.label())
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_every_method_builds_and_reloads(family: str, spec: MethodSpec, session_cache_dir: Path) -> None:
    model_dir = materialize_zoo_model(FAMILY_ZOO[family], session_cache_dir)
    method = compressors.get(spec.method)
    info = compressors.moe_info(json.loads((model_dir / "config.json").read_text()))
    refusal = FAMILIES[family].refusal(spec.method)
    if refusal is not None:
        with pytest.raises(ConfigError, match="is not supported on"):
            method.validate(spec, info)
        return
    method.validate(spec, info)
    out = session_cache_dir / "family-checkpoints" / f"{family}-{spec.label()}"
    shutil.rmtree(out, ignore_errors=True)
    manifest = method.compress(model_dir, calibration() if method.needs_calibration else None, out, spec, seed=0,
                               cache_dir=session_cache_dir)
    assert manifest["verification"]["max_abs_logit_diff"] <= 1e-4
    if method.family == "quantization":
        want = "dense-fake-quant" if FAMILIES[family].repack_quantized else manifest["settings"]["format"]
        assert manifest["storage"] == want


def test_grouped_routing_refuses_a_ratio_that_breaks_its_groups(session_cache_dir: Path) -> None:
    model_dir = materialize_zoo_model(FAMILY_ZOO["deepseek_v3"], session_cache_dir)
    info = compressors.moe_info(json.loads((model_dir / "config.json").read_text()))
    assert (info.expert_groups, info.groups_selected) == (2, 1)
    with pytest.raises(ConfigError, match="not a multiple of the 2 expert groups"):
        compressors.get("reap").validate(MethodSpec("reap", None, 0.125), info)  # removes 1 of 8
    with pytest.raises(ConfigError, match=">= 2 per group"):
        compressors.get("reap").validate(MethodSpec("reap", None, 0.75), info)  # 1 left per group
    compressors.get("hcsmoe").validate(MethodSpec("hcsmoe", None, 0.125), info)  # keeps every slot


@pytest.mark.parametrize(("model", "args", "message"), [
    ("gpt-oss-tiny", ("--methods", "awq"), "awq is not supported on GPT-OSS (gpt_oss): AWQ smooths"),
    ("glm4-moe-tiny", ("--methods", "hcsmoe-shrink"), "hcsmoe-shrink is not supported on GLM-4.5"),
    ("deepseek-v3-tiny", ("--methods", "reap", "--ratios", "0.125"), "not a multiple of the 2 expert groups"),
])
def test_unsupported_family_method_stops_at_start_up(audit_project: pytest.Pytester, model: str,
                                                     args: tuple[str, ...], message: str) -> None:
    result = audit_project.runpytest("--model", model, *args, "--benchmarks", "bbq", "--safety-fractions", "0")
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, output[-2000:]
    assert message in output and "Building" not in output


@pytest.mark.parametrize(("edit", "message"), [
    ({"model_type": "hunyuan_v1_moe"}, "model_type 'hunyuan_v1_moe' is not a supported MoE family"),
    ({"text_config": {"model_type": "qwen3_moe"}, "model_type": "qwen3_vl_moe"},
     "qwen3_vl_moe is a multimodal wrapper (text model 'qwen3_moe')"),
])
def test_an_unknown_or_multimodal_family_stops_at_start_up(audit_project: pytest.Pytester, session_cache_dir: Path,
                                                           edit: dict[str, Any], message: str) -> None:
    target = audit_project.path / "other-model"
    shutil.copytree(materialize_zoo_model("qwen3-moe-tiny", session_cache_dir), target)
    config = json.loads((target / "config.json").read_text()) | edit
    (target / "config.json").write_text(json.dumps(config))
    result = audit_project.runpytest("--model", "other-model", "--methods", "reap", "--benchmarks", "bbq",
                                     "--safety-fractions", "0")
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, output[-2000:]
    assert message in output


def test_readme_support_table_is_generated_from_the_registry() -> None:
    table = support_table()
    assert table in (REPO_ROOT / "README.md").read_text(encoding="utf-8"), (
        "README's family × method table is stale: paste `python -m architectures.support`")
    assert "GPT-OSS" in table and "refused" in table
