"""Fast, exact Gram kernels xᵀx for the rows of a first layer's input.

``conv2d_lags`` serves 2-D convolutions with overlapping windows (kernel larger than stride, e.g.
a ResNet stem) without materialising the unfolded input. Unfold the input along the width only:
padded row ``h`` becomes ``Z[h]``, a (C·k_w) × (B·Q) matrix of width windows (Q output
columns). Kernel row ``i`` at output row ``p`` reads ``Z[s·p + i]``, so the Gram block of kernel
rows ``i`` and ``i + d`` is ``Σ_p Z[s·p + i] Z[s·p + i + d]ᵀ``: a sum, over a window of rows, of
per-row products that depend only on the row and the lag ``d``. One batched product computes
every row's products with its next ``k_h`` rows (all lags at once: ``Z`` is stored row-major, so
rows ``h … h + k_h − 1`` are one strided view), and each block is a strided sum of them. Each Gram
entry is still a plain sum of the same fp32 products (only the order of summation changes), so
the result is exact up to fp32 rounding. Work: about k_h·(C·k_w)² multiply-adds per padded row
and output column instead of (C·k_h·k_w)² per output position (a 7×7/2 stem: 2 rows of 7·21²
instead of 147², 3.5× less), and the only copy is the width-unfolded input (k_w/s_w times the
input, not k_h·k_w/(s_h·s_w)).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Input rows per product of ``conv2d_lags``: two rows against their next k_h + 1 rows make the
#: products twice as tall for (k_h + 1)/k_h of the work, which GEMM kernels run faster than
#: products only C·k_w rows tall (the whole Gram 1.07× faster for the 7×7/2 stem and 1.3× for
#: the 3×3 CIFAR stem of ``scripts/bench.py``, one CPU thread; 3 or 4 rows were slower).
ROWS_PER_PRODUCT = 2


def _width_windows(
    xpad: Tensor, kernel: tuple[int, int], stride: tuple[int, int], m: int
) -> Tensor:
    """Padded rows unfolded along the width, (rows, C·k_w, B·Q), rows = a multiple of ``m``
    plus k_h − 1; entry [h, c·k_w + j, b·Q + q] is input row ``h``, channel ``c``, column
    ``s_w·q + j`` of image ``b``. Rows past those any window reads are zero."""
    (kh, kw), (sh, sw) = kernel, stride
    batch, channels, height, width = xpad.shape
    p_out, q_out = (height - kh) // sh + 1, (width - kw) // sw + 1
    used = sh * (p_out - 1) + kh
    rows = m * -(-used // m) + kh - 1
    sb, sc, s_row, s_col = xpad.stride()
    windows = xpad.as_strided(
        (used, channels, kw, batch, q_out),
        (s_row, sc, s_col, sb, sw * s_col),
    )
    z = xpad.new_empty(rows, channels * kw, batch * q_out)
    z[:used].view(windows.shape).copy_(windows)
    z[used:].zero_()
    return z


def conv2d_lags(
    xpad: Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    rows_per_product: int = ROWS_PER_PRODUCT,
) -> Tensor:
    """The lag table (k_h, f, k_h, f), f = C·k_w, of a padded input (B, C, H, W), fp32.

    Entry [i, :, d, :] is the Gram block of kernel rows ``i`` and ``i + d`` over every window of
    the input (features: channel, kernel column); entries with ``i + d ≥ k_h`` are unused. Tables
    of several inputs add up; ``gram_from_lags`` turns a table into the Gram. Dilation 1, one
    group (the caller pads and splits groups). ``rows_per_product``: see ``ROWS_PER_PRODUCT``.
    """
    (kh, _), (sh, _) = kernel, stride
    p_out = (xpad.shape[2] - kh) // sh + 1
    m = rows_per_product
    z = _width_windows(xpad, kernel, stride, m)
    f, k = z.shape[1], z.shape[2]
    products = (z.shape[0] - kh + 1) // m
    # Product g: rows m·g … m·g + m − 1 against rows m·g … m·g + m + k_h − 2.
    left = z[: m * products].view(products, m * f, k)
    right = z.as_strided((products, (m + kh - 1) * f, k), (m * f * k, k, 1))
    pairs = torch.bmm(left, right.mT)  # (products, m·f, (m + k_h − 1)·f)
    # per_row[h, :, d] = Z[h] Z[h + d]ᵀ for h = m·g + e: rows e·f … of product g from column
    # block e on (row e of a product starts its lags at block e). One strided view, one copy.
    cols = (m + kh - 1) * f
    per_row = pairs.as_strided(
        (products, m, f, kh, f), (m * f * cols, f * cols + f, cols, f, 1)
    ).reshape(products * m, f, kh, f)
    # Kernel row i of the P windows reads rows i, i + s, …, i + s·(P − 1): a strided view too.
    s_row, s_a, s_d, s_b = per_row.stride()  # a view when products == 1, else contiguous
    windows = per_row.as_strided((kh, p_out, f, kh, f), (s_row, sh * s_row, s_a, s_d, s_b))
    return windows.sum(1)


def gram_from_lags(table: Tensor, channels: int) -> Tensor:
    """The Gram (n, n) of a lag table (k_h, C·k_w, k_h, C·k_w), in the layer's (C, k_h, k_w)
    feature order: block (i, i') is entry [i, :, i' − i] above the diagonal, mirrored below."""
    table = table.contiguous()
    kh, f = table.shape[0], table.shape[1]
    kw = f // channels
    s0, s1, s2, s3 = table.stride()
    # upper[i, :, i', :] = table[i, :, i' − i, :]; entries with i' < i read other rows and are
    # replaced by the mirror below.
    upper = table.as_strided((kh, f, kh, f), (s0 - s2, s1, s2, s3))
    index = torch.arange(kh, device=table.device)
    above = (index[None, :] >= index[:, None])[:, None, :, None]
    blocks = torch.where(above, upper, upper.permute(2, 3, 0, 1))
    # [i, (c, j), i', (c', j')] -> [(c, i, j), (c', i', j')]
    blocks = blocks.reshape(kh, channels, kw, kh, channels, kw)
    n = channels * kh * kw
    return blocks.permute(1, 0, 2, 4, 3, 5).reshape(n, n)


def conv2d_gram(xpad: Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """Gram (n, n) of the rows of a padded input (B, C, H, W), n = C·k_h·k_w, fp32 in, fp32 out.

    Rows and features are those of ``unfold.rows`` for a Conv2d with this kernel and stride,
    dilation 1 and one group (the caller pads and splits groups).
    """
    return gram_from_lags(conv2d_lags(xpad, kernel, stride), xpad.shape[1])


def conv2d_bytes_per_image(
    shape: tuple[int, ...], kernel: tuple[int, int], stride: tuple[int, int]
) -> int:
    """Bytes ``conv2d_lags`` materialises per image of padded shape (C, H, W), for chunking:
    the padded image and its width windows."""
    channels, height, width = shape
    (kh, kw), (_, sw) = kernel, stride
    q_out = (width - kw) // sw + 1
    rows = height + kh + ROWS_PER_PRODUCT
    return 4 * channels * (height * width + rows * kw * q_out)


#: Height of the row strips of ``add_upper_``: tall enough for efficient products, small enough
#: that the strips skip much of the lower triangle.
STRIP = 128


def add_upper_(out: Tensor, rows: Tensor) -> None:
    """Add the upper triangle (and diagonal blocks) of xᵀx per group to ``out`` (groups, n, n).

    xᵀx is symmetric, so strip ``[a, b)`` of its rows is only needed from column ``a`` on: one
    product per strip skips the blocks left of the diagonal, about half the work for wide rows.
    ``mirror_upper`` then fills the lower triangle. ``rows``: (groups, r, n), fp32. Products are
    2-D per group: a batched product copies operands whose batch stride is not a whole matrix
    (the rows of one group are a transposed view, batch stride n).
    """
    n = rows.shape[-1]
    for g in range(rows.shape[0]):
        x = rows[g]
        for a in range(0, n, STRIP):
            b = min(n, a + STRIP)
            out[g, a:b, a:].addmm_(x[:, a:b].T, x[:, a:])


def mirror_upper(out: Tensor) -> Tensor:
    """The symmetric matrices whose upper triangles are those of ``out`` (groups, n, n)."""
    return torch.triu(out) + torch.triu(out, 1).mT
