"""``tract_optim.gram``: the unfold-free Conv2d Gram and the upper-triangle product, each against
a float64 Gram of rows built independently (``reference.unfold_rows``), within the fp32 bound.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import assert_fp32_gram, unfold_rows
from torch import nn

from tract_optim import gram

SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(
    kernel=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    stride=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    channels=st.integers(1, 3),
    batch=st.integers(1, 3),
    extra=st.tuples(st.integers(0, 9), st.integers(0, 9)),
    seed=st.integers(0, 2**16),
)
def test_conv2d_gram_matches_unfolded_rows(
    kernel: tuple[int, int],
    stride: tuple[int, int],
    channels: int,
    batch: int,
    extra: tuple[int, int],
    seed: int,
) -> None:
    """Every kernel/stride pair, sizes with and without remainders (e.g. a 7×7/2 ResNet stem)."""
    torch.manual_seed(seed)
    xpad = torch.randn(batch, channels, kernel[0] + extra[0], kernel[1] + extra[1])
    rows = unfold_rows(nn.Conv2d(channels, 1, kernel, stride=stride), xpad)[0]
    assert_fp32_gram(gram.conv2d_gram(xpad, kernel, stride), rows)


def test_conv2d_gram_of_an_imagenet_stem() -> None:
    """The 7×7 stride-2 stem on a 3×38×38 input padded by 3, as the stem layer pads it."""
    torch.manual_seed(0)
    xpad = F.pad(torch.randn(2, 3, 38, 38), (3, 3, 3, 3))
    rows = unfold_rows(nn.Conv2d(3, 1, 7, stride=2), xpad)[0]
    assert_fp32_gram(gram.conv2d_gram(xpad, (7, 7), (2, 2)), rows)


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
