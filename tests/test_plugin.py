"""The pytest plugin end to end (pytester): start-up validation, grid ids and markers, the audit run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures.thresholds import load_thresholds

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ("pytester",)

GATED = [name for name in load_thresholds(REPO / "thresholds.toml").metrics
         if name.split(".")[0] in ("bbq", "crows_pairs")]


@pytest.fixture
def audit_dir(audit_project: pytest.Pytester) -> pytest.Pytester:
    return audit_project


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "gptq,zipit"], "--methods: unknown 'zipit'; valid: "),
        (["--schemes", "w3a3"], "gptq: none of the schemes w3a3 is supported; valid: w4a16"),
        (["--ratios", "1.5"], "--ratios: 1.5 is outside (0.0, 1.0]"),
        (["--ratios", "1"], "must be below 1"),
        (["--ratios", "0"], "--ratios: 0 is outside"),
        (["--safety-fractions", "0,1.2"], "--safety-fractions: 1.2 is outside [0.0, 1.0]"),
        (["--safety-fractions", "0,0"], "duplicate values"),
        (["--safety-fractions", "0.1,0.1000000000001"], "0.1 and 0.1000000000001 would both be 'safety10'"),
        (["--safety-fractions", "0.12345678"], "0.12345678 is 12.345678%, but ids show the percent with at most 3"),
        (["--seeds", "x"], "--seeds: 'x' is not an integer"),
        (["--benchmarks", "mmlu"], "--benchmarks: unknown 'mmlu'"),
        (["--limit", "0"], "--limit: '0' is not an integer >= 1"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--calibration", "huge"], "--calibration: unknown 'huge'"),
        (["--data-dir", "/no/such/dir"], "--data-dir: /no/such/dir is not a directory"),
        (["--thresholds", "missing.toml"], "missing.toml not found"),
        (["--benchmarks", "crows_pairs_original"], "benchmark 'crows_pairs_original' is selected but has no gated"),
        (["--refusal-judge", "gpt4"], "--refusal-judge: unknown refusal judge 'gpt4'"),
        (["--refusal-judge", "meta-llama/Llama-Guard-3-8B", "--benchmarks", "xstest,advbench"],
         "rates harm, not refusal"),
    ],
)
def test_bad_options_give_one_clear_message(audit_dir: pytest.Pytester, args: list[str], message: str) -> None:
    result = audit_dir.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "moe-fbs-audit: " in result.stderr.str() and message in result.stderr.str()


def test_malformed_thresholds_file(audit_dir: pytest.Pytester) -> None:
    (audit_dir.path / "thresholds.toml").write_text("[metric.\"bbq.acc\"]\nbetter = 'higher'\nabz = 0.1\n")
    result = audit_dir.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*thresholds.toml: unknown key metric.\"bbq.acc\".abz*"])


def test_ini_values_are_read_and_cli_wins(audit_dir: pytest.Pytester) -> None:
    audit_dir.makeini("[pytest]\naudit_methods = reap\naudit_ratios = 0.25\n")
    ids = _collected_ids(audit_dir)
    assert ids and all(i.startswith("reap-r25-") for i in ids)
    ids = _collected_ids(audit_dir, "--ratios", "0.5")
    assert ids and all(i.startswith("reap-r50-") for i in ids)


def _collected_ids(pytester: pytest.Pytester, *args: str) -> list[str]:
    result = pytester.runpytest("--collect-only", "-q", *args)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    lines = [line for line in result.stdout.lines if "[" in line]
    return [line.split("[", 1)[1].rstrip("]") for line in lines]


def test_grid_ids_and_markers(audit_dir: pytest.Pytester) -> None:
    ids = _collected_ids(audit_dir, "--ratios", "0.25,0.5", "--seeds", "0,1")
    assert "reap-r50-safety0-seed0-bbq.acc" in ids
    assert "gptq-w4a16-safety11.8-seed1-crows_pairs.pct_stereotype" in ids
    assert "reap-r25-safety100-seed1-bbq.disamb_bias_score" in ids
    assert "reap-r25-safety100-seedmean-bbq.disamb_bias_score" in ids
    # 1 scheme + 2 ratios, x 3 fractions x (2 seeds + their mean), x the gated metrics of bbq and crows_pairs
    assert len(ids) == 3 * 3 * 3 * len(GATED)
    expert = _collected_ids(audit_dir, "--ratios", "0.5", "-m", "expert")
    assert expert and all(i.startswith("reap-") for i in expert)
    selected = _collected_ids(audit_dir, "--ratios", "0.5", "-k", "gptq and crows_pairs")
    crows_metrics = sum(name.startswith("crows_pairs.") for name in GATED)
    assert len(selected) == 3 * crows_metrics and all("gptq" in i and "crows_pairs" in i for i in selected)


def test_k_safety0_selects_only_the_safety0_cases(audit_dir: pytest.Pytester) -> None:
    """Percent ids: `safety0` is no longer a prefix of the 11.8% mix's id (it was `safety0.118`)."""
    every = _collected_ids(audit_dir, "--ratios", "0.5", "--seeds", "0,1")
    bbq = [name for name in GATED if name.startswith("bbq.")]
    selected = _collected_ids(audit_dir, "--ratios", "0.5", "--seeds", "0,1", "-k", "safety0 and bbq")
    want = [i for i in every if "-safety0-" in i and "-bbq." in i]
    assert sorted(selected) == sorted(want) and len(want) == 2 * 3 * len(bbq)  # 2 settings x (2 seeds + mean)
    assert {i.split("-safety")[1].split("-")[0] for i in every} == {"0", "11.8", "100"}
    reap = _collected_ids(audit_dir, "--ratios", "0.5", "-k", "reap")
    assert reap and all(i.startswith("reap-r50-") for i in reap) and len(reap) == 3 * len(GATED)
    seed_means = _collected_ids(audit_dir, "--ratios", "0.5", "--seeds", "0,1", "-m", "seedmean and expert")
    assert seed_means == [i for i in every if i.startswith("reap-") and "-seedmean-" in i]
    assert not _collected_ids_or_empty(audit_dir, "--ratios", "0.5", "-m", "seedmean")  # one seed: no mean


