"""The hooks on one weight's first layer(s), and the ledger of that weight's gradient.

A ``Target`` is one weight: usually one layer, or several layers that share it (weight tying),
whose passes are pooled. It installs:

- a forward hook on each layer (run before any user hook, so it sees the layer's own output),
  which reduces a training pass to statistics (``policy``) and attaches them to the backward
  that will train it (``graph``); between statistics refreshes (``amortise``) it attaches the
  pass without statistics, so that it is still counted. Only passes that can be trained are
  recorded: grad enabled, the module training, its weight requiring grad, not inside a
  ``torch.func`` transform (which never touches ``.grad``), and the module being the very layer
  it was installed on (a ``deepcopy`` of the model, e.g. an EMA copy, carries an inert copy of
  the hook);
- a tensor hook and a post-accumulate hook on the layer's weight, through which the ledger
  commits a backward's passes when that backward accumulates the weight's gradient (or computes
  it for ``torch.autograd.grad``). They follow the layer's current weight: a weight that
  replaced the original after construction (``fully_shard``, FSDP2's unsharded parameter during
  backward) is hooked when backward first reaches one of its passes.

Hooks hold their target weakly and are removed when it is garbage collected, so an optimizer
deleted without ``remove()`` leaves nothing on the model.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from . import diagnostics, graph, unfold
from .amortise import Kept, StaticKept
from .ledger import GradientLedger, Pass
from .policy import Precision, pass_statistics
from .settings import Settings
from .statistics import Accumulator, StaticAccumulator

#: Which target currently owns each layer's hooks.
_OWNERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Target]] = weakref.WeakKeyDictionary()


class Target:
    """One first-layer weight: its layer(s), hooks, statistics policy and gradient ledger."""

    def __init__(self, layers: list[nn.Module], indices: list[int], settings: Settings) -> None:
        self.layers = tuple(layers)
        self.indices = tuple(indices)
        self.geometry = unfold.geometry(layers[0])
        #: The weight whose gradient is preconditioned (re-read from the layer at each step).
        self.weight: Tensor = _weight(layers[0])
        self.precision = Precision(settings.stats_dtype, settings.capturable)
        self._chunk_bytes = settings.chunk_bytes
        self._products = settings.gram_precision
        self._capturable = settings.capturable
        accumulator: Accumulator | StaticAccumulator = (
            StaticAccumulator(
                self.geometry.groups,
                self.geometry.n,
                self.weight.device,
                self.precision.dtype(self.weight.dtype),
            )
            if settings.capturable
            else Accumulator(self.geometry.n)
        )
        this = weakref.ref(self)
        self.ledger = GradientLedger(accumulator, _grad_reader(this))
        self.superseded = False
        #: Whether passes are recorded with statistics (False between refreshes, see amortise).
        self.collecting = True
        self.kept: Kept | StaticKept | None = None
        if settings.stats_every > 1:
            self.kept = (
                StaticKept(
                    self.geometry.groups,
                    self.geometry.n,
                    self.weight.device,
                    self.precision.dtype(self.weight.dtype),
                    settings.stats_every,
                )
                if settings.capturable
                else Kept()
            )
        self.key = graph.register(self)
        self._handles: list[RemovableHandle] = []
        self._weight_hooks: WeakIdKeyDictionary = WeakIdKeyDictionary()
        weakref.finalize(self, _remove, self._handles, self._weight_hooks)

    # --- installation ---------------------------------------------------------------------------

    def install(self) -> None:
        """Take over the layers' hooks (a live earlier target is switched off, with a warning)."""
        for layer in self.layers:
            previous_ref = _OWNERS.get(layer)
            previous = previous_ref() if previous_ref is not None else None
            if previous is not None and previous is not self and previous.active:
                previous.remove()
                previous.superseded = True
                diagnostics.warn(
                    f"{type(layer).__name__} (weight {tuple(_weight(layer).shape)}) was already "
                    "preconditioned by another TrActOptimizer or TrActPreconditioner; the new one "
                    "takes over its hooks and the old one raises if stepped. Call old.remove() "
                    "first to avoid this warning."
                )
            _OWNERS[layer] = weakref.ref(self)
        for layer in self.layers:
            self._handles.append(
                layer.register_forward_hook(
                    _ForwardHook(self, layer), with_kwargs=True, prepend=True
                )
            )
        self._hook_weights()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Take the hooks off and drop all statistics."""
        _remove(self._handles, self._weight_hooks)
        self.ledger.reset()

    def _hook_weights(self) -> None:
        """Hook the layers' current weights (those that require grad) if not hooked yet."""
        for layer in self.layers:
            weight = _weight(layer)
            if weight.requires_grad and weight not in self._weight_hooks:
                hooks = _WeightHooks(self, weight)
                self._weight_hooks[weight] = (
                    weight.register_hook(hooks.computed),  # type: ignore[no-untyped-call]
                    weight.register_post_accumulate_grad_hook(hooks.accumulated),  # type: ignore[no-untyped-call]
                )

    # --- recording ------------------------------------------------------------------------------

    def record(self, layer: nn.Module, x: Tensor, output: Any) -> None:
        """Reduce one forward pass to statistics and attach them to its backward."""
        weight = _weight(layer)
        if not (
            torch.is_grad_enabled()
            and layer.training
            and weight.requires_grad
            and isinstance(output, Tensor)
            and output.requires_grad
        ):
            return
        compiling = torch.compiler.is_compiling()
        if not compiling and _functorch_wrapped(x, output, weight):
            return
        unfold.check_pass(layer, x, output)
        x = x.detach()
        precision = self.precision.when_run(x.dtype) if compiling else self.precision.dtype(x.dtype)
        stats = None
        if self.collecting:
            stats = pass_statistics(
                layer, x, precision, not self._capturable, self._chunk_bytes, self._products
            )
            if stats is None:
                return
        elif unfold.row_count(layer, x) == 0:
            return
        if not compiling:
            self.ledger.note_recorded()
        graph.attach(output, stats, self, self.key, weight, precision)

    def reached(self, entry: Pass) -> None:
        """Backward reached one of this target's passes (``graph.Receiver``)."""
        self._hook_weights()
        self.ledger.reached(entry)

    # --- the step ------------------------------------------------------------------------------

    def current_weight(self) -> Tensor:
        """The layers' weight now; raises if tied layers stopped sharing one."""
        weights = [_weight(layer) for layer in self.layers]
        if any(w is not weights[0] for w in weights[1:]):
            raise RuntimeError(
                f"{self.describe()}: these layers shared one weight when TrAct was attached, "
                "but no longer do; attach TrAct again after changing the model"
            )
        return weights[0]

    def describe(self) -> str:
        """How messages name this target, e.g. ``first_layer[0] (Conv2d, weight (8, 3, 3, 3))``."""
        names = " and ".join(f"first_layer[{i}]" for i in self.indices)
        kind = type(self.layers[0]).__name__
        return f"{names} ({kind}, weight {tuple(self.weight.shape)})"


