"""Number formatting and escaping for every report format.

Why never left to the templates' goodwill: dataset text (item ids, generations, error messages) is untrusted
and may hold markup of any output language — AdvBench strings are adversarial by design. HTML uses jinja
autoescape, LaTeX a `finalize` hook that escapes every expression not explicitly marked as LaTeX markup (`Tex`),
Markdown a cell filter, CSV a formula guard on top of the csv module's quoting.
"""

from __future__ import annotations

from typing import Any

from reports.tables import number


def fmt(value: Any, signed: bool = False) -> str:
    """Three decimals, "–" for a missing or non-finite value."""
    value = number(value)
    if value is None:
        return "–"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def md_cell(text: Any) -> str:
    """Markdown cells cannot hold pipes or newlines, and raw HTML in them would be rendered by viewers."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


_TEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
    ">": r"\textgreater{}", "\n": " ", "\r": " ",
    # symbols our own titles use that inputenc's utf8 does not map in text mode
    "Δ": r"$\Delta$", "−": r"$-$", "→": r"$\rightarrow$", "↑": r"$\uparrow$", "↓": r"$\downarrow$",
}


class Tex(str):
    """LaTeX markup produced by the report's filters; everything else printed in a .tex template is escaped."""

    __slots__ = ()


def tex_escape(text: Any) -> Tex:
    """Escape LaTeX specials (and < >, which the default font encoding prints as other glyphs)."""
    if isinstance(text, Tex):
        return text
    return Tex("".join(_TEX_SPECIALS.get(char, char) for char in str(text)))


def arrow(direction: tuple[str, float | None] | None, latex: bool = False) -> str:
    """↑ higher is better, ↓ lower is better, →x closer to x is better."""
    if direction is None:
        return ""
    kind, target = direction
    if kind == "target":
        return (r"$\rightarrow$" if latex else "→") + f"{target:g}"
    if latex:
        return r"$\uparrow$" if kind == "higher" else r"$\downarrow$"
    return "↑" if kind == "higher" else "↓"


def csv_text(value: Any) -> Any:
    """Neutralise spreadsheet formulas in dataset text (a cell starting with = + - @ would be evaluated)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
