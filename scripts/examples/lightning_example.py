"""TrAct in PyTorch Lightning: a small CNN on scikit-learn's digits.

    python -m scripts.examples.lightning_example [--quick] [--clip 1.0] [--precision bf16-mixed]

``TrActOptimizer`` goes into ``configure_optimizers`` like any optimizer, with a scheduler dict.
Lightning's ``gradient_clip_val`` clips before ``optimizer.step()``, i.e. the raw gradient, so this
script leaves it off and lets ``TrActOptimizer(clip_grad_norm=...)`` clip the TrAct gradient.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from scripts.data import load_digits_data
from scripts.models import digits_cnn
from tract_optim import TrActOptimizer


class TrActClassifier(L.LightningModule):
    """Cross-entropy training of ``model`` (first layer ``model.conv1``) with SGD + TrAct."""

    def __init__(
        self, model: nn.Module, steps: int, lr: float = 0.05, momentum: float = 0.9,
        lam: float = 0.1, clip: float | None = 1.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.model, self.steps, self.lr, self.momentum = model, steps, lr, momentum
        self.lam, self.clip = lam, clip

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> Any:
        sgd = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum)
        opt = TrActOptimizer(sgd, self.model.conv1, lam=self.lam, clip_grad_norm=self.clip)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.examples.lightning_example", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="one short epoch (seconds)")
    parser.add_argument("--clip", type=float, default=1.0, help="clip the TrAct gradient norm")
    parser.add_argument("--precision", default="32-true", help='e.g. "bf16-mixed"')
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_digits_data()
    count, epochs = (256, 1) if args.quick else (len(data.train_x), 8)
    train = TensorDataset(data.train_x[:count], data.train_y[:count])
    loader = DataLoader(train, batch_size=64, shuffle=True)
    module = TrActClassifier(digits_cnn(), steps=epochs * len(loader), clip=args.clip)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", precision=args.precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=not args.quick, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, loader)
    with torch.no_grad():
        accuracy = (module.model.eval()(data.test_x).argmax(1) == data.test_y).float().mean()
    print(f"test accuracy {accuracy:.3f} after {trainer.global_step} steps")


if __name__ == "__main__":
    main()
