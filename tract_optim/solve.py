"""The damped solve G ← G·(xᵀx/r + λI)⁻¹, by Cholesky, directly or in Woodbury form.

Both forms take one batch entry per group and never form an inverse.

Precision. The direct form factors A/r + λI from the Gram A, which the hooks accumulate in fp32;
its accuracy is limited by that Gram, about 2⁻²⁴·cond(M) relative. The Woodbury form (r < n, the
rows themselves kept) computes G/λ − (…)·X/(λr), two terms that nearly cancel because a first
layer's gradient lies in the row space of X: in fp32 it loses up to cond(M) = λ_max(M)/λ ulps
(3e-4 relative at λ = 0.05 on standardised ViT inputs). The rows hold the layer's inputs exactly,
and r < n keeps the r×r side cheap, so by default (``resolve_dtype``) it runs in float64.

Failures and warnings. Statistics that are not finite raise ``FloatingPointError``. A Cholesky
factorisation that fails below float64 is retried with the matrix rebuilt in float64 from the
statistics (not from the rounded matrix), so the retry succeeds wherever a float64 solve would.
After factorising, cond(M) is estimated; when it predicts a relative error above ``WARN_ERROR``
(small λ for the inputs' scale), a ``PrecisionWarning`` names the layer and λ.

All host reads of the solve happen in ``_inspect``: one per factorisation attempt.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

#: λ must lie in this range: λ and 1/λ then stay normal float32 numbers with room to spare.
LAM_RANGE = (1e-30, 1e30)
#: A ``PrecisionWarning`` is raised when the predicted relative error of the update exceeds this.
WARN_ERROR = 1e-3
#: Power/inverse iterations of the condition estimate (each O(n²) per group, after an O(n³) factor).
_ITERATIONS = 4


class PrecisionWarning(RuntimeWarning):
    """The TrAct update of a layer is predicted to be less accurate than ``WARN_ERROR``."""


@dataclass
class Factor:
    """A factorised preconditioner for one layer, ready to right-multiply gradient rows.

    ``direct``: ``chol`` factors A/r + λI (groups, n, n). Woodbury: ``chol`` factors
    XXᵀ/r + λI (groups, r, r) and ``rows`` holds X (groups, r, n) in the same dtype.
    """

    chol: Tensor
    lam: float
    count: int
    rows: Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.chol.dtype


def check_lam(lam: object, name: str) -> float:
    """``lam`` as a float, or a ``TypeError``/``ValueError`` naming ``name`` and the valid range."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(lam).__name__}")
    if not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"{name} must be a positive finite float, got {lam}")
    low, high = LAM_RANGE
    if not low <= lam <= high:
        raise ValueError(
            f"{name} = {lam:g} is outside [{low:g}, {high:g}], where λ and 1/λ stay representable "
            "in TrAct's float32 statistics and solve; λ is relative to the inputs' second moments "
            "(the paper uses 0.05–0.2 for standardised inputs)"
        )
    return float(lam)


def resolve_dtype(
    requested: torch.dtype | None, grad_dtype: torch.dtype, woodbury: bool
) -> torch.dtype:
    """The solve's dtype: ``requested`` if given; otherwise float64 for the Woodbury form (exact
    rows, cheap since r < n, and fp32 would lose digits to cancellation) and for a float64
    gradient, float32 for the direct form of any other gradient."""
    if requested is not None:
        return requested
    if woodbury or grad_dtype == torch.float64:
        return torch.float64
    return torch.float32


def factor_direct(gram: Tensor, count: int, lam: float, dtype: torch.dtype, what: str) -> Factor:
    """Factor A/r + λI for Grams ``gram`` (groups, n, n) accumulated over ``count`` rows."""

    def damped(to: torch.dtype) -> Tensor:
        matrix = gram.to(to, copy=True).div_(count)
        matrix.diagonal(dim1=-2, dim2=-1).add_(lam)
        return matrix

    # A Gram is a rounded sum: it knows the matrix only to its own dtype's precision.
    chol = _factor(damped, dtype, lam, what, known=gram.dtype, woodbury=False)
    return Factor(chol=chol, lam=lam, count=count)


def factor_woodbury(
    rows: Tensor, lam: float, dtype: torch.dtype, what: str, inputs: torch.dtype | None = None
) -> Factor:
    """Factor XXᵀ/r + λI on the r×r side for rows ``rows`` (groups, r, n); cheaper when r < n.

    ``inputs``: the dtype of the layer inputs the rows were taken from, if wider than the rows'
    (float64 inputs kept as fp32 rows are rounded, which limits the accuracy; for the warning).
    """
    count = rows.shape[1]
    rounded = inputs is not None and torch.finfo(inputs).eps < torch.finfo(rows.dtype).eps

    def damped(to: torch.dtype) -> Tensor:
        x = rows.to(to)
        matrix = (x @ x.transpose(1, 2)).div_(count)
        matrix.diagonal(dim1=-2, dim2=-1).add_(lam)
        return matrix

    # Unless rounded, the rows are the layer's inputs themselves: exact, only the solve rounds.
    known = rows.dtype if rounded else torch.float64
    chol = _factor(damped, dtype, lam, what, known=known, woodbury=True)
    return Factor(chol=chol, lam=lam, count=count, rows=rows.to(chol.dtype))


