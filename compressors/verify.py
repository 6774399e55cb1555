"""Verification of a saved checkpoint: it must reload with plain transformers to the model we built.

Why: transformers 5 reloads some compressed MoE checkpoints *silently wrong* (Mixtral/GPT-OSS per-expert
keys are dropped and the fused experts re-initialised, llmcompressor.md §5f). Every compressor therefore
computes logits of its in-memory compressed model, in the form it saves (after any repack), on fixed
inputs *before* saving (`reference`), and `verify_checkpoint` reloads the directory with
`AutoModelForCausalLM.from_pretrained` (no llmcompressor `load_context`) and raises CompressionError,
with the numbers, on any missing/unexpected/mismatched key, a wrong expert count, non-finite logits or a
logit difference above tolerance. It never passes silently.

Tolerance. float32: max |Δlogit| ≤ 1e-4 (a pack-quantized in-memory model runs llmcompressor's per-expert
Linear loop while the reload runs the native fused kernel, so results may differ by summation order;
measured 0.0 on every zoo checkpoint, and one corrupted expert tensor moves logits by ≥ 1e-2). bf16/fp16:
a fixed absolute tolerance is wrong at every scale (on an H200 correct 2.8B GPTQ/AWQ checkpoints differed by
up to 0.074, ~5 bf16 spacings at the row's largest logit, against the old 0.05), so the tolerance follows the dtype's
resolution where the logits are: each position (row of logits) may differ by `ULPS` spacings of the dtype
at that row's largest |logit| (the coarsest grid any of its logits sits on), and at most `MAX_OFF_FRACTION`
of all logits may differ by more than one spacing (different kernels disagree on a handful of roundings; a
wrong tensor moves every token routed through it). `logit_tolerance` is that rule, stated once.
(Mixtral in bf16 is why repacked models are compared after the repack: the loop and the native kernel
differ by ~1 logit there.)

What "the model we built" means for quantized checkpoints: plain transformers decompresses the expert
weights to dense tensors and runs no activation quantization (W4A8, FP8 dynamic), and it decompresses FP8
experts to bf16 whatever `dtype` asks (§5f). Comparing that with the in-memory fake-quant model would
mix those runtime effects (~1.3-1.5 logits of activation quantization, ~3e-2 of bf16 rounding on the zoo)
into the check and force a tolerance no corrupted tensor could exceed. So the quantizers compute the
reference in the reload's semantics (`compressors.quantization.plain_reload_view`: activation quantization
off, expert weights fake-quantized and rounded to the dtype transformers decompresses them to), and
`verify_checkpoint` casts the reloaded model to the reference's dtype, which is lossless (it only widens
those bf16 experts) and is allowed for expert tensors only. The tolerance stays 1e-4 (measured diff 0.0);
the as-loaded difference (bf16 experts computing in bf16) is recorded, not gated.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compressors.base import moe_info
from fixtures.errors import CompressionError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

ABSOLUTE_TOLERANCES = {"float32": 1e-4}  # flat: float32 rounding is far below any defect's effect
# Measured on an H200 (2.8B, bf16, correct GPTQ/AWQ reloads): up to 4.7 spacings and 0.21% of logits beyond
# one spacing; a swapped expert or a tensor off by x1.5 on the zoo: 16-73 spacings and 25-95% beyond one.
ULPS = {"bfloat16": 16, "float16": 16}  # spacings of the dtype at the row's largest |logit|
MAX_OFF_FRACTION = 0.02  # low precision: share of logits allowed beyond one spacing
PROBE_BATCH, PROBE_LENGTH = 4, 32  # 128 tokens: every expert of the zoo is routed some
_LOAD_REPORT_KEYS = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")


def probe_inputs(vocab_size: int, *, seed: int = 0, batch: int = PROBE_BATCH,
                 length: int = PROBE_LENGTH) -> torch.Tensor:
    """Fixed token ids (no padding) drawn from a seeded generator over the whole vocabulary."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


