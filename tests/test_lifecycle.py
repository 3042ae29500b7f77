"""Statistics belong to the gradient they precondition: the loops people really write.

Each test trains with ``SGD(lr=1)`` (no momentum, or its known buffer subtracted), so the first
layer's weight moves by exactly minus the gradient the inner optimizer saw, and compares that move
with TrAct written out in float64 (``kit.assert_update``) over exactly the passes whose backward
produced the gradient. Raw gradients come from a twin model without TrAct, and rows from
``kit.stacked_rows`` (not the library's unfold). Where ``torch.compile`` applies, eager and
compiled runs are both checked against the same reference.
"""

from __future__ import annotations

import copy
import gc
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from tests.kit import (
    CountingBackend,
    TinyNet,
    assert_same,
    assert_update,
    conv_net,
    random_batch,
    relative_error,
    stacked_rows,
    tiny_batch,
    tiny_net,
    token_net,
    tract_grad,
    unfold_rows,
)
from tract_optim import TrActOptimizer

LAM = 0.1


def raw_grad(model: nn.Module, loss_of: Callable[[nn.Module], Tensor], layer_name: str) -> Tensor:
    """The plain gradient of the first layer's weight for ``loss_of`` on a twin of ``model``."""
    twin = copy.deepcopy(model)
    twin.zero_grad(set_to_none=True)
    loss_of(twin).backward()
    weight = twin.get_submodule(layer_name).weight
    assert weight.grad is not None
    return weight.grad.double()


def maybe_compile(model: nn.Module, compiled: bool) -> Callable[[Tensor], Tensor]:
    if not compiled:
        return model
    torch._dynamo.reset()
    return torch.compile(model, backend="aot_eager", fullgraph=True)  # type: ignore[return-value]


def token_model(n: int = 16) -> TinyNet:
    """A Linear first layer on (B, 2 tokens, n) inputs; few rows, so r < n (the Woodbury form)."""
    return token_net(n=n, tokens=2, width=5, act=nn.Tanh())


def batch(shape: tuple[int, ...], seed: int) -> Tensor:
    return random_batch(shape, seed)[0]


def loss(out: Tensor) -> Tensor:
    return (out * torch.linspace(-1, 1, out.shape[-1])).sum()


# --- 1, 2: a step GradScaler skips, whoever clears the gradients -------------------------------


@dataclass(frozen=True)
class SkipCase:
    """One way to write the loop around a step that GradScaler skips."""

    clear: str  # "opt": opt.zero_grad(); "model": model.zero_grad(set_to_none=...)
    set_to_none: bool  # for "model"
    clear_first: bool  # clear at the start of every iteration (else at its end)
    overflow: str  # what is not finite: the scaled "loss", a "head" or a "first" gradient entry
    recipe: bool  # scaler.unscale_(opt) and opt.precondition_() before scaler.step(opt)
    compiled: bool = False
    autocast: torch.dtype | None = None


SKIP_CASES = {
    "opt.zero_grad first": SkipCase("opt", True, True, "head", False),
    "opt.zero_grad last": SkipCase("opt", True, False, "head", False),
    "model.zero_grad first": SkipCase("model", True, True, "head", False),
    "recipe, model.zero_grad last": SkipCase("model", True, False, "loss", True),
    "recipe, model.zero_grad(set_to_none=False) last": SkipCase(
        "model", False, False, "loss", True
    ),
    "recipe, model.zero_grad last, compiled": SkipCase("model", True, False, "loss", True, True),
    "recipe, model.zero_grad(set_to_none=False) last, compiled": SkipCase(
        "model", False, False, "loss", True, True
    ),
    "fp16 autocast, opt.zero_grad first": SkipCase(
        "opt", True, True, "first", False, autocast=torch.float16
    ),
}


