"""The damped solve G ← G·(xᵀx/r + λI)⁻¹, by Cholesky, directly or in Woodbury form.

Both forms take one batch entry per group and never form an inverse.

Precision. The direct form factors A/r + λI from the Gram A, which the hooks accumulate in fp32;
its accuracy is limited by that Gram, about 2⁻²⁴·cond(M) relative. The Woodbury form (r < n, the
rows themselves kept) computes G/λ − (…)·X/(λr), two terms that nearly cancel because a first
layer's gradient lies in the row space of X: in fp32 it loses up to cond(M) = λ_max(M)/λ ulps
(3e-4 relative at λ = 0.05 on standardised ViT inputs). The rows hold the layer's inputs exactly,
and r < n keeps the r×r side cheap, so by default (``resolve_dtype``) it runs in float64.

Host reads. ``factor`` reads nothing: whether the statistics were finite, whether the
factorisation succeeded and whether the update may be inaccurate come back as bits of a device
tensor (``Factor.status``), so that a caller can check every layer of a step with one read, or
none (capturable mode). ``factor_checked`` is the single-layer form that reads, retries and
raises: a factorisation that fails below float64 is redone with the matrix rebuilt in float64
from the statistics (not from the rounded matrix), so the retry succeeds wherever a float64 solve
would. ``report`` turns status bits into the exception or ``PrecisionWarning`` for the user.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .statistics import Stats

#: λ must lie in this range: λ and 1/λ then stay normal float32 numbers with room to spare.
LAM_RANGE = (1e-30, 1e30)
#: A ``PrecisionWarning`` is raised when the predicted relative error of the update exceeds this.
WARN_ERROR = 1e-3
#: Power/inverse iterations of the condition estimate (each O(n²) per group, after an O(n³) factor).
_ITERATIONS = 4

#: ``Factor.status`` bits (bit 1 is the caller's: a gradient without statistics).
NON_FINITE = 2
NOT_POSITIVE_DEFINITE = 4
IMPRECISE = 8


class PrecisionWarning(RuntimeWarning):
    """The TrAct update of a layer is predicted to be less accurate than ``WARN_ERROR``."""


@dataclass(frozen=True)
class Factor:
    """A factorised preconditioner for one layer, ready to right-multiply gradient rows.

    ``direct``: ``chol`` factors A/r + λI (groups, n, n). Woodbury: ``chol`` factors
    XXᵀ/r + λI (groups, r, r) and ``rows`` holds X (groups, r, n) in the same dtype.
    ``status``: a 0-d int device tensor of the bits above; ``cond``: the estimate of cond(M)
    (float64, device) behind ``IMPRECISE``; ``known``: the dtype to which the statistics fix M.
    """

    chol: Tensor
    lam: float | Tensor
    count: int | Tensor
    status: Tensor
    cond: Tensor
    known: torch.dtype
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


def factor(
    stats: Stats, lam: float | Tensor, dtype: torch.dtype, known: torch.dtype | None = None
) -> Factor:
    """Factor the damped matrix of ``stats`` in ``dtype`` (Woodbury form when rows are kept),
    without host reads. ``known``: the precision of the inputs the statistics came from, when
    coarser than theirs (rows rounded from float64 inputs); for ``IMPRECISE`` only."""
    count = stats.count
    divisor = count if isinstance(count, int) else count.clamp(min=1).to(dtype)
    if stats.rows is not None:
        x = stats.rows.to(dtype)
        matrix = _damp_((x @ x.mT).div_(divisor), lam)
        # The rows are the layer's inputs themselves: exact unless rounded from wider inputs.
        exact = torch.float64 if known is None else known
    else:
        assert stats.gram is not None
        x = None
        # Built from the Gram in the solve dtype (never from a rounded lower-precision matrix);
        # a Gram is a rounded sum: it knows the matrix only to its own dtype's precision.
        matrix = _damp_(stats.gram.to(dtype, copy=True).div_(divisor), lam)
        exact = stats.gram.dtype
    chol, info = torch.linalg.cholesky_ex(matrix)
    cond = condition_estimate(chol, lam, woodbury=x is not None)
    eps = max(torch.finfo(dtype).eps, torch.finfo(exact).eps) / 2
    status = (
        torch.where(_finite(matrix), 0, NON_FINITE)
        + torch.where((info > 0).any(), NOT_POSITIVE_DEFINITE, 0)
        + torch.where(eps * cond > WARN_ERROR, IMPRECISE, 0)
    )
    return Factor(chol=chol, lam=lam, count=count, status=status, cond=cond, known=exact, rows=x)


def _finite(matrix: Tensor) -> Tensor:
    """Whether every entry is finite, as a 0-d bool tensor: the extremes are finite exactly then
    (``aminmax`` propagates NaN). One pass, 20x faster than ``isfinite().all()`` on CPU."""
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


def factor_checked(
    stats: Stats, lam: float, dtype: torch.dtype, what: str, known: torch.dtype | None = None
) -> Factor:
    """``factor`` with its status read: retried in float64 from the statistics if the
    factorisation fails below float64, then ``report``ed (raises or warns)."""
    result = factor(stats, lam, dtype, known)
    code = int(result.status)
    if code & NOT_POSITIVE_DEFINITE and not code & NON_FINITE and dtype != torch.float64:
        result = factor(stats, lam, torch.float64, known)
        code = int(result.status)
    report(code, result, what, lam)
    return result


def report(code: int, result: Factor, what: str, lam: float) -> None:
    """Raise ``FloatingPointError`` for unusable statistics, or warn ``PrecisionWarning``."""
    if code & NON_FINITE:
        raise FloatingPointError(
            f"{what}: the input statistics contain inf or NaN (the layer's inputs overflowed); "
            "check the data pipeline or standardise the inputs"
        )
    if code & NOT_POSITIVE_DEFINITE:
        raise FloatingPointError(
            f"{what}: the damped input matrix xᵀx/r + λI (lam = {lam:g}) is not numerically "
            "positive definite even in float64; increase lam or standardise the inputs"
        )
    if code & IMPRECISE:
        _warn(float(result.cond), lam, what, result.dtype, result.known)


def _warn(cond: float, lam: float, what: str, dtype: torch.dtype, known: torch.dtype) -> None:
    """Warn that unit roundoff × cond(M) exceeds ``WARN_ERROR``; the roundoff is the coarser of
    the solve's dtype and the precision ``known`` to which the statistics fix the matrix."""
    solve_eps = torch.finfo(dtype).eps / 2
    error = max(solve_eps, torch.finfo(known).eps / 2) * cond
    remedy = "increase lam"
    if solve_eps > torch.finfo(known).eps / 2:
        remedy += " or pass solve_dtype=torch.float64"
    warnings.warn(
        f"{what}: with lam = {lam:g} the damped input matrix xᵀx/r + λI has condition number "
        f"~{_round(cond)}, so the TrAct update may be off by up to ~{_round(error)} (relative) "
        f"in {str(dtype).removeprefix('torch.')}; {remedy}",
        PrecisionWarning,
        stacklevel=4,
    )


