"""``TrActOptimizer``: TrAct as a wrapper around any torch optimizer(s).

Per step: forward hooks have reduced each first layer's inputs to statistics (``capture``); before
the inner step the statistics are summed over data-parallel ranks (``distributed``), factorised and
applied to the first layer's ``weight.grad`` in place (``solve``); then the inner optimizer(s) step
as usual. The model and its graph are never modified.
"""

from __future__ import annotations

import inspect
import math
from collections import ChainMap, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from . import distributed, solve, unfold
from . import layers as layers_
from .capture import LayerCapture
from .solve import check_lam
from .statistics import Stats

#: ``precondition_`` status bit (besides ``solve``'s): a gradient without statistics.
_MISSING = 1

_SOLVE_DTYPES = (torch.float32, torch.float64)


def _as_optimizers(optimizer: Optimizer | Sequence[Optimizer]) -> list[Optimizer]:
    inner = [optimizer] if isinstance(optimizer, Optimizer) else list(optimizer)
    if not inner:
        raise ValueError("optimizer: give a torch optimizer or a non-empty sequence of them")
    for i, opt in enumerate(inner):
        if isinstance(opt, TrActOptimizer):
            raise TypeError(f"optimizer[{i}] is already a TrActOptimizer; wrap the inner one once")
        if not isinstance(opt, Optimizer):
            raise TypeError(f"optimizer[{i}] must be a torch.optim.Optimizer, got {type(opt)}")
        if _requires_closure(opt):
            raise TypeError(
                f"optimizer[{i}]: {type(opt).__name__}.step() requires a closure, which it "
                "may re-evaluate (LBFGS does, in its line search). TrAct preconditions "
                "the first layer's gradient once per step, so the gradients of those "
                "re-evaluations would be raw, and a line search or curvature estimate needs the "
                "true gradient of the loss, which the TrAct gradient is not. Use a first-order "
                "optimizer (SGD, Adam, ...) inside TrActOptimizer."
            )
    return inner


def _requires_closure(opt: Optimizer) -> bool:
    """Whether ``opt.step`` declares a closure without a default (it re-evaluates the loss)."""
    try:
        closure = inspect.signature(opt.step).parameters.get("closure")
    except (TypeError, ValueError):  # a step that cannot be introspected (e.g. a C function)
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def _as_layers(
    first_layer: nn.Module | Sequence[nn.Module], trusted_layers: Sequence[type[nn.Module]]
) -> list[nn.Module]:
    layers = [first_layer] if isinstance(first_layer, nn.Module) else list(first_layer)
    if not layers:
        raise ValueError("first_layer: give a layer or a non-empty sequence of layers")
    names = ", ".join(f"nn.{t.__name__}" for t in unfold.SUPPORTED_LAYERS)
    trusted = layers_.check_trusted(trusted_layers)
    for i, layer in enumerate(layers):
        if not isinstance(layer, unfold.SUPPORTED_LAYERS):
            raise TypeError(
                f"first_layer[{i}] is a {type(layer).__name__}; TrAct supports {names}. "
                "Pass the module that first multiplies the raw input (e.g. model.conv1)."
            )
        layers_.check(layer, f"first_layer[{i}]", trusted)
        if any(layer is other for other in layers[:i]):
            raise ValueError(f"first_layer[{i}] appears twice; give each layer once")
    return layers


def _weight(layer: nn.Module) -> Tensor:
    weight = layer.weight
    assert isinstance(weight, Tensor)
    return weight


def _describe(index: int, layer: nn.Module) -> str:
    weight = _weight(layer)
    return f"first_layer[{index}] ({type(layer).__name__}, weight {tuple(weight.shape)})"


