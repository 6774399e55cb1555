"""The merged compression results never hide a grid gap: unbuilt settings become `not run` records."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.perf.compress_results import GRID, GRID_LABEL, main, merged


def _run(records: list[dict[str, object]]) -> dict[str, object]:
    return {"model": {"layers": 16}, "projection": {"factor": 2.0, "basis": "x"}, "records": records}


def test_every_grid_setting_is_accounted_for() -> None:
    built = {"method": "gptq", "setting": "w4a16", "status": "built"}
    payload = merged([(GRID_LABEL, _run([built]))], [f"{GRID_LABEL}/sparsegpt/s50/170/cut"])
    rows = {(r["method"], r["setting"]): r for r in payload["records"] if r["run"] == GRID_LABEL}
    assert set(rows) == set(GRID)
    assert rows[("gptq", "w4a16")]["status"] == "built"
    assert rows[("sparsegpt", "s50")] == {"run": GRID_LABEL, "method": "sparsegpt", "setting": "s50",
                                          "status": "unfinished", "seconds_at_cut": 170.0, "error": "cut"}
    assert rows[("hcsmoe", "r50")]["status"] == "not run"


def test_records_of_other_runs_do_not_fill_the_grid(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_run([{"method": "reap", "setting": "r50", "status": "built"}])))
    out = tmp_path / "merged.json"
    assert main([f"{other}:30B-shape", "--out", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert {"run": GRID_LABEL, "method": "reap", "setting": "r50", "status": "not run"} in records
    assert records[0]["model"] == {"layers": 16}


def test_disk_record_against_dense_plus_two_checkpoints(tmp_path: Path) -> None:
    from benchmarks.perf.compress_scale import DiskPeak, disk_record

    rows = [{"checkpoint_bytes": 300}, {"checkpoint_bytes": 500}, {"status": "not run"}]
    within = disk_record(900, rows, {"bytes": 1000})
    assert within["bound_dense_plus_2_checkpoints"] == 2000 and within["peak_disk_bytes"] == 1900
    assert within["within_bound"] is True
    assert disk_record(1001, rows, {"bytes": 1000})["within_bound"] is False
    assert disk_record(10, [], {"bytes": 1000})["within_bound"] is None  # nothing built: nothing to bound
    (tmp_path / "results" / "k").mkdir(parents=True)
    (tmp_path / "results" / "k" / "blob").write_bytes(b"x" * 4096)
    with DiskPeak(tmp_path, every_s=0.01) as disk:
        (tmp_path / "results" / "k" / "blob").unlink()
    assert disk.peak_bytes in (0, 4096)  # the sample before the unlink, if the thread got one
    with DiskPeak(tmp_path, every_s=0.01) as disk:
        (tmp_path / "results" / "k" / "big").write_bytes(b"x" * 8192)
    assert disk.peak_bytes == 8192  # the final sample at exit
