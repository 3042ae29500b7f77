"""Stand-ins for model-zoo first layers that are not plain ``nn`` layers (timm is not installed).

The convolutions reproduce timm 1.0's behaviour (``timm/layers/conv2d_same.py``, ``std_conv.py``
and ``padding.py``): the same constructor defaults, the same forward. Each claims timm's module
as its ``__module__``, since that (with the class name) is how tract_optim recognises timm's
classes; a copy defined anywhere else must be refused.

- ``Conv2dSame`` (stems of ``tf_efficientnet_*``, ``tf_mobilenetv3_*``): zero-pads its input
  TF-"SAME" inside forward, asymmetrically (the extra pixel goes right/bottom), then convolves
  without padding; its own ``padding`` attribute stays 0.
- ``StdConv2d`` / ``ScaledStdConv2d`` (``resnetv2_*_bit``, ``nfnet_*``): standardise the weight per
  output channel inside forward (biased variance, eps 1e-6); the scaled one multiplies by a
  learned gain times fan_in^-1/2.
- ``StdConv2dSame`` / ``ScaledStdConv2dSame`` (hybrid ViT stems): the same with padding='SAME',
  which is static symmetric padding when stride is 1 and the dilated kernel span is odd, and
  dynamic TF-SAME padding in forward (``same_pad``) otherwise.

Also two layouts with parallel first layers: a RepVGG / MobileOne train-time stem and a
CrossViT-like model with two patch embeddings of the same image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def tf_same_total(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Total TF-'SAME' padding of one spatial dim: the output then has ⌈size/stride⌉ positions."""
    out = math.ceil(size / stride)
    return max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def pad_same(
    x: Tensor, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
) -> Tensor:
    """Zero-pad the last two dims TF-'SAME': floor half before, the rest after."""
    pad_h = tf_same_total(x.shape[-2], kernel[0], stride[0], dilation[0])
    pad_w = tf_same_total(x.shape[-1], kernel[1], stride[1], dilation[1])
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


def _symmetric_padding(kernel: int, stride: int, dilation: int) -> int:
    """timm's ``get_padding``: PyTorch-style symmetric padding for an int kernel."""
    return ((stride - 1) + dilation * (kernel - 1)) // 2


def _same_padding(kernel: int, stride: int, dilation: int) -> tuple[int, bool]:
    """timm's ``get_padding_value('same', ...)``: (static padding, whether it is dynamic)."""
    if stride == 1 and (dilation * (kernel - 1)) % 2 == 0:
        return _symmetric_padding(kernel, stride, dilation), False
    return 0, True


def _standardise(conv: nn.Conv2d, eps: float, gain: Tensor | None = None) -> Tensor:
    """The weight standardised per output channel, as ``F.batch_norm`` in training mode does."""
    weight = conv.weight
    flat = weight.reshape(1, conv.out_channels, -1)
    out = F.batch_norm(flat, None, None, weight=gain, training=True, momentum=0.0, eps=eps)
    return out.reshape_as(weight)


class Conv2dSame(nn.Conv2d):
    """timm's ``Conv2dSame``: TF-'SAME' padding computed from each input inside forward."""

    __module__ = "timm.layers.conv2d_same"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        # timm ignores ``padding``: the layer's own padding is always 0.
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x: Tensor) -> Tensor:
        x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """timm's ``StdConv2d`` (BiT ResNet-V2): weight standardisation inside forward."""

    __module__ = "timm.layers.std_conv"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-6,
    ) -> None:
        if padding is None:
            padding = _symmetric_padding(kernel_size, stride, dilation)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        weight = _standardise(self, self.eps)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConv2dSame(nn.Conv2d):
    """timm's ``StdConv2dSame`` (hybrid ViT stems): TF-'SAME' padding and weight standardisation."""

    __module__ = "timm.layers.std_conv"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-6,
    ) -> None:
        padding, dynamic = _same_padding(kernel_size, stride, dilation)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        self.same_pad = dynamic
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if self.same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        weight = _standardise(self, self.eps)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm's ``ScaledStdConv2d`` (NFNets): standardisation times gain·γ/√fan_in inside forward."""

    __module__ = "timm.layers.std_conv"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        gamma: float = 1.0,
        eps: float = 1e-6,
        gain_init: float = 1.0,
    ) -> None:
        if padding is None:
            padding = _symmetric_padding(kernel_size, stride, dilation)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        self.gain = nn.Parameter(torch.full((out_channels, 1, 1, 1), gain_init))
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        weight = _standardise(self, self.eps, (self.gain * self.scale).view(-1))
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2dSame(nn.Conv2d):
    """timm's ``ScaledStdConv2dSame``: ``ScaledStdConv2d`` with padding='SAME'."""

    __module__ = "timm.layers.std_conv"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        gamma: float = 1.0,
        eps: float = 1e-6,
        gain_init: float = 1.0,
    ) -> None:
        padding, dynamic = _same_padding(kernel_size, stride, dilation)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        self.gain = nn.Parameter(torch.full((out_channels, 1, 1, 1), gain_init))
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.same_pad = dynamic
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if self.same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        weight = _standardise(self, self.eps, (self.gain * self.scale).view(-1))
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


WEIGHT_TRANSFORMS: tuple[type[nn.Conv2d], ...] = (
    StdConv2d,
    StdConv2dSame,
    ScaledStdConv2d,
    ScaledStdConv2dSame,
)


class RepVggStem(nn.Module):
    """A RepVGG / MobileOne / FastViT train-time stem: k×k conv-BN branches plus a 1×1 one.

    Every branch convolves the raw input with the same stride (3×3 padded 1, 1×1 unpadded); their
    BN outputs are summed. There is no identity branch (channels change). ``kxk_branches`` > 1 is
    MobileOne's over-parameterisation.
    """

    def __init__(self, channels: int = 3, width: int = 8, kxk_branches: int = 1) -> None:
        super().__init__()
        self.conv_kxk = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width))
            for _ in range(kxk_branches)
        )
        self.conv_scale = nn.Sequential(
            nn.Conv2d(channels, width, 1, 2, 0, bias=False), nn.BatchNorm2d(width)
        )
        self.head = nn.Linear(width, 5)

    def forward(self, x: Tensor) -> Tensor:
        z = self.conv_scale(x)
        for branch in self.conv_kxk:
            z = z + branch(x)
        return self.head(torch.relu(z).mean(dim=(2, 3)))

    def first_layers(self) -> list[nn.Module]:
        """The layers that read the raw input, in the order forward calls them."""
        return [self.conv_scale[0], *(branch[0] for branch in self.conv_kxk)]


class TwoPatchEmbeddings(nn.Module):
    """CrossViT-like: a small-patch and a large-patch embedding of the same (unresized) image."""

    def __init__(self, channels: int = 3, dim: int = 8, patches: tuple[int, int] = (4, 8)) -> None:
        super().__init__()
        self.embed_small = nn.Conv2d(channels, dim, patches[0], patches[0])
        self.embed_large = nn.Conv2d(channels, dim, patches[1], patches[1])
        self.blocks = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.head = nn.Linear(2 * dim, 5)

    def forward(self, x: Tensor) -> Tensor:
        tokens = [
            self.blocks(embed(x).flatten(2).transpose(1, 2)).mean(1)
            for embed in (self.embed_small, self.embed_large)
        ]
        return self.head(torch.cat(tokens, dim=1))

    def first_layers(self) -> list[nn.Module]:
        """The layers that read the raw input, in the order forward calls them."""
        return [self.embed_small, self.embed_large]
