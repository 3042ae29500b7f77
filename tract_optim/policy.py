"""What one forward pass of a first layer is reduced to, and in which precision.

A pass becomes a copy of its rows while it has fewer rows than features (r < n; smaller than the
Gram, and exact), else the Gram of its rows, always with autocast off. Both are computed in the
layer's *statistics dtype*:

- float64 for float64 inputs;
- otherwise the one the user fixed (``stats_dtype``), or, by default, one chosen per layer by
  ``Precision``: float32 while float32 keeps the update within ``AUTO_ERROR`` of the exact one,
  float64 when the inputs' scale demands it (raw-pixel inputs in [0, 255] make xᵀx/r + λI so
  ill-conditioned that a float32 Gram's rounding is larger than λ).

``Precision`` decides from the condition number that every step estimates anyway (no extra host
read): its first step runs in float64 (a probe), after which the layer keeps float32 if the
probe's condition number allows it, and switches to float64 for good if any later float32 step
finds that it no longer does (after a ``set_lam`` that lowered λ, say). Inside ``torch.compile``
the choice is a CPU flag tensor read by ``torch.cond`` when the graph runs, so that changing it
never recompiles the model: both Grams are compiled, and the float32 one is widened to float64.
Rows (r < n) are exact copies of the inputs whatever the choice; it only says in which dtype
their Gram is formed later.
"""

from __future__ import annotations

import enum
from typing import Any

import torch
from torch import Tensor, nn

from . import gram, unfold
from .statistics import Stats

#: Float32 statistics are kept while unit roundoff × cond(xᵀx/r + λI) stays below this.
AUTO_ERROR = 1e-4
_U32 = torch.finfo(torch.float32).eps / 2


class Mode(enum.Enum):
    """Where an automatic choice stands."""

    PROBE = "probe"  # the next step decides (in float64)
    NARROW = "float32"
    WIDE = "float64"


class Precision:
    """The statistics dtype of one first layer: fixed by the user, or chosen automatically."""

    def __init__(self, requested: torch.dtype | None, capturable: bool) -> None:
        self.requested = requested
        # Capturable steps read nothing, so nothing can be decided: float64 (exact) unless fixed.
        self._decides = requested is None and not capturable
        self.mode = Mode.PROBE if self._decides else Mode.WIDE
        #: ``mode`` for compiled graphs: whether the Gram is float64 (updated in place).
        self.flag = torch.tensor(True)

    def dtype(self, inputs: torch.dtype) -> torch.dtype:
        """The dtype of a pass's statistics for inputs of dtype ``inputs``."""
        if inputs == torch.float64:
            return torch.float64
        if self.requested is not None:
            return self.requested
        return torch.float32 if self.mode is Mode.NARROW else torch.float64

    def when_run(self, inputs: torch.dtype) -> torch.dtype | Tensor:
        """``dtype``, or, when it is chosen here, the live flag that a compiled graph reads."""
        if inputs == torch.float64 or not self._decides:
            return self.dtype(inputs)
        return self.flag

    @staticmethod
    def needs_wide(cond: Tensor) -> Tensor:
        """Whether float32 statistics would miss ``AUTO_ERROR`` at condition number ``cond``
        (a 0-d bool device tensor)."""
        return cond * _U32 > AUTO_ERROR

    def observe(self, wide: bool) -> None:
        """A step's verdict (``needs_wide`` of its condition number), read with its status."""
        if self._decides and self.mode is not Mode.WIDE:
            self._set(Mode.WIDE if wide else Mode.NARROW)

    def lam_lowered(self) -> None:
        """λ went down: the condition number goes up, so float32 must be checked again."""
        if self.mode is Mode.NARROW:
            self._set(Mode.PROBE)

    def state(self) -> str:
        """The automatic choice, for checkpoints (a resume continues with the same dtype)."""
        return self.mode.value

    @staticmethod
    def check_state(value: Any, name: str) -> Mode:
        """A saved ``state()``, or a ``ValueError`` naming ``name``."""
        try:
            return Mode(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in Mode)
            raise ValueError(f"{name} must be one of {choices}, got {value!r}") from None

    def load(self, mode: Mode) -> None:
        """Continue from a checkpoint's choice (ignored when the dtype is not chosen here)."""
        if self._decides:
            self._set(mode)

    def _set(self, mode: Mode) -> None:
        self.mode = mode
        self.flag.fill_(mode is not Mode.NARROW)


def pass_statistics(
    layer: nn.Module,
    x: Tensor,
    precision: torch.dtype | Tensor,
    keep_rows: bool,
    chunk_bytes: int | None,
    products: gram.Precision = "fp32",
) -> Stats | None:
    """The statistics of one pass of ``x`` through ``layer`` (None for an empty batch), autocast
    off: a copy of its rows when ``keep_rows`` and r < n, else its Gram.

    ``precision``: the statistics dtype, or a CPU bool tensor read when a compiled graph runs
    (True: float64; False: float32, widened to float64 so that both choices give one dtype).
    ``products``: how a float32 Gram's products are computed (``gram.Precision``; split
    precisions run on tensor cores on a GPU).
    """
    count = unfold.row_count(layer, x)
    if count == 0:
        return None
    fixed = precision if isinstance(precision, torch.dtype) else None
    with torch.autocast(device_type=x.device.type, enabled=False):
        if keep_rows and count < unfold.geometry(layer).n:
            exact = torch.float64 if x.dtype == torch.float64 else torch.float32
            # A copy: statistics never alias the caller's (possibly reused) input buffer.
            rows = unfold.rows(layer, x).to(exact, memory_format=torch.contiguous_format, copy=True)
            return Stats(count=count, rows=rows, precision=fixed)
        if fixed is not None:
            split = products if fixed == torch.float32 else "fp32"
            return Stats(count=count, gram=unfold.gram(layer, x, chunk_bytes, fixed, split))
        assert isinstance(precision, Tensor)

        def wide(x: Tensor) -> Tensor:
            return unfold.gram(layer, x, chunk_bytes, torch.float64)

        def narrow(x: Tensor) -> Tensor:
            return unfold.gram(layer, x, chunk_bytes, torch.float32, products).double()

        gram = torch.cond(precision, wide, narrow, (x,))
        return Stats(count=count, gram=gram)
