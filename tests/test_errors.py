"""Bad input to ``TrActOptimizer``: the right exception, a message that names the argument or
layer and the remedy, and nothing changed (weights, inner optimizer state, hooks, λ).
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import SGD, Adam, Optimizer

from tests.kit import TinyNet, assert_same, conv_net, random_batch, token_net
from tract_optim import TrActOptimizer

Batch = tuple[Tensor, Tensor]
FIRST = r"first_layer\[0\] \(Conv2d, weight \(4, 3, 3, 3\)\)"


def _conv_batch(seed: int = 1) -> Batch:
    return random_batch((4, 3, 5, 5), seed)


def _adam(model: nn.Module) -> Adam:
    return Adam(model.parameters(), lr=1e-2)


def _train_step(model: nn.Module, opt: Optimizer, batch: Batch) -> None:
    opt.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.step()


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def _snapshot(model: nn.Module, opt: Optimizer) -> dict[str, Any]:
    """Everything a failed call must leave alone."""
    return copy.deepcopy(
        {"weights": model.state_dict(), "opt": opt.state_dict(), "hooks": _hook_count(model)}
    )


# --- constructor ---------------------------------------------------------------------------------

Build = Callable[[TinyNet, Optimizer], Any]

_CONSTRUCTOR_CASES: list[tuple[str, Build, type[Exception], str]] = [
    (
        "batchnorm",
        lambda m, o: TrActOptimizer(o, nn.BatchNorm2d(3)),
        TypeError,
        r"first_layer\[0\] is a BatchNorm2d; TrAct supports nn\.Linear, nn\.Conv1d, nn\.Conv2d, "
        r"nn\.Conv3d\. Pass the module that first multiplies the raw input",
    ),
    (
        "conv_transpose",
        lambda m, o: TrActOptimizer(o, [m.first, nn.ConvTranspose2d(3, 4, 3)]),
        TypeError,
        r"first_layer\[1\] is a ConvTranspose2d; TrAct supports",
    ),
    ("no_layers", lambda m, o: TrActOptimizer(o, []), ValueError, r"first_layer: give a layer"),
    ("lam_zero", lambda m, o: TrActOptimizer(o, m.first, 0.0), ValueError, r"lam\[0\].*got 0\.0"),
    ("lam_negative", lambda m, o: TrActOptimizer(o, m.first, -0.1), ValueError, r"lam\[0\] must"),
    ("lam_nan", lambda m, o: TrActOptimizer(o, m.first, float("nan")), ValueError, r"finite.*nan"),
    ("lam_inf", lambda m, o: TrActOptimizer(o, m.first, float("inf")), ValueError, r"finite.*inf"),
    ("lam_bool", lambda m, o: TrActOptimizer(o, m.first, True), TypeError, r"lam\[0\].*got bool"),
    ("lam_str", lambda m, o: TrActOptimizer(o, m.first, "0.1"), TypeError, r"lam\[0\].*got str"),
    (
        "lam_list_bad_entry",
        lambda m, o: TrActOptimizer(o, [m.first, m.head], [0.1, -1.0]),
        ValueError,
        r"lam\[1\] must be a positive finite float, got -1\.0",
    ),
    (
        "lam_count",
        lambda m, o: TrActOptimizer(o, m.first, [0.1, 0.2]),
        ValueError,
        r"lam: got 2 values for 1 first layers",
    ),
    (
        "weight_not_in_optimizer",
        lambda m, o: TrActOptimizer(Adam(m.head.parameters()), m.first),
        ValueError,
        FIRST + r": its weight is not in any inner optimizer's param_groups; create the optimizer",
    ),
    (
        "duplicate_layer",
        lambda m, o: TrActOptimizer(o, [m.first, m.first]),
        ValueError,
        r"first_layer\[1\] appears twice; give each layer once",
    ),
    (
        "solve_dtype_half",
        lambda m, o: TrActOptimizer(o, m.first, solve_dtype=torch.bfloat16),
        ValueError,
        r"solve_dtype must be None, torch\.float32 or torch\.float64, got torch\.bfloat16",
    ),
    (
        "solve_dtype_int",
        lambda m, o: TrActOptimizer(o, m.first, solve_dtype=torch.int64),
        ValueError,
        r"solve_dtype must be",
    ),
    ("chunk_zero", lambda m, o: TrActOptimizer(o, m.first, chunk_bytes=0), ValueError, r"chunk"),
    (
        "chunk_float",
        lambda m, o: TrActOptimizer(o, m.first, chunk_bytes=2.5e6),  # type: ignore[arg-type]
        ValueError,
        r"chunk_bytes must be None or a positive int, got 2500000\.0",
    ),
    (
        "chunk_bool",
        lambda m, o: TrActOptimizer(o, m.first, chunk_bytes=True),
        ValueError,
        r"chunk_bytes.*True",
    ),
    ("no_optimizer", lambda m, o: TrActOptimizer([], m.first), ValueError, r"optimizer: give"),
    (
        "not_an_optimizer",
        lambda m, o: TrActOptimizer([o, m], m.first),  # type: ignore[list-item]
        TypeError,
        r"optimizer\[1\] must be a torch\.optim\.Optimizer",
    ),
]


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [case[1:] for case in _CONSTRUCTOR_CASES],
    ids=[case[0] for case in _CONSTRUCTOR_CASES],
)
def test_constructor_rejects_bad_input(build: Build, error: type[Exception], message: str) -> None:
    """Each bad argument raises before any hook is registered or state is touched."""
    model = conv_net(size=5)
    opt = _adam(model)
    _train_step(model, opt, _conv_batch())
    before = _snapshot(model, opt)
    with pytest.raises(error, match=message):
        build(model, opt)
    assert_same(_snapshot(model, opt), before)


def test_nesting_is_rejected_without_new_hooks() -> None:
    model = conv_net(size=5)
    tract = TrActOptimizer(_adam(model), model.first)
    before = _snapshot(model, tract)
    with pytest.raises(TypeError, match=r"optimizer\[0\] is already a TrActOptimizer; wrap the"):
        TrActOptimizer(tract, model.first)
    assert_same(_snapshot(model, tract), before)
    assert _hook_count(model) == 1


# --- setters and checkpoints ---------------------------------------------------------------------


def test_set_lam_and_add_param_group_reject_bad_input() -> None:
    model = conv_net(size=5)
    opt = TrActOptimizer(_adam(model.first), model.first, 0.3)
    for bad in (0.0, float("nan"), -2.0):
        with pytest.raises(ValueError, match=r"lam must be a positive finite float"):
            opt.set_lam(bad)
    with pytest.raises(TypeError, match=r"lam must be a positive float, got bool"):
        opt.set_lam(False)
    with pytest.raises(IndexError, match=r"set_lam: layer index 1 out of range\(1\)"):
        opt.set_lam(0.2, layer=1)
    with pytest.raises(ValueError, match=r"set_lam: Linear is not one of the first layers"):
        opt.set_lam(0.2, layer=model.head)
    assert opt.lams == (0.3,)
    with pytest.raises(IndexError, match=r"add_param_group: index 1 out of range\(1\)"):
        opt.add_param_group({"params": model.head.parameters()}, index=1)
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(("lam", "error"), [(-1.0, ValueError), (True, TypeError)])
def test_load_state_dict_rejects_bad_lam(lam: object, error: type[Exception]) -> None:
    """A checkpoint with an invalid λ is refused before the inner state is replaced."""
    model = conv_net(size=5)
    opt = TrActOptimizer(_adam(model), model.first, 0.3)
    _train_step(model, opt, _conv_batch())
    saved = opt.state_dict()
    other = conv_net(size=5)
    other_opt = TrActOptimizer(_adam(other), other.first, 0.3)
    saved["tract"]["lam"] = [lam]
    before = _snapshot(other, other_opt)
    with pytest.raises(error, match=r"state_dict\['tract'\]\['lam'\]\[0\]"):
        other_opt.load_state_dict(saved)
    assert_same(_snapshot(other, other_opt), before)
    assert other_opt.lams == (0.3,)


# --- a gradient without statistics ---------------------------------------------------------------


def _functional(model: TinyNet, batch: Batch) -> None:
    """The first layer's weight used directly; its hook never sees the pass."""
    conv = model.first
    z = F.conv2d(batch[0], conv.weight, conv.bias, padding=1)
    F.cross_entropy(model.after_first(z), batch[1]).backward()


