"""`--drop-weights` end to end: a grid's checkpoints keep only manifest, config and tokenizer once their results
are cached; a rerun gates the same without rebuilding; a rerun that needs new results rebuilds the weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ("pytester",)
pytestmark = pytest.mark.slow

ARGS = ("--methods", "reap,gptq", "--schemes", "w8a16", "--ratios", "0.5", "--safety-fractions", "0",
        "--benchmarks", "crows_pairs,drift", "--drift-prompts", "4", "--drift-tokens", "8",
        "--limit", "60", "-p", "no:cacheprovider")


def _run(project: pytest.Pytester, cache: Path, *extra: str) -> tuple[pytest.RunResult, dict[str, Any]]:
    report = project.path / f"report-{len(list(project.path.glob('report-*')))}"
    result = project.runpytest_subprocess(*ARGS, "--cache-dir", str(cache), "--report-dir", str(report), *extra)
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), result.stdout.str() + result.stderr.str()
    return result, json.loads((report / "results.json").read_text())


def _verdicts(document: dict[str, Any]) -> dict[tuple[str, str], tuple[str, float]]:
    return {(c["checkpoint"]["id"], c["metric"]): (c["verdict"], c["compressed"]) for c in document["checks"]}


def _checkpoint_builds(cache: Path) -> int:
    return sum(line.split()[1] == "checkpoints" for line in (cache / "builds.log").read_text().splitlines())


def _checkpoint_files(cache: Path) -> list[list[str]]:
    return [sorted(p.name for p in entry.iterdir()) for entry in sorted((cache / "checkpoints").iterdir())]


def test_dropped_weights_gate_the_same_and_rebuild_only_when_needed(audit_project: pytest.Pytester) -> None:
    # caches inside the project: an existing directory given as an option value outside it would anchor
    # pytest's initial conftest search elsewhere, and the plugin's options would be unknown
    cache, kept_cache = audit_project.path / "cache", audit_project.path / "kept-cache"
    kept, kept_doc = _run(audit_project, kept_cache)
    dropped, dropped_doc = _run(audit_project, cache, "--drop-weights")
    assert _verdicts(dropped_doc) == _verdicts(kept_doc)  # dropping changes nothing the checks see
    assert _checkpoint_builds(cache) == 2
    for files in _checkpoint_files(cache):
        assert not any(name.endswith(".safetensors") for name in files), files
        assert {"config.json", "manifest.json", "tokenizer.json"} <= set(files), files
    dropped.stdout.fnmatch_lines(
        ["moe-fbs-audit cache * on disk: *checkpoints * (2 entries; weights dropped from 2, * freed)*"])
    assert "weights dropped" not in kept.stdout.str()

    _, again_doc = _run(audit_project, cache, "--drop-weights")
    assert _checkpoint_builds(cache) == 2, "results cached: no rebuild"
    assert _verdicts(again_doc) == _verdicts(kept_doc)

    _, more_doc = _run(audit_project, cache, "--drop-weights", "--limit", "50")
    assert _checkpoint_builds(cache) == 4, "new results need the weights: both checkpoints rebuilt once"
    assert all(not any(n.endswith(".safetensors") for n in files) for files in _checkpoint_files(cache))
    _, kept_more = _run(audit_project, kept_cache, "--limit", "50")
    assert _verdicts(more_doc) == _verdicts(kept_more)
