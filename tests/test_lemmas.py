"""The paper's Lemma 1, Lemma 2 and second formulation, checked on TrActOptimizer's updates.

Inputs are dyadic (multiples of 1/4, |x| ≤ 2), so the library's fp32 statistics hold them and
their Gram exactly, and its update is accurate to float64 rounding; tolerances are multiples of
float64's unit roundoff times the condition number of M = XᵀX/b + λI.
Notation in torch's row layout: rows x (b, n), z = x Wᵀ (b, m), ∇W = ∇zᵀ x (m, n).
"""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from tests.kit import (
    U32,
    U64,
    assert_update,
    condition,
    draw_conv,
    linear_with,
    relative_error,
    tract_gradient,
    unfold_rows,
)
from tract_optim import TrActOptimizer

SETTINGS = settings(max_examples=40, deadline=None)
LAMS = st.sampled_from([0.01, 0.05, 0.1, 0.2, 1.0])


def dyadic(gen: torch.Generator, *shape: int) -> Tensor:
    """Random float64 multiples of 1/4 in [−2, 2]: exact in fp32, and so are their Grams."""
    return torch.randint(-8, 9, shape, generator=gen).double() / 4


def objective(delta: Tensor, weight: Tensor, x: Tensor, z_star: Tensor, lam: float) -> Tensor:
    """Eq. 5: ‖z* − x(W + ΔW)ᵀ‖² + λ·b·‖ΔW‖²."""
    b = x.shape[0]
    return ((z_star - x @ (weight + delta).T) ** 2).sum() + lam * b * (delta**2).sum()


@st.composite
def linear_problems(draw: st.DrawFn) -> tuple[Tensor, Tensor, Tensor, float, float]:
    """(W, x, ∇z, λ, η) with b rows of width n; b < n and b ≥ n both drawn."""
    b, n, m = draw(st.integers(1, 10)), draw(st.integers(1, 8)), draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    weight = torch.randn(m, n, generator=gen, dtype=torch.float64)
    out_grad = torch.randn(b, m, generator=gen, dtype=torch.float64)
    lam, lr = draw(LAMS), draw(st.sampled_from([0.01, 0.1, 1.0]))
    return weight, dyadic(gen, b, n), out_grad, lam, lr


@SETTINGS
@given(linear_problems(), st.integers(0, 2**16))
def test_lemma1_update_minimises_eq5(
    problem: tuple[Tensor, Tensor, Tensor, float, float], seed: int
) -> None:
    """Lemma 1: the SGD+TrAct step ΔW = −η·(TrAct ∇W) minimises Eq. 5 with z* = z − η·b·∇z.

    Eq. 5's gradient at ΔW is 2b(ΔW − ΔW*)M, so it vanishes relative to its value at 0 up to
    (solve error)·cond(M) ≤ c·u·cond(M)²; and no perturbation lowers the objective.
    """
    weight, x, out_grad, lam, lr = problem
    layer = linear_with(weight)
    _, (grad,) = tract_gradient([layer], layer, x, lam, out_grad=out_grad, solve_dtype=None)
    delta = -lr * grad
    b = x.shape[0]
    z_star = x @ weight.T - lr * b * out_grad  # Eq. 3
    at_zero = torch.zeros_like(delta, requires_grad=True)
    objective(at_zero, weight, x, z_star, lam).backward()
    at_opt = delta.clone().requires_grad_(True)
    best = objective(at_opt, weight, x, z_star, lam)
    best.backward()
    assert at_zero.grad is not None and at_opt.grad is not None
    cond = condition(x[None], lam)
    assert at_opt.grad.norm() <= 1000 * U64 * cond**2 * at_zero.grad.norm()
    gen = torch.Generator().manual_seed(seed)
    for scale in (1e-3, 1e-1, 1.0, 10.0):
        d = scale * (delta.norm() + 1e-3) * torch.randn(delta.shape, generator=gen).double()
        worse = objective(delta + d, weight, x, z_star, lam)
        assert worse >= best * (1 - 1000 * U64)


