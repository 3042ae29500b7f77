"""TrAct with real Hugging Face Accelerate (CPU): every inner step against the float64 reference.

The training loop is ``scripts/examples/accelerate_example.py``'s ``train_epoch`` (the README's
Accelerate block); the model is ``framework_net`` on data whose channels have very different
scales, so that TrAct, TrAct twice and no TrAct differ by far more than the tolerance
(``check_step``).

TrAct goes in either as a ``TrActOptimizer`` or as a ``TrActPreconditioner`` attached to the plain
optimizer: before ``prepare``, or after it to ``opt.optimizer`` (the ``AcceleratedOptimizer``
steps it, so its step hooks fire).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.integrations._frameworks import (
    UpdateRecorder,
    check_step,
    framework_data,
    framework_net,
    import_example,
    require,
)
from tests.kit import ErrorLog
from tract_optim import TrActOptimizer, TrActPreconditioner

accelerate = require("accelerate")
example = import_example("accelerate_example")

BATCH = 4
LR = 0.5
LAM = 0.1
CLIP = 0.05


@pytest.fixture(autouse=True)
def fresh_accelerator_state() -> Iterator[None]:
    """Accelerate keeps process-wide singletons; every test starts from a clean state."""
    yield
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    accelerate.state.GradientState._reset_state()


def loader(batches: int, batch: int = BATCH) -> DataLoader[Any]:
    x, y = framework_data(batches * batch)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def halving(opt: Any) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)


def check_all(recorder: UpdateRecorder, lam: float = LAM, clip: float | None = None) -> float:
    conv = recorder.model.conv1
    return max(check_step(step, conv, lam, clip, sgd_lr=True) for step in recorder.steps)


def with_tract(form: str, sgd: torch.optim.SGD, first: nn.Module, clip: float | None = None) -> Any:
    """What goes into ``prepare``: ``sgd`` wrapped in a TrActOptimizer, or ``sgd`` itself with a
    preconditioner attached (``form`` "attach"; any other attach form attaches later)."""
    if form == "TrActOptimizer":
        return TrActOptimizer(sgd, first, LAM, clip_grad_norm=clip)
    if form == "attach":
        TrActPreconditioner(first, LAM, clip_grad_norm=clip).attach(sgd)
    return sgd


@pytest.mark.parametrize("form", ["TrActOptimizer", "attach"])
@pytest.mark.parametrize("order", ["optimizer, then prepare all", "prepare model first"])
def test_prepare_before_and_after_creating_the_optimizer(
    order: str, form: str, error_log: ErrorLog
) -> None:
    """The optimizer from the model before ``prepare``, or (the order FSDP needs) from the model
    ``prepare(model)`` returned, and then ``prepare(model, opt, ...)`` again with that model."""
    accelerator = accelerate.Accelerator(cpu=True)
    model = framework_net()
    recorder = UpdateRecorder(model)
    if order == "prepare model first":
        model = accelerator.prepare(model)
        first = accelerator.unwrap_model(model).conv1
    else:
        first = model.conv1
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    tract = with_tract(form, sgd, first)
    sched = halving(tract)
    model, opt, sched, data = accelerator.prepare(model, tract, sched, loader(3))
    assert opt.optimizer is tract
    recorder.watch([sgd])
    example.train_epoch(accelerator, model, opt, sched, data)
    assert [step.lr for step in recorder.steps] == [LR, LR / 2, LR / 4]
    error_log.record(f"accelerate prepare ({order}), {form}", check_all(recorder))


def accumulated_run(
    accumulate: int, batch: int, clip: float | None = None, form: str = "TrActOptimizer"
) -> UpdateRecorder:
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    model = framework_net()
    recorder = UpdateRecorder(model)
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    opt = with_tract(form, sgd, model.conv1, clip)
    sched = halving(opt)
    model, opt, sched, data = accelerator.prepare(model, opt, sched, loader(8 // batch, batch))
    if form == "attach after prepare":
        first = accelerator.unwrap_model(model).conv1
        TrActPreconditioner(first, LAM, clip_grad_norm=clip).attach(opt.optimizer)
    recorder.watch([sgd])
    example.train_epoch(accelerator, model, opt, sched, data)
    return recorder


def test_accumulate_equals_the_big_batch(error_log: ErrorLog) -> None:
    """Two micro-batches of 4 per step == one batch of 8, and both match the reference."""
    small = accumulated_run(accumulate=2, batch=4)
    assert [len(step.inputs) for step in small.steps] == [2]
    error_log.record("accelerate accumulate(), 2 micro-batches", check_all(small))
    accelerate.state.GradientState._reset_state()
    big = accumulated_run(accumulate=1, batch=8)
    scale = float(big.model.conv1.weight.detach().abs().max())
    for a, b in zip(small.model.parameters(), big.model.parameters(), strict=True):
        assert float((a - b).detach().abs().max()) <= 1e-6 * scale


@pytest.mark.parametrize("form", ["TrActOptimizer", "attach", "attach after prepare"])
def test_clip_grad_norm_option_with_accumulation(form: str, error_log: ErrorLog) -> None:
    """The recommended recipe: TrAct clips the TrAct gradient inside step()."""
    recorder = accumulated_run(accumulate=2, batch=2, clip=CLIP, form=form)
    assert [len(step.inputs) for step in recorder.steps] == [2, 2]
    error_log.record(
        f"accelerate clip_grad_norm= with accumulate(), {form}", check_all(recorder, clip=CLIP)
    )


def test_precondition_then_accelerator_clip_grad_norm(error_log: ErrorLog) -> None:
    """The other recipe: precondition on the sync step, then accelerator.clip_grad_norm_.

    ``AcceleratedOptimizer`` does not forward ``precondition_``: call it on the TrActOptimizer
    that went into ``prepare`` (here ``tract``; ``opt.optimizer`` is the same object).
    """
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = framework_net()
    recorder = UpdateRecorder(model)
    tract = TrActOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model.conv1, LAM)
    recorder.watch(tract.optimizers)
    model, opt, data = accelerator.prepare(model, tract, loader(4, 2))
    for x, y in data:
        with accelerator.accumulate(model):
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                tract.precondition_()
                accelerator.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            opt.zero_grad()
    assert len(recorder.steps) == 2
    error_log.record(
        "accelerate precondition_ + accelerator.clip_grad_norm_", check_all(recorder, clip=CLIP)
    )


def run_state(
    tmp_path: Path, epochs: int, *, save_after: int | None, load: bool, seed: int
) -> tuple[Any, tuple[float, ...], UpdateRecorder]:
    """Train ``epochs`` epochs; optionally save after ``save_after`` of them or load first."""
    accelerator = accelerate.Accelerator(cpu=True)
    model = framework_net(seed)
    recorder = UpdateRecorder(model)
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    opt = TrActOptimizer(sgd, model.conv1, LAM, clip_grad_norm=CLIP)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    recorder.watch([sgd])
    model, opt, sched, data = accelerator.prepare(model, opt, sched, loader(3))
    if load:
        accelerator.load_state(str(tmp_path / "state"))
    else:
        opt.optimizer.set_lam(0.03)
    for epoch in range(epochs):
        example.train_epoch(accelerator, model, opt, sched, data)
        if save_after == epoch + 1:
            accelerator.save_state(str(tmp_path / "state"))
    lams = opt.optimizer.lams
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    accelerate.state.GradientState._reset_state()
    return accelerator.unwrap_model(model), lams, recorder


def test_save_state_load_state_continues_exactly(tmp_path: Path, error_log: ErrorLog) -> None:
    """Save after epoch 1 of 2; a fresh model and optimizer load it and do epoch 2 identically.

    λ was set to 0.03 before training: a load that did not restore it would use 0.1.
    """
    whole, _, _ = run_state(tmp_path, 2, save_after=1, load=False, seed=0)
    resumed, lams, recorder = run_state(tmp_path, 1, save_after=None, load=True, seed=7)
    assert lams == (0.03,)
    conv = recorder.model.conv1
    error = max(check_step(step, conv, 0.03, CLIP) for step in recorder.steps)
    error_log.record("accelerate after load_state", error)
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
