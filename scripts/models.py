"""Models of the paper's CIFAR experiments, of the small digits demo and of the GPU benchmark.

Each model's first layer is a plain ``nn.Conv2d`` or ``nn.Linear`` that receives the raw input (or
a reshape of it), so ``tract_optim.find_first_layer`` finds it and TrAct can precondition it.

The benchmark's ImageNet models (``ResNet``, ``ViT``) follow the published architectures, so a
training step costs what it costs in practice: ResNet-50 (He et al. 2016, bottleneck blocks with
the stride on the 3×3 convolution as in torchvision) and ViT-S/16 (Dosovitskiy et al. 2021 with
the DeiT-S sizes: 384 wide, 12 blocks, 6 heads, MLP 1536, class token, pre-norm), without
torchvision or timm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: How the patch-embedding transformers treat the patches before/after the first layer (Fig. 7).
PATCH_NORMS = ("none", "patch", "dual")


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) images → (B, H/p · W/p, C · p · p) non-overlapping patches, row-major order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """A residual block's shortcut: the identity, or a strided 1×1 projection with batch norm
    where the block changes the shape."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convs with batch norm and an identity/projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)

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


# ---------------------------------------------------------------------------------------------
# ImageNet models of the GPU benchmark


class Bottleneck(nn.Module):
    """1×1 → 3×3 (stride here) → 1×1 with 4× expansion, batch norm, projection shortcut."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Bottleneck ResNet for 224×224 images: stem ``conv1`` 7×7/2 (3 → ``width``), max-pool, four
    stages of ``depths`` blocks of widths ``width``·(1, 2, 4, 8). The defaults are ResNet-50
    (25.6M parameters with 1000 classes)."""

    def __init__(
        self,
        depths: tuple[int, int, int, int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        width: int = 64,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks: list[nn.Module] = []
        cin = width
        for scale, depth, stride in zip((1, 2, 4, 8), depths, (1, 2, 2, 2), strict=True):
            for i in range(depth):
                blocks.append(Bottleneck(cin, scale * width, stride if i == 0 else 1))
                cin = 4 * scale * width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.fc(self.blocks(x).mean(dim=(2, 3)))  # type: ignore[no-any-return]


class ViTBlock(nn.Module):
    """Pre-norm transformer block: attention (``scaled_dot_product_attention``) and a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, d/heads)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))  # type: ignore[no-any-return]


class ViT(nn.Module):
    """Vision transformer with a class token and a ``Conv2d`` patch embedding ``patch_embed`` on
    the raw image (unlike ``PatchTransformer``'s ``Linear`` on patches). The defaults are ViT-S/16
    (16×16 patches, 3 → 384; 22.1M parameters with 1000 classes at 224²)."""

    def __init__(
        self,
        image_size: int = 224,
        patch: int = 16,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp: int = 1536,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, tokens, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])  # type: ignore[no-any-return]
