"""Amortised statistics (``stats_every=k``): between refreshes the update is float64 TrAct with
the statistics of the last refresh step.

Each check reads the raw gradient the optimizer is about to precondition (``precondition_()``
after backward), and compares the preconditioned one with ``tests.kit.tract_grad`` on the rows
of the refresh step (or, with ``stats_decay``, the running average written out in float64).
Eager, compiled, and two gloo ranks; checkpoint resumes bit for bit; Lemma 2 for the kept
preconditioner.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from tests.kit import (
    U32,
    CountingBackend,
    conv_net,
    draw_conv,
    random_batch,
    relative_error,
    run_workers,
    stacked_rows,
    token_net,
    tract_grad,
    unfold_rows,
)
from tract_optim import TrActOptimizer, policy

LAM = 0.1
TOL = 1e-4
Run = Callable[[Tensor], Tensor]


def loss(out: Tensor) -> Tensor:
    return (out * torch.linspace(-1, 1, out.shape[-1])).sum()


def batch(kind: str, seed: int) -> Tensor:
    shape = (4, 3, 6, 6) if kind == "conv" else (2, 16)  # tokens: 2 rows < n = 16 (Woodbury)
    return random_batch(shape, seed, scale=1 + seed % 3)[0]


def model_of(kind: str) -> nn.Module:
    return conv_net() if kind == "conv" else token_net(n=16)


def train(
    model: nn.Module, opt: TrActOptimizer, run: Run, kind: str, steps: range
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(input, raw gradient, TrAct gradient) of each step."""
    out = []
    for step in steps:
        x = batch(kind, step)
        opt.zero_grad()
        loss(run(x)).backward()
        raw = model.first.weight.grad.clone()  # type: ignore[union-attr]
        opt.precondition_()
        out.append((x, raw, model.first.weight.grad.clone()))  # type: ignore[union-attr]
        opt.step()
    return out


@pytest.mark.parametrize(
    ("compiled", "capturable"),
    [(False, False), (True, False), (False, True)],
    ids=["eager", "compiled", "capturable"],
)
@pytest.mark.parametrize("kind", ["conv", "tokens"])
def test_steps_between_refreshes_use_the_refresh_steps_rows(
    kind: str, compiled: bool, capturable: bool
) -> None:
    """Capturable steps decide the refresh on the device (the hooks record every step)."""
    model = model_of(kind)
    opt = TrActOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model.first,
        LAM,
        stats_every=3,
        capturable=capturable,
    )
    torch._dynamo.reset()
    run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    steps = train(model, opt, run, kind, range(7))  # type: ignore[arg-type]
    for step, (_, raw, got) in enumerate(steps):
        refresh_x = steps[step - step % 3][0]
        expected = tract_grad(stacked_rows(model.first, [refresh_x]), raw, LAM)
        assert relative_error(got, expected) < TOL, step
    # ... and differs from the exact update of its own rows (so the check can fail)
    x, raw, got = steps[1]
    exact = tract_grad(stacked_rows(model.first, [x]), raw, LAM)
    assert relative_error(got, exact) > 10 * TOL


@pytest.mark.parametrize("capturable", [False, True])
def test_running_average_over_refreshes(capturable: bool) -> None:
    model = conv_net()
    opt = TrActOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model.first,
        LAM,
        stats_every=2,
        stats_decay=0.75,
        capturable=capturable,
    )
    steps = train(model, opt, model, "conv", range(5))
    average: Tensor | None = None
    for step, (x, raw, got) in enumerate(steps):
        if step % 2 == 0:
            rows = unfold_rows(model.first, x)
            second = rows.transpose(1, 2) @ rows / rows.shape[1]
            average = second if average is None else 0.75 * average + 0.25 * second
        assert average is not None
        matrix = average + LAM * torch.eye(average.shape[-1], dtype=torch.float64)
        flat = raw.double().reshape(1, raw.shape[0], -1)
        expected = torch.linalg.solve(matrix, flat.transpose(1, 2)).transpose(1, 2)
        assert relative_error(got, expected.reshape(raw.shape)) < TOL, step


