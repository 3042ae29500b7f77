"""``TrActOptimizer``: a ``torch.optim.Optimizer`` façade over a ``TrActPreconditioner`` and the
optimizer(s) it wraps.

``step()`` runs the closure, preconditions the first layers' gradients, clips if asked, and steps
the inner optimizer(s); ``param_groups``, ``state`` and ``defaults`` are live views of the inner
ones, and checkpoints hold the inner state plus a ``"tract"`` entry. Several inner optimizers
are stepped as one ``OptimizerChain``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from . import layers as layers_
from .chain import OptimizerChain
from .preconditioner import TrActPreconditioner, check_optimizer


class TrActOptimizer(Optimizer):
    """Precondition the first layer's weight gradient with TrAct, then step the inner optimizer(s).

    Args:
        optimizer: a torch optimizer, or a sequence of them stepped together (e.g. SGD for the
            first layer and Adam for the rest). Together they must hold every first layer's
            weight.
        first_layer, lam, and the keyword arguments: as ``TrActPreconditioner``; here
            ``clip_grad_norm`` clips the gradients of every inner parameter.

    Torch conventions: hooks registered on this optimizer (``register_step_pre_hook`` and
    friends) fire once per call with it as argument; global optimizer hooks
    (``torch.optim.optimizer.register_optimizer_step_pre_hook``) fire for the inner optimizers,
    the ones that update parameters, once per inner step. With several inner optimizers,
    ``param_groups`` is a live view of all their groups (add one with ``add_param_group(group,
    index=i)``) and ``state_dict()`` has torch's ``state``/``param_groups`` shape, parameters
    numbered across the optimizers in order.
    """

    def __init__(
        self,
        optimizer: Optimizer | Sequence[Optimizer],
        first_layer: nn.Module | Sequence[nn.Module],
        lam: float | Sequence[float] = 0.1,
        *,
        solve_dtype: torch.dtype | None = None,
        stats_dtype: torch.dtype | None = None,
        chunk_bytes: int | None = None,
        process_group: dist.ProcessGroup | None = None,
        sync_statistics: bool = True,
        clip_grad_norm: float | None = None,
        clip_norm_type: float = 2.0,
        capturable: bool = False,
        trusted_layers: Sequence[type[nn.Module]] = (),
        stats_every: int = 1,
        stats_decay: float | None = None,
        gram_precision: Literal["fp32", "bf16x3", "tf32x3"] = "fp32",
    ) -> None:
        optimizers = _as_optimizers(optimizer)
        held = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
        trusted = layers_.check_trusted(trusted_layers)
        for i, layer in enumerate(layers_.as_layers(first_layer, trusted)):
            weight = layer.weight
            assert isinstance(weight, Tensor)
            if id(weight) not in held:
                raise ValueError(
                    f"first_layer[{i}] ({type(layer).__name__}, weight "
                    f"{tuple(weight.shape)}): its weight is not in any inner optimizer's "
                    "param_groups; create the optimizer from parameters that include it "
                    "(and build the optimizer after moving or sharding the model)"
                )
        self._optimizers = tuple(optimizers)
        self._inner: Optimizer | OptimizerChain = (
            optimizers[0] if len(optimizers) == 1 else OptimizerChain(optimizers)
        )
        self._load_inner = (
            _one_optimizer_loader(optimizers[0])
            if len(optimizers) == 1
            else self._inner.load_state_dict
        )
        self._pre = TrActPreconditioner(
            first_layer,
            lam,
            solve_dtype=solve_dtype,
            stats_dtype=stats_dtype,
            chunk_bytes=chunk_bytes,
            process_group=process_group,
            sync_statistics=sync_statistics,
            clip_grad_norm=clip_grad_norm,
            clip_norm_type=clip_norm_type,
            capturable=capturable,
            trusted_layers=trusted_layers,
            stats_every=stats_every,
            stats_decay=stats_decay,
            gram_precision=gram_precision,
        )
        # What torch.optim.Optimizer.__init__ sets up, minus param_groups/state/defaults (live
        # views of the inner optimizer(s) here); a test pins this list against torch's.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"
        self._warned_capturable_if_run_uncaptured = True

    # --- live views of the inner optimizer(s) -------------------------------------------------

    @property
    def param_groups(self) -> Any:  # type: ignore[override]
        """The inner optimizers' parameter groups (the same dicts, so schedulers write through)."""
        return self._inner.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The inner optimizers' per-parameter state. TrAct keeps none of its own there."""
        return self._inner.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The (first) inner optimizer's defaults."""
        return self._inner.defaults

    @property
    def optimizers(self) -> tuple[Optimizer, ...]:
        """The wrapped optimizer(s)."""
        return self._optimizers

    @property
    def preconditioner(self) -> TrActPreconditioner:
        """The preconditioner this optimizer steps with."""
        return self._pre

    @property
    def layers(self) -> tuple[nn.Module, ...]:
        """The preconditioned first layers."""
        return self._pre.layers

    @property
    def lams(self) -> tuple[float, ...]:
        """λ of each first layer."""
        return self._pre.lams

    def set_lam(self, lam: float, layer: int | nn.Module | None = None) -> None:
        """Change λ between steps, for one layer (index or module) or for all (``None``)."""
        self._pre.set_lam(lam, layer)

    @property
    def last_grad_norm(self) -> Tensor | None:
        """The total gradient norm that ``clip_grad_norm`` measured at the last step (pre-clip)."""
        return self._pre.last_grad_norm

    def add_param_group(self, param_group: dict[str, Any], *, index: int = 0) -> None:
        """Add a parameter group to inner optimizer ``index`` (the only one, by default)."""
        if not 0 <= index < len(self._optimizers):
            raise IndexError(
                f"add_param_group: index {index} out of range({len(self._optimizers)})"
            )
        self._optimizers[index].add_param_group(param_group)

    # --- the step --------------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and the statistics of the passes already backpropagated into them."""
        self._inner.zero_grad(set_to_none=set_to_none)
        self._pre.reset()

    def precondition_(self) -> None:
        """Replace each first layer's ``weight.grad`` by its TrAct gradient, in place (see
        ``TrActPreconditioner.precondition_``); ``step()`` then does not redo it."""
        self._pre.precondition_()

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Run ``closure`` (with grad enabled), precondition, clip if asked, step the inner ones."""
        args: tuple[Any, ...] = (self,) if closure is None else (self, closure)
        kwargs: dict[str, Any] = {}
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            for pre_hook in list(self._optimizer_step_pre_hooks.values()):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    args, kwargs = result
            loss = self._step(*args[1:], **kwargs)
            for post_hook in list(self._optimizer_step_post_hooks.values()):
                post_hook(self, args, kwargs)
        return loss

    def _step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._pre.precondition_for(id(self), self._optimizers)
        self._pre.clip_([p for group in self.param_groups for p in group["params"]])
        self._inner.step()
        self._pre.stepped(id(self))
        return loss

    # --- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The inner state dict plus a ``"tract"`` entry (λ and statistics precision per layer)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        out: dict[str, Any] = dict(self._inner.state_dict())
        out["tract"] = self._pre.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load what ``state_dict()`` saved (an inner optimizer's plain state dict is accepted).
        Everything is checked before anything is loaded."""
        sd: Mapping[str, Any] = state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, dict(sd))
            if result is not None:
                sd = result
        tract = sd.get("tract")
        if tract is not None:
            self._pre.check_state_dict(tract, "state_dict['tract']")
        self._load_inner({k: v for k, v in sd.items() if k != "tract"})
        if tract is not None:
            self._pre.load_state_dict(tract, "state_dict['tract']")
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # --- lifetime --------------------------------------------------------------------------------

    def remove(self) -> None:
        """Take the hooks off the first layers; the optimizer then trains like the inner one."""
        self._pre.remove()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            "TrActOptimizer holds hooks on live modules and cannot be pickled or copied; "
            "save opt.state_dict() and load it into a new TrActOptimizer instead"
        )

    def __enter__(self) -> TrActOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        head = repr(self._pre).removeprefix(type(self._pre).__name__ + "(").removesuffix(")")
        inner = ",\n".join("  " + repr(opt).replace("\n", "\n  ") for opt in self._optimizers)
        return f"TrActOptimizer({head},\n{inner}\n)"


