"""TrAct with the Hugging Face ``transformers`` Trainer: a small CNN on scikit-learn's digits.

    python -m scripts.examples.hf_trainer_example [--quick] [--attach]

Pass ``optimizers=(TrActOptimizer(...), scheduler)``, or (``--attach``) let the Trainer build its
own optimizer from ``optim=`` and attach a ``TrActPreconditioner`` to it. The Trainer's
``max_grad_norm`` (default 1) clips the raw gradient before ``step()``: set it to 0 and let
``clip_grad_norm=`` clip TrAct's.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments

from scripts.data import load_digits_data
from scripts.models import digits_cnn
from tract_optim import TrActOptimizer, TrActPreconditioner


class Classifier(nn.Module):
    """``forward(**batch)`` returns ``"loss"``, as the Trainer wants; ``net.conv1`` is first."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values: Tensor, labels: Tensor) -> dict[str, Tensor]:
        logits = self.net(pixel_values)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def examples(x: Tensor, y: Tensor) -> list[dict[str, Tensor]]:
    """A dataset of dicts, as the Trainer's default collator expects."""
    return [{"pixel_values": xi, "labels": yi} for xi, yi in zip(x, y, strict=True)]


def tract_optimizers(model: Classifier, steps: int, lr: float = 3e-3, lam: float = 0.1,
                     clip: float | None = 1.0) -> tuple[TrActOptimizer, Any]:  # fmt: skip
    """AdamW + TrAct with a cosine schedule, for ``Trainer(optimizers=...)``."""
    adamw = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    opt = TrActOptimizer(adamw, model.net.conv1, lam=lam, clip_grad_norm=clip)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    return opt, sched


def attach_tract(
    trainer: Trainer, model: Classifier, lam: float = 0.1, clip: float | None = 1.0
) -> TrActPreconditioner:
    """TrAct on the optimizer the Trainer builds from ``optim=``: ``create_optimizer()`` builds it
    now, and ``train()`` keeps it (Accelerate's wrapper steps it, so its step hooks fire)."""
    tract = TrActPreconditioner(model.net.conv1, lam=lam, clip_grad_norm=clip)
    tract.attach(trainer.create_optimizer())
    return tract


def trainer_with_tract(
    model: Classifier, training: TrainingArguments, train: Any, steps: int, attach: bool
) -> tuple[Trainer, TrActPreconditioner]:
    """A Trainer with TrAct: attached to the optimizer the Trainer builds from ``optim=`` (and
    its schedule from ``lr_scheduler_type=``), or a ``TrActOptimizer`` passed in."""
    if attach:
        trainer = Trainer(model=model, args=training, train_dataset=train)
        return trainer, attach_tract(trainer, model)
    opt, sched = tract_optimizers(model, steps)
    trainer = Trainer(model=model, args=training, train_dataset=train, optimizers=(opt, sched))
    return trainer, opt.preconditioner


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.examples.hf_trainer_example", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a few steps (seconds)")
    parser.add_argument(
        "--attach", action="store_true", help="the Trainer builds fused AdamW; attach TrAct to it"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_digits_data()
    count, epochs = (256, 1) if args.quick else (len(data.train_x), 8)
    model, train = Classifier(digits_cnn()), examples(data.train_x[:count], data.train_y[:count])
    steps = epochs * -(-count // 64)  # batches of 32, 2 accumulated per step
    with tempfile.TemporaryDirectory() as tmp:
        training = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=32,
            gradient_accumulation_steps=2, num_train_epochs=epochs, max_grad_norm=0.0,
            optim="adamw_torch_fused", learning_rate=3e-3, weight_decay=0.05,
            lr_scheduler_type="cosine", save_strategy="no", report_to="none", use_cpu=True,
            disable_tqdm=args.quick,
        )  # fmt: skip
        trainer, tract = trainer_with_tract(model, training, train, steps, args.attach)
        trainer.train()
    norm = tract.last_grad_norm  # of the TrAct gradient; the Trainer logs the raw one's
    assert norm is not None
    print(f"TrAct gradient norm {float(norm):.3f} at the last step, before clipping")
    with torch.no_grad():
        accuracy = (model.eval().net(data.test_x).argmax(1) == data.test_y).float().mean()
    print(f"test accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
