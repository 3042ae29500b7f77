"""End to end: TrActOptimizer's weight gradient equals the paper's Eq. 10.

Reference: ``kit.tract_grad``, ∇W·(XᵀX/r + λI)⁻¹ per group in float64 by
``torch.linalg.solve``, with X from ``kit.unfold_rows`` (one-hot convolution), compared by
``kit.assert_update`` (fp32 statistics: relative error ≤ ``ERROR_PER_COND``·cond). The unfold
itself is cross-checked on the way: the autograd weight gradient must equal ∇Zᵀ·X.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from tests.kit import assert_update, conv_net, draw_conv, relative_error, tract_grad, unfold_rows
from tract_optim import TrActOptimizer

SETTINGS = settings(max_examples=40, deadline=None)
DTYPES = st.sampled_from([torch.float32, torch.float64])
SOLVE_DTYPES = st.sampled_from([None, torch.float32, torch.float64])
LAMS = st.sampled_from([0.05, 0.1, 0.2, 1.0])


@dataclass
class Pass:
    """What one forward/backward through layer + head produced."""

    grad: Tensor  # the autograd weight gradient, (out_features, n)
    out_grad: Tensor  # ∇Z as rows (r, out_features)


def output_rows(layer: nn.Module, z: Tensor, x: Tensor) -> Tensor:
    """A layer output (or its gradient) as rows (r, out_features), positions row-major."""
    if isinstance(layer, nn.Linear):
        return z.reshape(-1, layer.out_features)
    if x.dim() == len(layer.kernel_size) + 1:  # unbatched
        z = z.unsqueeze(0)
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def forward_backward(layer: nn.Module, x: Tensor, seed: int) -> Pass:
    """layer → tanh → linear head → cross-entropy on random labels; backward."""
    gen = torch.Generator().manual_seed(seed)
    z = layer(x)
    z.retain_grad()
    features = torch.tanh(z).reshape(z.shape[0] if z.dim() > 1 else 1, -1)
    batch = features.shape[0]
    head = torch.randn(features.shape[1], 3, generator=gen, dtype=features.dtype)
    labels = torch.randint(0, 3, (batch,), generator=gen)
    F.cross_entropy(features @ head, labels).backward()
    assert z.grad is not None and layer.weight.grad is not None
    grad = layer.weight.grad.detach().clone().reshape(layer.weight.shape[0], -1)
    return Pass(grad=grad, out_grad=output_rows(layer, z.grad.detach(), x))


def check_unfold_consistent(grad: Tensor, out_grad: Tensor, rows: Tensor) -> None:
    """Cross-check of the reference rows: ∇W = ∇Zᵀ·X, group by group."""
    groups = rows.shape[0]
    dz = out_grad.double().reshape(out_grad.shape[0], groups, -1).transpose(0, 1)
    expected = (dz.transpose(1, 2) @ rows).reshape(grad.shape)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-5)


def tract_vs_eq10(
    layer: nn.Module,
    x: Tensor,
    lam: float,
    solve_dtype: torch.dtype | None,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(library TrAct gradient, raw gradient, reference rows) for one pass through ``layer``,
    the gradients as (out_features, n)."""
    opt = TrActOptimizer(
        torch.optim.SGD(layer.parameters(), lr=0.1), layer, lam, solve_dtype=solve_dtype
    )
    result = forward_backward(layer, x, seed)
    rows = unfold_rows(layer, x)
    check_unfold_consistent(result.grad, result.out_grad, rows)
    opt.precondition_()
    got = layer.weight.grad.reshape(result.grad.shape)
    opt.remove()
    return got, result.grad, rows


