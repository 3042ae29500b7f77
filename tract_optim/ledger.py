"""Which forward passes went into a first layer's gradient: the gradient ledger.

A pass's statistics are committed when, and as often as, that pass's gradient is computed for
the layer's weight, which is what accumulates it into ``weight.grad`` (or what
``torch.autograd.grad`` returns for the weight):

1. When backward reaches a recorded pass (``graph``), the pass is *pending* in that backward's
   graph task. A backward that never computes the weight's gradient (an FGSM step's
   ``autograd.grad(loss, x)``, ``backward(inputs=[x])``) or that fails before accumulating it,
   commits nothing: its pending passes are dropped with the task.
2. When that task accumulates the weight's gradient into ``.grad`` (a post-accumulate hook), its
   pending passes are committed; when it computes the gradient for ``torch.autograd.grad``
   instead (a tensor hook on the weight), they are committed when the task ends successfully.
   Each pass is committed at most once per gradient however many backward calls reach it
   (``retain_graph``), and an eager pass's statistics are released once committed.
3. Statistics belong to one gradient (an *epoch*). A new epoch starts at ``reset()``
   (``zero_grad`` of a TrActOptimizer), when a commit finds the gradient cleared since the last
   backward (``model.zero_grad()``, an optimizer's ``zero_grad`` in attach mode: set to None, or
   changed in place and now all zeros), and when a backward adds to a gradient that a step has
   already used.
4. "Already preconditioned" belongs to the epoch, not to a gradient tensor (``Phase``):
   ``precondition_()`` marks it, and the optimizers that step on it are noted, so that one step
   of several optimizers preconditions once, and a backward that adds to a preconditioned
   gradient before its step is reported (``Phase.MIXED``).

No device reads, except when a gradient changed in place between two backward passes of one
epoch (whether it was zeroed).
"""

from __future__ import annotations

import enum
import functools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd import Variable

from .statistics import Accumulator, StaticAccumulator, Stats

#: Who asks for preconditioning: an optimizer stepping (its ``id``) or an explicit call.
EXPLICIT = 0


class Phase(enum.Enum):
    """Where the current gradient stands in its step."""

    #: Its statistics are being gathered.
    COLLECTING = "collecting"
    #: It holds its TrAct gradient (its statistics are used up); no optimizer stepped on it yet.
    PRECONDITIONED = "preconditioned"
    #: An optimizer stepped on it; a backward that adds to it starts a new gradient.
    STEPPED = "stepped"
    #: A backward added to it after it was preconditioned, before the step: an error.
    MIXED = "mixed"
    #: A pass whose statistics were already used by a step was backpropagated again: an error.
    LOST = "lost"


@dataclass
class Pass:
    """One recorded forward pass: its id, its statistics (None once released; never any for a
    ``light`` pass, recorded between statistics refreshes only to be counted) and the weight it
    multiplied (None when not known at record time, inside a compiled graph)."""

    id: int
    stats: Stats | None
    weight: weakref.ref[Tensor] | None = None
    light: bool = False


@dataclass
class _Task:
    """The passes one backward (graph task) reached, not yet committed, and the weights whose
    gradient it computed."""

    passes: list[Pass] = field(default_factory=list)
    computed: list[weakref.ref[Tensor]] = field(default_factory=list)
    committed: bool = False

    def take(self, weight: Tensor | None) -> list[Pass]:
        """Remove and return the passes that multiplied ``weight`` (any computed weight, for
        None; passes of unknown weight go with any)."""
        weights = [w() for w in self.computed] if weight is None else [weight]
        taken: list[Pass] = []
        kept: list[Pass] = []
        for entry in self.passes:
            source = entry.weight() if entry.weight is not None else None
            match = (
                any(w is not None for w in weights)
                if source is None
                else any(source is w for w in weights)
            )
            (taken if match else kept).append(entry)
        self.passes = kept
        return taken


