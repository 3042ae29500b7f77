"""One training run, baseline or TrAct, resumable from a per-epoch checkpoint.

A run is fully described by a ``RunConfig``; its seed fixes the model's initialisation and the
data order, so a baseline and a TrAct run with the same seed start from the same weights and see
the same batches. A checkpoint after every epoch holds the model, optimizer, scheduler, history and
all RNG states, so a killed run continues to the same final numbers (bit-identical on CPU).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import data
import models
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tract_optim import TrActOptimizer, find_first_layer

MODELS: dict[str, Callable[[int], nn.Module]] = {
    "digits_cnn": models.digits_cnn,
    "digits_transformer": models.digits_transformer,
    "resnet18": models.cifar_resnet18,
    "vit": models.cifar_vit,
    "vit_patchnorm": lambda k: models.cifar_vit(k, patch_norm="patch"),
    "vit_dualpatchnorm": lambda k: models.cifar_vit(k, patch_norm="dual"),
}
OPTIMIZERS = ("sgd", "adam", "sgd_first_adam_rest")
SCHEDULES = ("cosine", "multistep_warmup")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one run; ``panel``/``series`` only say where it is plotted."""

    panel: str
    series: str
    dataset: str
    model: str
    optimizer: str
    lr: float
    epochs: int
    seed: int
    tract: bool
    lam: float = 0.1
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0
    first_lr: float = 0.08  # SGD lr of the first layer for "sgd_first_adam_rest"
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    input_range: str = "standard"
    augment: bool = False
    x_axis: str = "epochs"  # plotting hint: "epochs" or "lam"

    @property
    def run_id(self) -> str:
        """A file-name-safe identifier, unique within a results directory."""
        method = f"tract-lam{self.lam:g}" if self.tract else "baseline"
        parts = [self.dataset, self.model, self.optimizer, self.input_range, method]
        return "_".join([*parts, f"lr{self.lr:g}", f"e{self.epochs}", f"s{self.seed}"])

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Schedule:
    """Per-step lr factor: cosine over all steps, or the CIFAR-100 multi-step with warm-up.

    Multi-step: one linear warm-up epoch, then ×1, ×0.2, ×0.04, ×0.008 at 0, 60, 120, 160 of 200
    epochs (lr 0.1 → 0.02 → 0.004 → 0.0008), milestones scaled to other budgets.
    """

    def __init__(self, kind: str, epochs: int, steps_per_epoch: int) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
        self.kind = kind
        self.steps_per_epoch = steps_per_epoch
        self.total = epochs * steps_per_epoch

    def __call__(self, step: int) -> float:
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total) / self.total))
        if step < self.steps_per_epoch:
            return (step + 1) / self.steps_per_epoch
        fraction = step / self.total
        passed = sum(fraction >= m for m in (0.3, 0.6, 0.8))
        return 0.2**passed


def load_data(cfg: RunConfig, data_dir: Path) -> data.ImageData:
    """The dataset a run trains on (CPU tensors)."""
    if cfg.dataset == "digits":
        return data.load_digits_data()
    return data.load_cifar(cfg.dataset, data_dir, cfg.input_range)


def _inner_optimizer(
    cfg: RunConfig, model: nn.Module, first: nn.Module | None
) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
    wd = cfg.weight_decay
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), cfg.lr, cfg.momentum, weight_decay=wd)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), cfg.lr, weight_decay=wd)
    if cfg.optimizer == "sgd_first_adam_rest" and first is not None:
        first_ids = {id(p) for p in first.parameters()}
        rest = [p for p in model.parameters() if id(p) not in first_ids]
        return [
            torch.optim.SGD(first.parameters(), cfg.first_lr, cfg.momentum, weight_decay=wd),
            torch.optim.Adam(rest, cfg.lr, weight_decay=wd),
        ]
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")