@st.composite
def least_squares(draw: st.DrawFn) -> tuple[nn.Module, Tensor, Tensor, float]:
    """(bias-free first layer, dyadic input, target output, λ): a Linear, Conv1d or Conv2d with
    groups, stride and padding; fewer rows than the row width (r < n) and more both drawn."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d"]))
    layer: nn.Module
    if kind == "linear":
        n = draw(st.integers(1, 6))
        layer = nn.Linear(n, draw(st.integers(1, 4)), bias=False, dtype=torch.float64)
        x = dyadic(gen, *draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)), n)
    else:
        dims = 1 if kind == "conv1d" else 2
        groups = draw(st.integers(1, 2))
        kernel = draw(st.integers(1, 3 if dims == 1 else 2))
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        layer = conv(
            groups * draw(st.integers(1, 2)),
            groups * draw(st.integers(1, 2)),
            kernel,
            stride=draw(st.integers(1, 2)),
            padding=draw(st.integers(0, 1)),
            groups=groups,
            bias=False,
            dtype=torch.float64,
        )
        sizes = [kernel + draw(st.integers(0, 6 if dims == 1 else 3)) for _ in range(dims)]
        x = dyadic(gen, draw(st.integers(1, 3)), layer.in_channels, *sizes)
    with torch.no_grad():
        target = torch.randn(layer(x).shape, generator=gen, dtype=torch.float64)
    return layer, x, target, draw(st.sampled_from([0.01, 0.05, 0.1, 0.2]))


def output_rows(z: Tensor, layer: nn.Module, groups: int) -> Tensor:
    """Outputs (or targets) as rows per group, (groups, r, out_per_group), in the row order of
    ``unfold_rows``."""
    if isinstance(layer, nn.Linear):
        rows = z.reshape(-1, z.shape[-1])
    else:
        rows = z.movedim(1, -1).reshape(-1, z.shape[1])
    return rows.reshape(rows.shape[0], groups, -1).transpose(0, 1)


def limit(weight: Tensor, rows: Tensor, targets: Tensor) -> Tensor:
    """Where gradient descent from ``weight`` on ½‖XWᵀ − Y‖² goes, per group: it moves W only
    within the row space of X, so to W0 + (X⁺(Y − X W0ᵀ))ᵀ (the least-squares solution when X
    has full column rank)."""
    groups, _, n = rows.shape
    w0 = weight.detach().reshape(groups, -1, n)
    step = torch.linalg.pinv(rows) @ (targets - rows @ w0.transpose(1, 2))
    return (w0 + step.transpose(1, 2)).reshape(weight.shape)


def descend(
    layer: nn.Module, x: Tensor, target: Tensor, steps: int, lam: float | None, lr: float
) -> Tensor:
    """Full-batch gradient descent on ½·mean over rows of ‖z − y‖², with TrAct when λ is given."""
    inner = torch.optim.SGD(layer.parameters(), lr=lr)
    opt = inner if lam is None else TrActOptimizer(inner, layer, lam)
    rows_per_channel = target.numel() // target.shape[-1 if isinstance(layer, nn.Linear) else 1]
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((layer(x) - target) ** 2).sum() / rows_per_channel).backward()
        opt.step()
    if isinstance(opt, TrActOptimizer):
        opt.remove()
    return layer.weight.detach().clone()


@settings(max_examples=20, deadline=None)
@given(least_squares())
def test_lemma2_tract_and_plain_descent_converge_to_the_same_minimiser(
    problem: tuple[nn.Module, Tensor, Tensor, float],
) -> None:
    """Lemma 2 on a convex problem: least squares through a first layer. Full-batch gradient
    descent with and without TrAct, from the same start, converge to the same point, the
    closed-form one (``limit``). TrAct's error contracts by λ/(σ + λ) per step (lr 1) on each
    eigenvalue σ > 0 of XᵀX/r; plain descent's (lr 1/σ_max) by 1 − σ/σ_max.
    """
    layer, x, target, lam = problem
    rows = unfold_rows(layer, x)
    eig = torch.linalg.eigvalsh(rows.transpose(1, 2) @ rows / rows.shape[1])
    top = eig.max().item()
    assume(top > 0)
    low = eig[eig > 1e-9 * top].min().item()  # the smallest non-zero eigenvalue
    tract_rate, plain_rate = lam / (low + lam), 1 - low / top
    assume(tract_rate <= 0.75)
    start = layer.weight.detach().clone()
    expected = limit(start, rows, output_rows(target, layer, rows.shape[0]))
    tolerance = 1e-8 * ((expected - start).abs().max().item() + expected.abs().max().item())

    got = descend(layer, x, target, steps_to(1e-10, tract_rate), lam, lr=1.0)
    assert (got - expected).abs().max().item() <= tolerance
    if plain_rate <= 0.9:  # plain descent converges slowly on ill-conditioned rows
        with torch.no_grad():
            layer.weight.copy_(start)
        got = descend(layer, x, target, steps_to(1e-10, plain_rate), None, lr=1.0 / top)
        assert (got - expected).abs().max().item() <= tolerance


def steps_to(reduction: float, rate: float) -> int:
    """Steps for an error contracting by ``rate`` per step to shrink by ``reduction``."""
    return math.ceil(math.log(reduction) / math.log(rate)) if rate > 0 else 1


@SETTINGS
@given(data=st.data(), lam=LAMS)
def test_lemma2_nonzero_gradient_gives_descent_direction(data: st.DataObject, lam: float) -> None:
    """∇W ≠ 0 ⇒ TrAct ∇W ≠ 0, and it is a descent direction within the spectral bounds

    ‖G‖²/(max tr(XᵀX)/r + λ) ≤ ⟨G, G M⁻¹⟩ ≤ ‖G‖²/λ, from λI ⪯ M ⪯ (tr(XᵀX)/r + λ) I.

    The float64 inputs reach the statistics rounded to fp32 (relative 2⁻²⁴ of M's largest
    eigenvalue), so the bounds hold to 64·2⁻²⁴·(tr/r)/λ relative.
    """
    layer, x = draw_conv(data, dtype=torch.float64)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    out_grad = torch.randn(layer(x).shape, generator=gen, dtype=torch.float64)
    (plain,), (grad,) = tract_gradient([layer], layer, x, lam, out_grad=out_grad, solve_dtype=None)
    assume(plain.any())  # a zero ∇W gives a zero update (any linear map does)
    rows = unfold_rows(layer, x)
    trace = (rows**2).sum(dim=(1, 2)).max().item() / rows.shape[1]
    slack = 64 * U32 * (trace + lam) / lam
    inner = (plain * grad).sum().item()
    squared = (plain**2).sum().item()
    assert grad.any()
    assert squared / (trace + lam) * (1 - slack) <= inner <= squared / lam * (1 + slack)


@SETTINGS
@given(
    leading=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    n=st.integers(1, 8),
    lam=LAMS,
    seed=st.integers(0, 2**16),
)
def test_second_formulation_gives_the_same_weight_gradient(
    leading: list[int], n: int, lam: float, seed: int
) -> None:
    """z = embed(x @ inverse(xᵀx/b + λI)); z.data = embed(x) has TrAct's weight gradient."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = dyadic(gen, *leading, n)
    embed = nn.Linear(n, 5, dtype=torch.float64)
    twin = nn.Linear(n, 5, dtype=torch.float64)
    twin.load_state_dict(embed.state_dict())
    head = torch.randn(5, generator=gen, dtype=torch.float64)

    flat = x.reshape(-1, n)
    b = flat.shape[0]
    whitened = x @ torch.linalg.inv(flat.T @ flat / b + lam * torch.eye(n, dtype=torch.float64))
    z = embed(whitened)
    z.data = embed(x).data
    torch.tanh(z @ head).sum().backward()

    opt = TrActOptimizer(torch.optim.SGD(twin.parameters(), lr=0.1), twin, lam)
    torch.tanh(twin(x) @ head).sum().backward()
    opt.precondition_()
    assert embed.weight.grad is not None and twin.weight.grad is not None
    error = relative_error(twin.weight.grad, embed.weight.grad)
    assert error <= 1000 * U64 * condition(flat[None], lam), error
    # The bias never sees the preconditioner: both are the same autograd computation.
    torch.testing.assert_close(twin.bias.grad, embed.bias.grad, rtol=0, atol=0)


def test_tract_gradient_matches_the_reference() -> None:
    """``kit.tract_gradient`` returns Eq. 10 (guards the Lemma tests against testing nothing)."""
    gen = torch.Generator().manual_seed(0)
    x, out_grad = dyadic(gen, 6, 4), torch.randn(6, 3, generator=gen, dtype=torch.float64)
    layer = linear_with(torch.zeros(3, 4, dtype=torch.float64))
    (plain,), (grad,) = tract_gradient([layer], layer, x, 0.1, out_grad=out_grad, solve_dtype=None)
    assert_update(grad, plain, x[None], 0.1, per_cond=1000 * U64)
    assert relative_error(grad, plain) > 0.1