@pytest.mark.parametrize("case", SKIP_CASES.values(), ids=SKIP_CASES.keys())
def test_step_skipped_by_grad_scaler_changes_nothing_and_leaves_no_statistics(
    case: SkipCase,
) -> None:
    """A good step, a step the scaler skips (weights and optimizer state stay exactly as they
    were), then a step whose update is the TrAct update of its own batch alone, in float64 (SGD,
    lr 1, momentum 0.9: the move minus 0.9 × the old momentum buffer). The skipped batch is 5×
    larger, so its rows leaking into that update would show."""
    model = tiny_net()
    run = maybe_compile(model, case.compiled)
    sgd = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    opt = TrActOptimizer(sgd, model.first, LAM)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def clear() -> None:
        if case.clear == "opt":
            opt.zero_grad()
        else:
            model.zero_grad(set_to_none=case.set_to_none)

    def scaled_loss(m: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, overflow: bool) -> Tensor:
        dtype, enabled = case.autocast or torch.bfloat16, case.autocast is not None
        with torch.autocast("cpu", dtype=dtype, enabled=enabled):
            loss = F.cross_entropy(m(x), y)
        return scaler.scale(loss * (1e38 if overflow and case.overflow == "loss" else 1.0))

    def iteration(x: Tensor, y: Tensor, overflow: bool = False) -> None:
        if case.clear_first:
            clear()
        scaled_loss(run, x, y, overflow).backward()
        if overflow and case.overflow == "head":
            model.head.weight.grad[0, 0] = float("inf")  # type: ignore[index]
        elif overflow and case.overflow == "first":
            model.first.weight.grad[0].fill_(float("inf"))  # type: ignore[index]
        if case.recipe:
            scaler.unscale_(opt)
            opt.precondition_()
        scaler.step(opt)
        scaler.update()
        if not case.clear_first:
            clear()

    iteration(*tiny_batch(0))
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    skipped = tiny_batch(1, scale=5.0)
    iteration(*skipped, overflow=True)
    assert scaler.get_scale() == 2.0**9, "the step was not skipped"
    assert_same(model.state_dict(), weights)
    assert_same(opt.state_dict(), state)

    x, y = tiny_batch(2)
    scale = scaler.get_scale()
    raw = raw_grad(model, lambda m: scaled_loss(m, x, y, False), "first") / scale
    before = model.first.weight.detach().double()
    momentum = opt.state[model.first.weight]["momentum_buffer"].double()
    iteration(x, y)
    moved = before - model.first.weight.detach().double() - 0.9 * momentum
    rows = unfold_rows(model.first, x)
    assert_update(moved, raw, rows, LAM)
    leaked = torch.cat([unfold_rows(model.first, skipped[0]), rows], dim=1)
    assert relative_error(tract_grad(leaked, raw, LAM), tract_grad(rows, raw, LAM)) > 1e-2


# --- 3: precondition_(), another backward, step() ---------------------------------------------


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_backward_after_precondition_raises_before_any_change(compiled: bool) -> None:
    model = conv_net(size=4)
    run = maybe_compile(model, compiled)
    opt = TrActOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model.first, LAM)
    loss(run(batch((2, 3, 4, 4), 1))).backward()
    opt.precondition_()
    loss(run(batch((2, 3, 4, 4), 2))).backward()
    weights = [p.detach().clone() for p in model.parameters()]
    grad = model.first.weight.grad.clone()  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match=r"first_layer\[0\].*backward pass added to the grad"):
        opt.step()
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p, w)
    assert torch.equal(model.first.weight.grad, grad)  # type: ignore[arg-type]


# --- 4: reused input buffers --------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_reused_input_buffer_is_never_aliased(compiled: bool) -> None:
    """Micro-batches staged through one buffer (r < n): each pass keeps its own rows."""
    model = token_model()
    run = maybe_compile(model, compiled)
    opt = TrActOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model.first, LAM)
    xs = [batch((1, 2, 16), seed) for seed in (1, 2, 3)]
    buffer = torch.empty(1, 2, 16)
    before = model.first.weight.detach().clone()
    expected_raw = raw_grad(model, lambda m: sum(loss(m(x)) for x in xs), "first")  # type: ignore[arg-type, return-value]
    for x in xs:
        buffer.copy_(x)
        loss(run(buffer)).backward()
    opt.step()
    rows = stacked_rows(model.first, xs)
    assert_update(before - model.first.weight.detach(), expected_raw, rows, LAM)


