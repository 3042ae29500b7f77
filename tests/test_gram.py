"""``tract_optim.gram``: the unfold-free Conv2d Gram and the upper-triangle product, each against
a float64 Gram of rows built independently (``kit.unfold_rows``), within the fp32 bound;
and ``unfold.gram`` inside ``torch.compile``: one graph for every batch size, equal to eager.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from tests.kit import CountingBackend, assert_fp32_gram, unfold_rows
from tract_optim import gram, unfold


def conv2d_gram(xpad: Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """The Gram of a padded input's rows through the library's lag table (one group)."""
    return gram.gram_from_lags(gram.conv2d_lags(xpad, kernel, stride), xpad.shape[1])


SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(
    kernel=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    stride=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    channels=st.integers(1, 3),
    batch=st.integers(1, 3),
    extra=st.tuples(st.integers(0, 9), st.integers(0, 9)),
    rows_per_product=st.integers(1, 3),
    band_bytes=st.sampled_from([None, 1, 3000]),
    padding=st.tuples(*[st.integers(0, 3)] * 4),
    seed=st.integers(0, 2**16),
)
def test_conv2d_gram_matches_unfolded_rows(
    kernel: tuple[int, int],
    stride: tuple[int, int],
    channels: int,
    batch: int,
    extra: tuple[int, int],
    rows_per_product: int,
    band_bytes: int | None,
    padding: tuple[int, int, int, int],
    seed: int,
) -> None:
    """Every kernel/stride pair, sizes with and without remainders (e.g. a 7×7/2 ResNet stem),
    input heights that are and are not multiples of the rows per product, in one band of rows,
    in the smallest bands (1 byte) and in bands of a few rows, with zero padding on any side
    (against the rows of the input padded by ``F.pad``)."""
    torch.manual_seed(seed)
    x = torch.randn(batch, channels, kernel[0] + extra[0], kernel[1] + extra[1])
    table = gram.conv2d_lags(x, kernel, stride, rows_per_product, band_bytes, padding)
    top, bottom, left, right = padding
    xpad = F.pad(x, (left, right, top, bottom))
    rows = unfold_rows(nn.Conv2d(channels, 1, kernel, stride=stride), xpad)[0]
    assert_fp32_gram(gram.gram_from_lags(table, channels), rows)


def test_lag_tables_of_parts_add_up_to_the_whole() -> None:
    """Tables of two batches (one of them channels-last, so strided) sum to the Gram of both."""
    torch.manual_seed(0)
    xpad = F.pad(torch.randn(3, 2, 15, 17), (2, 2, 2, 2))
    first = xpad[:1].contiguous(memory_format=torch.channels_last)
    table = gram.conv2d_lags(first, (5, 5), (2, 3)) + gram.conv2d_lags(xpad[1:], (5, 5), (2, 3))
    got = gram.gram_from_lags(table, 2)
    assert_fp32_gram(got, unfold_rows(nn.Conv2d(2, 1, 5, stride=(2, 3)), xpad)[0])


def test_conv2d_gram_of_an_imagenet_stem() -> None:
    """The 7×7 stride-2 stem on a 3×38×38 input padded by 3, as the stem layer pads it."""
    torch.manual_seed(0)
    xpad = F.pad(torch.randn(2, 3, 38, 38), (3, 3, 3, 3))
    rows = unfold_rows(nn.Conv2d(3, 1, 7, stride=2), xpad)[0]
    assert_fp32_gram(conv2d_gram(xpad, (7, 7), (2, 2)), rows)


@SETTINGS
@given(
    groups=st.integers(1, 2),
    r=st.integers(1, 40),
    n=st.sampled_from([1, 5, gram.STRIP - 1, gram.STRIP, gram.STRIP + 1, 2 * gram.STRIP + 7]),
    seed=st.integers(0, 2**16),
)
def test_upper_strips_then_mirror_give_the_full_gram(
    groups: int, r: int, n: int, seed: int
) -> None:
    """Strips on both sides of every strip boundary; accumulating twice doubles the Gram."""
    torch.manual_seed(seed)
    rows = torch.randn(groups, r, n)
    out = torch.zeros(groups, n, n)
    gram.add_upper_(out, rows)
    assert_fp32_gram(gram.mirror_upper(out), rows)
    gram.add_upper_(out, rows)
    assert_fp32_gram(gram.mirror_upper(out), torch.cat([rows, rows], dim=1))


@pytest.mark.parametrize(
    "layer",
    [nn.Conv2d(3, 4, 5, 2, 2), nn.Conv2d(2, 4, 4, 4), nn.Linear(6, 3)],
    ids=["overlapping conv (lags)", "patch embedding (rows)", "linear"],
)
def test_gram_compiles_once_for_every_batch_size(layer: nn.Module) -> None:
    """Inside torch.compile the whole batch is one chunk: no loop over the batch, so Dynamo's
    automatic dynamic shapes serve batches 2, 3 and 5 after one recompilation (a chunk loop
    would specialise on each size); each result equals eager's (1-byte chunks there)."""
    backend = CountingBackend()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: unfold.gram(layer, x, 1), backend=backend, fullgraph=True)
    for batch in (2, 3, 5):
        if isinstance(layer, nn.Linear):
            x = torch.randn(batch, 4, 6)
        else:
            x = torch.randn(batch, layer.in_channels, 12, 13)
        rows = unfold_rows(layer, x)
        assert_fp32_gram(compiled(x), rows)
        assert_fp32_gram(unfold.gram(layer, x, 1), rows)
    assert backend.compilations == 2
