"""Peak host and accelerator memory of one checkpoint build, measured while it runs.

Why sampled and not `ru_maxrss`: the process peak only ever grows, so in a pytest session (or any process
that builds several checkpoints) it reports the largest build so far, not this one. A daemon thread reads the
resident set from /proc/self/statm every `SAMPLE_SECONDS` while the block runs (the peak of a phase that
lasts less than one interval can be missed; phases that matter last seconds), and CUDA's own allocator peak
is reset at the start and read at the end. Where /proc is absent (macOS), the process peak stands in.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

SAMPLE_SECONDS = 0.05
_STATM = Path("/proc/self/statm")


def current_rss_bytes() -> int | None:
    """Resident set size of this process now (Linux), or None where /proc is not available."""
    try:
        resident_pages = int(_STATM.read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def release_accelerator_memory() -> None:
    """Collect unreachable models (hooks make reference cycles that plain `del` leaves to the collector)
    and hand cached CUDA blocks back, so a build starts from what the session really holds (measured on an
    H200: 8.5 GB still allocated after the dense evaluation of a 6.2 GB model, before the first build)."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class ResourceMeter:
    """`with ResourceMeter() as meter: build()`, then `meter.record()`: peak RSS and peak GPU MB of the block."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.peak_rss = 0
        self.peak_gpu: int | None = None
        self.gpu_at_start: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ResourceMeter:
        if self._cuda():
            import torch

            release_accelerator_memory()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.gpu_at_start = int(torch.cuda.memory_allocated(self.device))
        self._sample()
        self._thread = threading.Thread(target=self._run, name="resource-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        if self._cuda():
            import torch

            self.peak_gpu = int(torch.cuda.max_memory_allocated(self.device))

    def record(self) -> dict[str, Any]:
        """`build_peak_rss_mb` (this block's), `peak_gpu_mb` (None off CUDA), `gpu_mb_at_start` (what the
        process already held on the GPU when the block began: other models of the same session) and the
        sampling interval."""
        from compressors.runtime import peak_rss_mb

        rss = round(self.peak_rss / 2**20, 1) if self.peak_rss else peak_rss_mb()
        gpu = round(self.peak_gpu / 2**20, 1) if self.peak_gpu is not None else None
        held = round(self.gpu_at_start / 2**20, 1) if self.gpu_at_start is not None else None
        return {"device": self.device, "build_peak_rss_mb": rss, "peak_gpu_mb": gpu, "gpu_mb_at_start": held,
                "rss_sample_seconds": SAMPLE_SECONDS}

    def _cuda(self) -> bool:
        if not self.device.startswith("cuda"):
            return False
        import torch

        return bool(torch.cuda.is_available())

    def _sample(self) -> None:
        rss = current_rss_bytes()
        if rss is not None and rss > self.peak_rss:
            self.peak_rss = rss

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._sample()
