"""DDP edge cases: a rank with an empty batch, and a rank whose forward skips the first layer.

The "gradient without statistics" check runs on the *global* statistics, after the all-reduce:
a rank that saw no rows still holds the averaged gradient, and must precondition it with the
other ranks' statistics rather than raise. Two gloo processes on 127.0.0.1; the reference is
float64 TrAct (``kit.assert_update``) of rank 0's rows and the DDP-averaged gradient.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from tests.kit import assert_update, conv_net, random_batch, run_workers, unfold_rows
from tract_optim import TrActOptimizer

pytestmark = pytest.mark.slow

LAM = 0.1


class Skippable(nn.Module):
    """The pooled conv net; ``skip=True`` bypasses its first layer (unused on that rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = conv_net(size=5, pool=True, act=nn.Tanh())

    def forward(self, x: Tensor, skip: bool = False) -> Tensor:
        if not skip:
            return self.net(x)  # type: ignore[no-any-return]
        features = x.mean(dim=(2, 3)).repeat(1, 2)[:, :4]
        return self.net.head(self.net.act(features))  # type: ignore[no-any-return]


def rank0_batch() -> tuple[Tensor, Tensor]:
    return random_batch((3, 3, 5, 5), 7)


def loss_of(out: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(out, labels, reduction="sum") / 3  # the global batch has 3 images


def worker(rank: int, world: int) -> dict[str, Tensor]:
    out = {}
    for case in ("empty", "unused"):
        model = Skippable()
        ddp = DistributedDataParallel(model, find_unused_parameters=case == "unused")
        opt = TrActOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model.net.first, LAM)
        x, y = rank0_batch()
        if rank == 1:
            x, y = (x[:0], y[:0]) if case == "empty" else (x, y)
        loss_of(ddp(x, skip=rank == 1 and case == "unused"), y).backward()
        opt.step()
        out[case] = model.net.first.weight.detach().clone()
    return out


def test_empty_or_first_layer_free_rank_uses_the_global_statistics() -> None:
    results: list[dict[str, Any]] = run_workers(worker, world=2, timeout=180)
    model = conv_net(size=5, pool=True, act=nn.Tanh())
    x, y = rank0_batch()
    loss_of(model(x), y).backward()
    assert model.first.weight.grad is not None
    grad = model.first.weight.grad.double() / 2  # DDP averages over the 2 ranks
    rows = unfold_rows(model.first, x)
    start = model.first.weight.detach()
    for case in ("empty", "unused"):
        for result in results:
            assert_update(start - result[case], grad, rows, LAM)
