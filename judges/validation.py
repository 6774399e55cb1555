"""Fitting the learned judge and validating it the way that predicts unseen models: leave one source out.

Nested selection, so no number in the table was tuned on the source it reports: for each human source S
held out, every hyperparameter setting in `GRID` is scored by leave-one-source-out over the *other* human
sources, the best (mean accuracy) is refitted on all sources but S and tested on S. The shipped judge is
selected the same way over all human sources and fitted on all of them. Weak sources (judges/sources.py)
join a training set when the setting says so, the synthetic degenerate text always; neither is held out.
Fits are memoised by (setting, excluded sources): the inner fold that holds out {A, B} is the same fit
for outer A and outer B.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from benchmarks.refusal import Agreement, agreement
from judges.features import FeatureConfig, segments, vectorize
from judges.learned import LearnedJudge

if TYPE_CHECKING:
    import numpy as np
    import scipy.sparse

    from judges.sources import LabelledSource

MAX_ITER = 5000


@dataclass(frozen=True)
class Setting:
    """One hyperparameter setting: inverse L2 strength and which weak sources join training."""

    c: float
    weak: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"C={self.c:g} weak={'+'.join(self.weak) or 'none'}"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "weak": list(self.weak), "label": self.label}

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> Setting:
        return cls(float(payload["c"]), tuple(payload["weak"]))


NEGATIVES = ("coconot_contrast", "general")
GRID: tuple[Setting, ...] = tuple(Setting(c, weak) for c in (4.0, 16.0)
                                  for weak in ((), NEGATIVES, ("safety_tuned_llamas", *NEGATIVES)))


def fit_matrix(features: scipy.sparse.csr_matrix, labels: Sequence[bool], setting: Setting) -> tuple[np.ndarray, float]:
    """(coef, intercept) of a class-balanced L2 logistic regression on hashed features."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=setting.c, class_weight="balanced", max_iter=MAX_ITER)
    model.fit(features, list(labels))
    return model.coef_[0].astype("float32"), float(model.intercept_[0])


class Folds:
    """Memoised fits over one collection of sources; every source is vectorised once (for training: the
    whole opening; for scoring: its speaker segments, as the judge reads them)."""

    def __init__(self, sources: Mapping[str, LabelledSource], config: FeatureConfig) -> None:
        self.sources, self.config = sources, config
        self.human = [name for name, source in sources.items() if source.human]
        self._fits: dict[tuple[Setting, frozenset[str]], tuple[np.ndarray, float]] = {}
        self._train = {name: vectorize(source.completions, config) for name, source in sources.items()}
        self._segments = {name: self._segment_features(self.sources[name]) for name in self.human}

    def _segment_features(self, source: LabelledSource) -> tuple[scipy.sparse.csr_matrix, list[int]]:
        pieces = [segments(text, self.config) for text in source.completions]
        owners = [index for index, piece in enumerate(pieces) for _ in piece]
        return vectorize([segment for piece in pieces for segment in piece], self.config), owners

    def weights(self, setting: Setting, excluded: frozenset[str]) -> tuple[np.ndarray, float]:
        import scipy.sparse

        key = (setting, excluded)
        if key not in self._fits:
            always = [name for name, source in self.sources.items() if source.always]
            names = [n for n in self.human if n not in excluded] + list(setting.weak) + always
            labels = [label for name in names for label in self.sources[name].refusals]
            self._fits[key] = fit_matrix(scipy.sparse.vstack([self._train[n] for n in names]).tocsr(), labels,
                                         setting)
        return self._fits[key]

    def judge(self, setting: Setting, excluded: frozenset[str]) -> LearnedJudge:
        coef, intercept = self.weights(setting, excluded)
        return LearnedJudge(self.config, coef, intercept, manifest={})

    def score(self, judge: LearnedJudge, name: str) -> Agreement:
        """The judge's verdicts on source `name` (every segment must refuse) against its labels."""
        features, owners = self._segments[name]
        refuses = [True] * len(self.sources[name])
        for owner, value in zip(owners, (features @ judge.coef + judge.intercept).tolist(), strict=True):
            refuses[owner] = refuses[owner] and value >= 0
        return agreement(refuses, list(self.sources[name].refusals))

    def select(self, candidates: Sequence[str], grid: Sequence[Setting] = GRID,
               excluded: frozenset[str] = frozenset()) -> tuple[Setting, dict[str, float]]:
        """The setting with the best mean accuracy over leave-one-out folds of `candidates` (ties: grid order)."""
        means = {s.label: statistics.fmean(self.score(self.judge(s, excluded | {held}), held).accuracy
                                           for held in candidates) for s in grid}
        best = max(grid, key=lambda s: means[s.label])
        return best, means

    def nested(self, grid: Sequence[Setting] = GRID) -> dict[str, dict[str, Any]]:
        """Per held-out human source: the setting chosen without it and that setting's scores on it."""
        table = {}
        for held in self.human:
            others = [name for name in self.human if name != held]
            setting, _ = self.select(others, grid, frozenset({held}))
            table[held] = {**self.score(self.judge(setting, frozenset({held})), held).as_dict(),
                           "setting": setting.to_json()}
        return table
