"""TrAct with ``torch.compile``: one graph, the same training as eager, never silently off.

Inside a compiled region the capture hook is traced into the model's graph, without a graph
break, and the backward hook that folds the statistics calls the same Python code through a
custom op, so the whole model compiles, ``fullgraph=True`` included. (With a hook that broke
the graph, everything after the first layer of an ``nn.Sequential``, e.g. torchvision
ConvNeXt's ``features``, would run uncompiled: Dynamo does not resume torch.nn frames.)

The tests use a backend that counts how often Dynamo hands it a graph (each hand-over is one
compilation) and delegates to ``aot_eager``, so AOTAutograd's compiled forward and backward run
without the cost of Inductor's C++ compilation (~30 s on 2 CPU cores). Measured over 10 steps:
one compilation, none after; parameters equal to eager up to float rounding (both modes record
the same statistics: rows for the Linear, a Gram for the convolutions).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.kit import CountingBackend, conv_net, max_abs_diff, random_batch, token_net
from tract_optim import TrActOptimizer

STEPS = 10
TOL = 1e-5  # compiled vs eager, float rounding only
Forward = Callable[[Tensor], Tensor]


def make(kind: str) -> nn.Module:
    """The conv net, or a ViT-style Linear on 4 tokens of 12 (2 images × 4 tokens = 8 rows < 12:
    the Woodbury form of the solve); for "sequential" the conv net's layers in an
    ``nn.Sequential``."""
    if kind == "linear":
        return token_net(n=12, tokens=4, width=5)
    net = conv_net()
    if kind == "conv":
        return net
    layers = OrderedDict(first=net.first, relu=nn.ReLU(), flat=nn.Flatten(), head=net.head)
    return nn.Sequential(layers)


def batches(kind: str) -> list[tuple[Tensor, Tensor]]:
    shape = (2, 4, 12) if kind == "linear" else (6, 3, 6, 6)
    return [random_batch(shape, seed) for seed in range(1, STEPS + 1)]


def train(opt: TrActOptimizer, forward: Forward, kind: str) -> None:
    """``STEPS`` steps of cross-entropy training through ``forward``."""
    for x, y in batches(kind):
        opt.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        opt.step()


def optimizer(model: nn.Module) -> TrActOptimizer:
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = model.first
    assert isinstance(first, nn.Module)
    return TrActOptimizer(sgd, first, lam=0.1)


def eager_params(kind: str) -> dict[str, Tensor]:
    model = make(kind)
    train(optimizer(model), model, kind)
    return model.state_dict()


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["conv", "linear", "sequential"])
def test_compiled_model_is_one_graph_and_trains_as_eager(kind: str) -> None:
    model = make(kind)
    opt = optimizer(model)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    counts = []
    for x, y in batches(kind):
        opt.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        opt.step()
        counts.append(backend.compilations)
    assert counts == [1] * STEPS, f"compilations after each step: {counts}"
    assert max_abs_diff(model.state_dict(), eager_params(kind)) < TOL


def accumulate(model: nn.Module, forwards: tuple[Forward, Forward]) -> dict[str, Tensor]:
    """Steps that each run a forward pass never backpropagated, then accumulate two
    micro-batches of different scale, one through each of ``forwards``."""
    opt = optimizer(model)
    data = batches("conv")
    for step in range(3):
        opt.zero_grad()
        forwards[0](data[3 * step][0] * 5.0)  # no backward: must not count
        for i, forward in enumerate(forwards):
            x, y = data[3 * step + 1 + i]
            F.cross_entropy(forward(x * (1 + 2 * i)), y).backward()
        opt.step()
    return model.state_dict()


def test_compiled_passes_count_once_backpropagated_and_mix_with_eager_ones() -> None:
    reference = make("conv")
    expected = accumulate(reference, (reference, reference))
    model = make("conv")
    compiled = torch.compile(model, backend=CountingBackend())
    assert max_abs_diff(accumulate(model, (compiled, compiled)), expected) < TOL
    model = make("conv")
    compiled = torch.compile(model, backend=CountingBackend())
    assert max_abs_diff(accumulate(model, (compiled, model)), expected) < TOL


def test_compile_wrapper_created_before_optimizer_works() -> None:
    # torch.compile compiles lazily, at the first call: hooks added before it are traced.
    model = make("conv")
    compiled = torch.compile(model, backend=CountingBackend())
    train(optimizer(model), compiled, "conv")
    assert max_abs_diff(model.state_dict(), eager_params("conv")) < TOL


def test_optimizer_created_after_compiled_calls_is_never_silent() -> None:
    """Dynamo does not guard on module hooks (``skip_nnmodule_hook_guards``): a graph compiled
    before the optimizer existed never runs its hooks, and ``step()`` says so."""
    model = make("conv")
    compiled = torch.compile(model, backend=CountingBackend())
    x, y = batches("conv")[0]
    F.cross_entropy(compiled(x), y).backward()  # compiles without the hook
    model.zero_grad()
    opt = optimizer(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"torch\.compile'd before TrActOptimizer was created"):
        train(opt, compiled, "conv")
    assert max_abs_diff(model.state_dict(), before) == 0


def test_hook_guards_let_an_optimizer_created_after_compiled_calls_work() -> None:
    """The remedy the error names: with ``skip_nnmodule_hook_guards = False`` set before the
    first compiled call, adding the hooks recompiles, and training equals eager TrAct."""
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        model = make("conv")
        compiled = torch.compile(model, backend=CountingBackend())
        x, y = batches("conv")[0]
        F.cross_entropy(compiled(x), y).backward()  # compiles without the hook
        model.zero_grad()
        train(optimizer(model), compiled, "conv")
    assert max_abs_diff(model.state_dict(), eager_params("conv")) < TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inductor_on_cuda_trains_as_eager() -> None:
    """Inductor on a GPU: the same training as eager."""
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = make("conv").cuda()
        opt = optimizer(model)
        forward = torch.compile(model) if compiled else model
        for x, y in batches("conv"):
            opt.zero_grad()
            F.cross_entropy(forward(x.cuda()), y.cuda()).backward()
            opt.step()
        runs.append({k: v.cpu() for k, v in model.state_dict().items()})
    assert max_abs_diff(runs[1], runs[0]) < 1e-4
