"""Tools around a (multi-GPU) audit run: comparing two runs' results, worker placement lines, nvidia-smi
samples, the evaluation dtype option and the device in the observer's cache key."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.perf.smi_summary import parse, summary_lines
from reports.compare import differences
from reports.compare import main as compare_main
from reports.plugin import placement_lines

pytest_plugins = ("pytester",)
GOLDEN = Path(__file__).resolve().parent / "golden" / "results_small.json"


@pytest.fixture
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(GOLDEN.read_text(encoding="utf-8"))
    return loaded


def test_compare_equal_runs_ignore_where_and_when(document: dict[str, Any]) -> None:
    other = copy.deepcopy(document)
    other["finished_at"] = "2099-01-01T00:00:00+0000"
    for index, check in enumerate(other["checks"]):
        check["nodeid"] = f"elsewhere::{index}"
        check["placement"] = {"worker": f"gw{index % 2}", "cuda_visible_devices": str(index % 2), "device": "cuda"}
    assert differences(document, other) == []


def test_compare_names_each_difference(document: dict[str, Any], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    other = copy.deepcopy(document)
    changed = other["checks"][0]
    changed["compressed"] = (changed.get("compressed") or 0.0) + 0.01
    dropped = other["checks"].pop()
    other["settings"] = {**other["settings"], "limit": 7}
    found = differences(document, other)
    assert any(line.startswith("settings:") for line in found)
    assert any(line.startswith(f"{changed['checkpoint']['id']} {changed['metric']}: compressed") for line in found)
    assert f"{dropped['checkpoint']['id']} {dropped['metric']}: only in the first run" in found
    assert len(found) == 3
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(document))
    second.write_text(json.dumps(other))
    assert compare_main([str(first), str(first)]) == 0
    assert "identical gating" in capsys.readouterr().out
    assert compare_main([str(first), str(second)]) == 1
    assert "3 difference(s)" in capsys.readouterr().out
    second.write_text("{not json")
    assert compare_main([str(first), str(second)]) == 2


def test_placement_lines_group_checkpoints_by_worker() -> None:
    def record(checkpoint: str, worker: str, gpu: int | None) -> dict[str, Any]:
        place: dict[str, Any] = {"worker": worker, "cuda_visible_devices": None if gpu is None else str(gpu),
                                 "device": "cpu" if gpu is None else "cuda"}
        if gpu is not None:
            place.update(current_device=0, device_name="NVIDIA H200")
        return {"checkpoint": {"id": checkpoint}, "placement": place}

    records = [record("a", "gw1", 1), record("a", "gw1", 1), record("b", "gw0", 0), record("c", "gw1", 1),
               {"checkpoint": {"id": "d"}}]  # a check that errored before placement was known
    assert placement_lines(records) == [
        "worker gw0 (CUDA_VISIBLE_DEVICES=0) on cuda:0 NVIDIA H200: 1 checkpoint(s): b",
        "worker gw1 (CUDA_VISIBLE_DEVICES=1) on cuda:0 NVIDIA H200: 2 checkpoint(s): a, c",
    ]
    assert placement_lines([record("x", "main", None)]) == [
        "worker main (CUDA_VISIBLE_DEVICES=None) on cpu: 1 checkpoint(s): x"]


def test_smi_summary_per_gpu() -> None:
    lines = ["2026/11/23 20:00:00.000, 0, 90 %, 2048 MiB", "2026/11/23 20:00:00.000, 1, 0 %, 1024 MiB",
             "2026/11/23 20:00:01.000, 0, 30 %, 4096 MiB", "2026/11/23 20:00:01.000, 1, 60 %, 1024 MiB",
             "2026/11/23 20:00:02.000, 1, 6"]  # cut off by the kill at the end of a run
    samples = parse(lines)
    assert samples == {0: [(90.0, 2048.0), (30.0, 4096.0)], 1: [(0.0, 1024.0), (60.0, 1024.0)]}
    assert summary_lines(samples) == [
        "GPU 0: 2 samples, mean utilisation 60.0%, busy (>0%) 100% of samples, >50% 50%, peak memory 4.0 GiB",
        "GPU 1: 2 samples, mean utilisation 30.0%, busy (>0%) 50% of samples, >50% 50%, peak memory 1.0 GiB",
    ]


def test_dtype_option_resolves_with_the_device(audit_project: pytest.Pytester) -> None:
    from fixtures.session import AuditSession
    from fixtures.settings import AuditConfig

    base = dict(model="qwen3-moe-tiny", data_dir=None, methods=("reap",), schemes=None, ratios=None,
                safety_fractions=(0.0,), seeds=(0,), benchmarks=("crows_pairs",), limit=None, calibration="auto",
                cache_dir=audit_project.path / "cache", thresholds=Path("thresholds.toml"),
                report_dir=audit_project.path, eval_batch_size=1,
                eval_seed=0, trust_remote_code=False)
    dtypes = {(device, dtype): AuditSession(AuditConfig(**base, device=device, dtype=dtype), None).dtype  # type: ignore[arg-type]
              for device in ("cpu", "cuda", "cuda:1") for dtype in ("auto", "float16")}
    assert dtypes == {("cpu", "auto"): "float32", ("cuda", "auto"): "bfloat16", ("cuda:1", "auto"): "bfloat16",
                      ("cpu", "float16"): "float16", ("cuda", "float16"): "float16", ("cuda:1", "float16"): "float16"}
    result = audit_project.runpytest_subprocess("--dtype", "fp8", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--dtype: unknown 'fp8'; valid: auto, float32, bfloat16, float16" in result.stderr.str()


def test_observer_key_depends_on_the_device_type(tmp_path: Path) -> None:
    import torch

    from compressors.observer import observer_key

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    ids = torch.arange(12).reshape(3, 4)
    assert observer_key(tmp_path, ids) == observer_key(tmp_path, ids, "cpu")
    assert observer_key(tmp_path, ids, "cuda") != observer_key(tmp_path, ids, "cpu")
