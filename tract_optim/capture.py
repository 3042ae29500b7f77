"""Hooks that turn a first layer's forward passes into the statistics of the gradient they train.

One recording path, eager and compiled alike:

1. The forward hook reduces the pass's input to statistics (a copy of its rows while r < n, else
   its Gram), in fp32 (fp64 for fp64 inputs) with autocast off. Only passes that will be
   trained are recorded: grad enabled, the module training, its weight requiring grad, the
   module being the very layer we were given (a ``deepcopy`` of the model, e.g. an EMA copy,
   carries an inert copy of the hook).
2. The statistics ride on the autograd graph: a hook on the node that produced the output (a
   tensor hook inside ``torch.compile``, which calls the same code through a custom op) folds them
   into the layer's accumulator when backward reaches that node. A pass that is never
   backpropagated is never counted, and its statistics are freed with its graph.
3. Statistics belong to the gradient they were accumulated with. After each backward has
   accumulated into ``weight.grad``, the gradient's identity and version are noted. When the next
   backward reaches the layer, a gradient that was set to None, or changed in place and is now
   all zeros (``zero_grad`` of any kind, after a step that GradScaler skipped say), means the
   earlier statistics no longer belong to anything: they are dropped.
"""

from __future__ import annotations

import functools
import itertools
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import unfold
from .statistics import Accumulator, Stats

#: Live captures by key, for the custom op that folds statistics inside compiled backward graphs.
_LIVE: dict[int, weakref.ref[LayerCapture]] = {}
_KEYS = itertools.count()
#: Which capture currently owns each layer's hooks.
_OWNERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref[LayerCapture]] = (
    weakref.WeakKeyDictionary()
)


@torch.library.custom_op("tract_optim::fold", mutates_args=("anchor",))
def _fold_op(key: int, stat: Tensor, is_rows: bool, count: int, anchor: Tensor) -> None:
    """Fold a compiled pass's statistics into its layer's accumulator (runs as Python).

    ``anchor`` is a one-element CPU tensor the op declares it mutates: that keeps the compiler
    from dropping a call whose result nothing reads, and a CPU input keeps CUDA-graph trees from
    capturing (and so skipping on replay) this Python side effect.
    """
    ref = _LIVE.get(key)
    capture = ref() if ref is not None else None
    if capture is not None:
        stats = Stats(count=count, rows=stat) if is_rows else Stats(count=count, gram=stat)
        capture.fold(stats)


@_fold_op.register_fake
def _fold_fake(key: int, stat: Tensor, is_rows: bool, count: int, anchor: Tensor) -> None:
    return None


def _traced_fold(
    key: int, stat: Tensor, is_rows: bool, count: int, anchor: Tensor, _: Tensor
) -> None:
    """The tensor hook of a compiled pass: call the fold through the custom op."""
    torch.ops.tract_optim.fold(key, stat, is_rows, count, anchor)


class _EagerFold:
    """The node pre-hook of an eager pass: fold its statistics. Holds the capture weakly."""

    def __init__(self, capture: LayerCapture, stats: Stats) -> None:
        self._capture = weakref.ref(capture)
        self._stats = stats

    def __call__(self, grad_outputs: Any) -> None:
        capture = self._capture()
        if capture is not None:
            capture.fold(self._stats)


class _ForwardHook:
    """The module hook. Holds weak references only: inert in deep copies and after unpickling."""

    def __init__(self, capture: LayerCapture) -> None:
        self._capture: Callable[[], LayerCapture | None] = weakref.ref(capture)
        self._layer: Callable[[], nn.Module | None] = weakref.ref(capture.layer)

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        capture = self._capture()
        if capture is None or module is not self._layer():
            return
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, Tensor):
            capture.record(x, output)

    def __getstate__(self) -> dict[str, Any]:
        # Copies (deepcopy, pickle) are inert: they belong to another model. The state must be
        # non-empty, or Python skips __setstate__.
        return {"inert": True}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._capture = self._layer = lambda: None


def _producer(output: Tensor) -> Any:
    """The autograd node that computed ``output`` inside the layer.

    An in-place op on the output later (``x.add_(pos)``, ``ReLU(inplace=True)``) rebases the
    output tensor onto a new node, but the producing node still runs in backward. For a view
    output (a Linear with bias on N-D input), that is the node of the view's base.
    """
    base = output._base
    return base.grad_fn if base is not None else output.grad_fn


