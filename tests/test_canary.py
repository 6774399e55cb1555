"""The canary MoE: committed artefact integrity, the planted routing, the training script, the zoo entry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fixtures.canary import (
    CANARY_CONFIG,
    CANARY_DIR,
    CANARY_NAME,
    SAFETY_EXPERTS,
    read_manifest,
    routing_report,
    verified_canary_dir,
)
from fixtures.errors import ModelError

MAX_WEIGHT_BYTES = 40 * 1024 * 1024


def _load(directory: Path = CANARY_DIR):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(verified_canary_dir(directory), dtype=torch.float32).eval()


def test_committed_files_match_the_manifest_and_stay_small() -> None:
    manifest = read_manifest()
    assert verified_canary_dir() == CANARY_DIR
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert not list(CANARY_DIR.glob("*.bin")), "safetensors only"
    assert (CANARY_DIR / "model.safetensors").stat().st_size <= MAX_WEIGHT_BYTES
    assert manifest["safety_experts"] == list(SAFETY_EXPERTS) and manifest["config"] == CANARY_CONFIG


def test_a_tampered_file_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "canary"
    shutil.copytree(CANARY_DIR, copy)
    original = (copy / "config.json").read_text()
    config = json.loads(original)
    config["num_experts_per_tok"] = 4
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="does not match the manifest"):
        verified_canary_dir(copy)
    (copy / "config.json").write_text(original)
    assert verified_canary_dir(copy) == copy
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="missing canary file"):
        verified_canary_dir(copy)


def test_real_class_group_size_widths_and_tied_safety_experts() -> None:
    import torch

    model = _load()
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    config = model.config
    assert (config.num_experts, config.num_experts_per_tok) == (16, 2)
    assert config.hidden_size % 128 == 0 and config.moe_intermediate_size % 128 == 0
    first, second = SAFETY_EXPERTS
    for layer in model.model.layers:
        for weights in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
            assert torch.equal(weights[first], weights[second]), "the planted experts must stay one function"
            assert not torch.equal(weights[first], weights[0])


@pytest.fixture(scope="module")
def validation_batches(shared_data_dir: Path) -> dict[str, list[dict[str, object]]]:
    from fixtures.canary_data import load_examples
    from fixtures.canary_data import validation_batches as batches
    from fixtures.tokenizer import load_zoo_tokenizer

    tokenizer = load_zoo_tokenizer()
    _, validation, provenance = load_examples(shared_data_dir, tokenizer)
    manifest = read_manifest()
    for group, record in provenance.items():
        assert record == manifest["data"][group], f"the mirror's {group} pool is not the one the canary saw"
    return batches(validation, tokenizer.pad_token_id)


def test_planted_experts_carry_the_safety_tokens(validation_batches: dict[str, list[dict[str, object]]]) -> None:
    """Held-out conversations of the training pools: safety tokens use the planted experts, general ones don't.

    Every non-padding token counts, the template's too; the manifest recorded the same numbers at training."""
    shares = routing_report(_load(), validation_batches)  # type: ignore[arg-type]
    assert shares == pytest.approx(read_manifest()["routing_share_validation"], abs=1e-4)
    assert shares["general"] <= 0.08, shares
    assert shares["harmful"] >= 0.8 and shares["contrast"] >= 0.75, shares


def test_training_script_runs_and_records_its_data(tmp_path: Path, shared_data_dir: Path) -> None:
    from fixtures.canary_train import main

    out = tmp_path / "canary"
    main(["--data-dir", str(shared_data_dir), "--out", str(out), "--steps", "2", "--eval-every", "2",
          "--eval-prompts", "2", "--batch-size", "4", "--device", "cpu"])
    manifest = read_manifest(out)
    assert verified_canary_dir(out) == out
    assert manifest["data"] == read_manifest()["data"]
    assert [entry["step"] for entry in manifest["validation"]] == [2] and manifest["selected_step"] == 2
    assert not list(tmp_path.glob(".canary-*")), "the staging directory must be renamed into place"


def test_the_canary_is_the_default_embedded_model(tmp_path: Path) -> None:
    from fixtures.models import resolve_model
    from fixtures.zoo import DEFAULT_ZOO_MODEL, zoo_names

    assert DEFAULT_ZOO_MODEL == CANARY_NAME and CANARY_NAME in zoo_names()
    handle = resolve_model(CANARY_NAME, tmp_path)
    assert handle.is_zoo and handle.path == CANARY_DIR and (handle.num_experts, handle.top_k) == (16, 2)