@dataclass
class Trainer:
    """The live objects of one run."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    inner: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LambdaLR]
    generator: torch.Generator


def build(cfg: RunConfig, train_x: Tensor, device: torch.device) -> Trainer:
    """Model (seeded), optimizer (TrAct-wrapped when asked), per-step schedulers, data RNG."""
    torch.manual_seed(cfg.seed)
    model = MODELS[cfg.model](10 if cfg.dataset != "cifar100" else 100).to(device)
    # Baselines need no first layer (and the patch-normalised ViTs have none that sees raw pixels).
    first = None
    if cfg.tract or cfg.optimizer == "sgd_first_adam_rest":
        first = find_first_layer(model, train_x[:8].to(device))
    built = _inner_optimizer(cfg, model, first)
    inner = built if isinstance(built, list) else [built]
    steps = math.ceil(train_x.shape[0] / cfg.batch_size)
    schedule = Schedule(cfg.schedule, cfg.epochs, steps)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in inner]
    optimizer: torch.optim.Optimizer = inner[0]
    if first is not None and cfg.tract:
        optimizer = TrActOptimizer(built, first, lam=cfg.lam)
    elif len(inner) > 1:
        raise ValueError("several inner optimizers are only wired up with TrAct here")
    generator = torch.Generator().manual_seed(cfg.seed)
    return Trainer(model, optimizer, inner, schedulers, generator)


def _train_epoch(cfg: RunConfig, t: Trainer, d: data.ImageData) -> tuple[float, float]:
    """One epoch; returns mean train loss and accuracy (in train mode, on augmented data)."""
    t.model.train()
    loss_sum = torch.zeros((), device=d.train_x.device)
    correct = torch.zeros((), dtype=torch.long, device=d.train_x.device)
    for idx in data.batches(d.train_x.shape[0], cfg.batch_size, t.generator, d.train_x.device):
        x, y = d.train_x[idx], d.train_y[idx]
        if cfg.augment:
            x = data.augment(x, d.fill, t.generator)
        logits = t.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        t.optimizer.zero_grad()
        loss.backward()
        t.optimizer.step()
        for scheduler in t.schedulers:
            scheduler.step()
        loss_sum += loss.detach() * y.shape[0]  # summed on the device: no sync per step
        correct += (logits.argmax(1) == y).sum()
    n = d.train_x.shape[0]
    return float(loss_sum) / n, int(correct) / n


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on (x, y) in eval mode."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    return loss_sum / x.shape[0], correct / x.shape[0]


def _rng_state(t: Trainer) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "data": t.generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _save(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _restore(path: Path, cfg: RunConfig, t: Trainer) -> tuple[list[dict[str, float]], float]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt["config"] != cfg.as_dict():
        raise ValueError(f"{path} belongs to another configuration; delete it or change --out")
    t.model.load_state_dict(ckpt["model"])
    t.optimizer.load_state_dict(ckpt["optimizer"])
    for scheduler, state in zip(t.schedulers, ckpt["schedulers"], strict=True):
        scheduler.load_state_dict(state)
    torch.set_rng_state(ckpt["rng"]["torch"])
    t.generator.set_state(ckpt["rng"]["data"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["history"], ckpt["wall_time_s"]


def train_run(
    cfg: RunConfig,
    d: data.ImageData,
    device: torch.device,
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train one run (continuing from ``checkpoint`` if it exists) and return its results.

    ``d`` must already be on ``device``. ``on_epoch(epoch, record)`` is called after each epoch's
    checkpoint is written, so interrupting a run from there loses nothing.
    """
    t = build(cfg, d.train_x, device)
    history: list[dict[str, float]] = []
    wall = 0.0
    if checkpoint is not None and checkpoint.exists():
        history, wall = _restore(checkpoint, cfg, t)
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        start = time.perf_counter()
        train_loss, train_acc = _train_epoch(cfg, t, d)
        test_loss, test_acc = evaluate(t.model, d.test_x, d.test_y)
        wall += time.perf_counter() - start
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "lr": t.inner[-1].param_groups[0]["lr"],
        }
        history.append(record)
        if checkpoint is not None:
            payload = {
                "config": cfg.as_dict(),
                "model": t.model.state_dict(),
                "optimizer": t.optimizer.state_dict(),
                "schedulers": [s.state_dict() for s in t.schedulers],
                "rng": _rng_state(t),
                "history": history,
                "wall_time_s": wall,
            }
            _save(checkpoint, payload)
        if on_epoch is not None:
            on_epoch(epoch, record)
    if isinstance(t.optimizer, TrActOptimizer):
        t.optimizer.remove()
    return {
        "run_id": cfg.run_id,
        "config": cfg.as_dict(),
        "history": history,
        "final_test_acc": history[-1]["test_acc"],
        "final_test_loss": history[-1]["test_loss"],
        "wall_time_s": wall,
        "device": str(device),
        "torch": torch.__version__,
    }
