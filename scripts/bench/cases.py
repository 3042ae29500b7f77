"""What is benchmarked: first layers alone, whole CIFAR models, and the ImageNet stem at growing
batch sizes (memory only)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import nn

from scripts import models


@dataclass(frozen=True)
class Case:
    """A model, the dotted name of its first layer, an input batch shape and how to run it."""

    name: str
    build: Callable[[], nn.Module]
    first: str
    shape: tuple[int, ...]
    whole_model: bool = False
    classes: int = 0
    amp: bool = False  # forward under bf16 autocast
    compiled: bool = False  # the model wrapped in torch.compile

    def describe(self) -> str:
        """The case's name in the tables: name, input shape and the bf16/compiled tags."""
        tags = [tag for tag, on in (("bf16", self.amp), ("compiled", self.compiled)) if on]
        mode = "".join(f", {tag}" for tag in tags)
        return f"{self.name} (input {'×'.join(map(str, self.shape))}{mode})"


def _conv(cin: int, cout: int, k: int, stride: int, pad: int) -> Callable[[], nn.Module]:
    return lambda: nn.Conv2d(cin, cout, k, stride, pad)


def _linear(n: int, m: int) -> Callable[[], nn.Module]:
    return lambda: nn.Linear(n, m)


def cifar_stem(batch: int) -> Case:
    return Case("CIFAR stem 3→64 3×3/1", _conv(3, 64, 3, 1, 1), "", (batch, 3, 32, 32))


def imagenet_stem(batch: int, size: int = 224) -> Case:
    return Case("ImageNet stem 3→64 7×7/2", _conv(3, 64, 7, 2, 3), "", (batch, 3, size, size))


def vit_patch(batch: int, size: int = 224) -> Case:
    return Case("ViT-S/16 patch 3→384", _conv(3, 384, 16, 16, 0), "", (batch, 3, size, size))


def layer_cases(quick: bool) -> list[Case]:
    """First layers alone (the model is the layer; backward from a fixed random output gradient)."""
    b = (16, 2, 4, 4) if quick else (128, 32, 64, 64)  # --quick: smaller batches
    return [
        cifar_stem(b[0]),
        imagenet_stem(b[1]),
        vit_patch(b[2]),
        Case("patch 32 (n=3072) 3→384", _conv(3, 384, 32, 32, 0), "", (b[3], 3, 224, 224)),
        Case("Linear 784→256 (r<n)", _linear(784, 256), "", (32, 784)),
    ]


def model_cases() -> list[Case]:
    """Whole models of the paper (cross-entropy loss on random labels)."""
    return [
        Case("CIFAR ResNet-18", models.cifar_resnet18, "conv1", (128, 3, 32, 32), True, 10),
        Case("CIFAR ViT (paper)", models.cifar_vit, "patch_embed", (128, 3, 32, 32), True, 10),
    ]


def memory_cases(quick: bool) -> list[Case]:
    """The ImageNet stem at growing batch sizes (memory only)."""
    batches = (1, 2) if quick else (8, 32, 128)
    return [replace(imagenet_stem(b), name=f"ImageNet stem, batch {b}") for b in batches]


def all_cases(quick: bool, with_models: bool) -> dict[str, list[Case]]:
    """The timed cases (layers, then whole models) and the memory-only cases, by kind."""
    timed = layer_cases(quick) + (model_cases() if with_models else [])
    return {"timed": timed, "memory": memory_cases(quick)}


def case_by_id(case_id: str, quick: bool) -> Case:
    """The case ``KIND:INDEX`` of ``all_cases`` (how the memory subprocess is told its case)."""
    kind, index = case_id.split(":")
    return all_cases(quick, True)[kind][int(index)]
