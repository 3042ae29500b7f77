"""Split-precision Grams (``precision="bf16x3"``/``"tf32x3"``) against float64 built here.

The references use nothing from ``tract_optim`` but ``split_parts`` where a test is about the
parts: rows come from ``F.unfold`` (or a reshape, for Linear) in float64. Four claims:

- the rounding helpers round to nearest, ties to even, and the parts add up to the input within
  u² (u: unit roundoff of the parts' format, 2⁻⁸ for bfloat16, 2⁻¹¹ for TF32);
- the kernels compute exactly hiᵀhi + hiᵀlo + loᵀhi of the rows' parts (inputs built so that
  every fp32 sum is exact), through every path of ``unfold.gram``;
- the Gram is within 3u² + u⁴ of xᵀx relative to |X|ᵀ|X| (the splitting) plus fp32 sums;
- TrAct's update G·(XᵀX/r + λI)⁻¹ from the split Gram is within 2e-5 of the float64 one on
  standardised and [0, 1] inputs, where one bfloat16 product is not.
"""

from __future__ import annotations

import math
from typing import Literal
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from tract_optim import TrActOptimizer, gram, unfold

SETTINGS = settings(max_examples=40, deadline=None)
Split = Literal["bf16x3", "tf32x3"]
SPLITS: tuple[Split, ...] = ("bf16x3", "tf32x3")
#: Significant bits (implicit one included) and unit roundoff of each scheme's parts.
BITS = {"bf16x3": 8, "tf32x3": 11}
UNIT = {p: 2.0 ** -BITS[p] for p in SPLITS}
#: What TrAct's update may differ by from float64, relative (the issue's target).
UPDATE_TOLERANCE = 2e-5
#: Room for the fp32 sums of a Gram of these sizes, relative to its largest entry (16 ulps).
FP32_SUMS = 2.0**-20


def rows64(layer: nn.Module, x: Tensor) -> Tensor:
    """Rows (groups, r, n) of a Linear's or Conv2d's (zero padding) input, in float64."""
    if isinstance(layer, nn.Linear):
        return x.double().reshape(1, -1, layer.in_features)
    assert isinstance(layer, nn.Conv2d) and isinstance(layer.padding, tuple)
    per_group = layer.in_channels // layer.groups
    groups = []
    for g in range(layer.groups):
        part = x.double()[:, g * per_group : (g + 1) * per_group]
        cols = F.unfold(
            part, layer.kernel_size, layer.dilation, layer.padding, layer.stride
        )  # (B, C·k_h·k_w, positions)
        groups.append(cols.transpose(1, 2).reshape(-1, cols.shape[1]))
    return torch.stack(groups)


def gram64(rows: Tensor, other: Tensor | None = None) -> Tensor:
    """XᵀY per group in float64 (XᵀX without ``other``)."""
    other = rows if other is None else other
    return rows.double().transpose(1, 2) @ other.double()


def relative(got: Tensor, expected: Tensor) -> float:
    """max |got − expected| / max |expected|."""
    return float((got.double() - expected).abs().max() / expected.abs().max())


def update(a: Tensor, r: int, grad: Tensor, lam: float) -> Tensor:
    """G·(A/r + λI)⁻¹ in float64 (A symmetric, one group)."""
    m = a.double() / r + lam * torch.eye(a.shape[0], dtype=torch.float64)
    return torch.linalg.solve(m, grad.T).T


def round_reference(value: float, bits: int) -> float:
    """A float32 value rounded to ``bits`` significant bits (fp32's exponent range, subnormals
    with fp32's smallest exponent), to nearest, ties to even, in Python floats."""
    if value == 0 or not math.isfinite(value):
        return value
    _, exponent = math.frexp(value)  # value = m·2^e, 1/2 ≤ |m| < 1
    quantum = 2.0 ** (max(exponent, -125) - bits)  # -125: frexp exponent of 2⁻¹²⁶
    rounded = round(value / quantum) * quantum  # round() on a float: ties to even
    return math.copysign(math.inf, value) if abs(rounded) >= 2.0**128 else rounded


# -- the rounding helpers -----------------------------------------------------------------------


def _floats(bit_patterns: list[int]) -> Tensor:
    """fp32 values with the given bit patterns: every sign, exponent, subnormals, inf, NaN."""
    return torch.from_numpy(np.array(bit_patterns, dtype=np.uint32).view(np.float32).copy())


