"""TrAct in the real Hugging Face ``transformers`` Trainer (CPU), against the float64 reference.

The model wrapper, dataset format, ``tract_optimizers`` and ``attach_tract`` come from
``scripts/examples/hf_trainer_example.py`` (the README's Trainer blocks); the network is
``framework_net`` (randomly initialised) on data whose channels have very different scales.
Two set-ups: ``optimizers=(TrActOptimizer, scheduler)``, and a ``TrActPreconditioner`` attached
to the AdamW the Trainer builds itself from ``optim=`` (plain and fused).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

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

transformers = require("transformers")
example = import_example("hf_trainer_example")

LR = 0.05
LAM = 0.1
CLIP = 0.05
#: ``None``: ``optimizers=(TrActOptimizer, scheduler)``; else the ``optim=`` the Trainer builds
#: its own optimizer from, with TrAct attached to it.
SETUPS = [None, "adamw_torch", "adamw_torch_fused"]
SETUP_IDS = ["TrActOptimizer", "attach adamw_torch", "attach adamw_torch_fused"]


def arguments(out: Path, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "output_dir": str(out), "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "max_steps": 2, "max_grad_norm": 0.0,
        "save_strategy": "no", "logging_strategy": "no", "report_to": "none", "use_cpu": True,
        "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0,
    }  # fmt: skip
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


@dataclass
class Run:
    """What a ``train`` call leaves: the model, TrAct (a ``TrActOptimizer`` or an attached
    ``TrActPreconditioner``; None without TrAct), the record, the Trainer, and TrAct's
    ``last_grad_norm`` after every optimizer step (with ``clip``)."""

    model: Any
    tract: Any
    recorder: UpdateRecorder
    trainer: Any
    norms: list[float]


def train(
    out: Path,
    *,
    seed: int = 0,
    tract: bool = True,
    optim: str | None = None,
    clip: float | None = None,
    resume: Path | None = None,
    halve_lam: bool = False,
    **overrides: Any,
) -> Run:
    """A Trainer run on 16 examples. With ``optim``, the Trainer builds its optimizer (and a
    cosine schedule) and TrAct is attached to it; otherwise it gets ``optimizers=``."""
    model = example.Classifier(framework_net(seed))
    recorder = UpdateRecorder(model.net)
    steps = overrides.setdefault("max_steps", 2)
    callbacks = []
    optimizers: tuple[Any, ...] = (None, None)
    opt: Any = None
    if optim is not None:
        overrides.update(optim=optim, learning_rate=LR, weight_decay=0.05)
        overrides.update(lr_scheduler_type="cosine")
    elif tract:
        opt, sched = example.tract_optimizers(model, steps, lr=LR, lam=LAM, clip=clip)
        recorder.watch(opt.optimizers)
        if halve_lam:
            callbacks.append(HalveLam(opt))
        optimizers = (opt, sched)
    else:
        adamw = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
        optimizers = (adamw, torch.optim.lr_scheduler.CosineAnnealingLR(adamw, T_max=steps))
    trainer = transformers.Trainer(
        model=model,
        args=arguments(out, **overrides),
        train_dataset=example.examples(*framework_data(16)),
        optimizers=optimizers,
        callbacks=callbacks,
    )
    if optim is not None:
        opt = example.attach_tract(trainer, model, lam=LAM, clip=clip)
        built = trainer.optimizer
        recorder.watch([built])
    norms = LastGradNorms(opt)
    trainer.add_callback(norms)
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    if optim is not None:  # train() stepped the optimizer create_optimizer() built
        assert trainer.optimizer.optimizer is built
        assert bool(built.defaults["fused"]) == (optim == "adamw_torch_fused")
    return Run(model, opt, recorder, trainer, norms.norms)


class LastGradNorms(transformers.TrainerCallback):  # type: ignore[misc]
    """TrAct's ``last_grad_norm`` after every optimizer step."""

    def __init__(self, tract: TrActOptimizer | TrActPreconditioner | None) -> None:
        self.tract = tract
        self.norms: list[float] = []

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tract is not None and self.tract.last_grad_norm is not None:
            self.norms.append(float(self.tract.last_grad_norm))


class HalveLam(transformers.TrainerCallback):  # type: ignore[misc]
    """A λ schedule: halve λ after every optimizer step."""

    def __init__(self, tract: TrActOptimizer) -> None:
        self.tract = tract

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.tract.set_lam(self.tract.lams[0] / 2)


def check_all(recorder: UpdateRecorder, lams: list[float], clip: float | None = None) -> float:
    assert len(recorder.steps) == len(lams)
    conv = recorder.model.conv1
    return max(check_step(s, conv, lam, clip) for s, lam in zip(recorder.steps, lams, strict=True))


