"""Minimal ImageNet models for ``scripts/bench.py``: ResNet-50 and ViT-S/16 (no torchvision/timm).

Both follow the published architectures (ResNet-50: He et al. 2016, bottleneck blocks with the
stride on the 3×3 convolution as in torchvision; ViT-S/16: Dosovitskiy et al. 2021 with the
DeiT-S sizes, 384 wide, 12 blocks, 6 heads, MLP 1536, class token, pre-norm), so a training step
costs what it costs in practice. The first layer of each is a plain ``nn.Conv2d`` on the raw
image: ``conv1`` (7×7, stride 2, 3 → 64) and ``patch_embed`` (16×16, stride 16, 3 → 384).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Bottleneck ResNet for 224×224 images: stem ``conv1`` 7×7/2, max-pool, four stages of
    ``depths`` blocks of widths ``width``·(1, 2, 4, 8) (ResNet-50: 3, 4, 6, 3 and 64)."""

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


class Block(nn.Module):
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
    """Vision transformer with a Conv2d patch embedding ``patch_embed`` and a class token."""

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
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, tokens, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])  # type: ignore[no-any-return]


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 (25.6M parameters with 1000 classes); first layer ``conv1``."""
    return ResNet((3, 4, 6, 3), num_classes)


def vit_s16(num_classes: int = 1000, image_size: int = 224) -> ViT:
    """ViT-S/16 (22.1M parameters with 1000 classes at 224²); first layer ``patch_embed``."""
    return ViT(image_size=image_size, num_classes=num_classes)