@SETTINGS
@given(
    bit_patterns=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64),
    columns=st.integers(1, 4),
)
def test_round_tf32_is_nearest_ties_to_even(bit_patterns: list[int], columns: int) -> None:
    """Every fp32 value (any shape, also a transposed view): 13 low bits clear, equal to the
    float64 rounding to 11 significant bits, idempotent, exact on TF32 values; NaN stays NaN."""
    x = _floats(bit_patterns * columns).reshape(columns, -1).T  # strided
    got = gram.round_tf32(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    nan = x.isnan()
    assert torch.equal(got.isnan(), nan)
    finite = got[~nan]
    assert not (finite.view(torch.int32) & 0x1FFF).any()
    expected = [round_reference(v, 11) for v in x[~nan].tolist()]
    assert finite.tolist() == expected
    assert torch.equal(gram.round_tf32(finite), finite)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1 + 2**-11, 1.0),  # tie, last kept bit even: down
        (1 + 3 * 2**-11, 1 + 2**-9),  # tie, last kept bit odd: up
        (1 + 2**-11 + 2**-23, 1 + 2**-10),  # just above a tie: up
        (-(1 + 3 * 2**-11), -(1 + 2**-9)),  # symmetric in the sign
        (2 - 2**-23, 2.0),  # carry into the exponent
        (float(np.finfo(np.float32).max), math.inf),  # above the largest TF32 value
    ],
)
def test_round_tf32_cases(value: float, expected: float) -> None:
    """Ties, a carry into the next binade and overflow, by hand."""
    assert gram.round_tf32(torch.tensor([value])).item() == expected


@SETTINGS
@given(
    precision=st.sampled_from(SPLITS),
    values=st.lists(
        st.floats(2.0**-100, 2.0**100, width=32) | st.floats(-(2.0**100), -(2.0**-100), width=32),
        min_size=1,
        max_size=48,
    ),
    columns=st.integers(1, 3),
)
def test_split_parts_add_up(precision: Split, values: list[float], columns: int) -> None:
    """hi is x rounded (bf16: ``.to(torch.bfloat16)``), lo is x − hi rounded, both exact in the
    format, x − hi exact in fp32, and |x − hi − lo| ≤ u²·|x|."""
    x = torch.tensor(values * columns, dtype=torch.float32).reshape(columns, -1).T
    hi, lo = gram.split_parts(x, precision)
    if precision == "bf16x3":
        assert torch.equal(hi, x.to(torch.bfloat16).float())
        assert torch.equal(lo, (x - hi).to(torch.bfloat16).float())
    for part in (hi, lo):
        assert part.dtype == torch.float32
        assert torch.equal(gram.split_parts(part, precision)[0], part)
    assert torch.equal((x - hi).double(), x.double() - hi.double())
    rest = (x.double() - hi.double() - lo.double()).abs()
    assert (rest <= UNIT[precision] ** 2 * x.double().abs()).all()


# -- the kernels compute exactly the three products ---------------------------------------------


