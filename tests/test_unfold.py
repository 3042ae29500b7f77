"""``tract_optim.unfold`` against independent unfolds.

Two references: a one-hot-weight convolution (``kit.unfold_rows``), which must give
the same rows entry for entry, and BackPACK's check that the rows times the flattened weight
(plus bias) rebuild the layer's own output, which involves no padding arithmetic at all.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from tests.kit import assert_fp32_gram, draw_conv, timm_like, unfold_rows
from tract_optim import unfold

SETTINGS = settings(max_examples=60, deadline=None)


def rebuilt_output(layer: nn.Module, rows: Tensor) -> Tensor:
    """Output rows (r, out_features) computed as rows @ (weight of the row's group)ᵀ + bias."""
    geo = unfold.geometry(layer)
    weight = layer.weight.detach().double().reshape(geo.groups, geo.out_per_group, geo.n)
    out = rows.double() @ weight.transpose(1, 2)  # (groups, r, out_per_group)
    out = out.transpose(0, 1).reshape(rows.shape[1], geo.out_features)
    if layer.bias is not None:
        out = out + layer.bias.detach().double()
    return out


def layer_output_rows(layer: nn.Module, x: Tensor) -> Tensor:
    """The layer's own float64 output as rows (r, out_features), positions in row-major order."""
    with torch.no_grad():
        z = copy.deepcopy(layer).double()(x.double())
    if isinstance(layer, nn.Linear):
        return z.reshape(-1, layer.out_features)
    if z.dim() == x.dim() and x.dim() == len(layer.kernel_size) + 1:  # unbatched
        z = z.unsqueeze(0)
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def check_rows(layer: nn.Module, x: Tensor) -> None:
    """rows, row_count and geometry agree with the one-hot unfold and rebuild the output."""
    got = unfold.rows(layer, x)
    ref = unfold_rows(layer, x)
    geo = unfold.geometry(layer)
    assert got.dtype == x.dtype
    assert got.shape == ref.shape == (geo.groups, ref.shape[1], geo.n)
    assert unfold.row_count(layer, x) == ref.shape[1]
    assert geo.out_features == layer.weight.shape[0]
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=0)
    torch.testing.assert_close(rebuilt_output(layer, got), layer_output_rows(layer, x))


@SETTINGS
@given(data=st.data())
def test_conv_rows_match_independent_unfolds(data: st.DataObject) -> None:
    """Every stride/padding/dilation/groups/padding_mode/layout/batching gives the exact rows."""
    layer, x = draw_conv(data)
    check_rows(layer, x)


CORNER_CASES = {
    "same-even-kernel-zeros": (lambda: nn.Conv2d(2, 3, (2, 4), padding="same"), (2, 2, 5, 6)),
    "same-even-kernel-reflect": (
        lambda: nn.Conv1d(2, 2, 4, padding="same", padding_mode="reflect"),
        (3, 2, 7),
    ),
    "same-dilated-circular": (
        lambda: nn.Conv2d(2, 2, 2, padding="same", dilation=3, padding_mode="circular"),
        (1, 2, 6, 5),
    ),
    "stride-not-dividing": (lambda: nn.Conv2d(3, 4, 3, stride=(2, 3), padding=1), (2, 3, 10, 11)),
    "grouped-3d-replicate": (
        lambda: nn.Conv3d(4, 6, (1, 2, 3), groups=2, padding=(0, 1, 2), padding_mode="replicate"),
        (2, 4, 3, 4, 5),
    ),
    "depthwise-unbatched": (lambda: nn.Conv2d(3, 6, 3, groups=3, dilation=2), (3, 9, 8)),
    "resnet-stem": (lambda: nn.Conv2d(3, 4, 7, stride=2, padding=3, bias=False), (1, 3, 15, 16)),
}


