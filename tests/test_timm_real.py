"""Real timm first layers, where timm can be imported (not in CI here: timm needs torchvision).

Checks that the stand-ins in ``timm_like`` behave like timm's own layers, and that real timm
models' stems are handled as the README says: ``Conv2dSame`` stems preconditioned exactly (float64
reference on the explicitly TF-"SAME"-padded input), weight-standardising stems refused by name,
and plain stems / patch embeddings accepted.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.kit import assert_update, timm_like, unfold_rows
from tract_optim import TrActOptimizer, find_first_layer

timm = pytest.importorskip("timm")
timm_layers = pytest.importorskip("timm.layers")

LAM = 0.1


@pytest.mark.parametrize(
    ("real", "fake"),
    [
        ("Conv2dSame", timm_like.Conv2dSame),
        ("StdConv2d", timm_like.StdConv2d),
        ("ScaledStdConv2d", timm_like.ScaledStdConv2d),
    ],
)
def test_stand_ins_compute_what_timm_computes(real: str, fake: type[nn.Conv2d]) -> None:
    torch.manual_seed(0)
    theirs = getattr(timm_layers, real)(3, 8, 3, stride=2)
    ours = fake(3, 8, 3, stride=2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 15, 17)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def _first(model: nn.Module) -> nn.Module:
    return model.get_submodule(model.pretrained_cfg["first_conv"])


def test_tf_efficientnet_stem_is_preconditioned_exactly() -> None:
    model = timm.create_model(
        "tf_efficientnet_b0", pretrained=False, num_classes=3, drop_rate=0.0, drop_path_rate=0.0
    )
    stem = _first(model)
    assert type(stem).__name__ == "Conv2dSame"
    x = torch.randn(2, 3, 33, 31)
    assert find_first_layer(model, x) is stem
    twin = copy.deepcopy(model)
    twin(x).square().mean().backward()
    raw = _first(twin).weight.grad
    assert raw is not None
    opt = TrActOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), stem, LAM)
    model(x).square().mean().backward()
    opt.precondition_()
    padded = timm_like.pad_same(x, stem.kernel_size, stem.stride, stem.dilation)
    assert stem.weight.grad is not None and stem.padding == (0, 0)
    assert_update(stem.weight.grad, raw, unfold_rows(stem, padded), LAM)


@pytest.mark.parametrize("name", ["resnetv2_50x1_bit", "nfnet_l0"])
def test_weight_standardising_stems_are_refused_by_name(name: str) -> None:
    model = timm.create_model(name, pretrained=False)
    stem = _first(model)
    with pytest.raises(TypeError, match=type(stem).__name__):
        TrActOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), stem)


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "convnext_atto"])
def test_plain_stems_are_found_and_accepted(name: str) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=3)
    x = torch.randn(1, 3, 224, 224)
    stem = find_first_layer(model, x)
    assert stem is _first(model)
    TrActOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), stem).remove()
