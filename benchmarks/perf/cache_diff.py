"""Do two audit caches hold the same compressed checkpoints? Weights, observer statistics and decisions.

Why: two runs of one grid (say `-n 2` and `-n 1`) must build bit-identical checkpoints for their reports to be
equal; when the reports differ, this says whether compression already differed (which experts were kept or
merged, the observer's statistics, the saved weights) or only the evaluation did. Entries are matched by cache
key, which both runs derive from the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

# Manifest fields that are measurements of the run, not of the result.
RUN_FIELDS = ("cache", "seconds", "method_seconds", "phase_seconds", "peak_rss_mb", "threads", "observer",
              "verification")
DECISIONS = ("kept_experts", "dropped_experts", "clusters", "frequency", "scores", "saliency", "routed_slots")


def file_digests(entry: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(entry.glob("*.safetensors"))}


def entry_differences(kind: str, first: Path, second: Path) -> list[str]:
    """What differs between two entries of one key: safetensors bytes and (checkpoints) decisions."""
    found = []
    if file_digests(first) != file_digests(second):
        found.append(f"{kind}/{first.name[:12]}: safetensors differ")
    if kind == "checkpoints":
        ours, theirs = (json.loads((path / "manifest.json").read_text())["compression"] for path in (first, second))
        label = ours.get("label", first.name[:12])
        for name in sorted(set(ours) | set(theirs)):
            if name not in RUN_FIELDS and ours.get(name) != theirs.get(name):
                what = "decision" if name in DECISIONS else "field"
                found.append(f"checkpoints/{label}: {what} {name} differs")
    return found


def cache_differences(first: Path, second: Path, kinds: tuple[str, ...] = ("observer", "checkpoints")) -> list[str]:
    found: list[str] = []
    for kind in kinds:
        ours = {p.name: p for p in (first / kind).glob("*") if (p / "manifest.json").is_file()}
        theirs = {p.name: p for p in (second / kind).glob("*") if (p / "manifest.json").is_file()}
        found += [f"{kind}/{key[:12]}: only in {first}" for key in sorted(ours.keys() - theirs.keys())]
        found += [f"{kind}/{key[:12]}: only in {second}" for key in sorted(theirs.keys() - ours.keys())]
        for key in sorted(ours.keys() & theirs.keys()):
            found += entry_differences(kind, ours[key], theirs[key])
    return found


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m benchmarks.perf.cache_diff CACHE_A CACHE_B", file=sys.stderr)
        return 2
    found = cache_differences(Path(args[0]), Path(args[1]))
    print("\n".join(found) if found else "identical observer statistics and checkpoints (weights and decisions)")
    return 1 if found else 0




if __name__ == "__main__":
    sys.exit(main())
