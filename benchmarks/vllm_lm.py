"""`moe-fbs-vllm` (`--scorer vllm`): lm-eval's HF request handling with the numbers computed by a vLLM server.

Why this shape: users deploy compressed checkpoints with vLLM, so the audit should be able to score what vLLM
computes, yet every request must be tokenized, templated and post-processed exactly as the HF path does it,
or a difference between the backends could be a tokenization difference. So this is `SharedContextLM`
(lm-eval's HFLM: `_encode_pair`, chat template, stop sequences, thinking split) with its two numeric hooks
replaced: `_score_packed` sends the token pairs to the server (`benchmarks.vllm_client.loglikelihoods`) and
`_greedy_continuations` asks it for greedy tokens. The HF model is built on the meta device (config and
generation config only, no weights): the client holds no copy of a model that vLLM may split over GPUs.
Anything that would reach HFLM's own forward or `generate` (sampled generation) is refused, never run on
the weightless shell.

The server: `base_url` (model arg) or $MOE_FBS_VLLM_URL, which must serve this checkpoint (checked against
/v1/models: scoring another model would be silent nonsense); with neither, one is started for the checkpoint
from `.venv-vllm` (`benchmarks.vllm_server`) and stopped by `close()` (`run_benchmarks` calls it) or at exit.
Requests longer than `max_length` + 1 tokens are left-truncated as HFLM truncates them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from lm_eval.api.registry import register_model

from benchmarks.fast_scoring import SharedContextLM
from benchmarks.vllm_client import URL_ENV, greedy, loglikelihoods, served_models
from fixtures.errors import ModelError

MODEL_NAME = "moe-fbs-vllm"


def _weightless(path: str, trust_remote_code: bool) -> Any:
    """The checkpoint's model class on the meta device, with its generation config (stop tokens)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    if (Path(path) / "generation_config.json").is_file():
        shell.generation_config = GenerationConfig.from_pretrained(path)
    return shell.eval()


@register_model(MODEL_NAME)
class VLLMServerLM(SharedContextLM):
    """HFLM's request handling, vLLM's numbers (see the module docstring)."""

    def __init__(self, pretrained: Any, base_url: str | None = None, **kwargs: Any) -> None:
        path = str(pretrained)
        dtype = str(kwargs.pop("dtype", "float32") or "float32")
        kwargs["device"] = "cpu"  # the client computes nothing; the server has the accelerators
        super().__init__(_weightless(path, bool(kwargs.get("trust_remote_code"))), tokenizer=path, **kwargs)
        self.checkpoint = str(Path(path).resolve())
        self._stack = contextlib.ExitStack()
        url = base_url or os.environ.get(URL_ENV)
        if not url:
            from benchmarks.vllm_server import served

            log = Path(tempfile.mkdtemp(prefix="moe-fbs-vllm-")) / "serve.log"
            url = self._stack.enter_context(served(Path(self.checkpoint), log=log, dtype=dtype))
        self.url = url.rstrip("/")
        names = served_models(self.url)
        if self.checkpoint not in names:
            self.close()
            raise ModelError(f"the vLLM server at {self.url} serves {names}, not {self.checkpoint}: start one for "
                             f"this checkpoint, or unset {URL_ENV} to let the scorer start it")

    def close(self) -> None:
        """Stop the server this instance started (a no-op for a server given by URL)."""
        self._stack.close()

    def packable_length(self) -> int:
        return 1 << 62  # every request goes to `_score_packed`, which truncates as HFLM does

    def _score_packed(self, pairs: Any) -> list[tuple[float, bool]]:
        window = self.max_length + 1
        trimmed = []
        for context, continuation in pairs:
            full = [*context, *continuation][-window:]
            trimmed.append((full[:len(full) - len(continuation)], list(continuation)))
        return loglikelihoods(self.url, self.checkpoint, trimmed)

    def _greedy_continuations(self, contexts: list[list[int]], max_gen: int) -> list[list[int]]:
        return [tokens for tokens, _ in greedy(self.url, self.checkpoint, contexts, max_tokens=max_gen, top_k=1,
                                               stop_ids=self._stop_ids())]

    def _model_call(self, *args: Any, **kwargs: Any) -> Any:
        raise ModelError("the vllm scorer has no local weights: this request needs HFLM's own forward pass")

    def _model_generate(self, *args: Any, **kwargs: Any) -> Any:
        raise ModelError("the vllm scorer serves greedy generation only (a sampled request reached HFLM)")
