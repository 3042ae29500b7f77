"""TrAct in real PyTorch Lightning (CPU): every inner step against the float64 reference.

The module under test is ``scripts/examples/lightning_example.py``'s ``TrActClassifier`` (the
README's Lightning block), on ``framework_net`` and data whose channels have very different
scales, so that TrAct, TrAct twice and no TrAct differ by far more than the tolerance
(``check_step``).
Lightning hands user code a ``LightningOptimizer`` proxy (``self.optimizers()``) and hooks the
real optimizer; both paths are exercised. ``configure_optimizers`` may also return a plain SGD
with a ``TrActPreconditioner`` attached (``AttachedClassifier``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from tests.integrations._frameworks import (
    UpdateRecorder,
    check_step,
    expected,
    framework_data,
    framework_net,
    import_example,
    require,
)
from tests.kit import ErrorLog, max_relative_error
from tract_optim import TrActOptimizer, TrActPreconditioner

L = require("lightning")
example = import_example("lightning_example")
LightningOptimizer = L.pytorch.core.optimizer.LightningOptimizer

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(does not have many workers|LeafSpec|smaller than the logging interval).*"
)

BATCH = 4
LR = 0.5
LAM = 0.1
CLIP = 0.05


def loader(count: int = 3 * BATCH) -> DataLoader[tuple[Tensor, ...]]:
    x, y = framework_data(count)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def fit(
    module: Any,
    tmp_path: Path,
    *,
    ckpt_path: str | None = None,
    batches: int = 3,
    **trainer_args: Any,
) -> tuple[Any, UpdateRecorder]:
    """Fit ``module`` for ``max_epochs`` (default 1) while recording every inner step."""
    recorder = UpdateRecorder(module.model)

    class Watch(L.Callback):  # type: ignore[misc]
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            real = trainer.optimizers[0]
            assert not isinstance(real, LightningOptimizer)
            recorder.watch(real.optimizers if isinstance(real, TrActOptimizer) else [real])

    trainer_args.setdefault("max_epochs", 1)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path, callbacks=[Watch()], **trainer_args,
    )  # fmt: skip
    trainer.fit(module, loader(batches * BATCH), ckpt_path=ckpt_path)
    return trainer, recorder


def classifier(momentum: float = 0.0, clip: float | None = None, steps: int = 3) -> Any:
    return example.TrActClassifier(
        framework_net(), steps=steps, lr=LR, momentum=momentum, clip=clip
    )


def check_all(
    recorder: UpdateRecorder, lams: list[float], clip: float | None = None, sgd_lr: bool = True
) -> float:
    """``check_step`` for every step; ``sgd_lr``: also the update of plain SGD (no momentum)."""
    assert len(recorder.steps) == len(lams)
    conv = recorder.model.conv1
    errors = [
        check_step(step, conv, lam, clip, sgd_lr=sgd_lr)
        for step, lam in zip(recorder.steps, lams, strict=True)
    ]
    return max(errors)


def test_automatic_with_scheduler_dict(tmp_path: Path, error_log: ErrorLog) -> None:
    """Three steps; the lr follows the per-step cosine schedule of the scheduler dict."""
    _, recorder = fit(classifier(), tmp_path)
    error_log.record("lightning automatic", check_all(recorder, [LAM] * 3))
    cosine = [LR * (1 + torch.cos(torch.tensor(k * torch.pi / 3)).item()) / 2 for k in range(3)]
    assert [s.lr for s in recorder.steps] == pytest.approx(cosine, rel=1e-6)


class PreconditionInHook(example.TrActClassifier):  # type: ignore[misc]
    """README recipe: precondition in on_before_optimizer_step, then Lightning clips."""

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        optimizer.precondition_()


class PreconditionThroughProxy(example.TrActClassifier):  # type: ignore[misc]
    """The same through ``self.optimizers()`` (a LightningOptimizer proxy)."""

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        proxy = self.optimizers()
        assert isinstance(proxy, LightningOptimizer) and proxy is not optimizer
        proxy.precondition_()


class PreconditionInClipping(example.TrActClassifier):  # type: ignore[misc]
    """The same inside configure_gradient_clipping."""

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        optimizer.precondition_()
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


@pytest.mark.parametrize(
    "recipe", ["clip_grad_norm", "hook", "hook via proxy", "configure_gradient_clipping"]
)
def test_gradient_clipping_recipes_clip_the_tract_gradient(
    recipe: str, tmp_path: Path, error_log: ErrorLog
) -> None:
    if recipe == "clip_grad_norm":
        _, recorder = fit(classifier(clip=CLIP), tmp_path)
    else:
        kind = {
            "hook": PreconditionInHook,
            "hook via proxy": PreconditionThroughProxy,
            "configure_gradient_clipping": PreconditionInClipping,
        }[recipe]
        module = kind(framework_net(), steps=3, lr=LR, momentum=0.0, clip=None)
        _, recorder = fit(module, tmp_path, gradient_clip_val=CLIP)
    error_log.record(f"lightning clipping: {recipe}", check_all(recorder, [LAM] * 3, CLIP))


def test_plain_gradient_clip_val_clips_the_raw_gradient(tmp_path: Path) -> None:
    """What the README warns about: without a recipe, Lightning clips before TrAct."""
    _, recorder = fit(classifier(), tmp_path, gradient_clip_val=CLIP)
    conv = recorder.model.conv1
    for step in recorder.steps:
        got = step.received
        assert max_relative_error(got, expected(step, conv, LAM, CLIP, clip_first=True)) <= 1e-4
        assert max_relative_error(got, expected(step, conv, LAM, CLIP)) > 1e-2


def test_accumulate_grad_batches(tmp_path: Path, error_log: ErrorLog) -> None:
    """Two micro-batches per step: both inputs' statistics and the summed gradient."""
    _, recorder = fit(classifier(steps=2), tmp_path, batches=4, accumulate_grad_batches=2)
    assert [len(step.inputs) for step in recorder.steps] == [2, 2]
    error_log.record("lightning accumulate_grad_batches=2", check_all(recorder, [LAM] * 2))


