"""The torch.optim contract of ``TrActOptimizer`` in real training loops.

Every numerical check compares against either the plain inner optimizer run side by side, or
TrAct computed independently by ``kit.tract_grad`` (float64 ``torch.linalg.solve`` on the rows of
``kit.unfold_rows``) and written into ``.grad`` of a plain optimizer's model.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.optim import SGD, Adam, Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, OneCycleLR, StepLR

from tests.kit import (
    ERROR_PER_COND,
    TinyNet,
    assert_same,
    assert_update,
    condition,
    conv_net,
    random_batch,
    relative_error,
    tiny_batch,
    tiny_net,
    token_net,
    tract_grad,
    two_stem,
    unfold_rows,
)
from tract_optim import TrActOptimizer

Batch = tuple[Tensor, Tensor]
ATOL = 2e-6
RTOL = 1e-4
LAM = 0.1


# --- models, data and the independent reference -------------------------------------------------


def _net(kind: str, seed: int = 0) -> TinyNet:
    """A Conv2d first layer (n = 27, 25 rows per 5×5 image) or a Linear one (n = 6)."""
    if kind == "conv":
        return conv_net(size=5, seed=seed)
    return token_net(n=6, width=8, act=nn.Tanh(), seed=seed)


def _batches(kind: str, count: int, size: int = 4, seed: int = 1) -> list[Batch]:
    """``count`` distinct standardised batches with 3-class labels."""
    shape = (size, 3, 5, 5) if kind == "conv" else (size, 6)
    return [random_batch(shape, seed + i) for i in range(count)]


def _loss(model: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _apply_reference(layer: nn.Module, x: Tensor, lam: float) -> None:
    """Overwrite ``layer.weight.grad`` by its reference TrAct gradient."""
    grad = layer.weight.grad
    assert isinstance(grad, Tensor)
    grad.copy_(tract_grad(unfold_rows(layer, x), grad, lam))


def _reference_train(model: TinyNet, opt: Optimizer, batches: Sequence[Batch], lam: float) -> None:
    """Plain optimizer loop whose first-layer gradient is replaced by the reference TrAct one."""
    for batch in batches:
        opt.zero_grad()
        _loss(model, batch).backward()
        _apply_reference(model.first, batch[0], lam)
        opt.step()


def _train(model: nn.Module, opt: Optimizer, batches: Sequence[Batch]) -> None:
    """The usual loop: zero_grad, forward, backward, step."""
    for batch in batches:
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()


def _assert_params(a: nn.Module, b: nn.Module, *, exact: bool = False) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, atol=ATOL, rtol=RTOL, msg=name)


def _state_snapshot(opt: Optimizer) -> dict[str, Any]:
    return copy.deepcopy(opt.state_dict())


def _pair(
    kind: str, make_opt: Callable[[nn.Module], Optimizer], lam: float = 0.1
) -> tuple[TinyNet, TrActOptimizer, TinyNet, Optimizer]:
    """Identical models: one trained through TrAct, one through the reference."""
    model, ref = _net(kind), _net(kind)
    opt = TrActOptimizer(make_opt(model), model.first, lam)
    return model, opt, ref, make_opt(ref)


def _adam(model: nn.Module) -> Optimizer:
    return Adam(model.parameters(), lr=1e-2)


def _sgd(model: nn.Module) -> Optimizer:
    return SGD(model.parameters(), lr=0.05, momentum=0.9)


# --- the reference itself and the Optimizer views ------------------------------------------------


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("size", [2, 8])
def test_matches_reference_and_differs_from_plain(kind: str, size: int) -> None:
    """TrAct equals the closed form (direct and Woodbury sizes) and is not the plain update."""
    batches = _batches(kind, 3, size)
    model, opt, ref, ref_opt = _pair(kind, _adam)
    _train(model, opt, batches)
    _reference_train(ref, ref_opt, batches, 0.1)
    _assert_params(model, ref)
    plain = _net(kind)
    _train(plain, _adam(plain), batches)
    assert not torch.allclose(plain.first.weight, model.first.weight, atol=1e-3)


def test_is_optimizer_with_live_views() -> None:
    """param_groups/state/defaults are the inner objects, also after load_state_dict."""
    model = _net("conv")
    inner = _adam(model)
    opt = TrActOptimizer(inner, model.first)
    assert isinstance(opt, Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults
    _train(model, opt, _batches("conv", 2))
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    opt.param_groups[0]["lr"] = 0.123
    assert inner.param_groups[0]["lr"] == 0.123
    assert opt.state_dict()["param_groups"][0]["lr"] == 0.123


def test_inner_state_holds_only_inner_entries() -> None:
    """TrAct writes nothing into the inner per-parameter state: same keys as a plain Adam."""
    batches = _batches("conv", 2)
    model, plain = _net("conv"), _net("conv")
    opt, plain_opt = TrActOptimizer(_adam(model), model.first), _adam(plain)
    _train(model, opt, batches)
    _train(plain, plain_opt, batches)
    assert len(opt.state) == len(plain_opt.state) == len(list(model.parameters()))
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert opt.state[p].keys() == plain_opt.state[q].keys()
    saved = opt.state_dict()
    assert saved.keys() == {*plain_opt.state_dict().keys(), "tract"}


# --- LR schedulers -------------------------------------------------------------------------------


def _step_lr(opt: Optimizer) -> LRScheduler:
    return StepLR(opt, step_size=2, gamma=0.5)


def _cosine(opt: Optimizer) -> LRScheduler:
    return CosineAnnealingLR(opt, T_max=5)


def _lambda(opt: Optimizer) -> LRScheduler:
    return LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch))


def _one_cycle(opt: Optimizer) -> LRScheduler:
    return OneCycleLR(opt, max_lr=0.1, total_steps=6)


@pytest.mark.parametrize("make_sched", [_step_lr, _cosine, _lambda, _one_cycle])
def test_schedulers_drive_inner_lr(make_sched: Callable[[Optimizer], LRScheduler]) -> None:
    """lr (and OneCycle's momentum) follow the plain schedule; updates use them; no warning."""
    batches = _batches("conv", 5)
    model, opt, ref, ref_opt = _pair("conv", _sgd)
    sched, ref_sched = make_sched(opt), make_sched(ref_opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch in batches:
            _train(model, opt, [batch])
            _reference_train(ref, ref_opt, [batch], 0.1)
            sched.step()
            ref_sched.step()
            for group, ref_group in zip(opt.param_groups, ref_opt.param_groups, strict=True):
                assert group["lr"] == ref_group["lr"]
                assert group["momentum"] == ref_group["momentum"]
            assert sched.get_last_lr() == ref_sched.get_last_lr()
    assert opt.optimizers[0].param_groups[0]["lr"] == ref_sched.get_last_lr()[0]
    _assert_params(model, ref)


# --- GradScaler and closures ---------------------------------------------------------------------


def _scaled_train(
    model: nn.Module, opt: Optimizer, scaler: torch.amp.GradScaler, batches: Sequence[Batch]
) -> None:
    for batch in batches:
        opt.zero_grad()
        scaler.scale(_loss(model, batch)).backward()
        scaler.step(opt)
        scaler.update()


def test_grad_scaler_equals_unscaled_run() -> None:
    """Scaling by a power of two is exact, so the scaled TrAct run equals the unscaled one."""
    batches = _batches("conv", 4)
    model, unscaled = _net("conv"), _net("conv")
    opt = TrActOptimizer(_adam(model), model.first)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    _scaled_train(model, opt, scaler, batches)
    _train(unscaled, TrActOptimizer(_adam(unscaled), unscaled.first), batches)
    assert scaler.get_scale() == 2.0**12
    _assert_params(model, unscaled, exact=True)


def test_closure_runs_with_grad_then_preconditions() -> None:
    """step(closure) under no_grad still gets gradients, returns the loss, then preconditions."""
    batches = _batches("conv", 3)
    model, opt, ref, ref_opt = _pair("conv", _adam)
    for batch in batches:

        def closure(batch: Batch = batch) -> float:
            opt.zero_grad()
            loss = _loss(model, batch)
            loss.backward()
            return loss.item()

        with torch.no_grad():
            loss = opt.step(closure)
        expected = _loss(ref, batch).item()
        _reference_train(ref, ref_opt, [batch], 0.1)
        assert loss == pytest.approx(expected, rel=1e-4)
    _assert_params(model, ref)


# --- clipping and precondition_ ------------------------------------------------------------------


@dataclass(frozen=True)
class ClipCase:
    """One way to clip the TrAct gradient between ``precondition_()`` and the step."""

    scaler: bool  # GradScaler: scaler.unscale_(opt) first, scaler.step(opt) instead of opt.step()
    autocast: torch.dtype | None = None
    by_hand: bool = False  # halve every gradient in place instead of clip_grad_norm_


CLIP_CASES = {
    "clip_grad_norm_": ClipCase(False),
    "by hand": ClipCase(False, by_hand=True),
    "GradScaler": ClipCase(True),
    "GradScaler, bf16 autocast": ClipCase(True, torch.bfloat16),
    "GradScaler, fp16 autocast": ClipCase(True, torch.float16),
}


def _clipped_steps(case: ClipCase) -> dict[str, Tensor]:
    """Three steps of the recipe on ``tiny_net`` (SGD, lr 1, so a step moves every parameter by
    exactly −its gradient), each checked in float64; returns the final state dict.

    The clip halves the total norm of the TrAct gradients (raw gradients, the first weight's
    through ``kit.tract_grad``), so it really acts; on inputs of scale 2 that norm is 6 % or more
    away from the raw gradients' (what clipping before TrAct would measure).
    """
    model = tiny_net()
    opt = TrActOptimizer(SGD(model.parameters(), lr=1.0), model.first, LAM)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=case.scaler)
    for seed in range(3):
        x, y = tiny_batch(seed, scale=2.0)
        opt.zero_grad()
        dtype, enabled = case.autocast or torch.bfloat16, case.autocast is not None
        with torch.autocast("cpu", dtype=dtype, enabled=enabled):
            loss = F.cross_entropy(model(x), y)
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        raw = {name: p.grad.double() / scale for name, p in model.named_parameters()}
        rows = unfold_rows(model.first, x)
        want = dict(raw)
        want["first.weight"] = tract_grad(rows, raw["first.weight"], LAM)
        total = torch.cat([g.flatten() for g in want.values()]).norm()
        raw_total = torch.cat([g.flatten() for g in raw.values()]).norm()
        before = {name: p.detach().double() for name, p in model.named_parameters()}

        if case.scaler:
            scaler.unscale_(opt)
        opt.precondition_()
        first = model.first.weight.grad.clone()
        opt.precondition_()  # a second call changes nothing
        assert torch.equal(model.first.weight.grad, first)
        assert_update(first, raw["first.weight"], rows, LAM)
        if case.by_hand:
            coef = 0.5
            for p in model.parameters():
                p.grad.mul_(coef)
        else:
            norm = nn.utils.clip_grad_norm_(model.parameters(), float(total) / 2)
            assert relative_error(norm, total) <= 1e-5  # it measured the TrAct gradient ...
            assert relative_error(norm, raw_total) > 1e-2  # ... not the raw one
            coef = float(total) / 2 / (float(norm) + 1e-6)
        if case.scaler:
            scaler.step(opt)  # must not precondition a second time
            scaler.update()
        else:
            opt.step()

        bound = ERROR_PER_COND * condition(rows, LAM)
        for name, p in model.named_parameters():
            moved = before[name] - p.detach().double()
            assert relative_error(moved, coef * want[name]) <= bound, name
    return model.state_dict()


@pytest.mark.parametrize("case", CLIP_CASES.values(), ids=CLIP_CASES.keys())
def test_precondition_clip_step_steps_with_the_clipped_tract_gradient(case: ClipCase) -> None:
    """The clipping recipe: precondition_() (twice is once), clip the TrAct gradient, step
    without preconditioning again; with a GradScaler, scaler.unscale_(opt) first. Each step moves
    the weights by clip(TrAct(g)) in float64. Without autocast, the scaled run equals the
    unscaled one exactly (scaling by a power of two is exact)."""
    params = _clipped_steps(case)
    if case.scaler and case.autocast is None:
        assert_same(params, _clipped_steps(CLIP_CASES["clip_grad_norm_"]))


# --- checkpoints ---------------------------------------------------------------------------------


def _save(model: nn.Module, opt: Optimizer) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("make_opt", [_adam, _sgd])
def test_state_dict_resume_equals_uninterrupted(make_opt: Callable[[nn.Module], Optimizer]) -> None:
    """N steps, save, load into fresh objects, M steps == N+M steps; λ comes back."""
    batches = _batches("conv", 5)
    straight = _net("conv")
    _train(straight, TrActOptimizer(make_opt(straight), straight.first, 0.2), batches)

    first = _net("conv")
    first_opt = TrActOptimizer(make_opt(first), first.first, 0.2)
    _train(first, first_opt, batches[:3])
    blob = _save(first, first_opt)

    resumed = _net("conv", seed=7)
    resumed_opt = TrActOptimizer(make_opt(resumed), resumed.first, 0.5)
    saved = torch.load(io.BytesIO(blob), weights_only=True)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    assert resumed_opt.lams == (0.2,)
    _train(resumed, resumed_opt, batches[3:])
    _assert_params(resumed, straight, exact=True)


def test_loads_a_plain_inner_state_dict() -> None:
    """Switching a plain Adam run to TrAct mid-training keeps its moments (and λ)."""
    first, later = _batches("conv", 2), _batches("conv", 2, seed=5)
    plain = _net("conv")
    plain_opt = _adam(plain)
    _train(plain, plain_opt, first)
    saved = copy.deepcopy({"model": plain.state_dict(), "opt": plain_opt.state_dict()})
    model, opt, ref, ref_opt = _pair("conv", _adam, lam=0.2)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    ref.load_state_dict(saved["model"])
    ref_opt.load_state_dict(copy.deepcopy(saved["opt"]))
    assert opt.lams == (0.2,)
    _train(model, opt, later)
    _reference_train(ref, ref_opt, later, 0.2)
    _assert_params(model, ref)


def test_load_state_dict_rejects_wrong_structure_and_changes_nothing() -> None:
    """Wrong optimizer count or λ count: ValueError that says what is wrong; state untouched."""
    model = _net("conv")
    opt = TrActOptimizer(_adam(model), model.first, 0.3)
    _train(model, opt, _batches("conv", 1))
    before = _state_snapshot(opt)

    two = _net("conv")
    multi = TrActOptimizer([_adam(two.first), _adam(two.head)], two.first)
    with pytest.raises(ValueError, match="several optimizers"):
        opt.load_state_dict(multi.state_dict())
    with pytest.raises(ValueError, match="must come from 2 optimizers stepped together"):
        multi.load_state_dict(opt.state_dict())
    bad_lams = copy.deepcopy(opt.state_dict())
    bad_lams["tract"]["lam"] = [0.1, 0.2]
    with pytest.raises(ValueError, match="λ for 2 first layers"):
        opt.load_state_dict(bad_lams)
    assert_same(opt.state_dict(), before)
    assert opt.lams == (0.3,)


def test_multi_optimizer_load_is_all_or_nothing() -> None:
    """A mismatch in the second inner optimizer leaves the first one unloaded too."""

    def make(model: TinyNet, rest: list[Tensor]) -> TrActOptimizer:
        first = SGD(model.first.parameters(), lr=0.05, momentum=0.9)
        return TrActOptimizer([first, Adam(rest, lr=1e-2)], model.first)

    source, target = _net("conv"), _net("conv")
    source_opt = make(source, list(source.head.parameters()))
    target_opt = make(target, [target.head.weight])
    for model, opt in ((source, source_opt), (target, target_opt)):
        _train(model, opt, _batches("conv", 1))
    saved = source_opt.state_dict()
    saved["param_groups"][0]["lr"] = 0.5
    before = _state_snapshot(target_opt)
    with pytest.raises(ValueError, match=r"for optimizers\[1\] has param groups of sizes \[2\]"):
        target_opt.load_state_dict(saved)
    assert_same(target_opt.state_dict(), before)


# --- accumulation and the order of calls -------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(
    kind=st.sampled_from(["conv", "linear"]),
    micro=st.integers(1, 5),
    k=st.integers(1, 4),
)
def test_accumulation_equals_big_batch(kind: str, micro: int, k: int) -> None:
    """k micro-batches with loss/k each, then one step == one step on the concatenated batch."""
    parts = _batches(kind, k, micro)
    big = (torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))
    model, opt, ref, ref_opt = _pair(kind, _adam)
    opt.zero_grad()
    for part in parts:
        (_loss(model, part) / k).backward()
    opt.step()
    _reference_train(ref, ref_opt, [big], 0.1)
    _assert_params(model, ref)