@SETTINGS
@given(
    leading=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    n=st.integers(1, 12),
    m=st.integers(1, 4),
    bias=st.booleans(),
    lam=LAMS,
    dtype=DTYPES,
    solve_dtype=SOLVE_DTYPES,
    seed=st.integers(0, 2**16),
)
def test_linear_matches_eq10(
    leading: list[int],
    n: int,
    m: int,
    bias: bool,
    lam: float,
    dtype: torch.dtype,
    solve_dtype: torch.dtype | None,
    seed: int,
) -> None:
    """A Linear on inputs of rank 1–4 (all leading dims are rows); r < n and r ≥ n both drawn."""
    torch.manual_seed(seed)
    layer = nn.Linear(n, m, bias=bias, dtype=dtype)
    x = torch.randn(*leading, n, dtype=dtype)
    assert_update(*tract_vs_eq10(layer, x, lam, solve_dtype), lam)


@SETTINGS
@given(data=st.data(), lam=LAMS, dtype=DTYPES, solve_dtype=SOLVE_DTYPES)
def test_conv_matches_eq10(
    data: st.DataObject,
    lam: float,
    dtype: torch.dtype,
    solve_dtype: torch.dtype | None,
) -> None:
    """Conv1d/2d/3d over strides, paddings, dilations, groups, padding modes and layouts."""
    layer, x = draw_conv(data, dtype=dtype)
    assert_update(*tract_vs_eq10(layer, x, lam, solve_dtype), lam)


# (layer, input shape); the first of each pair has r < n (Woodbury), the second r ≥ n (direct).
PATH_CASES = [
    (lambda: nn.Linear(48, 16), (2, 3, 48)),
    (lambda: nn.Linear(48, 16), (4, 16, 48)),
    (lambda: nn.Conv2d(3, 8, 7, stride=4, padding=3, padding_mode="reflect"), (1, 3, 9, 9)),
    (lambda: nn.Conv2d(3, 8, 7, stride=2, padding=3, padding_mode="reflect"), (4, 3, 16, 16)),
    (lambda: nn.Conv2d(4, 6, 4, stride=4, groups=2), (2, 4, 9, 10)),
    (lambda: nn.Conv2d(4, 6, 4, stride=4, groups=2), (8, 4, 18, 17)),
    (
        lambda: nn.Conv3d(2, 4, 3, dilation=2, padding="same", padding_mode="circular"),
        (1, 2, 2, 2, 3),
    ),
    (
        lambda: nn.Conv3d(2, 4, 3, dilation=2, padding="same", padding_mode="circular"),
        (2, 2, 4, 5, 3),
    ),
    (lambda: nn.Conv1d(6, 3, 5, groups=3, padding=2, padding_mode="replicate"), (1, 6, 4)),
    (lambda: nn.Conv1d(6, 3, 5, groups=3, padding=2, padding_mode="replicate"), (3, 6, 20)),
]


@pytest.mark.parametrize(("make", "shape"), PATH_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solve_dtype", [None, "model"])
def test_woodbury_and_direct_paths(
    make: Callable[[], nn.Module],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    solve_dtype: str | None,
) -> None:
    """Both solve paths (the library picks Woodbury when r < n) on stems and patch embeddings,
    with the automatic solve dtype and with the model's dtype forced."""
    torch.manual_seed(0)
    layer = make().to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    assert_update(*tract_vs_eq10(layer, x, 0.1, None if solve_dtype is None else dtype), 0.1)


def test_path_cases_cover_both_paths() -> None:
    """PATH_CASES alternate r < n and r ≥ n, so both solve paths really are exercised."""
    for i, (make, shape) in enumerate(PATH_CASES):
        _, r, n = unfold_rows(make(), torch.zeros(shape)).shape
        assert (r < n) == (i % 2 == 0), (i, r, n)


@pytest.mark.parametrize("batches", [(1, 1), (1, 3), (2, 5), (6, 6)])
def test_accumulated_passes_use_all_rows(batches: tuple[int, int]) -> None:
    """Two forward/backward passes before one step: Eq. 10 over the rows of both passes.

    With n = 27 and 16 rows per image this covers rows+rows < n, rows+rows ≥ n (the switch to a
    Gram on merging) and Gram+Gram.
    """
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 5, 3, stride=2).double()
    opt = TrActOptimizer(
        torch.optim.SGD(layer.parameters(), lr=0.1), layer, 0.1, solve_dtype=torch.float64
    )
    inputs = [torch.randn(b, 3, 9, 9, dtype=torch.float64) for b in batches]
    for seed, x in enumerate(inputs):
        forward_backward(layer, x, seed)
    grad = layer.weight.grad.detach().clone().reshape(5, -1)
    opt.precondition_()
    rows = torch.cat([unfold_rows(layer, x) for x in inputs], dim=1)
    assert_update(layer.weight.grad.reshape(5, -1), grad, rows, 0.1)


