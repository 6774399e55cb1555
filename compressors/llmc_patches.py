"""Workarounds for llmcompressor 0.14.0.1 on transformers-5 MoE models, and the one `oneshot` call site.

Every patch is applied by `llmcompressor_patches()`, a re-entrant, idempotent context manager: the first
entry installs all patches, the last exit restores the originals, nested or repeated use is a no-op. Each
patch names the note that documents the failure (/work/shared/notes/llmcompressor.md,
/work/shared/notes/expert-compression.md) and is guarded by a regression test (tests/test_compressors.py,
tests/test_quantization.py). To add one, append a `_Patch` to `_PATCHES` (`attribute` may be dotted, e.g.
`Class.method`).
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from compressors.sparsegpt_batched import make_batched_compress_modules

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@contextlib.contextmanager
def _keep_attention_implementation(model: Any) -> Iterator[None]:
    """Stands in for `llmcompressor.utils.helpers.use_eager_attention`: keep the model's attention."""
    yield


def _make_keep_attention(original: Any) -> Any:
    # llmcompressor.md §5a (causal mask in the sequential pipeline). In the traced subgraphs, Qwen3-MoE and
    # Mixtral decoder layers receive `attention_mask=None` at run time (OLMoE/ERNIE get the 4-D mask;
    # checked with a hook). Likely cause: those two pick their mask builder through a local variable
    # (`mask_function = create_causal_mask if sliding_window is None else ...`), which the tracer's by-name
    # autowrap of mask builders does not catch. Under the eager attention `calibration_forward_context`
    # forces, None means *no* mask: GPTQ/AWQ/Wanda/SparseGPT/REAP calibrate on bidirectional attention,
    # silently (layer-1 inputs off by up to ~4 vs a plain forward). Keeping the model's own implementation
    # (sdpa) makes None mean `is_causal=True`, in tracing and at run time alike; exact on all zoo
    # architectures. Valid for unpadded batch-1 calibration, which `run_oneshot`/`check_calibration` enforce.
    return _keep_attention_implementation


def _make_prune_with_statics(original: Callable[..., Any]) -> Callable[..., Any]:
    # expert-compression.md §3 (REAP on ERNIE-4.5): `prune_moe_layer` slices the router weight/bias and a
    # router-level `e_score_correction_bias`, but ERNIE keeps its selection bias in
    # `gate.moe_statics.e_score_correction_bias` [1, E], which stays at E columns: the next forward fails
    # ("size of tensor a (6) must match ... (8)"). Slice it with the same retained indices.
    import torch

    def prune_moe_layer(model: Any, layer_name: str, retained: list[int], moe_attrs: Any) -> Any:
        result = original(model, layer_name, retained, moe_attrs)
        router = getattr(model.get_submodule(layer_name), moe_attrs.router_attr)
        statics = getattr(router, "moe_statics", None)
        bias = getattr(statics, "e_score_correction_bias", None)
        if statics is not None and isinstance(bias, torch.Tensor) and bias.shape[-1] != len(retained):
            index = torch.tensor(retained, dtype=torch.long, device=bias.device)
            sliced = bias.detach().index_select(bias.dim() - 1, index).contiguous()
            statics.e_score_correction_bias = torch.nn.Parameter(sliced, requires_grad=False)
        return result

    prune_moe_layer.__wrapped__ = original  # type: ignore[attr-defined]
    return prune_moe_layer