class LayerCapture:
    """The hooks on one first layer and the statistics of the gradient it currently has."""

    def __init__(
        self,
        layer: nn.Module,
        chunk_bytes: int | None = None,
        *,
        static: bool = False,
    ) -> None:
        self.layer = layer
        self.geometry = unfold.geometry(layer)
        self.chunk_bytes = chunk_bytes
        self.weight: Tensor = layer.weight  # type: ignore[assignment]
        self.static = static
        self.accumulator = Accumulator(
            self.geometry.groups, self.geometry.n, self.weight.device if static else None
        )
        self.superseded = False
        # Whether an eager pass was recorded since the last reset (for error messages only).
        self.recorded_eagerly = False
        self._lock = threading.Lock()
        # (gradient, version) right after the last backward accumulated into it.
        self._owner: tuple[weakref.ref[Tensor], int] | None = None
        # (gradient, folds so far) right after precondition_() wrote the TrAct gradient into it.
        self._marker: tuple[weakref.ref[Tensor], int] | None = None
        self._folds = 0
        self._key = next(_KEYS)
        self._anchor = torch.zeros(1)
        _LIVE[self._key] = weakref.ref(self)
        weakref.finalize(self, _LIVE.pop, self._key, None)
        self._take_over(layer)
        self._handles: list[RemovableHandle] = [
            layer.register_forward_hook(_ForwardHook(self), with_kwargs=True),
            self.weight.register_post_accumulate_grad_hook(_AccumulatedHook(self)),  # type: ignore[no-untyped-call]
        ]

    def _take_over(self, layer: nn.Module) -> None:
        """Become the layer's only capture; a live earlier one is switched off, with a warning."""
        previous_ref = _OWNERS.get(layer)
        previous = previous_ref() if previous_ref is not None else None
        if previous is not None and previous.active:
            previous.remove()
            previous.superseded = True
            warnings.warn(
                f"{type(layer).__name__} (weight {tuple(self.weight.shape)}) was already "
                "preconditioned by another TrActOptimizer; the new one takes over its hooks and "
                "the old one raises if stepped. Call old.remove() first to avoid this warning.",
                stacklevel=4,
            )
        _OWNERS[layer] = weakref.ref(self)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Take the hooks off the layer and drop all statistics."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.reset()

    def reset(self) -> None:
        """Drop the statistics and the gradient they belonged to (after a step, at zero_grad)."""
        with self._lock:
            self.accumulator.clear()
            self._owner = None
            self._marker = None
            self.recorded_eagerly = False

    # --- recording ------------------------------------------------------------------------------

    def _trained(self, output: Any) -> bool:
        """Whether a forward pass with this output will be trained."""
        return (
            torch.is_grad_enabled()
            and self.layer.training
            and self.weight.requires_grad
            and isinstance(output, Tensor)
            and output.requires_grad
        )

    def record(self, x: Tensor, output: Any) -> None:
        """Reduce one forward pass's input to statistics and attach them to its backward."""
        if not self._trained(output):
            return
        assert isinstance(output, Tensor)
        unfold.check_pass(self.layer, x, output)
        x = x.detach()
        count = unfold.row_count(self.layer, x)
        if count == 0:
            return
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        is_rows = count < self.geometry.n and not self.static
        if is_rows:
            with torch.autocast(device_type=x.device.type, enabled=False):
                # A copy: statistics never alias the caller's (possibly reused) input buffer.
                rows = unfold.rows(self.layer, x)
                stat = rows.to(dtype, memory_format=torch.contiguous_format, copy=True)
        else:
            stat = unfold.gram(self.layer, x, self.chunk_bytes, dtype)
        if torch.compiler.is_compiling():
            hook = functools.partial(_traced_fold, self._key, stat, is_rows, count, self._anchor)
            # The base of a view output, as in ``_producer``: in-place ops on the view rebase it.
            base = output._base
            (base if base is not None else output).register_hook(hook)  # type: ignore[no-untyped-call]
            return
        self.recorded_eagerly = True
        stats = Stats(count=count, rows=stat) if is_rows else Stats(count=count, gram=stat)
        node = _producer(output)
        if node is None:
            output.register_hook(_EagerFold(self, stats))  # type: ignore[no-untyped-call]
        else:
            node.register_prehook(_EagerFold(self, stats))

    def fold(self, stats: Stats) -> None:
        """Backward reached a recorded pass: its statistics now belong to the weight's gradient."""
        with self._lock:
            self._check_owner()
            self.accumulator.add(stats)
            self._folds += 1

    def _check_owner(self) -> None:
        """Drop statistics whose gradient was cleared since the last backward accumulated into it.

        Runs when backward reaches the layer, before this backward accumulates into the weight.
        Unchanged gradient: keep. None: cleared. Changed in place (zeroed, but also unscaled,
        clipped, or overwritten by DDP's reducer): cleared only if it is now all zeros; this is
        the one case that reads a device value, and it happens only between two backward passes
        of one step whose gradient was modified in between.
        """
        owner, self._owner = self._owner, None
        if owner is None:
            return
        grad = self.weight.grad
        if grad is not None and grad is owner[0]() and grad._version == owner[1]:
            return
        if grad is None or not bool(_local(grad).ne(0).any()):
            self.accumulator.clear()
            self._marker = None

    def accumulated(self, weight: Tensor) -> None:
        """This backward accumulated into ``weight.grad``: the statistics now belong to it."""
        grad = weight.grad
        with self._lock:
            self._owner = None if grad is None else (weakref.ref(grad), grad._version)

    # --- the preconditioned marker ----------------------------------------------------------------

    def gradient_state(self, grad: Tensor) -> str:
        """``"done"`` if ``grad`` already holds the TrAct gradient of the current statistics,
        ``"mixed"`` if a backward added to it after precondition_() wrote it (it would mix the
        TrAct gradient of earlier passes with the raw gradient of later ones), else ``"raw"``."""
        with self._lock:
            marker = self._marker
            if marker is None or marker[0]() is not grad:
                return "raw"
            return "done" if marker[1] == self._folds else "mixed"

    def mark_preconditioned(self, grad: Tensor) -> None:
        """precondition_() wrote the TrAct gradient into ``grad``."""
        with self._lock:
            self._marker = (weakref.ref(grad), self._folds)
            if self._owner is not None and self._owner[0]() is grad:
                self._owner = (self._owner[0], grad._version)


class _AccumulatedHook:
    """Post-accumulate-grad hook on the weight. Holds the capture weakly; inert in copies."""

    def __init__(self, capture: LayerCapture) -> None:
        self._capture: Callable[[], LayerCapture | None] = weakref.ref(capture)

    def __call__(self, weight: Tensor) -> None:
        capture = self._capture()
        if capture is not None and weight is capture.weight:
            capture.accumulated(weight)

    def __getstate__(self) -> dict[str, Any]:
        return {"inert": True}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._capture = lambda: None


def _local(grad: Tensor) -> Tensor:
    """The locally held part of a (possibly DTensor) gradient."""
    from torch.distributed.tensor import DTensor

    return grad.to_local() if isinstance(grad, DTensor) else grad
