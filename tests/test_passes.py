"""Exactly the passes that went into the gradient: adversarial training, ``retain_graph``,
``inputs=``, failed backwards, weight tying, replaced weights, ``torch.func``, leaks.

Every update check trains with ``SGD(lr=1)`` (no momentum), so the first layer's weight moves by
exactly minus the gradient the inner optimizer saw, and compares that move with TrAct written out
in float64 (``tests.kit.tract_grad``) over the rows of exactly the passes whose gradient was
accumulated into the weight. Raw gradients come from a twin model without TrAct that repeats the
same gradient computations; rows come from the kit's independent unfold. Where ``torch.compile``
applies, eager and compiled runs are both checked against the same reference.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tests.kit import conv_net, random_batch, relative_error, stacked_rows, token_net, tract_grad
from tract_optim import TrActOptimizer

LAM = 0.1
RTOL = 1e-4  # fp32 library vs float64 reference, relative to the update's largest entry
Run = Callable[[Tensor], Tensor]

COMPILED = pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])


def maybe_compile(model: nn.Module, compiled: bool) -> Run:
    torch._dynamo.reset()
    if not compiled:
        return model
    return torch.compile(model, backend="aot_eager", fullgraph=True)  # type: ignore[return-value]


def images(seed: int, size: int = 2) -> Tensor:
    return random_batch((size, 3, 6, 6), seed)[0]


def loss(out: Tensor) -> Tensor:
    return (out * torch.linspace(-1, 1, out.shape[-1])).sum()


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=1.0)


def assert_moved_by(before: Tensor, weight: Tensor, expected: Tensor) -> None:
    """``weight`` = ``before`` − ``expected`` (SGD, lr 1), relative to the update's size."""
    move = before.double() - weight.detach().double()
    assert float(expected.abs().max()) > 0, "a zero update would make this check vacuous"
    error = relative_error(move, expected)
    assert error < RTOL, f"relative error {error:.2e}"


def twin_grad(model: nn.Module, work: Callable[[nn.Module], None], first: str) -> Tensor:
    """The raw gradient of the first layer's weight that ``work`` leaves on a twin of ``model``
    trained without TrAct."""
    twin = copy.deepcopy(model)
    twin.zero_grad(set_to_none=True)
    work(twin)
    weight = twin.get_submodule(first).weight
    assert weight.grad is not None
    return weight.grad.double()


def assert_step_is_tract_of(
    model: nn.Module,
    opt: TrActOptimizer,
    x: Tensor,
    *,
    run: Run | None = None,
    first: str = "first",
) -> None:
    """One step on ``x`` through ``run`` (the model itself by default): the first layer's weight
    moves by float64 TrAct of that pass alone."""
    layer = model.get_submodule(first)
    before = layer.weight.detach().clone()
    raw = twin_grad(model, lambda m: loss(m(x)).backward(), first)
    loss((model if run is None else run)(x)).backward()
    opt.step()
    assert_moved_by(before, layer.weight, tract_grad(stacked_rows(layer, [x]), raw, LAM))


# --- 1. passes that never fed the weight gradient -------------------------------------------------


def fgsm(run: Run, x: Tensor, eps: float = 0.1) -> Tensor:
    """One FGSM step: the attack's pass (train mode) takes the gradient of the input only."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(run(x)), x)
    return (x + eps * g.sign()).detach()


@COMPILED
def test_adversarial_training_counts_only_the_training_pass(compiled: bool) -> None:
    model = conv_net()
    run = maybe_compile(model, compiled)
    opt = TrActOptimizer(sgd(model), model.first, LAM)
    for step in range(2):
        x = images(step)
        opt.zero_grad()  # at the top of the loop, as usual
        x_adv = fgsm(run, x)
        before = model.first.weight.detach().clone()
        raw = twin_grad(model, lambda m, x_adv=x_adv: loss(m(x_adv)).backward(), "first")
        loss(run(x_adv)).backward()
        opt.step()
        expected = tract_grad(stacked_rows(model.first, [x_adv]), raw, LAM)
        assert_moved_by(before, model.first.weight, expected)


@COMPILED
def test_backward_with_inputs_excluding_the_weight_counts_nothing(compiled: bool) -> None:
    model = conv_net()
    run = maybe_compile(model, compiled)
    opt = TrActOptimizer(sgd(model), model.first, LAM)
    x1, x2 = images(1).requires_grad_(True), images(2)
    loss(run(x1)).backward(inputs=[x1])
    assert model.first.weight.grad is None
    assert_step_is_tract_of(model, opt, x2, run=run)


class _FailsInBackward(torch.autograd.Function):
    """Identity whose backward raises (put on the input, it fails after the first layer)."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, g: Tensor) -> Tensor:
        raise ValueError("backward failed")