def norm(grads: dict[str, torch.Tensor]) -> float:
    return sum(float(g.pow(2).sum()) for g in grads.values()) ** 0.5


@pytest.mark.parametrize("optim", SETUPS, ids=SETUP_IDS)
def test_accumulation(optim: str | None, tmp_path: Path, error_log: ErrorLog) -> None:
    """Two micro-batches of 2 per step; AdamW receives TrAct of the accumulated gradient."""
    recorder = train(tmp_path, optim=optim).recorder
    assert [len(step.inputs) for step in recorder.steps] == [2, 2]
    setup = "optimizers=(TrAct, scheduler)" if optim is None else f"optim={optim} + attach"
    error_log.record(f"hf trainer {setup}, accumulation 2", check_all(recorder, [LAM] * 2))


@pytest.mark.parametrize("optim", SETUPS, ids=SETUP_IDS)
def test_clipping_recipe(optim: str | None, tmp_path: Path, error_log: ErrorLog) -> None:
    """max_grad_norm=0 and clip_grad_norm=: the TrAct gradient is clipped.

    The Trainer still logs a ``grad_norm``: the raw gradient's, which it measures before
    ``optimizer.step()``; TrAct's ``last_grad_norm`` is the TrAct gradient's, before clipping.
    """
    run = train(tmp_path, optim=optim, clip=CLIP, logging_strategy="steps", logging_steps=1)
    setup = "TrActOptimizer" if optim is None else f"optim={optim} + attach"
    error_log.record(
        f"hf trainer clip_grad_norm= ({setup}), max_grad_norm=0",
        check_all(run.recorder, [LAM] * 2, CLIP),
    )
    conv = run.recorder.model.conv1
    raw = [norm(expected(step, conv, LAM, times=0)) for step in run.recorder.steps]
    tract = [norm(expected(step, conv, LAM)) for step in run.recorder.steps]
    logged = [h["grad_norm"] for h in run.trainer.state.log_history if "grad_norm" in h]
    assert logged == pytest.approx(raw, rel=1e-5)
    assert run.norms == pytest.approx(tract, rel=1e-5)
    assert all(abs(r - t) > 1e-2 * t for r, t in zip(raw, tract, strict=True))


@pytest.mark.parametrize("optim", SETUPS[:2], ids=SETUP_IDS[:2])
def test_max_grad_norm_alone_clips_the_raw_gradient(optim: str | None, tmp_path: Path) -> None:
    """What the README warns about: the Trainer's own clipping runs before TrAct."""
    recorder = train(tmp_path, optim=optim, max_grad_norm=CLIP).recorder
    conv = recorder.model.conv1
    for step in recorder.steps:
        got = step.received
        assert max_relative_error(got, expected(step, conv, LAM, CLIP, clip_first=True)) <= 1e-4
        assert max_relative_error(got, expected(step, conv, LAM, CLIP)) > 1e-2


def resume_drift(root: Path, tract: bool) -> tuple[float, Any, Any, UpdateRecorder]:
    """Largest parameter difference between 4 uninterrupted steps and 2 + resume for 2 more,
    both runs' final λ (None without TrAct) and the record of the resumed run."""
    setup: dict[str, Any] = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    whole = train(root / "whole", tract=tract, clip=CLIP, halve_lam=True, **setup)
    resumed = train(
        root / "resumed", seed=3, tract=tract, clip=CLIP, halve_lam=True,
        resume=root / "whole" / "checkpoint-2", **setup,
    )  # fmt: skip
    drift = max(
        float((a - b).detach().abs().max())
        for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True)
    )
    lams = [run.tract.lams if tract else None for run in (whole, resumed)]
    return drift, lams[0], lams[1], resumed.recorder


def test_resume_from_checkpoint_restores_lam(tmp_path: Path, error_log: ErrorLog) -> None:
    """Resuming restores λ (halved every step, so a lost λ shows) and lands where plain AdamW's
    resume lands relative to its own uninterrupted run."""
    tract_drift, lam_whole, lam_resumed, recorder = resume_drift(tmp_path / "tract", tract=True)
    adamw_drift, _, _, _ = resume_drift(tmp_path / "adamw", tract=False)
    assert lam_whole == lam_resumed == (LAM / 16,)
    # The resumed steps (3 and 4 of 4) use the restored λ: LAM/4 and LAM/8.
    error_log.record(
        "hf trainer after resume_from_checkpoint", check_all(recorder, [LAM / 4, LAM / 8], CLIP)
    )
    error_log.record("hf trainer resume drift (TrAct)", tract_drift, "max parameter difference")
    error_log.record("hf trainer resume drift (AdamW)", adamw_drift, "max parameter difference")
    assert tract_drift <= max(adamw_drift, 1e-6)