@pytest.mark.parametrize("solve_dtype", [None, torch.float32, torch.float64])
def test_sgd_step_moves_weight_by_tract_gradient_only(solve_dtype: torch.dtype | None) -> None:
    """Plain SGD: W moves by −η·(Eq. 10), bias and the head by −η·(their plain gradient)."""
    lr = 0.3
    model = conv_net(size=8, act=nn.Tanh())
    first = model.first
    opt = TrActOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr), first, 0.1, solve_dtype=solve_dtype
    )
    x = torch.randn(5, 3, 8, 8)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1])).backward()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    opt.step()
    after = {name: p.detach() for name, p in model.named_parameters()}
    raw, rows = grads["first.weight"].reshape(4, -1), unfold_rows(first, x)
    # The step is exactly −η times the gradient left in .grad, and that gradient is Eq. 10.
    preconditioned = first.weight.grad
    torch.testing.assert_close(after["first.weight"], before["first.weight"] - lr * preconditioned)
    assert_update(preconditioned.reshape(4, -1), raw, rows, 0.1)
    assert_update(
        (after["first.weight"] - before["first.weight"]).reshape(4, -1) / -lr, raw, rows, 0.1
    )
    for name in ("first.bias", "head.weight", "head.bias"):
        torch.testing.assert_close(after[name], before[name] - lr * grads[name])


@pytest.mark.parametrize(
    ("stats_dtype", "message"),
    [
        (torch.float32, "inf or NaN"),  # the fp32 Gram overflows
        (None, "not numerically positive definite even in float64"),  # the fp64 one is rank 1
    ],
)
def test_overflowing_input_raises_before_touching_gradients(
    stats_dtype: torch.dtype | None, message: str
) -> None:
    """Inputs of scale 1e20 raise FloatingPointError and leave .grad as it was."""
    layer = nn.Linear(4, 2)
    opt = TrActOptimizer(
        torch.optim.SGD(layer.parameters(), lr=0.1), layer, stats_dtype=stats_dtype
    )
    x = torch.full((8, 4), 1e20)
    (layer(x) * 1e-20).sum().backward()
    grad = layer.weight.grad.clone()
    with pytest.raises(FloatingPointError, match=message):
        opt.precondition_()
    assert torch.equal(layer.weight.grad, grad)


@pytest.mark.parametrize("lam", [0.05, 0.1, 0.2])
@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: nn.Linear(768, 16), (8, 768)),
        (lambda: nn.Linear(768, 16), (2, 32, 768)),
        (lambda: nn.Conv2d(3, 16, 16, stride=16), (1, 3, 32, 64)),  # a ViT-B/16 patch embedding
    ],
    ids=["linear-r8", "linear-r64", "patch16-r8"],
)
def test_default_small_batch_update_is_within_2e_5_of_float64(
    make: Callable[[], nn.Module], shape: tuple[int, ...], lam: float
) -> None:
    """r < n = 768 on standardised inputs, default settings: the Woodbury form must not lose
    digits to cancellation (in fp32 it was off by up to 4e-4 here)."""
    torch.manual_seed(0)
    layer = make()
    got, raw, rows = tract_vs_eq10(layer, torch.randn(*shape), lam, None)
    assert rows.shape[1] < 768
    error = relative_error(got, tract_grad(rows, raw, lam))
    assert error <= 2e-5, error