class TrActOptimizer(Optimizer):
    """Precondition the first layer's weight gradient with TrAct, then step the inner optimizer(s).

    All mutable state lives in objects this instance shares with every proxy of it (Lightning's
    ``LightningOptimizer`` copies ``__dict__``): methods mutate it in place, never rebind it.

    Args:
        optimizer: a torch optimizer, or a sequence of them stepped together (e.g. SGD for the
            first layer and Adam for the rest). It must hold every first layer's weight.
        first_layer: the ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` that
            first multiplies the raw input, or a sequence of such layers (e.g. the parallel
            branches ``find_first_layers`` returns). A subclass that overrides ``forward`` is
            refused with a ``TypeError`` (its z may not be W·x over the rows TrAct sees), except
            timm's ``Conv2dSame``, whose TF-"SAME" padding is handled exactly.
        lam: TrAct's damping λ > 0 (paper default 0.1), one value or one per layer.
        solve_dtype: ``None`` (default: fp32, or fp64 for fp64 gradients), ``torch.float32`` or
            ``torch.float64`` for the solve.
        chunk_bytes: bound on the bytes of unfolded input materialised at once by the hooks
            (default: 16 MiB on CPU, 256 MiB on CUDA devices).
        process_group: the data-parallel group whose statistics are summed (default: the world
            group whenever torch.distributed is initialised).
        sync_statistics: ``False`` keeps every rank's statistics local (the authors' behaviour).
        clip_grad_norm: if set, after preconditioning and before the inner step, clip the
            gradients of every inner parameter to this total norm (``clip_grad_norm_``), so
            that clipping sees the TrAct gradient whatever the framework does before ``step()``.
        clip_norm_type: the norm of ``clip_grad_norm`` (default 2).
        capturable: no host reads in ``step()`` (CUDA graphs, ``reduce-overhead``): statistics
            live in buffers allocated up front, and a layer whose statistics are unusable gets
            a NaN gradient instead of an exception (see the README).
        trusted_layers: subclasses of the supported layers whose own ``forward`` you vouch for:
            TrAct treats their instances as the ``nn`` base class (statistics of the input as
            that class would pad it; the raw weight's gradient preconditioned). For a class
            that transforms its weight inside forward (timm's ``StdConv2d``, a QAT ``Conv2d``)
            this applies TrAct's formula to a layer it was not derived for: your choice.
    """

    def __init__(
        self,
        optimizer: Optimizer | Sequence[Optimizer],
        first_layer: nn.Module | Sequence[nn.Module],
        lam: float | Sequence[float] = 0.1,
        *,
        solve_dtype: torch.dtype | None = None,
        chunk_bytes: int | None = None,
        process_group: dist.ProcessGroup | None = None,
        sync_statistics: bool = True,
        clip_grad_norm: float | None = None,
        clip_norm_type: float = 2.0,
        capturable: bool = False,
        trusted_layers: Sequence[type[nn.Module]] = (),
    ) -> None:
        inner = _as_optimizers(optimizer)
        layers = _as_layers(first_layer, trusted_layers)
        lam_list: list[object] = [lam] * len(layers)
        if isinstance(lam, Sequence) and not isinstance(lam, str):
            lam_list = list(lam)
        if len(lam_list) != len(layers):
            raise ValueError(f"lam: got {len(lam_list)} values for {len(layers)} first layers")
        lams = [check_lam(value, f"lam[{i}]") for i, value in enumerate(lam_list)]
        if solve_dtype is not None and solve_dtype not in _SOLVE_DTYPES:
            raise ValueError(
                f"solve_dtype must be None, torch.float32 or torch.float64, got {solve_dtype}"
            )
        if clip_grad_norm is not None:
            clip_grad_norm = _check_positive(clip_grad_norm, "clip_grad_norm")
        clip_norm_type = _check_positive(clip_norm_type, "clip_norm_type", allow_inf=True)
        if chunk_bytes is not None and (
            isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0
        ):
            raise ValueError(f"chunk_bytes must be None or a positive int, got {chunk_bytes!r}")
        held = {id(p) for opt in inner for group in opt.param_groups for p in group["params"]}
        for i, layer in enumerate(layers):
            if id(layer.weight) not in held:
                raise ValueError(
                    f"{_describe(i, layer)}: its weight is not in any inner optimizer's "
                    "param_groups; create the optimizer from parameters that include it "
                    "(and build the optimizer after moving or sharding the model)"
                )

        self._inner = inner
        self._lams = lams  # mutated in place only (proxies share the list)
        self._solve_dtype = solve_dtype
        self._process_group = process_group
        self._sync_statistics = sync_statistics
        self._clip = (clip_grad_norm, clip_norm_type)
        self._capturable = capturable
        # λ as device tensors in capturable mode, updated in place so replays see set_lam.
        self._lam_tensors = [
            torch.tensor(value, dtype=torch.float64, device=_weight(layer).device)
            for value, layer in zip(lams, layers, strict=True)
            if capturable
        ]
        self._last_grad_norm: list[Tensor | None] = [None]
        # What torch.optim.Optimizer.__init__ sets up, minus param_groups/state/defaults, which
        # are live views of the inner optimizer(s) below.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True
        self._captures = [LayerCapture(layer, chunk_bytes, static=capturable) for layer in layers]

    # --- live views of the inner optimizer(s) -------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The inner optimizers' parameter groups (the same dicts, so schedulers write through)."""
        if len(self._inner) == 1:
            return self._inner[0].param_groups
        return [group for opt in self._inner for group in opt.param_groups]

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The inner optimizers' per-parameter state. TrAct keeps none of its own there."""
        if len(self._inner) == 1:
            return self._inner[0].state
        return _StateView(self._inner)

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The (first) inner optimizer's defaults."""
        return self._inner[0].defaults

    @property
    def optimizers(self) -> tuple[Optimizer, ...]:
        """The wrapped optimizer(s)."""
        return tuple(self._inner)

    @property
    def layers(self) -> tuple[nn.Module, ...]:
        """The preconditioned first layers."""
        return tuple(c.layer for c in self._captures)

    @property
    def lams(self) -> tuple[float, ...]:
        """λ of each first layer."""
        return tuple(self._lams)

    def set_lam(self, lam: float, layer: int | nn.Module | None = None) -> None:
        """Change λ between steps, for one layer (index or module) or for all (``None``)."""
        value = check_lam(lam, "lam")
        if layer is None:
            for i in range(len(self._lams)):
                self._set_lam(i, value)
            return
        if isinstance(layer, nn.Module):
            matches = [i for i, c in enumerate(self._captures) if c.layer is layer]
            if not matches:
                raise ValueError(f"set_lam: {type(layer).__name__} is not one of the first layers")
            index = matches[0]
        else:
            index = layer
            if not 0 <= index < len(self._lams):
                raise IndexError(f"set_lam: layer index {index} out of range({len(self._lams)})")
        self._set_lam(index, value)

    def _set_lam(self, index: int, value: float) -> None:
        self._lams[index] = value
        if self._lam_tensors:
            self._lam_tensors[index].fill_(value)

    @property
    def last_grad_norm(self) -> Tensor | None:
        """The total gradient norm that ``clip_grad_norm`` measured at the last step (pre-clip)."""
        return self._last_grad_norm[0]

    def add_param_group(self, param_group: dict[str, Any], *, index: int = 0) -> None:
        """Add a parameter group to inner optimizer ``index`` (the only one, by default)."""
        if not 0 <= index < len(self._inner):
            raise IndexError(f"add_param_group: index {index} out of range({len(self._inner)})")
        self._inner[index].add_param_group(param_group)

    # --- the step --------------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and the statistics of passes already backpropagated into them."""
        for opt in self._inner:
            opt.zero_grad(set_to_none=set_to_none)
        for capture in self._captures:
            capture.reset()

    @torch.no_grad()
    def precondition_(self) -> None:
        """Replace each first layer's ``weight.grad`` by its TrAct gradient, in place.

        Call it before gradient clipping so that clipping sees the TrAct gradient; ``step()``
        then does not precondition the same gradient again. Raises, before changing any
        gradient, if a layer's statistics are missing or unusable, or if a backward added to a
        gradient after it was preconditioned. One host read in all (none in capturable mode).
        """
        self._check_not_superseded()
        todo: list[tuple[int, LayerCapture, Tensor]] = []
        for i, capture in enumerate(self._captures):
            grad = capture.weight.grad
            if not capture.active or grad is None:
                continue
            state = capture.gradient_state(grad)
            if state == "mixed":
                raise RuntimeError(_mixed_message(i, capture))
            if state == "raw":
                todo.append((i, capture, grad))
        if not todo:
            return
        stats: list[Stats | None] = [c.accumulator.total() for _, c, _ in todo]
        if self._sync_statistics and distributed.default_group_active(self._process_group):
            stats = list(
                distributed.all_reduce_stats(
                    stats,
                    [c.geometry for _, c, _ in todo],
                    todo[0][1].weight.device,
                    self._process_group,
                )
            )
        dtypes = [self._dtype(grad, s) for (_, _, grad), s in zip(todo, stats, strict=True)]
        results = [
            self._solve(i, c, grad, s, dtype)
            for (i, c, grad), s, dtype in zip(todo, stats, dtypes, strict=True)
        ]
        if self._capturable:
            # An imprecise update is still the update; unusable statistics give NaN.
            news = [
                torch.where(status & ~solve.IMPRECISE == 0, new, torch.nan)
                for new, status, _ in results
            ]
        else:
            news = self._checked(todo, stats, dtypes, results)
        for (_, capture, grad), new in zip(todo, news, strict=True):
            local, _ = distributed.local_rows(grad)
            local.copy_(new.reshape(local.shape))
            capture.mark_preconditioned(grad)

    def _dtype(self, grad: Tensor, stats: Stats | None) -> torch.dtype:
        """The solve dtype (``solve.resolve_dtype``; fp64 statistics count as an fp64 gradient)."""
        wide = stats is not None and stats.dtype == torch.float64
        grad_dtype = torch.float64 if wide else grad.dtype
        woodbury = stats is not None and stats.rows is not None
        return solve.resolve_dtype(self._solve_dtype, grad_dtype, woodbury)

    def _solve(
        self,
        index: int,
        capture: LayerCapture,
        grad: Tensor,
        stats: Stats | None,
        dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor, solve.Factor | None]:
        """This rank's rows of the TrAct gradient (rows, n), its status bits and its factor,
        without host reads."""
        local, offset = distributed.local_rows(grad)
        flat = local.reshape(local.shape[0], capture.geometry.n)
        if stats is None:
            return flat, torch.where(flat.ne(0).any(), _MISSING, 0), None
        lam = self._lam_tensors[index] if self._capturable else self._lams[index]
        factor = solve.factor(stats, lam, dtype)
        status = factor.status
        if isinstance(stats.count, Tensor):
            status = status + torch.where((stats.count == 0) & flat.ne(0).any(), _MISSING, 0)
        new = solve.apply_rows(factor, flat, offset, capture.geometry.out_per_group)
        return new.to(grad.dtype), status, factor

    def _checked(
        self,
        todo: list[tuple[int, LayerCapture, Tensor]],
        stats: list[Stats | None],
        dtypes: list[torch.dtype],
        results: list[tuple[Tensor, Tensor, solve.Factor | None]],
    ) -> list[Tensor]:
        """The new gradients, after the step's one host read of every layer's status.

        A factorisation that failed in fp32 is redone in fp64 from the statistics (a second
        read, on that failure path only). Raises, naming the layer, if any layer stays unusable.
        """
        codes = _read_codes([status for _, status, _ in results])
        news = [new for new, _, _ in results]
        for k, ((i, capture, grad), code) in enumerate(zip(todo, codes, strict=True)):
            if code & _MISSING:
                raise RuntimeError(_missing_message(i, capture))
            s, factor = stats[k], results[k][2]
            assert s is not None and factor is not None
            what, lam = _describe(i, capture.layer), self._lams[i]
            if code & ~solve.IMPRECISE:
                # Redone with reads of its own: in float64 from the statistics if it failed below
                # float64; raises, naming the layer, if it stays unusable.
                solve.factor_checked(s, lam, dtypes[k], what)
                news[k] = self._solve(i, capture, grad, s, torch.float64)[0]
            elif code:
                solve.report(code, factor, what, lam)
        return news

    def _check_not_superseded(self) -> None:
        for i, capture in enumerate(self._captures):
            if capture.superseded:
                raise RuntimeError(
                    f"{_describe(i, capture.layer)}: a newer TrActOptimizer took over this "
                    "layer's hooks, so this one has no statistics for it; step the new optimizer "
                    "(or remove() this one before creating the new one)"
                )

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Run ``closure`` (with grad enabled), precondition, clip if asked, step the inner ones."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.precondition_()
        max_norm, norm_type = self._clip
        if max_norm is not None:
            params = [
                p for group in self.param_groups for p in group["params"] if p.grad is not None
            ]
            self._last_grad_norm[0] = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
        for opt in self._inner:
            opt.step()
        for capture in self._captures:
            capture.reset()
        return loss

    # --- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The inner state dict (``{"optimizers": [...]}`` for several) plus a ``"tract"`` entry."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        if len(self._inner) == 1:
            out: dict[str, Any] = dict(self._inner[0].state_dict())
        else:
            out = {"optimizers": [opt.state_dict() for opt in self._inner]}
        out["tract"] = {"lam": list(self._lams), "solve_dtype": str(self._solve_dtype)}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load what ``state_dict()`` saved (an inner optimizer's plain state dict is accepted)."""
        sd: Mapping[str, Any] = state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, dict(sd))
            if result is not None:
                sd = result
        tract = sd.get("tract")
        if tract is not None:
            lams = [
                check_lam(v, f"state_dict['tract']['lam'][{i}]") for i, v in enumerate(tract["lam"])
            ]
            if len(lams) != len(self._lams):
                raise ValueError(
                    f"state_dict has λ for {len(lams)} first layers, this optimizer has "
                    f"{len(self._lams)}"
                )
        if len(self._inner) == 1:
            if "optimizers" in sd:
                raise ValueError("state_dict holds several optimizers; this wraps one")
            self._inner[0].load_state_dict({k: v for k, v in sd.items() if k != "tract"})
        else:
            saved = sd.get("optimizers")
            if saved is None or len(saved) != len(self._inner):
                raise ValueError(
                    f"state_dict must hold 'optimizers' with {len(self._inner)} entries "
                    "(saved from a TrActOptimizer over the same optimizers)"
                )
            for i, (opt, inner_sd) in enumerate(zip(self._inner, saved, strict=True)):
                _check_group_sizes(opt, inner_sd, i)
            for opt, inner_sd in zip(self._inner, saved, strict=True):
                opt.load_state_dict(inner_sd)
        if tract is not None:
            for i, value in enumerate(lams):
                self._set_lam(i, value)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # --- lifetime --------------------------------------------------------------------------------

    def remove(self) -> None:
        """Take the hooks off the first layers; the optimizer then trains like the inner one."""
        for capture in self._captures:
            capture.remove()

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
        layers = ", ".join(
            f"{type(c.layer).__name__}(n={c.geometry.n}, groups={c.geometry.groups}, lam={lam})"
            for c, lam in zip(self._captures, self._lams, strict=True)
        )
        state = "" if all(c.active for c in self._captures) else ", hooks removed"
        inner = ",\n".join("  " + repr(opt).replace("\n", "\n  ") for opt in self._inner)
        return f"TrActOptimizer(layers=[{layers}]{state},\n{inner}\n)"