def test_hooks_do_no_statistics_work_between_refreshes() -> None:
    model = conv_net()
    opt = TrActOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model.first, LAM, stats_every=4
    )
    with mock.patch.object(policy.unfold, "gram", wraps=policy.unfold.gram) as gram:
        calls = []
        for step in range(8):
            opt.zero_grad()
            loss(model(batch("conv", step))).backward()
            opt.step()
            calls.append(gram.call_count)
    assert calls == [1, 1, 1, 1, 2, 2, 2, 2]


def test_set_lam_between_refreshes_refactors_the_kept_statistics() -> None:
    model = conv_net()
    opt = TrActOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model.first, LAM, stats_every=4
    )
    ((x0, _, _),) = train(model, opt, model, "conv", range(1))
    opt.set_lam(0.5)
    ((_, raw, got),) = train(model, opt, model, "conv", range(1, 2))
    expected = tract_grad(stacked_rows(model.first, [x0]), raw, 0.5)
    assert relative_error(got, expected) < TOL


@pytest.mark.parametrize("decay", [None, 0.5])
def test_resume_mid_cycle_continues_bit_for_bit(decay: float | None) -> None:
    def make() -> tuple[nn.Module, TrActOptimizer]:
        model = conv_net()
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, TrActOptimizer(sgd, model.first, LAM, stats_every=3, stats_decay=decay)

    model, opt = make()
    train(model, opt, model, "conv", range(5))
    saved = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(model.state_dict())
    assert saved["tract"]["step"] == 5
    train(model, opt, model, "conv", range(5, 9))
    resumed_model, resumed = make()
    resumed_model.load_state_dict(weights)
    resumed.load_state_dict(saved)
    train(resumed_model, resumed, resumed_model, "conv", range(5, 9))
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key


def test_compiled_model_costs_at_most_one_more_graph() -> None:
    counts = []
    for every in (1, 4):
        torch._dynamo.reset()
        model = conv_net()
        opt = TrActOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model.first, LAM, stats_every=every
        )
        backend = CountingBackend()
        run = torch.compile(model, backend=backend, fullgraph=True)
        for step in range(9):
            opt.zero_grad()
            loss(run(batch("conv", step))).backward()
            opt.step()
        counts.append(backend.compilations)
    assert counts[1] <= counts[0] + 1, counts


def test_lifecycle_rules_hold_between_refreshes() -> None:
    """A backward after precondition_() still raises, and so does a gradient the hooks never
    saw (the weight used functionally), between two refreshes."""
    model = conv_net()
    opt = TrActOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model.first, LAM, stats_every=4
    )
    train(model, opt, model, "conv", range(1))
    opt.zero_grad()
    loss(model(batch("conv", 1))).backward()
    opt.precondition_()
    loss(model(batch("conv", 2))).backward()
    with pytest.raises(RuntimeError, match="backward pass added to the gradient"):
        opt.step()
    opt.zero_grad()
    z = F.conv2d(batch("conv", 3), model.first.weight, model.first.bias, padding=1)
    loss(model.after_first(z)).backward()
    with pytest.raises(RuntimeError, match="recorded no training pass"):
        opt.step()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stats_every": 0}, r"stats_every must be an int >= 1, got 0"),
        ({"stats_every": True}, r"stats_every must be an int >= 1, got True"),
        ({"stats_every": 2.0}, r"stats_every must be an int >= 1, got 2\.0"),
        ({"stats_decay": 1.0}, r"stats_decay must be None or a float in \[0, 1\), got 1\.0"),
    ],
)
def test_bad_amortisation_options_are_refused(options: dict[str, Any], message: str) -> None:
    model = conv_net()
    with pytest.raises(ValueError, match=message):
        TrActOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.first, **options)
    assert not model.first._forward_hooks


