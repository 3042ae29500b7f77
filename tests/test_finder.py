"""find_first_layer on the project's models, torchvision/timm-style layouts and its error cases.

The expected layer of every model is known by construction (the module the test wires to the
input), never taken from the finder itself.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from scripts import models
from tests.kit import assert_update, timm_like, tract_gradient, unfold_rows
from tract_optim import find_first_layer, find_first_layers


class TorchvisionResNetStem(nn.Module):
    """torchvision ResNet layout: conv1 (7×7/2) → bn1 → relu → maxpool → … → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(self.layer1(x).mean(dim=(2, 3)))


class TorchvisionViT(nn.Module):
    """torchvision VisionTransformer layout: conv_proj (p×p, stride p) → tokens → encoder."""

    def __init__(self, patch: int = 4, dim: int = 16) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.heads = nn.Sequential(nn.Linear(dim, 5))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TorchvisionConvNeXt(nn.Module):
    """torchvision ConvNeXt layout: features[0] = Sequential(Conv2d 4×4/4, LayerNorm2d)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 4, 4), LayerNorm2d(8)),
            nn.Sequential(nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.Conv2d(8, 8, 1)),
        )
        self.classifier = nn.Sequential(nn.Flatten(1), nn.Linear(8, 5))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3), keepdim=True))


class PatchEmbed(nn.Module):
    """timm's PatchEmbed: proj (Conv2d p×p stride p), then flatten to tokens."""

    def __init__(self, patch: int = 4, dim: int = 16) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimmViT(nn.Module):
    """timm ViT layout: a Linear positional MLP is *defined* first but called after patch_embed."""

    def __init__(self) -> None:
        super().__init__()
        self.pos_mlp = nn.Linear(16, 16)
        self.patch_embed = PatchEmbed()
        self.blocks = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x)
        return self.head(self.blocks(self.pos_mlp(tokens)).mean(1))


def _images(b: int = 2, c: int = 3, size: int = 16) -> Tensor:
    return torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (TorchvisionResNetStem, lambda m: m.conv1),
        (TorchvisionViT, lambda m: m.conv_proj),
        (TorchvisionConvNeXt, lambda m: m.features[0][0]),
        (TimmViT, lambda m: m.patch_embed.proj),
    ],
)
def test_torchvision_and_timm_layouts(build: type[nn.Module], expected: object) -> None:
    model = build()
    assert find_first_layer(model, _images()) is expected(model)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("build", "channels", "size", "attr"),
    [
        (models.cifar_resnet18, 3, 32, "conv1"),
        (models.cifar_vit, 3, 32, "patch_embed"),
        (models.digits_cnn, 1, 8, "conv1"),
        (models.digits_transformer, 1, 8, "patch_embed"),
    ],
)
def test_project_models(build: object, channels: int, size: int, attr: str) -> None:
    model = build()  # type: ignore[operator]
    assert find_first_layer(model, _images(2, channels, size)) is getattr(model, attr)


def test_restores_modes_and_leaves_no_hooks() -> None:
    model = TorchvisionResNetStem()
    model.train()
    model.bn1.eval()  # a mixed state must come back exactly
    before = {name: m.training for name, m in model.named_modules()}
    running = model.bn1.running_mean.clone()
    find_first_layer(model, _images())
    assert {name: m.training for name, m in model.named_modules()} == before
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(model.bn1.running_mean, running)


def test_channels_last_and_dropout_before_the_layer() -> None:
    """Dropout is inert in eval mode; channels_last is only a different memory layout."""
    conv = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(nn.Dropout(0.5), conv, nn.Flatten(), nn.LazyLinear(2))
    x = _images().to(memory_format=torch.channels_last)
    assert find_first_layer(model, x) is conv
    assert model.training


@settings(max_examples=20, deadline=None)
@given(
    patch=st.sampled_from([1, 2, 4]),
    channels=st.integers(1, 3),
    conv1d=st.booleans(),
)
def test_patch_reshapes_of_the_input_count_as_raw(patch: int, channels: int, conv1d: bool) -> None:
    """A Linear on patchified images, or a Conv1d on flattened pixels, receives the raw input."""
    n = channels * patch * patch
    first: nn.Module = nn.Conv1d(channels, 4, 3) if conv1d else nn.Linear(n, 4)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoy = nn.Linear(4, 4)  # defined first, called later
            self.first = first

        def forward(self, x: Tensor) -> Tensor:
            if conv1d:
                return self.decoy(self.first(x.flatten(2)).mean(-1))
            return self.decoy(self.first(models.patchify(x, patch)).mean(1))

    model = Model()
    assert find_first_layer(model, _images(2, channels, 8)) is first


