"""Amortised statistics (``stats_every=k``): refresh a layer's statistics every k-th step only.

The first layer's xᵀx/r is the second moment of image patches, which a batch already estimates
well and which changes slowly; K-FAC (``factor_update_steps``) and Shampoo
(``precondition_frequency``) amortise the same kind of statistic. On a refresh step the hooks
record as usual and the step factorises the (data-parallel summed) statistics; on the k − 1 steps
in between the hooks record passes without statistics (only so that the gradient ledger still
counts them), and the step reuses the factor. Lemma 2 holds for any fixed positive-definite
preconditioner, so the convergence points stay those of the paper's exact update.

With ``decay`` d (``stats_decay``), the kept matrix is a running average over refreshes,
A ← d·A + (1 − d)·xᵀx/r, as K-FAC's ``factor_decay``.

In capturable mode (``StaticKept``) a step cannot ask the host whether it refreshes: a device
step counter selects, with ``torch.where``, the new statistics or the kept ones, and the step
factors the kept ones every time. The update is the same; the hooks still compute statistics
every step, so this saves nothing there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import solve
from .statistics import Stats, coarsest


class Kept:
    """What one layer reuses between refreshes: its statistics, and their factor for one λ."""

    def __init__(self) -> None:
        self.stats: Stats | None = None
        self._factor: solve.Factor | None = None
        self._key: tuple[float, torch.dtype] | None = None

    def refresh(self, new: Stats, decay: float | None) -> Stats:
        """Keep the statistics of a refresh step (blended with the kept ones under ``decay``)."""
        if decay is not None and self.stats is not None:
            new = _blend(self.stats, new, decay)
        self.stats, self._factor, self._key = new, None, None
        return new

    def factor(self, lam: float | Tensor, dtype: torch.dtype) -> solve.Factor | None:
        """The kept factor if it was made for ``lam`` in ``dtype``, else None."""
        key = (float(lam), dtype) if isinstance(lam, float) else None
        if self._factor is not None and key is not None and key == self._key:
            return self._factor
        return None

    def keep_factor(self, factor: solve.Factor, lam: float | Tensor, dtype: torch.dtype) -> None:
        """Keep ``factor`` (with its inverse formed: it serves the steps until the next refresh)."""
        self._factor = solve.with_inverse(factor)
        self._key = (float(lam), dtype) if isinstance(lam, float) else None

    def clear(self) -> None:
        self.stats, self._factor, self._key = None, None, None

    def state(self) -> dict[str, Any] | None:
        """The kept statistics, for checkpoints (the factor is rebuilt from them, bit for bit)."""
        if self.stats is None:
            return None
        data = "rows" if self.stats.rows is not None else "gram"
        return {
            data: self.stats.data,
            "count": self.stats.count,
            "precision": str(self.stats.accuracy).removeprefix("torch."),
        }

    @staticmethod
    def check(state: Any, where: str, groups: int, n: int) -> None:
        """Raise ``ValueError`` naming ``where`` unless ``state`` is what ``state()`` saves."""
        if state is None:
            return
        data = [k for k in ("gram", "rows") if k in state] if isinstance(state, dict) else []
        ok = (
            len(data) == 1
            and isinstance(state[data[0]], Tensor)
            and state[data[0]].dim() == 3
            and state[data[0]].shape[0] == groups
            and state[data[0]].shape[-1] == n
            and (data[0] == "rows" or state["gram"].shape[1] == n)
            and isinstance(state.get("count"), (int, Tensor))
            and state.get("precision") in ("float32", "float64")
        )
        if not ok:
            raise ValueError(
                f"{where} must be None or the kept statistics of a layer with {groups} group(s) "
                f"of n = {n} (a 'gram' or 'rows' tensor, a 'count' and a 'precision'), saved by "
                "a TrActOptimizer or TrActPreconditioner over the same layers"
            )

    def load(self, state: dict[str, Any] | None) -> None:
        self.clear()
        if state is not None:
            precision = getattr(torch, state["precision"])
            self.stats = Stats(
                count=state["count"],
                gram=state.get("gram"),
                rows=state.get("rows"),
                precision=precision,
            )


def _blend(old: Stats, new: Stats, decay: float) -> Stats:
    """d·A_old + (1 − d)·A_new of the normalised matrices A = xᵀx/r, as one row's statistics."""
    precision = coarsest([old.accuracy, new.accuracy])
    dtype = torch.promote_types(old.to_gram().dtype, new.to_gram().dtype)
    a_old = old.to_gram().to(dtype) / _as_divisor(old.count, dtype)
    a_new = new.to_gram().to(dtype) / _as_divisor(new.count, dtype)
    return Stats(count=1, gram=a_old * decay + a_new * (1 - decay), precision=precision)


def _as_divisor(count: int | Tensor, dtype: torch.dtype) -> int | Tensor:
    return count if isinstance(count, int) else count.clamp(min=1).to(dtype)


class StaticKept:
    """``Kept`` for capturable steps: buffers updated in place, the refresh decided on the
    device (``stats_every`` steps per refresh, counted by ``step``)."""

    def __init__(
        self, groups: int, n: int, device: torch.device, dtype: torch.dtype, every: int
    ) -> None:
        self.every = every
        self.gram = torch.zeros(groups, n, n, device=device, dtype=dtype)  # xᵀx/r kept
        self.rows = torch.zeros((), device=device, dtype=torch.float64)  # 1 once statistics exist
        self.step = torch.zeros((), device=device, dtype=torch.int64)

    def refresh(self, new: Stats, decay: float | None) -> Stats:
        """The statistics this step uses: ``new`` on a refresh step (blended under ``decay``),
        else the kept ones; advances the step counter. No host reads."""
        assert new.gram is not None
        again = self.step % self.every == 0
        fresh = new.gram.to(self.gram) / _as_divisor(new.count, self.gram.dtype)
        if decay is not None:
            fresh = torch.where(self.rows > 0, self.gram * decay + fresh * (1 - decay), fresh)
        seen = torch.as_tensor(new.count, device=self.rows.device, dtype=torch.float64) > 0
        self.gram.copy_(torch.where(again, fresh, self.gram))
        self.rows.copy_(torch.where(again, seen.to(self.rows), self.rows))
        self.step.add_(1)
        return Stats(count=self.rows, gram=self.gram, precision=new.accuracy)

    def state(self) -> dict[str, Any]:
        return {"gram": self.gram, "rows": self.rows, "step": self.step}

    def check(self, state: Any, where: str) -> None:
        """Raise ``ValueError`` naming ``where`` unless ``state`` is what ``state()`` saves."""
        if state is None:
            return
        ok = (
            isinstance(state, dict)
            and all(isinstance(state.get(k), Tensor) for k in ("gram", "rows", "step"))
            and state["gram"].shape == self.gram.shape
            and state["rows"].dim() == 0
            and state["step"].dim() == 0
        )
        if not ok:
            raise ValueError(
                f"{where} must be None or the capturable kept statistics ('gram' of shape "
                f"{tuple(self.gram.shape)}, 'rows' and 'step'), saved by the same setup"
            )

    def load(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            self.gram.copy_(state["gram"])
            self.rows.copy_(state["rows"])
            self.step.copy_(state["step"])