def _make_cpu_safe_pin_memory(original: Callable[..., Any]) -> Callable[..., Any]:
    # llmcompressor.md §5b (AWQ on CPU): `AWQModifier._apply_smoothing` calls `IntermediatesCache.pin_memory`
    # unconditionally; pinning needs an accelerator, so on a CPU-only machine it raises "Cannot access
    # accelerator device when none is available" (and if that is caught, the qparams stay uncalibrated and
    # the checkpoint gives NaN logits). Pinning only speeds up host-to-device copies, so skipping it where
    # there is no accelerator changes no numbers; with CUDA the original runs.
    import torch

    def pin_memory(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not torch.cuda.is_available():
            return None
        return original(self, *args, **kwargs)

    pin_memory.__wrapped__ = original  # type: ignore[attr-defined]
    return pin_memory


_CALIBRATING: set[int] = set()  # ids of models inside a `calibration_forward_context` (shared by both patches)


def _make_reentrant_calibration_context(original: Callable[..., Any]) -> Callable[..., Any]:
    # Measured on an H200 (2.8B Qwen3-MoE, AWQ W4A16; docs/performance.md): AWQ's `_apply_smoothing` enters
    # `calibration_forward_context(model)` once per mapping, i.e. once per expert (1,024 times for 16 layers x
    # 64 experts), although the sequential pipeline already holds that context around it; each entry and exit
    # walks the whole model twice (`eval_context` = `model.train(False)` and back), 45% of AWQ's time. The
    # nested entry sets exactly what the outer one set (no grad, no KV cache, eval mode, no HF kernels, no LM
    # head, attention as patched above), so for a model already inside the context it is a no-op here.
    @contextlib.contextmanager
    def calibration_forward_context(model: Any) -> Iterator[None]:
        if id(model) in _CALIBRATING:
            yield
            return
        _CALIBRATING.add(id(model))
        try:
            with original(model):
                yield
        finally:
            _CALIBRATING.discard(id(model))

    calibration_forward_context.__wrapped__ = original  # type: ignore[attr-defined]
    return calibration_forward_context


def _make_interleaved_copy_to_experts(original: Callable[..., Any] | None) -> Callable[..., Any]:
    # llmcompressor.md §5f (GPT-OSS repack): `GptOssExpertMLP` reads gate and up from the even and odd columns
    # of `gate_up_proj[e]` ([H, 2I], transposed) but inherits the generic writer, which puts them back as
    # halves: a repacked GPT-OSS model computes another function (repack diff 1.17, "expert 0 up_proj.weight
    # does not round-trip"). The inverse of its reader: gate -> even columns, up -> odd (and their biases).
    def copy_to_experts_module(self: Any, experts: Any, index: int) -> None:
        gate_up = experts.gate_up_proj[index]
        gate_up[:, 0::2].copy_(self.gate_proj.weight.T)
        gate_up[:, 1::2].copy_(self.up_proj.weight.T)
        experts.down_proj[index].copy_(self.down_proj.weight.T)
        bias = experts.gate_up_proj_bias[index]
        bias[0::2].copy_(self.gate_proj.bias)
        bias[1::2].copy_(self.up_proj.bias)
        experts.down_proj_bias[index].copy_(self.down_proj.bias)

    copy_to_experts_module.__wrapped__ = original  # type: ignore[attr-defined]
    return copy_to_experts_module


@dataclass(frozen=True)
class _Patch:
    module: str  # the module whose global (or class) the caller looks up at call time
    attribute: str  # a global, or a dotted path inside the module such as `Class.method`
    make: Callable[[Any], Any]  # original -> replacement

    def owner(self) -> tuple[Any, str]:
        """The object holding the attribute, and the attribute's own name."""
        owner: Any = importlib.import_module(self.module)
        *path, name = self.attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        return owner, name


_PATCHES: tuple[_Patch, ...] = (
    _Patch("llmcompressor.utils.helpers", "use_eager_attention", _make_keep_attention),
    _Patch("llmcompressor.modifiers.pruning.reap.base", "prune_moe_layer", _make_prune_with_statics),
    _Patch("llmcompressor.pipelines.cache", "IntermediatesCache.pin_memory", _make_cpu_safe_pin_memory),
    _Patch("llmcompressor.pipelines.sequential.pipeline", "calibration_forward_context",
           _make_reentrant_calibration_context),
    _Patch("llmcompressor.modifiers.transform.awq.base", "calibration_forward_context",
           _make_reentrant_calibration_context),
    # SparseGPT's column loop per expert: 400 of 540 s at 2.8B on an H200 (compressors/sparsegpt_batched.py)
    _Patch("llmcompressor.modifiers.pruning.sparsegpt.base", "SparseGPTModifier.compress_modules",
           make_batched_compress_modules),
    _Patch("llmcompressor.modeling.moe.gpt_oss", "GptOssExpertMLP.copy_to_experts_module",
           _make_interleaved_copy_to_experts),
)

_INHERITED = object()  # marks a patched class attribute that the class itself did not define
_LOCK = threading.RLock()
_depth = 0
_saved: list[tuple[Any, str, Any]] = []


def patches_active() -> bool:
    return _depth > 0


@contextlib.contextmanager
def llmcompressor_patches() -> Iterator[None]:
    """Install every patch for the duration of the block (re-entrant; originals restored on last exit)."""
    global _depth
    with _LOCK:
        if _depth == 0:
            _install()
        _depth += 1
    try:
        yield
    finally:
        with _LOCK:
            _depth -= 1
            if _depth == 0:
                _restore()


def _install() -> None:
    try:
        for patch in _PATCHES:
            owner, name = patch.owner()
            # A class attribute may be inherited (absent from the class's own dict): restored by deleting it.
            original = owner.__dict__.get(name, _INHERITED) if isinstance(owner, type) else getattr(owner, name)
            _saved.append((owner, name, original))
            setattr(owner, name, patch.make(None if original is _INHERITED else original))
    except BaseException:
        _restore()
        raise


def _restore() -> None:
    while _saved:
        module, attribute, original = _saved.pop()
        if original is _INHERITED:
            delattr(module, attribute)
        else:
            setattr(module, attribute, original)


# Calibration tokens per batch on an accelerator: the sequential pipeline runs every expert's Linear loop, its
# hooks and (AWQ) every grid point once per batch, so 64 rows at batch 1 cost 64x the Python and launch work
# of one batch. 16,384 tokens of activations per layer are a few hundred MB even at hidden 4096.
ACCELERATOR_BATCH_TOKENS = 16384


def calibration_batch_size(rows: int, seq_len: int, device_type: str) -> int:
    """Rows per calibration batch: 1 on the CPU (the reference path, unchanged); on an accelerator as many
    equal-length, unpadded rows as fit `ACCELERATOR_BATCH_TOKENS` (batching them changes no semantics: no row
    is padded, so the causal mask stays exact)."""
    if device_type == "cpu":
        return 1
    return max(1, min(rows, ACCELERATOR_BATCH_TOKENS // max(seq_len, 1)))


def model_device(model: PreTrainedModel) -> Any:
    import torch

    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def run_oneshot(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset: datasets.Dataset | None,
                recipe: Any, *, calibrate_all_experts: bool, propagate_error: bool = True) -> None:
    """`llmcompressor.oneshot` in place on `model`, patched, over every calibration row in order.

    Sequential pipeline, no shuffling, no truncation (`max_seq_length` = the row length). On the CPU batch 1
    with activations kept in host memory, as always; with the model on an accelerator `calibration_batch_size`
    rows per batch and the activations between layers kept on the model's device (no host round trips).
    `calibrate_all_experts` (llmcompressor.md §5d): every expert sees every token — keep True for
    quantization/pruning of expert weights (an expert without tokens is zeroed silently otherwise).
    `propagate_error=False` feeds each layer the *uncompressed* outputs of the previous one (one pass of
    the dense model's activations); True (the GPTQ default) feeds the compressed ones.
    `dataset=None` is the data-free pipeline (FP8 dynamic, magnitude/random pruning): no forward pass runs.
    """
    from llmcompressor import oneshot

    with llmcompressor_patches():
        if dataset is None:
            oneshot(model=model, processor=cast(Any, tokenizer), recipe=recipe, pipeline="datafree")
            return
        n_rows, seq_len = len(dataset), len(dataset[0]["input_ids"])
        device = model_device(model)
        on_accelerator: dict[str, Any] = {} if device.type == "cpu" else {"sequential_offload_device": str(device)}
        oneshot(
            model=model,
            processor=cast(Any, tokenizer),  # a tokenizer is a valid processor
            dataset=dataset,
            recipe=recipe,
            num_calibration_samples=n_rows,
            max_seq_length=seq_len,
            shuffle_calibration_samples=False,
            batch_size=calibration_batch_size(n_rows, seq_len, device.type),
            pipeline="sequential",
            moe_calibrate_all_experts=calibrate_all_experts,
            propagate_error=propagate_error,
            **on_accelerator,
        )


def release_session() -> None:
    """Reset llmcompressor's global session, which keeps the compressed model alive until the next oneshot.

    Call after saving (save_pretrained reads the session's recipe to write recipe.yaml)."""
    from llmcompressor.core import active_session

    active_session().reset()