def test_bf16_mixed(tmp_path: Path, error_log: ErrorLog) -> None:
    _, recorder = fit(classifier(), tmp_path, precision="bf16-mixed")
    error_log.record("lightning bf16-mixed", check_all(recorder, [LAM] * 3))


class Manual(example.TrActClassifier):  # type: ignore[misc]
    """README recipe for manual optimization: precondition, clip, step, all through the proxy."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        assert isinstance(opt, LightningOptimizer)
        x, y = batch
        opt.zero_grad()
        self.manual_backward(F.cross_entropy(self.model(x), y))
        opt.precondition_()
        self.clip_gradients(opt, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")
        opt.step()


def test_manual_optimization_precondition_and_clip_gradients(
    tmp_path: Path, error_log: ErrorLog
) -> None:
    module = Manual(framework_net(), steps=3, lr=LR, momentum=0.0, clip=None)
    _, recorder = fit(module, tmp_path)
    error_log.record("lightning manual optimization", check_all(recorder, [LAM] * 3, CLIP))


class AttachedClassifier(example.TrActClassifier):  # type: ignore[misc]
    """``configure_optimizers`` returns the plain SGD, with a preconditioner attached to it."""

    def configure_optimizers(self) -> Any:
        sgd = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum)
        self.tract = TrActPreconditioner(self.model.conv1, lam=self.lam, clip_grad_norm=self.clip)
        self.tract.attach(sgd)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=self.steps)
        return {"optimizer": sgd, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_attached_optimizer_automatic_optimization(
    accumulate: int, tmp_path: Path, error_log: ErrorLog
) -> None:
    """Automatic optimization passes step() a closure that runs the backward: the pre-hook
    preconditions right after that closure, inside the step."""
    module = AttachedClassifier(framework_net(), steps=2, lr=LR, momentum=0.0, clip=CLIP)
    _, recorder = fit(module, tmp_path, batches=2 * accumulate, accumulate_grad_batches=accumulate)
    assert [len(step.inputs) for step in recorder.steps] == [accumulate] * 2
    error_log.record(
        f"lightning attach, automatic, accumulate_grad_batches={accumulate}",
        check_all(recorder, [LAM] * 2, CLIP),
    )


class AttachedManual(AttachedClassifier):
    """Manual optimization of the attached SGD: ``opt.step()`` after the backward."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        opt.zero_grad()
        self.manual_backward(F.cross_entropy(self.model(x), y))
        opt.step()


