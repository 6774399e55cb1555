"""Tools around a (multi-GPU) audit run: comparing two runs' results, worker placement lines, nvidia-smi
samples, the evaluation dtype option and the device in the observer's cache key."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.perf import cache_times
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
    from fixtures.runtime import eval_dtype

    dtypes = {(device, dtype): eval_dtype(dtype, device)
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


def test_cache_times_sum_build_seconds_per_kind(tmp_path: Path) -> None:
    for kind, key, seconds in (("results", "a", 3.0), ("results", "b", 1.5), ("checkpoints", "c", 2.0)):
        (tmp_path / kind / key).mkdir(parents=True)
        (tmp_path / kind / key / "manifest.json").write_text(json.dumps({"cache": {"build_seconds": seconds}}))
    (tmp_path / "tmp" / "partial").mkdir(parents=True)  # an interrupted build: no manifest, not counted
    times = cache_times.build_seconds(tmp_path)
    assert times == {"results": [3.0, 1.5], "checkpoints": [2.0]}
    assert cache_times.summary_lines(times) == ["results: 2 built, 4.5 s in all, longest 3.0 s",
                                               "checkpoints: 1 built, 2.0 s in all, longest 2.0 s"]
    assert cache_times.main([str(tmp_path / "tmp")]) == 1


def test_compare_atol_accepts_moved_digits_not_moved_verdicts(document: dict[str, Any], tmp_path: Path) -> None:
    other = copy.deepcopy(document)
    check = next(c for c in other["checks"] if isinstance(c.get("compressed"), float))
    check["compressed"] += 1e-6
    assert len(differences(document, other)) == 1
    assert differences(document, other, atol=2e-6) == []
    check["verdict"] = "fail" if check["verdict"] != "fail" else "pass"
    assert len(differences(document, other, atol=1.0)) == 1  # a verdict is text: never within a tolerance
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(document))
    second.write_text(json.dumps(other))
    with pytest.raises(SystemExit):
        compare_main(["--atol", "-1", str(first), str(second)])


@pytest.mark.parametrize("name", ["h100-qwen3-30b-a3b.json", "h100-qwen3-30b-a3b-run2.json",
                                  "h200-qwen3-30b-a3b-run3.json"])
def test_stored_gpu_results_render(name: str) -> None:
    """docs/performance.md says each stored GPU run re-renders with `python -m benchmarks.perf.summary FILE`."""
    from benchmarks.perf.summary import summarize

    report = json.loads((Path(__file__).resolve().parent.parent / "benchmarks/perf/results" / name).read_text())
    text = summarize(report)
    assert "| bbq | 17,628 |" in text and "| bbq | " in text.split("same items")[1]
    assert "speedup" in text
