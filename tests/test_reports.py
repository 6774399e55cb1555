"""Report formats rendered from a fixed results document (no models, well under a second each).

Golden files: tests/golden/report.md, report.tex and checks.csv are the expected renderings of
tests/golden/results_small.json (a real run's checks, extended by hand with a second calibration seed and its
seed mean, a second compression ratio and per-dataset drift values, so every table and heatmap kind is
exercised). After an intended change to a template or to reports/ (formats, tables, escaping), regenerate them
with `UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_reports.py` and review the diff before committing.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from reports.escaping import tex_escape
from reports.formats import render_csv, render_html, render_latex, render_markdown, write_reports
from reports.heatmaps import heatmap_grids
from reports.merge import main as merge_main
from reports.render import SCHEMA_FILE, build_document
from reports.tables import metric_direction, report_tables, table_model

GOLDEN = Path(__file__).resolve().parent / "golden"
SCRIPT = "<script>alert(1)</script>"
ATTRIBUTE = '"><img src=x onerror=alert(1)>'


@pytest.fixture
def document() -> dict[str, Any]:
    return json.loads((GOLDEN / "results_small.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize(("name", "render"), [("report.md", render_markdown), ("report.tex", render_latex),
                                              ("checks.csv", render_csv)])
def test_golden(document: dict[str, Any], name: str, render: Any) -> None:
    text = render(document)
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name} changed; UPDATE_GOLDEN=1 regenerates it"


def test_directions_come_from_the_tolerance_text() -> None:
    assert metric_direction("abs 0.05 (higher is better, mode ci 95%)") == ("higher", None)
    assert metric_direction("abs 0.1 (lower is better, mode ci 95%)") == ("lower", None)
    assert metric_direction("abs 0.05 (closer to 0.5, mode ci 95%)") == ("target", 0.5)
    assert metric_direction(None) is None


def _rows(table: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for group in table["groups"] for row in group["rows"]}


def test_table_groups_by_family_and_bolds_the_best(document: dict[str, Any]) -> None:
    table = table_model(document)
    assert [group["family"] for group in table["groups"]] == ["quantization", "expert"]
    cells = {row_id: row["cells"] for row_id, row in _rows(table).items()}
    # bbq.acc: higher is better -> gptq's 0.505 is best; drift: lower is better -> gptq again
    assert cells["gptq-w4a16-safety0-seed0"]["bbq.acc"]["best"]
    assert not cells["reap-r50-safety0-seedmean"]["bbq.acc"]["best"]
    assert cells["gptq-w4a16-safety0-seed0"]["drift.delta_cross_nll_t0"]["best"]
    assert not cells["reap-r50-safety100-seed0"]["crows_pairs.pct_stereotype"]["best"]  # an error never wins


def test_one_table_per_ratio_seed_means_in_the_tables_seeds_in_the_appendix(document: dict[str, Any]) -> None:
    tables = report_tables(document)
    assert [t["key"] for t in tables] == ["1", "2", "A"]
    first, second, appendix = (_rows(t) for t in tables)
    # Table 1: everything without a ratio plus the first ratio (50%); per-seed rows of an averaged setting
    # are replaced by their seed mean and listed in the appendix
    assert list(first) == ["gptq-w4a16-safety0-seed0", "reap-r50-safety0-seedmean", "reap-r50-safety100-seed0"]
    assert list(second) == ["reap-r25-safety0-seed0"]
    assert list(appendix) == ["reap-r50-safety0-seed0", "reap-r50-safety0-seed1"]
    assert "50%" in tables[0]["title"] and "25%" in tables[1]["title"]
    # bold is per table: the only row of Table 2 is its best, though Table 1 has a better bbq.acc
    assert second["reap-r25-safety0-seed0"]["cells"]["bbq.acc"]["best"]
    assert appendix["reap-r50-safety0-seed1"]["cells"]["bbq.acc"]["best"]
    assert not appendix["reap-r50-safety0-seed0"]["cells"]["bbq.acc"]["best"]
    assert first["reap-r50-safety0-seedmean"]["seed"] == "mean 0,1"
    for render in (render_markdown, render_html):
        text = render(document)
        for key in ("1", "2", "A"):
            assert f"Table {key}:" in text, (render.__name__, key)
    latex = render_latex(document)  # unnumbered captions (caption*) that name the report's own key
    assert "\\caption{" not in latex and all(f"\\textbf{{Table {key}a.}}" in latex for key in ("1", "2", "A"))
    csv_rows = render_csv(document).splitlines()
    assert csv_rows[0].startswith("checkpoint,kind,table,")
    assert any(r.startswith("reap-r50-safety0-seedmean,seed_mean,1,") for r in csv_rows)
    assert any(r.startswith("reap-r50-safety0-seed1,checkpoint,A,") for r in csv_rows)
    assert any(r.startswith("reap-r25-safety0-seed0,checkpoint,2,") for r in csv_rows)


def test_every_cell_shows_value_delta_ci_and_verdict_in_every_format(document: dict[str, Any]) -> None:
    """The seed-mean drift cell of Table 1: 0.840 (+0.840 [ci]) FAIL, in each format's own marking."""
    check = next(c for c in document["checks"] if c["checkpoint"]["id"] == "reap-r50-safety0-seedmean"
                 and c["metric"] == "drift.delta_cross_nll_t0")
    value, (low, high) = f"{check['compressed']:.3f}", (f"{v:+.3f}" for v in check["delta_ci"])
    delta = f"{check['delta']:+.3f}"
    assert f"{value} ({delta} [{low}, {high}]) **FAIL**" in render_markdown(document)
    assert (f"{value}</span><br><span class=\"ci\">{delta} [{low}, {high}]</span><br>"
            '<span class="v-fail">FAIL</span>') in render_html(document)
    latex = render_latex(document)  # the paper layout: value (delta) here, the interval in the CI companion
    assert f"{value}\\,{{\\scriptsize({delta})}}$^{{\\times}}$" in latex
    assert f"\\mbox{{\\scriptsize [{low}, {high}]$^{{\\times}}$}}" in latex