@pytest.mark.parametrize("case", CORNER_CASES)
def test_conv_corner_cases(case: str) -> None:
    """Asymmetric 'same' padding and other cases hypothesis may draw only rarely."""
    make, shape = CORNER_CASES[case]
    torch.manual_seed(0)
    layer, x = make(), torch.randn(*shape)
    check_rows(layer, x)
    assert_fp32_gram(unfold.gram(layer, x, chunk_bytes=1), unfold_rows(layer, x))


@pytest.mark.parametrize(
    ("kernel", "size"),
    [((4, 4), (10, 13)), ((16, 16), (33, 40)), ((3, 5), (9, 11)), ((2, 2), (2, 3))],
)
def test_patch_embedding_with_remainder(kernel: tuple[int, int], size: tuple[int, int]) -> None:
    """stride == kernel on sizes with a remainder: the remainder is ignored, as by the conv."""
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 5, kernel, stride=kernel)
    x = torch.randn(2, 3, *size)
    check_rows(layer, x)
    check_rows(layer, x.contiguous(memory_format=torch.channels_last))


@SETTINGS
@given(
    leading=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    n=st.integers(1, 6),
    m=st.integers(1, 4),
    bias=st.booleans(),
    permuted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_rows(
    leading: list[int],
    n: int,
    m: int,
    bias: bool,
    permuted: bool,
    seed: int,
) -> None:
    """A Linear on inputs of rank 1–4: rows are the inputs with leading dimensions flattened."""
    torch.manual_seed(seed)
    layer = nn.Linear(n, m, bias=bias)
    shape = [*leading, n]
    if permuted:  # a non-contiguous view with the same shape
        x = torch.randn(*reversed(shape)).permute(*reversed(range(len(shape))))
    else:
        x = torch.randn(*shape)
    check_rows(layer, x)


@SETTINGS
@given(data=st.data(), chunk_bytes=st.sampled_from([1, 40, 300, 5000, unfold.DEFAULT_CHUNK_BYTES]))
def test_conv_gram_is_rows_gram(data: st.DataObject, chunk_bytes: int) -> None:
    """gram() equals xᵀx of the independent rows for any chunking (1 byte: one image a chunk)."""
    layer, x = draw_conv(data)
    assert_fp32_gram(unfold.gram(layer, x, chunk_bytes=chunk_bytes), unfold_rows(layer, x))


@SETTINGS
@given(
    leading=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    n=st.integers(1, 6),
    chunk_bytes=st.sampled_from([1, 16, 100, unfold.DEFAULT_CHUNK_BYTES]),
    seed=st.integers(0, 2**16),
)
def test_linear_gram_is_rows_gram(leading: list[int], n: int, chunk_bytes: int, seed: int) -> None:
    """Linear gram() equals xᵀx over all flattened leading dimensions, for any chunking."""
    torch.manual_seed(seed)
    layer = nn.Linear(n, 3)
    x = torch.randn(*leading, n)
    assert_fp32_gram(unfold.gram(layer, x, chunk_bytes=chunk_bytes), unfold_rows(layer, x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_bytes", [1, unfold.DEFAULT_CHUNK_BYTES])
@pytest.mark.parametrize(
    "layer",
    [
        nn.Linear(24, 4),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect"),
        nn.Conv1d(3, 3, 5, padding="same", dilation=2),
    ],
    ids=["linear", "conv2d", "conv1d"],
)
def test_gram_of_low_precision_input_accumulates_in_fp32(
    layer: nn.Module, chunk_bytes: int, dtype: torch.dtype
) -> None:
    """bf16/fp16 inputs: the Gram is fp32 and within the fp32 bound for the exact rows.

    With a few thousand rows the bound (r·2⁻²⁴ ≈ 2e-4 relative to |X|ᵀ|X|) is far below one
    bf16/fp16 rounding (≥ 5e-4), so products or sums in the input's dtype would fail it.
    """
    shape: dict[type[nn.Module], tuple[int, ...]] = {
        nn.Linear: (64, 50, 24),
        nn.Conv2d: (8, 4, 20, 20),
        nn.Conv1d: (16, 3, 200),
    }
    torch.manual_seed(0)
    x = torch.randn(*shape[type(layer)]).to(dtype)
    assert_fp32_gram(unfold.gram(layer, x, chunk_bytes=chunk_bytes), unfold_rows(layer, x))


def test_gram_under_autocast_is_fp32() -> None:
    """Under CPU autocast the Gram is still accumulated in fp32 from the fp32 input."""
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, stride=2)
    x = torch.randn(4, 3, 17, 17)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = unfold.gram(layer, x)
    assert_fp32_gram(got, unfold_rows(layer, x))


def test_unsupported_layer_raises() -> None:
    """Only Linear and Conv1d/2d/3d are first layers; anything else is a clear TypeError."""
    module = nn.Bilinear(2, 2, 2)
    with pytest.raises(TypeError, match="unsupported first layer Bilinear"):
        unfold.geometry(module)
    with pytest.raises(TypeError, match=r"supported: nn\.Linear"):
        unfold.rows(module, torch.randn(2, 2))


def test_geometry_of_grouped_conv() -> None:
    """n = in_channels/groups · prod(kernel); one Gram per group."""
    geo = unfold.geometry(nn.Conv3d(6, 9, (2, 3, 4), groups=3))
    assert (geo.groups, geo.n, geo.out_features, geo.out_per_group) == (3, 2 * 24, 9, 3)


# --- layers that pad inside forward (timm's Conv2dSame, TF "SAME") -----------------------------


def draw_conv2d_same(data: st.DataObject) -> tuple[nn.Conv2d, Tensor]:
    """A timm-like ``Conv2dSame`` and an input: kernel, stride, dilation, groups, sizes, layout."""
    torch.manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    pair = st.tuples(st.integers(1, 4), st.integers(1, 4))
    groups = data.draw(st.integers(1, 2), label="groups")
    layer = timm_like.Conv2dSame(
        groups * data.draw(st.integers(1, 2), label="in per group"),
        groups * data.draw(st.integers(1, 2), label="out per group"),
        data.draw(pair, label="kernel"),
        stride=data.draw(pair, label="stride"),
        dilation=data.draw(st.tuples(st.integers(1, 2), st.integers(1, 2)), label="dilation"),
        groups=groups,
        bias=data.draw(st.booleans(), label="bias"),
    )
    size = data.draw(st.tuples(st.integers(1, 12), st.integers(1, 12)), label="size")
    batch = data.draw(st.integers(0, 3), label="batch (0: unbatched)")
    shape = [layer.in_channels, *size] if batch == 0 else [batch, layer.in_channels, *size]
    x = torch.randn(*shape)
    if data.draw(st.booleans(), label="channels_last") and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return layer, x


def padded_reference(layer: nn.Conv2d, x: Tensor) -> tuple[nn.Conv2d, Tensor]:
    """A plain Conv2d (padding 0, same weights) and the input padded by timm's own formula."""
    plain = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        0,
        layer.dilation,
        layer.groups,
        layer.bias is not None,
    )
    plain.load_state_dict(layer.state_dict())
    return plain, timm_like.pad_same(x, layer.kernel_size, layer.stride, layer.dilation)


@SETTINGS
@given(data=st.data(), chunk_bytes=st.sampled_from([1, 300, unfold.DEFAULT_CHUNK_BYTES]))
def test_conv2d_same_rows_are_those_of_the_padded_input(
    data: st.DataObject, chunk_bytes: int
) -> None:
    """Rows, Gram and count are those of the TF-SAME padded input, and rebuild the layer's output.

    Three independent references: the one-hot unfold of the input padded by timm's formula, the
    layer's own output (no padding arithmetic), and TF's definition of SAME: ⌈size/stride⌉
    output positions per dim.
    """
    layer, x = draw_conv2d_same(data)
    plain, xpad = padded_reference(layer, x)
    got = unfold.rows(layer, x)
    ref = unfold_rows(plain, xpad)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=0)
    torch.testing.assert_close(rebuilt_output(layer, got), layer_output_rows(layer, x))
    batch = x.shape[0] if x.dim() == 4 else 1
    positions = math.prod(math.ceil(i / s) for i, s in zip(x.shape[-2:], layer.stride, strict=True))
    assert unfold.row_count(layer, x) == ref.shape[1] == batch * positions
    assert_fp32_gram(unfold.gram(layer, x, chunk_bytes=chunk_bytes), ref)
    with torch.no_grad():
        unfold.check_pass(layer, x, layer(x))