def _round(value: float) -> str:
    """A positive number to its power of ten, so repeated warnings repeat the same text."""
    if not math.isfinite(value):
        return "inf"
    return f"1e{math.floor(math.log10(value)):+03d}"


def factor_direct(gram: Tensor, count: int, lam: float, dtype: torch.dtype, what: str) -> Factor:
    """``factor_checked`` for Grams ``gram`` (groups, n, n) accumulated over ``count`` rows."""
    return factor_checked(Stats(count=count, gram=gram), lam, dtype, what)


def factor_woodbury(
    rows: Tensor, lam: float, dtype: torch.dtype, what: str, inputs: torch.dtype | None = None
) -> Factor:
    """``factor_checked`` on the r×r side for rows ``rows`` (groups, r, n); cheaper when r < n.

    ``inputs``: the dtype of the layer inputs the rows were taken from, if wider than the rows'
    (float64 inputs kept as fp32 rows are rounded, which limits the accuracy; for the warning).
    """
    rounded = inputs is not None and torch.finfo(inputs).eps < torch.finfo(rows.dtype).eps
    stats = Stats(count=rows.shape[1], rows=rows)
    return factor_checked(stats, lam, dtype, what, rows.dtype if rounded else None)


def apply(factor: Factor, grad: Tensor, group: int) -> Tensor:
    """G·M⁻¹ for gradient rows ``grad`` (m, n) of output channels in group ``group``.

    Returns a tensor in the factor's dtype. Rows are independent, so any subset of a group's
    output channels (an FSDP shard, say) can be preconditioned alone.
    """
    g = grad.to(factor.chol.dtype)
    chol = factor.chol[group]
    if factor.rows is None:
        # G M⁻¹ = (G L⁻ᵀ) L⁻¹: two triangular solves from the right, on G's own layout
        # (about 0.7-0.8 of cholesky_solve's time on the transposed gradient, measured on CPU).
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