def test_verdicts_are_visibly_different(document: dict[str, Any]) -> None:
    html = render_html(document)
    assert 'class="v-pass"' in html and 'class="v-fail">FAIL' in html and 'class="v-error">ERROR' in html
    markdown = render_markdown(document)
    assert "**FAIL**" in markdown and "**ERROR**" in markdown
    assert r"\textbf{FAIL}" in render_latex(document)


def _hostile(document: dict[str, Any]) -> dict[str, Any]:
    hostile = copy.deepcopy(document)
    for check in hostile["checks"]:
        for item in check.get("changed_items") or []:
            item["item_id"] = f"{SCRIPT}{ATTRIBUTE}"
            item["compressed"] = SCRIPT
        if check["verdict"] == "error":
            check["error"] = f"boom {SCRIPT} {ATTRIBUTE}"
    hostile["model"] = ATTRIBUTE
    return hostile


def test_dataset_text_is_escaped_in_html_and_latex(document: dict[str, Any]) -> None:
    hostile = _hostile(document)
    html = render_html(hostile)
    assert "<script" not in html.lower()  # the report itself has no script either: it must be inert
    assert "<img src=x" not in html and 'onerror=alert(1)>' not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    latex = render_latex(hostile)
    assert "<script>" not in latex and "\\textless{}script\\textgreater{}" in latex
    markdown = render_markdown(hostile)
    assert "<script>" not in markdown and "&lt;script&gt;" in markdown


def test_latex_escapes_every_special() -> None:
    assert tex_escape("& % $ # _ { } ~ ^ \\") == (
        r"\& \% \$ \# \_ \{ \} \textasciitilde{} \textasciicircum{} \textbackslash{}")


def test_csv_neutralises_formulas(document: dict[str, Any]) -> None:
    hostile = copy.deepcopy(document)
    next(c for c in hostile["checks"] if c["verdict"] == "error")["error"] = "=HYPERLINK(\"http://x\")"
    text = render_csv(hostile)
    assert "'=HYPERLINK" in text and ",=HYPERLINK" not in text and ',"=HYPERLINK' not in text


def test_user_template_dir_overrides_one_format(document: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "report.md.j2").write_text("custom {{ doc.model }}\n")
    assert render_markdown(document, tmp_path) == "custom qwen3-moe-tiny\n"
    assert "\\begin{tabular}" in render_latex(document, tmp_path)  # the others still use the built-ins


