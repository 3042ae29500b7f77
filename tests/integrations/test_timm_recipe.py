"""The README's timm recipe, with plain-torch stand-ins for the timm pieces it uses.

timm needs torchvision, which has no CPU wheel for torch 2.13 on the index CI installs from, so
timm cannot run here. The stand-ins below have timm 1.0's names and call signatures and do to the
optimizer and model what timm's do (the parts that matter to TrAct):

* ``create_optimizer_v2``: one AdamW with two parameter groups, weight decay only on weights of
  two or more dimensions;
* ``CosineLRScheduler``: records ``initial_lr`` in every ``param_group`` and writes ``lr`` into
  them on ``step_update`` (so it goes through ``TrActOptimizer.param_groups``);
* ``NativeScaler``: ``scale(loss).backward()``, then on the update step (``need_update``) the
  optional unscale-and-clip, ``scaler.step(optimizer)``, ``scaler.update()``;
* ``ModelEmaV3``: a ``deepcopy`` of the model, lerped towards it, evaluated in eval mode.

The loop is the README's; every inner step is checked against the float64 reference, with the
gradient unscaled by the GradScaler and clipped by ``clip_grad_norm=``, TrAct going in either as
a ``TrActOptimizer`` around the optimizer or as a ``TrActPreconditioner`` attached to it.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, TensorDataset

from tests.integrations._frameworks import (
    UpdateRecorder,
    check_step,
    expected,
    framework_data,
    framework_net,
)
from tests.kit import ErrorLog, max_relative_error
from tract_optim import TrActOptimizer, TrActPreconditioner

LAM = 0.1
LR = 0.05
CLIP = 0.05
STEPS = 3


def create_optimizer_v2(model: nn.Module, opt: str, lr: float, weight_decay: float) -> Optimizer:
    """Stand-in for ``timm.optim.create_optimizer_v2`` with ``opt="adamw"``: one AdamW, no
    weight decay on biases and norms."""
    assert opt == "adamw"
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=lr)


class CosineLRScheduler:
    """Stand-in for ``timm.scheduler.CosineLRScheduler(opt, t_initial, t_in_epochs=False)``."""

    def __init__(self, optimizer: Optimizer, t_initial: int, t_in_epochs: bool = True) -> None:
        assert not t_in_epochs
        self.optimizer, self.t_initial = optimizer, t_initial
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def step_update(self, num_updates: int) -> None:
        for group in self.optimizer.param_groups:
            cosine = 1 + math.cos(math.pi * num_updates / self.t_initial)
            group["lr"] = 0.5 * group["initial_lr"] * cosine


class NativeScaler:
    """Stand-in for ``timm.utils.NativeScaler`` on CPU (``torch.amp.GradScaler``)."""

    def __init__(self, device: str = "cpu") -> None:
        self._scaler = torch.amp.GradScaler(device, init_scale=2.0**10)

    def __call__(
        self,
        loss: Tensor,
        optimizer: Optimizer,
        clip_grad: float | None = None,
        parameters: Any = None,
        need_update: bool = True,
    ) -> None:
        self._scaler.scale(loss).backward()
        if need_update:
            if clip_grad is not None:
                self._scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
            self._scaler.step(optimizer)
            self._scaler.update()


class ModelEmaV3(nn.Module):
    """Stand-in for ``timm.utils.ModelEmaV3``: a deep copy of the model, lerped after each step."""

    def __init__(self, model: nn.Module, decay: float = 0.9998) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        for ema, p in zip(self.module.parameters(), model.parameters(), strict=True):
            ema.lerp_(p, 1 - self.decay)


def build(
    model: nn.Module, form: str, split: bool, clip: float | None, total_steps: int = STEPS
) -> tuple[Any, ...]:
    """The README's timm set-up, on the stand-ins. ``first`` would be
    ``model.get_submodule(model.pretrained_cfg["first_conv"])`` for a timm model.

    ``form``: "TrActOptimizer" wraps the optimizer; "attach" attaches a preconditioner to the
    optimizer ``create_optimizer_v2`` built ("attach, fused": to a fused AdamW with its groups).
    ``split``: SGD for the first layer and AdamW for the rest (several inner optimizers, the
    paper's Fig. 9 set-up; TrActOptimizer only, as NativeScaler steps one optimizer).
    """
    first = model.conv1
    base: Optimizer | list[Optimizer]
    if form != "TrActOptimizer":
        opt = create_optimizer_v2(model, "adamw", lr=LR, weight_decay=0.05)
        if form == "attach, fused":
            opt = fused_adamw(opt)
        tract = TrActPreconditioner(first, lam=LAM, clip_grad_norm=clip)
        tract.attach(opt)
    elif split:
        rest = nn.ModuleDict({"head": model.head})
        sgd = torch.optim.SGD(first.parameters(), lr=LR, momentum=0.9)
        base = [sgd, create_optimizer_v2(rest, "adamw", lr=LR, weight_decay=0.05)]
        opt = TrActOptimizer(base, first, lam=LAM, clip_grad_norm=clip)
    else:
        base = create_optimizer_v2(model, "adamw", lr=LR, weight_decay=0.05)
        opt = TrActOptimizer(base, first, lam=LAM, clip_grad_norm=clip)
    sched = CosineLRScheduler(opt, t_initial=total_steps, t_in_epochs=False)
    scaler = NativeScaler()
    ema = ModelEmaV3(model, decay=0.9998)
    return opt, sched, scaler, ema


def fused_adamw(opt: Optimizer) -> Optimizer:
    """A fused AdamW with ``opt``'s parameter groups and weight decays (what a config system's
    ``fused=True`` builds). A GradScaler leaves its gradients scaled: its kernel unscales them."""
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
    return torch.optim.AdamW(groups, lr=LR, fused=True)


def train(
    form: str,
    split: bool,
    clip: float | None,
    accumulate: int,
    timm_clip: float | None = None,
) -> UpdateRecorder:
    """STEPS updates of ``accumulate`` fp16-autocast micro-batches, as timm's train.py runs them."""
    model = framework_net()
    opt, sched, scaler, ema = build(model, form, split, clip)
    recorder = UpdateRecorder(model, scaler=scaler._scaler)
    recorder.watch(opt.optimizers if isinstance(opt, TrActOptimizer) else [opt])
    loader = DataLoader(TensorDataset(*framework_data(4 * STEPS * accumulate)), batch_size=4)
    device = torch.device("cpu")
    num_updates = 0
    for step, (x, y) in enumerate(loader):
        need_update = (step + 1) % accumulate == 0
        with torch.autocast(device.type, dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        if timm_clip is None:
            scaler(loss, opt, need_update=need_update)
        else:  # what timm's --clip-grad does
            scaler(loss, opt, timm_clip, model.parameters(), need_update=need_update)
        if need_update:
            opt.zero_grad()
            num_updates += 1
            sched.step_update(num_updates)
            ema.update(model, step=num_updates)
            with torch.no_grad():
                ema.module(x)  # validation on the EMA copy: no statistics, no effect
    return recorder


def check_run(recorder: UpdateRecorder, clip: float | None, accumulate: int) -> float:
    """Every step: its micro-batches, the scaler's scale, the schedule's lr, the float64 update."""
    assert len(recorder.steps) == STEPS
    assert all(len(step.inputs) == accumulate and step.scale > 1 for step in recorder.steps)
    lrs = [LR / 2 * (1 + math.cos(math.pi * k / STEPS)) for k in range(STEPS)]
    assert [step.lr for step in recorder.steps] == pytest.approx(lrs, rel=1e-6)
    conv = recorder.model.conv1
    return max(check_step(step, conv, LAM, clip) for step in recorder.steps)


@pytest.mark.parametrize("split", [False, True], ids=["adamw", "sgd conv1, adamw rest"])
@pytest.mark.parametrize("clip", [None, CLIP])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_native_scaler_accumulation_and_clipping(
    split: bool, clip: float | None, accumulate: int, error_log: ErrorLog
) -> None:
    error = check_run(train("TrActOptimizer", split, clip, accumulate), clip, accumulate)
    inner = "sgd conv1 + adamw rest" if split else "adamw"
    error_log.record(
        f"timm recipe NativeScaler, {inner}, clip {clip}, accumulate {accumulate}", error
    )


@pytest.mark.parametrize("clip", [None, CLIP])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_attached_to_the_optimizer_the_recipe_built(
    clip: float | None, accumulate: int, error_log: ErrorLog
) -> None:
    error = check_run(train("attach", False, clip, accumulate), clip, accumulate)
    error_log.record(
        f"timm recipe NativeScaler, attach to adamw, clip {clip}, accumulate {accumulate}", error
    )


@pytest.mark.parametrize("clip", [None, CLIP])
def test_attached_to_a_fused_adamw(clip: float | None, error_log: ErrorLog) -> None:
    """GradScaler leaves unscaling to a fused optimizer's step: TrAct is linear, so
    preconditioning the still-scaled gradient is exact, and clipping measures the unscaled norm
    (the optimizer's ``grad_scale``)."""
    error = check_run(train("attach, fused", False, clip, 2), clip, 2)
    error_log.record(f"timm recipe NativeScaler, attach to fused adamw, clip {clip}", error)


def test_attached_to_a_fused_adamw_unscaled_before_the_step(error_log: ErrorLog) -> None:
    """The README's remedy for the case above: ``scaler.unscale_(opt)`` before
    ``scaler.step(opt)`` (a plain GradScaler loop), and the TrAct gradient is clipped."""
    model = framework_net()
    opt, sched, native, _ = build(model, "attach, fused", False, CLIP)
    scaler = native._scaler
    recorder = UpdateRecorder(model, scaler=scaler)
    recorder.watch([opt])
    loader = DataLoader(TensorDataset(*framework_data(4 * STEPS)), batch_size=4)
    for step, (x, y) in enumerate(loader):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        sched.step_update(step + 1)
    error = check_run(recorder, CLIP, 1)
    error_log.record("timm recipe, attach to fused adamw, unscale_ first, clip 0.05", error)


def test_timm_clip_grad_clips_the_raw_gradient() -> None:
    """What the README warns about: NativeScaler(clip_grad=...) clips before TrAct."""
    recorder = train("TrActOptimizer", False, None, 2, timm_clip=CLIP)
    conv = recorder.model.conv1
    for step in recorder.steps:
        got = step.received
        assert max_relative_error(got, expected(step, conv, LAM, CLIP, clip_first=True)) <= 1e-4
        assert max_relative_error(got, expected(step, conv, LAM, CLIP)) > 1e-2
