"""Datasets for the demo and the paper presets, as tensors, plus batching and augmentation.

Digits come from scikit-learn. CIFAR-10/100 are read from torchvision's on-disk format (the python
pickle batches ``cifar-10-batches-py`` / ``cifar-100-python``) with pickle and numpy, so neither
torchvision nor a network connection is needed once the data is there. Every loader returns its
images in one of three input ranges (the paper's Fig. 8): standardised, [0, 1] or [0, 255].
"""

from __future__ import annotations

import pickle
import tarfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class CifarSpec:
    """Where a CIFAR variant lives on disk and online, and its normalisation constants."""

    folder: str
    url: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: bytes
    classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    torchvision_name: str


CIFAR = {
    "cifar10": CifarSpec(
        "cifar-10-batches-py",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2023, 0.1994, 0.2010),
        "CIFAR10",
    ),
    "cifar100": CifarSpec(
        "cifar-100-python",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        ("train",),
        ("test",),
        b"fine_labels",
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        "CIFAR100",
    ),
}

#: How pixel values reach the model (Fig. 8): standardised, in [0, 1], or in [0, 255].
INPUT_RANGES = ("standard", "unit", "byte")


@dataclass(frozen=True)
class Augmentation:
    """A training-time augmentation: a random crop of the ``pad``-px black-padded image (a random
    shift by up to ±``pad`` px per axis), optionally followed by a random horizontal flip."""

    pad: int
    flip: bool
    description: str


AUGMENTATIONS = {
    "none": Augmentation(0, False, "none"),
    "shift1": Augmentation(
        1, False, "random shift by up to ±1 px per axis (random crop of the 1-px black-padded "
        "image), no flips",
    ),
    "crop4_flip": Augmentation(
        4, True, "random crop of the 4-px black-padded image, then random horizontal flip",
    ),
}  # fmt: skip


class DataMissingError(RuntimeError):
    """The CIFAR files are not where they were looked for."""


@dataclass
class ImageData:
    """A train/test split as float tensors (N, C, H, W), with what augmentation pads with."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    fill: Tensor  # per-channel value of a black pixel in this input range (crop padding)

    def to(self, device: torch.device) -> ImageData:
        """The same data on ``device``."""
        return ImageData(
            self.train_x.to(device),
            self.train_y.to(device),
            self.test_x.to(device),
            self.test_y.to(device),
            self.num_classes,
            self.fill.to(device),
        )


DIGITS_MAX = 16.0  # scikit-learn's digits are integer intensities 0 … 16


def load_digits_data(
    input_range: str = "standard",
    validation: bool = False,
    test_fraction: float = 0.3,
    split_seed: int = 0,
) -> ImageData:
    """scikit-learn's 1,797 8×8 digits, a fixed stratified train/test split, in ``input_range``.

    With ``validation`` the test images are left out entirely: a fixed stratified 20 % of the
    training images becomes the held-out set (``test_x``) and the rest is trained on, so that
    learning rates can be tuned without looking at the test set. "standard" subtracts the mean
    and divides by the standard deviation of the images trained on; "unit" maps 0 … 16 to
    [0, 1] and "byte" to [0, 255].
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_range(input_range)
    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, bunch.target, test_size=test_fraction, random_state=split_seed,
        stratify=bunch.target,
    )  # fmt: skip
    if validation:
        x_tr, x_te, y_tr, y_te = train_test_split(
            x_tr, y_tr, test_size=0.2, random_state=split_seed, stratify=y_tr
        )
    if input_range == "standard":
        shift, scale = float(x_tr.mean()), float(x_tr.std())
    else:
        shift, scale = 0.0, DIGITS_MAX / (1.0 if input_range == "unit" else 255.0)
    return ImageData(
        torch.from_numpy((x_tr - shift) / scale),
        torch.from_numpy(y_tr).long(),
        torch.from_numpy((x_te - shift) / scale),
        torch.from_numpy(y_te).long(),
        10,
        torch.full((1,), -shift / scale),
    )


def _check_range(input_range: str) -> None:
    if input_range not in INPUT_RANGES:
        raise ValueError(f"input_range must be one of {INPUT_RANGES}, got {input_range!r}")


def _missing_message(dataset: str, root: Path) -> str:
    spec = CIFAR[dataset]
    return (
        f"{dataset}: no '{spec.folder}' folder in {root}. Either rerun with --download (needs "
        f"internet), or fetch {spec.url} yourself and unpack it there "
        f"(tar -xzf {spec.url.rsplit('/', 1)[-1]} -C {root}); torchvision's "
        f"{spec.torchvision_name}(root, download=True) leaves the same folder. "
        "Point --data-dir at the directory that contains it."
    )


def download_cifar(dataset: str, root: Path) -> None:
    """Fetch and unpack the official tarball into ``root`` (skipped when already there)."""
    spec = CIFAR[dataset]
    if (root / spec.folder).is_dir():
        return
    root.mkdir(parents=True, exist_ok=True)
    archive = root / spec.url.rsplit("/", 1)[-1]
    print(f"downloading {spec.url} → {archive}")
    urllib.request.urlretrieve(spec.url, archive)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # Python ≥ 3.10.12 / 3.11.4: refuse unsafe members
            tar.extractall(root, filter="data")
        else:
            tar.extractall(root)  # the official archive holds only plain files
    archive.unlink()


def _read_batches(folder: Path, names: tuple[str, ...], label_key: bytes) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _to_range(images: Tensor, input_range: str, mean: Tensor, std: Tensor) -> Tensor:
    x = images.float()
    if input_range == "byte":
        return x
    x = x / 255.0
    if input_range == "unit":
        return x
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def load_cifar(dataset: str, root: Path, input_range: str = "standard") -> ImageData:
    """CIFAR-10/100 from torchvision's pickle batches under ``root``, in ``input_range``."""
    _check_range(input_range)
    spec = CIFAR[dataset]
    folder = root / spec.folder
    if not folder.is_dir():
        raise DataMissingError(_missing_message(dataset, root))
    train_x, train_y = _read_batches(folder, spec.train, spec.label_key)
    test_x, test_y = _read_batches(folder, spec.test, spec.label_key)
    mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
    black = _to_range(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), input_range, mean, std)
    return ImageData(
        _to_range(train_x, input_range, mean, std),
        train_y,
        _to_range(test_x, input_range, mean, std),
        test_y,
        spec.classes,
        black.reshape(3),
    )


def augment(x: Tensor, fill: Tensor, generator: torch.Generator, how: Augmentation) -> Tensor:
    """Apply ``how`` to a batch: each image is cropped at its own random offset from the
    ``how.pad``-px padded image (padding value ``fill``, per channel) and, with ``how.flip``,
    mirrored left-right with probability ½."""
    pad = how.pad
    b, c, h, w = x.shape
    padded = fill.view(1, c, 1, 1).expand(b, c, h + 2 * pad, w + 2 * pad).clone()
    padded[:, :, pad : pad + h, pad : pad + w] = x
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    if how.flip:
        flip = torch.rand(b, generator=generator).to(x.device) < 0.5
        cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def batches(
    n: int, batch_size: int, generator: torch.Generator, device: torch.device
) -> Iterator[Tensor]:
    """Indices of one shuffled epoch, ``batch_size`` at a time (the last batch may be smaller)."""
    order = torch.randperm(n, generator=generator).to(device)
    yield from order.split(batch_size)
