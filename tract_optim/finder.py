"""``find_first_layer(s)``: locate the layer(s) TrAct should precondition by watching one forward.

The rule. During one forward pass (eval mode, no grad), every ``nn.Linear`` / ``nn.Conv1d`` /
``nn.Conv2d`` / ``nn.Conv3d`` inside the model reports the tensor it is called with. A call
*consumes the raw input* when that tensor holds exactly the raw input's elements, in any
arrangement: same element count and the same sorted values. Reshapes, views, permutations,
transposes, non-overlapping patch extraction (``unfold`` with stride = size), ``contiguous``,
``channels_last`` and value-preserving casts keep this true; normalisation, scaling, padding,
cropping or any arithmetic break it. The result is the module of the first call, in execution
order, that consumes the raw input; ``find_first_layers`` returns every such module, in call order
(e.g. the parallel 3×3 and 1×1 branches of a RepVGG / MobileOne / FastViT train-time stem, or two
patch embeddings of the same image). If none does (the input is first transformed, or multiplied
functionally with ``F.conv2d``/``F.linear``), a ``ValueError`` names the first supported module
that was called and what it received instead.

Eval mode keeps dropout and similar training-only randomness from altering the input; the model's
original train/eval flags are restored afterwards. Use a representative example input (real or
random data, not a constant tensor) so that a transformed tensor cannot hold the same values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .unfold import SUPPORTED_LAYERS

_NAMES = ", ".join(f"nn.{t.__name__}" for t in SUPPORTED_LAYERS)


def _same_elements(candidate: Tensor, raw_sorted: Tensor) -> bool:
    """Whether ``candidate`` holds exactly the raw input's elements, in any order."""
    if candidate.numel() != raw_sorted.numel():
        return False
    values = candidate.detach().reshape(-1).to(torch.float64).sort().values
    return bool(torch.equal(values, raw_sorted))


class _Recorder:
    """Pre-hook for every supported module: notes each call and whether it takes the input.

    Stops looking after the first module found unless ``find_all``.
    """

    def __init__(self, raw: Tensor, find_all: bool) -> None:
        self._raw_sorted = raw.detach().reshape(-1).to(torch.float64).sort().values
        self._find_all = find_all
        self.first_call: tuple[str, nn.Module, Tensor | None] | None = None
        self.found: list[nn.Module] = []

    def hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        """The pre-hook for the module called ``name`` in the model."""

        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if (self.found and not self._find_all) or any(module is m for m in self.found):
                return
            x = args[0] if args and isinstance(args[0], Tensor) else None
            if self.first_call is None:
                self.first_call = (name, module, x)
            if x is not None and _same_elements(x, self._raw_sorted):
                self.found.append(module)

        return pre_hook


def _as_args(example_input: Tensor | Sequence[Any]) -> tuple[Any, ...]:
    args = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    if not args or not isinstance(args[0], Tensor):
        raise TypeError("example_input must be a Tensor or a sequence whose first item is one")
    raw = args[0]
    if raw.numel() < 2 or bool((raw == raw.reshape(-1)[0]).all()):
        raise ValueError(
            "example_input is constant; pass a representative batch (real or random data) so "
            "that a normalised or rescaled copy of it cannot be mistaken for the raw input"
        )
    return args


def _not_found_message(recorder: _Recorder, raw: Tensor, caller: str) -> str:
    """Why no module was found: nothing supported was called, or what the first one received."""
    if recorder.first_call is None:
        return (
            f"{caller}: the forward pass called no {_NAMES} module. If the model "
            "multiplies the input functionally (F.conv2d / F.linear with its own weight), make "
            "that weight an nn module and call it; TrAct hooks modules."
        )
    name, module, x = recorder.first_call
    got = "no tensor" if x is None else f"a tensor of shape {tuple(x.shape)}"
    return (
        f"{caller}: no {_NAMES} module receives the raw input (shape "
        f"{tuple(raw.shape)}) or a reshape of it. The first such module called, '{name}' "
        f"({type(module).__name__}), receives {got} whose values differ from the input's: the "
        "input is transformed first (e.g. a normalisation, scaling or padding before the layer, "
        "or a functional F.conv2d/F.linear on the input). Apply such preprocessing in the data "
        "pipeline, or pass the layer you want to TrActOptimizer yourself."
    )


def find_first_layer(model: nn.Module, example_input: Tensor | Sequence[Any]) -> nn.Module:
    """The first ``nn.Linear``/``nn.Conv1d/2d/3d`` that consumes the raw input (see module doc).

    Args:
        model: the model, called once as ``model(*args)``.
        example_input: a representative input batch, or a sequence of positional arguments whose
            first item is the raw input tensor.

    Raises:
        ValueError: if no supported module consumes the raw input, or the input is constant.
        TypeError: if ``example_input`` is not (or does not start with) a tensor.
    """
    return _find(model, example_input, find_all=False)[0]


def find_first_layers(model: nn.Module, example_input: Tensor | Sequence[Any]) -> list[nn.Module]:
    """Every ``nn.Linear``/``nn.Conv1d/2d/3d`` that consumes the raw input, in call order, once.

    Pass them all to ``TrActOptimizer(..., first_layer=find_first_layers(model, x))``: each gets
    its own statistics and update. Arguments and errors as ``find_first_layer``.
    """
    return _find(model, example_input, find_all=True)


def _find(
    model: nn.Module, example_input: Tensor | Sequence[Any], find_all: bool
) -> list[nn.Module]:
    """The modules consuming the raw input in one eval-mode, no-grad forward pass (non-empty)."""
    args = _as_args(example_input)
    recorder = _Recorder(args[0], find_all)
    modes = {module: module.training for module in model.modules()}
    handles = [
        module.register_forward_pre_hook(recorder.hook(name))
        for name, module in model.named_modules()
        if isinstance(module, SUPPORTED_LAYERS)
    ]
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if not recorder.found:
        caller = "find_first_layers" if find_all else "find_first_layer"
        raise ValueError(_not_found_message(recorder, args[0], caller))
    return recorder.found
