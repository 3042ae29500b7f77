"""The tiny models and batches the tests train.

- ``TinyNet``/``tiny_batch``: a first convolution and a linear head on 3×6×6 images;
- ``linear_with``: a bias-free Linear holding a given weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyNet(nn.Module):
    """``first`` (a 3→4 3×3 convolution, padding 1), ReLU and a linear head to 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.first(x)).flatten(1))  # type: ignore[no-any-return]


def tiny_net(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyNet:
    """A ``TinyNet`` with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return TinyNet().to(dtype)


def tiny_batch(seed: int, size: int = 8, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """``size`` standardised 3×6×6 images times ``scale``, and labels in {0, 1, 2}."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 3, 6, 6, generator=gen) * scale
    return x, torch.randint(0, 3, (size,), generator=gen)


def linear_with(weight: Tensor) -> nn.Linear:
    """A bias-free Linear of ``weight``'s dtype holding ``weight`` (out, in)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer
