"""The reload check's tolerance in every dtype the suite runs in (issue 17): bf16 resolution, not a constant.

Correct reloads that differ by rounding (one or two spacings of bf16 at the logits' magnitude) must pass;
a wrong tensor (swapped expert, wrong scale, dropped bias) moves logits by many spacings and over many
positions and must fail. float32 keeps its flat 1e-4, bit for bit as before."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compressors.verify import MAX_OFF_FRACTION, ULPS, logit_problems, logit_tolerance, spacing
from fixtures.errors import CompressionError


def _bf16_logits(seed: int, scale: float = 16.0, shape: tuple[int, ...] = (2, 8, 512)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale / 3).to(torch.bfloat16).float()


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1e-30, max_value=1e30, allow_nan=False))
def test_spacing_is_the_distance_to_the_next_bf16_number(value: float) -> None:
    as_bf16 = torch.tensor([value], dtype=torch.bfloat16)
    above = torch.nextafter(as_bf16, torch.tensor([math.inf], dtype=torch.bfloat16))
    assert float(spacing(as_bf16.float(), "bfloat16")[0]) == float(above.float() - as_bf16.float())


def test_one_or_two_ulps_around_16_pass() -> None:
    want = _bf16_logits(0) + 16.0  # logits around 16: bf16's spacing there is 0.125
    assert float(spacing(torch.tensor([16.0]), "bfloat16")[0]) == 0.125
    for ulps in (1, 2):
        got = want.clone()
        got[..., ::97] += ulps * spacing(want[..., ::97], "bfloat16")  # a handful of roundings differ
        numbers, failure = logit_problems(got, want, "bfloat16")
        assert failure == "", failure
        assert numbers["max_abs_logit_diff"] > 0.05  # the old absolute 0.05 failed exactly these


def test_every_logit_one_ulp_off_near_its_own_magnitude_passes() -> None:
    want = _bf16_logits(1)
    got = want + spacing(want, "bfloat16")  # every logit off by its own spacing: never more than the row's
    assert logit_problems(got, want, "bfloat16")[1] == ""


def _layer_output(weights: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of a toy MoE layer: 4 experts, token t routed to expert t % 4, as bf16 would give them."""
    rows = [hidden[t] @ weights[t % weights.shape[0]] for t in range(hidden.shape[0])]
    return torch.stack(rows).to(torch.bfloat16).float()[None]


@pytest.mark.parametrize("defect", ["swapped expert", "scale x1.5", "dropped bias", "one group x2"])
def test_a_wrong_tensor_fails(defect: str) -> None:
    generator = torch.Generator().manual_seed(2)
    weights = torch.randn(4, 64, 256, generator=generator) / 4
    hidden = torch.randn(32, 64, generator=generator)
    bias = torch.randn(256, generator=generator)
    want = (_layer_output(weights, hidden).double() + bias).to(torch.bfloat16).float()
    broken, broken_bias = weights.clone(), bias.clone()
    if defect == "swapped expert":
        broken[[0, 1]] = broken[[1, 0]]
    elif defect == "scale x1.5":
        broken[2] *= 1.5
    elif defect == "dropped bias":
        broken_bias.zero_()
    else:
        broken[3, :, :64] *= 2
    got = (_layer_output(broken, hidden).double() + broken_bias).to(torch.bfloat16).float()
    numbers, failure = logit_problems(got, want, "bfloat16")
    assert failure, numbers
    assert numbers["worst_ratio"] > 1 or numbers["off_by_more_than_one_spacing"] > MAX_OFF_FRACTION


def test_widespread_small_noise_fails_by_its_share() -> None:
    want = _bf16_logits(3)
    got = want + 2 * spacing(want.abs().amax(dim=-1, keepdim=True), "bfloat16")  # every logit 2 spacings off
    numbers, failure = logit_problems(got, want, "bfloat16")
    assert numbers["worst_ratio"] <= 1 and "differ by more than one" in failure


def test_float32_keeps_its_flat_tolerance() -> None:
    want = _bf16_logits(4)
    assert torch.equal(logit_tolerance(want, "float32"), torch.full((2, 8, 1), 1e-4, dtype=torch.float64))
    assert logit_problems(want, want, "float32")[0]["tolerance"] == 1e-4
    assert logit_problems(want + 5e-5, want, "float32")[1] == ""
    assert "> tolerance 0.0001" in logit_problems(want + 2e-4, want, "float32")[1]


def test_bf16_tolerance_is_ulps_spacings_at_the_rows_largest_logit() -> None:
    want = torch.tensor([[[3.0, -20.0, 1.0]]])  # |largest| 20: spacing 0.125
    assert float(logit_tolerance(want, "bfloat16")) == ULPS["bfloat16"] * 0.125


def test_unknown_dtype_is_an_error() -> None:
    with pytest.raises(CompressionError, match="no reload tolerance for dtype int8"):
        logit_tolerance(torch.zeros(1, 1, 2), "int8")