def exact_parts(shape: tuple[int, ...], precision: Split, seed: int) -> tuple[Tensor, Tensor]:
    """Parts of values whose split is (hi, lo): hi = ±5 … ±7 and lo = k·2^-(bits+1), |k| ≤ 7,
    so hi + lo stays in hi's binade [4, 8), less than half a unit of hi's last bit from hi. Every
    product of parts is a multiple of 2^-(bits+1) below 50, so fp32 sums of up to
    2^(23 − bits)/50 of them are exact."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    hi = (sign * torch.randint(5, 8, shape, generator=g)).float()
    lo = torch.randint(-7, 8, shape, generator=g).float() * 2.0 ** -(BITS[precision] + 1)
    return hi, lo


def exact_rows(precision: Split) -> int:
    """Rows whose three-product Gram ``exact_parts`` keeps exact in fp32."""
    return 2 ** (23 - BITS[precision]) // 50


@SETTINGS
@given(
    precision=st.sampled_from(SPLITS),
    batched=st.booleans(),
    sizes=st.tuples(st.integers(1, 9), st.integers(1, 40), st.integers(1, 9)),
    seed=st.integers(0, 2**16),
)
def test_add_split_product_is_the_three_products(
    precision: Split, batched: bool, sizes: tuple[int, int, int], seed: int
) -> None:
    """out += a_hi·b_hi + a_hi·b_lo + a_lo·b_hi exactly, a_lo·b_lo left out, into a strided
    ``out`` that already holds values; 2-D and batched."""
    m, k, n = sizes
    lead = (2,) if batched else ()
    a_hi, a_lo = exact_parts((*lead, m, k), precision, seed)
    b_hi, b_lo = exact_parts((*lead, n, k), precision, seed + 1)
    b_hi, b_lo = b_hi.mT, b_lo.mT  # transposed operands, as the kernels pass them
    base = torch.randint(-9, 10, (*lead, n, m)).float()
    out = base.clone().mT
    gram.add_split_product_(out, (a_hi, a_lo), (b_hi, b_lo), precision)
    a_hi, a_lo, b_hi, b_lo = (t.double() for t in (a_hi, a_lo, b_hi, b_lo))
    expected = base.double().mT + a_hi @ b_hi + a_hi @ b_lo + a_lo @ b_hi
    assert torch.equal(out.double(), expected)


@st.composite
def layers_and_parts(draw: st.DrawFn) -> tuple[nn.Module, Tensor, Tensor, Split]:
    """A Linear or Conv2d (overlapping windows, patches, dilated, grouped) and the (hi, lo)
    parts of an input for it, with few enough rows for exact sums."""
    precision = draw(st.sampled_from(SPLITS))
    kind = draw(st.sampled_from(["linear", "conv", "patch"]))
    seed = draw(st.integers(0, 2**16))
    if kind == "linear":
        n = draw(st.sampled_from([1, 5, gram.STRIP + 3]))
        layer: nn.Module = nn.Linear(n, 2)
        shape: tuple[int, ...] = (draw(st.integers(1, 3)), draw(st.integers(1, 6)), n)
    else:
        groups = draw(st.integers(1, 2))
        channels = groups * draw(st.integers(1, 2))
        kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
        if kind == "patch":
            stride, padding, dilation = kernel, (0, 0), (1, 1)
        else:
            stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
            padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
            dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        layer = nn.Conv2d(channels, groups, kernel, stride, padding, dilation, groups)
        span = [d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True)]
        size = [s + draw(st.integers(0, 6)) for s in span]
        shape = (draw(st.integers(1, 2)), channels, *size)
    hi, lo = exact_parts(shape, precision, seed)
    return layer, hi, lo, precision


@SETTINGS
@given(case=layers_and_parts(), chunk_bytes=st.sampled_from([1, 3000, None]))
def test_gram_is_exactly_the_three_products_of_the_parts(
    case: tuple[nn.Module, Tensor, Tensor, Split], chunk_bytes: int | None
) -> None:
    """``unfold.gram`` with a split precision, through the strip products (Linear, patches,
    dilated convolutions) and the lag kernel (overlapping windows), in one chunk and band or
    many: exactly HᵀH + HᵀL + LᵀH for the rows H of hi and L of lo."""
    layer, hi, lo, precision = case
    x = hi + lo
    split_hi, split_lo = gram.split_parts(x, precision)
    assert torch.equal(split_hi, hi) and torch.equal(split_lo, lo)
    h, low = rows64(layer, hi), rows64(layer, lo)
    assume(h.shape[1] <= exact_rows(precision))
    got = unfold.gram(layer, x, chunk_bytes=chunk_bytes, precision=precision)
    assert got.dtype == torch.float32
    assert torch.equal(got.double(), gram64(h) + gram64(h, low) + gram64(low, h))


def test_precision_is_checked() -> None:
    """An unknown precision, or a split one with a float64 Gram, is refused."""
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="precision must be one of"):
        unfold.gram(nn.Linear(3, 2), x, precision="bf16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="computes an fp32 Gram"):
        unfold.gram(nn.Linear(3, 2), x, dtype=torch.float64, precision="bf16x3")


def test_tf32_flag_is_scoped() -> None:
    """The CUDA tf32x3 products set ``torch.backends.cuda.matmul.fp32_precision`` to "tf32"
    only inside, and restore the caller's value after (also after an error); disabled, they
    leave it alone."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        with gram._tf32_matmul(False):
            assert matmul.fp32_precision == "ieee"
        with pytest.raises(RuntimeError, match="inside"), gram._tf32_matmul(True):
            assert matmul.fp32_precision == "tf32"
            raise RuntimeError("inside")
        assert matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision = before


# -- accuracy on realistic first layers -------------------------------------------------------

#: First layers and input shapes: Linear rows, a patch embedding, the CIFAR and ImageNet stems.
CASES: dict[str, tuple[nn.Module, tuple[int, ...]]] = {
    "linear": (nn.Linear(192, 8), (2048, 192)),
    "patch 8/8": (nn.Conv2d(3, 8, 8, stride=8), (8, 3, 64, 64)),
    "stem 3x3": (nn.Conv2d(3, 8, 3, padding=1), (8, 3, 32, 32)),
    "stem 7x7/2": (nn.Conv2d(3, 8, 7, stride=2, padding=3), (2, 3, 64, 64)),
}
INPUTS = ("standardised", "[0, 1]")


def draw_input(shape: tuple[int, ...], kind: str, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(shape, generator=g)
        if kind == "standardised"
        else torch.rand(shape, generator=g)
    )


