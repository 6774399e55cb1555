"""Tests of expert compression: REAP, frequency and EAN pruning and HC-SMoE merging (compressors/
expert_pruning.py, hcsmoe.py, expert_slicing.py) — known answers, properties on single MoE blocks of the four
architectures, every method x ratio on the zoo, and REAP against llmcompressor's REAPPruningModifier."""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compressors
from architectures.blocks import MoEBlock, moe_blocks
from compressors import MethodSpec, MoEInfo, moe_info
from compressors import observer as observer_module
from compressors.expert_pruning import REAPCompressor, lowest, recording_reap_modifier
from compressors.expert_slicing import copies, prune_block, remap_block
from compressors.hcsmoe import average_linkage_clusters, merge_terms, router_terms
from compressors.llmc_patches import run_oneshot
from fixtures.errors import CompressionError, ConfigError
from fixtures.settings import CheckpointSpec
from fixtures.zoo import read_config
from tests.expert_helpers import ZOO_NAMES, Built, build, calibration, calibration_ids, edited_zoo, load, logits, zoo

EC_METHODS = ("reap", "reap-softmax", "frequency", "ean", "hcsmoe", "hcsmoe-shrink")
INFO_8_TOP2 = MoEInfo("qwen3_moe", num_experts=8, top_k=2, num_layers=2, shared_experts=0)
PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------------------
# registry, ratios, ids
# ----------------------------------------------------------------------------------------------------------
def test_every_expert_method_is_registered_with_default_ratios() -> None:
    for name in EC_METHODS:
        method = compressors.get(name)
        assert (method.family, method.default_ratios, method.needs_calibration) == ("expert", (0.25, 0.5), True)
        assert method.expand() == (MethodSpec(name, None, 0.25), MethodSpec(name, None, 0.5))
        for ratio in (0.25, 0.5, 0.75):
            method.validate(MethodSpec(name, None, ratio), INFO_8_TOP2)
        with pytest.raises(ConfigError, match=r"removes 7 of 8 experts per layer, leaving 1 < top_k=2"):
            method.validate(MethodSpec(name, None, 0.875), INFO_8_TOP2)
    with pytest.raises(ConfigError, match="backend must be"):
        REAPCompressor(backend="vllm")


def test_audit_ids_read_well() -> None:
    assert CheckpointSpec(MethodSpec("reap", None, 0.5), 0.0, 0).id == "reap-r50-safety0-seed0"
    assert CheckpointSpec(MethodSpec("hcsmoe", None, 0.25), 1.0, 1).id == "hcsmoe-r25-safety100-seed1"
    assert CheckpointSpec(MethodSpec("hcsmoe-shrink", None, 0.5), 0.118, 0).id == "hcsmoe-shrink-r50-safety11.8-seed0"


def test_lowest_scores_break_ties_towards_the_lower_index() -> None:
    assert lowest(torch.tensor([3.0, 0.0, 2.0, 0.0, 1.0]), 2) == [1, 3]
    assert lowest(torch.tensor([3.0, 0.0, 2.0, 0.0, 1.0]), 3) == [1, 3, 4]
    assert lowest(torch.tensor([1.0, 1.0, 1.0, 1.0]), 2) == [0, 1]


# ----------------------------------------------------------------------------------------------------------
# HC-SMoE clustering and merge weights
# ----------------------------------------------------------------------------------------------------------
@PROPERTY
@given(experts=st.integers(2, 12), data=st.data())
def test_clusters_equal_scipy_average_linkage(experts: int, data: st.DataObject) -> None:
    import numpy as np
    from scipy.cluster.hierarchy import cut_tree, fcluster, linkage

    seed, k = data.draw(st.integers(0, 2**31 - 1)), data.draw(st.integers(1, experts))
    features = np.random.default_rng(seed).normal(size=(experts, 6))
    ours = average_linkage_clusters(features, k)
    tree = linkage(features, method="average", metric="euclidean")

    def partition(labels: Sequence[int]) -> set[frozenset[int]]:
        return {frozenset(i for i, label in enumerate(labels) if label == c) for c in set(labels)}

    assert len(ours) == k and sorted(i for c in ours for i in c) == list(range(experts))
    assert {frozenset(c) for c in ours} == partition(fcluster(tree, k, criterion="maxclust"))
    assert {frozenset(c) for c in ours} == partition(cut_tree(tree, n_clusters=k)[:, 0].tolist())
    assert ours == sorted(ours, key=lambda c: c[0]) and all(c == sorted(c) for c in ours)