def test_zero_grad_between_forward_and_backward() -> None:
    """forward; zero_grad; backward; step equals the usual order."""
    batches = _batches("conv", 3)
    model, usual = _net("conv"), _net("conv")
    opt = TrActOptimizer(_adam(model), model.first)
    for batch in batches:
        loss = _loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _train(usual, TrActOptimizer(_adam(usual), usual.first), batches)
    _assert_params(model, usual, exact=True)


def test_unbackpropagated_passes_do_not_count() -> None:
    """Eval, no_grad and discarded train-mode passes, before and after the real forward."""
    batches, noise = _batches("conv", 3), _batches("conv", 3, seed=9)
    model, clean = _net("conv"), _net("conv")
    opt = TrActOptimizer(_adam(model), model.first)

    def distract() -> None:
        model.eval()
        model(noise[0][0])
        model.train()
        with torch.no_grad():
            model(noise[1][0])
        model(noise[2][0])

    for batch in batches:
        opt.zero_grad()
        distract()
        loss = _loss(model, batch)
        distract()
        loss.backward()
        distract()
        opt.step()
    _train(clean, TrActOptimizer(_adam(clean), clean.first), batches)
    _assert_params(model, clean, exact=True)


def test_frozen_then_unfrozen_first_layer() -> None:
    """While frozen nothing happens to the first layer; after unfreezing TrAct resumes."""
    batches = _batches("conv", 4)
    model, opt, ref, ref_opt = _pair("conv", _adam)
    for m in (model, ref):
        m.first.requires_grad_(False)
    _train(model, opt, batches[:2])
    _train(ref, ref_opt, batches[:2])
    for m in (model, ref):
        m.first.requires_grad_(True)
    _train(model, opt, batches[2:])
    _reference_train(ref, ref_opt, batches[2:], 0.1)
    _assert_params(model, ref)


