"""The damped solve G ← G·(xᵀx/r + λI)⁻¹, by Cholesky, directly or in Woodbury form.

Both forms take one batch entry per group. The matrix is symmetric positive definite for λ > 0, so
a Cholesky factorisation exists in exact arithmetic. Nothing here reads a device value: whether
the statistics were finite and the factorisation succeeded is returned as a device flag
(``Factor.status``), so that the caller can check every layer with one host read per step, or
none at all in capturable mode. No explicit inverse is formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .statistics import Stats

#: ``Factor.status`` bits.
NON_FINITE = 2
NOT_POSITIVE_DEFINITE = 4


@dataclass(frozen=True)
class Factor:
    """A factorised preconditioner for one layer, ready to right-multiply gradient rows.

    ``direct``: ``chol`` factors A/r + λI (groups, n, n). Woodbury: ``chol`` factors
    XXᵀ/r + λI (groups, r, r) and ``rows`` holds X (groups, r, n). ``status`` is a 0-d int
    device tensor: 0, or the bits ``NON_FINITE`` / ``NOT_POSITIVE_DEFINITE``.
    """

    chol: Tensor
    lam: float | Tensor
    count: int | Tensor
    status: Tensor
    rows: Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.chol.dtype


def _factor(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Cholesky factor of a batch of SPD matrices and its status flag, without host reads."""
    finite = torch.isfinite(matrix).all()
    chol, info = torch.linalg.cholesky_ex(matrix)
    status = torch.where(finite, 0, NON_FINITE) + torch.where(
        (info > 0).any(), NOT_POSITIVE_DEFINITE, 0
    )
    return chol, status


def _damp_(matrix: Tensor, lam: float | Tensor) -> Tensor:
    """Add λ to the diagonal of every matrix in the batch, in place."""
    diagonal = matrix.diagonal(dim1=-2, dim2=-1)
    diagonal.add_(lam if isinstance(lam, float) else lam.to(matrix.dtype))
    return matrix


def factor(stats: Stats, lam: float | Tensor, dtype: torch.dtype) -> Factor:
    """Factor the damped matrix of ``stats`` in ``dtype``: Woodbury form when rows are kept."""
    count = stats.count
    divisor = count if isinstance(count, int) else count.clamp(min=1).to(dtype)
    if stats.rows is not None:
        x = stats.rows.to(dtype)
        matrix = _damp_((x @ x.mT).div_(divisor), lam)
        chol, status = _factor(matrix)
        return Factor(chol=chol, lam=lam, count=count, status=status, rows=x)
    assert stats.gram is not None
    # Built from the Gram in the solve dtype (never from a rounded lower-precision matrix).
    matrix = _damp_(stats.gram.to(dtype, copy=True).div_(divisor), lam)
    chol, status = _factor(matrix)
    return Factor(chol=chol, lam=lam, count=count, status=status)


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
    # Woodbury: G (XᵀX/r + λI)⁻¹ = G/λ − ((XXᵀ/r + λI)⁻¹ X Gᵀ)ᵀ X / (λr).
    x = factor.rows[group]
    inner = torch.cholesky_solve(x @ g.T, chol)
    lam, count = factor.lam, factor.count
    return (g - inner.T @ x / count) / lam


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
