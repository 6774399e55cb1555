"""Run benchmarks through lm-eval on a local HF checkpoint and turn its output into `BenchmarkResult`s.

How a run works (`run_benchmarks`):
1. Each benchmark's lm-eval task config (taskconfig.py; derived from the installed lm-eval YAML, or our own
   design for StereoSet / XSTest / AdvBench) is pointed at the data and written as
   `<work_dir>/lmeval_tasks/<hash>/<task>.yaml`. lm-eval loads them with `TaskManager(include_path=...,
   include_defaults=False)` (scanning the built-in task tree costs ~20 s on this box and is not needed).
2. `--limit` is not lm-eval's `limit` (first N docs): a seeded stratified sample (sampling.py) is drawn from
   the task's evaluation docs *as lm-eval indexes them* (after process_docs) and passed as
   `samples={task: indices}`. It depends only on the data, the seed and the limit, so dense and compressed
   runs score the same items.
3. The model is loaded once (lm-eval's `hf` model, fp32 log-softmax, fixed batch size, thinking disabled for
   chat templates that support it) and used for two `simple_evaluate` calls: likelihood tasks without the
   chat template, generative tasks with it (the chat template setting is per call, and applied to
   likelihood tasks it would score sentences after an empty user turn).
4. lm-eval's aggregates (keys without ",none") plus one `ItemRecord` per document; every count is checked
   (fail closed: no items, a missing or extra document, a wrong number of choices is an error).

lm-eval's `samples` indexing (0.4.13, `Task.doc_iterator`/`evaluate`): indices are positions in
`task.eval_docs`; docs are iterated in dataset order and the logged `doc_id` is `indices[k]` for the k-th
selected doc, so the list must be sorted ascending and duplicate-free (an empty list means *all* docs).
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.records import BenchmarkResult
from benchmarks.refusal_spec import DEFAULT_MAX_GEN_TOKS, generation_kwargs
from benchmarks.sampling import IndexList, allocate, check_limit, stratified_indices
from benchmarks.spec import BenchmarkSpec, RunContext, collect_items, lmeval_metrics
from benchmarks.taskconfig import (
    builtin_task_config,
    dump_task_yaml,
    lm_eval_tasks_dir,
    version,
    write_atomic,
    yaml_header,
)
from fixtures.errors import AuditError, ConfigError, DataError, ModelError
from fixtures.hashing import sha256_bytes

if TYPE_CHECKING:
    from fixtures.data import DataSource, LoadedDataset

__all__ = [
    "DEFAULT_MAX_GEN_TOKS",
    "DEFAULT_MAX_LENGTH",
    "allocate",
    "builtin_task_config",
    "collect_items",
    "lm_eval_tasks_dir",
    "run_benchmarks",
    "stratified_indices",
]

TASKS_SUBDIR = "lmeval_tasks"
DEFAULT_MAX_LENGTH = 2048
KINDS = ("likelihood", "generative")  # one simple_evaluate call each, in this order
# `scorer` -> lm-eval model type: "hf" is lm-eval's own HF backend (the reference), "shared" ours, tested
# equal to it (tests/test_fast_scoring.py) and many times faster on GPUs (docs/performance.md); "vllm" the
# same requests scored by a vLLM server (benchmarks/vllm_lm.py, tests/test_vllm.py).
log = logging.getLogger(__name__)
SCORERS = {"hf": "hf", "shared": "moe-fbs-shared", "vllm": "moe-fbs-vllm"}
DEFAULT_SCORER = "shared"  # the suite's scorer unless --scorer says otherwise (proven equal to "hf" per family)


@dataclass(frozen=True)
class _Prepared:
    """One benchmark ready for lm-eval: its checked options, data, task, written YAML and item selection."""

    spec: BenchmarkSpec
    options: Mapping[str, Any]
    data: LoadedDataset
    task: Any
    yaml_path: Path
    selection: list[int]
    strata: Mapping[str, int]
    n_docs: int


def run_benchmarks(
    names: Sequence[str],
    model_path: Path,
    source: DataSource,
    *,
    limit: int | None,
    seed: int,
    device: str = "cpu",
    batch_size: int = 16,
    work_dir: Path,
    dtype: str = "float32",
    max_length: int = DEFAULT_MAX_LENGTH,
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    scorer: str = "hf",
    lm: Any = None,
) -> dict[str, BenchmarkResult]:
    """Evaluate `model_path` on the named benchmarks; one `BenchmarkResult` per name.

    `limit`: items per benchmark by seeded stratified sampling (None = every item; XSTest: per label). Same
    data, seed and limit give the same items for any model. `max_gen_toks`: new-token budget of generative
    benchmarks (100 by default; smaller only for fast tests). `options[name]` holds benchmark options (BBQ
    `categories`, XSTest/AdvBench `detector`: a name in `benchmarks.refusal.DETECTORS` or a detector
    object). `scorer`: "hf" (lm-eval's HF backend), "shared" or "vllm" (see SCORERS). Raises ConfigError (unknown
    benchmark, bad limit or option), DataError (missing/empty data, no items, inconsistent lm-eval output) or
    ModelError (no checkpoint). `lm`: an lm-eval model already built (an in-memory model, e.g. the GPU
    benchmark's random-weight model); `model_path` is then only recorded, never loaded.
    """
    from benchmarks import get_spec

    requested = _dedupe(names)
    specs = [get_spec(name) for name in requested]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive integer (fixed, not 'auto'), got {batch_size!r}")
    check_limit(limit)
    if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or not 0 < max_gen_toks < max_length:
        raise ConfigError(f"max_gen_toks must be an integer in [1, max_length={max_length}), got {max_gen_toks!r}")
    unknown_options = sorted(set(options or {}) - set(requested))
    if unknown_options:
        raise ConfigError(f"options given for benchmarks not requested: {', '.join(unknown_options)}")
    if scorer not in SCORERS:
        raise ConfigError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    checked = {spec.name: spec.check_options(dict((options or {}).get(spec.name, {}))) for spec in specs}
    model_dir = _check_model_dir(model_path) if lm is None else Path(model_path)

    manager, prepared = prepare_requests(
        specs, checked, source, Path(work_dir), limit=limit, seed=seed, max_gen_toks=max_gen_toks
    )
    model_args: dict[str, Any] = {
        "pretrained": str(model_dir),
        "dtype": dtype,
        "softmax_dtype": "float32",
        "max_length": max_length,
        # Qwen3's template opens a <think> block unless told not to; other templates ignore the flag.
        "enable_thinking": False,
    }
    fallback, loaded_here = None, lm is None
    if lm is None:
        from benchmarks.architecture import scorer_for
        from fixtures.zoo import read_config

        scorer, fallback = scorer_for(read_config(model_dir), scorer)
        if fallback:
            log.warning("scoring with lm-eval's HF backend, not the shared scorer: %s", fallback)
        lm = load_lm(model_args, device=device, batch_size=batch_size, scorer=scorer)
    settings = {"limit": limit, "seed": seed, "model": SCORERS[scorer], "scorer_fallback": fallback,
                "model_args": model_args,
                "batch_size": batch_size, "device": device, "lm_eval_version": version("lm_eval"),
                "transformers_version": version("transformers"), "torch_version": version("torch"),
                "datasets_version": version("datasets")}
    results: dict[str, BenchmarkResult] = {}
    try:
        for kind in KINDS:
            group = [p for p in prepared if p.spec.kind == kind]
            if group:
                extra = {"generation_kwargs": generation_kwargs(max_gen_toks)} if kind == "generative" else {}
                results.update(_evaluate_group(group, lm, manager, seed=seed, settings={**settings, **extra}))
    finally:
        if loaded_here and hasattr(lm, "close"):
            lm.close()  # the vllm scorer's server: stopped whatever happened
    return {name: results[name] for name in requested}


def prepare_requests(
    specs: Sequence[BenchmarkSpec],
    options: Mapping[str, Mapping[str, Any]],
    source: DataSource,
    work_dir: Path,
    *,
    limit: int | None,
    seed: int,
    max_gen_toks: int,
) -> tuple[Any, list[_Prepared]]:
    """Load data, write and load the lm-eval tasks, draw the item selections (all before any model).
    Returns lm-eval's TaskManager too: `simple_evaluate` builds a default one (a ~30 s scan of every
    built-in task) unless given one."""
    datas: dict[str, LoadedDataset] = {}
    texts: dict[str, str] = {}
    for spec in specs:
        data = spec.load_data(source, options[spec.name])
        if not data.rows:
            raise DataError(f"{spec.name}: dataset {data.name} ({data.source}) has no rows")
        config = spec.task_config(data)
        if spec.kind == "generative":
            config["generation_kwargs"] = generation_kwargs(max_gen_toks)
        header = yaml_header(spec.builtin_yaml, spec.module, spec.config_changes)
        texts[spec.task_name] = dump_task_yaml(config, header)
        datas[spec.name] = data
    # One folder per distinct set of configs: runs on other data (or concurrent workers) never share a YAML.
    key = sha256_bytes("\0".join(f"{k}\0{v}" for k, v in sorted(texts.items())).encode("utf-8"))[:16]
    tasks_dir = work_dir.resolve() / TASKS_SUBDIR / key
    for task_name, text in texts.items():
        write_atomic(tasks_dir / f"{task_name}.yaml", text)

    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    try:
        tasks = manager.load([spec.task_name for spec in specs])["tasks"]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"lm-eval could not load the benchmark tasks from {tasks_dir}: {exc}") from exc

    prepared = []
    for spec in specs:
        task, data = tasks[spec.task_name], datas[spec.name]
        docs = task.eval_docs
        if len(docs) == 0:
            raise DataError(f"{spec.name}: lm-eval loaded no evaluation documents")
        if len(docs) != len(data.rows):
            raise DataError(
                f"{spec.name}: lm-eval loaded {len(docs)} documents but the dataset {data.name} has "
                f"{len(data.rows)} rows; the recorded data hash would not describe what was evaluated"
            )
        columns = _columns(docs, spec.stratum_columns, spec.name)
        indices, counts = spec.select(columns, len(docs), limit, seed)
        if not indices:
            raise DataError(f"{spec.name}: no items selected")
        prepared.append(_Prepared(spec, options[spec.name], data, task, tasks_dir / f"{spec.task_name}.yaml",
                                  indices, counts, len(docs)))
    return manager, prepared


def load_lm(model_args: Mapping[str, Any], *, device: str, batch_size: int, scorer: str = "hf") -> Any:
    """lm-eval's model built as `simple_evaluate(model=..., model_args=...)` builds it, once for both
    calls (a large checkpoint is not loaded twice). `scorer` "shared" is `benchmarks.fast_scoring`'s HFLM
    subclass (same tokenization and metrics, shared contexts and batched greedy generation)."""
    from lm_eval.api.registry import get_model

    from fixtures.distribution import split_model_args

    registers = {"shared": "benchmarks.fast_scoring", "vllm": "benchmarks.vllm_lm"}  # modules that register them
    if scorer in registers:
        importlib.import_module(registers[scorer])
    try:
        args = dict(model_args) if scorer == "vllm" else split_model_args(model_args, device)
        return get_model(SCORERS[scorer]).create_from_arg_obj(args, {"batch_size": batch_size, "device": device})
    except Exception as exc:
        raise ModelError(f"lm-eval could not load the model {model_args['pretrained']}: {exc}") from exc


def _evaluate_group(
    group: Sequence[_Prepared], lm: Any, manager: Any, *, seed: int, settings: Mapping[str, Any]
) -> dict[str, BenchmarkResult]:
    import lm_eval

    chat = group[0].spec.apply_chat_template
    samples = {p.spec.task_name: IndexList(p.selection) for p in group if len(p.selection) < p.n_docs}
    started = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=[p.task for p in group],
        task_manager=manager,
        samples=samples or None,
        log_samples=True,
        apply_chat_template=chat,
        bootstrap_iters=0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    seconds = time.perf_counter() - started
    if res is None:
        raise AuditError("lm-eval returned no results (not rank 0?)")

    out: dict[str, BenchmarkResult] = {}
    for p in group:
        spec, task = p.spec, p.spec.task_name
        if task not in res.get("results", {}) or task not in res.get("samples", {}):
            raise DataError(f"{spec.name}: lm-eval output has no results/samples for task {task}")
        items = collect_items(spec, res["samples"][task], p.selection, RunContext(p.options, lm))
        metrics = spec.metrics(lmeval_metrics(res["results"][task]), items)
        missing = [m for m in spec.headline_metrics if m not in metrics]
        if missing:
            raise DataError(f"{spec.name}: lm-eval reported no {', '.join(missing)}")
        result_settings = {
            **settings,
            "sampling": "all" if len(items) == p.n_docs else "stratified",
            "strata_columns": list(spec.stratum_columns),
            "strata": dict(p.strata),
            "n_docs": p.n_docs,
            "lm_eval_task": task,
            "lm_eval_builtin_yaml": spec.builtin_yaml,
            "task_yaml_sha256": sha256_bytes(p.yaml_path.read_bytes()),
            "dataset_name": p.data.name,
            "apply_chat_template": chat,
            **spec.result_settings(p.options),
            # Requests of these benchmarks were batched together (seconds is the whole call); batch
            # composition moves fp32 log-likelihoods at the 1e-6 level, so paired runs must match here.
            "evaluated_together": [q.spec.name for q in group],
            # relative to the run's work dir (in the cache: `results/<key>/work/`): the build's own temp dir is
            # renamed away once the entry is published, so an absolute path would name nothing
            "task_yaml": p.yaml_path.relative_to(p.yaml_path.parents[2]).as_posix(),
        }
        out[spec.name] = BenchmarkResult(
            benchmark=spec.name, metrics=metrics, n_items=len(items), items=tuple(items),
            data_sha256=p.data.sha256, data_source=p.data.source, settings=result_settings, seconds=seconds,
        )
    return out


def _check_model_dir(model_path: Path) -> Path:
    path = Path(model_path).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {path} has no config.json (expected a local HF checkpoint)")
    return path


def _dedupe(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise ConfigError(f"benchmark names must be a sequence of names, got the string {names!r}")
    seen: list[str] = []
    for name in names:
        if name not in seen:
            seen.append(name)
    if not seen:
        raise ConfigError("no benchmarks requested")
    return seen


def _columns(docs: Any, columns: Sequence[str], task: str) -> list[list[Any]]:
    """Columns of the evaluation docs (a `datasets.Dataset`, or a list of dicts), read in bulk."""
    if not columns:
        return []
    try:
        if isinstance(docs, list):
            return [[doc[c] for doc in docs] for c in columns]
        table = docs.select_columns(list(columns)).to_dict()
        return [list(table[c]) for c in columns]
    except (KeyError, ValueError) as exc:
        raise DataError(f"{task}: evaluation docs lack a stratum column of {list(columns)}") from exc
