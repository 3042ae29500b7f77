"""A hypothesis strategy helper: a random convolution and an input for it.

``draw_conv(data, ...)`` is called inside a ``@given(data=st.data())`` test, so that every argument
a Conv1d/2d/3d accepts (groups, bias, padding modes and kinds, stride, dilation, unbatched input,
memory layouts) comes up, and a failing example replays exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d

_CONVS: dict[int, type[Conv]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _draw_geometry(data: st.DataObject, dims: int) -> dict[str, Any]:
    """Kernel, stride, dilation and padding of a random convolution (valid torch arguments)."""
    kind = data.draw(st.sampled_from(["int", "tuple", "same", "valid", "patch"]), label="padding")
    sizes = st.lists(st.integers(1, 3), min_size=dims, max_size=dims)
    kernel = data.draw(sizes, label="kernel")
    if kind == "patch":
        kernel = [k + 1 for k in kernel]
        return {"kernel_size": tuple(kernel), "stride": tuple(kernel), "padding": 0}
    stride = [1] * dims if kind == "same" else data.draw(sizes, label="stride")
    dilation = data.draw(st.lists(st.integers(1, 2), min_size=dims, max_size=dims))
    padding: Any = kind
    if kind == "int":
        padding = data.draw(st.integers(0, 2), label="int padding")
    elif kind == "tuple":
        padding = tuple(data.draw(st.lists(st.integers(0, 2), min_size=dims, max_size=dims)))
    return {
        "kernel_size": tuple(kernel),
        "stride": tuple(stride),
        "dilation": tuple(dilation),
        "padding": padding,
    }


def _spatial_sizes(data: st.DataObject, conv: Conv) -> list[int]:
    """Input sizes with at least one output position and legal reflect/circular padding."""
    pads = conv._reversed_padding_repeated_twice
    dims = len(conv.kernel_size)
    out = []
    for i in range(dims):
        left, right = pads[2 * (dims - 1 - i)], pads[2 * (dims - 1 - i) + 1]
        span = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
        low = max(1, span - left - right, max(left, right) + 1)
        # Up to kernel + 2 more, so that sizes not divisible by the stride come up.
        out.append(low + data.draw(st.integers(0, conv.kernel_size[i] + 2), label="extra size"))
    return out


def _layout(data: st.DataObject, shape: list[int], dtype: torch.dtype) -> Tensor:
    """A random input of ``shape``: contiguous, channels_last, strided or permuted."""
    layouts = ["contiguous", "strided", "permuted"]
    if len(shape) in (4, 5):
        layouts.append("channels_last")
    layout = data.draw(st.sampled_from(layouts), label="layout")
    if layout == "strided":
        return torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2]
    if layout == "permuted":
        return torch.randn(*reversed(shape), dtype=dtype).permute(*reversed(range(len(shape))))
    x = torch.randn(*shape, dtype=dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    return x


def draw_conv(
    data: st.DataObject,
    dims: int | None = None,
    dtype: torch.dtype = torch.float32,
    max_batch: int = 3,
) -> tuple[Conv, Tensor]:
    """A random Conv1d/2d/3d and an input for it, covering every argument the layer accepts.

    Seeds torch's global generator from the draw, so a failing example replays exactly.
    """
    torch.manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    if dims is None:
        dims = data.draw(st.integers(1, 3), label="dims")
    groups = data.draw(st.integers(1, 3), label="groups")
    conv = _CONVS[dims](
        groups * data.draw(st.integers(1, 2), label="in per group"),
        groups * data.draw(st.integers(1, 3), label="out per group"),
        groups=groups,
        bias=data.draw(st.booleans(), label="bias"),
        padding_mode=data.draw(st.sampled_from(PADDING_MODES), label="padding_mode"),
        dtype=dtype,
        **_draw_geometry(data, dims),
    )
    batch = data.draw(st.integers(0, max_batch), label="batch (0: unbatched)")
    shape = [conv.in_channels, *_spatial_sizes(data, conv)]
    if batch:
        shape.insert(0, batch)
    return conv, _layout(data, shape, dtype)