def _raise_once(done: list[bool]) -> Callable[[Tensor], None]:
    """A tensor hook that raises the first time: backward fails after computing the weight's
    gradient, before accumulating it."""

    def hook(grad: Tensor) -> None:
        if not done:
            done.append(True)
            raise ValueError("backward failed")

    return hook


@COMPILED
def test_failed_backward_then_model_zero_grad_counts_only_the_next_batch(compiled: bool) -> None:
    model = conv_net()
    run = maybe_compile(model, compiled)
    opt = TrActOptimizer(sgd(model), model.first, LAM)
    handle = model.first.weight.register_hook(_raise_once([]))
    with pytest.raises(ValueError, match="backward failed"):
        loss(run(images(1))).backward()
    handle.remove()
    assert model.first.weight.grad is None  # nothing was accumulated
    model.zero_grad()
    x2 = images(2)
    assert_step_is_tract_of(model, opt, x2, run=run)


def test_failed_backward_that_reached_the_weight_counts_with_its_gradient() -> None:
    """A backward that accumulated into the weight before failing changed the gradient: its
    pass belongs to the update, with the next batch's (no zero_grad in between)."""
    model = conv_net()
    opt = TrActOptimizer(sgd(model), model.first, LAM)
    x1 = images(1).requires_grad_(True)
    with pytest.raises(ValueError, match="backward failed"):
        loss(model(_FailsInBackward.apply(x1))).backward()
    assert model.first.weight.grad is not None  # it was accumulated before the failure
    partial = model.first.weight.grad.double().clone()
    x2 = images(2)
    before = model.first.weight.detach().clone()
    raw = partial + twin_grad(model, lambda m: loss(m(x2)).backward(), "first")
    loss(model(x2)).backward()
    opt.step()
    expected = tract_grad(stacked_rows(model.first, [x1.detach(), x2]), raw, LAM)
    assert_moved_by(before, model.first.weight, expected)


# --- 2. passes reached by several backward calls --------------------------------------------------


@COMPILED
def test_retain_graph_counts_a_pass_once(compiled: bool) -> None:
    """loss1.backward(retain_graph=True); loss2.backward() through one forward, plus a second
    micro-batch of another scale: the first pass's rows are in x once."""
    model = conv_net()
    run = maybe_compile(model, compiled)
    opt = TrActOptimizer(sgd(model), model.first, LAM)
    x1, x2 = images(1), images(2) * 3

    def work(m: Run) -> None:
        out = m(x1)
        loss(out).backward(retain_graph=True)
        (out.square().mean()).backward()
        loss(m(x2)).backward()

    before = model.first.weight.detach().clone()
    raw = twin_grad(model, work, "first")  # type: ignore[arg-type]
    work(run)
    opt.step()
    expected = tract_grad(stacked_rows(model.first, [x1, x2]), raw, LAM)
    assert_moved_by(before, model.first.weight, expected)


