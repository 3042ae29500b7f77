"""TrAct under mixed precision: CPU autocast (bf16, fp16), ``torch.amp.GradScaler``, bf16 weights.

Whatever precision the forward and backward ran in, the statistics and the solve must stay in
fp32 or wider and the gradient comes back in the weight's dtype. Every TrAct gradient is checked
against ``kit.tract_grad`` (float64 rows of the layer's input, ``torch.linalg.solve``) applied
to the same raw gradient, by ``kit.assert_update``: within ``ERROR_PER_COND``·cond(M) =
32·2⁻²⁴·cond(M), about 6e-6 for ``tiny_net``. Measured: 3e-7 under bf16 and fp16 autocast, while
a Gram built from bf16-rounded inputs is off by 8e-4 (asserted to exceed the bound, so the bound
tells the two apart).

Measured drift of low-precision training from fp32 training (``kit.tiny_net``, 5 steps of
SGD with lr 0.05 and momentum 0.9; largest parameter difference, with parameters of size up to
~0.2): bf16 autocast 1.0e-2, fp16 autocast with GradScaler 3.1e-5, bf16 weights 8.7e-3.
``test_low_precision_training_tracks_fp32`` allows 3e-2.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

from tests.kit import (
    ERROR_PER_COND,
    TinyNet,
    assert_update,
    condition,
    draw_conv,
    max_abs_diff,
    relative_error,
    tiny_batch,
    tiny_net,
    tract_grad,
    unfold_rows,
)
from tract_optim import TrActOptimizer

LAM = 0.05
LOW = [torch.bfloat16, torch.float16]
SOLVES = [None, torch.float32, torch.float64]


def sgd(model: TinyNet, lr: float = 1.0, momentum: float = 0.0, **tract: Any) -> TrActOptimizer:
    """SGD, by default with lr 1 and no momentum: a step moves the weight by exactly −gradient."""
    inner = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return TrActOptimizer(inner, model.first, LAM, **tract)


@pytest.mark.parametrize("solve_dtype", SOLVES)
@pytest.mark.parametrize("dtype", LOW)
def test_autocast_keeps_statistics_and_solve_full_precision(
    dtype: torch.dtype, solve_dtype: torch.dtype | None
) -> None:
    model = tiny_net()
    opt = sgd(model, solve_dtype=solve_dtype)
    x, y = tiny_batch(0)
    with torch.autocast("cpu", dtype=dtype):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    raw = model.first.weight.grad.clone()
    opt.precondition_()
    got = model.first.weight.grad
    assert got.dtype == torch.float32
    rows = unfold_rows(model.first, x)
    assert_update(got, raw, rows, LAM)
    # Sensitivity: statistics of the autocast-rounded inputs would fail that bound.
    rounded = tract_grad(unfold_rows(model.first, x.to(dtype)), raw, LAM)
    bound = ERROR_PER_COND * condition(rows, LAM)
    assert relative_error(rounded, tract_grad(rows, raw, LAM)) > 10 * bound


@settings(max_examples=15, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(LOW))
def test_autocast_any_convolution_matches_reference(
    data: st.DataObject, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)  # draw_conv fills tensors from torch's global generator
    conv, x = draw_conv(data)
    opt = TrActOptimizer(torch.optim.SGD(conv.parameters(), lr=1.0), conv, LAM)
    with torch.autocast("cpu", dtype=dtype):
        out = conv(x)
    out.float().square().mean().backward()
    raw = conv.weight.grad.clone()
    assume(raw.any())  # a zero gradient stays zero under any linear map
    opt.precondition_()
    assert_update(conv.weight.grad, raw, unfold_rows(conv, x), LAM)


@pytest.mark.parametrize("dtype", LOW)
def test_grad_scaler_steps_with_the_unscaled_tract_gradient(dtype: torch.dtype) -> None:
    """scaler.step(opt) preconditions the unscaled gradient (not the scaled one)."""
    model = tiny_net()
    opt = sgd(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = tiny_batch(0)
    with torch.autocast("cpu", dtype=dtype):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    unscaled = model.first.weight.grad / scaler.get_scale()
    before = model.first.weight.detach().clone()
    scaler.step(opt)
    scaler.update()
    rows = unfold_rows(model.first, x)
    assert_update(before - model.first.weight.detach(), unscaled, rows, LAM)


@pytest.mark.parametrize("solve_dtype", SOLVES)
def test_bf16_weights_get_a_bf16_gradient_rounded_from_the_exact_one(
    solve_dtype: torch.dtype | None,
) -> None:
    model = tiny_net(torch.bfloat16)
    opt = sgd(model, solve_dtype=solve_dtype)
    x, y = tiny_batch(0)
    x = x.bfloat16()
    F.cross_entropy(model(x).float(), y).backward()
    raw = model.first.weight.grad.clone()
    opt.precondition_()
    got = model.first.weight.grad
    assert got.dtype == torch.bfloat16
    rows = unfold_rows(model.first, x)
    expected = tract_grad(rows, raw, LAM)
    # The fp32 result (within ERROR_PER_COND·cond of the reference) rounded to bf16 (half an
    # ulp, 2⁻⁸).
    computed = ERROR_PER_COND * condition(rows, LAM) * expected.abs().max()
    assert ((got.double() - expected).abs() <= 2.0**-8 * expected.abs() + 2 * computed).all()
    opt.step()
    assert model.first.weight.dtype == torch.bfloat16


def _train(mode: str) -> dict[str, Tensor]:
    """5 steps of SGD with momentum in one precision mode."""
    dtype = torch.bfloat16 if mode == "bf16 weights" else torch.float32
    model = tiny_net(dtype)
    opt = sgd(model, lr=0.05, momentum=0.9)
    amp = {"bf16 autocast": torch.bfloat16, "fp16 autocast + GradScaler": torch.float16}
    scaler = torch.amp.GradScaler("cpu") if "GradScaler" in mode else None
    for seed in range(5):
        x, y = tiny_batch(seed)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=amp.get(mode, torch.float32), enabled=mode in amp):
            loss = F.cross_entropy(model(x.to(dtype)).float(), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return model.state_dict()


@pytest.mark.parametrize("mode", ["bf16 autocast", "fp16 autocast + GradScaler", "bf16 weights"])
def test_low_precision_training_tracks_fp32(mode: str) -> None:
    assert max_abs_diff(_train(mode), _train("fp32")) < 3e-2