def _frozen(model: TinyNet, batch: Batch) -> None:
    """A pass with the first layer frozen, on top of the gradient left from the last step."""
    model.first.requires_grad_(False)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    model.first.requires_grad_(True)


def _no_grad(model: TinyNet, batch: Batch) -> None:
    """Only a no_grad pass since the last step; the gradient is left from before."""
    with torch.no_grad():
        model(batch[0])


def _eval_mode(model: TinyNet, batch: Batch) -> None:
    model.eval()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    model.train()


def _recorded_elsewhere(model: TinyNet, batch: Batch) -> None:
    """The layer is called (and recorded), but the loss reaches the weight functionally."""
    model(batch[0])
    _functional(model, batch)


_MISSING_CASES: list[tuple[Callable[[TinyNet, Batch], None], bool, str]] = [
    (_functional, True, r"used functionally \(F\.conv2d\(x, layer\.weight\)\)"),
    (_frozen, False, r"frozen \(requires_grad=False\).*call zero_grad\(\) every step"),
    (_no_grad, False, r"no_grad/inference_mode"),
    (_eval_mode, True, r"in eval mode"),
    (_recorded_elsewhere, True, r"backward never reached the outputs"),
]


@pytest.mark.parametrize(
    ("bad_pass", "zero_grad", "cause"),
    _MISSING_CASES,
    ids=[case[0].__name__.strip("_") for case in _MISSING_CASES],
)
def test_gradient_without_statistics_raises_and_changes_nothing(
    bad_pass: Callable[[TinyNet, Batch], None], zero_grad: bool, cause: str
) -> None:
    """RuntimeError naming the layer and the cause; weights and state untouched; recoverable."""
    model = conv_net(size=5)
    opt = TrActOptimizer(_adam(model), model.first)
    _train_step(model, opt, _conv_batch(1))
    twin = copy.deepcopy(model)
    twin_opt = TrActOptimizer(_adam(twin), twin.first)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    before = _snapshot(model, opt)
    if zero_grad:
        opt.zero_grad()
    bad_pass(model, _conv_batch(2))
    with pytest.raises(RuntimeError, match=FIRST + r" has a gradient, but .*" + cause):
        opt.step()
    assert_same(_snapshot(model, opt), before)
    # The failed step leaves nothing behind: the next clean step equals the twin's.
    _train_step(model, opt, _conv_batch(3))
    _train_step(twin, twin_opt, _conv_batch(3))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_zero_gradient_without_statistics_is_allowed() -> None:
    """An all-zero gradient (zero_grad(set_to_none=False), frozen pass) is not an error."""
    model = conv_net(size=5)
    opt = TrActOptimizer(SGD(model.parameters(), lr=0.1), model.first)
    opt.zero_grad(set_to_none=False)
    before = copy.deepcopy(model.first.state_dict())
    _frozen(model, _conv_batch())
    opt.step()
    assert_same(model.first.state_dict(), before)


