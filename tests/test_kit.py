"""The test kit itself: its reference is independent of the library, and its tolerance helper
``assert_update`` can fail."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from tests.kit import assert_update, tract_grad
from tests.kit import reference as reference_module


def test_reference_imports_nothing_of_the_library() -> None:
    """``kit.reference`` imports only the standard library and torch (no relative imports, which
    could reach code that uses ``tract_optim``)."""
    source = Path(reference_module.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import from {node.module!r}"
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "collections", "math", "torch", "typing", "warnings"}


def test_assert_update_accepts_tract_and_refuses_what_is_not() -> None:
    """The fp32 rounding of the exact update passes; the raw gradient (TrAct off), TrAct applied
    twice, a zero gradient and a gradient of another shape do not."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64)
    raw = torch.randn(4, 5, generator=gen)
    exact = tract_grad(rows, raw, 0.1)
    assert assert_update(exact.float(), raw, rows, 0.1) <= 2.0**-24
    for wrong in (raw, tract_grad(rows, exact, 0.1), exact.float().reshape(2, 10)):
        with pytest.raises(AssertionError):
            assert_update(wrong, raw, rows, 0.1)
    with pytest.raises(AssertionError, match="vacuous"):
        assert_update(torch.zeros(4, 5), torch.zeros(4, 5), rows, 0.1)
