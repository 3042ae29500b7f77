"""Fast, exact Gram kernels xᵀx for the rows of a first layer's input.

``conv2d_gram`` serves 2-D convolutions with overlapping windows (kernel larger than stride, e.g.
a ResNet stem) without materialising the unfolded input. Row offset ``i`` of the kernel at output
row ``p`` reads padded input row ``s·p + i``. Split the padded rows into ``s`` phases
(``h = s·u + φ``): offset ``i = φ + s·t`` reads row ``u = p + t`` of phase ``φ``. So the block of
the Gram between kernel rows ``i`` and ``i'`` is a sum over a window of ``P`` consecutive phase
rows of per-row products, and one batched product per (phase, phase, lag) serves every kernel-row
pair with that lag. Each Gram entry is still a plain sum of the same fp32 products (only the
order of summation changes), so the result is exact up to fp32 rounding. Work: about
s·k·(C·k)² multiply-adds per row (one product per phase pair and lag) instead of (C·k²)² for the
unfolded Gram (a 7×7/2 stem: 13·21² instead of 147²), and the only copy is the input with its
windows unfolded along the width (k/s times the input instead of k²/s²).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _phase_rows(xpad: Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """Width-unfolded rows by phase: (s_h, U, B·Q, k_w·C), features (kernel column, channel).

    Entry [φ, u, b·Q + q] holds, for padded input row ``s_h·u + φ`` of image ``b``, the window of
    output column ``q``. Rows past the input are zero; no window used by the layer reads them.
    """
    (kh, kw), (sh, sw) = kernel, stride
    batch, channels, height, width = xpad.shape
    p_out = (height - kh) // sh + 1
    q_out = (width - kw) // sw + 1
    u_rows = math.ceil((sh * (p_out - 1) + kh) / sh)
    used_w = sw * (q_out - 1) + kw
    xpad = xpad[:, :, : u_rows * sh, :used_w]
    if xpad.shape[2] < u_rows * sh:
        xpad = torch.nn.functional.pad(xpad, (0, 0, 0, u_rows * sh - xpad.shape[2]))
    # (B, C, U, s_h, W) -> channels last by phase: (s_h, U, B, W, C), one copy of the input.
    phased = xpad.reshape(batch, channels, u_rows, sh, used_w).permute(3, 2, 0, 4, 1).contiguous()
    # A window of output column q is kw·C consecutive floats starting at q·s_w·C.
    windows = phased.as_strided(
        (sh, u_rows, batch, q_out, kw * channels),
        (u_rows * batch * used_w * channels, batch * used_w * channels, used_w * channels,
         sw * channels, 1),
    )  # fmt: skip
    return windows.reshape(sh, u_rows, batch * q_out, kw * channels)


def conv2d_gram(xpad: Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """Gram (n, n) of the rows of a padded input (B, C, H, W), n = C·k_h·k_w, fp32 in, fp32 out.

    Rows and features are those of ``unfold.rows`` for a Conv2d with this kernel and stride,
    dilation 1 and one group (the caller pads and splits groups).
    """
    (kh, kw), (sh, _) = kernel, stride
    channels = xpad.shape[1]
    p_out = (xpad.shape[2] - kh) // sh + 1
    zp = _phase_rows(xpad, kernel, stride)
    f = zp.shape[-1]
    blocks = xpad.new_empty(kh, kh, f, f)  # [i, i'] = Σ rows(kernel row i)ᵀ rows(kernel row i')
    offsets = [range(phase, kh, sh) for phase in range(sh)]  # kernel rows of each phase
    for a in range(sh):
        for b in range(a, sh):
            _phase_pair(zp, blocks, a, b, len(offsets[a]), len(offsets[b]), p_out, sh)
    # [i, i', j, c, j', c'] -> [(c, i, j), (c', i', j')]
    blocks = blocks.reshape(kh, kh, kw, channels, kw, channels)
    n = channels * kh * kw
    return blocks.permute(3, 0, 2, 5, 1, 4).reshape(n, n)


def _phase_pair(
    zp: Tensor, blocks: Tensor, a: int, b: int, ta: int, tb: int, p_out: int, sh: int
) -> None:
    """Fill the blocks of kernel rows ``a + s·t`` × ``b + s·t'`` (and their transposes).

    For each lag d = t' − t, one batched product gives the per-phase-row products over all rows
    any window with that lag touches; each block is the sum of its own window of ``p_out`` rows.
    """
    for lag in range(-(ta - 1), tb):
        if a == b and lag < 0:
            continue  # the transposes of lag > 0
        ts = [t for t in range(ta) if 0 <= t + lag < tb]
        if not ts:
            continue
        lo, hi = ts[0], ts[-1] + p_out
        per_row = torch.bmm(zp[a, lo:hi].mT, zp[b, lo + lag : hi + lag])
        for t in ts:
            block = per_row[t - lo : t - lo + p_out].sum(0)
            i, j = a + sh * t, b + sh * (t + lag)
            blocks[i, j] = block
            blocks[j, i] = block.T


def conv2d_gram_bytes_per_image(
    shape: tuple[int, ...], kernel: tuple[int, int], stride: tuple[int, int]
) -> int:
    """Bytes ``conv2d_gram`` materialises per image of padded shape (C, H, W), for chunking."""
    channels, height, width = shape
    (_, kw), (sh, sw) = kernel, stride
    q_out = (width - kw) // sw + 1
    rows = sh * math.ceil(height / sh + 1)
    return 4 * rows * channels * (2 * width + q_out * kw)


#: Height of the row strips of ``add_upper_``: tall enough for efficient products, small enough
#: that the strips skip much of the lower triangle.
STRIP = 128


def add_upper_(out: Tensor, rows: Tensor) -> None:
    """Add the upper triangle (and diagonal blocks) of xᵀx per group to ``out`` (groups, n, n).

    xᵀx is symmetric, so strip ``[a, b)`` of its rows is only needed from column ``a`` on: one
    product per strip skips the blocks left of the diagonal, about half the work for wide rows.
    ``mirror_upper`` then fills the lower triangle. ``rows``: (groups, r, n), fp32.
    """
    n = rows.shape[-1]
    for a in range(0, n, STRIP):
        b = min(n, a + STRIP)
        out[:, a:b, a:].baddbmm_(rows[:, :, a:b].mT, rows[:, :, a:])


def mirror_upper(out: Tensor) -> Tensor:
    """The symmetric matrices whose upper triangles are those of ``out`` (groups, n, n)."""
    return torch.triu(out) + torch.triu(out, 1).mT
