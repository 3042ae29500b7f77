"""Raw-pixel inputs ([0, 255], the paper's Fig. 8 setting, and [0, 1]): with default settings the
update is as exact as on standardised inputs.

Inputs are smooth, image-like batches (upsampled noise plus a little fine noise, rounded to
integers in [0, 255]), which make xᵀx/r + λI as ill-conditioned as natural images do (10⁴–10⁸
at λ = 0.1): a float32 Gram's rounding is then larger than λ. Every update is compared with the
float64 TrAct of the same rows (``tests.kit.tract_grad``), on the first step (the automatic
precision's float64 probe) and the second (its choice), eager and compiled, and on two gloo
ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.kit import relative_error, run_workers, tract_grad, unfold_rows
from tract_optim import PrecisionWarning, TrActOptimizer

TOL = 1e-4


def smooth_images(batch: int, size: int, seed: int, kind: str = "byte") -> Tensor:
    """Image-like batches: ``byte`` in [0, 255] (integers), ``unit`` in [0, 1], ``standard``."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(batch, 3, max(2, size // 8), max(2, size // 8), generator=gen)
    up = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    up = up / up.std() + 0.02 * torch.randn(batch, 3, size, size, generator=gen)
    x = (128 + 60 * up).clamp(0, 255).round()
    if kind == "unit":
        return x / 255
    if kind == "standard":
        return (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)
    return x


# name: (layer factory, image size, batch, flatten the images for a Linear)
CASES: dict[str, tuple[Callable[[], nn.Module], int, int, bool]] = {
    "stem3x3": (lambda: nn.Conv2d(3, 8, 3, padding=1), 16, 8, False),
    "patch4": (lambda: nn.Conv2d(3, 8, 4, stride=4), 16, 16, False),
    "patch8": (lambda: nn.Conv2d(3, 8, 8, stride=8), 32, 16, False),
    "stem7x7s2": (lambda: nn.Conv2d(3, 8, 7, stride=2, padding=3), 32, 4, False),
    "linear_r<n": (lambda: nn.Linear(3 * 8 * 8, 8), 8, 16, True),
    "linear_r>=n": (lambda: nn.Linear(3 * 4 * 4, 8), 4, 256, True),
}


class Net(nn.Module):
    """The first layer, tanh and a linear head on its position-averaged output."""

    def __init__(self, first: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        z = self.first(x)
        z = z.flatten(2).mean(2) if z.dim() == 4 else z
        return self.head(torch.tanh(z / 100))  # type: ignore[no-any-return]


def build(case: str) -> tuple[Net, int, int, bool]:
    make, size, batch, flat = CASES[case]
    torch.manual_seed(0)
    return Net(make()), size, batch, flat


def steps(
    case: str, lam: float, compiled: bool, kind: str = "byte", count: int = 2, **options: Any
) -> list[float]:
    """The relative error of each of ``count`` updates against float64 TrAct."""
    model, size, batch, flat = build(case)
    opt = TrActOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model.first, lam, **options)
    torch._dynamo.reset()
    run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    errors = []
    for step in range(count):
        x = smooth_images(batch, size, step, kind)
        x = x.flatten(1) if flat else x
        opt.zero_grad()
        (run(x) * torch.linspace(-1, 1, 3)).sum().backward()
        weight = model.first.weight
        assert weight.grad is not None
        raw = weight.grad.clone()
        opt.precondition_()
        expected = tract_grad(unfold_rows(model.first, x), raw, lam)
        errors.append(relative_error(weight.grad, expected))
        opt.step()
    return errors


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("lam", [0.05, 0.1, 1.0])
@pytest.mark.parametrize("case", list(CASES))
def test_raw_pixel_updates_are_exact_by_default(case: str, lam: float, compiled: bool) -> None:
    errors = steps(case, lam, compiled)
    assert max(errors) < TOL, errors


@pytest.mark.parametrize("kind", ["unit", "standard"])
@pytest.mark.parametrize("case", ["patch8", "stem7x7s2", "linear_r>=n"])
def test_unit_and_standardised_inputs_stay_float32_and_exact(case: str, kind: str) -> None:
    model, size, batch, flat = build(case)
    opt = TrActOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model.first, 0.1)
    errors = steps(case, 0.1, False, kind=kind)
    assert max(errors) < TOL, errors
    x = smooth_images(batch, size, 0, kind)
    (model(x.flatten(1) if flat else x)).sum().backward()
    opt.step()
    assert opt.state_dict()["tract"]["stats_dtype"] == ["float32"]