# --- mixed configurations ------------------------------------------------------------------------


def test_sgd_first_layer_adam_rest() -> None:
    """[SGD(first, momentum 0.9), Adam(rest)] + StepLR equals the hand-written loop."""
    batches = _batches("conv", 4)

    def make(model: TinyNet) -> list[Optimizer]:
        return [
            SGD(model.first.parameters(), lr=0.05, momentum=0.9),
            Adam(model.head.parameters(), lr=1e-2),
        ]

    model, ref = _net("conv"), _net("conv")
    opt = TrActOptimizer(make(model), model.first)
    ref_opts = make(ref)
    inner_groups = [g for o in opt.optimizers for g in o.param_groups]
    assert all(a is b for a, b in zip(opt.param_groups, inner_groups, strict=True))
    sched = StepLR(opt, step_size=2, gamma=0.5)
    ref_scheds = [StepLR(o, step_size=2, gamma=0.5) for o in ref_opts]
    for batch in batches:
        _train(model, opt, [batch])
        for o in ref_opts:
            o.zero_grad()
        _loss(ref, batch).backward()
        _apply_reference(ref.first, batch[0], 0.1)
        for o, ref_sched in zip(ref_opts, ref_scheds, strict=True):
            o.step()
            ref_sched.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.05 / 4, 1e-2 / 4]
    _assert_params(model, ref)
    assert model.first.weight in opt.state and "momentum_buffer" in opt.state[model.first.weight]
    assert "exp_avg" in opt.state[model.head.weight]
    # Reading a parameter's state went to its own optimizer, so both still save.
    assert model.head.weight not in opt.optimizers[0].state
    saved = opt.state_dict()
    assert saved["groups_per_optimizer"] == [1, 1]
    assert sorted(saved["state"]) == [0, 1, 2, 3]  # numbered across the optimizers, in order
    assert [g["params"] for g in saved["param_groups"]] == [[0, 1], [2, 3]]


