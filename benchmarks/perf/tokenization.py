"""Time lm-eval's per-request tokenization against the suite's batched one (`benchmarks.fast_tokenization`) on
every request of a benchmark's full local data, and check that both give the same tokens.

Why a script of its own (not a `main` in the tokenizer module): it needs the shared scorer and the lm-eval
runner, which import the tokenizer module; kept here the engine has no import cycle.

    python -m benchmarks.perf.tokenization --benchmark bbq   (MOE_FBS_DATA_DIR: the data mirror)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lm_eval.models.huggingface import HFLM

from benchmarks.fast_tokenization import TokenRequest, batchable


def main(argv: Sequence[str] | None = None) -> None:
    """Time lm-eval's per-request tokenization against the batched one on every request of a benchmark's full
    local data, and check that both give the same tokens. Host-side (CPU) work only; nothing is scored.

    python -m benchmarks.perf.tokenization --benchmark bbq   (MOE_FBS_DATA_DIR: the data mirror)
    """
    import argparse
    import json
    import tempfile
    import time

    from benchmarks.fast_scoring import SharedContextLM
    from fixtures.zoo import materialize_zoo_model

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--benchmark", default="bbq")
    parser.add_argument("--model", default="qwen3-moe-tiny", help="zoo model whose tokenizer is used")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fast-tok-"))
    requests = benchmark_requests(args.benchmark, Path(os.environ.get("MOE_FBS_DATA_DIR", "../shared/data")), work)
    path = materialize_zoo_model(args.model, Path(os.environ.get("MOE_FBS_CACHE_DIR", work / "cache")))
    # lm-eval's own model (the reference) and ours; `_loglikelihood_tokens` only records what it is given.
    ref, lm = (cls(pretrained=str(path), dtype="float32", device="cpu", batch_size=1)
               for cls in (HFLM, SharedContextLM))
    seen: list[list[TokenRequest]] = []

    def record(reqs: list[TokenRequest], *_: Any, **__: Any) -> list[tuple[float, bool]]:
        seen.append(reqs)
        return [(0.0, False)] * len(reqs)

    for model in (ref, lm):
        model._loglikelihood_tokens = record  # type: ignore[method-assign]
    paths = {"lm-eval per request": lambda: ref.loglikelihood(requests, disable_tqdm=True),
             "per request, distinct strings once": lambda: _memoized(lm, requests),
             "batched": lambda: SharedContextLM.loglikelihood(lm, requests, disable_tqdm=True)}
    seconds = {}
    for name, run in paths.items():
        started = time.perf_counter()
        run()
        seconds[name] = round(time.perf_counter() - started, 2)
    assert batchable(lm, (SharedContextLM.tok_encode,)) and all(s == seen[0] for s in seen[1:])
    base = seconds["lm-eval per request"]
    print(json.dumps({"benchmark": args.benchmark, "requests": len(requests), "identical_tokens": True,
                      "seconds": seconds, "speedup": {k: round(base / v, 1) for k, v in seconds.items()}}))


def benchmark_requests(benchmark: str, data_dir: Path, work: Path) -> list[Any]:
    """Every lm-eval request instance of one benchmark on the full local data (what a scorer is handed)."""
    from benchmarks import get_spec
    from benchmarks.lmeval_runner import prepare_requests
    from fixtures.data import DataSource

    _, prepared = prepare_requests([get_spec(benchmark)], {benchmark: {}}, DataSource(data_dir), work,
                           limit=None, seed=0, max_gen_toks=16)
    prepared[0].task.build_all_requests(samples=None)
    return list(prepared[0].task.instances)


def _memoized(lm: Any, requests: Sequence[Any]) -> None:
    """The previous `moe-fbs-shared` path: lm-eval's loop, each distinct string encoded once."""
    lm._encode_memo = {}
    try:
        HFLM.loglikelihood(lm, requests, disable_tqdm=True)
    finally:
        lm._encode_memo = None


if __name__ == "__main__":
    main()
