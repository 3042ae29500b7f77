"""Host reads per step: at most one by default, none with ``capturable=True``.

A ``TorchDispatchMode`` counts the ops that copy a device value to the host
(``aten._local_scalar_dense``: ``.item()``, ``int()``, ``float()``; ``aten.is_nonzero``:
``bool()``) while ``opt.step()`` runs. The capturable mode's failure behaviour (NaN gradients,
which GradScaler then skips) is checked here too, against a float64 reference; the CUDA-graph
capture test runs only where a GPU is present.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from tests.kit import TwoStem, assert_update, two_stem, unfold_rows
from tract_optim import TrActOptimizer

LAM = 0.1
_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}


class CountHostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _READS:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def batches(device: str = "cpu", count: int = 2) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(2, 3, 4, 4, generator=gen).to(device),
            torch.randn(2, 5, 6, generator=gen).to(device),
        )
        for _ in range(count)
    ]


def loss_of(model: nn.Module, image: Tensor, tokens: Tensor) -> Tensor:
    return model(image, tokens).square().mean()


@pytest.mark.parametrize(("capturable", "allowed"), [(False, 1), (True, 0)])
def test_host_reads_per_step(capturable: bool, allowed: int) -> None:
    model = two_stem()
    opt = TrActOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), [model.conv, model.lin], capturable=capturable
    )
    for _ in range(2):  # two steps, two micro-batches each
        opt.zero_grad()
        for image, tokens in batches():
            loss_of(model, image, tokens).backward()
        with CountHostReads() as counter:
            opt.step()
        assert counter.reads <= allowed, counter.reads


def test_counter_sees_reads() -> None:
    """The counting mode is not blind: ``item()`` and ``bool()`` on a tensor are counted."""
    with CountHostReads() as counter:
        t = torch.ones(2)
        t.sum().item()
        bool(t.any())
    assert counter.reads == 2


def _raw_grads(model: TwoStem, image: Tensor, tokens: Tensor) -> dict[str, Tensor]:
    """Both first layers' plain weight gradients for one batch (fresh twin, no hooks)."""
    twin = two_stem()
    twin.load_state_dict(model.state_dict())
    loss_of(twin, image, tokens).backward()
    assert twin.conv.weight.grad is not None and twin.lin.weight.grad is not None
    return {"conv": twin.conv.weight.grad.double(), "lin": twin.lin.weight.grad.double()}


def test_capturable_matches_reference_and_set_lam_reaches_the_solve() -> None:
    model = two_stem()
    opt = TrActOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), [model.conv, model.lin], 0.5, capturable=True
    )
    opt.set_lam(LAM)
    for image, tokens in batches():
        raw = _raw_grads(model, image, tokens)
        before = {k: getattr(model, k).weight.detach().double().clone() for k in raw}
        opt.zero_grad()
        loss_of(model, image, tokens).backward()
        opt.step()
        for k, x in (("conv", image), ("lin", tokens)):
            layer = getattr(model, k)
            assert_update(before[k] - layer.weight.detach(), raw[k], unfold_rows(layer, x), LAM)


def test_capturable_non_finite_statistics_give_nan_gradient_that_grad_scaler_skips() -> None:
    """precondition_() before scaler.unscale_() (TrAct is linear in G): the scaler sees the NaN.
    (float32 statistics: the default float64 ones of capturable mode do not overflow here.)"""
    model = two_stem()
    opt = TrActOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        [model.conv, model.lin],
        capturable=True,
        stats_dtype=torch.float32,
    )
    scaler = torch.amp.GradScaler("cpu")
    image, tokens = batches()[0]
    tokens = tokens.clone()
    tokens[0, 0, 0] = 1e30  # finite, but its square overflows the fp32 Gram
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(loss_of(model, image, torch.tanh(tokens) + tokens)).backward()
    opt.precondition_()
    assert model.lin.weight.grad is not None
    assert bool(model.lin.weight.grad.isnan().all())
    scaler.step(opt)
    scaler.update()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)  # the step was skipped


def test_capturable_gradient_without_statistics_is_nan() -> None:
    model = two_stem()
    opt = TrActOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model.conv, capturable=True)
    image, _ = batches()[0]
    z = F.conv2d(image, model.conv.weight, model.conv.bias, padding=1)  # functional: no hook
    z.square().mean().backward()
    opt.precondition_()
    assert model.conv.weight.grad is not None
    assert bool(model.conv.weight.grad.isnan().all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_of_step_matches_eager() -> None:
    """Capture ``opt.step()`` (capturable Adam inside) once, replay it, compare with eager."""
    device = "cuda"
    data = batches(device, count=4)
    runs = {}
    for mode in ("eager", "graph"):
        model = two_stem().to(device)
        adam = torch.optim.Adam(model.parameters(), lr=1e-2, capturable=True)
        opt = TrActOptimizer(adam, [model.conv, model.lin], LAM, capturable=True)
        # One eager step first (both modes): allocates the gradients and Adam's state, which
        # a captured step then keeps reading and writing in place.
        loss_of(model, *data[0]).backward()
        opt.step()
        graph = None
        for image, tokens in data:
            opt.zero_grad(set_to_none=False)
            loss_of(model, image, tokens).backward()
            if mode == "eager":
                opt.step()
                continue
            if graph is None:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    opt.step()  # recorded, not run
            graph.replay()
        torch.cuda.synchronize()
        runs[mode] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for k in runs["eager"]:
        torch.testing.assert_close(runs["graph"][k], runs["eager"][k], rtol=1e-5, atol=1e-6)