def apply(factor: Factor, grad: Tensor, group: int) -> Tensor:
    """G·M⁻¹ for gradient rows ``grad`` (m, n) of output channels in group ``group``.

    Returns a tensor in the factor's dtype. Rows are independent, so any subset of a group's
    output channels (an FSDP shard, say) can be preconditioned alone.
    """
    g = grad.to(factor.chol.dtype)
    chol = factor.chol[group]
    if factor.rows is None:
        # G M⁻¹ = (M⁻¹ Gᵀ)ᵀ since M is symmetric.
        return torch.cholesky_solve(g.T, chol).T
    # Woodbury: G (XᵀX/r + λI)⁻¹ = G/λ − ((XXᵀ/r + λI)⁻¹ X Gᵀ)ᵀ X / (λr), one fused addmm.
    x = factor.rows[group]
    inner = torch.cholesky_solve(x @ g.T, chol)
    lam, count = factor.lam, factor.count
    return torch.addmm(g, inner.T, x, beta=1 / lam, alpha=-1 / (lam * count))


def _factor(
    damped: Callable[[torch.dtype], Tensor],
    dtype: torch.dtype,
    lam: float,
    what: str,
    known: torch.dtype,
    woodbury: bool,
) -> Tensor:
    """Cholesky factor of ``damped(dtype)``, retried as ``damped(float64)`` if it fails.

    ``known``: the precision to which the statistics determine the matrix (for the warning).
    Raises ``FloatingPointError`` for non-finite statistics or a failure even in float64.
    """
    attempts = [dtype] if dtype == torch.float64 else [dtype, torch.float64]
    for attempt in attempts:
        matrix = damped(attempt)
        chol, info = torch.linalg.cholesky_ex(matrix)
        finite, factored, cond = _inspect(matrix, chol, info, lam, woodbury)
        if not finite:
            raise FloatingPointError(
                f"{what}: the input statistics contain inf or NaN (the layer's inputs overflowed); "
                "check the data pipeline or standardise the inputs"
            )
        if factored:
            _warn_if_inaccurate(cond, lam, what, attempt, known)
            return chol  # type: ignore[no-any-return]
    raise FloatingPointError(
        f"{what}: the damped input matrix xᵀx/r + λI (lam = {lam:g}) is not numerically positive "
        "definite even in float64; increase lam or standardise the inputs"
    )


def _inspect(
    matrix: Tensor, chol: Tensor, info: Tensor, lam: float, woodbury: bool
) -> tuple[bool, bool, float]:
    """The one host read of a factorisation: (matrix finite, factorisation succeeded, an estimate
    of cond(M) for M = xᵀx/r + λI, the largest over groups).

    λ_max(M) comes from power iteration on ``matrix`` (which shares it in both forms), λ_min(M)
    from inverse iteration with the factor. Both approach from inside, so in the direct form the
    estimate never exceeds cond(M). The Woodbury form uses λ_max(M)/λ instead: cond(M) itself
    when r < n (M has eigenvalue λ outside the rows' span), and what its cancellation amplifies
    rounding by in any case.
    """
    # In float64 whatever the solve's dtype: squares of fp32 entries must not overflow.
    m64 = matrix.double()
    n = matrix.shape[-1]
    gen = torch.Generator(device=matrix.device).manual_seed(0)
    start = torch.randn(n, 1, generator=gen, device=matrix.device, dtype=torch.float64)
    start = start.expand(matrix.shape[0], n, 1) / math.sqrt(n)
    v, top = start, m64.new_ones(matrix.shape[0])
    for _ in range(_ITERATIONS):
        v = m64 @ v
        top = torch.linalg.vector_norm(v, dim=(-2, -1))
        v = v / top[:, None, None]
    low = torch.full_like(top, lam)
    if not woodbury:
        c64 = chol.double()
        v = start
        for _ in range(_ITERATIONS):
            v = torch.cholesky_solve(v, c64)
            inverse = torch.linalg.vector_norm(v, dim=(-2, -1))
            v = v / inverse[:, None, None]
            low = 1 / inverse
    cond = (top / low).max()
    flags = torch.stack([torch.isfinite(matrix).all(), (info == 0).all()]).double()
    finite, factored, estimate = torch.cat([flags, cond[None]]).tolist()
    return bool(finite), bool(factored), float(estimate)


def _warn_if_inaccurate(
    cond: float, lam: float, what: str, dtype: torch.dtype, known: torch.dtype
) -> None:
    """Warn when unit roundoff × cond(M) exceeds ``WARN_ERROR``; the roundoff is the coarser of
    the solve's dtype and the precision ``known`` to which the statistics fix the matrix."""
    solve_eps = torch.finfo(dtype).eps / 2
    eps = max(solve_eps, torch.finfo(known).eps / 2)
    error = eps * cond
    if not error > WARN_ERROR:
        return
    remedy = "increase lam"
    if solve_eps > torch.finfo(known).eps / 2:
        remedy += " or pass solve_dtype=torch.float64"
    warnings.warn(
        f"{what}: with lam = {lam:g} the damped input matrix xᵀx/r + λI has condition number "
        f"~{_round(cond)}, so the TrAct update may be off by up to ~{_round(error)} (relative) "
        f"in {str(dtype).removeprefix('torch.')}; {remedy}",
        PrecisionWarning,
        stacklevel=2,
    )


def _round(value: float) -> str:
    """A positive number to its power of ten, so repeated warnings repeat the same text."""
    if not math.isfinite(value):
        return "inf"
    return f"1e{math.floor(math.log10(value)):+03d}"
