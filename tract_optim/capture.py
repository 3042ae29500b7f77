"""Forward hooks that reduce a first layer's inputs to TrAct statistics, and their accumulators.

A forward pass is recorded only when it will be trained: grad enabled, the module in training mode,
its weight requiring grad, and the module being the very layer we were given (a ``deepcopy`` of the
model, e.g. an EMA copy, carries an inert copy of the hook). Each recorded pass stays *pending*
until backward reaches its output; only then does it count towards the next step. This makes
gradient accumulation, ``zero_grad`` between forward and backward, activation checkpointing
(whose recomputed passes are never backpropagated themselves) and forward passes without a
backward all come out right.

Inside ``torch.compile`` the hook takes a second, traceable form, so that Dynamo compiles it
without a graph break: the Gram is computed in the graph and a tensor hook on the output adds it
to fixed accumulators once backward reaches the output (``record_compiled``).
"""

from __future__ import annotations

import functools
import itertools
import weakref
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import unfold


@dataclass
class Stats:
    """Statistics of some rows of one layer: their count and either the rows or their Gram.

    Rows (groups, r, n) are kept only while r < n, where they are smaller than the Gram and allow
    the cheaper Woodbury solve; otherwise the Gram (groups, n, n) is kept. Both are fp32.
    """

    count: int
    gram: Tensor | None = None
    rows: Tensor | None = None

    def to_gram(self) -> Tensor:
        """The Gram of these rows, computing it from the rows when needed."""
        if self.gram is not None:
            return self.gram
        assert self.rows is not None
        return self.rows.transpose(1, 2) @ self.rows

    def merge(self, other: Stats, n: int) -> Stats:
        """The statistics of both row sets together."""
        count = self.count + other.count
        if self.rows is not None and other.rows is not None and count < n:
            return Stats(count=count, rows=torch.cat([self.rows, other.rows], dim=1))
        return Stats(count=count, gram=self.to_gram() + other.to_gram())


class _ForwardHook:
    """The module hook. Holds weak references only: inert in deep copies and after unpickling."""

    def __init__(self, capture: LayerCapture) -> None:
        self._capture: Any = weakref.ref(capture)
        self._layer: Any = weakref.ref(capture.layer)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        capture = self._capture()
        if capture is None or module is not self._layer():
            return
        if torch.compiler.is_compiling():
            capture.record_compiled(args[0], output)
        else:
            capture.record(args[0], output)

    def __getstate__(self) -> dict[str, Any]:
        # Copies (deepcopy, pickle) are inert: they belong to another model. The state must be
        # non-empty, or Python skips __setstate__.
        return {"inert": True}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._capture = self._layer = lambda: None


