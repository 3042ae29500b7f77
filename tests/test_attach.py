"""``TrActPreconditioner.attach``: TrAct on an optimizer someone else built and steps.

Each update is checked with the optimizer's own step against float64 TrAct on the passes of the
step (``tests.kit.tract_grad``), with ``SGD(lr=1)`` where the update must equal the gradient, and
against a hand-written reference loop for Adam, fused and foreach variants.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.optim import SGD, Adam, AdamW, Optimizer

from tests.kit import conv_net, random_batch, relative_error, stacked_rows, tract_grad
from tract_optim import PrecisionWarning, TrActOptimizer, TrActPreconditioner

LAM = 0.1


def images(seed: int) -> Tensor:
    return random_batch((4, 3, 6, 6), seed)[0]


def loss(out: Tensor) -> Tensor:
    return (out * torch.linspace(-1, 1, out.shape[-1])).sum()


def raw_grad(model: nn.Module, x: Tensor) -> Tensor:
    twin = copy.deepcopy(model)
    twin.zero_grad(set_to_none=True)
    loss(twin(x)).backward()
    return twin.first.weight.grad.double()  # type: ignore[union-attr]


def assert_moved_by(before: Tensor, weight: Tensor, expected: Tensor) -> None:
    error = relative_error(before.double() - weight.detach().double(), expected)
    assert error < 1e-4, f"relative error {error:.2e}"


def test_attached_sgd_steps_equal_float64_tract() -> None:
    model = conv_net()
    opt = SGD(model.parameters(), lr=1.0)
    TrActPreconditioner(model.first, LAM).attach(opt)
    for step in range(3):
        x = images(step)
        before = model.first.weight.detach().clone()
        raw = raw_grad(model, x)
        opt.zero_grad()
        loss(model(x)).backward()
        opt.step()
        assert_moved_by(
            before, model.first.weight, tract_grad(stacked_rows(model.first, [x]), raw, LAM)
        )


def _adam_reference(kind: str) -> Callable[[nn.Module], Optimizer]:
    options = {"fused": True} if kind == "fused" else {"foreach": True} if kind == "foreach" else {}
    return lambda m: AdamW(m.parameters(), lr=1e-2, weight_decay=0.05, **options)


@pytest.mark.parametrize("kind", ["plain", "foreach", "fused"])
def test_attached_adamw_equals_tract_optimizer(kind: str) -> None:
    """Attach to a (fused, foreach) AdamW: the same training as TrActOptimizer around it, and
    as a plain AdamW whose first-layer gradient is replaced by float64 TrAct by hand."""
    make = _adam_reference(kind)
    attached, wrapped, by_hand = conv_net(), conv_net(), conv_net()
    opt = make(attached)
    TrActPreconditioner(attached.first, LAM).attach(opt)
    ref = TrActOptimizer(make(wrapped), wrapped.first, LAM)
    plain = make(by_hand)
    for step in range(3):
        x = images(step)
        for model, o in ((attached, opt), (wrapped, ref)):
            o.zero_grad()
            loss(model(x)).backward()
            o.step()
        plain.zero_grad()
        loss(by_hand(x)).backward()
        weight = by_hand.first.weight
        assert weight.grad is not None
        weight.grad = tract_grad(stacked_rows(by_hand.first, [x]), weight.grad, LAM).float()
        plain.step()
    for p, q, r in zip(
        attached.parameters(), wrapped.parameters(), by_hand.parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


def test_two_attached_optimizers_precondition_once() -> None:
    """SGD for the first layer and Adam for the rest, stepped one after the other."""
    model = conv_net()
    first = SGD(model.first.parameters(), lr=1.0)
    rest = Adam(model.head.parameters(), lr=1e-2)
    pre = TrActPreconditioner(model.first, LAM)
    pre.attach(rest, first)  # rest holds no first-layer weight; first does
    for step in range(2):
        x = images(step)
        before = model.first.weight.detach().clone()
        raw = raw_grad(model, x)
        first.zero_grad()
        rest.zero_grad()
        loss(model(x)).backward()
        rest.step()  # preconditions
        first.step()  # must not precondition again
        assert_moved_by(
            before, model.first.weight, tract_grad(stacked_rows(model.first, [x]), raw, LAM)
        )


def test_attach_with_grad_scaler_and_clipping() -> None:
    """scaler.step(opt) unscales, then the pre-hook preconditions and clips: the TrAct
    gradient, clipped to the norm, as TrActOptimizer(clip_grad_norm=) does it and as a plain
    loop does it with float64 TrAct and ``clip_grad_norm_`` by hand."""
    by_hand = conv_net()
    plain = SGD(by_hand.parameters(), lr=0.5)
    norms = []
    for step in range(2):
        x = images(step)
        plain.zero_grad()
        loss(by_hand(x)).backward()
        weight = by_hand.first.weight
        assert weight.grad is not None
        weight.grad = tract_grad(stacked_rows(by_hand.first, [x]), weight.grad, LAM).float()
        norms.append(torch.nn.utils.clip_grad_norm_(by_hand.parameters(), 0.05))
        plain.step()
    attached, wrapped = conv_net(), conv_net()
    opt = SGD(attached.parameters(), lr=0.5)
    pre = TrActPreconditioner(attached.first, LAM, clip_grad_norm=0.05)
    pre.attach(opt)
    ref = TrActOptimizer(SGD(wrapped.parameters(), lr=0.5), wrapped.first, LAM, clip_grad_norm=0.05)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in range(2)]
    for step in range(2):
        x = images(step)
        for model, o, scaler in ((attached, opt, scalers[0]), (wrapped, ref, scalers[1])):
            o.zero_grad()
            scaler.scale(loss(model(x))).backward()
            scaler.step(o)
            scaler.update()
    assert pre.last_grad_norm is not None and ref.last_grad_norm is not None
    torch.testing.assert_close(pre.last_grad_norm, ref.last_grad_norm)
    torch.testing.assert_close(pre.last_grad_norm, norms[-1], rtol=1e-5, atol=0)
    for p, q, r in zip(
        attached.parameters(), wrapped.parameters(), by_hand.parameters(), strict=True
    ):
        torch.testing.assert_close(p, q)
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_optimizer_zero_grad_after_a_skipped_step_drops_the_statistics(set_to_none: bool) -> None:
    """The optimizer's own zero_grad is noticed at the next backward (attach mode has no
    TrActOptimizer.zero_grad): the next update is TrAct of the next batch alone."""
    model = conv_net()
    opt = SGD(model.parameters(), lr=1.0)
    TrActPreconditioner(model.first, LAM).attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt.zero_grad()
    scaler.scale(loss(model(images(1))) * 1e38).backward()  # overflows: the step is skipped
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=set_to_none)
    x = images(2)
    before = model.first.weight.detach().clone()
    raw = raw_grad(model, x)
    scaler.scale(loss(model(x))).backward()
    scaler.step(opt)
    assert_moved_by(
        before, model.first.weight, tract_grad(stacked_rows(model.first, [x]), raw, LAM)
    )


def test_detach_restores_plain_training() -> None:
    model, plain = conv_net(), conv_net()
    opt, plain_opt = SGD(model.parameters(), lr=0.5), SGD(plain.parameters(), lr=0.5)
    handle = TrActPreconditioner(model.first, LAM).attach(opt)
    handle.remove()
    for m, o in ((model, opt), (plain, plain_opt)):
        o.zero_grad()
        loss(m(images(1))).backward()
        o.step()
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)


def test_attach_refuses_what_it_cannot_serve() -> None:
    model = conv_net()
    pre = TrActPreconditioner(model.first, LAM)
    with pytest.raises(ValueError, match=r"first_layer\[0\] .*not in any inner optimizer"):
        pre.attach(SGD(model.head.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"requires a closure"):
        pre.attach(torch.optim.LBFGS(model.parameters()))
    with pytest.raises(TypeError, match=r"must be a torch\.optim\.Optimizer"):
        pre.attach(model)  # type: ignore[arg-type]
    opt = SGD(model.parameters(), lr=0.1)
    pre.attach(opt)
    with pytest.raises(ValueError, match="already attached"):
        pre.attach(opt)
    assert len(opt._optimizer_step_pre_hooks) == 1  # the failed attach added nothing


def test_preconditioner_state_dict_round_trip() -> None:
    model = conv_net()
    pre = TrActPreconditioner(model.first, 0.3)
    pre.set_lam(0.2)
    other = TrActPreconditioner(conv_net().first, 0.1)
    other.load_state_dict(pre.state_dict())
    assert other.lams == (0.2,)
    with pytest.raises(ValueError, match=r"state_dict\['lam'\]\[0\]"):
        other.load_state_dict({"lam": [-1.0]})
    assert other.lams == (0.2,)


def test_warnings_point_at_the_users_line() -> None:
    """PrecisionWarning and the takeover warning name this file and the line of the call."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    opt = TrActOptimizer(SGD(layer.parameters(), lr=0.1), layer, 1e-9, stats_dtype=torch.float32)
    x = torch.randn(16, 8)
    x[:, -1] = x[:, 0]  # rank-deficient: cond(M) ≈ 1e9
    layer(x).square().sum().backward()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = _line() + 1
        opt.step()
    precision = [w for w in record if issubclass(w.category, PrecisionWarning)]
    assert precision, [str(w.message) for w in record]
    assert (precision[0].filename, precision[0].lineno) == (__file__, line)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = _line() + 1
        TrActOptimizer(SGD(layer.parameters(), lr=0.1), layer)
    assert record and (record[0].filename, record[0].lineno) == (__file__, line)