# torch wraps an Optimizer subclass's ``step`` with global and instance hooks unless marked as
# already wrapped; ``step`` above runs the instance hooks itself, and global ones fire for the
# inner optimizers, so that each fires once per step of the optimizer that updates parameters.
TrActOptimizer.step.hooked = True  # type: ignore[attr-defined]


def _as_optimizers(optimizer: Optimizer | Sequence[Optimizer]) -> list[Optimizer]:
    inner = [optimizer] if isinstance(optimizer, Optimizer) else list(optimizer)
    if not inner:
        raise ValueError("optimizer: give a torch optimizer or a non-empty sequence of them")
    for i, opt in enumerate(inner):
        if isinstance(opt, TrActOptimizer):
            raise TypeError(f"optimizer[{i}] is already a TrActOptimizer; wrap the inner one once")
        check_optimizer(opt, f"optimizer[{i}]")
    return inner


def _one_optimizer_loader(opt: Optimizer) -> Callable[[Mapping[str, Any]], None]:
    """``opt.load_state_dict``, refusing first a state dict saved from several optimizers."""

    def load(state_dict: Mapping[str, Any]) -> None:
        if "optimizers" in state_dict or "groups_per_optimizer" in state_dict:
            raise ValueError("state_dict holds several optimizers; this wraps one")
        opt.load_state_dict(dict(state_dict))

    return load