class _StateView(ChainMap[Any, Any]):
    """The inner optimizers' states as one mapping; ``view[p]`` reads (and, like torch's
    defaultdict, creates) the entry in the optimizer that holds ``p``. A plain ChainMap would
    create it in the first optimizer, whose ``state_dict()`` then fails on the foreign key."""

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        super().__init__(*(opt.state for opt in optimizers))
        self._optimizers = optimizers

    def __getitem__(self, key: Any) -> Any:
        for opt in self._optimizers:
            if key in opt.state or any(
                key is p for group in opt.param_groups for p in group["params"]
            ):
                return opt.state[key]
        raise KeyError(key)


def _check_group_sizes(opt: Optimizer, saved: Mapping[str, Any], index: int) -> None:
    """Refuse a saved inner state that cannot fit, before any inner optimizer is loaded (torch
    checks each optimizer only as it loads it, which would leave the earlier ones changed)."""
    have = [len(group["params"]) for group in opt.param_groups]
    got = [len(group["params"]) for group in saved.get("param_groups", [])]
    if have != got:
        raise ValueError(
            f"state_dict['optimizers'][{index}] has param groups of sizes {got}, "
            f"optimizers[{index}] has {have}; load a state dict saved from the same setup"
        )


def _read_codes(statuses: list[Tensor]) -> list[int]:
    """Every layer's status bits with one host read: 4 bits a layer packed into one int64 (one
    read per 15 layers)."""
    codes: list[int] = []
    per_read = 15
    for start in range(0, len(statuses), per_read):
        part = torch.stack(statuses[start : start + per_read]).to(torch.int64)
        shifts = torch.arange(part.numel(), device=part.device) * 4
        packed = int((part << shifts).sum())
        codes += [(packed >> (4 * k)) & 15 for k in range(part.numel())]
    return codes