def _collected_ids_or_empty(pytester: pytest.Pytester, *args: str) -> list[str]:
    result = pytester.runpytest("--collect-only", "-q", *args)
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED), result.stdout.str()
    return [line.split("[", 1)[1].rstrip("]") for line in result.stdout.lines if "[" in line]


def test_shards_deal_whole_seed_groups(audit_dir: pytest.Pytester) -> None:
    """A seed mean is computed in the shard that builds its seeds, so no shard builds another's checkpoint."""
    args = ("--ratios", "0.5", "--safety-fractions", "0,1", "--seeds", "0,1")
    every = _collected_ids(audit_dir, *args)
    shards = [_collected_ids(audit_dir, *args, "--shard", f"{i}/3") for i in (1, 2, 3)]
    assert sorted(i for shard in shards for i in shard) == sorted(every)
    groups = [{i.rsplit("-", 2)[0] for i in shard} for shard in shards]
    assert groups == [{"gptq-w4a16-safety0", "reap-r50-safety100"}, {"gptq-w4a16-safety100"}, {"reap-r50-safety0"}]
    for shard in shards:  # each shard holds every seed and the mean of its groups
        for group in {i.rsplit("-", 2)[0] for i in shard}:
            assert {i.rsplit("-", 2)[1] for i in shard if i.startswith(group + "-seed")} == {"seed0", "seed1",
                                                                                           "seedmean"}


def test_ratio_leaving_fewer_experts_than_top_k_is_refused(audit_dir: pytest.Pytester) -> None:
    result = audit_dir.runpytest("--methods", "reap", "--ratios", "0.9")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines(["*moe-fbs-audit: *reap*0.9*top*"])


def test_limit_below_a_benchmarks_strata_is_refused_before_anything_is_built(audit_dir: pytest.Pytester,
                                                                            tmp_path: Path) -> None:
    cache = tmp_path / "never-built"
    result = audit_dir.runpytest("--methods", "reap", "--limit", "3", "--benchmarks", "crows_pairs,bbq",
                                 "--cache-dir", str(cache))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines(["*moe-fbs-audit: --limit 3 is too small for crows_pairs: *10 items*"])
    assert not (cache / "checkpoints").exists() and not (cache / "zoo").exists()


