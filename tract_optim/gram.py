"""Fast, exact Gram kernels xᵀx for the rows of a first layer's input.

``conv2d_lags`` serves 2-D convolutions with overlapping windows (kernel larger than stride, e.g.
a ResNet stem) without materialising the unfolded input. Unfold the input along the width only:
padded row ``h`` becomes ``Z[h]``, a (C·k_w) × (B·Q) matrix of width windows (Q output
columns). Kernel row ``i`` at output row ``p`` reads ``Z[s·p + i]``, so the Gram block of kernel
rows ``i`` and ``i + d`` is ``Σ_p Z[s·p + i] Z[s·p + i + d]ᵀ``: a sum, over a window of rows, of
per-row products that depend only on the row and the lag ``d``. One batched product computes
every row's products with its next ``k_h`` rows (all lags at once: ``Z`` is stored row-major, so
rows ``h … h + k_h − 1`` are one strided view), and each block is a strided sum of them. Each Gram
entry is still a plain sum of the same products (only the order of summation changes), so the
result is exact up to the rounding of its dtype. Work: about k_h·(C·k_w)² multiply-adds per
padded row and output column instead of (C·k_h·k_w)² per output position (a 7×7/2 stem: 2 rows
of 7·21² instead of 147², 3.5× less). Copies: the input split into its column stride phases,
padding included (once), and the width-unfolded rows (k_w/s_w times the input, a band of rows at
a time), never the k_h·k_w/(s_h·s_w) times larger unfolded input.

Both kernels take a ``precision``: ``"fp32"`` multiplies the fp32 values (CUDA cores on a GPU);
``"bf16x3"`` and ``"tf32x3"`` compute every product a·b of the Gram as a_hi·b_hi + a_hi·b_lo +
a_lo·b_hi from parts exact in bfloat16 or TF32 (``split_parts``), products that GPUs run on tensor
cores, summed in fp32 (``add_split_product_``). The dropped a_lo·b_lo and the rounding of the low
parts leave a relative error of about 2⁻¹⁶ (bf16) or 2⁻²² (TF32) per product, against 2⁻⁸ or
2⁻¹¹ for a single low-precision product. Off CUDA the same parts are multiplied in fp32, which
is exact for them (a product of two bf16 or TF32 significands fits in fp32's), so a CPU run
computes the sums the tensor cores compute, up to the order and rounding of the fp32 sums.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor

#: How the products of a Gram are computed (see the module docstring).
Precision = Literal["fp32", "bf16x3", "tf32x3"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16x3", "tf32x3")


def round_tf32(x: Tensor) -> Tensor:
    """fp32 ``x`` rounded to TF32 (10 explicit mantissa bits, to nearest, ties to even), as fp32.

    TF32 keeps fp32's exponent, so rounding only clears the 13 low mantissa bits of the integer
    view after adding half a unit of the last kept bit (less one unless that bit is odd: ties go
    to even). A carry into the exponent is the right result (the next binade, or infinity above
    the largest TF32 value). NaNs are returned as they are: the addition could carry their
    mantissa into the sign bit.
    """
    bits = x.view(torch.int32)
    rounded = (bits + (0xFFF + ((bits >> 13) & 1))) & ~0x1FFF
    return torch.where(x.isnan(), x, rounded.view(torch.float32))


def _round_bf16(x: Tensor) -> Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


def split_parts(x: Tensor, precision: Literal["bf16x3", "tf32x3"]) -> tuple[Tensor, Tensor]:
    """fp32 ``x`` as fp32 parts (hi, lo) whose values are exact in bfloat16 (``"bf16x3"``) or
    TF32 (``"tf32x3"``): hi is ``x`` rounded, lo is ``x − hi`` rounded.

    ``x − hi`` is exact in fp32 (hi is within a factor of two of ``x``), so ``x − hi − lo`` is
    only lo's rounding error: at most 2⁻¹⁶·|x| for bfloat16 (8 significant bits each) and
    2⁻²²·|x| for TF32 (11 each).
    """
    rounded = _round_bf16 if precision == "bf16x3" else round_tf32
    hi = rounded(x)
    return hi, rounded(x - hi)


def _operands(x: Tensor, precision: Literal["bf16x3", "tf32x3"]) -> tuple[Tensor, Tensor]:
    """``split_parts`` as ``add_split_product_`` reads them: bfloat16 tensors for ``"bf16x3"``
    on CUDA (exact: they hold bfloat16 values), fp32 otherwise."""
    hi, lo = split_parts(x, precision)
    if x.is_cuda and precision == "bf16x3":
        return hi.to(torch.bfloat16), lo.to(torch.bfloat16)
    return hi, lo


@contextmanager
def _tf32_matmul(enabled: bool) -> Iterator[None]:
    """fp32 CUDA matrix products inside run on TF32 tensor cores, if ``enabled``.

    Sets ``torch.backends.cuda.matmul.fp32_precision`` (torch ≥ 2.9) and restores it on exit: a
    process-wide flag, so fp32 products other threads run meanwhile may use TF32 too. Exact for
    operands that ``split_parts`` already rounded to TF32, however the hardware converts fp32.
    """
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def add_products_(
    out: Tensor, pairs: Sequence[tuple[Tensor, Tensor]], precision: Literal["bf16x3", "tf32x3"]
) -> None:
    """Add the sum of left·right over ``pairs`` (2-D or batched matrix products of parts from
    ``_operands``) to the fp32 ``out``.

    On CUDA: bfloat16 tensor-core products with fp32 outputs (the ``out_dtype`` of
    ``torch.mm``/``torch.bmm``) for ``"bf16x3"``, TF32 tensor-core products for ``"tf32x3"``;
    elsewhere fp32 products of the fp32 parts, which are exact, summed in fp32.
    """
    if pairs[0][0].dtype == torch.bfloat16:
        mm = torch.mm if out.dim() == 2 else torch.bmm
        for left, right in pairs:
            out += mm(left, right, torch.float32)
        return
    add_ = out.addmm_ if out.dim() == 2 else out.baddbmm_
    with _tf32_matmul(out.is_cuda and precision == "tf32x3"):
        for left, right in pairs:
            add_(left, right)


def add_split_product_(
    out: Tensor,
    a: tuple[Tensor, Tensor],
    b: tuple[Tensor, Tensor],
    precision: Literal["bf16x3", "tf32x3"],
) -> None:
    """Add a_hi·b_hi + a_hi·b_lo + a_lo·b_hi to the fp32 ``out``: the matrix product (2-D or
    batched) of a = a_hi + a_lo and b = b_hi + b_lo less a_lo·b_lo (``add_products_``)."""
    (a_hi, a_lo), (b_hi, b_lo) = a, b
    add_products_(out, ((a_hi, b_hi), (a_hi, b_lo), (a_lo, b_hi)), precision)


#: Input rows per product of ``conv2d_lags``: two rows against their next k_h + 1 rows make the
#: products twice as tall for (k_h + 1)/k_h of the work, which GEMM kernels run faster than
#: products only C·k_w rows tall (3 or 4 rows were slower; BENCHMARKS.md has the measurements).
ROWS_PER_PRODUCT = 2


def conv2d_lags(
    x: Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    rows_per_product: int = ROWS_PER_PRODUCT,
    band_bytes: int | None = None,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    precision: Precision = "fp32",
) -> Tensor:
    """The lag table (k_h, f, k_h, f), f = C·k_w, of an input (B, C, H, W) padded with zeros by
    ``padding`` (top, bottom, left, right), in ``x``'s dtype (fp32 for split ``precision``).

    Entry [i, :, d, :] is the Gram block of kernel rows ``i`` and ``i + d`` over every window of
    the input (features: channel, kernel column); entries with ``i + d ≥ k_h`` are unused. Tables
    of several inputs add up; ``gram_from_lags`` turns a table into the Gram. Dilation 1, one
    group (the caller splits groups). ``rows_per_product``: see ``ROWS_PER_PRODUCT``.

    The padded input is first split by column into its s_w stride phases (one copy of the
    input, padding included), so that every width window is a run of consecutive floats of one
    phase: unfolding then copies runs instead of gathering every s_w-th float. ``band_bytes``
    bounds the width-unfolded rows held at once (None: all). They are unfolded a band at a time
    into one buffer; the k_h − 1 rows a band shares with the next are moved to the buffer's top
    rather than unfolded again. Every product contracts over the whole batch (B·Q columns),
    which GEMM kernels run faster than the short products of batch chunks.

    Split precisions split the input once (``split_parts``) and unfold each part as above (two
    sets of copies; ``band_bytes`` bounds each part's rows); every product becomes three
    (``add_split_product_``). Negative lags are not formed, so the two cross terms cannot be one
    product and its transpose.
    """
    (kh, kw), (sh, sw) = kernel, stride
    top, bottom, left, right = padding
    batch, channels = x.shape[0], x.shape[1]
    height, width = x.shape[2] + top + bottom, x.shape[3] + left + right
    p_out, q_out = (height - kh) // sh + 1, (width - kw) // sw + 1
    m = rows_per_product
    used = sh * (p_out - 1) + kh  # padded rows some window reads
    products = -(-used // m)  # product g: rows m·g … m·g + m − 1 against m·g … m·g + m + k_h − 2
    f, k = channels * kw, batch * q_out
    per_band = products
    if band_bytes is not None:
        fits = (band_bytes // (f * k * x.element_size()) - (kh - 1)) // m
        # at least k_h − 1 rows a band, so that the rows carried to the next never overlap
        per_band = max(1, -(-(kh - 1) // m), min(products, fits))
    parts = (x,) if precision == "fp32" else _operands(x, precision)
    phases = [_phases(p, sw, padding, used, q_out + (kw - 1) // sw, min(sw, kw)) for p in parts]
    zs = [p.new_empty(m * per_band + kh - 1, f, k) for p in parts]
    per_row = x.new_empty(m * products, f, kh, f)
    cols = (m + kh - 1) * f
    carried = 0  # rows at the top of each ``z`` already holding the band's first input rows
    for first in range(0, products, per_band):
        count = min(products, first + per_band) - first
        start, need = m * first, m * count + kh - 1
        for z, part_phases in zip(zs, phases, strict=True):
            _unfold_rows_into(z[carried:need], part_phases, start + carried, kw, q_out)
        lhs = [z[: m * count].view(count, m * f, k) for z in zs]
        rhs = [z.as_strided((count, cols, k), (m * f * k, k, 1)).mT for z in zs]
        if precision == "fp32":
            pairs = torch.bmm(lhs[0], rhs[0])  # (count, m·f, (m + k_h − 1)·f)
        else:
            pairs = x.new_zeros(count, m * f, cols)
            add_split_product_(pairs, (lhs[0], lhs[1]), (rhs[0], rhs[1]), precision)
        # per_row[h, :, d] = Z[h] Z[h + d]ᵀ for h = m·g + e: rows e·f … of product g from column
        # block e on (row e of a product starts its lags at block e).
        per_row[start : start + m * count].view(count, m, f, kh, f).copy_(
            pairs.as_strided((count, m, f, kh, f), (m * f * cols, f * cols + f, cols, f, 1))
        )
        if first + count < products:
            carried = kh - 1
            for z in zs:
                z[:carried].copy_(z[m * count : m * count + carried])
    # Kernel row i of the P windows reads rows i, i + s, …, i + s·(P − 1): a strided view.
    s_h, s_a, s_d, s_b = per_row.stride()
    return per_row.as_strided((kh, p_out, f, kh, f), (s_h, sh * s_h, s_a, s_d, s_b)).sum(1)


def _phases(
    x: Tensor,
    sw: int,
    padding: tuple[int, int, int, int],
    rows: int,
    width: int,
    count: int,
) -> Tensor:
    """The first ``rows`` rows of the zero-padded ``x``, split into its first ``count`` column
    phases: (rows, C, count, B, width), entry [h, c, φ, b, u] = padded column s_w·u + φ."""
    top, _, left, _ = padding
    batch, channels, in_height, in_width = x.shape
    out = x.new_empty(rows, channels, count, batch, width)
    h0, h1 = top, min(rows, top + in_height)
    # zeros where the padding is: rows above and below the input, columns left and right
    out[: min(h0, rows)].zero_()
    out[max(h1, h0) :].zero_()
    for phase in range(count):
        # padded column s_w·u + φ is input column s_w·u + φ − left
        u0 = max(0, -(-(left - phase) // sw))
        u1 = min(width, (in_width - 1 + left - phase) // sw + 1)
        if u1 <= u0 or h1 <= h0:
            out[h0:h1, :, phase].zero_()
            continue
        out[h0:h1, :, phase, :, :u0].zero_()
        out[h0:h1, :, phase, :, u1:].zero_()
        column = sw * u0 + phase - left
        source = x[:, :, : h1 - h0, column : column + sw * (u1 - u0) : sw]
        out[h0:h1, :, phase, :, u0:u1].copy_(source.permute(2, 1, 0, 3))
    return out


def _unfold_rows_into(z: Tensor, phases: Tensor, start: int, kw: int, q_out: int) -> None:
    """Width windows of padded rows ``start`` … ``start + len(z) − 1`` into ``z`` (rows, C·k_w,
    B·Q), from ``phases`` (``_phases``); rows past the phases' (read by no window) are zero."""
    stop = min(start + z.shape[0], phases.shape[0])
    rows, count = max(stop - start, 0), phases.shape[2]
    if rows:
        _, channels, _, batch, _ = phases.shape
        windows = z[:rows].view(rows, channels, kw, batch, q_out)
        for phase in range(count):
            # kernel columns φ, φ + s_w, …: phase φ at offsets 0, 1, …, a run of Q floats each
            runs = phases[start:stop, :, phase].unfold(-1, q_out, 1)  # (rows, C, B, offset, Q)
            offsets = len(range(phase, kw, count))
            windows[:, :, phase::count].copy_(runs[:, :, :, :offsets].permute(0, 1, 3, 2, 4))
    z[rows:].zero_()


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


#: Height of the row strips of ``add_upper_``: tall enough for efficient products, small enough
#: that the strips skip much of the lower triangle.
STRIP = 128


def add_upper_(out: Tensor, rows: Tensor, precision: Precision = "fp32") -> None:
    """Add the upper triangle (and diagonal blocks) of xᵀx per group to ``out`` (groups, n, n).

    xᵀx is symmetric, so strip ``[a, b)`` of its rows is only needed from column ``a`` on: one
    product per strip skips the blocks left of the diagonal, about half the work for wide rows.
    ``mirror_upper`` then fills the lower triangle. ``rows``: (groups, r, n), fp32. Products are
    2-D per group: a batched product copies operands whose batch stride is not a whole matrix
    (the rows of one group are a transposed view, batch stride n).

    Split precisions split each group's rows (two more copies of them) and add hiᵀhi by strips
    and the cross terms hiᵀlo + loᵀhi = S + Sᵀ, S = hiᵀlo, from one full product: a strip of
    S + Sᵀ needs S above and below the diagonal, so two strip products per strip would do more
    work than S (all of it for n ≤ ``STRIP``, 17 % more for n = 768). The lower triangle of
    ``out`` gets the cross terms too; ``mirror_upper`` ignores it.
    """
    n = rows.shape[-1]
    for g in range(rows.shape[0]):
        x = rows[g]
        if precision == "fp32":
            for a in range(0, n, STRIP):
                b = min(n, a + STRIP)
                out[g, a:b, a:].addmm_(x[:, a:b].T, x[:, a:])
            continue
        hi, lo = _operands(x, precision)
        for a in range(0, n, STRIP):
            b = min(n, a + STRIP)
            add_products_(out[g, a:b, a:], ((hi[:, a:b].T, hi[:, a:]),), precision)
        cross = out.new_zeros(n, n)
        add_products_(cross, ((hi.T, lo),), precision)
        out[g] += cross
        out[g] += cross.T


def mirror_upper(out: Tensor) -> Tensor:
    """The symmetric matrices whose upper triangles are those of ``out`` (groups, n, n)."""
    return torch.triu(out) + torch.triu(out, 1).mT