def test_gradient_penalty_counts_the_pass_once() -> None:
    """WGAN-GP style double backward: the pass is in x once (``torch.compile`` does not support
    double backward, so eager only)."""
    model = conv_net()
    opt = TrActOptimizer(sgd(model), model.first, LAM)
    x1, x2 = images(1), images(2) * 2

    def work(m: nn.Module) -> None:
        x = x1.clone().requires_grad_(True)
        out = m(x)
        (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        (loss(out) + g.square().sum()).backward()
        loss(m(x2)).backward()

    before = model.first.weight.detach().clone()
    raw = twin_grad(model, work, "first")
    work(model)
    opt.step()
    expected = tract_grad(stacked_rows(model.first, [x1, x2]), raw, LAM)
    assert_moved_by(before, model.first.weight, expected)


def test_retained_graph_backpropagated_again_after_a_step_raises() -> None:
    """Its statistics were released when the first step used them: the error says so. (A lone
    Linear on inputs that need no gradient saves no weight, so torch allows the second
    backward after the step changed the weight.)"""
    layer = nn.Linear(6, 4)
    opt = TrActOptimizer(sgd(layer), layer, LAM)
    out = layer(random_batch((8, 6), 1)[0])
    loss(out).backward(retain_graph=True)
    opt.step()
    opt.zero_grad()
    loss(out).backward()
    before = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"first_layer\[0\].*retain_graph=True across steps"):
        opt.step()
    assert torch.equal(layer.weight, before)


# --- 3. "already preconditioned" belongs to the step ----------------------------------------------


@COMPILED
def test_gradient_replaced_out_of_place_after_precondition_is_not_redone(compiled: bool) -> None:
    model = conv_net()
    run = maybe_compile(model, compiled)
    opt = TrActOptimizer(sgd(model), model.first, LAM)
    x = images(1)
    before = model.first.weight.detach().clone()
    raw = twin_grad(model, lambda m: loss(m(x)).backward(), "first")
    loss(run(x)).backward()
    opt.precondition_()
    weight = model.first.weight
    assert weight.grad is not None
    weight.grad = weight.grad / 2  # a new tensor
    opt.step()
    expected = tract_grad(stacked_rows(model.first, [x]), raw, LAM) / 2
    assert_moved_by(before, model.first.weight, expected)


# --- 4. layers that share one weight --------------------------------------------------------------


