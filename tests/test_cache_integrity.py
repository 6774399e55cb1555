"""Cache integrity: a reused entry is what was built (or says why not), and leftovers of dead runs are reclaimed.

Unit tier: truncated and rewritten files, a corrupt manifest, an older entry without an inventory, dropped
files, stale temp dirs and `.tmp` files by owner. The end-to-end truncation experiment of issue 23 is in
`test_truncated_checkpoint_is_an_error_with_a_remedy` (pytester, slow).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fixtures.cache import MANIFEST, ArtifactCache, CorruptEntry
from fixtures.inventory import SAMPLE_EDGE, sampled_digest
from fixtures.owners import ORPHAN_AGE_S, host_tag, is_stale, owner_tag
from fixtures.reclaim import reclaim

pytest_plugins = ("pytester",)
BIG = 3 * SAMPLE_EDGE + 12345  # larger than the sample: only sampled regions are read


def _weights(out: Path) -> dict[str, Any]:
    (out / "model.safetensors").write_bytes(bytes(range(256)) * (BIG // 256))
    (out / "config.json").write_text("{}")
    return {"kind": "checkpoint"}


def _built(tmp_path: Path, verify: str = "quick") -> tuple[ArtifactCache, Path]:
    cache = ArtifactCache(tmp_path, verify=verify)
    entry = cache.get_or_build("checkpoints", "k" * 64, _weights)
    return ArtifactCache(tmp_path, verify=verify), entry.path  # a fresh process's view: nothing verified yet


def test_inventory_recorded_at_build(tmp_path: Path) -> None:
    cache, path = _built(tmp_path)
    entry = cache.lookup("checkpoints", "k" * 64)
    assert entry is not None and set(entry.files) == {"model.safetensors", "config.json"}
    record = entry.files["model.safetensors"]
    assert record["bytes"] == (path / "model.safetensors").stat().st_size
    sha = subprocess.run(["sha256sum", str(path / "model.safetensors")], capture_output=True, text=True)
    assert record["sha256"] == sha.stdout.split()[0]  # what a user's sha256sum of the shipped file prints
    assert len(entry.content_sha256) == 64


def test_truncated_weights_are_an_error_naming_file_and_remedy(tmp_path: Path) -> None:
    cache, path = _built(tmp_path)
    weights = path / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    with pytest.raises(CorruptEntry) as caught:
        cache.get_or_build("checkpoints", "k" * 64, _weights)
    message = str(caught.value)
    assert str(weights) in message and "bytes" in message and f"rm -rf '{path}'" in message
    subprocess.run(shlex.split(message.split("Rebuild it: ")[1].split(" and run again")[0]), check=True)
    rebuilt = cache.get_or_build("checkpoints", "k" * 64, _weights)
    assert rebuilt.built_now and weights.stat().st_size == rebuilt.files["model.safetensors"]["bytes"]


def test_a_rewritten_header_is_caught_quickly_a_flip_between_samples_only_fully(tmp_path: Path) -> None:
    cache, path = _built(tmp_path)
    weights = path / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.write(b"\xff" * 8)  # the safetensors header length: same size, other bytes
    with pytest.raises(CorruptEntry, match="sampled digest"):
        cache.lookup("checkpoints", "k" * 64)
    _weights(path)  # restore
    before = sampled_digest(weights)
    with weights.open("r+b") as handle:
        handle.seek(SAMPLE_EDGE + 7)  # just past the head sample, before the first block
        handle.write(b"\x00")
    assert sampled_digest(weights) == before, "the quick check reads samples only (the documented limit)"
    assert ArtifactCache(tmp_path).lookup("checkpoints", "k" * 64) is not None
    with pytest.raises(CorruptEntry, match=r"\(sha256\)"):
        ArtifactCache(tmp_path, verify="full").lookup("checkpoints", "k" * 64)


def test_corrupt_manifest_or_no_inventory_is_rebuilt_not_trusted(tmp_path: Path) -> None:
    cache, path = _built(tmp_path)
    (path / MANIFEST).write_text("{not json")
    assert cache.lookup("checkpoints", "k" * 64) is None
    assert cache.get_or_build("checkpoints", "k" * 64, _weights).built_now
    manifest = json.loads((path / MANIFEST).read_text())
    del manifest["cache"]["files"]  # an entry of an older cache: sizes unknown
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert ArtifactCache(tmp_path).lookup("checkpoints", "k" * 64) is None
    assert ArtifactCache(tmp_path).get_or_build("checkpoints", "k" * 64, _weights).built_now


def test_dropped_weights_are_not_corruption(tmp_path: Path) -> None:
    cache, path = _built(tmp_path)
    cache.drop_files("checkpoints", "k" * 64, ("*.safetensors",))
    entry = ArtifactCache(tmp_path, verify="full").lookup("checkpoints", "k" * 64)
    assert entry is not None and entry.dropped == ("model.safetensors",)
    (path / "config.json").write_text('{"changed": 1}')  # a kept file still is checked
    with pytest.raises(CorruptEntry, match="config.json"):
        ArtifactCache(tmp_path).lookup("checkpoints", "k" * 64)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_is_decided_by_owner(tmp_path: Path) -> None:
    now = time.time()
    dead, alive = f"{host_tag()}-{_dead_pid()}", owner_tag()
    assert is_stale(f"checkpoints-abc-build-{dead}-0123abcd", now, now)
    assert not is_stale(f"checkpoints-abc-build-{alive}-0123abcd", now, now)
    other_host = f"h00000000-{os.getpid()}" if host_tag() != "h00000000" else f"h11111111-{os.getpid()}"
    assert not is_stale(f"x-{other_host}-0123abcd", now - 60, now)  # another host's: only by age
    assert is_stale(f"x-{other_host}-0123abcd", now - ORPHAN_AGE_S - 1, now)
    assert not is_stale("checkpoints-abc-12345-0123abcd", now, now)  # untagged (older runs): by age
    assert is_stale("checkpoints-abc-12345-0123abcd", now - ORPHAN_AGE_S - 1, now)


def test_reclaim_removes_dead_owners_leftovers_only(tmp_path: Path) -> None:
    cache_root, report = tmp_path / "cache", tmp_path / "report"
    dead = f"{host_tag()}-{_dead_pid()}"
    stale_dir = cache_root / "tmp" / f"checkpoints-abc-build-{dead}-0123abcd"
    live_dir = cache_root / "tmp" / f"checkpoints-abd-build-{owner_tag()}-0123abcd"
    for directory in (stale_dir, live_dir):
        directory.mkdir(parents=True)
        (directory / "model.safetensors").write_bytes(b"x" * 1000)
    stray = cache_root / "calibration" / f".calibration-1.json.{dead}.abcdefgh.tmp"
    stray_report = report / f".results.json.{dead}.0123abcd.tmp"
    kept_entry = cache_root / "results" / "k" / "manifest.json"
    for path, size in ((stray, 10), (stray_report, 20), (kept_entry, 5)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"y" * size)
    reclaimed = reclaim(cache_root, report)
    assert (reclaimed.entries, reclaimed.bytes) == (3, 1030)
    assert not stale_dir.exists() and not stray.exists() and not stray_report.exists()
    assert live_dir.exists() and kept_entry.exists()
    assert reclaim(cache_root, report).entries == 0


@pytest.mark.slow
def test_truncated_checkpoint_is_an_error_with_a_remedy(audit_project: pytest.Pytester) -> None:
    """Issue 23's experiment: truncate a finished checkpoint's weights; the rerun errors (not blocks) naming
    the file and the command; after that command the rerun rebuilds and gates as the first run did."""
    cache, report = audit_project.path / "cache", audit_project.path / "report"
    args = ("--methods", "reap", "--ratios", "0.5", "--safety-fractions", "0", "--benchmarks", "crows_pairs",
            "--limit", "60", "--cache-dir", str(cache), "--report-dir", str(report), "-p", "no:cacheprovider")

    def verdicts() -> dict[str, tuple[str, float | None]]:
        document = json.loads((report / "results.json").read_text())
        return {c["metric"]: (c["verdict"], c.get("compressed")) for c in document["checks"]}

    first = audit_project.runpytest_subprocess(*args)
    assert first.ret in (0, 1), first.stdout.str()
    expected = verdicts()
    document = json.loads((report / "results.json").read_text())
    (weights,) = (cache / "checkpoints").glob("*/model.safetensors")
    shipped = document["checks"][0]["artefact"]["weights_sha256"]["model.safetensors"]
    assert shipped == subprocess.run(["sha256sum", str(weights)], capture_output=True, text=True).stdout.split()[0]
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    broken = audit_project.runpytest_subprocess(*args)
    output = broken.stdout.str()
    assert broken.ret == 1 and "could not be measured" in output and "blocked by the gate" not in output, output
    assert str(weights) in output and f"rm -rf '{weights.parent}'" in output, output
    assert all(v == "error" for v, _ in verdicts().values())
    subprocess.run(["rm", "-rf", str(weights.parent)], check=True)
    again = audit_project.runpytest_subprocess(*args)
    assert again.ret == first.ret, again.stdout.str()
    assert verdicts() == expected
    builds = [line.split()[1] for line in (cache / "builds.log").read_text().splitlines()]
    assert builds.count("checkpoints") == 2  # the first build and the rebuild after `rm -rf`
    assert builds.count("calibration") == 1  # built under the lock and logged, once, like every entry
