"""Copies of a model with TrAct's hook: EMA models, ``copy.deepcopy``, ``torch.save(model)``.

A copy carries a copy of the forward hook. It must stay inert: passes through the copy (even in
train mode with grad enabled and a backward, the worst case) must not feed or change the
optimizer's statistics, and pickling the model must work. A copy can get its own optimizer.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from tests.kit import TinyNet, conv_net, max_abs_diff, tiny_batch
from tract_optim import TrActOptimizer

STEPS = 3


def make() -> TinyNet:
    """The conv net with a BatchNorm after its first layer (buffers a copy also updates)."""
    return conv_net(norm=True)


def optimizer(model: nn.Module) -> TrActOptimizer:
    first = model.first
    assert isinstance(first, nn.Conv2d)
    return TrActOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), first)


class DeepcopyEma:
    """timm's ModelEma in short: a deepcopy whose parameters follow the model's average."""

    def __init__(self, model: nn.Module, decay: float = 0.9) -> None:
        self.module = copy.deepcopy(model)
        self.decay = decay

    def __call__(self, x: Tensor) -> Tensor:
        return self.module(x)  # type: ignore[no-any-return]

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        for ema, p in zip(self.module.parameters(), model.parameters(), strict=True):
            ema.lerp_(p, 1 - self.decay)


Ema = Callable[[nn.Module], DeepcopyEma | AveragedModel]
EMAS: dict[str, Ema] = {
    "deepcopy": DeepcopyEma,
    "AveragedModel": lambda m: AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.9)),
}


def train(make_ema: Ema | None) -> dict[str, Tensor]:
    """``STEPS`` steps; with an EMA, every step also runs a train-mode forward and backward
    through the EMA copy, on a differently scaled batch, between the model's own passes."""
    model = make()
    opt = optimizer(model)
    ema = make_ema(model) if make_ema is not None else None
    for step in range(STEPS):
        opt.zero_grad()
        x, y = tiny_batch(step, 6)
        out = model(x)
        if ema is not None:
            x_ema, y_ema = tiny_batch(100 + step, 6, scale=4.0)
            F.cross_entropy(ema(x_ema), y_ema).backward()
        F.cross_entropy(out, y).backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", sorted(EMAS))
def test_ema_copy_passes_do_not_touch_the_optimizer(kind: str) -> None:
    assert max_abs_diff(train(EMAS[kind]), train(None)) < 1e-7


def _pickled(model: TinyNet) -> TinyNet:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded, TinyNet)
    return loaded


@pytest.mark.parametrize("clone", [copy.deepcopy, _pickled], ids=["deepcopy", "torch.save"])
def test_copy_trains_with_its_own_optimizer_independently(
    clone: Callable[[TinyNet], TinyNet],
) -> None:
    model = make()
    opt = optimizer(model)
    x, y = tiny_batch(0, 6)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    # Copy in the middle of the next step, while a recorded pass waits for its backward.
    x, y = tiny_batch(1, 6)
    opt.zero_grad()
    out = model(x)
    twin = clone(model)
    twin_opt = optimizer(twin)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # no shared momentum buffers
    twin_opt.zero_grad()
    F.cross_entropy(twin(x * 3.0), y).backward()
    F.cross_entropy(out, y).backward()
    opt.step()
    twin_opt.step()
    # The same step, each model on its own batch, without any copy around.
    reference, reference_twin = make(), make()
    for m, scale in ((reference, 1.0), (reference_twin, 3.0)):
        ref_opt = optimizer(m)
        x0, y0 = tiny_batch(0, 6)
        F.cross_entropy(m(x0), y0).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        F.cross_entropy(m(x * scale), y).backward()
        ref_opt.step()
    # Parameters only: the twin's BatchNorm buffers also saw the pass it was copied during.
    assert max_abs_diff(params(model), params(reference)) < 1e-7
    assert max_abs_diff(params(twin), params(reference_twin)) < 1e-7


def params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}
