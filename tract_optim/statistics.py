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
    """Statistics of some rows of one layer: ``count`` rows, kept as ``rows`` or as ``gram``.

    ``precision``: the dtype to which their Gram is accurate: a Gram's own dtype unless it was
    computed in a narrower one and widened (the compiled path keeps one dtype for both); for
    rows, which are exact copies of the inputs, the dtype their Gram is to be computed in.
    """

    count: int | Tensor
    gram: Tensor | None = None  # (groups, n, n)
    rows: Tensor | None = None  # (groups, r, n), only while r < n
    precision: torch.dtype | None = None  # None: the data's own dtype

    def __post_init__(self) -> None:
        if (self.gram is None) == (self.rows is None):
            raise ValueError("Stats holds exactly one of gram and rows")
        if self.precision is None:
            object.__setattr__(self, "precision", self.data.dtype)

    @property
    def data(self) -> Tensor:
        data = self.gram if self.gram is not None else self.rows
        assert data is not None
        return data

    @property
    def accuracy(self) -> torch.dtype:
        """``precision`` (never None after construction)."""
        assert self.precision is not None
        return self.precision

    def to_gram(self) -> Tensor:
        """The Gram of these rows, (groups, n, n), computing it from the rows when needed (in
        ``precision``)."""
        if self.gram is not None:
            return self.gram
        assert self.rows is not None
        rows = self.rows.to(self.accuracy)
        return rows.mT @ rows


def coarsest(dtypes: list[torch.dtype]) -> torch.dtype:
    """The least precise of ``dtypes`` (largest machine epsilon)."""
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


class Accumulator:
    """The running sum of one layer's statistics, allocated as it grows.

    Rows are concatenated while there are fewer than ``n`` of them; past that, one Gram is
    allocated (in the widest dtype any part asks for) and everything is summed into it. Nothing
    of size n² exists before it is needed. The sum is accurate to the coarsest precision of its
    parts.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._parts: list[Stats] = []  # rows not yet summed into the Gram
        self._count = 0
        self._gram: Tensor | None = None
        self._precision: torch.dtype | None = None

    def add(self, stats: Stats) -> None:
        """Add one row set's statistics."""
        assert isinstance(stats.count, int)
        self._count += stats.count
        self._precision = coarsest([stats.accuracy, self._precision or stats.accuracy])
        if stats.rows is not None and self._gram is None and self._count < self.n:
            self._parts.append(stats)
            return
        parts = [*self._parts, stats]
        dtype = stats.data.dtype if stats.gram is not None else stats.accuracy
        for part in parts:
            dtype = torch.promote_types(dtype, part.accuracy)
        if self._gram is not None:
            dtype = torch.promote_types(dtype, self._gram.dtype)
        total = self._gram.to(dtype) if self._gram is not None else None
        for part in parts:
            gram = part.to_gram().to(dtype)
            total = gram.clone() if total is None else total.add_(gram)
        self._parts.clear()
        self._gram = total

    def clear(self) -> None:
        """Drop everything."""
        self._parts.clear()
        self._count = 0
        self._gram = None
        self._precision = None

    def total(self) -> Stats | None:
        """The statistics of everything added since the last clear; None if nothing was."""
        if self._count == 0:
            return None
        precision = self._precision
        if self._gram is not None:
            return Stats(count=self._count, gram=self._gram, precision=precision)
        rows = [part.rows for part in self._parts if part.rows is not None]
        dtype = rows[0].dtype
        for part in rows[1:]:
            dtype = torch.promote_types(dtype, part.dtype)
        joined = rows[0] if len(rows) == 1 else torch.cat([r.to(dtype) for r in rows], dim=1)
        return Stats(count=self._count, rows=joined, precision=precision)


class StaticAccumulator:
    """The running sum of one layer's statistics in buffers allocated up front (capturable mode).

    A Gram and a count tensor are only ever updated in place, so a captured CUDA graph keeps
    reading the right memory; the count stays on the device.
    """

    def __init__(self, groups: int, n: int, device: torch.device, dtype: torch.dtype) -> None:
        self.n = n
        self._gram = torch.zeros(groups, n, n, device=device, dtype=dtype)
        self._count = torch.zeros((), dtype=torch.float64, device=device)
        self._precision = dtype

    def add(self, stats: Stats) -> None:
        """Add one row set's statistics."""
        self._gram.add_(stats.to_gram().to(self._gram))
        self._count.add_(stats.count)
        self._precision = coarsest([self._precision, stats.accuracy])

    def clear(self) -> None:
        """Zero the buffers in place."""
        self._gram.zero_()
        self._count.zero_()
        self._precision = self._gram.dtype

    def total(self) -> Stats:
        """The buffers themselves (their count may be 0)."""
        return Stats(count=self._count, gram=self._gram, precision=self._precision)
