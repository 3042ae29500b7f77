"""Rows of a first layer's input: the x in TrAct's G·(xᵀx/r + λI)⁻¹.

A Linear layer's rows are its inputs with all leading dimensions flattened. A convolution's rows
are its unfolded input patches: one row per image and output position, laid out like the flattened
weight (in_channels/groups, *kernel_size), one set of rows per group. Everything here is exact for
every configuration the layers accept (stride, int/tuple/'same'/'valid' padding, dilation, groups,
all padding modes, and the TF "SAME" padding timm's ``Conv2dSame`` applies inside its forward, see
``layers.pads_tf_same``) and knows nothing about optimizers or hooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import gram as _gram
from .layers import SUPPORTED_LAYERS as SUPPORTED_LAYERS
from .layers import pads_tf_same

#: Default bound on the bytes of unfolded rows materialised at once.
DEFAULT_CHUNK_BYTES = 16 * 2**20
#: ... on a CUDA device, where small chunks cost more in kernel launches than they save in memory
#: (the GPU table in BENCHMARKS.md compares the two).
CUDA_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Geometry:
    """What the statistics of one first layer look like: ``groups`` Grams of size ``n`` × ``n``."""

    groups: int
    n: int
    out_features: int

    @property
    def out_per_group(self) -> int:
        return self.out_features // self.groups


def geometry(layer: nn.Module) -> Geometry:
    """The group count and row width ``n`` of a supported first layer."""
    if isinstance(layer, nn.Linear):
        return Geometry(groups=1, n=layer.in_features, out_features=layer.out_features)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        n = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
        return Geometry(groups=layer.groups, n=n, out_features=layer.out_channels)
    names = ", ".join(f"nn.{t.__name__}" for t in SUPPORTED_LAYERS)
    raise TypeError(f"unsupported first layer {type(layer).__name__}; supported: {names}")


def _padding_pairs(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Tensor) -> list[int]:
    """Padding in ``F.pad`` order (last dim first, left then right), as the layer pads ``x``.

    ``x``: an input of the layer, batched or not (only its spatial sizes matter, and only for
    the TF "SAME" padding of ``layers.pads_tf_same``, which depends on them).
    """
    dims = len(conv.kernel_size)
    if conv.padding == "valid":
        return [0, 0] * dims
    tf_same = pads_tf_same(conv)
    pairs: list[int] = []
    for i in reversed(range(dims)):
        if tf_same:
            size, stride = x.shape[x.dim() - dims + i], conv.stride[i]
            span = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
            total = max((-(-size // stride) - 1) * stride + span - size, 0)
            pairs += [total // 2, total - total // 2]
        elif conv.padding == "same":
            total = conv.dilation[i] * (conv.kernel_size[i] - 1)
            pairs += [total // 2, total - total // 2]
        else:
            p = conv.padding[i]
            assert isinstance(p, int)
            pairs += [p, p]
    return pairs


def _pad(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Tensor) -> Tensor:
    pairs = _padding_pairs(conv, x)
    if not any(pairs):
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pairs, mode=mode)


def _is_patch_embedding(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Tensor) -> bool:
    """Stride = kernel, no padding of ``x``, no dilation: non-overlapping windows, a reshape."""
    return (
        tuple(conv.stride) == tuple(conv.kernel_size)
        and not any(_padding_pairs(conv, x))
        and all(d == 1 for d in conv.dilation)
    )


def _conv_rows(
    conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Tensor, out: Tensor | None = None
) -> Tensor:
    """Rows of a batch of (already batched) inputs, shape (groups, B·positions, n), written to
    ``out`` (as many elements as the rows, any shape) if given."""
    dims = len(conv.kernel_size)
    batch, channels = x.shape[0], x.shape[1]
    if _is_patch_embedding(conv, x):
        # Crop the remainder the convolution ignores, then split every spatial dim into
        # (positions, kernel): a view; the reshape below is the only copy.
        for i, k in enumerate(conv.kernel_size):
            size = x.shape[2 + i] // k * k
            x = x.narrow(2 + i, 0, size)
        shape = [batch, channels]
        for i, k in enumerate(conv.kernel_size):
            shape += [x.shape[2 + i] // k, k]
        windows = x.reshape(shape)
        # (B, C, o1, k1, o2, k2, ...) -> (B, o1, o2, ..., C, k1, k2, ...)
        order = [0, *(2 + 2 * i for i in range(dims)), 1, *(3 + 2 * i for i in range(dims))]
        windows = windows.permute(order)
    else:
        x = _pad(conv, x)
        for i in range(dims):
            span = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
            x = x.unfold(2 + i, span, conv.stride[i])
        # x: (B, C, o1..oD, span1..spanD); keep every dilation-th window element.
        index = [slice(None)] * (2 + dims) + [slice(None, None, d) for d in conv.dilation]
        windows = x[tuple(index)]
        order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
        windows = windows.permute(order)
    groups = conv.groups
    n = channels // groups * math.prod(conv.kernel_size)
    if out is None:
        rows = windows.reshape(-1, groups, n)
    else:
        rows = out.view(windows.shape).copy_(windows).view(-1, groups, n)
    return rows.transpose(0, 1)


def batched_input(layer: nn.Module, x: Tensor) -> Tensor:
    """The layer's input with an explicit batch dimension (convolutions accept unbatched input)."""
    if (
        isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and x.dim() == len(layer.kernel_size) + 1
    ):
        return x.unsqueeze(0)
    return x


