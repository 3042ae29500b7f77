"""Shared pieces of the framework tests: an outside record of each step and its fp64 reference.

``UpdateRecorder`` watches a model with plain torch hooks and no tract_optim code:

* a forward hook on the first layer keeps the input of every training pass (module in training
  mode, grad enabled) since the last inner step;
* post-accumulate-grad hooks keep every parameter's gradient right after the latest backward,
  i.e. the raw gradient that TrAct is meant to transform;
* a step pre-hook on the first inner optimizer keeps the gradients the inner optimizer(s)
  received, and a post-hook on the last one the weight change. Where ``step`` is given a
  closure (Lightning's automatic optimization), the gradients are those the closure leaves, and
  where a GradScaler left the unscaling to a fused optimizer (``grad_scale``), they are unscaled.

``check_step`` then computes in float64 what the inner optimizer must have received: the raw first
layer gradient times (XᵀX/r + λI)⁻¹ (``kit.tract_grad`` on ``kit.stacked_rows``),
the other gradients unchanged, the whole set clipped to ``max_norm`` if asked. It also checks that
the comparison can fail: TrAct switched off, applied twice, or applied after clipping would each be
at least ``SEPARATION`` away.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from tests.kit import (
    TinyNet,
    conv_net,
    max_relative_error,
    random_batch,
    stacked_rows,
    tract_grad,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "scripts" / "examples"
#: Largest error allowed, relative to the largest entry of the expected gradient.
TOLERANCE = 1e-4
#: Smallest relative distance from the expected gradient that a wrong update must have.
SEPARATION = 1e-2
#: Per-channel input scales: far from whitened, so that TrAct changes the gradient a lot.
INPUT_SCALES = (0.5, 4.0)


def require(name: str) -> ModuleType:
    """Import a framework; skip if it is missing, unless ``make test`` demands it (then fail)."""
    if os.environ.get("TRACT_REQUIRE_INTEGRATIONS") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name, reason='install the extra: pip install -e ".[integrations]"')


def import_example(name: str) -> ModuleType:
    """``scripts.examples.NAME``, a framework's example script (the tests use its classes and
    functions)."""
    return importlib.import_module(f"scripts.examples.{name}")


def framework_net(seed: int = 0) -> TinyNet:
    """``kit.conv_net`` on 2×5×5 images, its first layer named ``conv1`` (as in the example
    scripts), with a head 3× larger than torch's default.

    That makes the first layer's gradient a large part of the total gradient norm, so clipping
    before or after TrAct gives visibly different updates.
    """
    net = conv_net(channels=2, size=5, first_name="conv1", seed=seed)
    with torch.no_grad():
        net.head.weight.mul_(3)
    return net


def framework_data(count: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    """``count`` images (2×5×5) whose two channels have very different scales, and labels."""
    return random_batch(
        (count, 2, 5, 5), seed, scale=torch.tensor(INPUT_SCALES).reshape(1, 2, 1, 1)
    )


@dataclass
class Step:
    """One inner step as seen from outside."""

    inputs: list[Tensor]
    raw: dict[str, Tensor]
    received: dict[str, Tensor]
    lr: float
    scale: float
    before: Tensor
    after: Tensor | None = None


@dataclass
class UpdateRecorder:
    """Records every inner step of ``model`` (see the module docstring)."""

    model: nn.Module
    first: str = "conv1"
    scaler: Any = None
    steps: list[Step] = field(default_factory=list)
    _inputs: list[Tensor] = field(default_factory=list)
    _raw: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        layer = self.model.get_submodule(self.first)
        layer.register_forward_hook(self._forward)
        for name, param in self.model.named_parameters():
            param.register_post_accumulate_grad_hook(self._accumulated(name))  # type: ignore[no-untyped-call]

    def _forward(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        if module.training and torch.is_grad_enabled():
            self._inputs.append(args[0].detach().double().clone())

    def _accumulated(self, name: str) -> Any:
        def hook(param: Tensor) -> None:
            assert param.grad is not None
            self._raw[name] = param.grad.detach().double().clone()

        return hook

    def watch(self, inner: list[Optimizer] | tuple[Optimizer, ...]) -> None:
        """Hook the inner optimizer(s), in stepping order (after ``attach``: hooks fire in the
        order registered, and the record is of what TrAct's hooks leave)."""
        inner[0].register_step_pre_hook(self._pre)
        inner[-1].register_step_post_hook(self._post)

    def _pre(self, opt: Optimizer, args: Any, kwargs: Any) -> Any:
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._received(opt)
            return None

        def then_record() -> Any:
            loss = closure()
            self._received(opt)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": then_record}
        return (args[0], then_record, *args[2:]), kwargs

    def _received(self, opt: Optimizer) -> None:
        pending = getattr(opt, "grad_scale", None)  # still scaled: a fused kernel unscales
        unscale = 1.0 if pending is None else float(pending)
        grads = {
            name: p.grad.detach().double() / unscale
            for name, p in self.model.named_parameters()
            if p.grad is not None
        }
        scale = 1.0 if self.scaler is None else float(self.scaler.get_scale())
        weight = self._weight().detach().double().clone()
        lr = float(opt.param_groups[0]["lr"])
        self.steps.append(Step(list(self._inputs), dict(self._raw), grads, lr, scale, weight))

    def _post(self, opt: Optimizer, args: Any, kwargs: Any) -> None:
        self.steps[-1].after = self._weight().detach().double().clone()
        self._inputs.clear()
        self._raw.clear()

    def _weight(self) -> Tensor:
        weight = self.model.get_submodule(self.first).weight
        assert isinstance(weight, Tensor)
        return weight


def expected(
    step: Step,
    conv: nn.Conv2d,
    lam: float,
    max_norm: float | None = None,
    first: str = "conv1.weight",
    *,
    times: int = 1,
    clip_first: bool = False,
) -> dict[str, Tensor]:
    """What the inner optimizer must receive (``times`` TrAct applications, clipped after)."""
    grads = {name: g / step.scale for name, g in step.raw.items()}
    if clip_first:
        grads = _clipped(grads, max_norm)
    rows = stacked_rows(conv, step.inputs)
    for _ in range(times):
        grads[first] = tract_grad(rows, grads[first], lam)
    return grads if clip_first else _clipped(grads, max_norm)


def _clipped(grads: dict[str, Tensor], max_norm: float | None) -> dict[str, Tensor]:
    """``clip_grad_norm_`` written out: scale by min(1, max_norm / (‖all‖₂ + 1e-6))."""
    if max_norm is None:
        return dict(grads)
    total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    coef = min(1.0, max_norm / (total + 1e-6))
    return {name: g * coef for name, g in grads.items()}


def check_step(
    step: Step,
    conv: nn.Conv2d,
    lam: float,
    max_norm: float | None = None,
    *,
    sgd_lr: bool = False,
) -> float:
    """Assert the inner optimizer received TrAct(raw), clipped if asked; return the error.

    With ``sgd_lr`` (inner plain SGD, no momentum or decay) the weight change must also be
    −lr × that gradient. Every wrong variant must be at least ``SEPARATION`` away.
    """
    want = expected(step, conv, lam, max_norm)
    error = max_relative_error(step.received, want)
    assert error <= TOLERANCE, f"inner optimizer got a gradient {error:.2e} off the reference"
    first = "conv1.weight"
    wrongs = {
        "without TrAct": expected(step, conv, lam, max_norm, times=0),
        "TrAct twice": expected(step, conv, lam, max_norm, times=2),
    }
    if max_norm is not None:
        wrongs["clipped before TrAct"] = expected(step, conv, lam, max_norm, clip_first=True)
        unclipped = expected(step, conv, lam)
        wrongs["not clipped"] = unclipped
    for what, wrong in wrongs.items():
        gap = max_relative_error({first: wrong[first]}, {first: want[first]})
        assert gap >= SEPARATION, f"this step cannot tell the right update from {what} ({gap})"
    if sgd_lr:
        assert step.after is not None
        delta = {first: step.after - step.before}
        update = max_relative_error(delta, {first: -step.lr * want[first]})
        assert update <= TOLERANCE, f"first-layer update {update:.2e} off the reference"
        error = max(error, update)
    return error