def test_conv2d_same_stem_is_not_a_valid_convolution() -> None:
    """tf_efficientnet's stem (3×3/2) on 32×32: 16×16 positions with one zero row/column at the
    bottom/right, where the layer's padding attribute alone (0) would give 15×15."""
    torch.manual_seed(0)
    layer = timm_like.Conv2dSame(3, 8, 3, stride=2, bias=False)
    x = torch.randn(2, 3, 32, 32)
    rows = unfold.rows(layer, x)
    assert rows.shape == (1, 2 * 16 * 16, 27)
    valid = nn.Conv2d(3, 8, 3, stride=2, bias=False)
    assert unfold.row_count(valid, x) == 2 * 15 * 15
    # TF pads 0 before and 1 after: windows start at 0, 2, ..., 30; the last reads a zero.
    windows = rows[0].reshape(2, 16, 16, 3, 3, 3)
    assert torch.equal(windows[:, 0, 0], x[:, :, 0:3, 0:3])
    assert not windows[:, -1, :, :, 2].any() and not windows[:, :, -1, :, :, 2].any()


def test_same_named_class_outside_timm_pads_by_its_attributes() -> None:
    """Only timm's class is taken to pad TF-SAME; a copy elsewhere is not (and is refused)."""

    class Conv2dSame(timm_like.Conv2dSame):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x)

    layer = Conv2dSame(3, 4, 3, stride=2)
    x = torch.randn(1, 3, 8, 8)
    assert unfold.row_count(layer, x) == 3 * 3
    assert unfold.row_count(timm_like.Conv2dSame(3, 4, 3, stride=2), x) == 4 * 4


