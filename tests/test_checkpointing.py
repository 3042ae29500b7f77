"""TrAct under activation checkpointing (``torch.utils.checkpoint``), reentrant and not.

Checkpointing runs the first layer twice: non-reentrant mode records the original pass with grad
enabled and recomputes it in backward only to refill saved tensors; reentrant mode runs the
original pass under ``no_grad`` and backpropagates through the recomputation. Either way exactly
one pass per micro-batch must count. A duplicated pass would go unnoticed with one micro-batch
(twice the Gram over twice the rows is the same matrix), so every step accumulates two
micro-batches of different scale, one checkpointed and one not, or both checkpointed.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from tests.kit import TinyNet, conv_net, max_abs_diff, stacked_rows, tract_grad
from tract_optim import TrActOptimizer

LAM = 0.05
Mode = bool | None  # use_reentrant; None: no checkpoint


def run(model: TinyNet, x: Tensor, reentrant: Mode = None, whole_block: bool = True) -> Tensor:
    """``model(x)`` with its first layer checkpointed alone or with the activation after it."""

    def block(x: Tensor) -> Tensor:
        return model.act(model.first(x))  # type: ignore[no-any-return]

    if reentrant is None:
        z = block(x)
    elif whole_block:
        z = checkpoint(block, x, use_reentrant=reentrant)
    else:
        z = model.act(checkpoint(model.first, x, use_reentrant=reentrant))
    return model.head(z.flatten(1))  # type: ignore[no-any-return]


def micro_batches(step: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(step)
    return [torch.randn(4, 3, 6, 6, generator=gen) * scale for scale in (1.0, 3.0)]


def train(modes: tuple[Mode, Mode], whole_block: bool = True, early_stop: bool = True) -> TinyNet:
    """Two steps, each accumulating two micro-batches run in the given checkpoint modes."""
    model = conv_net(act=nn.Tanh())
    opt = TrActOptimizer(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), model.first)
    for step in range(2):
        opt.zero_grad()
        for x, mode in zip(micro_batches(step), modes, strict=True):
            # Reentrant checkpointing computes parameter gradients only if an input needs grad.
            x = x.requires_grad_(mode is True)
            with set_checkpoint_early_stop(early_stop):
                run(model, x, mode, whole_block).square().mean().backward()
        opt.step()
    return model


# (micro-batch modes, checkpoint the block or the layer alone, early stop). Early stop (the
# recomputation ending once every saved tensor is back) only applies to non-reentrant mode.
CASES = [
    ((True, None), True, True),
    ((True, None), False, True),
    ((False, None), True, True),
    ((False, None), True, False),
    ((False, None), False, True),
    ((False, None), False, False),
    ((True, True), True, True),
    ((False, False), True, True),
    ((True, False), False, False),
]


@pytest.fixture(scope="module")
def uncheckpointed() -> dict[str, Tensor]:
    return train((None, None)).state_dict()


def _case_id(case: tuple[tuple[Mode, Mode], bool, bool]) -> str:
    names = {None: "plain", True: "reentrant", False: "nonreentrant"}
    (first, second), whole_block, early_stop = case
    what = "block" if whole_block else "layer"
    return f"{names[first]}+{names[second]}-{what}-{'early' if early_stop else 'full'}"


@pytest.mark.parametrize(("modes", "whole_block", "early_stop"), CASES, ids=map(_case_id, CASES))
def test_checkpointed_first_layer_updates_as_without_checkpointing(
    modes: tuple[Mode, Mode],
    whole_block: bool,
    early_stop: bool,
    uncheckpointed: dict[str, Tensor],
) -> None:
    diff = max_abs_diff(train(modes, whole_block, early_stop).state_dict(), uncheckpointed)
    assert diff < 1e-6


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_step_matches_fp64_reference(reentrant: bool) -> None:
    # The plain path is itself checked against the independent reference for one step.
    model = conv_net(act=nn.Tanh())
    opt = TrActOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model.first, LAM)
    parts = micro_batches(0)
    for x, mode in zip(parts, (reentrant, None), strict=True):
        run(model, x.requires_grad_(mode is True), mode).square().mean().backward()
    raw = model.first.weight.grad.clone()
    opt.precondition_()
    rows = stacked_rows(model.first, [x.detach() for x in parts])
    expected = tract_grad(rows, raw, LAM)
    # Entry by entry (stricter on small entries than ``assert_update``'s max-norm bound).
    torch.testing.assert_close(model.first.weight.grad.double(), expected, rtol=1e-5, atol=1e-7)
