"""One TrAct step through the library, whose result the tests compare with the references.

``tract_gradient`` runs a forward/backward through a model with ``TrActOptimizer`` on the given
first layers and returns each layer's raw and preconditioned weight gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tract_optim import TrActOptimizer


def tract_gradient(
    layers: list[nn.Module],
    model: nn.Module,
    x: Tensor,
    lam: float,
    *,
    out_grad: Tensor | None = None,
    **tract: Any,
) -> tuple[list[Tensor], list[Tensor]]:
    """(raw, TrAct) weight gradients of each layer after one forward/backward of ``model``.

    The loss has the gradient ``out_grad`` at the output if given, else it is a fixed MSE of
    tanh(output) to noise. ``tract`` goes to ``TrActOptimizer``; the solve is float64 unless it
    says otherwise (``solve_dtype=None``: the library's own choice).
    """
    tract.setdefault("solve_dtype", torch.float64)
    opt = TrActOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), layers, lam, **tract)
    out = model(x)
    if out_grad is None:
        target = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        F.mse_loss(torch.tanh(out), target).backward()
    else:
        (out * out_grad).sum().backward()
    raw = [layer.weight.grad.clone() for layer in layers]  # type: ignore[union-attr]
    opt.precondition_()
    preconditioned = [layer.weight.grad.clone() for layer in layers]  # type: ignore[union-attr]
    opt.remove()
    return raw, preconditioned