@settings(max_examples=30, deadline=None)
@given(data=st.data(), lam=st.sampled_from([0.01, 0.1, 1.0]))
def test_lemma2_for_the_kept_preconditioner(data: st.DataObject, lam: float) -> None:
    """Lemma 2 with the refresh step's statistics: on a later step, ∇W ≠ 0 ⇒ TrAct ∇W ≠ 0,
    and it is a descent direction within λI ⪯ M ⪯ (tr(XᵀX)/r + λ) I of the refresh rows,
    so the amortised update vanishes exactly where the gradient does."""
    layer, x = draw_conv(data, dtype=torch.float64)
    x_later = x.flip(0) * 0.5 + 0.1
    opt = TrActOptimizer(torch.optim.SGD(layer.parameters(), lr=0.0), layer, lam, stats_every=2)
    layer(x).sum().backward()
    opt.step()
    assume(layer.weight.grad is not None)
    opt.zero_grad()
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    out = layer(x_later)
    (out * torch.randn(out.shape, generator=gen, dtype=torch.float64)).sum().backward()
    plain = layer.weight.grad.clone()  # type: ignore[union-attr]
    assume(plain.any())
    opt.precondition_()
    update = layer.weight.grad
    assert update is not None and update.any()
    rows = unfold_rows(layer, x)
    trace = (rows**2).sum(dim=(1, 2)).max().item() / rows.shape[1]
    slack = 64 * U32 * (trace + lam) / lam
    inner = (plain * update).sum().item()
    squared = (plain**2).sum().item()
    assert squared / (trace + lam) * (1 - slack) <= inner <= squared / lam * (1 + slack)


def _ddp_worker(rank: int, world: int) -> list[dict[str, Tensor]]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = conv_net()
    ddp = DDP(model)
    opt = TrActOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1), model.first, LAM, stats_every=3)
    out = []
    for step in range(4):
        x = batch("conv", step)
        opt.zero_grad()
        loss(ddp(x[rank::world])).backward()
        raw = model.first.weight.grad.clone()  # type: ignore[union-attr]
        opt.precondition_()
        out.append({"raw": raw, "got": model.first.weight.grad.clone()})  # type: ignore[union-attr]
        opt.step()
    return out


@pytest.mark.slow
def test_ddp_steps_between_refreshes_use_the_global_refresh_rows() -> None:
    results = run_workers(_ddp_worker, world=2)
    layer = conv_net().first
    for step in range(4):
        refresh = batch("conv", step - step % 3)
        rows = torch.cat([unfold_rows(layer, refresh[r::2]) for r in range(2)], dim=1)
        for result in results:
            expected = tract_grad(rows, result[step]["raw"], LAM)
            assert relative_error(result[step]["got"], expected) < TOL, step


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.update(step=-1), r"\['step'\] must be a non-negative int"),
        (lambda t: t.update(kept=[]), r"\['kept'\] must be a list of 1 entries"),
        (lambda t: t["kept"][0].pop("count"), r"\['kept'\]\[0\] must be None or the kept"),
        (
            lambda t: t["kept"][0].update(gram=torch.zeros(1, 5, 5)),
            r"\['kept'\]\[0\] must be None or the kept statistics of a layer with 1 group",
        ),
    ],
)
def test_malformed_amortisation_checkpoint_is_refused_before_any_change(
    edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    model = conv_net()
    opt = TrActOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model.first, LAM, stats_every=3
    )
    train(model, opt, model, "conv", range(2))
    saved = copy.deepcopy(opt.state_dict())
    edit(saved["tract"])
    before = copy.deepcopy(opt.state_dict())
    other = conv_net()
    other_opt = TrActOptimizer(
        torch.optim.SGD(other.parameters(), lr=0.1), other.first, 0.3, stats_every=3
    )
    other_before = copy.deepcopy(other_opt.state_dict())
    with pytest.raises(ValueError, match=r"state_dict\['tract'\]" + message):
        other_opt.load_state_dict(saved)
    assert other_opt.lams == (0.3,)
    assert other_opt.state_dict()["tract"] == other_before["tract"]
    assert opt.state_dict()["tract"]["step"] == before["tract"]["step"]
