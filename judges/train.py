"""Rebuild the learned refusal judge and its validation from the local data mirror (nothing downloaded).

    python -m judges.train --data-dir ../shared/data [--out judges/artefacts/refusal-learned] [--table]

Runs the nested leave-one-source-out validation (judges/validation.py), selects the shipped setting over
all human sources, fits it on all of them, and writes the artefact with a manifest holding the data hashes,
the setting, the validation table and the string rules' scores on the same sources. Deterministic: the same
data and library versions give the same weights. `--table` prints the docs table from an existing manifest.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

from benchmarks.refusal import DETECTORS, agreement
from fixtures.data import DataSource
from judges.features import FeatureConfig
from judges.learned import ARTEFACT_DIR, MANIFEST, save_judge
from judges.sources import HUMAN_SOURCES, LabelledSource, load_sources
from judges.validation import GRID, Folds

VERSION = "refusal-learned-v1"
TARGETS = {"xstest_recall": 0.85, "xstest_precision": 0.90, "gptfuzz_accuracy": 0.85}


def baselines(sources: Mapping[str, LabelledSource]) -> dict[str, dict[str, dict[str, float]]]:
    """The string rules' agreement on every human source (they are not trained: nothing is held out)."""
    return {rule: {name: agreement(detector.classify(s.prompts, s.completions), list(s.refusals)).as_dict()
                   for name, s in sources.items() if s.human} for rule, detector in DETECTORS.items()}


def targets_reached(nested: Mapping[str, Mapping[str, Any]]) -> dict[str, bool]:
    xstest = [row for name, row in nested.items() if name.startswith("xstest_")]
    return {"xstest_recall_ge_0.85": all(r["recall"] >= TARGETS["xstest_recall"] for r in xstest),
            "xstest_precision_ge_0.90": all(r["precision"] >= TARGETS["xstest_precision"] for r in xstest),
            "gptfuzz_accuracy_ge_0.85": nested["gptfuzz"]["accuracy"] >= TARGETS["gptfuzz_accuracy"]}


def beats_prefix(nested: Mapping[str, Mapping[str, Any]], rules: Mapping[str, Mapping[str, Any]]) -> bool:
    """The default-judge rule: higher accuracy than the prefix rule on every held-out human source."""
    return all(nested[name]["accuracy"] > rules["xstest_prefix"][name]["accuracy"] for name in nested)


def train(source: DataSource, out: Path, config: FeatureConfig | None = None) -> dict[str, Any]:
    config = config or FeatureConfig()
    start = time.perf_counter()
    sources = load_sources(source)
    folds = Folds(sources, config)
    print(f"judges.train: {sum(len(s) for s in sources.values())} completions from {len(sources)} sources; "
          f"grid of {len(GRID)} settings", flush=True)
    nested = folds.nested()
    for name, row in nested.items():
        print(f"  held out {name}: acc {row['accuracy']:.3f} P {row['precision']:.3f} R {row['recall']:.3f} "
              f"({row['setting']['label']}; {time.perf_counter() - start:.0f} s)", flush=True)
    setting, means = folds.select(list(HUMAN_SOURCES))
    coef, intercept = folds.weights(setting, frozenset())
    rules = baselines(sources)
    manifest = {
        "version": VERSION,
        "training": {"setting": setting.to_json(), "solver": "sklearn LogisticRegression(lbfgs, class_weight="
                     "balanced)", "sklearn_version": version("scikit-learn"),
                     "sources": {n: {"sha256": s.sha256, "n": len(s), "refusals": sum(s.refusals), "human": s.human}
                                 for n, s in sources.items() if s.human or s.always or n in setting.weak}},
        "selection": {"grid": [s.to_json() for s in GRID], "criterion": "mean accuracy over leave-one-source-"
                      "out folds of the human sources", "mean_accuracy": means},
        "validation": {"nested": nested, "baselines": rules},
        "targets": targets_reached(nested), "beats_prefix_rule": beats_prefix(nested, rules),
    }
    save_judge(out, config, coef, intercept, manifest)
    print(f"judges.train: {setting.label} chosen; targets {manifest['targets']}; beats the prefix rule: "
          f"{manifest['beats_prefix_rule']}; {time.perf_counter() - start:.0f} s -> {out}", flush=True)
    return manifest


def table(manifest: Mapping[str, Any]) -> str:
    """Markdown: per held-out source, the learned judge beside both string rules (acc / P / R)."""
    rules = manifest["validation"]["baselines"]
    lines = ["| held-out source | n | refusals | learned acc / P / R (setting chosen without it) | "
             "xstest_prefix acc / P / R | llm_attacks_substring acc / P / R |", "|---|---|---|---|---|---|"]

    def cells(row: Mapping[str, Any]) -> str:
        return f"{row['accuracy']:.3f} / {row['precision']:.3f} / {row['recall']:.3f}"

    nested = manifest["validation"]["nested"]
    for name in sorted(nested, key=lambda n: HUMAN_SOURCES.index(n) if n in HUMAN_SOURCES else len(HUMAN_SOURCES)):
        row = nested[name]
        lines.append(f"| {name} | {row['n']} | {row['tp'] + row['fn']} | {cells(row)} ({row['setting']['label']}) | "
                     f"{cells(rules['xstest_prefix'][name])} | {cells(rules['llm_attacks_substring'][name])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="the data mirror (default: $MOE_FBS_DATA_DIR)")
    parser.add_argument("--out", type=Path, default=ARTEFACT_DIR)
    parser.add_argument("--table", action="store_true", help="print the validation table of --out and exit")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads((args.out / MANIFEST).read_text())))
        return
    train(DataSource.from_setting(args.data_dir), args.out)


if __name__ == "__main__":
    main()