class GradientLedger:
    """The statistics of the passes in one weight's current gradient, and where that gradient
    stands in its step. Thread-safe: backward passes may run in several threads."""

    def __init__(
        self, accumulator: Accumulator | StaticAccumulator, step_grad: Callable[[], Tensor | None]
    ) -> None:
        self.accumulator = accumulator
        self._step_grad = step_grad
        self._lock = threading.Lock()
        # Pending passes by graph task, held strongly only by the task's end-of-backward
        # callback: a backward that fails never runs its callbacks and the engine drops them,
        # which frees its pending passes too.
        self._tasks: weakref.WeakValueDictionary[int, _Task] = weakref.WeakValueDictionary()
        self._committed: set[int] = set()
        # (gradient, version) when the statistics were last known to belong to it.
        self._owner: tuple[weakref.ref[Tensor], int] | None = None
        self.recorded = False  # a pass was recorded since the last step (for error messages)
        self.commits = 0  # passes committed this epoch
        self.phase = Phase.COLLECTING
        self.steppers: set[int] = set()  # optimizers that stepped on the preconditioned gradient

    # --- backward -------------------------------------------------------------------------------

    def reached(self, entry: Pass) -> None:
        """Backward reached a recorded pass: pending in the current graph task."""
        task = self._task(create=True)
        assert task is not None
        with self._lock:
            task.passes.append(entry)

    def weight_gradient(self, weight: Tensor) -> None:
        """The gradient of ``weight`` is being computed in the current graph task (called before
        it is accumulated): if the gradient was cleared since the statistics were last known to
        belong to it, a new epoch starts; the task's passes of ``weight`` now wait for the
        accumulation (or, for ``torch.autograd.grad``, for the end of the backward)."""
        task = self._task(create=False)
        if task is None or not task.passes:
            return
        with self._lock:
            self._check_cleared()
            task.computed.append(weakref.ref(weight))

    def accumulated(self, weight: Tensor) -> None:
        """The current backward accumulated ``weight``'s gradient into ``.grad``: commit its
        passes, which now belong to the gradient as it is."""
        task = self._task(create=False)
        if task is None:
            return
        with self._lock:
            self._commit_all(task, task.take(weight))
            if task.committed:
                self._note_owner()

    def _finish(self, task_id: int, task: _Task) -> None:
        """End of a successful backward: commit the passes whose weight gradient it computed
        but did not accumulate (``torch.autograd.grad``), drop the others, note the gradient."""
        with self._lock:
            self._tasks.pop(task_id, None)
            self._commit_all(task, task.take(None))
            if task.committed:
                self._note_owner()

    def _task(self, create: bool) -> _Task | None:
        task_id = torch._C._current_graph_task_id()
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None and create:
                task = self._tasks[task_id] = _Task()
                # Runs when this backward ends; not at all if it fails (the engine then drops
                # the callback, and with it the task and its pending passes).
                Variable._execution_engine.queue_callback(
                    functools.partial(self._finish, task_id, task)
                )
            return task

    def _commit_all(self, task: _Task, entries: list[Pass]) -> None:
        for entry in entries:
            self._commit(entry)
        task.committed = task.committed or bool(entries)

    def _commit(self, entry: Pass) -> None:
        if entry.id in self._committed or self.phase in (Phase.MIXED, Phase.LOST):
            return
        if self.phase is Phase.PRECONDITIONED:
            self.phase = Phase.MIXED
            return
        if self.phase is Phase.STEPPED:
            self._new_epoch()  # a backward after a step without zero_grad: a new gradient
        if entry.stats is not None:
            self.accumulator.add(entry.stats)
            entry.stats = None  # released: the accumulator holds it now (eager passes)
        elif not entry.light:
            self.phase = Phase.LOST
            return
        self._committed.add(entry.id)
        self.commits += 1

    def _check_cleared(self) -> None:
        """Start a new epoch if the gradient was cleared since the statistics were last known
        to belong to it: set to None, or changed in place and now all zeros (a read)."""
        owner = self._owner
        if owner is None:
            return
        grad = self._step_grad()
        if grad is not None and grad is owner[0]() and grad._version == owner[1]:
            return
        if grad is None or not bool(_local(grad).ne(0).any()):
            self._new_epoch()
        else:
            self._owner = (weakref.ref(grad), grad._version)

    def _note_owner(self) -> None:
        grad = self._step_grad()
        self._owner = None if grad is None else (weakref.ref(grad), grad._version)

    # --- the step ------------------------------------------------------------------------------

    def note_recorded(self) -> None:
        """A training pass was recorded (for error messages)."""
        self.recorded = True

    def total(self) -> Stats | None:
        """The committed statistics of the current gradient."""
        with self._lock:
            return self.accumulator.total()

    def mark_preconditioned(self) -> None:
        """The gradient now holds its TrAct gradient; its statistics are released."""
        with self._lock:
            self.phase = Phase.PRECONDITIONED
            self.steppers.clear()
            self.recorded = False
            self.accumulator.clear()
            self._note_owner()

    def mark_stepped(self, requester: int) -> None:
        """Optimizer ``requester`` stepped on the preconditioned gradient."""
        with self._lock:
            if self.phase in (Phase.PRECONDITIONED, Phase.STEPPED):
                self.phase = Phase.STEPPED
                self.steppers.add(requester)

    def stale(self, requester: int) -> bool:
        """Whether ``requester`` (an explicit call: anyone) already stepped on this preconditioned
        gradient, so that preconditioning it again has no statistics to use."""
        return self.phase is Phase.STEPPED and (requester in self.steppers or requester == EXPLICIT)

    def reset(self) -> None:
        """Start a new gradient (``zero_grad``): drop statistics, marks and pending passes."""
        with self._lock:
            self._new_epoch()
            self._tasks.clear()
            self.recorded = False

    def _new_epoch(self) -> None:
        self.accumulator.clear()
        self._committed.clear()
        self._owner = None
        self.commits = 0
        self.phase = Phase.COLLECTING
        self.steppers.clear()


def _local(grad: Tensor) -> Tensor:
    """The locally held part of a (possibly DTensor) gradient."""
    from torch.distributed.tensor import DTensor

    return grad.to_local() if isinstance(grad, DTensor) else grad
