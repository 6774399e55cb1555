"""Summarise `nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader -lms N`.

Why: "both GPUs were busy" is a claim about a time series; this turns the samples of a run into one line per
GPU (samples, mean utilisation, share of samples above 0% and above 50%, peak memory).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path


def parse(lines: list[str]) -> dict[int, list[tuple[float, float]]]:
    """GPU index -> [(utilisation %, memory MiB)] in sample order; malformed lines (a cut-off last one) skipped."""
    samples: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for line in lines:
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 4:
            continue
        try:
            index = int(fields[1])
            utilisation = float(fields[2].removesuffix("%").strip())
            memory = float(fields[3].removesuffix("MiB").strip())
        except ValueError:
            continue
        samples[index].append((utilisation, memory))
    return dict(samples)


def summary_lines(samples: dict[int, list[tuple[float, float]]]) -> list[str]:
    lines = []
    for index, values in sorted(samples.items()):
        utilisation = [u for u, _ in values]
        busy = sum(u > 0 for u in utilisation) / len(values)
        high = sum(u > 50 for u in utilisation) / len(values)
        lines.append(f"GPU {index}: {len(values)} samples, mean utilisation {sum(utilisation) / len(values):.1f}%, "
                     f"busy (>0%) {busy:.0%} of samples, >50% {high:.0%}, "
                     f"peak memory {max(m for _, m in values) / 1024:.1f} GiB")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks.perf.smi_summary SAMPLES.csv", file=sys.stderr)
        return 2
    samples = parse(Path(args[0]).read_text(encoding="utf-8").splitlines())
    if not samples:
        print(f"{args[0]}: no nvidia-smi samples", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(samples)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