# --- check_pass: one output position per row --------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_check_pass_accepts_every_plain_layer(data: st.DataObject) -> None:
    """Never a false alarm: any Conv1d/2d/3d configuration's own output passes."""
    layer, x = draw_conv(data)
    with torch.no_grad():
        unfold.check_pass(layer, x, layer(x))
    linear = nn.Linear(3, 2)
    unfold.check_pass(linear, torch.randn(2, 4, 3), linear(torch.randn(2, 4, 3)))


@pytest.mark.parametrize(
    ("layer", "shape", "output"),
    [
        (nn.Conv2d(3, 4, 3, stride=2), (2, 3, 8, 8), (2, 4, 4, 4)),  # padded inside forward
        (nn.Conv2d(3, 4, 3), (2, 3, 8, 8), (2, 4, 6, 5)),  # one column cropped
        (nn.Conv2d(3, 4, 3), (2, 3, 8, 8), (2, 4, 36)),  # flattened: same count, wrong shape
        (nn.Conv1d(3, 4, 3), (3, 9), (1, 4, 7)),  # a batch dim added to unbatched input
        (nn.Linear(3, 4), (2, 5, 3), (10, 4)),
    ],
)
def test_check_pass_rejects_other_output_shapes(
    layer: nn.Module, shape: tuple[int, ...], output: tuple[int, ...]
) -> None:
    with pytest.raises(RuntimeError, match=rf"{type(layer).__name__} \(weight .*output of shape"):
        unfold.check_pass(layer, torch.randn(*shape), torch.zeros(output))