@pytest.mark.parametrize("case", ["patch8", "stem7x7s2", "linear_r>=n"])
def test_float32_statistics_are_what_fails_on_raw_pixels(case: str) -> None:
    """The check above can fail: forced float32 statistics miss it, and say what to change."""
    with pytest.warns(PrecisionWarning, match=r"stats_dtype=torch\.float64"):
        errors = steps(case, 0.1, False, stats_dtype=torch.float32)
    assert max(errors) > 10 * TOL, errors


def test_the_warnings_remedy_removes_the_warning_and_the_error() -> None:
    """bf16 weights, λ = 1e-6, rank-deficient inputs, float32 statistics forced: the warning
    names stats_dtype; with it, the update is exact (up to the bf16 rounding of the gradient
    itself)."""
    torch.manual_seed(0)
    layer = nn.Linear(48, 8).to(torch.bfloat16)
    x = smooth_images(256, 4, 0, "standard").flatten(1).to(torch.bfloat16)
    x[:, -1] = x[:, 0]
    raw = torch.autograd.grad(layer(x).float().square().sum(), layer.weight)[0]
    expected = tract_grad(unfold_rows(layer, x), raw, 1e-6)
    errors = []
    for dtype in (torch.float32, torch.float64):
        opt = TrActOptimizer(
            torch.optim.SGD(layer.parameters(), lr=0.0), layer, 1e-6, stats_dtype=dtype
        )
        layer.zero_grad()
        layer(x).float().square().sum().backward()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            opt.precondition_()
        warned = [w for w in record if issubclass(w.category, PrecisionWarning)]
        if dtype == torch.float32:
            assert warned and "stats_dtype=torch.float64" in str(warned[0].message)
        else:
            assert not warned, [str(w.message) for w in warned]
        errors.append(relative_error(layer.weight.grad, expected))  # type: ignore[arg-type]
        opt.remove()
    assert errors[1] < 1e-2 < errors[0], errors  # 1e-2: bf16 rounds the gradient to 2⁻⁸


def test_checkpoint_keeps_the_precision_choice() -> None:
    model, size, batch, _ = build("patch8")
    opt = TrActOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.first)
    model(smooth_images(batch, size, 0)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    assert saved["tract"]["stats_dtype"] == ["float64"]
    twin, _, _, _ = build("patch8")
    twin_opt = TrActOptimizer(torch.optim.SGD(twin.parameters(), lr=0.1), twin.first)
    twin_opt.load_state_dict(saved)
    assert twin_opt.state_dict()["tract"]["stats_dtype"] == ["float64"]
    with pytest.raises(ValueError, match=r"state_dict\['tract'\]\['stats_dtype'\]\[0\] must be"):
        twin_opt.load_state_dict({**saved, "tract": {"lam": [0.1], "stats_dtype": ["half"]}})


def _ddp_worker(rank: int, world: int) -> dict[str, Any]:
    """Each rank trains on its own half of a [0, 255] batch; returns, per step, the averaged raw
    gradient, the update, and the statistics precision chosen."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, size, batch, _ = build("patch8")
    ddp = DDP(model)
    opt = TrActOptimizer(torch.optim.SGD(ddp.parameters(), lr=1.0), model.first, 0.1)
    raws, updates = [], []
    for step in range(2):
        x = smooth_images(2 * batch, size, step)
        before = model.first.weight.detach().clone()
        opt.zero_grad()
        (ddp(x[rank::world]) * torch.linspace(-1, 1, 3)).sum().backward()
        assert model.first.weight.grad is not None
        raws.append(model.first.weight.grad.clone())
        opt.step()
        updates.append(before - model.first.weight.detach())
    return {"raws": raws, "updates": updates, "choice": opt.state_dict()["tract"]["stats_dtype"]}


@pytest.mark.slow
def test_ddp_ranks_agree_and_match_the_global_batch() -> None:
    """Both ranks choose float64 statistics and make the float64 TrAct update of the global
    batch's rows (TrAct's input gradient is DDP's average: the update is compared with TrAct of
    that very gradient, since cond(M) ≈ 1e5 amplifies any other gradient's rounding)."""
    results = run_workers(_ddp_worker, world=2)
    assert results[0]["choice"] == results[1]["choice"] == ["float64"]
    model, size, batch, _ = build("patch8")
    for step in range(2):
        x = smooth_images(2 * batch, size, step)
        rows = torch.cat([unfold_rows(model.first, x[rank::2]) for rank in range(2)], dim=1)
        expected = tract_grad(rows, results[0]["raws"][step], 0.1)
        for result in results:
            assert relative_error(result["updates"][step], expected) < TOL
            assert torch.equal(result["raws"][step], results[0]["raws"][step])
