"""Fixtures for the suite's own tests (not the audit plugin)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Imported before any in-process pytester run: a run that imports scipy first drops numpy.fft from sys.modules
# when it ends, and the next import fails ("cannot load module more than once per process").
import scipy.stats  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR_ENV = "MOE_FBS_DATA_DIR"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The offline data mirror: $MOE_FBS_DATA_DIR, else ../shared/data beside the checkout; absent is a failure."""
    configured = os.environ.get(DATA_DIR_ENV)
    path = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.fail(f"data mirror not found at {path}; set {DATA_DIR_ENV}")
    return path


@pytest.fixture(scope="session")
def session_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache dir per test session, so zoo models and checkpoints are built once across tests."""
    return tmp_path_factory.mktemp("moe-fbs-cache")


AUDIT_TEST = '''
from fixtures.gate import check
def test_metric_within_tolerance(measurement):
    check(measurement)
'''


@pytest.fixture
def audit_project(pytester: pytest.Pytester, shared_data_dir: Path, session_cache_dir: Path,
                  monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A throwaway project using the plugin, with the shipped thresholds and the session's cache."""
    pytester.makeconftest('pytest_plugins = ("fixtures.plugin", "reports.plugin")')
    shutil.copy(REPO_ROOT / "thresholds.toml", pytester.path / "thresholds.toml")
    pytester.makepyfile(test_audit=AUDIT_TEST)
    monkeypatch.setenv("MOE_FBS_DATA_DIR", str(shared_data_dir))
    monkeypatch.setenv("MOE_FBS_CACHE_DIR", str(session_cache_dir))
    # The suite's own gate tests use the fast random zoo model; the canary (the audit's default) has its own tests.
    monkeypatch.setenv("MOE_FBS_MODEL", "qwen3-moe-tiny")
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))  # for runpytest_subprocess: the suite runs from its checkout
    return pytester
