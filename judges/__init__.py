"""Refusal judges beyond the string rules: a learned judge shipped with the suite, and guard models.

`benchmarks.refusal.get_detector` is the one entry point; it resolves `learned` (the default once it beat the
prefix rule on held-out sources, `judges.learned`), the string rules, or a guard model (`judges.guard`).
`judges.train` rebuilds the learned judge and its leave-one-source-out validation from the local data only.
"""
