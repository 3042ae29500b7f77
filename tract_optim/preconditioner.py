"""``TrActPreconditioner``: TrAct as an object you call between backward and step, or attach to any
optimizer.

It owns the hooks on the first layers (``capture``), λ per layer, and the step's settings. Call
``precondition_()`` after the last backward of a step, or ``attach(optimizer)`` once: the
optimizer's ``step()`` then preconditions first (a step pre-hook), which is how it works with
optimizers a framework builds and owns (HF Trainer's ``optim=``, timm's ``create_optimizer_v2``,
fused or foreach optimizers). ``TrActOptimizer`` is a thin optimizer façade over one of these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from . import diagnostics, engine, unfold
from . import layers as layers_
from .amortise import Kept, StaticKept
from .capture import Target
from .ledger import EXPLICIT, Phase
from .policy import Mode, Precision
from .settings import Settings, check_lam, check_lams


class TrActPreconditioner:
    """Precondition the first layer's weight gradient with TrAct: G ← G·(xᵀx/r + λI)⁻¹.

    All mutable state lives in objects shared with every proxy of an optimizer built on it
    (Lightning's ``LightningOptimizer`` copies ``__dict__``): methods mutate it in place.

    Args:
        first_layer: the ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` that
            first multiplies the raw input, or a sequence of such layers (e.g. the parallel
            branches ``find_first_layers`` returns; layers that share one weight are pooled).
            A subclass that overrides ``forward`` is refused with a ``TypeError`` (its z may not
            be W·x over the rows TrAct sees), except timm's ``Conv2dSame``, whose TF-"SAME"
            padding is handled exactly.
        lam: TrAct's damping λ > 0 (paper default 0.1), one value or one per layer.
        solve_dtype: ``None`` (default: float32 for float32 statistics, float64 otherwise and
            for the r < n Woodbury form), ``torch.float32`` or ``torch.float64``.
        stats_dtype: ``None`` (default: chosen per layer, float32 unless the inputs' scale makes
            float32 inexact, see the README), ``torch.float32`` or ``torch.float64``.
        chunk_bytes: bound on the bytes of unfolded input materialised at once by the hooks
            (default: 16 MiB on CPU, 256 MiB on CUDA devices).
        process_group: the data-parallel group whose statistics are summed (default: the world
            group whenever torch.distributed is initialised).
        sync_statistics: ``False`` keeps every rank's statistics local (the authors' behaviour).
        clip_grad_norm: if set, after preconditioning, clip the gradients of the optimizer's
            parameters to this total norm (``clip_grad_norm_``), so that clipping sees the TrAct
            gradient.
        clip_norm_type: the norm of ``clip_grad_norm`` (default 2).
        capturable: no host reads when preconditioning (CUDA graphs): statistics live in buffers
            allocated up front, and a layer whose statistics are unusable gets a NaN gradient
            instead of an exception (see the README).
        trusted_layers: subclasses of the supported layers whose own ``forward`` you vouch for
            (TrAct then treats them as their ``nn`` base class).
        stats_every: refresh each layer's statistics every this many steps (default 1: every
            step, the paper's exact update); in between, the hooks do no work and the step
            reuses the factor of the last refresh (see the README).
        stats_decay: ``None`` (default): use the last refresh's statistics; a float d in [0, 1):
            a running average over refreshes, A ← d·A + (1 − d)·xᵀx/r.
        gram_precision: how the products of a float32 Gram are computed: ``"fp32"`` (default),
            or split into bfloat16 (``"bf16x3"``) or TF32 (``"tf32x3"``) parts whose three
            products run on a GPU's tensor cores, to about float32 accuracy (see BENCHMARKS.md).
    """

    def __init__(
        self,
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
        self._settings = Settings(
            solve_dtype=solve_dtype,
            stats_dtype=stats_dtype,
            chunk_bytes=chunk_bytes,
            process_group=process_group,
            sync_statistics=sync_statistics,
            clip_grad_norm=clip_grad_norm,
            clip_norm_type=clip_norm_type,
            capturable=capturable,
            trusted_layers=tuple(trusted_layers),
            stats_every=stats_every,
            stats_decay=stats_decay,
            gram_precision=gram_precision,
        )
        layers = layers_.as_layers(first_layer, self._settings.trusted_layers)
        self._layers = tuple(layers)
        self._lams = check_lams(lam, len(layers))  # mutated in place only (proxies share it)
        self._targets = _targets(layers, self._lams, self._settings)
        # λ as device tensors in capturable mode, updated in place so replays see set_lam.
        self._lam_tensors = [
            torch.tensor(self._lams[t.indices[0]], dtype=torch.float64, device=t.weight.device)
            for t in self._targets
            if capturable
        ]
        self._last_grad_norm: list[Tensor | None] = [None]
        self._clock = [0]  # steps preconditioned so far (for stats_every)
        self._attached: list[Optimizer] = []
        self._attach_handles: list[AttachHandle] = []
        for target in self._targets:  # last: nothing above changed the model
            target.install()

    # --- what it preconditions ----------------------------------------------------------------

    @property
    def layers(self) -> tuple[nn.Module, ...]:
        """The preconditioned first layers."""
        return self._layers

    @property
    def lams(self) -> tuple[float, ...]:
        """λ of each first layer."""
        return tuple(self._lams)

    def set_lam(self, lam: float, layer: int | nn.Module | None = None) -> None:
        """Change λ between steps, for one layer (index or module) or for all (``None``). Layers
        that share a weight share λ."""
        value = check_lam(lam, "lam")
        if layer is None:
            indices = list(range(len(self._lams)))
        elif isinstance(layer, nn.Module):
            indices = [i for i, other in enumerate(self._layers) if other is layer]
            if not indices:
                raise ValueError(f"set_lam: {type(layer).__name__} is not one of the first layers")
        else:
            if not 0 <= layer < len(self._lams):
                raise IndexError(f"set_lam: layer index {layer} out of range({len(self._lams)})")
            indices = [layer]
        for k, target in enumerate(self._targets):
            if any(i in target.indices for i in indices):
                if value < self._lams[target.indices[0]]:
                    target.precision.lam_lowered()
                for i in target.indices:
                    self._lams[i] = value
                if self._lam_tensors:
                    self._lam_tensors[k].fill_(value)

    @property
    def last_grad_norm(self) -> Tensor | None:
        """The total gradient norm ``clip_grad_norm`` measured at the last step (pre-clip)."""
        return self._last_grad_norm[0]

    # --- preconditioning ------------------------------------------------------------------------

    @torch.no_grad()
    def precondition_(self) -> None:
        """Replace each first layer's ``weight.grad`` by its TrAct gradient, in place.

        Call it after the last backward of a step (before clipping, so that clipping sees the
        TrAct gradient); a later ``step()`` of an attached optimizer or of ``TrActOptimizer``
        does not precondition the same gradient again. Raises, before changing any gradient, if
        a layer's statistics are missing or unusable, or if a backward added to a gradient after
        it was preconditioned. One host read in all (none in capturable mode).
        """
        self.precondition_for(EXPLICIT, None)

    def precondition_for(self, requester: int, optimizers: Sequence[Optimizer] | None) -> None:
        """``precondition_()`` for the step of ``requester`` (an optimizer's ``id``, or
        ``ledger.EXPLICIT``): skipped where that optimizer's step already has its TrAct
        gradient. ``optimizers``, when known, must hold every layer's current weight."""
        jobs: list[engine.Job] = []
        fresh: list[bool] = []
        for k, target in enumerate(self._targets):
            if target.superseded:
                raise RuntimeError(diagnostics.superseded(target.describe()))
            if not target.active:
                continue
            weight = target.current_weight()
            if weight is not target.weight:
                if optimizers is not None and not _holds(optimizers, weight):
                    raise RuntimeError(diagnostics.replaced(target.describe()))
                target.weight = weight
            ledger = target.ledger
            if ledger.phase is Phase.MIXED:
                raise RuntimeError(diagnostics.mixed(target.describe()))
            if ledger.phase is Phase.LOST:
                raise RuntimeError(diagnostics.lost(target.describe()))
            grad = weight.grad
            collecting = ledger.phase is Phase.COLLECTING
            if grad is None or not (collecting or ledger.stale(requester)):
                continue
            lam_tensor = self._lam_tensors[k] if self._lam_tensors else None
            jobs.append(engine.Job(target, grad, self._lams[target.indices[0]], lam_tensor))
            fresh.append(collecting)
        if jobs:
            engine.run(jobs, self._settings, fresh)
            self._clock[0] += 1
            self._set_collecting()

    def _set_collecting(self) -> None:
        """Whether the passes of the next step are recorded with statistics (a refresh)."""
        # capturable: every step records (the device counter of ``StaticKept`` decides)
        settings = self._settings
        refresh = settings.capturable or self._clock[0] % settings.stats_every == 0
        for target in self._targets:
            target.collecting = refresh

    def clip_(self, params: Sequence[Tensor], scale: Tensor | None = None) -> None:
        """Clip ``params``' gradients to total norm ``clip_grad_norm`` if it is set (after
        preconditioning), as ``clip_grad_norm_`` does. ``scale``: the factor by which the
        gradients are still scaled (a GradScaler leaves unscaling to a fused optimizer's step),
        so that the norm measured and clipped is the unscaled gradient's."""
        max_norm = self._settings.clip_grad_norm
        if max_norm is None:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads, self._settings.clip_norm_type)
        if scale is not None:
            norm = norm / scale.to(norm)
        coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(coefficient.to(grad))
        self._last_grad_norm[0] = norm

    def stepped(self, requester: int) -> None:
        """Optimizer ``requester`` stepped on the preconditioned gradients."""
        for target in self._targets:
            target.ledger.mark_stepped(requester)

    def reset(self) -> None:
        """Drop every statistic and mark (call it where gradients are cleared, e.g. with
        ``zero_grad``; an attached optimizer's own ``zero_grad`` is noticed by itself)."""
        for target in self._targets:
            target.ledger.reset()

    # --- attaching to an optimizer --------------------------------------------------------------

    def attach(self, *optimizers: Optimizer) -> AttachHandle:
        """Make each optimizer's ``step()`` precondition first (and clip its parameters, if
        ``clip_grad_norm`` is set).

        Registers a step pre-hook and post-hook on each optimizer. Optimizers stepped one after
        the other in a training step (SGD for the first layer, Adam for the rest) are attached
        together, and whichever steps first preconditions; together with those attached before,
        they must hold every first layer's weight. Returns a handle whose ``remove()`` detaches
        them.
        """
        if not optimizers:
            raise ValueError("attach: give at least one optimizer")
        for i, opt in enumerate(optimizers):
            check_optimizer(opt, f"optimizers[{i}]")
            if not hasattr(opt, "_optimizer_step_pre_hooks"):
                inner = getattr(opt, "optimizer", None)
                hint = " (attach to the optimizer it wraps, .optimizer)" if inner else ""
                raise TypeError(
                    f"optimizers[{i}]: {type(opt).__name__} does not support step hooks{hint}"
                )
            if any(opt is other for other in [*self._attached, *optimizers[:i]]):
                raise ValueError(f"attach: optimizers[{i}] is already attached")
        self.check_held([*self._attached, *optimizers])
        hooks: list[RemovableHandle] = []
        for opt in optimizers:
            hooks += [
                opt.register_step_pre_hook(self._pre_step),
                opt.register_step_post_hook(self._post_step),
            ]
        self._attached.extend(optimizers)
        handle = AttachHandle(self, optimizers, tuple(hooks))
        self._attach_handles.append(handle)
        return handle

    def _pre_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> Any:
        """Before ``optimizer.step()``: precondition and clip, or, when the step is given a
        closure (which runs the backward, as Lightning's automatic optimization does), do it
        right after that closure, inside the step."""
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._prepare(optimizer)
            return None

        def then_precondition() -> Any:
            loss = closure()
            self._prepare(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": then_precondition}
        return (args[0], then_precondition, *args[2:]), kwargs

    def _prepare(self, optimizer: Optimizer) -> None:
        """Precondition for ``optimizer``'s step and clip its parameters."""
        with torch.no_grad():
            self.precondition_for(id(optimizer), self._attached)
            scale = getattr(optimizer, "grad_scale", None)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self.clip_(params, scale if isinstance(scale, Tensor) else None)

    def _post_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.stepped(id(optimizer))

    def check_held(self, optimizers: Sequence[Optimizer]) -> None:
        """Raise unless ``optimizers`` hold every first layer's weight."""
        for target in self._targets:
            if not _holds(optimizers, target.weight):
                raise ValueError(
                    f"{target.describe()}: its weight is not in any inner optimizer's "
                    "param_groups; create the optimizer from parameters that include it "
                    "(and build the optimizer after moving or sharding the model)"
                )

    # --- checkpoints and lifetime ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """λ of each layer and each layer's statistics precision (``"stats_dtype"``); with
        ``stats_every`` > 1 also the step count and the kept statistics, so that a resume
        continues bit for bit."""
        modes = [""] * len(self._lams)
        kept: list[dict[str, Any] | None] = [None] * len(self._lams)
        for target in self._targets:
            for i in target.indices:
                modes[i] = target.precision.state()
            if target.kept is not None:
                kept[target.indices[0]] = target.kept.state()
        out: dict[str, Any] = {"lam": list(self._lams), "stats_dtype": modes}
        if self._settings.stats_every > 1:
            out["step"] = self._clock[0]
            out["kept"] = kept
        return out

    def check_state_dict(self, state: Mapping[str, Any], where: str) -> None:
        """Raise, naming ``where``, unless ``state`` can be loaded (nothing is changed)."""
        self._parse(state, where)

    def load_state_dict(self, state: Mapping[str, Any], where: str = "state_dict") -> None:
        """Load what ``state_dict()`` saved (checkpoints of earlier versions, with only ``lam``
        and an unused ``solve_dtype``, load too)."""
        lams, modes = self._parse(state, where)
        for target in self._targets:
            value = lams[target.indices[0]]
            for i in target.indices:
                self._lams[i] = value
            if modes is not None:
                target.precision.load(modes[target.indices[0]])
            if target.kept is not None:
                target.kept.load(state.get("kept", [None] * len(lams))[target.indices[0]])
        if self._settings.stats_every > 1:
            self._clock[0] = int(state.get("step", 0))
            self._set_collecting()
        if self._lam_tensors:
            for tensor, target in zip(self._lam_tensors, self._targets, strict=True):
                tensor.fill_(self._lams[target.indices[0]])

    def _parse(self, state: Mapping[str, Any], where: str) -> tuple[list[float], list[Mode] | None]:
        raw = state["lam"]
        lams = [check_lam(v, f"{where}['lam'][{i}]") for i, v in enumerate(raw)]
        if len(lams) != len(self._lams):
            raise ValueError(
                f"{where} has λ for {len(lams)} first layers, this one has {len(self._lams)}"
            )
        saved = state.get("stats_dtype")
        modes = None
        if saved is not None:
            modes = [
                Precision.check_state(v, f"{where}['stats_dtype'][{i}]")
                for i, v in enumerate(saved)
            ]
            if len(modes) != len(lams):
                raise ValueError(
                    f"{where}['stats_dtype'] has {len(modes)} entries for {len(lams)} layers"
                )
        for target in self._targets:
            values = {lams[i] for i in target.indices}
            if len(values) > 1:
                raise ValueError(
                    f"{where}: {target.describe()} share one weight, so their λ must be equal"
                )
        self._check_kept(state, where, len(lams))
        return lams, modes

    def _check_kept(self, state: Mapping[str, Any], where: str, count: int) -> None:
        """Raise unless the amortisation entries (``step``, ``kept``), if any, fit."""
        step = state.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{where}['step'] must be a non-negative int, got {step!r}")
        kept = state.get("kept")
        if kept is None:
            return
        if not isinstance(kept, list) or len(kept) != count:
            raise ValueError(f"{where}['kept'] must be a list of {count} entries, one per layer")
        for target in self._targets:
            i = target.indices[0]
            name = f"{where}['kept'][{i}]"
            if isinstance(target.kept, StaticKept):
                target.kept.check(kept[i], name)
            elif target.kept is not None:
                Kept.check(kept[i], name, target.geometry.groups, target.geometry.n)

    def remove(self) -> None:
        """Take the hooks off the first layers and detach from every optimizer."""
        for target in self._targets:
            target.remove()
        for handle in list(self._attach_handles):
            handle.remove()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            f"{type(self).__name__} holds hooks on live modules and cannot be pickled or copied; "
            "save its state_dict() and load it into a new one instead"
        )

    def __enter__(self) -> TrActPreconditioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        layers = ", ".join(
            f"{type(layer).__name__}(n={t.geometry.n}, groups={t.geometry.groups}, "
            f"lam={self._lams[i]})"
            for t in self._targets
            for i, layer in zip(t.indices, t.layers, strict=True)
        )
        state = "" if all(t.active for t in self._targets) else ", hooks removed"
        return f"{type(self).__name__}(layers=[{layers}]{state})"


class AttachHandle:
    """What ``attach`` returns: ``remove()`` takes the step hooks off and forgets the optimizers
    (also usable as a context manager)."""

    def __init__(
        self,
        owner: TrActPreconditioner,
        optimizers: Sequence[Optimizer],
        hooks: tuple[RemovableHandle, ...],
    ) -> None:
        self._owner, self._optimizers, self._hooks = owner, tuple(optimizers), hooks

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        attached = self._owner._attached
        attached[:] = [o for o in attached if not any(o is mine for mine in self._optimizers)]
        if self in self._owner._attach_handles:
            self._owner._attach_handles.remove(self)

    def __enter__(self) -> AttachHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def check_optimizer(opt: object, name: str) -> None:
    """Raise unless ``opt`` is a torch optimizer TrAct can precondition for."""
    if not isinstance(opt, Optimizer):
        raise TypeError(f"{name} must be a torch.optim.Optimizer, got {type(opt)}")
    if _requires_closure(opt):
        raise TypeError(
            f"{name}: {type(opt).__name__}.step() requires a closure, which it may re-evaluate "
            "(LBFGS does, in its line search). TrAct preconditions the first layer's gradient "
            "once per step, so the gradients of those re-evaluations would be raw, and a line "
            "search or curvature estimate needs the true gradient of the loss, which the TrAct "
            "gradient is not. Use a first-order optimizer (SGD, Adam, ...)."
        )


def _requires_closure(opt: Optimizer) -> bool:
    """Whether ``opt.step`` declares a closure without a default (it re-evaluates the loss)."""
    import inspect

    try:
        closure = inspect.signature(opt.step).parameters.get("closure")
    except (TypeError, ValueError):  # a step that cannot be introspected (e.g. a C function)
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def _holds(optimizers: Sequence[Optimizer], weight: Tensor) -> bool:
    return any(p is weight for opt in optimizers for g in opt.param_groups for p in g["params"])


def _targets(layers: list[nn.Module], lams: list[float], settings: Settings) -> list[Target]:
    """One ``Target`` per distinct weight; layers that share a weight are pooled, which needs the
    same rows layout (groups, n) and the same λ."""
    groups: list[list[int]] = []
    for i, layer in enumerate(layers):
        for group in groups:
            if layers[group[0]].weight is layer.weight:
                group.append(i)
                break
        else:
            groups.append([i])
    targets = []
    for group in groups:
        members = [layers[i] for i in group]
        first = members[0]
        for i, layer in zip(group[1:], members[1:], strict=True):
            if unfold.geometry(layer) != unfold.geometry(first):
                raise ValueError(
                    f"first_layer[{group[0]}] and first_layer[{i}] share one weight but unfold "
                    "their inputs into rows of different layouts (groups or kernel); TrAct can "
                    "pool the passes of layers that share a weight only when their rows match"
                )
            if lams[i] != lams[group[0]]:
                raise ValueError(
                    f"first_layer[{group[0]}] and first_layer[{i}] share one weight, so their "
                    f"λ must be equal (got {lams[group[0]]:g} and {lams[i]:g})"
                )
        targets.append(Target(members, group, settings))
    return targets