def test_merge_weights_by_routing_frequency() -> None:
    eps = torch.finfo(torch.float32).eps
    frequency = torch.tensor([0.5, 0.25, 0.0, 0.75, 0.0, 0.5], dtype=torch.float64)
    clusters = [[0, 1], [2, 4], [3], [5]]
    assert merge_terms(clusters, frequency) == [[(0, 0.5 / (0.75 + eps)), (1, 0.25 / (0.75 + eps))],
                                                [(2, 0.0), (4, 0.0)], [(3, 1.0)], [(5, 1.0)]]
    assert router_terms(clusters, frequency) == [[(0, 2 / 3), (1, 1 / 3)], [(2, 0.5), (4, 0.5)], [(3, 1.0)],
                                                 [(5, 1.0)]]


# ----------------------------------------------------------------------------------------------------------
# properties on single blocks of the four architectures (no model, no save: fast)
# ----------------------------------------------------------------------------------------------------------
BLOCKS = {
    "qwen3_moe": ("Qwen3MoeSparseMoeBlock", {"num_experts": 6, "num_experts_per_tok": 2,
                                             "moe_intermediate_size": 8, "norm_topk_prob": True}),
    "ernie4_5_moe": ("Ernie4_5_MoeSparseMoeBlock", {"moe_num_experts": 6, "moe_k": 2, "moe_intermediate_size": 8,
                                                    "moe_num_shared_experts": 1}),
    "olmoe": ("OlmoeSparseMoeBlock", {"num_experts": 6, "num_experts_per_tok": 2, "intermediate_size": 8,
                                      "norm_topk_prob": False}),
    "mixtral": ("MixtralSparseMoeBlock", {"num_local_experts": 6, "num_experts_per_tok": 2, "intermediate_size": 8}),
}
ARCHS = st.sampled_from(sorted(BLOCKS))
SEEDS = st.integers(0, 2**31 - 1)


