"""The gate end to end (pytester, subprocess): failure messages, ci vs point, xdist builds once, shard merge."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ("pytester",)
pytestmark = pytest.mark.slow

FLIP = "crows_pairs.flip_stereotype_emergence"
BASE_ARGS = ("--benchmarks", "crows_pairs", "--limit", "100", "--safety-fractions", "0", "--ratios", "0.5",
             "-p", "no:cacheprovider")


@pytest.fixture
def project(audit_project: pytest.Pytester) -> pytest.Pytester:
    return audit_project


def _set_flip_tolerance(project: pytest.Pytester, abs_bound: float, mode: str) -> None:
    text = (project.path / "thresholds.toml").read_text()
    head, _, _ = text.partition(f'[metric."{FLIP}"]')
    (project.path / "thresholds.toml").write_text(
        head + f'[metric."{FLIP}"]\nbetter = "lower"\nabs = {abs_bound}\nmode = "{mode}"\n')


def _run(project: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict[str, Any]]:
    report = project.path / f"report-{len(list(project.path.glob('report-*')))}"
    result = project.runpytest_subprocess(*BASE_ARGS, "--report-dir", str(report), *args)
    document = json.loads((report / "results.json").read_text())
    return result, document


def _flip_check(document: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    return next(c for c in document["checks"] if c["metric"] == FLIP and c["checkpoint"]["id"] == checkpoint)


def test_breach_fails_with_the_full_story(project: pytest.Pytester) -> None:
    _set_flip_tolerance(project, 0.0, "point")
    result, document = _run(project, "--methods", "reap")
    check = _flip_check(document, "reap-r50-safety0-seed0")
    assert check["compressed"] > 0, "REAP 50% on the random zoo model flips some CrowS pairs"
    assert check["verdict"] == "fail" and result.ret == pytest.ExitCode.TESTS_FAILED
    output = result.stdout.str()
    for fragment in ("BLOCKED reap-r50-safety0-seed0 crows_pairs.flip_stereotype_emergence: dense 0.0000",
                     "95% CI", "allowed 0.0000 [abs 0 (lower is better, mode point)]", "items changed; first",
                     "anti_stereotype -> stereotype", "checkpoint(s) blocked"[:10]):
        assert fragment in output, fragment
    # the failure is the gate message alone (issue 25): no traceback through the plugin, no Measurement repr
    assert "measurement = Measurement(" not in output and "fixtures/gate.py" not in output
    section = output.split("= FAILURES =")[1].split("= moe-fbs-audit =")[0]
    assert len([line for line in section.splitlines() if line.strip()]) <= 14 * output.count("BLOCKED "), section


def test_a_check_with_too_few_items_errors_with_its_message_alone(project: pytest.Pytester) -> None:
    """An error of the suite's own is one line, not a traceback through the plugin; `--tb=long` still gives the
    traceback. Here: stereotype emergence counts the pairs the dense model did not prefer stereotypically, known
    only once it has answered, so at --limit 28 fewer than min_items 28 is an error when measured (too few items
    known from the data alone stop the run at start-up instead: tests/test_plugin.py)."""
    _set_flip_tolerance(project, 0.05, "ci")
    path = project.path / "thresholds.toml"
    path.write_text(path.read_text() + "min_items = 28\n")
    args = ("--methods", "reap", "--benchmarks", "crows_pairs", "--limit", "28", "--safety-fractions", "0",
            "--ratios", "0.5", "-p", "no:cacheprovider", "-k", "flip")
    result = project.runpytest_subprocess(*args)
    output = result.stdout.str()
    pattern = rf"ERROR GateError: {FLIP}: only [0-9]+ eligible items, fewer than min_items 28"
    assert re.search(pattern, output), output[-3000:]
    assert "fixtures/gate.py" not in output and "audit_case = AuditCase(" not in output
    section = output.split("= ERRORS =")[1].split("= moe-fbs-audit =")[0]
    lines = [line for line in section.splitlines() if line.strip(" =")]
    # its header line and its one message line; the short summary below may repeat the message (its width
    # depends on the terminal), so count inside the ERRORS section only
    assert len(lines) == 2 * section.count("ERROR GateError") == 2, section
    assert "fixtures/gate.py" in project.runpytest_subprocess(*args, "--tb=long").stdout.str()


def test_ci_mode_passes_a_noisy_but_within_delta_that_point_mode_fails(project: pytest.Pytester) -> None:
    _set_flip_tolerance(project, 0.0, "ci")
    _, document = _run(project, "--methods", "reap")
    check = _flip_check(document, "reap-r50-safety0-seed0")
    low, _ = check["worse_ci"]
    assert low < check["worse_by"], "the interval must have width for this test to mean anything"
    between = round((low + check["worse_by"]) / 2, 6)
    _set_flip_tolerance(project, between, "point")
    point_result, point_doc = _run(project, "--methods", "reap", "-k", "flip")
    _set_flip_tolerance(project, between, "ci")
    ci_result, ci_doc = _run(project, "--methods", "reap", "-k", "flip")
    assert _flip_check(point_doc, "reap-r50-safety0-seed0")["verdict"] == "fail"
    assert point_result.ret == pytest.ExitCode.TESTS_FAILED
    assert _flip_check(ci_doc, "reap-r50-safety0-seed0")["verdict"] == "pass"
    assert ci_result.ret == pytest.ExitCode.OK


def test_xdist_builds_each_checkpoint_once(project: pytest.Pytester, tmp_path: Path) -> None:
    cache = tmp_path / "fresh-cache"
    result = project.runpytest_subprocess(*BASE_ARGS, "--cache-dir", str(cache), "-n", "2", "-v",
                                          "--report-dir", str(tmp_path / "report"))
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) + outcomes.get("failed", 0) == 4, result.stdout.str()  # 2 ckpts x 2 metrics
    builds = (cache / "builds.log").read_text().splitlines()
    kinds = [line.split()[1] for line in builds]
    assert kinds.count("checkpoints") == 2, builds
    assert kinds.count("results") == 3, builds  # dense once, each checkpoint once
    assert kinds.count("zoo") == 1, builds
    document = json.loads((tmp_path / "report" / "results.json").read_text())
    assert len(document["checks"]) == 4
    workers_of: dict[str, set[str]] = {}
    for line in result.stdout.lines:
        if line.startswith("[gw") and "[" in line.split("::")[-1]:
            checkpoint = line.rsplit("[", 1)[1].rstrip("] ").rsplit("-", 1)[0]
            workers_of.setdefault(checkpoint, set()).add(line.split("]")[0].lstrip("["))
    assert set(workers_of) == {"gptq-w4a16-safety0-seed0", "reap-r50-safety0-seed0"}, result.stdout.str()
    assert all(len(workers) == 1 for workers in workers_of.values()), workers_of
    # each check records the worker that computed it; the summary names each worker's checkpoints
    for check in document["checks"]:
        assert {check["placement"]["worker"]} == workers_of[check["checkpoint"]["id"]], check["placement"]
        assert check["placement"]["device"] == "cpu"
    summary = [line for line in result.stdout.lines if line.startswith("worker gw")]
    assert len(summary) == len(set().union(*workers_of.values())), result.stdout.str()
    assert all("on cpu: 1 checkpoint(s)" in line for line in summary) or len(summary) == 1, summary


def test_two_shards_merge_into_the_single_run(project: pytest.Pytester, tmp_path: Path) -> None:
    from reports.merge import main as merge_main

    _, whole = _run(project)
    _, first = _run(project, "--shard", "1/2")
    _, second = _run(project, "--shard", "2/2")
    assert {c["checkpoint"]["id"] for c in first["checks"]}.isdisjoint(c["checkpoint"]["id"] for c in second["checks"])
    shard_paths = []
    for index, document in enumerate((second, first)):
        path = tmp_path / f"shard{index}.json"
        path.write_text(json.dumps(document))
        shard_paths.append(str(path))
    merge_main([*shard_paths, "--out", str(tmp_path / "merged")])
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())

    def comparable(document: dict[str, Any]) -> Any:
        checks = sorted(({k: v for k, v in c.items() if k != "nodeid"} for c in document["checks"]),
                        key=lambda c: (c["checkpoint"]["id"], c["metric"]))
        return checks, [row["id"] for row in document["checkpoints"]], document["dense"]

    assert comparable(merged) == comparable(whole)
    from reports.compare import differences
    from reports.compare import main as compare_main

    assert differences(merged, whole) == []
    assert compare_main([str(tmp_path / "merged" / "results.json"), shard_paths[0]]) == 1  # one shard != whole
    assert (tmp_path / "merged" / "report.md").read_text().count("reap-r50-safety0-seed0") >= 1


def test_merge_refuses_mismatched_settings(tmp_path: Path) -> None:
    from reports.merge import main as merge_main

    base = {"schema": "moe-fbs-audit/results/v1", "checks": [], "checkpoints": [], "metrics": [], "dense": {}}
    (tmp_path / "a.json").write_text(json.dumps({**base, "settings": {"model": "a"}}))
    (tmp_path / "b.json").write_text(json.dumps({**base, "settings": {"model": "b"}}))
    assert merge_main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m")]) == 2


def test_seed_means_under_xdist_build_each_seed_once(project: pytest.Pytester, tmp_path: Path) -> None:
    """Two seeds and their mean, crows_pairs and a tiny drift protocol, on two workers: the seed group runs on
    one worker, each seed is built and evaluated once, and the mean's values are the seeds' means."""
    from tests.test_reports import schema_errors

    cache = tmp_path / "fresh-cache"
    result = project.runpytest_subprocess(
        *BASE_ARGS, "--benchmarks", "crows_pairs,drift", "--methods", "reap", "--seeds", "0,1",
        # 4 prompts x 5 datasets = 20 per temperature: a drift metric's min_items counts one temperature.
        "--drift-prompts", "4", "--drift-tokens", "8", "--cache-dir", str(cache), "-n", "2", "-v",
        "--report-dir", str(tmp_path / "report"))
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) + outcomes.get("failed", 0) == 18, result.stdout.str()  # 3 entries x 6
    kinds = [line.split()[1] for line in (cache / "builds.log").read_text().splitlines()]
    assert kinds.count("checkpoints") == 2 and kinds.count("results") == 3, kinds
    assert kinds.count("drift-generations") == 3, kinds  # dense + one per seed; the mean generates nothing
    workers = {line.split("]")[0].lstrip("[") for line in result.stdout.lines
               if line.startswith("[gw") and "test_metric_within_tolerance[" in line}
    assert len(workers) == 1, workers  # one seed group: one worker
    result.stdout.fnmatch_lines(["*moe-fbs-audit: 2 checkpoint(s) + 1 seed mean(s), 18 checks:*"])
    document = json.loads((tmp_path / "report" / "results.json").read_text())
    assert schema_errors(document) == []
    checks = {(c["checkpoint"]["id"], c["metric"]): c for c in document["checks"]}
    for metric in {m for _, m in checks}:
        seeds = [checks[(f"reap-r50-safety0-seed{s}", metric)] for s in (0, 1)]
        mean = checks[("reap-r50-safety0-seedmean", metric)]
        assert mean["compressed"] == pytest.approx((seeds[0]["compressed"] + seeds[1]["compressed"]) / 2, abs=1e-12)
        assert mean["checkpoint"]["seeds"] == [0, 1] and mean["mcnemar"] is None
        if metric.startswith("drift."):
            assert set(mean["by_dataset"]) == {"bbq", "xstest", "crows_pairs", "stereoset", "advbench"}
            for dataset, entry in mean["by_dataset"].items():
                per_seed = [s["by_dataset"][dataset]["compressed"] for s in seeds]
                assert entry["compressed"] == pytest.approx(sum(per_seed) / 2, abs=1e-12)
                assert entry["n_items"] == 4  # --drift-prompts per dataset
        else:
            assert mean["by_dataset"] is None
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## Table A:" in markdown and "| reap-r50-safety0-seedmean |" in markdown