# --- 5: threads ---------------------------------------------------------------------------------


def test_passes_from_several_threads_all_count() -> None:
    model = token_model(n=6)
    opt = TrActOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model.first, LAM)
    xs = [batch((2, 2, 6), seed) for seed in range(24)]
    before = model.first.weight.detach().clone()
    expected_raw = raw_grad(model, lambda m: sum(loss(m(x)) for x in xs), "first")  # type: ignore[arg-type, return-value]
    barrier = threading.Barrier(4)

    def work(part: list[Tensor]) -> None:
        barrier.wait()
        for x in part:
            loss(model(x)).backward()

    threads = [threading.Thread(target=work, args=(xs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    opt.step()
    rows = stacked_rows(model.first, xs)
    assert_update(before - model.first.weight.detach(), expected_raw, rows, LAM)


# --- 6: autograd.grad accumulation, .grad set by hand --------------------------------------------


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_autograd_grad_accumulation_then_grad_by_hand(compiled: bool) -> None:
    model = conv_net(size=4)
    run = maybe_compile(model, compiled)
    opt = TrActOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model.first, LAM)
    xs = [batch((2, 3, 4, 4), seed) for seed in (1, 2, 3)]
    params = list(model.parameters())
    before = model.first.weight.detach().clone()
    expected_raw = raw_grad(model, lambda m: sum(loss(m(x)) for x in xs), "first")  # type: ignore[arg-type, return-value]
    total = [torch.zeros_like(p) for p in params]
    for x in xs:
        for t, g in zip(total, torch.autograd.grad(loss(run(x)), params), strict=True):
            t.add_(g)
    for p, t in zip(params, total, strict=True):
        p.grad = t
    opt.step()
    rows = stacked_rows(model.first, xs)
    assert_update(before - model.first.weight.detach(), expected_raw, rows, LAM)


# --- 8: no O(n²) memory up front or when r < n ----------------------------------------------------


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_n_squared_memory_at_construction_or_when_rows_are_few() -> None:
    n = 4096
    layer = nn.Linear(n, 10)
    with _LargestAllocation() as mode:
        opt = TrActOptimizer(torch.optim.SGD(layer.parameters(), lr=1.0), layer, LAM)
    assert mode.largest < n  # nothing proportional to n, let alone n²
    x = batch((8, n), 1)
    before = layer.weight.detach().clone()
    expected_raw = raw_grad(layer, lambda m: loss(m(x)), "")
    with _LargestAllocation() as mode:
        loss(layer(x)).backward()
        opt.step()
    assert mode.largest <= 10 * n  # rows (8 × n) and the gradient (10 × n); no n × n
    rows = stacked_rows(layer, [x])
    # cond(M) ≈ 5600 counts the n − r eigenvalues λ of this r = 8 problem, so assert_update's
    # bound is 1e-2 here: the fixed 1e-4 it replaced is stricter and stays.
    assert assert_update(before - layer.weight.detach(), expected_raw, rows, LAM) < 1e-4


# --- 9: forward passes without backward hold nothing ---------------------------------------------


def _gram_sized_tensors(n: int) -> int:
    gc.collect()
    return sum(
        1
        for obj in gc.get_objects()
        if type(obj) is Tensor and obj.numel() == n * n and obj.dim() == 3
    )


def test_passes_without_backward_hold_no_statistics_once_outputs_are_freed() -> None:
    model = conv_net(size=4)
    opt = TrActOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model.first, LAM)
    n = 27
    baseline = _gram_sized_tensors(n)
    x = batch((4, 3, 4, 4), 1)  # 64 rows ≥ 27: a Gram per pass
    for _ in range(1000):
        out = model(x)
    assert _gram_sized_tensors(n) - baseline <= 1  # the last pass's, still alive with ``out``
    del out
    assert _gram_sized_tensors(n) == baseline
    # ... and the next step uses only the passes that were backpropagated.
    before = model.first.weight.detach().clone()
    x2 = batch((2, 3, 4, 4), 2)
    expected_raw = raw_grad(model, lambda m: loss(m(x2)), "first")
    loss(model(x2)).backward()
    opt.step()
    rows = stacked_rows(model.first, [x2])
    assert_update(before - model.first.weight.detach(), expected_raw, rows, LAM)


# --- 10: keyword call ---------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_keyword_input_call(compiled: bool) -> None:
    layer = nn.Linear(6, 4)

    def forward(x: Tensor) -> Tensor:
        return layer(input=x)

    run = torch.compile(forward, backend="aot_eager", fullgraph=True) if compiled else forward
    torch._dynamo.reset()
    opt = TrActOptimizer(torch.optim.SGD(layer.parameters(), lr=1.0), layer, LAM)
    x = batch((12, 6), 1)
    before = layer.weight.detach().clone()
    expected_raw = raw_grad(layer, lambda m: loss(m(x)), "")
    loss(run(x)).backward()
    opt.step()
    assert_update(before - layer.weight.detach(), expected_raw, stacked_rows(layer, [x]), LAM)


# --- 11: two optimizers on one layer ------------------------------------------------------------


def test_second_optimizer_takes_over_and_the_first_refuses_to_step() -> None:
    model = conv_net(size=4)
    old = TrActOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model.first, LAM)
    with pytest.warns(UserWarning, match="already preconditioned by another TrActOptimizer"):
        new = TrActOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model.first, LAM)
    x = batch((2, 3, 4, 4), 1)
    before = model.first.weight.detach().clone()
    expected_raw = raw_grad(model, lambda m: loss(m(x)), "first")
    loss(model(x)).backward()
    with pytest.raises(RuntimeError, match=r"first_layer\[0\].*newer TrActOptimizer took over"):
        old.step()
    assert torch.equal(model.first.weight, before)
    new.step()
    rows = stacked_rows(model.first, [x])
    assert_update(before - model.first.weight.detach(), expected_raw, rows, LAM)  # G·M⁻¹, not G·M⁻²


