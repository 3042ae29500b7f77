"""The damped solve G ← G·(xᵀx/r + λI)⁻¹, by Cholesky, directly or in Woodbury form.

Both forms take one batch entry per group. The matrix is symmetric positive definite for λ > 0, so
a Cholesky factorisation always exists in exact arithmetic; when the fp32 factorisation fails the
solve retries in fp64 before giving up with a ``FloatingPointError``. No explicit inverse is formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Factor:
    """A factorised preconditioner for one layer, ready to right-multiply gradient rows.

    ``direct``: ``chol`` factors A/r + λI (groups, n, n). Woodbury: ``chol`` factors
    XXᵀ/r + λI (groups, r, r) and ``rows`` holds X (groups, r, n).
    """

    chol: Tensor
    lam: float
    count: int
    rows: Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.chol.dtype


def _cholesky(matrix: Tensor, what: str) -> Tensor:
    """Cholesky factor of a batch of SPD matrices, retrying in fp64; raises FloatingPointError."""
    if not bool(torch.isfinite(matrix).all()):
        raise FloatingPointError(
            f"{what}: the input statistics contain inf or NaN (the layer's inputs overflowed); "
            "check the data pipeline or standardise the inputs"
        )
    chol, info = torch.linalg.cholesky_ex(matrix)
    if bool((info > 0).any()) and matrix.dtype != torch.float64:
        chol, info = torch.linalg.cholesky_ex(matrix.double())
    if bool((info > 0).any()):
        raise FloatingPointError(
            f"{what}: the damped input matrix is not numerically positive definite even in "
            "float64; increase lam or standardise the inputs"
        )
    return chol  # type: ignore[no-any-return]


def factor_direct(gram: Tensor, count: int, lam: float, dtype: torch.dtype, what: str) -> Factor:
    """Factor A/r + λI for Grams ``gram`` (groups, n, n) accumulated over ``count`` rows."""
    matrix = gram.to(dtype, copy=True).div_(count)
    matrix.diagonal(dim1=-2, dim2=-1).add_(lam)
    return Factor(chol=_cholesky(matrix, what), lam=lam, count=count)


def factor_woodbury(rows: Tensor, lam: float, dtype: torch.dtype, what: str) -> Factor:
    """Factor XXᵀ/r + λI on the r×r side for rows ``rows`` (groups, r, n); cheaper when r < n."""
    x = rows.to(dtype)
    count = x.shape[1]
    matrix = (x @ x.transpose(1, 2)).div_(count)
    matrix.diagonal(dim1=-2, dim2=-1).add_(lam)
    return Factor(chol=_cholesky(matrix, what), lam=lam, count=count, rows=x)


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
