"""Every report format rendered from the results document: Markdown, HTML, LaTeX, CSV (and the JSON itself).

Why one module: all formats must show the same numbers, grouping and verdicts, so they share one view model
(`reports.tables`) and differ only in their jinja template and their escaping (`reports.escaping`).

A user template directory (`template_dir`, or `MOE_FBS_REPORT_TEMPLATES` when writing at session end) is
searched before the built-in templates, so a project can restyle one format without forking the others.
"""

from __future__ import annotations

import base64
import csv
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from reports.dose_figure import DoseResponse, dose_response
from reports.dose_response import dose_rows, widths_of
from reports.escaping import Tex, arrow, csv_text, fmt, md_cell, tex_escape
from reports.heatmaps import Heatmap, drift_heatmaps
from reports.overview import overview
from reports.paper import panels
from reports.power import detection_power, power_rows, underpowered_passes
from reports.tables import family_of, flip_rows, report_tables, table_of

TEMPLATES = Path(__file__).resolve().parent / "templates"
TEMPLATE_ENV = "MOE_FBS_REPORT_TEMPLATES"
CSV_COLUMNS = (
    "checkpoint", "kind", "table", "family", "method", "scheme", "ratio", "safety_fraction", "seed", "seeds",
    "metric", "dense", "compressed", "delta", "delta_ci_low", "delta_ci_high", "worse_by", "worse_ci_low",
    "worse_ci_high", "allowed", "tolerance", "n_items", "changed_count", "verdict", "error", "detectable", "power",
    "underpowered", "items_needed",
)
MARKS = {"md": {"pass": "pass", "fail": "**FAIL**", "error": "**ERROR**"},
         "html": {"pass": "pass", "fail": "FAIL", "error": "ERROR"},
         "tex": {"pass": Tex("pass"), "fail": Tex(r"\textbf{FAIL}"), "error": Tex(r"\textbf{\textit{ERROR}}")}}


def _environment(kind: str, template_dir: Path | None) -> Any:
    import jinja2
    import markupsafe

    loaders: list[jinja2.BaseLoader] = []
    if template_dir is not None:
        loaders.append(jinja2.FileSystemLoader(str(template_dir)))
    loaders.append(jinja2.FileSystemLoader(str(TEMPLATES)))
    options: dict[str, Any] = {"loader": jinja2.ChoiceLoader(loaders), "trim_blocks": True,
                               "lstrip_blocks": True, "keep_trailing_newline": True}
    filters: dict[str, Callable[..., Any]]
    if kind == "html":
        options["autoescape"] = True
        filters = {"num": fmt, "signed": lambda v: fmt(v, signed=True), "arrow": arrow, "cell": markupsafe.escape}
    elif kind == "tex":
        options["autoescape"] = False
        options["finalize"] = tex_escape
        filters = {"num": lambda v: Tex(fmt(v)), "signed": lambda v: Tex(fmt(v, signed=True)),
                   "arrow": lambda d: Tex(arrow(d, latex=True)), "tex": Tex}
    else:
        options["autoescape"] = False
        filters = {"num": fmt, "signed": lambda v: fmt(v, signed=True), "arrow": arrow, "cell": md_cell}
    env = jinja2.Environment(**options)
    env.filters.update(filters)
    env.globals["marks"] = MARKS[kind]
    env.globals["panels"] = panels
    return env


def _figure(figure: Heatmap) -> dict[str, str]:
    return {"file": figure.file, "title": figure.title,
            "data_uri": "data:image/png;base64," + base64.b64encode(figure.png).decode("ascii")}


def _render(kind: str, name: str, document: dict[str, Any], template_dir: Path | None,
            heatmaps: Sequence[Heatmap] = (), dose: DoseResponse | None = None) -> str:
    env = _environment(kind, template_dir)
    tables = report_tables(document)
    confidence = next((c.get("confidence") for c in document.get("checks", []) if c.get("confidence")), 0.95)
    rows = flip_rows(document)
    dose = dose if dose is not None else DoseResponse(dose_rows(document), None)  # a format alone: no figure
    dose_table = dose.rows
    # checks where no item flipped are folded into one line: the table lists what changed
    unflipped = [f for f in rows if f["changed"] == 0 and f["verdict"] == "pass"]
    return str(env.get_template(name).render(
        doc=document, tables=tables, table=tables[0], overview=overview(document),
        flips=[f for f in rows if f not in unflipped],
        unflipped=unflipped, confidence=confidence, power=power_rows(document),
        underpowered=underpowered_passes(document), detection=detection_power(document),
        blocked=[c for c in document.get("checks", []) if c.get("verdict") == "fail"],
        unmeasured=[c for c in document.get("checks", []) if c.get("verdict") not in ("pass", "fail")],
        heatmaps=[_figure(h) for h in heatmaps], dose=dose_table, dose_widths=widths_of(dose_table),
        trends=[row for row in dose_table if row["trend"]], dose_figure=_figure(dose.figure) if dose.figure else None))


