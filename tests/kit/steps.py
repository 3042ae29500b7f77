"""One TrAct step on given first layers, and its check against the float64 reference.

``tract_gradient`` runs a forward/backward through a model with ``TrActOptimizer`` on the given
first layers and returns each layer's raw and preconditioned weight gradient;
``assert_tract_update`` checks a preconditioned gradient against ``kit.tract_grad``
on rows built by the caller (independently of the library).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tract_optim import TrActOptimizer

from .reference import condition, relative_error, tract_grad

#: TrAct's statistics are fp32 whatever the solve dtype, so the update is exact up to fp32
#: rounding of the Gram, amplified by the condition number of XᵀX/r + λI.
ERROR_PER_COND = 64 * 2.0**-24


def tract_gradient(
    layers: list[nn.Module], model: nn.Module, x: Tensor, lam: float, **kwargs: object
) -> tuple[list[Tensor], list[Tensor]]:
    """(raw, TrAct) weight gradients of each layer after one forward/backward of ``model``."""
    opt = TrActOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        layers,
        lam,
        solve_dtype=torch.float64,
        **kwargs,  # type: ignore[arg-type]
    )
    out = model(x)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    F.mse_loss(torch.tanh(out), target).backward()
    raw = [layer.weight.grad.clone() for layer in layers]  # type: ignore[union-attr]
    opt.precondition_()
    tract = [layer.weight.grad.clone() for layer in layers]  # type: ignore[union-attr]
    opt.remove()
    return raw, tract


def assert_tract_update(got: Tensor, raw: Tensor, rows: Tensor, lam: float) -> None:
    """``got`` is the float64 TrAct update of ``raw`` for ``rows``, within fp32 statistics."""
    expected = tract_grad(rows, raw, lam)
    assert expected.abs().max() > 0, "a zero gradient would make this check vacuous"
    cond = condition(rows, lam)
    error = relative_error(got, expected)
    assert error <= ERROR_PER_COND * cond, f"relative error {error:.3g}, cond {cond:.3g}"
