"""Run one function in several spawned processes at once: how the suite tests that concurrent builders of a
cache entry build it once (spawn, not fork, so each worker starts as a fresh interpreter like an xdist one)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any


def run_concurrently(target: Callable[..., None], args: tuple[Any, ...], count: int = 3,
                     timeout_s: float = 60.0) -> list[int | None]:
    """Start `count` processes of `target(*args)`, wait for all; returns their exit codes."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=target, args=args) for _ in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=timeout_s)
    return [worker.exitcode for worker in workers]
