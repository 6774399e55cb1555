"""Where an audit run spent its time: build seconds per cache kind, from the manifests of a fresh cache.

Why: a run from an empty cache builds every artefact exactly once (the dense baseline, each checkpoint, each
evaluation), and each manifest records its `build_seconds`; summed per kind they say what bounds the run
(model work or host work around it) without instrumenting the suite.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def build_seconds(cache_dir: Path) -> dict[str, list[float]]:
    """Cache kind -> the build seconds of each of its entries (entries without a manifest are skipped)."""
    times: dict[str, list[float]] = defaultdict(list)
    for manifest in sorted(Path(cache_dir).glob("*/*/manifest.json")):
        seconds = json.loads(manifest.read_text(encoding="utf-8")).get("cache", {}).get("build_seconds")
        if isinstance(seconds, int | float):
            times[manifest.parent.parent.name].append(float(seconds))
    return dict(times)


def summary_lines(times: dict[str, list[float]]) -> list[str]:
    return [f"{kind}: {len(values)} built, {sum(values):.1f} s in all, longest {max(values):.1f} s"
            for kind, values in sorted(times.items(), key=lambda item: -sum(item[1]))]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks.perf.cache_times CACHE_DIR", file=sys.stderr)
        return 2
    times = build_seconds(Path(args[0]))
    if not times:
        print(f"{args[0]}: no cache manifests", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(times)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