# --- 12: varying input sizes under compile ---------------------------------------------------


@pytest.mark.parametrize("kind", ["conv", "tokens"])
def test_varying_batch_sizes_cost_at_most_one_more_graph(kind: str) -> None:
    graphs = []
    for with_tract in (False, True):
        torch._dynamo.reset()
        model = conv_net(size=4) if kind == "conv" else token_model(n=24)
        backend = CountingBackend()
        run = torch.compile(model, backend=backend)
        opt = (
            TrActOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model.first)
            if with_tract
            else None
        )
        for size in range(1, 11):
            shape = (size, 3, 4, 4) if kind == "conv" else (size, 2, 24)
            loss(run(batch(shape, size))).backward()
            if opt is not None:
                opt.step()
            model.zero_grad()
        graphs.append(backend.compilations)
    plain, tract = graphs
    assert tract <= plain + 1, graphs


# --- 13: in-place ops on the layer's output -------------------------------------------------------


class PosEmbed(nn.Module):
    """naflexvit-style: a Linear patch embedding, then ``x.add_(pos)`` on its 3-D output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(12, 6)
        self.pos = nn.Parameter(torch.randn(4, 6))
        self.head = nn.Linear(24, 3)

    def forward(self, x: Tensor) -> Tensor:
        z = self.proj(x)
        z.add_(self.pos)
        return self.head(z.flatten(1))  # type: ignore[no-any-return]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("kind", ["pos_add_", "relu_inplace"])
def test_inplace_op_on_output(kind: str, compiled: bool) -> None:
    model: nn.Module = (
        PosEmbed() if kind == "pos_add_" else conv_net(size=4, act=nn.ReLU(inplace=True))
    )
    first = "proj" if kind == "pos_add_" else "first"
    layer = model.get_submodule(first)
    run = maybe_compile(model, compiled)
    opt = TrActOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), layer, LAM)
    x = batch((2, 4, 12), 1) if kind == "pos_add_" else batch((2, 3, 4, 4), 1)
    before = layer.weight.detach().clone()
    expected_raw = raw_grad(model, lambda m: loss(m(x)), first)
    loss(run(x)).backward()
    opt.step()
    rows = stacked_rows(layer, [x])
    assert_update(before - layer.weight.detach(), expected_raw, rows, LAM)
