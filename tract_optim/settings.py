"""TrAct's options, validated once, before anything is changed.

``Settings`` is a frozen, keyword-only dataclass checked in ``__post_init__``: every error names
the argument and the valid values. λ is checked separately (``check_lams``) because it comes one
value per first layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from . import gram
from . import layers as layers_

#: λ must lie in this range: λ and 1/λ then stay normal float32 numbers with room to spare.
LAM_RANGE = (1e-30, 1e30)

_FLOAT_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every option of ``TrActPreconditioner`` / ``TrActOptimizer`` except λ (see there)."""

    solve_dtype: torch.dtype | None = None
    stats_dtype: torch.dtype | None = None
    chunk_bytes: int | None = None
    process_group: dist.ProcessGroup | None = None
    sync_statistics: bool = True
    clip_grad_norm: float | None = None
    clip_norm_type: float = 2.0
    capturable: bool = False
    trusted_layers: tuple[type[nn.Module], ...] = ()
    stats_every: int = 1
    stats_decay: float | None = None
    gram_precision: gram.Precision = "fp32"

    def __post_init__(self) -> None:
        for name in ("solve_dtype", "stats_dtype"):
            value = getattr(self, name)
            if value is not None and value not in _FLOAT_DTYPES:
                raise ValueError(
                    f"{name} must be None, torch.float32 or torch.float64, got {value}"
                )
        chunk = self.chunk_bytes
        if chunk is not None and (
            isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0
        ):
            raise ValueError(f"chunk_bytes must be None or a positive int, got {chunk!r}")
        for name in ("sync_statistics", "capturable"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.clip_grad_norm is not None:
            object.__setattr__(
                self, "clip_grad_norm", _positive(self.clip_grad_norm, "clip_grad_norm")
            )
        object.__setattr__(
            self, "clip_norm_type", _positive(self.clip_norm_type, "clip_norm_type", inf=True)
        )
        object.__setattr__(self, "trusted_layers", layers_.check_trusted(self.trusted_layers))
        every = self.stats_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"stats_every must be an int >= 1, got {every!r}")
        decay = self.stats_decay
        if decay is not None and (
            isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1
        ):
            raise ValueError(f"stats_decay must be None or a float in [0, 1), got {decay!r}")
        if self.gram_precision not in gram.PRECISIONS:
            choices = ", ".join(repr(p) for p in gram.PRECISIONS)
            raise ValueError(
                f"gram_precision must be one of {choices}, got {self.gram_precision!r}"
            )


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


def check_lams(lam: float | Sequence[float], count: int) -> list[float]:
    """One validated λ per first layer, from one value or a sequence of ``count`` values."""
    values: list[object] = [lam] * count
    if isinstance(lam, Sequence) and not isinstance(lam, str):
        values = list(lam)
    if len(values) != count:
        raise ValueError(f"lam: got {len(values)} values for {count} first layers")
    return [check_lam(value, f"lam[{i}]") for i, value in enumerate(values)]


def _positive(value: object, name: str, *, inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}")
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not inf):
        raise ValueError(f"{name} must be a positive {'' if inf else 'finite '}float, got {value}")
    return float(value)
