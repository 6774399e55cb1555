"""Where the wall time of a long run goes, at almost no cost: the main thread's Python stack sampled every 10 ms.

Why not cProfile: it instruments every call, which slows the Python-heavy parts of llmcompressor's pipelines
(hooks, per-expert loops) several-fold and so misplaces the time between them and the GPU. A sampler only
looks; a GPU wait shows up as the Python line that blocks on it, which is where a user's time goes. Each
sample credits every distinct function on the stack once (inclusive time) and the innermost one (self time);
`report` prints both, in seconds, for functions of this project, llmcompressor, compressed-tensors,
transformers, safetensors and torch.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from types import FrameType

INTERVAL_SECONDS = 0.01
ROOTS = ("compressors", "fixtures", "benchmarks", "llmcompressor", "compressed_tensors", "transformers",
         "safetensors", "torch", "lm_eval")


def _label(frame: FrameType) -> str:
    code = frame.f_code
    path = code.co_filename.replace("\\", "/")
    parts = path.split("/")
    for index in range(len(parts) - 1, -1, -1):
        if parts[index] in ROOTS:
            path = "/".join(parts[index:])
            break
    else:
        path = parts[-1]
    return f"{path}:{code.co_name}"


class StackSampler:
    """`start()` in the thread to watch, `stop()`, then `report()`."""

    def __init__(self, interval: float = INTERVAL_SECONDS, *, write_to: str | None = None,
                 write_every: float = 30.0) -> None:
        self.interval = interval
        # The sampling thread itself rewrites `write_to` every `write_every` s: a long build that never
        # returns to pytest (and a run cut short inside it) still leaves a profile of where it is stuck.
        self.write_to, self.write_every = write_to, write_every
        self._written = time.monotonic()
        self.inclusive: Counter[str] = Counter()
        self.own: Counter[str] = Counter()
        self.samples = 0
        self._target = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)

    def start(self) -> None:
        self._target = threading.get_ident()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self._target)
            if frame is None:
                continue
            self.samples += 1
            self.own[_label(frame)] += 1
            seen = set()
            while frame is not None:
                seen.add(_label(frame))
                frame = frame.f_back
            self.inclusive.update(seen)
            if self.write_to and time.monotonic() - self._written > self.write_every:
                self.write()

    def write(self) -> None:
        """The report so far to `write_to` (called from the sampling thread, or after `stop`)."""
        assert self.write_to is not None
        self._written = time.monotonic()
        with open(self.write_to, "w", encoding="utf-8") as handle:
            handle.write(self.report())

    def report(self, top: int = 60) -> str:
        seconds = self.interval
        lines = [f"{self.samples} samples every {self.interval * 1000:.0f} ms (~{self.samples * seconds:.0f} s)",
                 "", "inclusive s  function"]
        lines += [f"{count * seconds:11.1f}  {name}" for name, count in self.inclusive.most_common(top)]
        lines += ["", "self s       function"]
        lines += [f"{count * seconds:11.1f}  {name}" for name, count in self.own.most_common(top // 2)]
        return "\n".join(lines) + "\n"


def sample_for(duration: float) -> StackSampler:
    """Sample the calling thread while it sleeps `duration` seconds (a self-check of the sampler)."""
    sampler = StackSampler()
    sampler.start()
    time.sleep(duration)
    sampler.stop()
    return sampler