def small_block(arch: str, seed: int) -> MoEBlock:
    """A 6-expert top-2 MoE block of `arch` (hidden 16) with seeded random weights and correction bias."""
    from transformers import AutoConfig

    class_name, kwargs = BLOCKS[arch]
    config = AutoConfig.for_model(arch, hidden_size=16, **kwargs)
    config._experts_implementation = "eager"
    block_class = getattr(importlib.import_module(f"transformers.models.{arch}.modeling_{arch}"), class_name)
    module = block_class(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            scale = 0.05 if "correction" in name else 0.5
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    (block,) = moe_blocks(module)
    return block


def expert_state(block: MoEBlock) -> dict[str, torch.Tensor]:
    return {f"{id(owner)}.{attr}": getattr(owner, attr).detach().clone()
            for owner, attr, _ in block.per_expert_tensors()}


def run(block: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return block.module(x)


def counts(block: MoEBlock) -> set[int]:
    return {getattr(owner, attr) for owner in (block.module, block.router, block.experts)
            for attr in ("num_experts", "n_routed_experts", "num_local_experts") if hasattr(owner, attr)}


def per_expert_bytes(block: MoEBlock) -> int:
    return sum(getattr(o, a).numel() * getattr(o, a).element_size() for o, a, _ in block.per_expert_tensors())


@PROPERTY
@given(arch=ARCHS, seed=SEEDS, data=st.data())
def test_pruning_keeps_weights_and_router_rows(arch: str, seed: int, data: st.DataObject) -> None:
    block = small_block(arch, seed)
    keep = sorted(data.draw(st.sets(st.integers(0, 5), min_size=2, max_size=6)))
    before, size = expert_state(block), per_expert_bytes(block)
    prune_block(block, keep)
    for (key, old), (owner, attr, dim) in zip(before.items(), block.per_expert_tensors(), strict=True):
        assert torch.equal(getattr(owner, attr), old.index_select(dim, torch.tensor(keep))), key
    assert counts(block) == {len(keep)} and block.router.weight.shape[0] == len(keep)
    assert per_expert_bytes(block) * 6 == size * len(keep)  # smaller by exactly the ratio removed
    assert run(block, torch.randn(1, 5, 16)).shape == (1, 5, 16)
    with pytest.raises(CompressionError, match="distinct and ascending"):
        prune_block(block, [1, 0])


@PROPERTY
@given(arch=ARCHS, seed=SEEDS, silent=st.integers(0, 5))
def test_pruning_an_expert_without_routing_mass_keeps_outputs(arch: str, seed: int, silent: int) -> None:
    block = small_block(arch, seed)
    x = torch.rand(1, 7, 16, generator=torch.Generator().manual_seed(seed)) + 0.1  # positive inputs
    with torch.no_grad():
        block.router.weight[silent] = -1000.0  # logit <= -1600: softmax probability exactly 0
        statics = getattr(block.router, "moe_statics", None)
        if statics is not None:
            statics.e_score_correction_bias[0, silent] = -1.0
    dense = run(block, x)
    prune_block(block, [e for e in range(6) if e != silent])
    # Float rounding only: the router and experts matmuls change shape (6 -> 5 rows), so sums may group
    # differently by an ulp or two; leaked routing mass would move outputs by orders of magnitude more.
    torch.testing.assert_close(run(block, x), dense, rtol=4e-6, atol=1e-6)


@PROPERTY
@given(arch=ARCHS, seed=SEEDS, pair=st.sets(st.integers(0, 5), min_size=2, max_size=2),
       frequency=st.lists(st.floats(0.05, 1.0), min_size=6, max_size=6))
def test_merging_identical_experts_keeps_outputs(arch: str, seed: int, pair: set[int],
                                                 frequency: list[float]) -> None:
    block = small_block(arch, seed)
    a, b = sorted(pair)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            getattr(block.experts, name)[b] = getattr(block.experts, name)[a]
    x = torch.randn(1, 9, 16, generator=torch.Generator().manual_seed(seed))
    dense, router = run(block, x), block.router.weight.detach().clone()
    clusters = sorted([[a, b], *([e] for e in range(6) if e not in pair)])
    merged = merge_terms(clusters, torch.tensor(frequency, dtype=torch.float64))
    owner = {i: c for c, members in enumerate(clusters) for i in members}
    remap_block(block, [merged[owner[i]] for i in range(6)], None)  # hcsmoe default: every router row kept
    assert torch.equal(block.router.weight, router) and counts(block) == {6}
    # W_C = W·Σf/(Σf + eps): weights change by eps/Σf <= 1.2e-6 (relative), outputs by ~1e-5
    torch.testing.assert_close(run(block, x), dense, rtol=1e-4, atol=1e-4)


@PROPERTY
@given(arch=ARCHS, seed=SEEDS, labels=st.lists(st.integers(0, 3), min_size=6, max_size=6),
       frequency=st.lists(st.sampled_from([0.0, 0.1, 0.3, 0.7]), min_size=6, max_size=6))
def test_shrunk_router_rows_are_the_documented_combination(arch: str, seed: int, labels: list[int],
                                                           frequency: list[float]) -> None:
    clusters = sorted([[e for e in range(6) if labels[e] == c] for c in set(labels)], key=lambda m: m[0])
    if len(clusters) < 2:  # top-2 needs two clusters
        clusters = [[0], [1, 2, 3, 4, 5]]
    block = small_block(arch, seed)
    f = torch.tensor(frequency, dtype=torch.float64)
    dense_rows, size = block.router.weight.detach().clone(), per_expert_bytes(block)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(seed))
    member_logits = x @ dense_rows.T
    remap_block(block, merge_terms(clusters, f), router_terms(clusters, f))
    rows = block.router.weight.detach()
    assert counts(block) == {len(clusters)} and per_expert_bytes(block) * 6 == size * len(clusters)
    for c, members in enumerate(clusters):
        if len(members) == 1:
            assert torch.equal(rows[c], dense_rows[members[0]])  # singletons untouched, bit for bit
            continue
        total = float(f[members].sum())
        q = f[members] / total if total > 0 else torch.full((len(members),), 1 / len(members), dtype=torch.float64)
        torch.testing.assert_close(rows[c].double(), (q[:, None] * dense_rows[members].double()).sum(0))
        z, zc = member_logits[:, members], x @ rows[c]
        assert bool((zc >= z.min(dim=1).values - 1e-5).all() and (zc <= z.max(dim=1).values + 1e-5).all())
        assert bool((zc <= torch.logsumexp(z, dim=1) + 1e-5).all())
    assert run(block, x[None]).shape == (1, 40, 16)


def test_unsupported_expert_layout_is_refused() -> None:
    class Experts(torch.nn.Module):
        is_transposed, has_bias = True, True

        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 8, 16))
            self.down_proj = torch.nn.Parameter(torch.zeros(4, 8, 8))

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts, self.router = Experts(), torch.nn.Linear(8, 4)

    with pytest.raises(CompressionError, match="unsupported expert layout"):
        moe_blocks(Block())  # type: ignore[arg-type]
    with pytest.raises(CompressionError, match="no MoE block"):
        moe_blocks(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(CompressionError, match="every new expert needs terms"):
        remap_block(small_block("qwen3_moe", 0), copies([0, 9]), copies([0, 9]))


# ----------------------------------------------------------------------------------------------------------
# every method x ratio on the zoo
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def built(session_cache_dir: Path) -> Callable[[str, str, float], Built]:
    return lambda name, method, ratio: build(session_cache_dir, zoo(session_cache_dir, name),
                                             MethodSpec(method, None, ratio))


def expert_maps(manifest: dict[str, Any], layer: str) -> tuple[list[Any], list[Any] | None]:
    """(expert map, router map or None) of one layer, rebuilt from the manifest alone."""
    if "kept_experts" in manifest:
        keep = manifest["kept_experts"][layer]
        return copies(keep), copies(keep)
    clusters, f = manifest["clusters"][layer], torch.tensor(manifest["frequency"][layer], dtype=torch.float64)
    merged = merge_terms(clusters, f)
    if manifest["router"] == "shrunk":
        return merged, router_terms(clusters, f)
    owner = {i: c for c, members in enumerate(clusters) for i in members}
    return [merged[owner[i]] for i in range(len(f))], None


def remapped(tensor: torch.Tensor, dim: int, mapping: Sequence[Sequence[tuple[int, float]]]) -> torch.Tensor:
    """Test-side merge: Σ weight·tensor[i] in float64 along `dim` (a single weight-1 term is a copy)."""
    return torch.stack([sum(w * tensor.select(dim, i).double() for i, w in terms).to(tensor.dtype)  # type: ignore[union-attr]
                        for terms in mapping], dim=dim)


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize("method", EC_METHODS)
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_method_builds_verifies_and_reloads(name: str, method: str, ratio: float,
                                            built: Callable[[str, str, float], Built]) -> None:
    result = built(name, method, ratio)
    manifest, removed = result.manifest, int(8 * ratio)
    json.dumps(manifest)
    after = 8 if method == "hcsmoe" else 8 - removed
    assert (manifest["experts_before"], manifest["experts_after"], manifest["experts_removed_per_layer"]) == (
        8, after, removed)
    assert manifest["verification"]["load_report"] == "clean" and manifest["verification"]["num_experts"] == after
    assert manifest["verification"]["max_abs_logit_diff"] <= 1e-4
    assert moe_info(read_config(result.path)).num_experts == after
    assert manifest["observer"]["key"] == built(name, "reap", 0.5).manifest["observer"]["key"]
    assert 0 < manifest["method_seconds"] <= manifest["seconds"]
    dense, compressed = load(result.dense).state_dict(), load(result.path).state_dict()
    assert dense.keys() == compressed.keys()
    edited = 0
    for key, value in dense.items():
        layer = key.split(".mlp.")[0] + ".mlp"
        experts, router = expert_maps(manifest, layer) if ".mlp." in key else (None, None)
        if ".mlp.experts." in key:
            want = remapped(value, 0, experts)  # type: ignore[arg-type]
        elif router is not None and key.endswith(".mlp.gate.weight"):
            want = remapped(value, 0, router)
        elif router is not None and key.endswith("e_score_correction_bias"):  # ERNIE [1, E]
            want = remapped(value, 1, router)
        else:  # attention, norms, embeddings, shared experts, unchanged router rows
            assert torch.equal(compressed[key], value), f"{key} changed by {method}"
            continue
        edited += 1
        assert torch.equal(compressed[key], want), f"{key} is not the documented map of the dense tensor"
    per_layer = 2 if method == "hcsmoe" else (4 if name.startswith("ernie") else 3)
    assert edited == 2 * per_layer


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_hcsmoe_clusters_equal_scipy_on_the_observer_features(name: str, session_cache_dir: Path,
                                                              built: Callable[[str, str, float], Built]) -> None:
    from scipy.cluster.hierarchy import fcluster, linkage

    result = built(name, "hcsmoe", 0.5)
    model_dir = zoo(session_cache_dir, name)
    observation, record = observer_module.observation_for(load(model_dir), model_dir, calibration(),
                                                          session_cache_dir)
    assert record["key"] == result.manifest["observer"]["key"] and record["reused"]
    for layer, clusters in result.manifest["clusters"].items():
        labels = fcluster(linkage(observation.layers[layer].mean_output.numpy(), "average"), 4, "maxclust")
        assert sorted(clusters) == sorted(sorted(int(i) for i in (labels == c).nonzero()[0]) for c in set(labels))
        assert result.manifest["clusters"] == built(name, "hcsmoe-shrink", 0.5).manifest["clusters"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["reap", "hcsmoe", "hcsmoe-shrink"])
def test_checkpoint_is_smaller_by_the_ratio(method: str, built: Callable[[str, str, float], Built]) -> None:
    from safetensors.torch import load_file

    def expert_bytes(path: Path) -> int:
        tensors = load_file(str(path / "model.safetensors"))
        return sum(t.numel() * t.element_size() for k, t in tensors.items()
                   if ".experts." in k or ".gate." in k or "e_score_correction_bias" in k)

    for ratio in (0.25, 0.5):
        result = built("ernie45-moe-tiny", method, ratio)
        kept = 8 if method == "hcsmoe" else 8 - int(8 * ratio)
        assert expert_bytes(result.path) * 8 == expert_bytes(result.dense) * kept
        assert (result.manifest["size_ratio"] == 1.0) == (method == "hcsmoe")


@pytest.mark.slow
def test_second_method_or_ratio_runs_no_calibration_pass(tmp_path: Path, session_cache_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = zoo(session_cache_dir, "mixtral-tiny")
    first = compressors.get("reap").compress(model_dir, calibration(), tmp_path / "a", MethodSpec("reap", None, 0.25),
                                             seed=0, cache_dir=tmp_path / "cache")
    assert first["observer"]["reused"] is False

    def no_pass(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the observer pass ran again")

    monkeypatch.setattr(observer_module, "observe", no_pass)
    for method, ratio in (("hcsmoe-shrink", 0.5), ("frequency", 0.75), ("ean", 0.5)):
        manifest = compressors.get(method).compress(model_dir, calibration(), tmp_path / method,
                                                    MethodSpec(method, None, ratio), seed=0,
                                                    cache_dir=tmp_path / "cache")
        assert manifest["observer"]["reused"] is True and manifest["observer"]["key"] == first["observer"]["key"]
        assert manifest["observer"]["pass_seconds"] == first["observer"]["pass_seconds"]


# ----------------------------------------------------------------------------------------------------------
# known answers on zoo models
# ----------------------------------------------------------------------------------------------------------
SILENT, TWINS = 5, (1, 6)


def silence_expert(model: Any) -> None:
    """Expert SILENT of every layer gets no routing mass: hidden dim 0 is a constant 0.1 in the residual
    stream (embedding column 0 = 0.1, the scale of the other dims; attention, experts and shared experts write
    nothing to it), so it is > 0 after the norm, and SILENT's router row is -1e4 on it alone (ERNIE: its
    correction bias -1 too). The other experts keep varied routing, so SILENT is the one never routed."""
    model.model.embed_tokens.weight[:, 0] = 0.1
    for layer in model.model.layers:
        mlp = layer.mlp
        layer.self_attn.o_proj.weight[0] = 0.0
        mlp.experts.down_proj[:, 0] = 0.0
        if getattr(mlp, "shared_experts", None) is not None:
            mlp.shared_experts.down_proj.weight[0] = 0.0
        mlp.gate.weight[SILENT] = 0.0
        mlp.gate.weight[SILENT, 0] = -1e4
        if getattr(mlp.gate, "moe_statics", None) is not None:
            mlp.gate.moe_statics.e_score_correction_bias[0, SILENT] = -1.0


def twin_experts(model: Any) -> None:
    for layer in model.model.layers:
        for tensor in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
            tensor[TWINS[1]] = tensor[TWINS[0]]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_pruning_an_expert_without_routing_mass_keeps_logits(name: str, session_cache_dir: Path) -> None:
    model_dir = edited_zoo(session_cache_dir, name, "silent", silence_expert)
    ids = calibration_ids()[:4]
    dense = logits(load(model_dir), ids)
    for method in ("reap", "frequency", "ean"):
        result = build(session_cache_dir, model_dir, MethodSpec(method, None, 0.125))
        assert result.manifest["dropped_experts"] == {layer: [SILENT] for layer in result.manifest["dropped_experts"]}
        assert all(routed[SILENT] == 0 for routed in result.manifest["routed_slots"].values())
        torch.testing.assert_close(logits(load(result.path), ids), dense, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_merging_identical_experts_keeps_logits(name: str, session_cache_dir: Path) -> None:
    model_dir = edited_zoo(session_cache_dir, name, "twins", twin_experts)
    result = build(session_cache_dir, model_dir, MethodSpec("hcsmoe", None, 0.125))
    assert all(list(TWINS) in clusters for clusters in result.manifest["clusters"].values())
    ids = calibration_ids()[:4]
    torch.testing.assert_close(logits(load(result.path), ids), logits(load(model_dir), ids), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# REAP against llmcompressor's REAPPruningModifier (the reference) and the single pass
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("name", "ratio"), [*((n, 0.5) for n in ZOO_NAMES), ("ernie45-moe-tiny", 0.25)])
def test_reap_equals_llmcompressor_modifier(name: str, ratio: float, tmp_path: Path,
                                            built: Callable[[str, str, float], Built]) -> None:
    ours = built(name, "reap", ratio)
    spec = MethodSpec("reap", None, ratio)
    reference = REAPCompressor(backend="llmcompressor").compress(ours.dense, calibration(), tmp_path / "ref", spec,
                                                                 seed=0)
    assert reference["backend"] == "llmcompressor" and ours.manifest["backend"] == "observer"
    assert ours.manifest["kept_experts"] == reference["kept_experts"]
    assert ours.manifest["routed_slots"] == reference["routed_slots"]
    for layer, saliency in reference["saliency"].items():
        torch.testing.assert_close(torch.tensor(ours.manifest["saliency"][layer]), torch.tensor(saliency),
                                   rtol=1e-5, atol=1e-7)
    mine, theirs = load(ours.path).state_dict(), load(tmp_path / "ref").state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.slow
def test_reap_scores_every_layer_on_the_dense_model(tmp_path: Path,
                                                    built: Callable[[str, str, float], Built]) -> None:
    """Control: the modifier's default error propagation (layer 1 scored after layer 0 was pruned) gives other
    layer-1 saliencies than the single dense pass the REAP paper uses (our default, checked above)."""
    from transformers import AutoTokenizer

    ours = built("qwen3-moe-tiny", "reap", 0.5)
    model, tokenizer = load(ours.dense), AutoTokenizer.from_pretrained(ours.dense)
    recipe = recording_reap_modifier(0.5, str(tmp_path / "kept.json"))
    run_oneshot(model, tokenizer, calibration(), recipe, calibrate_all_experts=False, propagate_error=True)
    layer0, layer1 = "model.layers.0.mlp", "model.layers.1.mlp"
    saliency = {layer: torch.tensor(ours.manifest["saliency"][layer], dtype=torch.float64) for layer in (layer0,
                                                                                                         layer1)}
    torch.testing.assert_close(torch.tensor(recipe._records[layer0]["saliency"], dtype=torch.float64),
                               saliency[layer0], rtol=1e-5, atol=1e-7)
    propagated = torch.tensor(recipe._records[layer1]["saliency"], dtype=torch.float64)
    assert not torch.allclose(propagated, saliency[layer1], rtol=1e-3)
    assert math.isfinite(float(propagated.sum()))
