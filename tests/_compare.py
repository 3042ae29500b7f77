"""Exact comparison of nested state (state dicts, snapshots) shared by several test files."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def assert_same(a: Any, b: Any) -> None:
    """Deep equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b
