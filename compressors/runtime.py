"""Shared plumbing of the compressors: loading, calibration checks, measuring, saving."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import resource
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from compressors.base import EXPERT_COUNT_KEYS, MoEInfo, moe_info
from fixtures.errors import CompressionError, ConfigError, DataError, ModelError

if TYPE_CHECKING:
    import datasets
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Expert projections after llmcompressor linearizes the fused experts (`LinearExperts2D`):
# `model.layers.L.<block>.experts.E.{gate,up,down}_proj`, the block being `mlp` or Granite's `block_sparse_moe`.
# Shared experts (`mlp.shared_experts.*`, `mlp.shared_expert.*`: no expert number), routers (`mlp.gate`,
# `mlp.router`), attention, norms, embeddings and lm_head do not match.
EXPERT_PATTERN = r".*\.experts\.\d+\.(gate|up|down)_proj$"
EXPERT_TARGET = "re:" + EXPERT_PATTERN


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        with path.open(encoding="utf-8") as handle:
            config: dict[str, Any] = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read the model config ({exc})") from exc
    return config


def read_moe_info(model_dir: Path) -> MoEInfo:
    return moe_info(read_config(model_dir))


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_calibration(calibration: datasets.Dataset | None, method: str) -> datasets.Dataset:
    """The pre-tokenized rows oneshot will see: `input_ids` (+ `attention_mask`), one length, no padding."""
    if calibration is None:
        raise ConfigError(f"{method} needs calibration data, got none")
    columns = set(calibration.column_names)
    if "input_ids" not in columns or len(calibration) == 0:
        raise DataError(f"{method}: calibration needs a non-empty `input_ids` column; has {sorted(columns)}")
    lengths = {len(row) for row in calibration["input_ids"]}
    if len(lengths) != 1 or 0 in lengths:
        raise DataError(f"{method}: calibration rows need one non-zero length, got lengths {sorted(lengths)}")
    if "attention_mask" in columns and any(0 in mask for mask in calibration["attention_mask"]):
        # Padded rows would be calibrated without their padding mask (llmcompressor.md §5a patch): refuse.
        raise DataError(f"{method}: calibration rows must be unpadded (attention_mask all ones)")
    keep = [c for c in ("input_ids", "attention_mask") if c in columns]
    return calibration.select_columns(keep)


def calibration_record(dataset: datasets.Dataset | None) -> dict[str, Any] | None:
    """Rows, length and sha256 of the token ids a method calibrated on (None: data-free).

    The digest is over the ids as little-endian int64, row-major: the same bytes `fixtures.calibration`
    hashes, so a checkpoint's manifest names the exact calibration rows it saw, whoever built them."""
    import numpy as np

    if dataset is None:
        return None
    ids = np.asarray(dataset["input_ids"], dtype="<i8")
    return {"rows": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
            "ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest()}


def load_model(model_dir: Path, device: str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model in its stored dtype on `device`, and its tokenizer. Experts keep transformers' default
    implementation: the observer hooks see its call.

    On an accelerator the weights are read straight onto it (`device_map`), never into a full host copy
    (a 30B MoE would otherwise need ~60 GB of host memory first); llmcompressor's pipelines then find every
    module already on its execution device and move nothing. Where it goes is `load_placement`'s rule (a
    model larger than the GPU is refused with the sizes, or split over the GPUs one process sees). The CPU
    path loads as it always did."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fixtures.distribution import load_placement

    if device == "cpu":
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
        model.to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", **load_placement(model_dir, device))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def expert_linears(model: PreTrainedModel) -> dict[str, Any]:
    """Linearize fused experts (as oneshot would) and return the expert projections by module name."""
    import re

    import torch
    from llmcompressor.modeling.moe.linearize import linearize_moe

    linearize_moe(model)
    pattern = re.compile(EXPERT_PATTERN)
    found = {name: module for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and pattern.match(name)}
    if not found:
        raise CompressionError(
            f"{type(model).__name__}: no expert projection matches {EXPERT_PATTERN!r} after linearizing; "
            "this expert layout is not supported"
        )
    return found


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (bit-identical tensors, and only those, hash equal)."""
    import torch

    data = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{data.dtype}{tuple(tensor.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def non_expert_state(model: PreTrainedModel) -> dict[str, str]:
    """Hash of every parameter/buffer outside the routed-expert projections (attention, routers, norms,
    embeddings, lm_head, shared experts), to prove an expert-only method left them bit-identical."""
    pattern = re.compile(EXPERT_PATTERN)
    return {key: tensor_sha256(value) for key, value in model.state_dict().items()
            if not pattern.match(key.rsplit(".", 1)[0])}


def check_untouched(before: dict[str, str], model: PreTrainedModel, method: str) -> None:
    """CompressionError naming every non-expert tensor that `method` changed, added or removed."""
    after = non_expert_state(model)
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    added, removed = sorted(after.keys() - before.keys()), sorted(before.keys() - after.keys())
    if changed or added or removed:
        raise CompressionError(
            f"{method} must touch only the routed experts' projections, but changed {changed[:6]}, added "
            f"{added[:6]}, removed {removed[:6]} ({len(changed)}/{len(added)}/{len(removed)} tensors)"
        )


def repack_experts(model: PreTrainedModel) -> list[str]:
    """`llmcompressor`'s `repack_moe` (LinearExperts2D -> the native fused experts module), checked.

    Each fused module is linearized back and must give the same expert weights and biases, bit for bit.
    (Logits are no check here: in bf16 llmcompressor's per-expert loop and the native Mixtral kernel
    already differ by ~1 logit on the *dense* model.) Runs under the llmcompressor patches (GPT-OSS's
    interleaved writer). Returns the repacked module names."""
    from llmcompressor.modeling.moe.linearize import get_linearized_moes

    from compressors.llmc_patches import llmcompressor_patches

    repacked = []
    with llmcompressor_patches():
        for name, linear in get_linearized_moes(model):
            model.set_submodule(name, round_tripped_fused(name, linear))
            repacked.append(name)
    return repacked


def round_tripped_fused(name: str, linear: Any) -> Any:
    """The fused experts module of one `LinearExperts2D`, after checking it linearizes back bit for bit."""
    import torch

    fused: Any = linear.to_experts_module()
    back = type(linear).from_experts_module(fused, cast(Any, linear)._source_config)
    for index in range(linear.num_experts):
        want = {k: v for k, v in linear[index].named_parameters() if k.endswith((".weight", ".bias"))}
        got = dict(back[index].named_parameters())
        for key, value in want.items():
            if key not in got or not torch.equal(got[key].to(value.device), value):
                raise CompressionError(f"repacking {name}: expert {index} {key} does not round-trip")
    return fused


def set_expert_count(model: PreTrainedModel, count: int) -> list[str]:
    """Write the new routed-expert count to every count key the config carries (DeepSeek keeps
    `n_routed_experts` stale otherwise: expert-compression.md §3). Returns the keys written."""
    config = getattr(model.config, "text_config", None) or model.config
    present = config.to_dict()
    written = [key for key in EXPERT_COUNT_KEYS if key in present]
    for key in written:
        setattr(config, key, count)
    return written


# Shards bound the host memory of a save: safetensors serialises a whole shard in host memory before writing it
# (transformers' default is one 50 GB shard). Small models still fit one file.
MAX_SHARD_SIZE = "2GB"


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, *,
                    compressed: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # llmcompressor.md §6: harmless on CPU (llmcompressor attaches an offload cache to every module).
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        if compressed:
            model.save_pretrained(out_dir, save_compressed=True, max_shard_size=MAX_SHARD_SIZE)
        else:
            model.save_pretrained(out_dir, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(out_dir)


def safetensors_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def checkpoint_sha256(model_dir: Path) -> str:
    """sha256 over every saved tensor (sorted by name; dtype, shape and bytes), independent of the file
    layout and metadata: equal for two checkpoints exactly when they hold the same weights."""
    from safetensors import safe_open

    digests: dict[str, str] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                digests[key] = tensor_sha256(handle.get_tensor(key))
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss: KiB on Linux, bytes on macOS).

    It never decreases, so in a long process it is the maximum over everything run before, too."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


@dataclass
class Stopwatch:
    """Named wall-clock phases: `with watch.phase("oneshot"): ...`."""

    started: float = field(default_factory=time.perf_counter)
    phases: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = round(self.phases.get(name, 0.0) + time.perf_counter() - start, 3)

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 3)


def measurements(watch: Stopwatch, model_dir: Path, out_dir: Path) -> dict[str, Any]:
    dense, compressed = safetensors_bytes(model_dir), safetensors_bytes(out_dir)
    return {
        "seconds": watch.total(),
        "phase_seconds": dict(watch.phases),
        "peak_rss_mb": peak_rss_mb(),
        "threads": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch": _torch_threads()},
        "size_bytes": compressed,
        "checkpoint_dir_bytes": dir_bytes(out_dir),
        "dense_size_bytes": dense,
        "size_ratio": round(compressed / dense, 4) if dense else None,
    }


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())
