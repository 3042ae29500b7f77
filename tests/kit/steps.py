"""One TrAct step through the library, for tests that check it against ``assert_update``.

``tract_gradient`` runs a forward/backward through a model with ``TrActOptimizer`` on the given
first layers and returns each layer's raw and preconditioned weight gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tract_optim import TrActOptimizer


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