def _two_input_batches(count: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Images (5, 3, 5, 5), one token (5, 1, 6) per image, and labels."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(count):
        yield (
            torch.randn(5, 3, 5, 5, generator=gen),
            torch.randn(5, 1, 6, generator=gen),
            torch.randint(0, 3, (5,), generator=gen),
        )


def test_several_first_layers_with_own_lam_and_set_lam() -> None:
    """Two first layers, λ per layer, changed between steps by index, module and for all."""
    lam_steps = [(0.05, 0.3), (0.05, 0.7), (0.2, 0.7), (0.4, 0.4)]
    model, ref = two_stem(width=2, padding=0), two_stem(width=2, padding=0)
    opt = TrActOptimizer(_adam(model), [model.conv, model.lin], lam=[0.05, 0.3])
    ref_opt = _adam(ref)
    for i, (image, vector, y) in enumerate(_two_input_batches(len(lam_steps))):
        if i == 1:
            opt.set_lam(0.7, layer=1)
        elif i == 2:
            opt.set_lam(0.2, layer=model.conv)
        elif i == 3:
            opt.set_lam(0.4)
        assert opt.lams == lam_steps[i]
        opt.zero_grad()
        F.cross_entropy(model(image, vector), y).backward()
        opt.step()
        ref_opt.zero_grad()
        F.cross_entropy(ref(image, vector), y).backward()
        _apply_reference(ref.conv, image, lam_steps[i][0])
        _apply_reference(ref.lin, vector, lam_steps[i][1])
        ref_opt.step()
        _assert_params(model, ref)


def test_set_lam_changes_the_update_as_the_closed_form_predicts() -> None:
    """Gradient after set_lam(λ2) is the closed form at λ2, not at the λ the optimizer started."""
    (batch,) = _batches("linear", 1, 8)
    model = _net("linear")
    opt = TrActOptimizer(_sgd(model), model.first, lam=0.1)
    opt.set_lam(2.5)
    opt.zero_grad()
    _loss(model, batch).backward()
    raw = model.first.weight.grad.clone()
    opt.precondition_()
    rows = unfold_rows(model.first, batch[0])
    assert_update(model.first.weight.grad, raw, rows, 2.5)
    expected = tract_grad(rows, raw, 2.5)
    assert not torch.allclose(expected, tract_grad(rows, raw, 0.1), rtol=0.1)


def test_two_param_groups_in_one_adam() -> None:
    """Per-group lr and weight decay are honoured for the preconditioned first layer."""
    batches = _batches("conv", 4)

    def make(model: nn.Module) -> Optimizer:
        return Adam(
            [
                {"params": model.first.parameters(), "lr": 3e-2, "weight_decay": 0.1},
                {"params": model.head.parameters()},
            ],
            lr=1e-3,
        )

    model, opt, ref, ref_opt = _pair("conv", make)
    _train(model, opt, batches)
    _reference_train(ref, ref_opt, batches, 0.1)
    _assert_params(model, ref)


# --- lifetime, hooks, no-op steps ----------------------------------------------------------------


@pytest.mark.parametrize("use_with", [True, False])
def test_after_remove_trains_like_plain_inner(use_with: bool) -> None:
    """After remove() or leaving ``with``, updates equal the plain inner optimizer's exactly."""
    batches = _batches("conv", 5)
    model = _net("conv")
    inner = _adam(model)
    opt = TrActOptimizer(inner, model.first)
    if use_with:
        with opt as entered:
            assert entered is opt
            _train(model, opt, batches[:2])
    else:
        _train(model, opt, batches[:2])
        opt.remove()
    assert not model.first._forward_hooks
    assert "hooks removed" in repr(opt)
    twin = copy.deepcopy(model)
    twin_opt = _adam(twin)
    twin_opt.load_state_dict(copy.deepcopy(inner.state_dict()))
    _train(model, opt, batches[2:])
    _train(twin, twin_opt, batches[2:])
    _assert_params(model, twin, exact=True)


def test_step_and_state_dict_hooks_fire() -> None:
    """Hooks registered on the wrapper fire once per call with the wrapper as argument."""
    model = _net("conv")
    opt = TrActOptimizer(_adam(model), model.first)
    calls: list[str] = []
    raw_at_pre: list[Tensor] = []

    def pre(o: Optimizer, args: Any, kwargs: Any) -> None:
        assert o is opt
        raw_at_pre.append(model.first.weight.grad.clone())
        calls.append("pre")

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    (batch,) = _batches("conv", 1)
    opt.zero_grad()
    _loss(model, batch).backward()
    raw = model.first.weight.grad.clone()
    opt.step()
    assert torch.equal(raw_at_pre[0], raw)
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd_pre", "sd_post", "load_pre", "load_post"]


def test_repr_is_readable() -> None:
    model = _net("conv")
    text = repr(TrActOptimizer(_adam(model), model.first, 0.2))
    assert text.startswith("TrActOptimizer(layers=[Conv2d(n=27, groups=1, lam=0.2)]")
    assert "Adam (" in text and "lr: 0.01" in text


def test_step_without_gradient_or_statistics_is_a_noop() -> None:
    """A bare step (e.g. a checkpoint loader's) changes no weight and creates no state."""
    model = _net("conv")
    weights = copy.deepcopy(model.state_dict())
    opt = TrActOptimizer(_adam(model), model.first)
    opt.step()
    opt.zero_grad()
    opt.step()
    assert_same(model.state_dict(), weights)
    assert len(opt.state) == 0
