"""TrAct under mixed precision: CPU autocast (bf16, fp16), ``torch.amp.GradScaler``, bf16 weights.

Whatever precision the forward and backward ran in, the statistics and the solve must stay in
fp32 (or fp64 with ``solve_dtype``) and the gradient comes back in the weight's dtype. Every TrAct
gradient is checked against ``precondition_reference``: float64 statistics of the layer's input,
``torch.linalg.solve``, applied to the same raw gradient. Measured: the TrAct gradient is within
3e-7 (relative to its largest entry) of the reference under bf16 and fp16 autocast, while a Gram
built from bf16-rounded inputs is off by 8e-4, so the 2e-6 tolerance tells the two apart.

Measured drift of low-precision training from fp32 training (this module's ``Net``, 5 steps of SGD
with lr 0.05 and momentum 0.9; largest parameter difference, with parameters of size up to ~0.2):
bf16 autocast 1.0e-2, fp16 autocast with GradScaler 3.1e-5, bf16 weights 8.7e-3.
``test_low_precision_training_tracks_fp32`` allows 3e-2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _stack import max_abs_diff, precondition_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from tract_optim import TrActOptimizer

LAM = 0.05
LOW = [torch.bfloat16, torch.float16]
SOLVES = [torch.float32, torch.float64]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.first(x)).flatten(1))  # type: ignore[no-any-return]


def make(dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def data(seed: int, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 6, 6, generator=gen) * scale
    return x, torch.randint(0, 3, (8,), generator=gen)


def sgd(model: Net, lr: float = 1.0, momentum: float = 0.0, **tract: Any) -> TrActOptimizer:
    """SGD, by default with lr 1 and no momentum: a step moves the weight by exactly −gradient."""
    inner = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return TrActOptimizer(inner, model.first, LAM, **tract)


def relative_error(got: Tensor, expected: Tensor) -> float:
    return float((got.double() - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("solve_dtype", SOLVES)
@pytest.mark.parametrize("dtype", LOW)
def test_autocast_keeps_statistics_and_solve_full_precision(
    dtype: torch.dtype, solve_dtype: torch.dtype, reference_rows: Any
) -> None:
    model = make()
    opt = sgd(model, solve_dtype=solve_dtype)
    x, y = data(0)
    with torch.autocast("cpu", dtype=dtype):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    raw = model.first.weight.grad.clone()
    opt.precondition_()
    got = model.first.weight.grad
    assert got.dtype == torch.float32
    expected = precondition_reference(reference_rows(model.first, x), raw, LAM)
    assert relative_error(got, expected) < 2e-6


@settings(max_examples=15, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(LOW))
def test_autocast_any_convolution_matches_reference(
    data: st.DataObject, dtype: torch.dtype, draw_conv: Callable[..., Any], reference_rows: Any
) -> None:
    torch.manual_seed(0)  # draw_conv fills tensors from torch's global generator
    conv, x = draw_conv(data)
    opt = TrActOptimizer(torch.optim.SGD(conv.parameters(), lr=1.0), conv, LAM)
    with torch.autocast("cpu", dtype=dtype):
        out = conv(x)
    out.float().square().mean().backward()
    raw = conv.weight.grad.clone()
    opt.precondition_()
    rows = reference_rows(conv, x)
    expected = precondition_reference(rows, raw, LAM)
    if expected.abs().max() > 0:
        # fp32 statistics and solve lose ~1e-7 × the condition number (bf16 ones ~1e-3 ×).
        assert relative_error(conv.weight.grad, expected) < 1e-6 * condition(rows, LAM)


def condition(rows: Tensor, lam: float) -> float:
    """Largest condition number of the damped matrices XᵀX/r + λI, in float64."""
    eig = torch.linalg.eigvalsh(rows.transpose(1, 2) @ rows / rows.shape[1])
    return float(((eig[:, -1] + lam) / (eig[:, 0] + lam)).max())


@pytest.mark.parametrize("clip_flow", [False, True], ids=["step", "unscale-precondition-clip"])
@pytest.mark.parametrize("dtype", LOW)
def test_grad_scaler_steps_with_the_unscaled_tract_gradient(
    dtype: torch.dtype, clip_flow: bool, reference_rows: Any
) -> None:
    model = make()
    opt = sgd(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = data(0)
    with torch.autocast("cpu", dtype=dtype):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    unscaled = model.first.weight.grad / scaler.get_scale()
    before = model.first.weight.detach().clone()
    if clip_flow:  # the README's recipe for clipping the TrAct gradient under a GradScaler
        scaler.unscale_(opt)
        opt.precondition_()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e6)  # a no-op bound
    scaler.step(opt)  # must not precondition a second time
    scaler.update()
    expected = precondition_reference(reference_rows(model.first, x), unscaled, LAM)
    assert relative_error(before - model.first.weight.detach(), expected) < 1e-5


def test_step_skipped_by_grad_scaler_drops_its_statistics(reference_rows: Any) -> None:
    model = make()
    opt = sgd(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    skipped, kept = data(0, scale=5.0), data(1)
    for (x, y), overflow in ((skipped, True), (kept, False)):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if overflow:
            model.first.weight.grad[0].fill_(float("inf"))
        unscaled = model.first.weight.grad / scaler.get_scale()
        before = model.first.weight.detach().clone()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 2.0**11, "the first step was not skipped"
    rows = reference_rows(model.first, kept[0])
    expected = precondition_reference(rows, unscaled, LAM)
    assert relative_error(before - model.first.weight.detach(), expected) < 1e-5
    # Sensitivity: had the skipped batch's rows leaked into the step, the update would differ.
    leaked_rows = torch.cat([reference_rows(model.first, skipped[0]), rows], dim=1)
    assert relative_error(precondition_reference(leaked_rows, unscaled, LAM), expected) > 1e-2


@pytest.mark.parametrize("solve_dtype", SOLVES)
def test_bf16_weights_get_a_bf16_gradient_rounded_from_the_exact_one(
    solve_dtype: torch.dtype, reference_rows: Any
) -> None:
    model = make(torch.bfloat16)
    opt = sgd(model, solve_dtype=solve_dtype)
    x, y = data(0)
    x = x.bfloat16()
    F.cross_entropy(model(x).float(), y).backward()
    raw = model.first.weight.grad.clone()
    opt.precondition_()
    got = model.first.weight.grad
    assert got.dtype == torch.bfloat16
    expected = precondition_reference(reference_rows(model.first, x), raw, LAM)
    # Within one bf16 unit in the last place (2⁻⁷ relative) of the float64 result.
    torch.testing.assert_close(got.double(), expected, rtol=2.0**-7, atol=1e-6)
    opt.step()
    assert model.first.weight.dtype == torch.bfloat16


def _train(mode: str) -> dict[str, Tensor]:
    """5 steps of SGD with momentum in one precision mode."""
    dtype = torch.bfloat16 if mode == "bf16 weights" else torch.float32
    model = make(dtype)
    opt = sgd(model, lr=0.05, momentum=0.9)
    amp = {"bf16 autocast": torch.bfloat16, "fp16 autocast + GradScaler": torch.float16}
    scaler = torch.amp.GradScaler("cpu") if "GradScaler" in mode else None
    for seed in range(5):
        x, y = data(seed)
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
