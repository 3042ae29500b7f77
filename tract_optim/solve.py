"""The damped solve G ← G·(xᵀx/r + λI)⁻¹, by Cholesky, directly or in Woodbury form: pure maths.

Both forms take one batch entry per group and never form an inverse.

Precision. The direct form factors A/r + λI from the Gram A; its accuracy is limited by the
precision of that Gram, about u·cond(M) relative (u the statistics' unit roundoff). The Woodbury
form (r < n, the rows themselves kept) computes G/λ − (…)·X/(λr), two terms that nearly cancel
because a first layer's gradient lies in the row space of X: in fp32 it loses up to cond(M) ulps.
The rows hold the layer's inputs exactly, and r < n keeps the r×r side cheap, so by default
(``resolve_dtype``) it runs in float64.

Host reads: none. Whether the statistics were finite and the factorisation succeeded come back
as ``diagnostics.Status`` bits of a device tensor, and the condition estimate as a device scalar,
so that a caller can check every layer of a step with one read, or none (capturable mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .diagnostics import Status
from .statistics import Stats

#: Power/inverse iterations of the condition estimate (each O(n²) per group, after an O(n³) factor).
_ITERATIONS = 4


@dataclass(frozen=True)
class Factor:
    """A factorised preconditioner for one layer, ready to right-multiply gradient rows.

    ``direct``: ``chol`` factors A/r + λI (groups, n, n). Woodbury: ``chol`` factors
    XXᵀ/r + λI (groups, r, r) and ``rows`` holds X (groups, r, n) in the same dtype.
    ``status``: a 0-d int device tensor of ``Status`` bits (``NON_FINITE``,
    ``NOT_POSITIVE_DEFINITE``); ``cond``: the estimate of cond(M) (float64, device); ``known``:
    the dtype to which the statistics fix M (the Gram's; float64 for exact rows).
    """

    chol: Tensor
    lam: float | Tensor
    count: int | Tensor
    status: Tensor
    cond: Tensor
    known: torch.dtype
    rows: Tensor | None = None
    inverse: Tensor | None = None  # M⁻¹ (groups, n, n), for a direct factor applied many times

    @property
    def dtype(self) -> torch.dtype:
        return self.chol.dtype


def with_inverse(factor: Factor) -> Factor:
    """``factor`` with M⁻¹ formed (direct form only): applying it is then one product instead of
    two triangular solves, which pays when one factor serves many steps (``amortise``)."""
    if factor.rows is not None or factor.inverse is not None:
        return factor
    return replace(factor, inverse=torch.cholesky_inverse(factor.chol))


def resolve_dtype(
    requested: torch.dtype | None, stats_dtype: torch.dtype, woodbury: bool
) -> torch.dtype:
    """The solve's dtype: ``requested`` if given; otherwise float64 for the Woodbury form (exact
    rows, cheap since r < n, and fp32 would lose digits to cancellation) and for float64
    statistics, float32 for the direct form of float32 statistics."""
    if requested is not None:
        return requested
    if woodbury or stats_dtype == torch.float64:
        return torch.float64
    return torch.float32


def factor(stats: Stats, lam: float | Tensor, dtype: torch.dtype) -> Factor:
    """Factor the damped matrix of ``stats`` in ``dtype`` (Woodbury form when rows are kept),
    without host reads."""
    count = stats.count
    divisor = count if isinstance(count, int) else count.clamp(min=1).to(dtype)
    if stats.rows is not None:
        x = stats.rows.to(dtype)
        matrix = _damp_((x @ x.mT).div_(divisor), lam)
        # The rows are the layer's inputs themselves: exact.
        known = torch.float64
    else:
        assert stats.gram is not None
        x = None
        # Built from the Gram in the solve dtype (never from a rounded lower-precision matrix);
        # a Gram is a rounded sum: it knows the matrix only to its own dtype's precision.
        matrix = _damp_(stats.gram.to(dtype, copy=True).div_(divisor), lam)
        known = stats.accuracy
    chol, info = torch.linalg.cholesky_ex(matrix)
    cond = condition_estimate(chol, lam, woodbury=x is not None)
    status = torch.where(_finite(matrix), 0, int(Status.NON_FINITE)) + torch.where(
        (info > 0).any(), int(Status.NOT_POSITIVE_DEFINITE), 0
    )
    return Factor(chol=chol, lam=lam, count=count, status=status, cond=cond, known=known, rows=x)


def _finite(matrix: Tensor) -> Tensor:
    """Whether every entry is finite, as a 0-d bool tensor: the extremes are finite exactly then
    (``aminmax`` propagates NaN): one pass over the matrix and no boolean copy of it."""
    low, high = torch.aminmax(matrix)
    return torch.isfinite(low) & torch.isfinite(high)


def _damp_(matrix: Tensor, lam: float | Tensor) -> Tensor:
    """Add λ to the diagonal of every matrix in the batch, in place."""
    matrix.diagonal(dim1=-2, dim2=-1).add_(lam if isinstance(lam, float) else lam.to(matrix))
    return matrix


def condition_estimate(chol: Tensor, lam: float | Tensor, woodbury: bool) -> Tensor:
    """An estimate of cond(M) from its Cholesky factor L (M = LLᵀ), the largest over groups
    (0-d float64, device).

    λ_max(M) = σ_max(Lᵀ)² comes from power iteration (v ← L·Lᵀv); λ_min(M) from inverse
    iteration with triangular solves (direct form), or is λ itself (Woodbury form: M has
    eigenvalue λ outside the r rows' span). Both are Rayleigh quotients, so they approach from
    inside and the estimate never exceeds cond(M). Working on L in its own dtype keeps every
    intermediate within √‖M‖·√n or 1/√λ·√n (no overflow in float32 for λ in ``LAM_RANGE``) and
    reads L 4 times per iteration, with no float64 copy of an n×n matrix; only the final
    squares and their ratio are float64.
    """
    n = chol.shape[-1]
    # A fixed, irregular start vector: no random generator (none may be created while a CUDA
    # graph is captured), and no symmetry that could hide an eigenvector.
    index = torch.arange(1, n + 1, device=chol.device, dtype=chol.dtype)
    start = _unit((1 + 0.5 * torch.sin(index * 2.399963)).reshape(n, 1)).expand(chol.shape[0], n, 1)
    upper = chol.mT
    v = start
    for _ in range(_ITERATIONS):
        v = _unit(chol @ _unit(upper @ v))
    top = _square_norm(upper @ v)
    if woodbury:
        return torch.nan_to_num(
            (top / (lam if isinstance(lam, float) else lam.double())).max(), nan=math.inf
        )
    v = start
    for _ in range(_ITERATIONS):
        inner = _unit(torch.linalg.solve_triangular(chol, v, upper=False))
        v = _unit(torch.linalg.solve_triangular(upper, inner, upper=True))
    inverse = _square_norm(torch.linalg.solve_triangular(chol, v, upper=False))
    return torch.nan_to_num((top * inverse).max(), nan=math.inf)


def _unit(v: Tensor) -> Tensor:
    """Columns ``v`` (…, n, 1) scaled to unit length."""
    norm: Tensor = torch.linalg.vector_norm(v, dim=(-2, -1), keepdim=True)
    return v / norm


def _square_norm(v: Tensor) -> Tensor:
    """‖v‖² per batch entry in float64 (a float32 square could overflow)."""
    norm: Tensor = torch.linalg.vector_norm(v, dim=(-2, -1), dtype=torch.float64)
    return norm.square()


def apply(factor: Factor, grad: Tensor, group: int) -> Tensor:
    """G·M⁻¹ for gradient rows ``grad`` (m, n) of output channels in group ``group``.

    Returns a tensor in the factor's dtype. Rows are independent, so any subset of a group's
    output channels (an FSDP shard, say) can be preconditioned alone.
    """
    g = grad.to(factor.chol.dtype)
    if factor.inverse is not None:
        return g @ factor.inverse[group]
    chol = factor.chol[group]
    if factor.rows is None:
        # G M⁻¹ = (G L⁻ᵀ) L⁻¹: two triangular solves from the right, on G's own layout
        # (cheaper than cholesky_solve on the transposed gradient).
        half = torch.linalg.solve_triangular(chol.mT, g, upper=True, left=False)
        result: Tensor = torch.linalg.solve_triangular(chol, half, upper=False, left=False)
        return result
    # Woodbury: G (XᵀX/r + λI)⁻¹ = G/λ − ((XXᵀ/r + λI)⁻¹ X Gᵀ)ᵀ X / (λr); the rows path only
    # exists outside capturable mode, so λ and r are Python numbers here.
    x = factor.rows[group]
    inner = torch.cholesky_solve(x @ g.T, chol)
    lam, count = factor.lam, factor.count
    assert isinstance(lam, float) and isinstance(count, int)
    return torch.addmm(g, inner.T, x, beta=1 / lam, alpha=-1 / (lam * count))


def apply_rows(factor: Factor, rows: Tensor, offset: int, out_per_group: int) -> Tensor:
    """G·M⁻¹ for consecutive gradient rows (m, n) starting at output channel ``offset``.

    The rows may start and end anywhere (an FSDP shard can split a group): each run of rows is
    solved with its own group's factor.
    """
    parts = []
    start = 0
    while start < rows.shape[0]:
        group = (offset + start) // out_per_group
        stop = min(rows.shape[0], (group + 1) * out_per_group - offset)
        parts.append(apply(factor, rows[start:stop], group))
        start = stop
    if not parts:
        return rows.to(factor.dtype, copy=True)
    return parts[0] if len(parts) == 1 else torch.cat(parts)