def test_several_positional_arguments() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.time_mlp = nn.Linear(1, 4)  # runs first, on the second argument
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: Tensor, t: Tensor) -> Tensor:
            return self.conv(x) + self.time_mlp(t)[:, :, None, None]

    model = TwoInputs()
    assert find_first_layer(model, (_images(), torch.rand(2, 1))) is model.conv


@pytest.mark.parametrize(
    ("prefix", "needle"),
    [
        (lambda: nn.BatchNorm2d(3), "'1' (Conv2d)"),
        (lambda: nn.ConstantPad2d(1, 0.0), "'1' (Conv2d)"),
        (lambda: nn.Upsample(scale_factor=2), "'1' (Conv2d)"),
    ],
)
def test_transformed_input_is_an_error(prefix: object, needle: str) -> None:
    model = nn.Sequential(prefix(), nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))  # type: ignore[operator]
    model(_images())  # materialise the lazy layer
    with pytest.raises(ValueError, match="receives the raw input") as info:
        find_first_layer(model, _images())
    assert needle in str(info.value)


def test_dual_patchnorm_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"'patch_embed' \(Linear\)"):
        find_first_layer(models.cifar_vit(patch_norm="dual"), _images(2, 3, 32))


def test_functional_conv_on_the_input_is_an_error() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.head = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(F.conv2d(x, self.weight).mean(dim=(2, 3)))

    with pytest.raises(ValueError, match=r"'head' \(Linear\).*functional"):
        find_first_layer(Functional(), _images())


def test_no_supported_module_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"called no nn\.Linear"):
        find_first_layer(nn.Sequential(nn.Flatten(), nn.ReLU()), _images())


def test_constant_or_non_tensor_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="constant"):
        find_first_layer(nn.Conv2d(3, 4, 3), torch.zeros(2, 3, 8, 8))
    with pytest.raises(TypeError, match="Tensor"):
        find_first_layer(nn.Conv2d(3, 4, 3), ["not a tensor"])


# --- find_first_layers: parallel first layers ---------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: timm_like.RepVggStem(),
        lambda: timm_like.RepVggStem(kxk_branches=3),  # MobileOne's over-parameterised stem
        lambda: timm_like.TwoPatchEmbeddings(),
    ],
    ids=["repvgg", "mobileone", "two-patch-embeddings"],
)
def test_parallel_first_layers_are_all_found_and_preconditioned(
    build: Callable[[], timm_like.RepVggStem | timm_like.TwoPatchEmbeddings],
) -> None:
    """Every branch reading the raw input is found, in call order, and each gets its own
    update: Eq. 10 with its own rows, as if it were the only first layer."""
    torch.manual_seed(0)
    model = build()
    x = _images(4, 3, 16)
    found = find_first_layers(model, x)
    expected = model.first_layers()
    assert len(found) == len(expected) and all(a is b for a, b in zip(found, expected, strict=True))
    assert find_first_layer(model, x) is expected[0]
    raw, tract = tract_gradient(found, model, x, 0.1)
    for layer, g, t in zip(found, raw, tract, strict=True):
        assert_update(t, g, unfold_rows(layer, x), 0.1)


def test_find_first_layers_lists_a_layer_once_and_skips_transformed_inputs() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.normalised = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(3, 4, 1)

        def forward(self, x: Tensor) -> Tensor:
            y = self.a(x) + self.normalised(2 * x - 1)[..., :6, :6]
            return y + self.a(x) + self.b(x)[..., 1:-1, 1:-1]

    model = Model()
    assert find_first_layers(model, _images(2, 3, 8)) == [model.a, model.b]


def test_conv2d_same_receives_the_raw_input() -> None:
    """timm's Conv2dSame pads inside its forward, so the finder sees it take the raw input."""
    stem = timm_like.Conv2dSame(3, 4, 3, stride=2)
    model = nn.Sequential(stem, nn.ReLU(), nn.Conv2d(4, 4, 3))
    assert find_first_layers(model, _images()) == [stem]


def test_find_first_layers_error_names_itself() -> None:
    with pytest.raises(ValueError, match=r"find_first_layers: the forward pass called no"):
        find_first_layers(nn.Sequential(nn.Flatten(), nn.ReLU()), _images())