def one_bf16_product(rows: Tensor) -> Tensor:
    """(x rounded to bfloat16)ᵀ(x rounded): one tensor-core product, exact sums."""
    hi = rows.float().to(torch.bfloat16).double()
    return gram64(hi)


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("case", CASES)
def test_split_gram_error(case: str, kind: str) -> None:
    """Entry by entry |Ĝ − XᵀX| ≤ (3u² + u⁴ + 2⁻²⁰)·|X|ᵀ|X| (splitting, then fp32 sums), so
    relative to the largest entry too; one bfloat16 product breaks the bound."""
    layer, shape = CASES[case]
    x = draw_input(shape, kind, seed=1)
    rows = rows64(layer, x)
    exact, scale = gram64(rows), gram64(rows.abs())
    for precision in SPLITS:
        got = unfold.gram(layer, x, precision=precision)
        u = UNIT[precision]
        bound = (3 * u**2 + u**4 + FP32_SUMS) * scale
        assert ((got.double() - exact).abs() <= bound).all(), precision
        assert relative(got, exact) <= 3 * u**2 + u**4 + FP32_SUMS, precision
    bound = (3 * UNIT["bf16x3"] ** 2 + FP32_SUMS) * scale
    assert ((one_bf16_product(rows) - exact).abs() > bound).any()


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("case", CASES)
def test_update_after_the_solve(case: str, kind: str) -> None:
    """G·(A/r + λI)⁻¹ from the split Gram within 2e-5 of the float64 update, λ ∈ {0.05, 0.1, 1};
    from one bfloat16 product at least 10× further off, and past 2e-5 for λ ≤ 0.1."""
    layer, shape = CASES[case]
    x = draw_input(shape, kind, seed=2)
    rows = rows64(layer, x)
    r, exact = rows.shape[1], gram64(rows)[0]
    grads = torch.randn(16, exact.shape[0], generator=torch.Generator().manual_seed(3))
    grams = {p: unfold.gram(layer, x, precision=p)[0] for p in SPLITS}
    one = one_bf16_product(rows)[0]
    for lam in (0.05, 0.1, 1.0):
        expected = update(exact, r, grads.double(), lam)
        errors = {
            p: relative(update(a, r, grads.double(), lam), expected) for p, a in grams.items()
        }
        assert max(errors.values()) <= UPDATE_TOLERANCE, (lam, errors)
        worse = relative(update(one, r, grads.double(), lam), expected)
        assert worse >= 10 * errors["bf16x3"], (lam, worse, errors)
        assert lam > 0.1 or worse > UPDATE_TOLERANCE, (lam, worse)


@pytest.mark.parametrize("kind", INPUTS)
def test_vit_patch_embedding_update(kind: str) -> None:
    """A ViT-S/16 patch embedding (768 features) at a quarter of batch 64 (3,136 rows, 16
    images): the update within 2e-5 for λ ∈ {0.05, 0.1, 1}."""
    layer = nn.Conv2d(3, 16, 16, stride=16)
    x = draw_input((16, 3, 224, 224), kind, seed=4)
    rows = rows64(layer, x)
    r, exact = rows.shape[1], gram64(rows)[0]
    grads = torch.randn(16, 768, generator=torch.Generator().manual_seed(5)).double()
    for precision in SPLITS:
        got = unfold.gram(layer, x, precision=precision)[0]
        for lam in (0.05, 0.1, 1.0):
            error = relative(update(got, r, grads, lam), update(exact, r, grads, lam))
            assert error <= UPDATE_TOLERANCE, (precision, lam, error)


@pytest.mark.parametrize("products", ["bf16x3", "tf32x3"])
def test_optimizer_option_reaches_the_gram(products: str) -> None:
    """``gram_precision=`` computes float32 statistics with split products: the update stays
    within 2e-5 of float64 TrAct (float32 statistics forced; the float64 ones never split)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 4, stride=4)
    x = torch.randn(16, 3, 16, 16)
    opt = TrActOptimizer(
        torch.optim.SGD(conv.parameters(), lr=0.0),
        conv,
        0.1,
        stats_dtype=torch.float32,
        gram_precision=products,  # type: ignore[arg-type]
    )
    with mock.patch.object(gram, "split_parts", wraps=gram.split_parts) as split:
        conv(x).square().sum().backward()
    assert split.call_count >= 1
    assert conv.weight.grad is not None
    raw = conv.weight.grad.clone()
    opt.precondition_()
    rows = F.unfold(x.double(), 4, stride=4).transpose(1, 2).reshape(1, -1, 48)
    matrix = rows.mT @ rows / rows.shape[1] + 0.1 * torch.eye(48, dtype=torch.float64)
    flat = raw.double().reshape(8, 48)
    expected = torch.linalg.solve(matrix[0], flat.T).T
    error = float((conv.weight.grad.double().reshape(8, 48) - expected).abs().max())
    assert error <= 2e-5 * float(expected.abs().max())
