"""``clip_grad_norm=`` under DDP, as in scripts/examples/ddp_torchrun_example.py (wrap first, then
the optimizers), on two gloo ranks: every rank's inner optimizer must receive the clipped TrAct
gradient of the global batch. The reference is computed here, in one process and float64: plain
autograd on the concatenated batch, ``check_step``'s preconditioning and clipping, SGD by hand.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.integrations._frameworks import Step, check_step, expected, framework_data, framework_net
from tests.kit import ErrorLog, run_workers
from tract_optim import TrActOptimizer

pytestmark = pytest.mark.slow

WORLD = 2
PER_RANK = 4
STEPS = 2
LR = 0.5
LAM = 0.1
CLIP = 0.05


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batch of every step."""
    x, y = framework_data(STEPS * WORLD * PER_RANK)
    size = WORLD * PER_RANK
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def worker(rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    """Train STEPS steps on this rank's slices; return what the inner SGD received each step."""
    model = framework_net(seed=rank)  # DDP broadcasts rank 0's weights
    ddp = DDP(model)
    sgd = torch.optim.SGD(ddp.parameters(), lr=LR)
    opt = TrActOptimizer(sgd, model.conv1, lam=LAM, clip_grad_norm=CLIP)
    received: list[dict[str, torch.Tensor]] = []

    def record(*_: Any) -> None:
        grads = {n: p.grad.double().clone() for n, p in model.named_parameters()}
        received.append(grads)

    sgd.register_step_pre_hook(record)
    for x, y in batches():
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        opt.zero_grad()
        F.cross_entropy(ddp(x[part]), y[part]).backward()
        opt.step()
    return received


def test_clip_grad_norm_under_ddp_matches_the_global_batch(error_log: ErrorLog) -> None:
    results = run_workers(worker, WORLD)
    errors = []
    model = framework_net(seed=0).double()
    for k, (x, y) in enumerate(batches()):
        model.zero_grad()
        F.cross_entropy(model(x.double()), y).backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        for received in results:
            step = Step([x.double()], raw, received[k], LR, 1.0, torch.zeros(()))
            errors.append(check_step(step, model.conv1, LAM, CLIP))
        want = expected(step, model.conv1, LAM, CLIP)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.sub_(LR * want[name])
    error_log.record("ddp clip_grad_norm=", max(errors))