class Tied(nn.Module):
    """Two Linear layers sharing one weight, applied to two inputs (r < n and r ≥ n)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(6, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.head(torch.cat([torch.tanh(self.a(x)), torch.tanh(self.b(y)).mean(1)], 1))


@COMPILED
@pytest.mark.parametrize("tokens", [1, 5], ids=["r<n", "r>=n"])
def test_layers_sharing_a_weight_pool_their_passes(compiled: bool, tokens: int) -> None:
    model = Tied()
    opt = TrActOptimizer(sgd(model), [model.a, model.b], LAM)
    torch._dynamo.reset()
    run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    x = random_batch((2, 6), 1)[0]
    y = random_batch((2, tokens, 6), 2)[0] * 2
    before = model.a.weight.detach().clone()
    raw = twin_grad(model, lambda m: loss(m(x, y)).backward(), "a")
    loss(run(x, y)).backward()  # type: ignore[operator]
    opt.step()
    rows = torch.cat([stacked_rows(model.a, [x]), stacked_rows(model.b, [y])], dim=1)
    assert_moved_by(before, model.a.weight, tract_grad(rows, raw, LAM))
    assert model.b.weight is model.a.weight


def test_layers_sharing_a_weight_need_equal_lam_and_rows() -> None:
    model = Tied()
    inner = sgd(model)
    with pytest.raises(ValueError, match=r"first_layer\[0\] and first_layer\[1\] share one weight"):
        TrActOptimizer(inner, [model.a, model.b], [0.1, 0.2])
    conv = nn.Conv2d(4, 4, 3)
    grouped = nn.Conv2d(8, 4, 3, groups=2)
    grouped.weight = conv.weight
    with pytest.raises(ValueError, match="rows of different layouts"):
        TrActOptimizer(torch.optim.SGD(conv.parameters(), lr=1.0), [conv, grouped])
    assert not model.a._forward_hooks and not conv._forward_hooks  # nothing installed


# --- 5. a weight replaced after construction ---------------------------------------------------


def test_replaced_weight_is_followed_when_the_optimizer_holds_it() -> None:
    """What ``fully_shard`` or ``accelerate.prepare`` do after TrAct was created: a new weight
    Parameter on the layer, and the inner optimizer re-pointed at it."""
    model = conv_net()
    opt = TrActOptimizer(sgd(model), model.first, LAM)
    model.first.weight = nn.Parameter(model.first.weight.detach().clone() * 1.5)
    opt.param_groups[0]["params"] = list(model.parameters())
    x = images(1)
    assert_step_is_tract_of(model, opt, x)


def test_replaced_weight_the_optimizer_does_not_hold_raises_at_step() -> None:
    model = conv_net()
    opt = TrActOptimizer(sgd(model), model.first, LAM)
    model.first.weight = nn.Parameter(model.first.weight.detach().clone())
    loss(model(images(1))).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"first_layer\[0\].*weight was replaced.*Create the"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


# --- 6. steps where plain torch steps ------------------------------------------------------------


def test_zero_size_batch_alone_steps_like_plain_torch() -> None:
    model = conv_net()
    opt = TrActOptimizer(sgd(model), model.first, LAM)
    loss(model(torch.zeros(0, 3, 6, 6))).backward()
    before = copy.deepcopy(model.state_dict())
    opt.step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unused_first_layer_with_zeroed_gradient_steps_like_plain_torch() -> None:
    model = conv_net()
    opt = TrActOptimizer(sgd(model), model.first, LAM)
    loss(model(images(1))).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    z = torch.randn(2, 4, 6, 6)
    loss(model.after_first(z)).backward()  # the first layer is not used in this step
    head = model.head.weight.detach().clone()
    first = model.first.weight.detach().clone()
    opt.step()
    assert torch.equal(model.first.weight, first)
    assert not torch.equal(model.head.weight, head)


@pytest.mark.parametrize("kind", ["conv", "linear_r<n"])
def test_torch_func_per_sample_gradients_are_not_recorded(kind: str) -> None:
    model: nn.Module = conv_net() if kind == "conv" else token_net(n=16)
    first = model.first
    opt = TrActOptimizer(sgd(model), first, LAM)
    x = images(1, size=3) if kind == "conv" else random_batch((3, 16), 1)[0]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return loss(functional_call(model, p, (xi[None],)))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0))(params, x)
    assert per_sample["first.weight"].shape[0] == 3
    # Nothing was recorded: the next step is TrAct of its own pass alone.
    assert_step_is_tract_of(model, opt, x)


# --- 7. construction: all or nothing, clear refusals ----------------------------------------------


def test_construction_changes_nothing_until_it_succeeds() -> None:
    """A refused construction leaves the optimizer already on the layer working; a frozen layer
    is not refused (the new optimizer takes over, saying so, and trains it once unfrozen)."""
    model = conv_net()
    opt = TrActOptimizer(sgd(model), model.first, LAM)
    with pytest.raises(ValueError, match=r"lam\[0\]"):
        TrActOptimizer(sgd(model), model.first, -1.0)
    x = images(1)
    assert_step_is_tract_of(model, opt, x)  # still preconditions: it was not superseded
    model.first.requires_grad_(False)
    with pytest.warns(UserWarning, match="takes over its hooks"):
        new = TrActOptimizer(sgd(model), model.first, LAM)
    model.first.requires_grad_(True)
    opt.zero_grad()
    x = images(2)
    assert_step_is_tract_of(model, new, x)


def test_frozen_first_layer_is_accepted_and_trained_once_unfrozen() -> None:
    model = conv_net()
    model.first.requires_grad_(False)
    opt = TrActOptimizer(sgd(model), model.first, LAM)
    frozen = model.first.weight.detach().clone()
    loss(model(images(1))).backward()
    opt.step()
    assert torch.equal(model.first.weight, frozen)
    opt.zero_grad()
    model.first.requires_grad_(True)
    x = images(2)
    raw = twin_grad(model, lambda m: loss(m(x)).backward(), "first")
    loss(model(x)).backward()
    opt.step()
    assert_moved_by(
        frozen, model.first.weight, tract_grad(stacked_rows(model.first, [x]), raw, LAM)
    )


@pytest.mark.parametrize("bad", [None, 3, "conv1"])
def test_first_layer_of_the_wrong_kind_is_refused_by_name(bad: object) -> None:
    model = conv_net()
    with pytest.raises(TypeError, match=r"first_layer must be an nn\.Linear .* got"):
        TrActOptimizer(sgd(model), bad)  # type: ignore[arg-type]


def test_user_hook_that_reshapes_the_output_still_trains_exactly() -> None:
    """A forward hook turning the conv's output into tokens (ViT style) does not change x."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 2, stride=2)
    head = nn.Linear(4, 3)
    conv.register_forward_hook(lambda m, args, out: out.flatten(2).transpose(1, 2))
    model = nn.Sequential(conv, head)
    opt = TrActOptimizer(sgd(model), conv, LAM)
    x = images(1)
    assert_step_is_tract_of(model, opt, x, first="0")


