"""The slow, obviously right versions the tests compare against.

Nothing here imports ``tract_optim``:

- ``unfold_rows``: a Linear's or convolution's input rows (groups, r, n) in float64, by
  convolving with one-hot weights (padding as torch's ``_ConvNd._conv_forward`` does it);
  ``stacked_rows``: those of several passes, concatenated.
- ``tract_grad``: the paper's Eq. 10, G·(XᵀX/r + λI)⁻¹ per group, in float64 with
  ``torch.linalg.solve`` (LU; the library uses Cholesky, directly or in Woodbury form).
- ``condition`` and ``relative_error``: what scaled tolerances are made of. A result computed
  with unit roundoff u from data fixing M to precision u is off by about u·cond(M) relative, so
  tests bound errors by a multiple of that, never by a fixed float64-noise constant.
- ``assert_update``: a preconditioned gradient against ``tract_grad`` within
  ``per_cond``·cond(M), by default ``ERROR_PER_COND`` (the library's fp32 statistics).
- ``assert_fp32_gram``: a Gram accumulated in fp32 is within the classic dot-product bound.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CONV_FNS: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

#: Unit roundoff of float32 and float64.
U32 = 2.0**-24
U64 = 2.0**-53
#: The library's statistics are fp32 whatever the model's or the solve's dtype, so its update is
#: exact only up to fp32 rounding of the Gram, amplified by cond(M), M = XᵀX/r + λI. The worst
#: ratio error / (2⁻²⁴·cond(M)) measured over 8,000 random fp32 and fp64 cases was about 11.
ERROR_PER_COND = 32 * U32


def unfold_rows(layer: nn.Module, x: Tensor) -> Tensor:
    """Rows (groups, r, n) of a Linear's or Conv1d/2d/3d's input ``x``, in float64.

    Linear: all leading dimensions flattened. Convolution: each one-hot filter picks one
    (channel, kernel offset) entry of every patch, so output channel ``k`` at each position is
    entry ``k`` of that position's row; non-zero padding modes pad explicitly with the layer's
    own amounts first, as the layer itself does.
    """
    if isinstance(layer, nn.Linear):
        return x.double().reshape(1, -1, layer.in_features)
    assert isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    dims = len(layer.kernel_size)
    xb = x.double() if x.dim() == dims + 2 else x.double().unsqueeze(0)
    padding: Any = layer.padding
    if layer.padding_mode != "zeros":
        xb = F.pad(xb, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = 0
    per_group = layer.in_channels // layer.groups
    n = per_group * math.prod(layer.kernel_size)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, per_group, *layer.kernel_size)
    parts = []
    for g in range(layer.groups):
        channels = xb[:, g * per_group : (g + 1) * per_group]
        with warnings.catch_warnings():  # 'same' with an even kernel: a padded copy, fine here
            warnings.simplefilter("ignore", UserWarning)
            out = _CONV_FNS[dims](
                channels, eye, stride=layer.stride, padding=padding, dilation=layer.dilation
            )
        parts.append(out.movedim(1, -1).reshape(-1, n))
    return torch.stack(parts)


def stacked_rows(layer: nn.Module, xs: list[Tensor]) -> Tensor:
    """``unfold_rows`` of several passes through ``layer``, concatenated: (groups, Σr, n)."""
    return torch.cat([unfold_rows(layer, x) for x in xs], dim=1)


def damped(rows: Tensor, lam: float) -> Tensor:
    """M = XᵀX/r + λI per group (groups, n, n), float64."""
    rows = rows.double()
    eye = torch.eye(rows.shape[-1], dtype=torch.float64)
    return rows.transpose(1, 2) @ rows / rows.shape[1] + lam * eye


def tract_grad(rows: Tensor, grad: Tensor, lam: float) -> Tensor:
    """Eq. 10: G·(XᵀX/r + λI)⁻¹ per group in float64, for rows (groups, r, n) and a weight
    gradient ``grad`` (out, ...) whose output channels are split evenly over the groups.

    Returns float64 of ``grad``'s shape.
    """
    groups, _, n = rows.shape
    flat = grad.double().reshape(groups, -1, n)
    # G M⁻¹ = (M⁻¹ Gᵀ)ᵀ as M is symmetric.
    out = torch.linalg.solve(damped(rows, lam), flat.transpose(1, 2)).transpose(1, 2)
    return out.reshape(grad.shape)


def condition(rows: Tensor, lam: float) -> float:
    """The largest condition number over groups of M = XᵀX/r + λI (λ ≤ every eigenvalue)."""
    eig = torch.linalg.eigvalsh(rows.double().transpose(1, 2) @ rows.double() / rows.shape[1])
    return float(((eig[:, -1].clamp(min=0) + lam) / (eig[:, 0].clamp(min=0) + lam)).max())


def relative_error(got: Tensor, expected: Tensor) -> float:
    """max |got − expected| / max |expected| (the plain difference when ``expected`` is 0)."""
    diff = float((got.double() - expected.double()).abs().max()) if got.numel() else 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_fp32_gram(got: Tensor, rows: Tensor) -> None:
    """``got`` is an fp32 Gram of ``rows`` (groups, r, n): |got − XᵀX| ≤ γ_r·|X|ᵀ|X| entry by
    entry, γ_r = r·u/(1 − r·u), u = 2⁻²⁴ (any fp32 summation order meets it; accumulating in
    bf16/fp16 breaks it by far)."""
    rows = rows.double()
    exact = rows.transpose(-1, -2) @ rows
    r = rows.shape[-2]
    gamma = r * U32 / (1 - r * U32)
    bound = gamma * (rows.abs().transpose(-1, -2) @ rows.abs())
    assert got.dtype == torch.float32 and got.shape == exact.shape
    excess = ((got.double() - exact).abs() - bound).max().item()
    assert excess <= 0.0, f"exceeds the fp32 bound by {excess:.3g}"


def assert_update(
    got: Tensor, raw: Tensor, rows: Tensor, lam: float, *, per_cond: float = ERROR_PER_COND
) -> float:
    """``got`` is TrAct's update of the raw gradient ``raw`` for ``rows`` (groups, r, n):
    ``relative_error(got, tract_grad(rows, raw, lam)) ≤ per_cond · condition(rows, lam)``.

    An all-zero reference is refused (every linear map, no TrAct included, would pass). Returns
    the error, for reports.
    """
    assert got.shape == raw.shape, (tuple(got.shape), tuple(raw.shape))
    expected = tract_grad(rows, raw, lam)
    assert expected.abs().max() > 0, "a zero gradient would make this check vacuous"
    cond = condition(rows, lam)
    error = relative_error(got, expected)
    assert error <= per_cond * cond, f"relative error {error:.3g}, cond {cond:.3g}"
    return error
