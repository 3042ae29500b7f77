"""TrAct with Hugging Face Accelerate: a small CNN on scikit-learn's digits.

    python -m scripts.examples.accelerate_example [--quick]   (or: accelerate launch -m ...)

Create ``TrActOptimizer`` from the model, then ``accelerator.prepare`` everything (under FSDP,
prepare the model first and create the optimizer from the prepared model's parameters).
``accelerator.clip_grad_norm_`` would clip the raw gradient before ``step()``; here
``TrActOptimizer(clip_grad_norm=...)`` clips the TrAct gradient instead.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from scripts.data import load_digits_data
from scripts.models import digits_cnn
from tract_optim import TrActOptimizer


def train_epoch(
    accelerator: Accelerator, model: nn.Module, opt: Any, sched: Any, loader: Any
) -> None:
    """One epoch; with gradient_accumulation_steps > 1 each step sees the accumulated batch."""
    model.train()
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(x), y))
            opt.step()
            sched.step()
            opt.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.examples.accelerate_example", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="one short epoch (seconds)")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    args = parser.parse_args()
    accelerator = Accelerator(gradient_accumulation_steps=args.accumulate)
    torch.manual_seed(0)
    data = load_digits_data()
    count, epochs = (256, 1) if args.quick else (len(data.train_x), 8)
    train = TensorDataset(data.train_x[:count], data.train_y[:count])
    loader = DataLoader(train, batch_size=32, shuffle=True)
    model = digits_cnn()
    adamw = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    opt = TrActOptimizer(adamw, model.conv1, lam=0.1, clip_grad_norm=1.0)
    steps = epochs * len(loader) // args.accumulate
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model, opt, sched, loader = accelerator.prepare(model, opt, sched, loader)
    for _ in range(epochs):
        train_epoch(accelerator, model, opt, sched, loader)
    model.eval()
    with torch.no_grad():
        logits = model(data.test_x.to(accelerator.device))
    accuracy = (logits.argmax(1).cpu() == data.test_y).float().mean()
    accelerator.print(f"test accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
