"""Everything TrAct tells the user: status flags, the step's one host read, errors and warnings.

The maths (``solve``) and the engine (``engine``) return ``Status`` bits as device tensors; this
module reads all layers' bits at once and turns them into exceptions or warnings that name the
layer and the remedy. Warnings point at the user's line (the first frame outside this package and
torch), on every Python version.
"""

from __future__ import annotations

import enum
import math
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

#: A ``PrecisionWarning`` is raised when the predicted relative error of the update exceeds this.
WARN_ERROR = 1e-3


class PrecisionWarning(RuntimeWarning):
    """The TrAct update of a layer is predicted to be less accurate than ``WARN_ERROR``."""


class Status(enum.IntFlag):
    """What the step found for one first layer (bits of a device tensor until read)."""

    OK = 0
    #: The layer has a nonzero gradient but no statistics.
    MISSING = 1
    #: The statistics contain inf or NaN.
    NON_FINITE = 2
    #: The damped matrix is not numerically positive definite in the solve's dtype.
    NOT_POSITIVE_DEFINITE = 4
    #: The update is predicted to be off by more than ``WARN_ERROR``.
    IMPRECISE = 8
    #: float32 statistics would be off by more than ``precision.AUTO_ERROR`` (``precision``).
    WIDE = 16

    @classmethod
    def unusable(cls) -> Status:
        """The bits that make an update unusable."""
        return cls.MISSING | cls.NON_FINITE | cls.NOT_POSITIVE_DEFINITE


_BITS = 5
_PER_READ = 63 // _BITS


def read(statuses: list[Tensor]) -> list[Status]:
    """Every layer's ``Status`` with one host read (one per ``_PER_READ`` layers)."""
    out: list[Status] = []
    for start in range(0, len(statuses), _PER_READ):
        part = torch.stack(statuses[start : start + _PER_READ]).to(torch.int64)
        shifts = torch.arange(part.numel(), device=part.device) * _BITS
        packed = int((part << shifts).sum())
        mask = (1 << _BITS) - 1
        out += [Status((packed >> (_BITS * k)) & mask) for k in range(part.numel())]
    return out


_PACKAGE = str(Path(__file__).resolve().parent)
_TORCH = str(Path(torch.__file__).resolve().parent)


def user_stacklevel() -> int:
    """The ``stacklevel`` with which a ``warnings.warn`` in the caller of this function points at
    the first frame outside tract_optim and torch (torch frames: schedulers, GradScaler,
    ``Optimizer`` step wrappers between the user's line and ours)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith(_PACKAGE) or name.startswith(_TORCH)):
            return level
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return 1


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointing at the user's line."""
    warnings.warn(message, category, stacklevel=user_stacklevel())


def _round(value: float) -> str:
    """A positive number to its power of ten, so repeated warnings repeat the same text."""
    if not math.isfinite(value):
        return "inf"
    return f"1e{math.floor(math.log10(value)):+03d}"


def raise_unusable(status: Status, what: str, lam: float, known: torch.dtype) -> None:
    """Raise ``FloatingPointError`` for statistics that give no usable update; ``known``: the
    precision of the statistics (float32 ones can be the cause)."""
    wider = " or pass stats_dtype=torch.float64" if known != torch.float64 else ""
    if status & Status.NON_FINITE:
        raise FloatingPointError(
            f"{what}: the input statistics contain inf or NaN (the layer's inputs overflowed); "
            f"check the data pipeline or standardise the inputs{wider}"
        )
    if status & Status.NOT_POSITIVE_DEFINITE:
        raise FloatingPointError(
            f"{what}: the damped input matrix xᵀx/r + λI (lam = {lam:g}) is not numerically "
            f"positive definite even in float64; increase lam or standardise the inputs{wider}"
        )


def warn_imprecise(
    cond: float, lam: float, what: str, solve: torch.dtype, known: torch.dtype
) -> None:
    """Warn that unit roundoff × cond(M) exceeds ``WARN_ERROR``; the roundoff is the coarser of
    the solve's dtype and the precision ``known`` to which the statistics fix the matrix."""
    solve_eps = torch.finfo(solve).eps / 2
    known_eps = torch.finfo(known).eps / 2
    error = max(solve_eps, known_eps) * cond
    remedies = ["increase lam"]
    if known_eps > torch.finfo(torch.float64).eps / 2:
        remedies.append("pass stats_dtype=torch.float64")
    if solve_eps > torch.finfo(torch.float64).eps / 2:
        remedies.append("pass solve_dtype=torch.float64")
    warn(
        f"{what}: with lam = {lam:g} the damped input matrix xᵀx/r + λI has condition number "
        f"~{_round(cond)}, so the TrAct update may be off by up to ~{_round(error)} (relative) "
        f"with {_name(known)} statistics and a {_name(solve)} solve; {' or '.join(remedies)}",
        PrecisionWarning,
    )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def missing(what: str, recorded: bool) -> str:
    """Why a layer has a gradient without statistics."""
    if recorded:
        return (
            f"{what} has a gradient, but backward never reached the outputs of the forward "
            "passes TrAct recorded, or reached them without computing the weight's gradient: "
            "the gradient came from elsewhere (e.g. the weight used functionally in another "
            "place, or a gradient assigned by hand that backward did not compute). Use the "
            "layer module itself for every training forward pass, and backward() or "
            "torch.autograd.grad with the weight among the inputs."
        )
    return (
        f"{what} has a gradient, but its forward hook recorded no training pass since the last "
        "step. Likely causes: the weight is used functionally (F.conv2d(x, layer.weight)) instead "
        "of calling the layer; the model was torch.compile'd before TrActOptimizer was created "
        "(or the TrActPreconditioner; create it first, or set torch._dynamo.config."
        "skip_nnmodule_hook_guards = False before the first compiled call); the pass ran under "
        "no_grad/inference_mode or in eval mode; or the weight was frozen (requires_grad=False) "
        "during the pass and this gradient is left over from before the last step (call "
        "zero_grad() every step). Call the layer module in train mode with grad enabled."
    )


def mixed(what: str) -> str:
    """A backward added to a gradient after it was preconditioned."""
    return (
        f"{what}: a backward pass added to the gradient after precondition_() had preconditioned "
        "it, so it would mix TrAct and raw gradients. Call precondition_() once, after the last "
        "backward of the step (or zero_grad() first)."
    )


def lost(what: str) -> str:
    """A retained graph was backpropagated again after its statistics were used by a step."""
    return (
        f"{what}: a forward pass whose statistics were already used by an earlier step was "
        "backpropagated again (a graph kept with retain_graph=True across steps). TrAct releases "
        "a pass's statistics once they are committed to a gradient, so this gradient cannot be "
        "preconditioned exactly; run the forward pass again for the new step."
    )


def superseded(what: str) -> str:
    """Another TrAct instance took over the layer's hooks."""
    return (
        f"{what}: a newer TrActOptimizer took over this layer's hooks (or a newer "
        "TrActPreconditioner), so this one has no statistics for it; step the new one (or "
        "remove() this one before creating the new one)"
    )


def replaced(what: str) -> str:
    """The layer's weight was replaced by one the optimizer does not train."""
    return (
        f"{what}: the layer's weight was replaced after TrAct was attached (fully_shard, "
        "to_empty, load_state_dict(assign=True), ...), and no optimizer TrAct steps holds the new "
        "weight, so it would not be trained. Create the optimizer(s) from the model's current "
        "parameters (or let the framework re-point them, as accelerate.prepare(model, optimizer) "
        "does)."
    )