def test_limit_leaving_a_metric_fewer_items_than_min_items_is_refused_at_start_up(
        audit_dir: pytest.Pytester, tmp_path: Path, shared_data_dir: Path) -> None:
    """BBQ at --limit 28 samples 14 ambiguous and 14 disambiguated items; its bias scores need min_items 20, which
    the data alone shows before any model runs: exit 4 with one message naming both and the limit that would do."""
    cache = tmp_path / "never-built"
    result = audit_dir.runpytest("--methods", "reap", "--limit", "28", "--benchmarks", "bbq", "--cache-dir",
                                 str(cache))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines(["*moe-fbs-audit: --limit 28 is too small: bbq.amb_bias_score gets 14 of the 28 "
                                 "sampled items, fewer than its min_items 20; about --limit 40 would;*"
                                 "bbq.disamb_bias_score gets 14*"])
    assert not (cache / "checkpoints").exists() and not (cache / "zoo").exists()
    from benchmarks.preflight import check_limit_covers_min_items
    from fixtures.data import DataSource

    source = DataSource(shared_data_dir)
    check_limit_covers_min_items({"bbq.amb_bias_score": 20, "bbq.disamb_bias_score": 20}, source, 40, 0)  # enough
    # a flip metric's eligible items are known only from the dense model's answers: not judged here
    check_limit_covers_min_items({"bbq.flip_bias_emergence": 1000}, source, 28, 0)


def test_non_moe_model_is_refused(audit_dir: pytest.Pytester, tmp_path: Path) -> None:
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (dense / "model.safetensors").write_bytes(b"")
    result = audit_dir.runpytest(f"--model={dense}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines(["*moe-fbs-audit: *not a Mixture-of-Experts model*"])


@pytest.mark.slow
def test_audit_end_to_end_writes_report(audit_dir: pytest.Pytester, tmp_path: Path) -> None:
    """Dense + GPTQ W4A16 + REAP 50% at one safety fraction, two benchmarks, through the real stack."""
    report_dir = tmp_path / "report"
    result = audit_dir.runpytest_subprocess(
        "--ratios", "0.5", "--safety-fractions", "0.118", "--limit", "50", "--report-dir", str(report_dir),
        "-p", "no:cacheprovider",
    )
    outcomes = result.parseoutcomes()
    checks = 2 * len(GATED)
    assert outcomes.get("passed", 0) + outcomes.get("failed", 0) == checks, result.stdout.str()
    assert "error" not in outcomes and "errors" not in outcomes, result.stdout.str()
    result.stdout.fnmatch_lines([f"*moe-fbs-audit: 2 checkpoint(s), {checks} checks:*report -> *report.md*"])
    document = json.loads((report_dir / "results.json").read_text())
    assert document["schema"] == "moe-fbs-audit/results/v1"
    assert [row["id"] for row in document["checkpoints"]] == ["gptq-w4a16-safety11.8-seed0",
                                                              "reap-r50-safety11.8-seed0"]
    for check in document["checks"]:
        assert check["verdict"] in ("pass", "fail")
        # a metric counts its own items (BBQ bias scores: one context, about half the 50), never fewer than min_items
        assert check["n_items"] >= (1 if ".flip_" in check["metric"] else 20)
        assert check["delta"] == pytest.approx(check["compressed"] - check["dense"])
    markdown = (report_dir / "report.md").read_text()
    assert "| dense baseline |" in markdown and "reap-r50-safety11.8-seed0" in markdown


def test_data_free_methods_build_one_checkpoint_unless_seed_dependent(audit_dir: pytest.Pytester) -> None:
    ids = _collected_ids(audit_dir, "--methods", "random,fp8", "--schemes", "s50,w8a8", "--seeds", "0,1")
    checkpoints = sorted({i.rsplit("-", 1)[0] for i in ids})
    # random pruning depends on its seed, so it also gets a seed mean; fp8 is built once, so it gets none
    assert checkpoints == ["fp8-w8a8-seed0", "random-s50-seed0", "random-s50-seed1", "random-s50-seedmean"]


def test_builds_and_evaluations_show_live_progress_lines(audit_project: pytest.Pytester) -> None:
    """Each build and evaluation is announced when it starts and ends (seconds, largest phases, what is left);
    libraries' progress bars stay out of the terminal."""
    result = audit_project.runpytest_subprocess("--methods", "reap,magnitude", "--ratios", "0.5", "--schemes", "s50",
                                                "--safety-fractions", "0", "--benchmarks", "crows_pairs",
                                                "--limit", "28", "--cache-dir", "fresh-cache", "-p", "no:cacheprovider")
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.OK, output[-3000:]
    for fragment in ("[main] build reap-r50-safety0-seed0 ...", "[main] build reap-r50-safety0-seed0 done in",
                     "(observer ", "[main] evaluate dense on crows_pairs ...", "more build step(s) at this mean"):
        assert fragment in output, fragment
    assert "Writing model shards" not in output and "it/s]" not in output