def _line() -> int:
    """The caller's line number."""
    import inspect

    frame = inspect.currentframe()
    assert frame is not None and frame.f_back is not None
    return frame.f_back.f_lineno


def test_torch_private_optimizer_state_is_all_there() -> None:
    """TrActOptimizer sets up what torch.optim.Optimizer.__init__ does (its param_groups,
    state and defaults are views of the inner optimizer): pinned against torch's own list."""
    model = conv_net()
    opt = TrActOptimizer(SGD(model.parameters(), lr=0.1), model.first)
    torch_attributes = set(vars(SGD(model.parameters(), lr=0.1))) - {
        "defaults",
        "state",
        "param_groups",
    }
    assert torch_attributes <= set(vars(opt)), torch_attributes - set(vars(opt))


@pytest.mark.parametrize("several", [False, True], ids=["one", "two"])
def test_checkpoints_of_the_earlier_format_load(several: bool) -> None:
    """What earlier versions saved: the inner state dict (``{"optimizers": [...]}`` for several)
    plus ``"tract": {"lam": [...], "solve_dtype": "None"}``. Written here by hand, as they wrote
    it; loading it restores λ and every inner optimizer's state."""
    source = conv_net()
    inner = (
        [SGD(source.first.parameters(), lr=0.1, momentum=0.9), Adam(source.head.parameters())]
        if several
        else [Adam(source.parameters())]
    )
    for step in range(2):
        for o in inner:
            o.zero_grad()
        loss(source(images(step))).backward()
        for o in inner:
            o.step()
    states = [o.state_dict() for o in inner]
    old: dict[str, object] = {"optimizers": states} if several else dict(states[0])
    old["tract"] = {"lam": [0.3], "solve_dtype": "None"}
    target = conv_net()
    fresh = (
        [SGD(target.first.parameters(), lr=0.1, momentum=0.9), Adam(target.head.parameters())]
        if several
        else [Adam(target.parameters())]
    )
    opt = TrActOptimizer(fresh if several else fresh[0], target.first, 0.1)
    opt.load_state_dict(copy.deepcopy(old))
    assert opt.lams == (0.3,)
    for got, want in zip(opt.optimizers, inner, strict=True):
        loaded, saved = got.state_dict(), want.state_dict()
        assert loaded["param_groups"] == saved["param_groups"]
        for key in saved["state"]:
            for name, value in saved["state"][key].items():
                assert torch.equal(loaded["state"][key][name], value)