# --- non-finite statistics -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("kind", ["conv", "linear_woodbury"])
def test_non_finite_statistics_raise_and_change_nothing(kind: str, bad: float) -> None:
    """FloatingPointError naming the layer and the remedy, before any weight or state moves."""
    model = conv_net(size=5) if kind == "conv" else token_net(n=6, width=8, act=nn.Tanh())
    x, y = _conv_batch() if kind == "conv" else random_batch((2, 6), 1)  # 2 rows < n = 6: Woodbury
    opt = TrActOptimizer(_adam(model), model.first)
    _train_step(model, opt, (x, y))
    before = _snapshot(model, opt)
    x = x.clone()
    x.view(-1)[3] = bad
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(FloatingPointError, match=r"first_layer\[0\] .*inf or NaN.*standardise"):
        opt.step()
    assert_same(_snapshot(model, opt), before)


def test_pickling_or_copying_the_optimizer_says_to_use_state_dict() -> None:
    """A copy would hold hooks on modules it does not own; the error points to state_dict."""
    layer = nn.Linear(4, 3)
    opt = TrActOptimizer(SGD(layer.parameters(), lr=0.1), layer)
    for copy_fn in (copy.deepcopy, lambda o: pickle.dumps(o)):
        with pytest.raises(TypeError, match="state_dict"):
            copy_fn(opt)
