"""One training run, baseline or TrAct, resumable from a per-epoch checkpoint.

A run is fully described by a ``RunConfig``; its seed fixes the model's initialisation and the
data order, so a baseline and a TrAct run with the same seed start from the same weights and see
the same batches. A checkpoint after every epoch holds the model, optimizer, scheduler, history and
all RNG states, so a killed run continues to the same final numbers (bit-identical on CPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from scripts import data, models
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


EVAL_SPLITS = ("test", "validation")
#: Settings added after results were published, at their defaults: ``RunConfig.as_dict`` leaves
#: them out, so that the run ids and recorded configs of earlier runs stay valid (``--resume``).
LATER_DEFAULTS: dict[str, Any] = {"stats_every": 1}


@dataclass(frozen=True)
class RunConfig:
    """Every setting that determines one run (and nothing else, so equal configs are one run).

    ``lam`` is TrAct's damping (``None`` for a baseline); ``stats_every`` is TrAct's statistics
    refresh interval (1: exact TrAct). ``augment`` names an entry of ``data.AUGMENTATIONS``.
    ``evaluate_on="validation"`` trains on the training images minus a held-out 20 % and
    evaluates on those (learning-rate tuning); "test" trains on all training images and
    evaluates on the test set.
    """

    dataset: str
    model: str
    optimizer: str
    lr: float
    epochs: int
    seed: int
    lam: float | None = None
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0
    first_lr: float = 0.08  # SGD lr of the first layer for "sgd_first_adam_rest"
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    input_range: str = "standard"
    augment: str = "none"
    evaluate_on: str = "test"
    stats_every: int = 1

    def __post_init__(self) -> None:
        checks = [
            ("model", self.model, tuple(MODELS)),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("schedule", self.schedule, SCHEDULES),
            ("input_range", self.input_range, data.INPUT_RANGES),
            ("augment", self.augment, tuple(data.AUGMENTATIONS)),
            ("evaluate_on", self.evaluate_on, EVAL_SPLITS),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"RunConfig.{name} must be one of {allowed}, got {value!r}")
        if self.lam is not None and not self.lam > 0:
            raise ValueError(f"RunConfig.lam must be > 0 (or None for a baseline), got {self.lam}")
        if isinstance(self.stats_every, bool) or not (
            isinstance(self.stats_every, int) and self.stats_every >= 1
        ):
            raise ValueError(f"RunConfig.stats_every must be an int >= 1, got {self.stats_every!r}")
        if self.stats_every > 1 and self.lam is None:
            raise ValueError("RunConfig.stats_every > 1 is a TrAct setting: set lam")
        if self.optimizer == "sgd_first_adam_rest" and self.lam is None:
            raise ValueError("optimizer 'sgd_first_adam_rest' is only wired up with TrAct: set lam")

    @property
    def run_id(self) -> str:
        """A readable, file-name-safe identifier, unique per configuration (it ends in a hash
        of every setting)."""
        method = f"tract-lam{self.lam:g}" if self.lam is not None else "baseline"
        method += f"-every{self.stats_every}" if self.stats_every > 1 else ""
        parts = [self.dataset, self.model, self.optimizer, self.input_range, method]
        digest = hashlib.sha1(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()
        return "_".join([*parts, f"lr{self.lr:g}", f"e{self.epochs}", f"s{self.seed}", digest[:8]])

    def as_dict(self) -> dict[str, Any]:
        """Every setting, except those of ``LATER_DEFAULTS`` at their defaults."""
        return {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k]
        }


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
    """The dataset a run trains and evaluates on (CPU tensors)."""
    validation = cfg.evaluate_on == "validation"
    if cfg.dataset == "digits":
        return data.load_digits_data(cfg.input_range, validation)
    if validation:
        raise ValueError("evaluate_on='validation' is implemented for the digits demo only")
    return data.load_cifar(cfg.dataset, data_dir, cfg.input_range)


def _inner_optimizer(
    cfg: RunConfig, model: nn.Module, first: nn.Module | None
) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
    wd = cfg.weight_decay
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), cfg.lr, cfg.momentum, weight_decay=wd)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), cfg.lr, weight_decay=wd)
    if first is not None:  # "sgd_first_adam_rest"
        first_ids = {id(p) for p in first.parameters()}
        rest = [p for p in model.parameters() if id(p) not in first_ids]
        return [
            torch.optim.SGD(first.parameters(), cfg.first_lr, cfg.momentum, weight_decay=wd),
            torch.optim.Adam(rest, cfg.lr, weight_decay=wd),
        ]
    raise ValueError("optimizer 'sgd_first_adam_rest' needs the first layer")


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
    first = find_first_layer(model, train_x[:8].to(device)) if cfg.lam is not None else None
    built = _inner_optimizer(cfg, model, first)
    inner = built if isinstance(built, list) else [built]
    steps = math.ceil(train_x.shape[0] / cfg.batch_size)
    schedule = Schedule(cfg.schedule, cfg.epochs, steps)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in inner]
    optimizer: torch.optim.Optimizer = inner[0]
    if first is not None and cfg.lam is not None:  # both set together; the check is for mypy
        optimizer = TrActOptimizer(built, first, lam=cfg.lam, stats_every=cfg.stats_every)
    generator = torch.Generator().manual_seed(cfg.seed)
    return Trainer(model, optimizer, inner, schedulers, generator)


def _train_epoch(cfg: RunConfig, t: Trainer, d: data.ImageData) -> float:
    """One epoch; returns the mean loss over its (augmented) mini-batches, as the optimizer saw
    them (not finite if any batch's loss was not)."""
    t.model.train()
    how = data.AUGMENTATIONS[cfg.augment]
    loss_sum = torch.zeros((), device=d.train_x.device)
    for idx in data.batches(d.train_x.shape[0], cfg.batch_size, t.generator, d.train_x.device):
        x, y = d.train_x[idx], d.train_y[idx]
        if how.pad or how.flip:
            x = data.augment(x, d.fill, t.generator, how)
        loss = F.cross_entropy(t.model(x), y, label_smoothing=cfg.label_smoothing)
        t.optimizer.zero_grad()
        loss.backward()
        t.optimizer.step()
        for scheduler in t.schedulers:
            scheduler.step()
        loss_sum += loss.detach() * y.shape[0]  # summed on the device: no sync per step
    return float(loss_sum) / d.train_x.shape[0]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy (nats) and accuracy on (x, y) in eval mode, without augmentation."""
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


def _restore(path: Path, cfg: RunConfig, t: Trainer) -> tuple[list[dict[str, Any]], float]:
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


def _finite(value: float) -> float | None:
    """``value``, or ``None`` (JSON ``null``) if it is NaN or infinite."""
    return value if math.isfinite(value) else None


def _diverged(record: dict[str, Any]) -> bool:
    """Whether an epoch's record shows a non-finite training loss."""
    return record["batch_loss"] is None or record["train_loss"] is None


def train_run(
    cfg: RunConfig,
    d: data.ImageData,
    device: torch.device,
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train one run (continuing from ``checkpoint`` if it exists) and return its results.

    ``d`` must already be on ``device``. After every epoch the model is evaluated on the whole
    un-augmented training set and on the held-out set. A run whose training loss stops being
    finite is marked ``diverged`` and ends there (its losses are recorded as ``None``).
    ``on_epoch(epoch, record)`` is called after each epoch's checkpoint is written, so
    interrupting a run from there loses nothing.
    """
    t = build(cfg, d.train_x, device)
    history: list[dict[str, Any]] = []
    wall = 0.0
    if checkpoint is not None and checkpoint.exists():
        history, wall = _restore(checkpoint, cfg, t)
    diverged = bool(history) and _diverged(history[-1])
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        if diverged:
            break
        start = time.perf_counter()
        batch_loss = _train_epoch(cfg, t, d)
        train_loss, train_acc = evaluate(t.model, d.train_x, d.train_y)
        test_loss, test_acc = evaluate(t.model, d.test_x, d.test_y)
        wall += time.perf_counter() - start
        record = {
            "epoch": epoch,
            "train_loss": _finite(train_loss),
            "train_acc": train_acc,
            "test_loss": _finite(test_loss),
            "test_acc": test_acc,
            "batch_loss": _finite(batch_loss),
            "lr": t.inner[-1].param_groups[0]["lr"],
        }
        history.append(record)
        diverged = _diverged(record)
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
    last = history[-1]
    return {
        "run_id": cfg.run_id,
        "config": cfg.as_dict(),
        "augmentation": data.AUGMENTATIONS[cfg.augment].description,
        "history": history,
        "final_test_acc": last["test_acc"],
        "final_test_loss": last["test_loss"],
        "final_train_loss": last["train_loss"],
        "final_train_acc": last["train_acc"],
        "diverged": diverged,
        "wall_time_s": wall,
        "device": str(device),
        "torch": torch.__version__,
    }
