"""TrAct in the real Hugging Face ``transformers`` Trainer (CPU), against the float64 reference.

The model wrapper, dataset format and ``tract_optimizers`` come from
``scripts/examples/hf_trainer_example.py`` (the README's Trainer block); the network is
``framework_net`` (randomly initialised) on data whose channels have very different scales.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
from tract_optim import TrActOptimizer

transformers = require("transformers")
example = import_example("hf_trainer_example")

LR = 0.05
LAM = 0.1
CLIP = 0.05


def arguments(out: Path, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "output_dir": str(out), "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "max_steps": 2, "max_grad_norm": 0.0,
        "save_strategy": "no", "logging_strategy": "no", "report_to": "none", "use_cpu": True,
        "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0,
    }  # fmt: skip
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def train(
    out: Path,
    *,
    seed: int = 0,
    tract: bool = True,
    clip: float | None = None,
    resume: Path | None = None,
    halve_lam: bool = False,
    **overrides: Any,
) -> tuple[Any, Any, UpdateRecorder]:
    """A Trainer run on 16 examples; returns the model, the optimizer passed in, the record."""
    model = example.Classifier(framework_net(seed))
    recorder = UpdateRecorder(model.net)
    steps = overrides.setdefault("max_steps", 2)
    callbacks = []
    if tract:
        opt, sched = example.tract_optimizers(model, steps, lr=LR, lam=LAM, clip=clip)
        recorder.watch(opt.optimizers)
        if halve_lam:
            callbacks.append(HalveLam(opt))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    trainer = transformers.Trainer(
        model=model,
        args=arguments(out, **overrides),
        train_dataset=example.examples(*framework_data(16)),
        optimizers=(opt, sched),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return model, opt, recorder


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


def test_accumulation(tmp_path: Path, error_log: ErrorLog) -> None:
    """Two micro-batches of 2 per step; AdamW receives TrAct of the accumulated gradient."""
    _, _, recorder = train(tmp_path)
    assert [len(step.inputs) for step in recorder.steps] == [2, 2]
    error_log.record(
        "hf trainer optimizers=(TrAct, scheduler), accumulation 2", check_all(recorder, [LAM] * 2)
    )


def test_clipping_recipe(tmp_path: Path, error_log: ErrorLog) -> None:
    """max_grad_norm=0 and TrActOptimizer(clip_grad_norm=...): the TrAct gradient is clipped."""
    _, opt, recorder = train(tmp_path, clip=CLIP)
    error_log.record(
        "hf trainer clip_grad_norm=, max_grad_norm=0", check_all(recorder, [LAM] * 2, CLIP)
    )
    step = recorder.steps[-1]
    want = expected(step, recorder.model.conv1, LAM)  # unclipped TrAct gradient
    norm = sum(float(g.pow(2).sum()) for g in want.values()) ** 0.5
    assert opt.last_grad_norm is not None
    assert abs(float(opt.last_grad_norm) - norm) <= 1e-5 * norm


def test_max_grad_norm_alone_clips_the_raw_gradient(tmp_path: Path) -> None:
    """What the README warns about: the Trainer's own clipping runs before TrAct."""
    _, _, recorder = train(tmp_path, max_grad_norm=CLIP)
    conv = recorder.model.conv1
    for step in recorder.steps:
        got = step.received
        assert max_relative_error(got, expected(step, conv, LAM, CLIP, clip_first=True)) <= 1e-4
        assert max_relative_error(got, expected(step, conv, LAM, CLIP)) > 1e-2


def resume_drift(root: Path, tract: bool) -> tuple[float, Any, Any, UpdateRecorder]:
    """Largest parameter difference between 4 uninterrupted steps and 2 + resume for 2 more,
    both runs' final λ (None without TrAct) and the record of the resumed run."""
    setup: dict[str, Any] = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    whole, opt_whole, _ = train(root / "whole", tract=tract, clip=CLIP, halve_lam=True, **setup)
    resumed, opt_resumed, recorder = train(
        root / "resumed", seed=3, tract=tract, clip=CLIP, halve_lam=True,
        resume=root / "whole" / "checkpoint-2", **setup,
    )  # fmt: skip
    drift = max(
        float((a - b).detach().abs().max())
        for a, b in zip(whole.parameters(), resumed.parameters(), strict=True)
    )
    lams = [opt.lams if tract else None for opt in (opt_whole, opt_resumed)]
    return drift, lams[0], lams[1], recorder


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
