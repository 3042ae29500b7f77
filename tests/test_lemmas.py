"""The paper's Lemma 1, Lemma 2 and second formulation, checked on TrActOptimizer's updates.

Inputs are dyadic (multiples of 1/4, |x| ≤ 2), so the library's fp32 statistics hold them and
their Gram exactly and, with ``solve_dtype=float64``, its update is accurate to float64 rounding.
Notation in torch's row layout: rows x (b, n), z = x Wᵀ (b, m), ∇W = ∇zᵀ x (m, n).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from tract_optim import TrActOptimizer

ReferenceRows = Callable[[nn.Module, Tensor], Tensor]
DrawConv = Callable[..., tuple[nn.Module, Tensor]]

SETTINGS = settings(max_examples=40, deadline=None)
LAMS = st.sampled_from([0.01, 0.05, 0.1, 0.2, 1.0])


def dyadic(gen: torch.Generator, *shape: int) -> Tensor:
    """Random float64 multiples of 1/4 in [−2, 2]: exact in fp32, and so are their Grams."""
    return torch.randint(-8, 9, shape, generator=gen).double() / 4


def tract_update(
    layer: nn.Module, x: Tensor, out_grad: Tensor, lam: float, lr: float
) -> tuple[Tensor, Tensor]:
    """(ΔW of one SGD+TrAct step, plain ∇W) when the loss has gradient ``out_grad`` at z."""
    opt = TrActOptimizer(
        torch.optim.SGD(layer.parameters(), lr=lr), layer, lam, solve_dtype=torch.float64
    )
    before = layer.weight.detach().clone()
    (layer(x) * out_grad).sum().backward()
    assert layer.weight.grad is not None
    plain = layer.weight.grad.detach().clone()
    opt.step()
    opt.remove()
    return layer.weight.detach() - before, plain


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


def linear_layer(weight: Tensor) -> nn.Linear:
    """A bias-free float64 Linear holding ``weight``."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


@SETTINGS
@given(linear_problems(), st.integers(0, 2**16))
def test_lemma1_update_minimises_eq5(
    problem: tuple[Tensor, Tensor, Tensor, float, float], seed: int
) -> None:
    """Lemma 1: one SGD+TrAct step's ΔW minimises Eq. 5 with z* = z − η·b·∇z (Eq. 3).

    The objective's gradient vanishes there, and a perturbation D raises it by exactly
    ‖D xᵀ‖² + λ·b·‖D‖² ≥ 0, so none lowers it.
    """
    weight, x, out_grad, lam, lr = problem
    delta, _ = tract_update(linear_layer(weight), x, out_grad, lam, lr)
    b = x.shape[0]
    z_star = x @ weight.T - lr * b * out_grad  # Eq. 3
    at_zero = torch.zeros_like(delta, requires_grad=True)
    objective(at_zero, weight, x, z_star, lam).backward()
    at_opt = delta.clone().requires_grad_(True)
    best = objective(at_opt, weight, x, z_star, lam)
    best.backward()
    assert at_zero.grad is not None and at_opt.grad is not None
    assert at_opt.grad.norm() <= 1e-9 * at_zero.grad.norm() + 1e-12
    gen = torch.Generator().manual_seed(seed)
    for scale in (1e-3, 1e-1, 1.0, 10.0):
        d = scale * (delta.norm() + 1e-3) * torch.randn(delta.shape, generator=gen).double()
        worse = objective(delta + d, weight, x, z_star, lam)
        increase = ((x @ d.T) ** 2).sum() + lam * b * (d**2).sum()
        assert worse >= best
        torch.testing.assert_close(worse - best, increase, rtol=1e-6, atol=1e-9 * best.item())


@SETTINGS
@given(data=st.data(), lam=LAMS)
def test_lemma2_zero_gradient_gives_zero_update(
    data: st.DataObject, lam: float, draw_conv: DrawConv
) -> None:
    """∇W = 0 (here ∇z = 0) ⇒ ΔW* = 0 exactly, for any convolution."""
    layer, x = draw_conv(data, dtype=torch.float64)
    delta, plain = tract_update(layer, x, torch.zeros_like(layer(x)), lam, lr=1.0)
    assert not plain.any() and not delta.any()


@SETTINGS
@given(n=st.integers(1, 6), extra=st.integers(1, 6), lam=LAMS, seed=st.integers(0, 2**16))
def test_lemma2_gradient_orthogonal_to_inputs_gives_zero_update(
    n: int, extra: int, lam: float, seed: int
) -> None:
    """∇z ≠ 0 but ∇W = ∇zᵀx = 0 (∇z ⟂ the columns of x, b > n): the update vanishes as well."""
    gen = torch.Generator().manual_seed(seed)
    x = dyadic(gen, n + extra, n)
    h = torch.randn(n + extra, 3, generator=gen, dtype=torch.float64)
    out_grad = h - x @ (torch.linalg.pinv(x) @ h)  # residual of h: ⟂ the columns of x
    assert out_grad.norm() > 1e-3 * h.norm()
    weight = torch.randn(3, n, generator=gen, dtype=torch.float64)
    delta, plain = tract_update(linear_layer(weight), x, out_grad, lam, lr=1.0)
    assert plain.norm() <= 1e-10 * h.norm() * x.norm() + 1e-12
    # ‖G M⁻¹‖ ≤ ‖G‖/λ since M ⪰ λI.
    assert delta.norm() <= plain.norm() / lam * (1 + 1e-9) + 1e-15


@SETTINGS
@given(data=st.data(), lam=LAMS)
def test_lemma2_nonzero_gradient_gives_descent_direction(
    data: st.DataObject, lam: float, draw_conv: DrawConv, reference_rows: ReferenceRows
) -> None:
    """∇W ≠ 0 ⇒ ΔW* ≠ 0 and −ΔW*/η is a descent direction, within the spectral bounds

    ‖G‖²/(max tr(XᵀX)/r + λ) ≤ ⟨G, G M⁻¹⟩ ≤ ‖G‖²/λ, from λI ⪯ M ⪯ (tr(XᵀX)/r + λ) I.
    """
    layer, x = draw_conv(data, dtype=torch.float64)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    out_grad = torch.randn(layer(x).shape, generator=gen, dtype=torch.float64)
    delta, plain = tract_update(layer, x, out_grad, lam, lr=1.0)
    if not plain.any():
        return  # a zero ∇W is the other lemma
    rows = reference_rows(layer, x)
    top = (rows**2).sum(dim=(1, 2)).max().item() / rows.shape[1] + lam
    inner = -(plain * delta).sum().item()
    squared = (plain**2).sum().item()
    assert delta.any()
    assert squared / top * (1 - 1e-5) <= inner <= squared / lam * (1 + 1e-5)


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

    opt = TrActOptimizer(
        torch.optim.SGD(twin.parameters(), lr=0.1), twin, lam, solve_dtype=torch.float64
    )
    torch.tanh(twin(x) @ head).sum().backward()
    opt.precondition_()
    assert embed.weight.grad is not None and twin.weight.grad is not None
    torch.testing.assert_close(twin.weight.grad, embed.weight.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(twin.bias.grad, embed.bias.grad, rtol=1e-12, atol=1e-12)
