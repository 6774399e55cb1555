"""`fixtures.distribution.load_placement` decides where the HF loaders put a checkpoint; tested on the CPU with
fake GPU memory figures.

Why fake figures and a stopped load: the decision and what reaches `from_pretrained` are what can be wrong
here; the several-GPU load itself is accelerate's and needs GPUs (a separate issue). So each loader is called
for `--device cuda` with `gpu_free_bytes` replaced and `from_pretrained` replaced by a recorder that stops the
load: the test sees exactly the placement kwargs each loader would hand to transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fixtures import distribution
from fixtures.distribution import checkpoint_bytes, load_placement
from fixtures.zoo import materialize_zoo_model


class _Stopped(Exception):
    def __init__(self, kwargs: dict[str, Any]) -> None:
        super().__init__("load stopped by the test")
        self.kwargs = kwargs


@pytest.fixture(scope="module")
def model_dir(session_cache_dir: Path) -> Path:
    return materialize_zoo_model("qwen3-moe-tiny", session_cache_dir)


def test_load_placement_follows_the_free_memory(model_dir: Path) -> None:
    size = checkpoint_bytes(model_dir)
    assert size > 1_000_000
    assert load_placement(model_dir, "cpu") == {}
    assert load_placement(model_dir, "cuda:1", free=[0]) == {"device_map": "cuda:1"}  # asked for: as asked
    assert load_placement(model_dir, "cuda", free=[2 * size, size]) == {"device_map": "cuda"}  # the current GPU
    split = load_placement(model_dir, "cuda", free=[size, size])  # 80% of each: neither alone, both together
    assert split == {"device_map": "auto", "max_memory": {0: int(size * 0.8), 1: int(size * 0.8)}}
    # GPU 1 alone would do, but the caller's tensors are on GPU 0 (the current one): split from GPU 0
    assert load_placement(model_dir, "cuda", free=[size, 2 * size])["max_memory"] == {0: int(size * 0.8),
                                                                                      1: int(size * 1.6)}
    with pytest.raises(ValueError, match="does not fit 2 GPU"):
        load_placement(model_dir, "cuda", free=[size // 2, size // 2])
    with pytest.raises(ValueError, match="no GPU is visible"):
        load_placement(model_dir, "cuda", free=[])


@pytest.fixture
def stopped_loads(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> int:
    """Two fake GPUs of 1.1x the checkpoint (0.88x usable each: a split; GPU 0 current), and a recording
    from_pretrained."""
    from transformers import AutoModelForCausalLM

    size = checkpoint_bytes(model_dir)
    monkeypatch.setattr(distribution, "gpu_free_bytes", lambda: [int(size * 1.1)] * 2)
    monkeypatch.setattr(distribution, "_current_gpu", lambda: 0)

    def record(path: Any, *args: Any, **kwargs: Any) -> Any:
        raise _Stopped(kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", staticmethod(record))
    return int(int(size * 1.1) * 0.8)


def _assert_split(kwargs: dict[str, Any], usable: int) -> None:
    assert kwargs["device_map"] == "auto" and kwargs["max_memory"] == {0: usable, 1: usable}


def test_compression_loader_splits_the_model(stopped_loads: int, model_dir: Path) -> None:
    from compressors.runtime import load_model

    with pytest.raises(_Stopped) as stopped:
        load_model(model_dir, "cuda")
    _assert_split(stopped.value.kwargs, stopped_loads)


def test_drift_loader_splits_the_model(stopped_loads: int, model_dir: Path) -> None:
    from benchmarks.generation import load_causal_lm

    with pytest.raises(_Stopped) as stopped:
        load_causal_lm(model_dir, "cuda", "bfloat16")
    _assert_split(stopped.value.kwargs, stopped_loads)
    assert stopped.value.kwargs["experts_implementation"] == "grouped_mm"


@pytest.mark.parametrize("scorer", ["shared", "hf"])
def test_lmeval_loader_preloads_a_split_model(stopped_loads: int, model_dir: Path, scorer: str) -> None:
    from benchmarks.lmeval_runner import load_lm
    from fixtures.errors import ModelError

    args = {"pretrained": str(model_dir), "dtype": "bfloat16", "softmax_dtype": "float32", "max_length": 2048}
    with pytest.raises(ModelError, match="load stopped by the test") as failed:
        load_lm(args, device="cuda", batch_size=8, scorer=scorer)
    assert isinstance(failed.value.__cause__, _Stopped)
    _assert_split(failed.value.__cause__.kwargs, stopped_loads)


def test_a_model_larger_than_the_one_gpu_is_refused_with_its_size(monkeypatch: pytest.MonkeyPatch,
                                                                  model_dir: Path) -> None:
    """An xdist worker sees one GPU: too small is a clear error before any weight is read, not CUDA OOM."""
    from compressors.runtime import load_model

    monkeypatch.setattr(distribution, "gpu_free_bytes", lambda: [checkpoint_bytes(model_dir) // 2])
    monkeypatch.setattr(distribution, "_current_gpu", lambda: 0)
    with pytest.raises(ValueError, match=r"does not fit 1 GPU\(s\)"):
        load_model(model_dir, "cuda")
