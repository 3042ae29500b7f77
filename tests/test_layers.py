"""First layers that are not plain nn layers: supported exactly, refused by name, or opted in.

References: TrAct's update G·(XᵀX/r + λI)⁻¹ in float64 (``kit.tract_grad``) on
rows of the input *as the layer really convolves it*, built independently: the one-hot unfold
(``unfold_rows``) of a plain ``nn.Conv2d`` applied to the input padded by timm's own formula
(``timm_like.pad_same``). G is the autograd gradient of the layer's weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.ao.nn.qat as qat
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.ao.quantization import get_default_qat_qconfig
from torch.nn.utils import parametrizations

from tests.kit import assert_update, timm_like, tract_grad, tract_gradient, unfold_rows
from tract_optim import TrActOptimizer


def plain_copy(layer: nn.Conv2d) -> nn.Conv2d:
    """An ``nn.Conv2d`` with the layer's weights, padding 0: what it applies after padding."""
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
    with torch.no_grad():
        plain.weight.copy_(layer.weight)
    return plain


# --- timm's Conv2dSame: supported exactly ------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    size=st.tuples(st.integers(1, 13), st.integers(1, 13)),
    kernel=st.integers(1, 5),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    batch=st.integers(1, 3),
    lam=st.sampled_from([0.05, 0.1, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_conv2d_same_stem_update_is_that_of_the_padded_input(
    size: tuple[int, int],
    kernel: int,
    stride: int,
    dilation: int,
    batch: int,
    lam: float,
    seed: int,
) -> None:
    """A Conv2dSame stem's TrAct update is Eq. 10 for the TF-SAME padded input's rows."""
    torch.manual_seed(seed)
    stem = timm_like.Conv2dSame(3, 4, kernel, stride=stride, dilation=dilation, bias=False)
    model = nn.Sequential(stem, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(batch, 3, *size)
    model(x)  # materialise the head
    raw, tract = tract_gradient([stem], model, x, lam)
    xpad = timm_like.pad_same(x, (kernel, kernel), (stride, stride), (dilation, dilation))
    rows = unfold_rows(plain_copy(stem), xpad)
    positions = math.prod(math.ceil(i / stride) for i in size)  # TF's SAME output size
    assert rows.shape[1] == batch * positions
    assume(bool(rows.any()))  # a dilated window can read only padding: zero rows, zero update
    assert_update(tract[0], raw[0], rows, lam)


def test_conv2d_same_update_differs_from_a_valid_convolution() -> None:
    """The test above can fail: with the unpadded (15×15) statistics the update is ~6 % off."""
    torch.manual_seed(0)
    stem = timm_like.Conv2dSame(3, 8, 3, stride=2, bias=False)
    x = torch.randn(4, 3, 32, 32)
    raw, tract = tract_gradient([stem], stem, x, 0.1)
    padded = unfold_rows(plain_copy(stem), timm_like.pad_same(x, (3, 3), (2, 2), (1, 1)))
    assert_update(tract[0], raw[0], padded, 0.1)
    valid = tract_grad(unfold_rows(plain_copy(stem), x), raw[0], 0.1)
    assert (tract[0].double() - valid).norm() > 1e-2 * valid.norm()


# --- layers that transform their weight, or override forward: refused by name ------------------


def qat_layers() -> list[nn.Module]:
    qconfig = get_default_qat_qconfig()
    return [qat.Conv2d(3, 4, 3, qconfig=qconfig), qat.Linear(6, 4, qconfig=qconfig)]


def assert_refused(layer: nn.Module, index: int, match: str, error: type = TypeError) -> None:
    """Construction raises naming first_layer[index] and the class, and leaves no hook."""
    layers = [*(nn.Conv1d(1, 1, 1) for _ in range(index)), layer]
    params = [p for module in layers for p in module.parameters()]
    with pytest.raises(error, match=match) as info:
        TrActOptimizer(torch.optim.SGD(params, lr=0.1), layers)
    assert f"first_layer[{index}]" in str(info.value)
    assert all(not module._forward_hooks for module in layers)


@pytest.mark.parametrize("cls", timm_like.WEIGHT_TRANSFORMS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("stride", [1, 2])
def test_weight_standardising_layers_are_refused_by_name(cls: type[nn.Conv2d], stride: int) -> None:
    layer = cls(3, 8, 3, stride=stride)
    assert_refused(layer, 1, rf"timm\.layers\.std_conv\.{cls.__name__}.*standardises")


@pytest.mark.parametrize("layer", qat_layers(), ids=["conv2d", "linear"])
def test_qat_layers_are_refused_by_name(layer: nn.Module) -> None:
    assert_refused(layer, 0, rf"torch\.ao\.nn\.qat.*{type(layer).__name__}.*fake-quantises")


class LoggingConv(nn.Conv2d):
    """Overrides forward but computes exactly nn.Conv2d's output."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)


class PaddingConv(nn.Conv2d):
    """Pads its input inside forward: not what its padding attribute says."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (1, 1, 1, 1)))


class CustomConvForward(nn.Conv2d):
    """Overrides only ``_conv_forward`` (here: a scaled weight)."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return super()._conv_forward(x, 2 * weight, bias)


class LocalConv2dSame(timm_like.Conv2dSame):
    """A copy of timm's Conv2dSame defined outside timm: not recognised, so refused."""

    __module__ = __name__
    forward = timm_like.Conv2dSame.forward


@pytest.mark.parametrize(
    ("cls", "method"),
    [
        (LoggingConv, "forward"),
        (PaddingConv, "forward"),
        (CustomConvForward, "_conv_forward"),
        (LocalConv2dSame, "forward"),
    ],
)
def test_any_other_override_is_refused(cls: type[nn.Conv2d], method: str) -> None:
    layer = cls(3, 4, 3)
    assert_refused(layer, 0, rf"{cls.__qualname__}.*overrides {method}.*trusted_layers")


def test_conv2d_same_with_changed_padding_is_refused() -> None:
    """timm's class, but with padding beyond its TF-SAME padding: not the pattern handled."""
    layer = timm_like.Conv2dSame(3, 4, 3)
    layer.padding = (1, 1)
    assert_refused(layer, 0, "Conv2dSame.*overrides forward")


def test_subclass_that_keeps_the_forward_is_accepted() -> None:
    """A subclass adding only attributes (or torch's dynamic subclasses) computes nn.Conv2d's z."""

    class Tagged(nn.Conv2d):
        tag = "stem"

    torch.manual_seed(0)
    layer = Tagged(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    raw, tract = tract_gradient([layer], layer, x, 0.1)
    assert_update(tract[0], raw[0], unfold_rows(layer, x), 0.1)


def test_computed_weights_are_refused() -> None:
    assert_refused(parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), 0, "not an nn.Parameter")
    with pytest.warns(FutureWarning):
        old_style = nn.utils.weight_norm(nn.Linear(3, 4))
    assert_refused(old_style, 0, "not an nn.Parameter")


# --- the opt-in ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", timm_like.WEIGHT_TRANSFORMS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("stride", [1, 2])
def test_trusted_weight_transform_preconditions_the_raw_weight(
    cls: type[nn.Conv2d], stride: int
) -> None:
    """Opted in, the raw weight's gradient gets Eq. 10 for the rows the layer really convolves:
    its own padding, or TF-SAME for the *Same variants with dynamic padding."""
    torch.manual_seed(0)
    layer = cls(3, 4, 3, stride=stride)
    x = torch.randn(2, 3, 9, 9)
    raw, tract = tract_gradient([layer], layer, x, 0.1, trusted_layers=[cls])
    if getattr(layer, "same_pad", False):
        plain, xin = plain_copy(layer), timm_like.pad_same(x, (3, 3), (stride,) * 2, (1, 1))
    else:
        plain, xin = nn.Conv2d(3, 4, 3, stride, layer.padding, bias=False), x
    rows = unfold_rows(plain, xin)
    with torch.no_grad():
        assert rows.shape[1] == layer(x)[0, 0].numel() * 2
    assert_update(tract[0], raw[0], rows, 0.1)


@pytest.mark.parametrize("layer", qat_layers(), ids=["conv2d", "linear"])
def test_trusted_qat_layer(layer: nn.Module) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 7) if isinstance(layer, nn.Conv2d) else torch.randn(5, 6)
    raw, tract = tract_gradient([layer], layer, x, 0.1, trusted_layers=[type(layer)])
    assert_update(tract[0], raw[0], unfold_rows(layer, x), 0.1)


def test_trust_covers_subclasses_that_keep_the_trusted_forward() -> None:
    class Child(LoggingConv):
        pass

    class Overriding(LoggingConv):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * super().forward(x)

    for layer in (LoggingConv(3, 4, 3), Child(3, 4, 3)):
        TrActOptimizer(torch.optim.SGD(layer.parameters()), layer, trusted_layers=[LoggingConv])
    layer = Overriding(3, 4, 3)
    with pytest.raises(TypeError, match=r"Overriding.*overrides forward"):
        TrActOptimizer(torch.optim.SGD(layer.parameters()), layer, trusted_layers=[LoggingConv])


def test_trusted_layer_that_pads_differently_fails_at_its_forward() -> None:
    """Trust does not switch the shape check off: a wrong geometry is an error, never silent."""
    layer = PaddingConv(3, 4, 3)
    opt = TrActOptimizer(torch.optim.SGD(layer.parameters()), layer, trusted_layers=[PaddingConv])
    message = r"PaddingConv \(weight \(4, 3, 3, 3\)\).*output of shape \(2, 4, 8, 8\)"
    with pytest.raises(RuntimeError, match=message):
        layer(torch.randn(2, 3, 8, 8))
    opt.remove()


@pytest.mark.parametrize("bad", [nn.Conv2d(1, 1, 1), nn.BatchNorm2d, int, "Conv2d"])
def test_trusted_layers_must_be_layer_classes(bad: object) -> None:
    layer = nn.Conv2d(3, 4, 3)
    with pytest.raises(TypeError, match=r"trusted_layers\[0\] must be a subclass"):
        TrActOptimizer(torch.optim.SGD(layer.parameters()), layer, trusted_layers=[bad])  # type: ignore[list-item]


# --- lazy layers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "shape"),
    [(lambda: nn.LazyConv2d(4, 3, padding=1), (2, 3, 6, 6)), (lambda: nn.LazyLinear(4), (5, 7))],
    ids=["conv2d", "linear"],
)
def test_lazy_layer_refused_until_materialised(
    make: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    layer = make()
    assert_refused(layer, 0, "not materialised yet.*forward pass", ValueError)
    x = torch.randn(*shape)
    layer(x)  # materialises it: the class becomes nn.Conv2d / nn.Linear
    raw, tract = tract_gradient([layer], layer, x, 0.1)
    assert_update(tract[0], raw[0], unfold_rows(layer, x), 0.1)


# --- optimizers that re-evaluate a closure -------------------------------------------------------


def test_lbfgs_is_refused() -> None:
    layer = nn.Linear(3, 2)
    with pytest.raises(TypeError, match=r"optimizer\[0\]: LBFGS\.step\(\) requires a closure"):
        TrActOptimizer(torch.optim.LBFGS(layer.parameters()), layer)
    assert not layer._forward_hooks


def test_any_optimizer_requiring_a_closure_is_refused_and_optional_ones_accepted() -> None:
    class SharpnessAware(torch.optim.SGD):
        def step(self, closure: Callable[[], float]) -> float:  # type: ignore[override]
            closure()
            return float(closure())

    class OptionalClosure(torch.optim.SGD):
        def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
            return super().step(closure)

    layer = nn.Linear(3, 2)
    sgd = torch.optim.SGD(layer.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"optimizer\[1\]: SharpnessAware\.step\(\) requires"):
        TrActOptimizer([sgd, SharpnessAware(nn.Linear(2, 2).parameters(), lr=0.1)], layer)
    TrActOptimizer(OptionalClosure(layer.parameters(), lr=0.1), layer).remove()


# --- under torch.compile ---------------------------------------------------------------------


def test_conv2d_same_compiles_in_one_graph_and_trains_as_eager() -> None:
    """The TF-SAME padding depends on the input size: it must trace (fullgraph, sizes that
    change between steps) and give eager's weights."""

    def train(compiled: bool) -> Tensor:
        torch.manual_seed(0)
        stem = timm_like.Conv2dSame(3, 4, 3, stride=2, bias=False)
        model = nn.Sequential(
            stem, nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
        )
        opt = TrActOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), stem)
        forward = torch.compile(model, backend="eager", fullgraph=True) if compiled else model
        for size in (15, 16, 21):
            x = torch.randn(4, 3, size, size + 1)
            opt.zero_grad()
            F.cross_entropy(forward(x), torch.randint(0, 3, (4,))).backward()
            opt.step()
        return stem.weight.detach().clone()

    torch._dynamo.reset()
    torch.testing.assert_close(train(compiled=True), train(compiled=False))