class LayerCapture:
    """Hooks on one first layer plus the statistics recorded since the last step."""

    def __init__(self, layer: nn.Module, chunk_bytes: int = unfold.DEFAULT_CHUNK_BYTES) -> None:
        self.layer = layer
        self.geometry = unfold.geometry(layer)
        self.chunk_bytes = chunk_bytes
        self.weight: Tensor = layer.weight  # type: ignore[assignment]
        self._keys = itertools.count()
        self._pending: dict[int, Stats] = {}
        self._consumed: Stats | None = None
        # Backpropagated passes recorded inside torch.compile (see ``record_compiled``): one
        # Gram's worth of memory, allocated up front since Dynamo must find them at tracing.
        geo = self.geometry
        device = self.weight.device
        self._compiled_gram = torch.zeros(geo.groups, geo.n, geo.n, device=device)
        self._compiled_count = torch.zeros(1, dtype=torch.float64, device=device)
        self._compiled_recorded = False
        self._handle: RemovableHandle | None = layer.register_forward_hook(_ForwardHook(self))

    @property
    def active(self) -> bool:
        return self._handle is not None

    @property
    def recorded_any(self) -> bool:
        """Whether any forward pass was recorded since the last reset, backpropagated or not."""
        return self._consumed is not None or bool(self._pending) or self._compiled_recorded

    def remove(self) -> None:
        """Take the hook off the layer and drop all statistics."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.reset()

    def reset(self) -> None:
        """Drop everything recorded so far (after a step)."""
        self._pending.clear()
        self._consumed = None
        self._clear_compiled()
        self._compiled_recorded = False

    def reset_consumed(self) -> None:
        """Drop statistics whose gradients were just cleared (``zero_grad``); keep pending ones."""
        self._consumed = None
        self._clear_compiled()

    def _clear_compiled(self) -> None:
        """Zero the accumulators of compiled passes (untouched unless a compiled pass ran)."""
        if self._compiled_recorded:
            self._compiled_gram.zero_()
            self._compiled_count.zero_()

    def take(self) -> Stats | None:
        """The statistics of all backpropagated passes since the last reset."""
        if self._compiled_recorded:
            count = round(float(self._compiled_count.item()))
            if count > 0:
                stats = Stats(count=count, gram=self._compiled_gram.clone())
                self._clear_compiled()
                consumed = self._consumed
                self._consumed = (
                    stats if consumed is None else consumed.merge(stats, self.geometry.n)
                )
        return self._consumed

    def set_consumed(self, stats: Stats | None) -> None:
        """Replace the backpropagated statistics (used after synchronising across ranks)."""
        self._consumed = stats

    def _trained(self, output: Any) -> TypeGuard[Tensor]:
        """Whether a forward pass with this output will be trained."""
        return (
            torch.is_grad_enabled()
            and self.layer.training
            and self.weight.requires_grad
            and isinstance(output, Tensor)
            and output.requires_grad
        )

    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def record(self, x: Tensor, output: Any) -> None:
        """Reduce one forward pass's input to statistics and wait for its backward."""
        if not self._trained(output):
            return
        unfold.check_pass(self.layer, x, output)
        if self._consumed is not None and self.weight.grad is None and _clearable(self.weight):
            # The gradients those statistics belong to were cleared without opt.zero_grad()
            # (e.g. model.zero_grad() after a step that GradScaler skipped): drop them too.
            self._consumed = None
        x = x.detach()
        count = unfold.row_count(self.layer, x)
        if count == 0:
            return
        if count < self.geometry.n:
            with torch.autocast(device_type=x.device.type, enabled=False):
                rows = unfold.rows(self.layer, x).float().contiguous()
            stats = Stats(count=count, rows=rows)
        else:
            stats = Stats(count=count, gram=unfold.gram(self.layer, x, self.chunk_bytes))
        key = next(self._keys)
        self._pending[key] = stats
        output.register_hook(_ConsumeHook(self, key))  # type: ignore[no-untyped-call]

    def record_compiled(self, x: Tensor, output: Any) -> None:
        """``record`` in a form Dynamo traces: the Gram in the graph, no Python bookkeeping.

        Passes whose backward arrives after the step count towards the next step (the eager
        form drops them); no training loop backpropagates a pass across a step.
        """
        if not self._trained(output):
            return
        unfold.check_pass(self.layer, x, output)
        x = x.detach()
        count = unfold.row_count(self.layer, x)
        if count == 0:
            return
        gram = unfold.gram(self.layer, x, self.chunk_bytes)
        self._compiled_recorded = True
        add = functools.partial(_add_gram, self._compiled_gram, self._compiled_count, gram, count)
        output.register_hook(add)  # type: ignore[no-untyped-call]

    def consume(self, key: int) -> None:
        """Backward reached the output of pass ``key``: its statistics now count."""
        stats = self._pending.pop(key, None)
        if stats is None:
            return
        if self._consumed is None:
            self._consumed = stats
        else:
            self._consumed = self._consumed.merge(stats, self.geometry.n)


def _add_gram(total: Tensor, total_count: Tensor, gram: Tensor, count: int, grad: Tensor) -> None:
    """Tensor hook of a pass recorded inside torch.compile: backward reached it, so it counts."""
    total.add_(gram.to(total.device))
    total_count.add_(count)


def _clearable(weight: Tensor) -> bool:
    """Whether ``weight.grad is None`` now means its gradients were cleared since backward.

    Not inside backward (activation checkpointing recomputes the forward there, before the
    weight's gradient is accumulated), and not for FSDP2's DTensor parameters, whose ``.grad``
    stays None between unsynchronised micro-batches.
    """
    from torch.distributed.tensor import DTensor

    in_backward = getattr(torch._C, "_current_graph_task_id", lambda: 0)() != -1
    return not in_backward and not isinstance(weight, DTensor)


class _ConsumeHook:
    """Tensor hook on a recorded pass's output; marks the pass as backpropagated."""

    def __init__(self, capture: LayerCapture, key: int) -> None:
        self._capture = weakref.ref(capture)
        self._key = key

    def __call__(self, grad: Tensor) -> None:
        capture = self._capture()
        if capture is not None:
            capture.consume(self._key)