def rows(layer: nn.Module, x: Tensor) -> Tensor:
    """All rows of one input at once, shape (groups, r, n), in the input's dtype."""
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, layer.in_features)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _conv_rows(layer, batched_input(layer, x))
    geometry(layer)  # raises the TypeError
    raise AssertionError("unreachable")


def _output_sizes(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Tensor) -> list[int]:
    """Spatial sizes of the layer's output for input ``x`` (batched or not)."""
    dims = len(conv.kernel_size)
    pairs = _padding_pairs(conv, x)
    out = []
    for i in range(dims):
        left, right = pairs[2 * (dims - 1 - i)], pairs[2 * (dims - 1 - i) + 1]
        span = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
        out.append((x.shape[x.dim() - dims + i] + left + right - span) // conv.stride[i] + 1)
    return out


def row_count(layer: nn.Module, x: Tensor) -> int:
    """Number of rows ``r`` an input contributes (batch × output positions)."""
    if isinstance(layer, nn.Linear):
        return x.numel() // layer.in_features
    conv = layer
    assert isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    xb = batched_input(conv, x)
    return xb.shape[0] * math.prod(_output_sizes(conv, xb))


def check_pass(layer: nn.Module, x: Tensor, output: Tensor) -> None:
    """Raise unless ``output`` has the shape of the rows TrAct builds from ``x`` (shapes only).

    One output position per row, ``geometry(layer).out_features`` values each: a layer that
    pads, crops or reshapes inside its forward differently from what ``rows`` assumes (e.g. a
    subclass passed in ``trusted_layers``) is caught here instead of giving wrong statistics.
    """
    if isinstance(layer, nn.Linear):
        expected = (*x.shape[:-1], layer.out_features)
    else:
        assert isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        expected = (*x.shape[: x.dim() - len(layer.kernel_size) - 1], layer.out_channels)
        expected += tuple(_output_sizes(layer, x))
    if tuple(output.shape) != expected:
        weight = tuple(layer.weight.shape)
        raise RuntimeError(
            f"first layer {type(layer).__name__} (weight {weight}) turned an input of shape "
            f"{tuple(x.shape)} into an output of shape {tuple(output.shape)}, but the rows "
            f"TrAct builds from that input (with the layer's padding, stride and dilation) "
            f"give {expected}: its forward pads, crops or reshapes differently, so this "
            "pass's statistics would be wrong. Pass a plain nn layer (or one whose forward "
            "computes exactly what its nn base class computes) as the first layer."
        )


def gram(
    layer: nn.Module,
    x: Tensor,
    chunk_bytes: int | None = None,
    dtype: torch.dtype = torch.float32,
    precision: _gram.Precision = "fp32",
) -> Tensor:
    """xᵀx per group, shape (groups, n, n), in ``dtype`` (fp32 or fp64), materialising at most
    ~``chunk_bytes`` at a time.

    Overlapping Conv2d windows go through ``gram.conv2d_lags``, which never unfolds the input;
    other layers unfold chunk by chunk and skip the lower triangle (``gram.add_upper_``). Inside
    ``torch.compile`` the whole batch is one chunk (see ``_chunks``). ``precision``: how the
    products are computed (``gram.Precision``); the split ones need fp32 ``dtype``, and the two
    parts they make of every value count against ``chunk_bytes``.
    """
    geo = geometry(layer)
    if precision not in _gram.PRECISIONS:
        raise ValueError(f"precision must be one of {_gram.PRECISIONS}, got {precision!r}")
    if precision != "fp32" and dtype != torch.float32:
        raise ValueError(f"precision {precision!r} computes an fp32 Gram, got dtype {dtype}")
    if chunk_bytes is None:
        chunk_bytes = CUDA_CHUNK_BYTES if x.device.type == "cuda" else DEFAULT_CHUNK_BYTES
    if precision != "fp32":
        chunk_bytes //= 3
    out = torch.zeros(geo.groups, geo.n, geo.n, dtype=dtype, device=x.device)
    with torch.autocast(device_type=x.device.type, enabled=False):
        if isinstance(layer, nn.Linear):
            flat = x.reshape(-1, geo.n)
            for piece in _chunks(flat, 4 * geo.n, chunk_bytes):
                _gram.add_upper_(out, piece[None].to(dtype), precision)
            return _gram.mirror_upper(out)
        xb = batched_input(layer, x)
        if _uses_conv2d_kernel(layer, xb):
            _conv2d_gram_into(out, layer, xb, chunk_bytes, dtype, precision)
            return out
        assert isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        _add_unfolded_upper_(out, layer, xb, chunk_bytes, dtype, precision)
    return _gram.mirror_upper(out)


def _add_unfolded_upper_(
    out: Tensor,
    conv: nn.Conv1d | nn.Conv2d | nn.Conv3d,
    xb: Tensor,
    chunk_bytes: int,
    dtype: torch.dtype,
    precision: _gram.Precision,
) -> None:
    """Add the upper triangles of the Grams of ``xb``'s rows to ``out``, a chunk at a time.

    The rows of every chunk go to one buffer (the first chunk is the largest): glibc may return
    a freed block this large to the OS, and a fresh one's pages are then mapped again. The
    buffer is freed on return, before the caller mirrors ``out``.
    """
    per_image = row_count(conv, xb[:1]) * out.shape[0] * out.shape[1]  # elements of rows
    pieces = _chunks(xb, out.element_size() * max(1, per_image), chunk_bytes)
    buffer = out.new_empty(pieces[0].shape[0] * per_image)
    for piece in pieces:
        part = buffer[: piece.shape[0] * per_image]
        _gram.add_upper_(out, _conv_rows(conv, piece.to(dtype), part), precision)


def _chunks(x: Tensor, bytes_per_item: int, chunk_bytes: int) -> tuple[Tensor, ...]:
    """``x`` split along dim 0 into equal pieces of at most ``chunk_bytes`` of work each.

    Inside ``torch.compile`` the whole of ``x`` is one piece: a loop over the batch would make
    Dynamo specialise the graph on the batch size (one recompilation per size), and the
    compiler plans the memory of the graph as a whole anyway.
    """
    if torch.compiler.is_compiling():
        return (x,)
    per = max(1, chunk_bytes // bytes_per_item)
    # equal pieces (32 as 11, 11, 10 rather than 13, 13, 6): no short last product
    return torch.tensor_split(x, -(-x.shape[0] // per)) if x.shape[0] else (x,)


def _uses_conv2d_kernel(layer: nn.Module, x: Tensor) -> TypeGuard[nn.Conv2d]:
    """Overlapping 2-D windows without dilation: ``gram.conv2d_lags`` avoids the unfold."""
    return (
        isinstance(layer, nn.Conv2d)
        and tuple(layer.dilation) == (1, 1)
        and not _is_patch_embedding(layer, x)
    )


def _conv2d_gram_into(
    out: Tensor,
    conv: nn.Conv2d,
    xb: Tensor,
    chunk_bytes: int,
    dtype: torch.dtype,
    precision: _gram.Precision,
) -> None:
    """Write the Gram of every group of ``xb``'s rows to ``out``: images padded a chunk at a
    time (half of ``chunk_bytes``), their width windows a band of rows at a time (the other half).
    """
    kernel = (conv.kernel_size[0], conv.kernel_size[1])
    stride = (conv.stride[0], conv.stride[1])
    per_group = conv.in_channels // conv.groups
    left, right, top, bottom = _padding_pairs(conv, xb)
    padded = conv.in_channels * (xb.shape[2] + top + bottom) * (xb.shape[3] + left + right)
    per_image = padded * torch.finfo(dtype).bits // 8
    # one band inside torch.compile: band sizes depend on the batch (see ``_chunks``)
    band = None if torch.compiler.is_compiling() else chunk_bytes // 2
    f = per_group * kernel[1]
    tables = out.new_zeros(conv.groups, kernel[0], f, kernel[0], f)
    # zero padding is written by the kernel's own copy; other modes pad first
    zeros = conv.padding_mode == "zeros"
    padding = (top, bottom, left, right) if zeros else (0, 0, 0, 0)
    for piece in _chunks(xb, per_image, chunk_bytes // 2):
        piece = piece.to(dtype) if zeros else _pad(conv, piece.to(dtype))
        for g in range(conv.groups):
            part = piece[:, g * per_group : (g + 1) * per_group]
            tables[g] += _gram.conv2d_lags(
                part, kernel, stride, band_bytes=band, padding=padding, precision=precision
            )
    for g in range(conv.groups):
        out[g] = _gram.gram_from_lags(tables[g], per_group)
