"""Plain-data statistics of a first layer's input rows: what the hooks produce, ranks sum, and the
solve consumes. No hooks, no optimizer, no communication: ``distributed`` uses this module too.

A row set is described by its row count and either the rows themselves (while there are fewer
rows than features, r < n: smaller than the Gram, and the solve can take the cheaper, exact
Woodbury form) or its Gram xᵀx per group. The count is a Python int when it is known on the host
(from shapes), or a 0-d device tensor after a collective or in capturable mode, so that reading
it never forces a host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Stats:
    """Statistics of some rows of one layer: ``count`` rows, kept as ``rows`` or as ``gram``."""

    count: int | Tensor
    gram: Tensor | None = None  # (groups, n, n)
    rows: Tensor | None = None  # (groups, r, n), only while r < n

    def __post_init__(self) -> None:
        if (self.gram is None) == (self.rows is None):
            raise ValueError("Stats holds exactly one of gram and rows")

    @property
    def dtype(self) -> torch.dtype:
        data = self.gram if self.gram is not None else self.rows
        assert data is not None
        return data.dtype

    def to_gram(self) -> Tensor:
        """The Gram of these rows, (groups, n, n), computing it from the rows when needed."""
        if self.gram is not None:
            return self.gram
        assert self.rows is not None
        return self.rows.mT @ self.rows


class Accumulator:
    """The running sum of one layer's statistics.

    Dynamic (the default): rows are concatenated while there are fewer than ``n`` of them; past
    that, one Gram is allocated and everything is summed into it. Nothing of size n² exists
    before it is needed. Static (capturable mode): a Gram and a count tensor are allocated up
    front and only ever updated in place, so a captured CUDA graph keeps reading the right memory.
    """

    def __init__(self, groups: int, n: int, static_on: torch.device | None = None) -> None:
        self.n = n
        self._rows: list[Tensor] = []
        self._count = 0
        self._gram: Tensor | None = None
        self._static_count: Tensor | None = None
        if static_on is not None:
            self._gram = torch.zeros(groups, n, n, device=static_on)
            self._static_count = torch.zeros((), dtype=torch.float64, device=static_on)

    @property
    def static(self) -> bool:
        return self._static_count is not None

    @property
    def empty(self) -> bool:
        """Whether nothing was added since the last clear (always False for a static one)."""
        return not self.static and self._count == 0

    def add(self, stats: Stats) -> None:
        """Add one row set's statistics."""
        if self._static_count is not None:
            assert self._gram is not None
            self._gram.add_(stats.to_gram().to(self._gram))
            self._static_count.add_(stats.count)
            return
        assert isinstance(stats.count, int)
        self._count += stats.count
        if stats.rows is not None and self._gram is None and self._count < self.n:
            self._rows.append(stats.rows)
            return
        gram = stats.to_gram()
        dtype = torch.promote_types(
            gram.dtype, self._gram.dtype if self._gram is not None else gram.dtype
        )
        total = gram.to(dtype, copy=True) if self._gram is None else self._gram.to(dtype).add_(gram)
        for rows in self._rows:
            total.add_((rows.mT @ rows).to(dtype))
        self._rows.clear()
        self._gram = total

    def clear(self) -> None:
        """Drop everything (in place for a static accumulator)."""
        if self._static_count is not None:
            assert self._gram is not None
            self._gram.zero_()
            self._static_count.zero_()
            return
        self._rows.clear()
        self._count = 0
        self._gram = None

    def total(self) -> Stats | None:
        """The statistics of everything added since the last clear; None if nothing was."""
        if self._static_count is not None:
            assert self._gram is not None
            return Stats(count=self._static_count, gram=self._gram)
        if self._count == 0:
            return None
        if self._gram is not None:
            return Stats(count=self._count, gram=self._gram)
        rows = self._rows[0] if len(self._rows) == 1 else torch.cat(self._rows, dim=1)
        return Stats(count=self._count, rows=rows)
