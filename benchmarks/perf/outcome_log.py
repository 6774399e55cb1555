"""A pytest plugin for long GPU runs: each audit check's verdict appended to a JSON-lines file as it ends.

Why: a run cut short by a time limit writes no results.json (the report is written at session end), and a
device call returns only what is on disk. With `-p benchmarks.perf.outcome_log` and `MOE_FBS_OUTCOME_LOG=FILE`
every finished check is already in FILE (checkpoint id, metric, verdict, error), and the first line of each
error is printed as it happens, so the log shows failures before the limit cuts the run. With
`MOE_FBS_STACK_PROFILE=FILE` the run's main thread is sampled (`benchmarks.perf.stack_sampler`) and the profile
written to FILE at the end, and also every `PROFILE_EVERY_S` seconds, so a cut-short run keeps one too.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest

from reports.plugin import AUDIT_PROPERTY

ENV = "MOE_FBS_OUTCOME_LOG"
PROFILE_ENV = "MOE_FBS_STACK_PROFILE"
PROFILE_EVERY_S = 30.0
_sampler: Any = None


def outcome(report: pytest.TestReport) -> dict[str, Any] | None:
    """The audit record of a finished check as one JSON-ready line, or None for other reports."""
    if report.when != "call" and not (report.failed and report.when == "setup"):
        return None
    for name, value in report.user_properties:
        if name == AUDIT_PROPERTY and isinstance(value, dict):
            checkpoint = value.get("checkpoint") or {}
            verdict = "error" if report.failed and report.when != "call" else value.get("verdict")
            error = value.get("error") or (report.longreprtext.splitlines()[-1:] or [""])[0] \
                if verdict == "error" else None
            return {"nodeid": report.nodeid, "checkpoint": checkpoint.get("id"), "metric": value.get("metric"),
                    "verdict": verdict, "error": error, "seconds": round(report.duration, 3)}
    return None


def pytest_configure(config: pytest.Config) -> None:
    global _sampler
    if os.environ.get(PROFILE_ENV) and not hasattr(config, "workerinput"):
        from benchmarks.perf.stack_sampler import StackSampler

        _sampler = StackSampler(write_to=os.environ[PROFILE_ENV], write_every=PROFILE_EVERY_S)
        _sampler.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _sampler is not None:
        _sampler.stop()
        _sampler.write()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = os.environ.get(ENV)
    line = outcome(report)
    if not path or line is None:
        return
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")
    if line["verdict"] == "error":
        print(f"\nERROR {line['checkpoint']} {line['metric']}: {str(line['error'])[:400]}", file=sys.stderr)
