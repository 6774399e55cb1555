"""The README's family × method table, generated from the family table and the method registry.

`python -m architectures.support` prints it; tests/test_families.py fails when the README's copy is stale, and
builds every registered method (its first scheme, or ratio 0.5) on the tiny instance of each family added
with the architecture layer (tests/test_expert_compression.py and tests/test_quantization.py cover the first
four), so a ✓ is a tested build and plain-transformers reload.
"""

from __future__ import annotations

from architectures.families import FAMILIES


def support_table() -> str:
    """Markdown: one row per family, one column per registered method; refusals numbered below the table."""
    import compressors
    from benchmarks.architecture import recurrent_layers

    methods = compressors.available()
    reasons: list[str] = []
    lines = ["| family (`model_type`) | " + " | ".join(methods) + " | scorer |",
             "|---|" + "---|" * len(methods) + "---|"]
    for family in FAMILIES.values():
        cells = []
        for method in methods:
            reason = family.refusal(method)
            if reason is not None:
                if reason not in reasons:
                    reasons.append(reason)
                cells.append(f"refused ({reasons.index(reason) + 1})")
            elif compressors.get(method).family == "quantization" and family.repack_quantized:
                cells.append("✓ dense")
            else:
                cells.append("✓")
        scorer = "hf (recurrent)" if recurrent_layers({"model_type": family.model_type}) else "shared"
        lines.append(f"| {family.name} (`{family.model_type}`) | " + " | ".join(cells) + f" | {scorer} |")
    notes = [f"({number}) {reason}." for number, reason in enumerate(reasons, start=1)]
    legend = ("✓ dense: quantized on the grid but saved dense (fake-quantized), since plain transformers cannot "
              "reload this family's per-expert compressed keys.")
    return "\n".join([*lines, "", legend, "", *notes])


if __name__ == "__main__":
    print(support_table())
