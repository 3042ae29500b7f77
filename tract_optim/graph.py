"""Attach a recorded pass to the backward that will train it, eager and compiled alike.

Eager: a pre-hook on the autograd node that produced the layer's output holds the pass; when
backward reaches that node it reports the pass to its layer (``Reached``). Nothing is pending
and nothing is allocated up front: the pass dies with its graph if it is never backpropagated.

Compiled (inside ``torch.compile``): hooks on graph nodes cannot be registered from a traced
function, so the forward hook registers a tensor hook on the output instead, which Dynamo traces
into the backward graph. It calls the same Python code through a custom op (``fold``). A second
custom op (``pass_id``) gives every run of the forward a fresh id, so that a graph
backpropagated twice (``retain_graph``) is recognised as one pass. Both ops are registered as
effectful (ordered), which keeps the compiler from dropping, merging or re-running them.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from typing import Any, Protocol

import torch
from torch import Tensor

from .ledger import Pass
from .statistics import Stats


class Receiver(Protocol):
    """What a recorded pass reports to when backward reaches it."""

    def reached(self, entry: Pass) -> None: ...


#: Live receivers by key, for the compiled graphs' ``fold`` op (which can only carry an int).
_LIVE: dict[int, weakref.ref[Any]] = {}
_KEYS = itertools.count(1)
_PASS_IDS = itertools.count(1)


def register(receiver: Receiver) -> int:
    """A key under which compiled graphs reach ``receiver``, for as long as it lives."""
    key = next(_KEYS)
    _LIVE[key] = weakref.ref(receiver)
    weakref.finalize(receiver, _LIVE.pop, key, None)
    return key


def new_pass_id() -> int:
    """A process-wide unique pass id (eager passes and compiled ones share the counter)."""
    return next(_PASS_IDS)


@torch.library.custom_op("tract_optim::pass_id", mutates_args=())
def _pass_id_op(stat: Tensor) -> Tensor:
    """A fresh pass id (a CPU int64 scalar) for the statistics ``stat`` of one compiled pass."""
    return torch.tensor(new_pass_id(), dtype=torch.int64)


@_pass_id_op.register_fake
def _pass_id_fake(stat: Tensor) -> Tensor:
    return torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("tract_optim::fold", mutates_args=())
def _fold_op(
    key: int, stat: Tensor, is_rows: bool, count: int, pass_id: Tensor, wide: Tensor
) -> None:
    """Backward reached a compiled pass: report it (runs as Python, at backward time). ``wide``:
    whether its statistics are float64-accurate (a CPU bool, see ``policy``); ``count`` 0: a
    light pass, without statistics."""
    ref = _LIVE.get(key)
    receiver = ref() if ref is not None else None
    if receiver is None:
        return
    if count == 0:
        receiver.reached(Pass(id=int(pass_id), stats=None, light=True))
        return
    precision = torch.float64 if bool(wide) else torch.float32
    stats = (
        Stats(count=count, rows=stat, precision=precision)
        if is_rows
        else Stats(count=count, gram=stat, precision=precision)
    )
    receiver.reached(Pass(id=int(pass_id), stats=stats))


@_fold_op.register_fake
def _fold_fake(
    key: int, stat: Tensor, is_rows: bool, count: int, pass_id: Tensor, wide: Tensor
) -> None:
    return None


def _ordered(op: Any) -> None:
    """Register ``op`` as an ordered side effect (the API moved between torch versions)."""
    register = getattr(op, "register_effect", None)
    if register is not None:
        from torch._library.effects import EffectType

        register(EffectType.ORDERED)
    else:  # older torch
        from torch._higher_order_ops.effects import _EffectType, _register_effectful_op

        _register_effectful_op(op._opoverload, _EffectType.ORDERED)


_ordered(_pass_id_op)
_ordered(_fold_op)


def _traced_fold(
    key: int, stat: Tensor, is_rows: bool, count: int, pass_id: Tensor, wide: Tensor, _: Tensor
) -> None:
    """The tensor hook of a compiled pass: call the fold through the custom op."""
    torch.ops.tract_optim.fold(key, stat, is_rows, count, pass_id, wide)


class Reached:
    """The node pre-hook of an eager pass: report it. Holds the receiver weakly."""

    def __init__(self, receiver: Receiver, entry: Pass) -> None:
        self._receiver = weakref.ref(receiver)
        self._entry = entry

    def __call__(self, grad_outputs: Any) -> None:
        receiver = self._receiver()
        if receiver is not None:
            receiver.reached(self._entry)


def attach(
    output: Tensor,
    stats: Stats | None,
    receiver: Receiver,
    key: int,
    weight: Tensor,
    precision: torch.dtype | Tensor,
) -> None:
    """Make backward report this pass of ``weight`` (its ``stats``, made with ``precision``, see
    ``policy.pass_statistics``; None for a light pass) to ``receiver`` when it reaches
    ``output``."""
    # In-place ops on the output later (``x.add_(pos)``, ``ReLU(inplace=True)``) rebase it onto a
    # new node, but the producing node still runs in backward. For a view output (a Linear with
    # bias on N-D input), that is the node of the view's base.
    base = output._base if output._base is not None else output
    if torch.compiler.is_compiling():
        stat, is_rows, count = output.new_empty(0), False, 0
        if stats is not None:
            assert isinstance(stats.count, int)
            stat, is_rows, count = stats.data, stats.rows is not None, stats.count
        pass_id = torch.ops.tract_optim.pass_id(stat)
        wide = (
            precision if isinstance(precision, Tensor) else torch.tensor(precision == torch.float64)
        )
        hook = functools.partial(_traced_fold, key, stat, is_rows, count, pass_id, wide)
        base.register_hook(hook)  # type: ignore[no-untyped-call]
        return
    entry = Pass(id=new_pass_id(), stats=stats, weight=weakref.ref(weight), light=stats is None)
    node = base.grad_fn
    if node is None:
        output.register_hook(Reached(receiver, entry))  # type: ignore[no-untyped-call]
    else:
        node.register_prehook(Reached(receiver, entry))