def _check_positive(value: object, name: str, *, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}")
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(
            f"{name} must be a positive {'' if allow_inf else 'finite '}float, got {value}"
        )
    return float(value)


def _mixed_message(index: int, capture: LayerCapture) -> str:
    return (
        f"{_describe(index, capture.layer)}: a backward pass added to the gradient after "
        "precondition_() had preconditioned it, so it would mix TrAct and raw gradients. Call "
        "precondition_() once, after the last backward of the step (or zero_grad() first)."
    )


def _missing_message(index: int, capture: LayerCapture) -> str:
    what = _describe(index, capture.layer)
    if capture.recorded_eagerly:
        return (
            f"{what} has a gradient, but backward never reached the outputs of the forward passes "
            "TrAct recorded; the gradient came from elsewhere (e.g. the weight used functionally "
            "in another place). Use the layer module itself for every training forward pass."
        )
    return (
        f"{what} has a gradient, but its forward hook recorded no training pass since the last "
        "step. Likely causes: the weight is used functionally (F.conv2d(x, layer.weight)) instead "
        "of calling the layer; the model was torch.compile'd before TrActOptimizer was created "
        "(create the optimizer first, or set torch._dynamo.config.skip_nnmodule_hook_guards = "
        "False before the first compiled call); the pass ran under no_grad/inference_mode or "
        "in eval mode; or the weight was frozen (requires_grad=False) during the pass and this "
        "gradient is left over from before the last step (call zero_grad() every step). Call "
        "the layer module in train mode with grad enabled."
    )
