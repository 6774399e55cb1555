"""Compare two audit runs' results: did a 2-GPU run gate exactly as a 1-GPU run of the same grid did?

Why a tool: spreading a grid over xdist workers and GPUs must not change a single number, and "the reports look
the same" is not a check. Two results.json are equal when their run settings, dense baselines and every check
(value, delta, interval, verdict, changed items) agree exactly; where a check ran (node id, worker, GPU) and when
the run finished are not compared. Exit 0: equal; 1: they differ (each difference listed); 2: unreadable input.
`--atol X` accepts numbers that differ by at most X (verdicts, counts and texts must still match exactly): GPU
decoding is not bitwise reproducible across processes for every diagnostic (docs/performance.md), and a user
needs to tell "same gating, last digits moved" from "different results".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reports.merge import UNCOMPARED


def same(first: Any, second: Any, atol: float) -> bool:
    """Equal, numbers (not booleans) within `atol`, recursively through lists and dicts."""
    if isinstance(first, bool) or isinstance(second, bool):
        return first == second
    if isinstance(first, int | float) and isinstance(second, int | float):
        return first == second or abs(first - second) <= atol
    if isinstance(first, dict) and isinstance(second, dict):
        return first.keys() == second.keys() and all(same(first[k], second[k], atol) for k in first)
    if isinstance(first, list) and isinstance(second, list):
        return len(first) == len(second) and all(same(a, b, atol) for a, b in zip(first, second, strict=True))
    return bool(first == second)


def _checks(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(check["checkpoint"]["id"], check["metric"]): {k: v for k, v in check.items() if k not in UNCOMPARED}
            for check in document["checks"]}


def differences(first: dict[str, Any], second: dict[str, Any], atol: float = 0.0) -> list[str]:
    """Every way in which two results documents gate differently, as readable lines (empty: equal)."""
    found = [f"{part}: {first.get(part)!r} != {second.get(part)!r}"
             for part in ("schema", "settings", "dense") if not same(first.get(part), second.get(part), atol)]
    ours, theirs = _checks(first), _checks(second)
    for key in sorted(ours.keys() - theirs.keys()):
        found.append(f"{key[0]} {key[1]}: only in the first run")
    for key in sorted(theirs.keys() - ours.keys()):
        found.append(f"{key[0]} {key[1]}: only in the second run")
    for key in sorted(ours.keys() & theirs.keys()):
        fields = sorted(name for name in ours[key].keys() | theirs[key].keys()
                        if not same(ours[key].get(name), theirs[key].get(name), atol))
        if fields:
            found.append(f"{key[0]} {key[1]}: " + "; ".join(
                f"{name} {ours[key].get(name)!r} != {theirs[key].get(name)!r}" for name in fields))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.compare", description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path, help="results.json of one run")
    parser.add_argument("second", type=Path, help="results.json of the other run")
    parser.add_argument("--atol", type=float, default=0.0,
                        help="numbers may differ by this much (default 0: bit-identical)")
    args = parser.parse_args(argv)
    if not args.atol >= 0.0:
        parser.error("--atol must be >= 0")
    try:
        first, second = (json.loads(path.read_text(encoding="utf-8")) for path in (args.first, args.second))
        found = differences(first, second, args.atol)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        print(f"moe-fbs-audit compare: cannot read the results: {exc}", file=sys.stderr)
        return 2
    for line in found:
        print(line)
    print(f"moe-fbs-audit compare: {len(_checks(first))} vs {len(_checks(second))} checks; "
          + ("identical gating (settings, dense baseline and every check)" if not found
             else f"{len(found)} difference(s)") + (f" at --atol {args.atol:g}" if args.atol else ""))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
