"""The tiny models and batches the tests train.

- ``TinyNet``: one first layer, an optional norm, an activation, then a linear head on the
  flattened (or position-averaged) features. ``conv_net`` builds it on a 3×3 convolution over
  C×S×S images, ``token_net`` on a Linear over (batch, tokens, n) inputs; ``tiny_net`` is the
  default conv net (3×6×6 images) and ``tiny_batch`` a batch for it.
- ``TwoStem``: two first layers, an image convolution and a token Linear, feeding one head.
- ``random_batch``: standard normal inputs of any shape, times ``scale``, and class labels.
- ``linear_with``: a bias-free Linear holding a given weight.

Every factory seeds torch's global generator, so two calls give the same weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyNet(nn.Module):
    """``first`` → ``norm`` → ``act`` → flatten (``pool``: mean over positions) → ``head``.

    The first layer is the attribute ``first_name``: ``first`` unless a caller needs another name
    (the framework examples take ``model.conv1``).
    """

    def __init__(
        self,
        first: nn.Module,
        features: int,
        classes: int = 3,
        *,
        act: nn.Module | None = None,
        norm: nn.Module | None = None,
        pool: bool = False,
        first_name: str = "first",
    ) -> None:
        super().__init__()
        self.first_name = first_name
        self.add_module(first_name, first)
        self.norm = nn.Identity() if norm is None else norm
        self.act = nn.ReLU() if act is None else act
        self.pool = pool
        self.head = nn.Linear(features, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.after_first(getattr(self, self.first_name)(x))

    def after_first(self, z: Tensor) -> Tensor:
        """Everything after the first layer, applied to its output ``z``."""
        z = self.act(self.norm(z))
        return self.head(z.flatten(2).mean(2) if self.pool else z.flatten(1))  # type: ignore[no-any-return]


def conv_net(
    *,
    channels: int = 3,
    size: int = 6,
    width: int = 4,
    classes: int = 3,
    act: nn.Module | None = None,
    norm: bool = False,
    pool: bool = False,
    first_name: str = "first",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> TinyNet:
    """A ``TinyNet`` whose first layer is Conv2d(channels → width, 3×3, padding 1) on
    channels×size×size images; ``norm``: a BatchNorm2d after it."""
    torch.manual_seed(seed)
    first = nn.Conv2d(channels, width, 3, padding=1)
    net = TinyNet(
        first,
        width if pool else width * size * size,
        classes,
        act=act,
        norm=nn.BatchNorm2d(width) if norm else None,
        pool=pool,
        first_name=first_name,
    )
    return net.to(dtype)


def token_net(
    *,
    n: int = 6,
    tokens: int = 1,
    width: int = 8,
    classes: int = 3,
    act: nn.Module | None = None,
    seed: int = 0,
) -> TinyNet:
    """A ``TinyNet`` whose first layer is Linear(n → width) on (batch, tokens, n) inputs (or
    (batch, n) when ``tokens`` is 1): batch·tokens rows, so r < n is easy to set up."""
    torch.manual_seed(seed)
    return TinyNet(nn.Linear(n, width), tokens * width, classes, act=act)


def tiny_net(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyNet:
    """The default ``conv_net``: 3 → 4 channels on 3×6×6 images, ReLU, 3 classes."""
    return conv_net(dtype=dtype, seed=seed)


class TwoStem(nn.Module):
    """Two first layers, ``conv`` on images and ``lin`` on tokens, each followed by tanh and a
    mean (over positions, over tokens), concatenated into one linear ``head``."""

    def __init__(self, conv: nn.Conv2d, lin: nn.Linear, classes: int = 3) -> None:
        super().__init__()
        self.conv = conv
        self.lin = lin
        self.head = nn.Linear(conv.out_channels + lin.out_features, classes)

    def forward(self, image: Tensor, tokens: Tensor) -> Tensor:
        a = torch.tanh(self.conv(image)).mean(dim=(2, 3))
        b = torch.tanh(self.lin(tokens)).mean(dim=1)
        return self.head(torch.cat([a, b], dim=1))  # type: ignore[no-any-return]


def two_stem(
    *,
    channels: int = 3,
    width: int = 4,
    stride: int = 1,
    padding: int = 1,
    groups: int = 1,
    token_dim: int = 6,
    lin_out: int = 4,
    classes: int = 3,
    seed: int = 0,
) -> TwoStem:
    """A ``TwoStem`` with Conv2d(channels → width, 3×3) and Linear(token_dim → lin_out)."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(channels, width, 3, stride=stride, padding=padding, groups=groups)
    return TwoStem(conv, nn.Linear(token_dim, lin_out), classes)


def random_batch(
    shape: tuple[int, ...], seed: int, *, classes: int = 3, scale: float | Tensor = 1.0
) -> tuple[Tensor, Tensor]:
    """Standard normal inputs of ``shape`` times ``scale`` (a number, or a tensor broadcast
    against them), and ``shape[0]`` labels in [0, classes)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * scale
    return x, torch.randint(0, classes, (shape[0],), generator=gen)


def tiny_batch(seed: int, size: int = 8, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """``size`` standardised 3×6×6 images times ``scale``, and labels in {0, 1, 2}."""
    return random_batch((size, 3, 6, 6), seed, scale=scale)


def linear_with(weight: Tensor) -> nn.Linear:
    """A bias-free Linear of ``weight``'s dtype holding ``weight`` (out, in)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer
