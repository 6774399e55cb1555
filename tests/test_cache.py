"""Cache atomicity: a killed build leaves no entry, concurrent builders build once, corrupt entries rebuild."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fixtures.cache import MANIFEST, ArtifactCache
from tests.processes import run_concurrently

REPO = Path(__file__).resolve().parent.parent


def _write_payload(out: Path, text: str = "weights") -> dict[str, Any]:
    (out / "model.safetensors").write_text(text)
    return {"payload": text}


def test_build_once_then_reuse(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    calls: list[Path] = []

    def build(out: Path) -> dict[str, Any]:
        calls.append(out)
        return _write_payload(out)

    first = cache.get_or_build("checkpoints", "abc", build)
    second = cache.get_or_build("checkpoints", "abc", build)
    assert len(calls) == 1
    assert first.built_now and not second.built_now
    assert second.path == tmp_path / "checkpoints" / "abc"
    assert (second.path / "model.safetensors").read_text() == "weights"
    assert second.manifest["payload"] == "weights"
    assert second.manifest["cache"]["key"] == "abc"


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)

    def broken(out: Path) -> dict[str, Any]:
        (out / "half.bin").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.get_or_build("checkpoints", "k", broken)
    assert cache.lookup("checkpoints", "k") is None
    assert not (tmp_path / "checkpoints" / "k").exists()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert cache.get_or_build("checkpoints", "k", _write_payload).built_now


_KILLED_BUILD = """
import sys, time
from pathlib import Path
from fixtures.cache import ArtifactCache
def build(out):
    (out / "model.safetensors").write_text("half")
    print("building", flush=True)
    time.sleep(60)
    return {}
ArtifactCache(Path(sys.argv[1])).get_or_build("checkpoints", "killed", build)
"""


def test_killed_build_leaves_no_entry_and_rerun_builds(tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, str(tmp_path)], cwd=REPO,
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "building"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    cache = ArtifactCache(tmp_path)
    assert cache.lookup("checkpoints", "killed") is None
    assert not (tmp_path / "checkpoints" / "killed").exists()
    entry = cache.get_or_build("checkpoints", "killed", _write_payload)
    assert entry.built_now and (entry.path / "model.safetensors").read_text() == "weights"


def test_entry_without_manifest_is_rebuilt(tmp_path: Path) -> None:
    stale = tmp_path / "checkpoints" / "stale"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_text("old")
    (stale / MANIFEST).write_text("{not json")
    cache = ArtifactCache(tmp_path)
    assert cache.lookup("checkpoints", "stale") is None
    entry = cache.get_or_build("checkpoints", "stale", _write_payload)
    assert entry.built_now and json.loads((stale / MANIFEST).read_text())["payload"] == "weights"


def _concurrent_worker(root: str, counter: str) -> None:
    def build(out: Path) -> dict[str, Any]:
        with open(counter, "a") as handle:
            handle.write("built\n")
        time.sleep(0.5)  # long enough for the other worker to wait on the lock
        return _write_payload(out)

    ArtifactCache(Path(root)).get_or_build("checkpoints", "shared", build)


def test_concurrent_workers_build_once(tmp_path: Path) -> None:
    counter = tmp_path / "builds.txt"
    assert run_concurrently(_concurrent_worker, (str(tmp_path / "cache"), str(counter))) == [0, 0, 0]
    assert counter.read_text().count("built") == 1


def _checkpoint_like(out: Path) -> dict[str, Any]:
    (out / "model-00001-of-00002.safetensors").write_bytes(b"w" * 300)
    (out / "model-00002-of-00002.safetensors").write_bytes(b"w" * 200)
    (out / "model.safetensors.index.json").write_text("{}")
    (out / "config.json").write_text('{"model_type": "qwen3_moe"}')
    (out / "tokenizer.json").write_text("{}")
    return {"compression": {"method": "reap"}}


WEIGHTS = ("*.safetensors", "*.safetensors.index.json")


def test_drop_files_keeps_the_manifest_and_the_rest(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    built = cache.get_or_build("checkpoints", "k1", _checkpoint_like)
    freed = cache.drop_files("checkpoints", "k1", WEIGHTS)
    assert freed == 502  # 300 + 200 + the 2-byte index
    entry = cache.lookup("checkpoints", "k1")
    assert entry is not None and entry.path == built.path
    assert sorted(p.name for p in entry.path.iterdir()) == ["config.json", MANIFEST, "tokenizer.json"]
    assert entry.dropped == ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                             "model.safetensors.index.json")
    assert entry.manifest["compression"] == {"method": "reap"}
    assert entry.manifest["cache"]["dropped_bytes"] == 502
    assert cache.drop_files("checkpoints", "k1", WEIGHTS) == 0  # nothing left to drop
    assert cache.drop_files("checkpoints", "absent", WEIGHTS) == 0
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == []  # the swap leaves nothing behind


def test_a_dropped_entry_is_rebuilt_when_asked_for(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    cache.get_or_build("checkpoints", "k1", _checkpoint_like)
    cache.drop_files("checkpoints", "k1", WEIGHTS)
    rebuilt = cache.get_or_build("checkpoints", "k1", _checkpoint_like)
    assert rebuilt.built_now and rebuilt.dropped == ()
    assert (rebuilt.path / "model-00001-of-00002.safetensors").stat().st_size == 300
    assert not cache.get_or_build("checkpoints", "k1", _checkpoint_like).built_now
    log = (tmp_path / "builds.log").read_text().splitlines()
    assert [line.split()[1:3] for line in log] == [["checkpoints", "k1"], ["checkpoints", "k1"]]


def test_an_interrupted_drop_leaves_the_full_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ArtifactCache(tmp_path)
    cache.get_or_build("checkpoints", "k1", _checkpoint_like)

    def killed(*args: Any) -> None:
        raise KeyboardInterrupt  # the moment before the slimmed entry is swapped in

    monkeypatch.setattr(ArtifactCache, "_publish", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.drop_files("checkpoints", "k1", WEIGHTS)
    monkeypatch.undo()
    entry = cache.lookup("checkpoints", "k1")
    assert entry is not None and entry.dropped == ()
    assert (entry.path / "model-00002-of-00002.safetensors").stat().st_size == 200
    assert not cache.get_or_build("checkpoints", "k1", _checkpoint_like).built_now


def test_usage_counts_bytes_and_dropped_entries(tmp_path: Path) -> None:
    from fixtures.cache_summary import cache_summary

    cache = ArtifactCache(tmp_path)
    for key in ("k1", "k2"):
        cache.get_or_build("checkpoints", key, _checkpoint_like)
    cache.get_or_build("results", "r1", lambda out: {"results": {}})
    cache.drop_files("checkpoints", "k1", WEIGHTS)
    usage = {u.kind: u for u in cache.usage()}
    manifests = sum((tmp_path / "checkpoints" / k / MANIFEST).stat().st_size for k in ("k1", "k2"))
    assert usage["checkpoints"].bytes == 502 + 2 * (len('{"model_type": "qwen3_moe"}') + 2) + manifests
    assert (usage["checkpoints"].entries, usage["checkpoints"].dropped_entries) == (2, 1)
    assert usage["checkpoints"].dropped_bytes == 502
    assert usage["results"].entries == 1 and usage["results"].dropped_entries == 0
    assert "locks" not in usage
    line = cache_summary(tmp_path)
    assert "checkpoints" in line and "weights dropped from 1, 502 B freed" in line


def test_human_bytes() -> None:
    from fixtures.cache_summary import human_bytes

    assert [human_bytes(n) for n in (0, 999, 1000, 1_234_567, 5.6e9, 3.2e13)] == [
        "0 B", "999 B", "1.00 KB", "1.23 MB", "5.60 GB", "32000.00 GB"]