def test_merge_writes_every_format(document: dict[str, Any], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    shards = []
    ids = sorted({c["checkpoint"]["id"] for c in document["checks"]})
    for index, subset in enumerate((ids[:1], ids[1:])):
        shard = {**document, "checks": [c for c in document["checks"] if c["checkpoint"]["id"] in subset]}
        path = tmp_path / f"shard{index}.json"
        path.write_text(json.dumps(shard), encoding="utf-8")
        shards.append(str(path))
    out = tmp_path / "merged"
    assert merge_main([*shards, "--out", str(out)]) == 1  # the fixture has blocked checkpoints
    for name in ("report.md", "report.html", "report.tex", "checks.csv", "results.json"):
        assert (out / name).stat().st_size > 0, name
    merged = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert len(merged["checks"]) == len(document["checks"])
    assert f"report -> {out / 'report.md'}" in capsys.readouterr().out
    html = (out / "report.html").read_text(encoding="utf-8")
    if list(out.glob("heatmap_*.png")):  # matplotlib is optional; when present the maps are embedded
        assert "data:image/png;base64," in html
    assert "<link" not in html and "<script" not in html  # self-contained and inert


def test_drift_heatmaps_are_checkpoint_by_dataset_per_temperature_and_their_change(
        document: dict[str, Any]) -> None:
    grids = {file: (rows, columns, values) for file, _, rows, columns, values in heatmap_grids(document)}
    assert set(grids) == {"heatmap_delta_cross_nll_t0.png", "heatmap_delta_cross_nll_t0.7.png",
                          "heatmap_delta_cross_nll_t0.7_minus_t0.png"}
    rows, columns, cold = grids["heatmap_delta_cross_nll_t0.png"]
    # rows: the main tables' rows (seed means, not their seeds), in table order
    assert rows == ["gptq-w4a16-safety0-seed0", "reap-r50-safety0-seedmean", "reap-r50-safety100-seed0",
                    "reap-r25-safety0-seed0"]
    assert columns == ["advbench", "bbq", "crows_pairs", "stereoset", "xstest", "all"]
    check = next(c for c in document["checks"] if c["checkpoint"]["id"] == "reap-r50-safety0-seedmean"
                 and c["metric"] == "drift.delta_cross_nll_t0")
    assert cold[1] == [check["by_dataset"][d]["compressed"] for d in columns[:-1]] + [check["compressed"]]
    _, _, hot = grids["heatmap_delta_cross_nll_t0.7.png"]
    _, _, change = grids["heatmap_delta_cross_nll_t0.7_minus_t0.png"]
    assert change == [[h - c for h, c in zip(hr, cr, strict=True)] for hr, cr in zip(hot, cold, strict=True)]


def test_without_per_dataset_values_the_maps_are_by_temperature(document: dict[str, Any]) -> None:
    for check in document["checks"]:
        check["by_dataset"] = None
    grids = heatmap_grids(document)
    assert [(file, columns) for file, _, _, columns, _ in grids] == [
        ("heatmap_delta_cross_nll.png", ["T=0", "T=0.7"])]


def test_heatmaps_are_written_embedded_and_linked(document: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "heatmap_stale_from_an_old_run.png").write_bytes(b"old")
    outputs = write_reports(document, tmp_path)
    pngs = sorted(path.name for path in tmp_path.glob("heatmap_*.png"))
    assert pngs == sorted(file for file, *_ in heatmap_grids(document))
    assert all((tmp_path / name).read_bytes().startswith(b"\x89PNG") for name in pngs)
    assert {tmp_path / name for name in pngs} <= set(outputs)
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == len(pngs)
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert all(f"]({name})" in markdown for name in pngs)
    assert all(f"{{{name}}}" in (tmp_path / "report.tex").read_text(encoding="utf-8") for name in pngs)


def schema_errors(document: dict[str, Any]) -> list[str]:
    import jsonschema

    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return [f"{e.json_path}: {e.message}" for e in jsonschema.Draft202012Validator(schema).iter_errors(document)]


def test_results_schema_documents_every_field(document: dict[str, Any]) -> None:
    assert schema_errors(document) == []
    rebuilt = build_document(document["checks"], document["settings"], "2026-01-01T00:00:00+0000")
    assert schema_errors(rebuilt) == []
    undocumented = copy.deepcopy(document)
    undocumented["checks"][0]["new_field"] = 1
    undocumented["checkpoints"][0]["checkpoint_note"] = "x"
    errors = schema_errors(undocumented)
    assert len(errors) == 2 and "new_field" in errors[0] + errors[1], errors


def test_flip_checks_without_flips_are_folded_into_one_line(document: dict[str, Any]) -> None:
    flip_checks = [c for c in document["checks"] if ".flip_" in c["metric"] and c["verdict"] == "pass"]
    quiet = flip_checks[0]
    quiet.update(changed_count=0, changed_items=[], compressed=0.0)
    markdown, html = render_markdown(document), render_html(document)
    row_start = f"| {quiet['checkpoint']['id']} | {quiet['metric']} | 0 /"
    assert row_start not in markdown
    assert f"No item flipped in 1 flip check(s): `{quiet['checkpoint']['id']}` {quiet['metric']}." in markdown
    assert "<summary>No item flipped in 1 flip check(s)</summary>" in html
    assert all(f"| {c['checkpoint']['id']} | {c['metric']} |" in markdown for c in flip_checks[1:])


def test_columns_are_headed_by_paper_labels_and_ids_stay_in_the_data(document: dict[str, Any]) -> None:
    """Markdown, HTML and LaTeX head the columns with the words a reader knows and list label = id below the
    tables; the CSV keeps the ids (what `-k`, thresholds.toml and results.json use)."""
    from reports.labels import METRIC_LABELS

    metrics = document["metrics"]
    assert metrics and all(m in METRIC_LABELS for m in metrics)
    markdown, html, latex = render_markdown(document), render_html(document), render_latex(document)
    header = next(line for line in markdown.splitlines() if line.startswith("| family |"))
    assert METRIC_LABELS["bbq.amb_bias_score"] in header and "bbq.amb_bias_score" not in header
    assert f"{METRIC_LABELS['bbq.amb_bias_score']} = `bbq.amb_bias_score`" in markdown
    assert f'<th title="bbq.amb_bias_score">{METRIC_LABELS["bbq.amb_bias_score"]}' in html
    assert tex_escape(METRIC_LABELS["crows_pairs.pct_stereotype"]) in latex
    assert "bbq.amb_bias_score" in render_csv(document) and METRIC_LABELS["bbq.amb_bias_score"] not in render_csv(
        document)


def test_html_opens_with_the_verdict_and_the_overview_grid(document: dict[str, Any]) -> None:
    """Before any table: the headline, each blocked checkpoint with its checks, then checkpoint × metric cells
    coloured by the worsening in tolerance units and marked ✕ where blocked."""
    from reports.overview import colour, overview

    html = render_html(document)
    assert html.index('id="verdict"') < html.index('class="overview"') < html.index('id="table-1"')
    view = overview(document)
    assert view["headline"].startswith("4 of 6 checkpoint(s) blocked")
    blocked = {name for name, _ in view["blocked"]}
    assert "reap-r50-safety0-seed0" in blocked and "gptq-w4a16-safety0-seed0" not in blocked
    failing = [c for row in view["rows"] for c in row["cells"] if c["verdict"] == "fail"]
    assert failing and all(c["mark"] == "✕" and c["units"] > 1 for c in failing)
    assert html.count(">✕</td>") == len(failing)
    greens = [colour(u) for u in (-1.0, 0.0)]
    assert greens[0] == greens[1] and colour(1.0) != colour(0.5) != colour(3.0) and colour(None) == "#e0e0e0"


def test_latex_tables_are_paper_panels_with_grouped_heads_and_a_ci_companion(document: dict[str, Any]) -> None:
    """Headline metrics (Social Bias / Safety & Refusal / Capability) in one panel, flips and drift in the
    next, at most MAX_PANEL_COLUMNS metrics each, no \\resizebox; every panel has its CI companion; captions
    are numbered once by the report (Table 1a), not again by LaTeX."""
    from reports.labels import HEADLINE_GROUPS
    from reports.paper import MAX_PANEL_COLUMNS, panels

    table = table_model(document)
    split = panels(table)
    assert [[g["name"] for g in p["groups"]] for p in split] == [["Social Bias", "Capability"],
                                                                  ["Item Flips", "Generation Drift"]]
    assert sorted(c["metric"] for p in split for c in p["columns"]) == sorted(document["metrics"])
    narrow = panels(table, limit=2)
    # headline groups never share a panel with flips or drift; a group that does not fit starts a new panel
    assert [[g["name"] for g in p["groups"]] for p in narrow] == [["Social Bias"], ["Capability"], ["Item Flips"],
                                                                   ["Generation Drift"]]
    assert all(len(p["columns"]) <= 2 for p in narrow) and [p["letter"] for p in narrow] == ["a", "b", "c", "d"]
    assert all(g["name"] in HEADLINE_GROUPS for p in narrow[:2] for g in p["groups"])
    assert all(len(p["columns"]) <= MAX_PANEL_COLUMNS for p in split)
    latex = render_latex(document)
    assert "\\resizebox" not in latex and "\\caption{" not in latex
    for key in ("1a", "1b", "2a", "Aa"):
        assert f"\\textbf{{Table {key}.}}" in latex and f"\\textbf{{Table {key} CI.}}" in latex
    assert "\\multicolumn{2}{c}{Social Bias}" in latex and "\\cmidrule(lr){6-7}" in latex
    html = render_html(document)  # the overview grid heads its columns by the same groups, in the same order
    assert html.index(">Social Bias</th>") < html.index(">Capability</th>") < html.index(">Item Flips</th>")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="needs pdflatex (Debian: texlive-latex-recommended)")
def test_latex_report_compiles_without_overfull_tables(document: dict[str, Any], tmp_path: Path) -> None:
    """The golden document's report.tex compiles with pdflatex and no table is wider than the page."""
    write_reports(document, tmp_path)
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "report.tex"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:]
    log = (tmp_path / "report.log").read_text(encoding="utf-8", errors="replace")
    widths = [float(w) for w in re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide\) in (?:paragraph|alignment)",
                                           log)]
    assert all(width < 6 for width in widths), widths  # a few points of a CI cell, never a column off the page