def test_attached_optimizer_manual_optimization(tmp_path: Path, error_log: ErrorLog) -> None:
    module = AttachedManual(framework_net(), steps=3, lr=LR, momentum=0.0, clip=CLIP)
    _, recorder = fit(module, tmp_path)
    error_log.record("lightning attach, manual optimization", check_all(recorder, [LAM] * 3, CLIP))


START_LAM = 0.4


class LamSchedule(example.TrActClassifier):  # type: ignore[misc]
    """λ set through the proxy: loaded at the start, then halved after every step."""

    def on_train_start(self) -> None:
        opt = self.optimizers()
        if self.trainer.global_step == 0:
            state = opt.state_dict()
            state["tract"]["lam"] = [START_LAM]
            opt.load_state_dict(state)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.set_lam(opt.lams[0] / 2)


def test_set_lam_and_load_state_dict_from_hooks(tmp_path: Path, error_log: ErrorLog) -> None:
    module = LamSchedule(framework_net(), steps=3, lr=LR, momentum=0.0, clip=None)
    trainer, recorder = fit(module, tmp_path)
    error_log.record(
        "lightning set_lam from a hook", check_all(recorder, [START_LAM / 2**k for k in range(3)])
    )
    assert trainer.optimizers[0].lams == (START_LAM / 8,)


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path: Path, error_log: ErrorLog) -> None:
    """Two epochs at once vs one epoch, checkpoint, fit(ckpt_path=...) into a fresh module.

    λ changes every step and SGD has momentum, so a resume that lost either would differ.
    """
    steps = 6
    whole = LamSchedule(framework_net(), steps=steps, lr=LR, momentum=0.9, clip=CLIP)
    fit(whole, tmp_path / "whole", max_epochs=2)

    first = LamSchedule(framework_net(), steps=steps, lr=LR, momentum=0.9, clip=CLIP)
    trainer, _ = fit(first, tmp_path / "first")
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = LamSchedule(framework_net(seed=5), steps=steps, lr=LR, momentum=0.9, clip=CLIP)
    trainer, recorder = fit(resumed, tmp_path / "resumed", max_epochs=2, ckpt_path=str(ckpt))
    assert trainer.optimizers[0].lams == (START_LAM / 2**steps,)
    lams = [START_LAM / 2**k for k in range(3, steps)]
    error_log.record(
        "lightning after fit(ckpt_path=...)", check_all(recorder, lams, CLIP, sgd_lr=False)
    )
    for (name, a), b in zip(
        whole.model.named_parameters(), resumed.model.parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    # A resume that lost λ would have gone elsewhere: redo it with λ reset and compare.
    lost = LamSchedule(framework_net(seed=5), steps=steps, lr=LR, momentum=0.9, clip=CLIP)
    ckpt_state = torch.load(ckpt, weights_only=False)
    ckpt_state["optimizer_states"][0]["tract"]["lam"] = [LAM]
    torch.save(ckpt_state, tmp_path / "lost.ckpt")
    fit(lost, tmp_path / "lost", max_epochs=2, ckpt_path=str(tmp_path / "lost.ckpt"))
    assert not torch.equal(lost.model.conv1.weight, whole.model.conv1.weight)
