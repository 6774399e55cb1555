"""Collects every audit record from the test reports (so it works under xdist) and renders the report.

Why from reports and not from fixtures: under `pytest -n N` fixtures run in workers, while `user_properties`
travel with each test report to the controller, which alone writes the files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from reports.dose_figure import DoseResponse

AUDIT_PROPERTY = "moe_fbs_audit"


class ReportCollector:
    """Registered once per run; keeps the latest record of each audit test by node id."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.records: dict[str, dict[str, Any]] = {}
        self.outputs: list[Path] = []
        self.dose: DoseResponse | None = None  # fitted once, shared by the report and the terminal

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for name, value in report.user_properties:
            if name != AUDIT_PROPERTY or not isinstance(value, dict):
                continue
            record = dict(value)
            if report.failed and report.when != "call":
                record["verdict"] = "error"
                record.setdefault("error", _short(report.longreprtext))
            record["nodeid"] = report.nodeid
            self.records[report.nodeid] = record

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if hasattr(self.config, "workerinput") or not self.records:
            return  # xdist worker (the controller writes), or no audit test ran
        from fixtures.plugin import CONFIG_KEY
        from reports.dose_figure import dose_response
        from reports.formats import template_dir_from_env, write_reports
        from reports.render import build_document, run_settings

        audit_config = self.config.stash[CONFIG_KEY]
        document = build_document(list(self.records.values()), run_settings(audit_config),
                                  finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        # outputs[0] is report.md and outputs[1] results.json: the summary line names them in that order
        self.dose = dose_response(document)
        self.outputs = write_reports(document, audit_config.report_dir, template_dir_from_env(), self.dose)

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        if not self.outputs:
            return
        records = list(self.records.values())
        counts = {v: sum(r.get("verdict") == v for r in records) for v in ("pass", "fail", "error")}
        checkpoints = {r["checkpoint"]["id"] for r in records if r["checkpoint"].get("kind") != "seed_mean"}
        seed_means = {r["checkpoint"]["id"] for r in records} - checkpoints
        blocked = sorted({r["checkpoint"]["id"] for r in records if r.get("verdict") == "fail"})
        unmeasured = unmeasured_causes(records)
        terminalreporter.write_sep("=", "moe-fbs-audit")
        for line in placement_lines(records):
            terminalreporter.write_line(line)
        if blocked:
            terminalreporter.write_line(
                "blocked by the gate (the gate doing its job: a check of these checkpoints failed its tolerance; "
                f"exit status 1 means blocked checkpoints, not a crash): {', '.join(blocked)}")
        if unmeasured:
            terminalreporter.write_line(
                "could not be measured (errors, not verdicts: fix the cause and run again):")
            for checkpoint, (count, cause) in unmeasured.items():
                terminalreporter.write_line(f"  {checkpoint}: {count} check(s): {cause}")
        for line in underpowered_lines(records) + trend_lines(self.dose.rows if self.dose else []):
            terminalreporter.write_line(line)
        terminalreporter.write_line(
            f"moe-fbs-audit: {len(checkpoints)} checkpoint(s)"
            + (f" + {len(seed_means)} seed mean(s)" if seed_means else "")
            + f", {len(records)} checks: {counts['pass']} pass, "
            f"{counts['fail']} fail, {counts['error']} error; {len(blocked)} blocked, {len(unmeasured)} not measured; "
            f"report -> {self.outputs[0]} (results: {self.outputs[1]})"
            + (f"; also {', '.join(path.name for path in self.outputs[2:])}" if self.outputs[2:] else ""))


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(ReportCollector(config), "moe-fbs-audit-report")


def trend_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Monotone worsening trends over bit width with a significant slope (of `dose_rows`), named even when every
    width passes."""
    trends = [row for row in rows if row["trend"]]
    if not trends:
        return []
    return [f"dose-response: {len(trends)} monotone worsening trend(s) over bit width with a significant slope "
            "(each width may still pass; the report's dose-response section has the figure):"] + [
        f"  {r['method']} safety {r['safety']} {r['metric']}: {r['slope'][0]:+.3f} per bit removed "
        f"[{r['slope'][1]:+.3f}, {r['slope'][2]:+.3f}], "
        + " -> ".join(f"{bits}-bit {value:.3f}" for bits, value in r["values"].items() if value is not None)
        for r in trends]


def underpowered_lines(records: list[dict[str, Any]]) -> list[str]:
    """Passing checks that could miss twice their tolerance, one line per metric with the items that would do."""
    by_metric: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record.get("verdict") == "pass" and record.get("underpowered"):
            by_metric.setdefault(record["metric"], []).append(record)
    if not by_metric:
        return []
    level = next(float(r["detection_power"]) for checks in by_metric.values() for r in checks)
    lines = [f"underpowered passes (a worsening of twice the tolerance would be blocked less than {level:.0%} of "
             f"the time; the report's power table has every metric): {sum(map(len, by_metric.values()))} check(s)"]
    for metric, checks in by_metric.items():
        needed = [int(r["items_needed"]) for r in checks if r.get("items_needed")]
        lines.append(f"  {metric}: {len(checks)} check(s) over {min(int(r['n_items']) for r in checks)} items, "
                     f"detectable worsening up to {max(float(r['detectable']) for r in checks):.3f} vs allowed "
                     f"{min(float(r['allowed']) for r in checks):.3f}"
                     + (f"; about {max(needed)} items would make them powered" if needed else ""))
    return lines


def unmeasured_causes(records: list[dict[str, Any]]) -> dict[str, tuple[int, str]]:
    """Checkpoint id -> (errored checks, the first error's first line), in grid order."""
    causes: dict[str, tuple[int, str]] = {}
    for record in records:
        if record.get("verdict") not in ("pass", "fail"):
            checkpoint = record["checkpoint"]["id"]
            count, cause = causes.get(checkpoint, (0, str(record.get("error") or "unknown error").splitlines()[0]))
            causes[checkpoint] = (count + 1, cause)
    return causes


def placement_lines(records: list[dict[str, Any]]) -> list[str]:
    """One line per worker: its GPU (CUDA_VISIBLE_DEVICES and torch's current device) and its checkpoints."""
    by_worker: dict[tuple[str, ...], list[str]] = {}
    for record in records:
        place = record.get("placement")
        if not isinstance(place, dict):
            continue
        where = place["device"] if "device_name" not in place else \
            f"cuda:{place['current_device']} {place['device_name']}"
        key = (place["worker"], str(place["cuda_visible_devices"]), where)
        checkpoints = by_worker.setdefault(key, [])
        if record["checkpoint"]["id"] not in checkpoints:
            checkpoints.append(record["checkpoint"]["id"])
    return [f"worker {worker} (CUDA_VISIBLE_DEVICES={visible}) on {where}: {len(ids)} checkpoint(s): {', '.join(ids)}"
            for (worker, visible, where), ids in sorted(by_worker.items())]


def _short(text: str, limit: int = 600) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-3:])[-limit:]
