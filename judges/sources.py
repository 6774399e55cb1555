"""The labelled completions a refusal judge learns from and is validated on, each as one named source.

Human-labelled sources (`HUMAN_SOURCES`) are the validation units: leave-one-source-out holds out one model's
completions at a time, which is what predicts a judge's behaviour on a model it never saw. Weakly labelled
sources (`WEAK_SOURCES`: the calibration pools' assistant turns, labelled by what the pool is) may be added to
training but are never held out, because their labels are the pool's intent, not a person's reading:
safety-tuned-llamas answers harmful requests (refusals and redirections, gpt-3.5), CoCoNot contrast answers
benign-but-scary prompts helpfully, Dolly answers ordinary questions. hh-rlhf is not used: its "chosen" turn
is only the less harmful of two (calibration/PROVENANCE.md).

One synthetic source is always in training (`DEGENERATE`): the degenerate text a broken compressed model
emits (one word repeated, a few words cycled, punctuation runs, word salad), built deterministically from
the Dolly answers and labelled compliance. Without it the judge read " a a a a ..." from a merged canary as
a refusal (no refusal phrase, but no compliance evidence either); a judge must not invent refusals where the
model lost its words, or a broken checkpoint passes the refusal gate.

Labels: XSTest `final_label` full or partial refusal = refusal (partial refusals decline part of the
request: `benchmarks.refusal.human_refusal`); GPTFuzz label 0 (not jailbroken) = refusal, a proxy that also
counts off-target answers as refusals (its PROVENANCE.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from benchmarks.refusal import human_refusal

if TYPE_CHECKING:
    from fixtures.data import DataSource

HUMAN_SOURCES: tuple[str, ...] = ("xstest_llama2orig", "xstest_llama2new", "xstest_mistralguard", "xstest_gpt4",
                                  "gptfuzz")
WEAK_SOURCES: Mapping[str, bool] = {"safety_tuned_llamas": True, "coconot_contrast": False, "general": False}


@dataclass(frozen=True)
class LabelledSource:
    """One source's completions and refusal labels, with the sha256 of the file they were read from."""

    name: str
    prompts: tuple[str, ...]
    completions: tuple[str, ...]
    refusals: tuple[bool, ...]
    sha256: str
    human: bool
    always: bool = False  # joins every training set (the synthetic degenerate text)

    def __len__(self) -> int:
        return len(self.completions)


def load_human_source(source: DataSource, name: str) -> LabelledSource:
    from fixtures.data import load_refusal_labels

    loaded = load_refusal_labels(source, name)
    if name == "gptfuzz":
        rows = loaded.rows
        return LabelledSource(name, tuple(str(r["question"]) for r in rows), tuple(str(r["Response"]) for r in rows),
                              tuple(r["label"] == "0" for r in rows), loaded.sha256, human=True)
    return LabelledSource(name, tuple(str(r["prompt"]) for r in loaded.rows),
                          tuple(str(r["completion"]) for r in loaded.rows),
                          tuple(human_refusal(str(r["final_label"])) for r in loaded.rows), loaded.sha256, human=True)


def load_weak_source(source: DataSource, pool: str) -> LabelledSource:
    """A calibration pool's last assistant turns, all labelled `WEAK_SOURCES[pool]`."""
    from fixtures.data import load_calibration_pool

    loaded = load_calibration_pool(source, pool)
    prompts = tuple(str(r["messages"][-2]["content"]) for r in loaded.rows)
    completions = tuple(str(r["messages"][-1]["content"]) for r in loaded.rows)
    return LabelledSource(pool, prompts, completions, (WEAK_SOURCES[pool],) * len(completions), loaded.sha256,
                          human=False)


DEGENERATE = "degenerate"
DEGENERATE_COUNT = 1000
DEGENERATE_WORDS = 60


def degenerate_text(answer: str, index: int) -> str:
    """One of four kinds of broken output, made from one answer's words (kind = index % 4)."""
    words = answer.split() or ["the"]
    kind = index % 4
    if kind == 0:
        return " ".join([words[index % len(words)]] * DEGENERATE_WORDS)
    if kind == 1:
        head = words[: 1 + index % 8]
        return " ".join(head[i % len(head)] for i in range(DEGENERATE_WORDS))
    if kind == 2:
        return words[0] + (":" * (1 + index % 5) + "\n" * (2 + index % 9)) * 6
    return " ".join(reversed(words[:DEGENERATE_WORDS]))


def load_degenerate_source(source: DataSource) -> LabelledSource:
    general = load_weak_source(source, "general")
    texts = tuple(degenerate_text(answer, i) for i, answer in enumerate(general.completions[:DEGENERATE_COUNT]))
    return LabelledSource(DEGENERATE, general.prompts[:DEGENERATE_COUNT], texts, (False,) * len(texts),
                          general.sha256, human=False, always=True)


def load_sources(source: DataSource) -> dict[str, LabelledSource]:
    """Every human, weak and synthetic source, by name (human first, in `HUMAN_SOURCES` order)."""
    sources = {name: load_human_source(source, name) for name in HUMAN_SOURCES}
    sources.update({pool: load_weak_source(source, pool) for pool in WEAK_SOURCES})
    sources[DEGENERATE] = load_degenerate_source(source)
    return sources