def render_markdown(document: dict[str, Any], template_dir: Path | None = None,
                    heatmaps: Sequence[Heatmap] = (), dose: DoseResponse | None = None) -> str:
    """GitHub-flavoured Markdown: the report people read in CI logs and pull requests (heatmaps as PNG links)."""
    return _render("md", "report.md.j2", document, template_dir, heatmaps, dose)


def render_html(document: dict[str, Any], template_dir: Path | None = None,
                heatmaps: Sequence[Heatmap] = (), dose: DoseResponse | None = None) -> str:
    """One self-contained HTML file (inline CSS, images as data URIs) so it survives being a CI artifact."""
    return _render("html", "report.html.j2", document, template_dir, heatmaps, dose)


def render_latex(document: dict[str, Any], template_dir: Path | None = None,
                 heatmaps: Sequence[Heatmap] = (), dose: DoseResponse | None = None) -> str:
    """A standalone LaTeX document with booktabs tables, ready to paste into a paper (heatmaps included from
    the PNG files written beside it)."""
    return _render("tex", "report.tex.j2", document, template_dir, heatmaps, dose)


def render_csv(document: dict[str, Any]) -> str:
    """One row per check, full precision, for spreadsheets and pandas; `table` says which report table shows
    the check's row ("1", "2", … per compression ratio, "A" for the per-seed appendix)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    tables = table_of(document)
    for check in document.get("checks", []):
        checkpoint, method = check["checkpoint"], check["checkpoint"].get("method") or {}
        delta_ci, worse_ci = check.get("delta_ci") or [None, None], check.get("worse_ci") or [None, None]
        seeds = checkpoint.get("seeds")
        row = {
            "checkpoint": checkpoint["id"], "kind": checkpoint.get("kind", "checkpoint"),
            "table": tables.get(checkpoint["id"]), "family": family_of(str(method.get("method", "?"))),
            "method": method.get("method"), "scheme": method.get("scheme"), "ratio": method.get("ratio"),
            "safety_fraction": checkpoint.get("safety_fraction"), "seed": checkpoint.get("seed"),
            "seeds": " ".join(str(s) for s in seeds) if isinstance(seeds, list) else None,
            "metric": check.get("metric"), "dense": check.get("dense"), "compressed": check.get("compressed"),
            "delta": check.get("delta"), "delta_ci_low": delta_ci[0], "delta_ci_high": delta_ci[1],
            "worse_by": check.get("worse_by"), "worse_ci_low": worse_ci[0], "worse_ci_high": worse_ci[1],
            "allowed": check.get("allowed"), "tolerance": check.get("tolerance"), "n_items": check.get("n_items"),
            "changed_count": check.get("changed_count"), "verdict": check.get("verdict"),
            "error": check.get("error"), "detectable": check.get("detectable"), "power": check.get("power"),
            "underpowered": check.get("underpowered"), "items_needed": check.get("items_needed"),
        }
        writer.writerow({key: "" if value is None else csv_text(value) for key, value in row.items()})
    return out.getvalue()


def template_dir_from_env() -> Path | None:
    """The user template directory for session-end and merge reports (neither has a CLI flag for it)."""
    value = os.environ.get(TEMPLATE_ENV)
    return Path(value) if value else None


def write_reports(document: dict[str, Any], out_dir: Path, template_dir: Path | None = None,
                  dose: DoseResponse | None = None) -> list[Path]:
    """Write every format into `out_dir`; report.md and results.json come first (the summary line names them).
    `dose`: the dose-response already fitted for this document (the session's terminal summary shares it).

    The JSON is written first and atomically: it is the data every other format is derived from, so it must
    exist even when a template is broken.
    """
    from fixtures.cache import write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.json"
    write_json_atomic(results_path, document)
    heatmaps = drift_heatmaps(document)
    dose = dose if dose is not None else dose_response(document)
    for stale in [*out_dir.glob("heatmap_*.png"), *out_dir.glob("dose_response*.png")]:
        stale.unlink()  # a previous run's figures would be mistaken for this run's
    figures = [*heatmaps, *([dose.figure] if dose.figure else [])]
    for figure in figures:
        (out_dir / figure.file).write_bytes(figure.png)
    outputs = {
        "report.md": render_markdown(document, template_dir, heatmaps, dose),
        "report.html": render_html(document, template_dir, heatmaps, dose),
        "report.tex": render_latex(document, template_dir, heatmaps, dose),
        "checks.csv": render_csv(document),
    }
    for name, text in outputs.items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return [out_dir / "report.md", results_path, out_dir / "report.html", out_dir / "report.tex",
            out_dir / "checks.csv", *(out_dir / f.file for f in figures)]