def _grad_reader(target: weakref.ref[Target]) -> Callable[[], Tensor | None]:
    """The gradient of ``target``'s weight, read through a weak reference (no cycle)."""

    def grad() -> Tensor | None:
        live = target()
        return None if live is None else live.weight.grad

    return grad


def _weight(layer: nn.Module) -> Tensor:
    weight = layer.weight
    assert isinstance(weight, Tensor)
    return weight


def _functorch_wrapped(*tensors: Tensor) -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jacrev, ...) wraps any of ``tensors``."""
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _remove(handles: list[RemovableHandle], weight_hooks: WeakIdKeyDictionary) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
    for pair in list(weight_hooks.values()):  # type: ignore[no-untyped-call]
        for handle in pair:
            handle.remove()
    weight_hooks.clear()


class _ForwardHook:
    """The module hook. Holds weak references only: inert in deep copies and after unpickling."""

    def __init__(self, target: Target, layer: nn.Module) -> None:
        self._target: Callable[[], Target | None] = weakref.ref(target)
        self._layer: Callable[[], nn.Module | None] = weakref.ref(layer)

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        target = self._target()
        if target is None or module is not self._layer():
            return
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, Tensor):
            target.record(module, x, output)

    def __getstate__(self) -> dict[str, Any]:
        # Copies (deepcopy, pickle) are inert: they belong to another model. The state must be
        # non-empty, or Python skips __setstate__.
        return {"inert": True}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._target = self._layer = lambda: None


class _WeightHooks:
    """The hooks on a weight. ``computed``: its gradient is being computed in this backward
    (a tensor hook, before it is accumulated); ``accumulated``: it was accumulated into ``.grad``.
    Hold the target weakly; inert in copies."""

    def __init__(self, target: Target, weight: Tensor) -> None:
        self._target: Callable[[], Target | None] = weakref.ref(target)
        self._weight: Callable[[], Tensor | None] = weakref.ref(weight)

    def computed(self, grad: Tensor) -> None:
        target, weight = self._target(), self._weight()
        if target is not None and weight is not None:
            target.ledger.weight_gradient(weight)

    def accumulated(self, weight: Tensor) -> None:
        target = self._target()
        if target is not None and weight is self._weight():
            target.ledger.accumulated(weight)

    def __getstate__(self) -> dict[str, Any]:
        return {"inert": True}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._target = self._weight = lambda: None
