"""What the vLLM test modules share (not a test module): the server `make test-vllm` started, and the tolerance.

Why one place: tests/test_vllm.py and tests/test_vllm_checkpoints.py must skip in the plain `make test` (no
server there) and FAIL under `make test-vllm`, which sets MOE_FBS_VLLM_REQUIRED=1, when the server is missing:
a backend that silently stops being tested is how the vLLM path went unrun before.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.vllm_client import MODEL_ENV, URL_ENV

REQUIRED_ENV = "MOE_FBS_VLLM_REQUIRED"


def ll_tolerance(value: float) -> float:
    """Per-request log-likelihood tolerance, fp32 on both sides: vLLM's CPU kernels (oneDNN matmuls, its own
    attention and fused-MoE loops) sum in another order than torch. Measured max |diff| 2.7e-5 nats on
    requests of |LL| 20-120, so 1e-4 + 1e-6 |LL| leaves room, while a wrong token, position or mask moves a
    log-likelihood by far more than 1e-2."""
    return 1e-4 + 1e-6 * abs(value)


def vllm_server() -> tuple[str, Path]:
    """(url, served checkpoint) of the server `make test-vllm` started; skip without one, unless required."""
    url, model = os.environ.get(URL_ENV), os.environ.get(MODEL_ENV)
    if not url or not model:
        message = f"needs a vLLM server (${URL_ENV}, ${MODEL_ENV}): make test-vllm"
        if os.environ.get(REQUIRED_ENV):
            pytest.fail(f"{message} was expected to provide one ({REQUIRED_ENV} is set)")
        pytest.skip(message)
    return url, Path(model)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids or later): vLLM's CPU build has an int4 MoE kernel
    there, so a W4A16 checkpoint may be served on such a machine and refused on another (AMD EPYC here)."""
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
