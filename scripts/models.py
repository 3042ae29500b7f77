"""Models of the paper's CIFAR experiments and of the small digits demo.

Each model's first layer is a plain ``nn.Conv2d`` or ``nn.Linear`` that receives the raw input (or
a reshape of it), so ``tract_optim.find_first_layer`` finds it and TrAct can precondition it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: How the patch-embedding transformers treat the patches before/after the first layer (Fig. 7).
PATCH_NORMS = ("none", "patch", "dual")


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) images → (B, H/p · W/p, C · p · p) non-overlapping patches, row-major order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convs with batch norm and an identity/projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet-18 for 32×32 images: 3×3 stride-1 stem ``conv1`` (n = 27), no max-pool."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)))
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(out.mean(dim=(2, 3)))


class PatchTransformer(nn.Module):
    """A pre-norm ViT with a class token; ``patch_embed`` is an ``nn.Linear`` on flattened patches.

    ``patch_norm`` selects the Fig. 7 baselines: ``"patch"`` standardises every patch on its own
    before the embedding, ``"dual"`` is Dual PatchNorm (LayerNorm before and after the embedding).
    """

    def __init__(
        self,
        *,
        image_size: int,
        channels: int,
        patch: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: int,
        num_classes: int,
        patch_norm: str = "none",
    ) -> None:
        super().__init__()
        if patch_norm not in PATCH_NORMS:
            raise ValueError(f"patch_norm must be one of {PATCH_NORMS}, got {patch_norm!r}")
        self.patch = patch
        self.patch_norm = patch_norm
        n = channels * patch * patch
        tokens = (image_size // patch) ** 2
        self.pre_norm: nn.Module = nn.LayerNorm(n) if patch_norm == "dual" else nn.Identity()
        self.patch_embed = nn.Linear(n, dim)
        self.post_norm: nn.Module = nn.LayerNorm(dim) if patch_norm == "dual" else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, mlp_ratio * dim, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = patchify(images, self.patch)
        if self.patch_norm == "patch":
            x = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-6)
        x = self.post_norm(self.patch_embed(self.pre_norm(x)))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.encoder(x))[:, 0])


def cifar_resnet18(num_classes: int = 10) -> CifarResNet18:
    """The paper's CIFAR ResNet-18 (first layer ``conv1``: 3×3, stride 1, 3 → 64 channels)."""
    return CifarResNet18(num_classes)


def cifar_vit(num_classes: int = 10, patch_norm: str = "none") -> PatchTransformer:
    """The paper's small CIFAR ViT: 7 layers, 12 heads, hidden 384, 4×4 patches (Linear 48→384).

    The MLP width is 384 too (as in the widely used ViT-CIFAR recipe with these sizes, ~6.3M
    parameters), with a class token and pre-norm blocks.
    """
    return PatchTransformer(
        image_size=32, channels=3, patch=4, dim=384, depth=7, heads=12, mlp_ratio=1,
        num_classes=num_classes, patch_norm=patch_norm,
    )  # fmt: skip


class DigitsCNN(nn.Module):
    """A small CNN for 8×8 digits; ``conv1`` (3×3, 1 → 16 channels, n = 9) is the first layer."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(self.conv1(x)).mean(dim=(2, 3)))


def digits_cnn(num_classes: int = 10) -> DigitsCNN:
    """The demo's small CNN."""
    return DigitsCNN(num_classes)


def digits_transformer(num_classes: int = 10) -> PatchTransformer:
    """The demo's small ViT on 8×8 digits: 4×4 patches (Linear 16 → 64), 2 layers, 4 heads."""
    return PatchTransformer(
        image_size=8, channels=1, patch=4, dim=64, depth=2, heads=4, mlp_ratio=2,
        num_classes=num_classes,
    )  # fmt: skip