def model_logits(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of `model` on `input_ids` as float32 on CPU (no cache, eval mode, no grad)."""
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(model.device), use_cache=False).logits
    return logits.float().cpu()


def dtype_name(dtype: torch.dtype | str) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in ABSOLUTE_TOLERANCES and name not in ULPS:
        known = ", ".join([*ABSOLUTE_TOLERANCES, *ULPS])
        raise CompressionError(f"no reload tolerance for dtype {name}; known: {known}")
    return name


def spacing(values: torch.Tensor, dtype: torch.dtype | str) -> torch.Tensor:
    """The distance between adjacent numbers of `dtype` at |values| (its ulp; eps·2^floor(log2|v|)),
    computed in float32; the smallest normal's spacing for zeros."""
    import torch

    info = torch.finfo(getattr(torch, dtype_name(dtype)))
    magnitude = values.abs().float().clamp(min=info.tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * info.eps


def logit_tolerance(want: torch.Tensor, dtype: torch.dtype | str) -> torch.Tensor:
    """Per position, the largest |Δlogit| a correct reload may show (shape `want.shape[:-1] + (1,)`):
    1e-4 in float32; in bf16/fp16 `ULPS` spacings of the dtype at the row's largest |logit|."""
    import torch

    name = dtype_name(dtype)
    rows = (*want.shape[:-1], 1)
    if name in ABSOLUTE_TOLERANCES:
        return torch.full(rows, ABSOLUTE_TOLERANCES[name], dtype=torch.float64)  # the exact constant, as before
    return ULPS[name] * spacing(want.abs().amax(dim=-1, keepdim=True), name)


def logit_problems(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype | str) -> tuple[dict[str, Any], str]:
    """Compare reloaded with reference logits under `logit_tolerance`: (numbers for the record, the reason
    they fail or "" when they pass)."""
    import torch

    name = dtype_name(dtype)
    diff = (got - want).abs()
    allowed = logit_tolerance(want, name)
    excess = diff / allowed
    worst = tuple(int(i) for i in torch.nonzero(excess == excess.max())[0])
    numbers: dict[str, Any] = {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
                               "tolerance": float(allowed.max()), "tolerance_at_worst": float(allowed[worst[:-1]]),
                               "worst_ratio": float(excess.max())}
    over = int((diff > allowed).sum())
    where = (f"worst at batch/position/token {worst}: |Δ| {float(diff[worst]):.3g}, "
             f"{over} of {diff.numel()} logits over")
    if name in ABSOLUTE_TOLERANCES:
        if over:
            return numbers, (f"max |Δ| {numbers['max_abs_logit_diff']:.3g} > tolerance {ABSOLUTE_TOLERANCES[name]:g} "
                             f"(mean |Δ| {numbers['mean_abs_logit_diff']:.3g}, {where})")
        return numbers, ""
    unit = allowed / ULPS[name]
    off_fraction = float((diff > unit).float().mean())
    numbers["off_by_more_than_one_spacing"] = off_fraction
    if over:
        return numbers, (f"max |Δ| {numbers['max_abs_logit_diff']:.3g} > tolerance {numbers['tolerance_at_worst']:.3g} "
                         f"({ULPS[name]} {name} spacings at that row's largest |logit|; {where})")
    if off_fraction > MAX_OFF_FRACTION:
        return numbers, (f"{off_fraction:.2%} of logits differ by more than one {name} spacing "
                         f"(at most {MAX_OFF_FRACTION:.2%} allowed; max |Δ| {numbers['max_abs_logit_diff']:.3g})")
    return numbers, ""


def reference(model: PreTrainedModel, *, seed: int = 0) -> dict[str, Any]:
    """What `verify_checkpoint` compares against: probe inputs, logits and tolerance of the in-memory model.

    Call it after compression and *before* saving (saving compressed may pack the in-memory weights)."""
    config = getattr(model.config, "text_config", None) or model.config
    inputs = probe_inputs(int(config.vocab_size), seed=seed)
    return {"input_ids": inputs, "logits": model_logits(model, inputs), "dtype_name": dtype_name(model.dtype),
            "dtype": model.dtype, "device": str(model.device),
            "param_dtypes": {name: p.dtype for name, p in model.named_parameters()}}


def load_report_problems(loading_info: dict[str, Any]) -> list[str]:
    """Non-empty entries of transformers' loading info (`output_loading_info=True`), formatted."""
    problems = []
    for key in _LOAD_REPORT_KEYS:
        entries = sorted(str(entry) for entry in loading_info.get(key) or ())
        if entries:
            shown = ", ".join(entries[:8]) + (f", ... ({len(entries)} in all)" if len(entries) > 8 else "")
            problems.append(f"{key}: {shown}")
    return problems


# Fused routed-expert tensors of a reloaded model (`mlp.experts.gate_up_proj`); not `shared_experts`.
_FUSED_EXPERT = re.compile(r"\.experts\.")


def widen_to_reference(model: PreTrainedModel, ref: dict[str, Any]) -> dict[str, Any]:
    """Cast the routed-expert tensors of a reloaded model that came back in another dtype than the
    reference's (FP8 experts: bf16) to that dtype, in place; any other tensor whose dtype differs from the
    in-memory model's same-named tensor is a CompressionError. Returns what was widened and the logit
    difference of the model as loaded (recorded, not gated)."""
    want, expected = ref.get("dtype"), ref.get("param_dtypes", {})
    odd = {name: param for name, param in model.named_parameters()
           if want is not None and param.is_floating_point() and param.dtype != expected.get(name, want)}
    if not odd:
        return {}
    foreign = sorted(name for name in odd if not _FUSED_EXPERT.search(name))
    if foreign:
        raise CompressionError(f"reloaded non-expert tensors in a dtype other than the built model's: {foreign[:6]}")
    as_loaded = float((model_logits(model, ref["input_ids"]) - ref["logits"]).abs().max())
    widened_from = sorted({str(param.dtype).removeprefix("torch.") for param in odd.values()})
    for param in odd.values():  # lossless: bf16 -> fp32 (transformers refuses `.to(dtype)` on quantized models)
        param.data = param.data.to(want)
    return {"widened": {"tensors": len(odd), "from": widened_from}, "max_abs_logit_diff_as_loaded": as_loaded}


def verify_checkpoint(out_dir: Path, ref: dict[str, Any], *, expected_num_experts: int,
                      inspect: Callable[[PreTrainedModel], Any] | None = None) -> dict[str, Any]:
    """Reload `out_dir` with plain transformers and compare it with `ref` (from `reference`).

    Returns the verification record for the manifest; raises CompressionError on any discrepancy.
    `inspect(model)`, if given, runs on the verified reload (e.g. to measure the expert weights as a user
    will load them); its result is returned under the key "inspected"."""
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    missing = [name for name in ("config.json",) if not (out_dir / name).is_file()]
    if not any(out_dir.glob("*.safetensors")):
        missing.append("*.safetensors")
    if not any((out_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        missing.append("tokenizer")
    if missing:
        raise CompressionError(f"{out_dir}: checkpoint incomplete, missing {', '.join(missing)}")
    device = str(ref.get("device", "cpu"))  # the reference's device: a GPU's logits are compared on that GPU
    placement = {} if device == "cpu" else {"device_map": device}  # straight onto the GPU, no host copy
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(out_dir, dtype="auto", output_loading_info=True,
                                                           **placement)
    except Exception as exc:  # any load failure is a failed checkpoint, reported with its cause
        raise CompressionError(
            f"{out_dir}: plain transformers reload failed: {type(exc).__name__}: {exc}"
        ) from exc
    model, loading_info = loaded
    model.to(device)
    problems = load_report_problems(loading_info)
    if problems:
        raise CompressionError(f"{out_dir}: reload report not clean (weights not loaded as saved): "
                               + "; ".join(problems))
    experts = moe_info(model.config).num_experts
    if experts != expected_num_experts:
        raise CompressionError(
            f"{out_dir}: reloaded config has {experts} experts per layer, expected {expected_num_experts}"
        )
    widened = widen_to_reference(model, ref)
    got = model_logits(model, ref["input_ids"])
    want: torch.Tensor = ref["logits"]
    if got.shape != want.shape:
        raise CompressionError(f"{out_dir}: reloaded logits shape {tuple(got.shape)} != {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        raise CompressionError(f"{out_dir}: reloaded model gives non-finite logits "
                               f"({int((~torch.isfinite(got)).sum())} of {got.numel()})")
    numbers, failure = logit_problems(got, want, ref["dtype_name"])
    if failure:
        raise CompressionError(f"{out_dir}: reloaded logits differ from the in-memory compressed model: {failure}")
    record = {
        "reload": "transformers.AutoModelForCausalLM.from_pretrained (plain)",
        "load_report": "clean",
        "num_experts": experts,
        "probe_shape": list(ref["input_ids"].shape),
        **numbers,
        "tolerance_rule": ("absolute" if ref["dtype_name"] in ABSOLUTE_TOLERANCES
                           else f"{ULPS[ref['dtype_name']]} spacings at the row's largest |logit|"),
        "dtype": str(model.dtype).removeprefix("torch."),
        **widened,
    }
    if inspect is not None:
        record["inspected"] = inspect(model)
    return record