@pytest.mark.parametrize("keyword", [False, True])
def test_attached_step_with_a_closure_preconditions_after_it(keyword: bool) -> None:
    """``step(closure)`` whose closure runs the backward (Lightning's automatic optimization):
    the update is TrAct of that closure's pass."""
    model = conv_net()
    opt = SGD(model.parameters(), lr=1.0)
    TrActPreconditioner(model.first, LAM).attach(opt)
    x = images(1)

    def closure() -> Tensor:
        opt.zero_grad()
        out = loss(model(x))
        out.backward()
        return out

    before = model.first.weight.detach().clone()
    raw = raw_grad(model, x)
    opt.step(closure=closure) if keyword else opt.step(closure)
    expected = tract_grad(stacked_rows(model.first, [x]), raw, LAM)
    assert_moved_by(before, model.first.weight, expected)


def test_attach_refuses_an_optimizer_without_step_hooks_before_any_change() -> None:
    """A wrapper that subclasses Optimizer without its __init__ (Accelerate's
    AcceleratedOptimizer) has no step hooks: a TypeError says to attach to what it wraps."""

    class Wrapper(Optimizer):
        def __init__(self, optimizer: Optimizer) -> None:
            self.optimizer = optimizer

        def step(self, closure: None = None) -> None:  # type: ignore[override]
            self.optimizer.step()

    model = conv_net()
    sgd = SGD(model.parameters(), lr=0.1)
    pre = TrActPreconditioner(model.first, LAM)
    with pytest.raises(TypeError, match=r"optimizers\[1\]: Wrapper does not support step hooks.*"):
        pre.attach(sgd, Wrapper(sgd))
    assert not sgd._optimizer_step_pre_hooks