# --- 8. leaks ------------------------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * 4096 / 2**20


def _kept_losses_growth(with_tract: bool, steps: int = 1000) -> float:
    """RSS growth (MB) over ``steps`` steps that keep every loss (and so its graph)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 64), nn.Tanh(), nn.Linear(64, 3))
    inner = sgd(model)
    opt = TrActOptimizer(inner, model[0], LAM) if with_tract else inner
    x = torch.randn(1024, 512)
    losses = []
    for step in range(steps + 20):
        if step == 20:  # after warm-up
            gc.collect()
            start = _rss_mb()
        opt.zero_grad()
        out = loss(model(x)) * 1e-3
        out.backward()
        opt.step()
        losses.append(out)
    gc.collect()
    return _rss_mb() - start


@pytest.mark.slow
def test_kept_losses_do_not_pin_statistics() -> None:
    plain = _kept_losses_growth(False)
    tract = _kept_losses_growth(True)
    assert tract <= 2 * max(plain, 0.0) + 20, (plain, tract)


def test_deleted_optimizers_take_their_hooks_with_them() -> None:
    model = conv_net()
    for _ in range(300):
        TrActOptimizer(sgd(model), model.first, LAM)
    gc.collect()
    assert len(model.first._forward_hooks) <= 1
    assert len(model.first.weight._backward_hooks or {}) <= 1
    opt = TrActOptimizer(sgd(model), model.first, LAM)
    x = images(1)
    assert_step_is_tract_of(model, opt, x)


# --- 9. torch conventions ------------------------------------------------------------------------


@pytest.mark.parametrize("several", [False, True], ids=["one", "two"])
def test_global_step_hooks_fire_once_per_inner_step(several: bool) -> None:
    model = conv_net()
    inner: list[torch.optim.Optimizer] = (
        [
            torch.optim.SGD(model.first.parameters(), lr=0.1),
            torch.optim.Adam(model.head.parameters()),
        ]
        if several
        else [sgd(model)]
    )
    opt = TrActOptimizer(inner, model.first, LAM)
    seen: list[torch.optim.Optimizer] = []
    handle = register_optimizer_step_pre_hook(lambda o, args, kwargs: seen.append(o))
    try:
        loss(model(images(1))).backward()
        opt.step()
    finally:
        handle.remove()
    assert [id(o) for o in seen] == [id(o) for o in inner]


def test_several_optimizers_give_a_torch_shaped_state_dict_and_a_live_group_view() -> None:
    model = conv_net()
    sgd_first = torch.optim.SGD(model.first.parameters(), lr=0.1, momentum=0.9)
    adam_rest = torch.optim.Adam(model.head.parameters())
    opt = TrActOptimizer([sgd_first, adam_rest], model.first, LAM)
    loss(model(images(1))).backward()
    opt.step()
    saved = opt.state_dict()
    assert {"state", "param_groups", "tract"} <= saved.keys()
    assert len(saved["state"]) == 4
    with pytest.raises(TypeError, match=r"add_param_group\(group, index=i\)"):
        opt.param_groups.append({"params": []})
    extra = nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra]}, index=1)
    assert opt.param_groups[-1]["params"] == [extra]
    assert len(opt.param_groups) == 3
