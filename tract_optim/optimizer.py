"""``TrActOptimizer``: TrAct as a wrapper around any torch optimizer(s).

Per step: forward hooks have reduced each first layer's inputs to statistics (``capture``); before
the inner step the statistics are summed over data-parallel ranks (``distributed``), factorised and
applied to the first layer's ``weight.grad`` in place (``solve``); then the inner optimizer(s) step
as usual. The model and its graph are never modified.
"""

from __future__ import annotations

from collections import ChainMap, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from . import distributed, solve, unfold
from .capture import LayerCapture, Stats
from .solve import check_lam

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
    return inner


def _as_layers(first_layer: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    layers = [first_layer] if isinstance(first_layer, nn.Module) else list(first_layer)
    if not layers:
        raise ValueError("first_layer: give a layer or a non-empty sequence of layers")
    names = ", ".join(f"nn.{t.__name__}" for t in unfold.SUPPORTED_LAYERS)
    for i, layer in enumerate(layers):
        if not isinstance(layer, unfold.SUPPORTED_LAYERS):
            raise TypeError(
                f"first_layer[{i}] is a {type(layer).__name__}; TrAct supports {names}. "
                "Pass the module that first multiplies the raw input (e.g. model.conv1)."
            )
        if any(layer is other for other in layers[:i]):
            raise ValueError(f"first_layer[{i}] appears twice; give each layer once")
    return layers


def _describe(index: int, layer: nn.Module) -> str:
    weight = layer.weight
    assert isinstance(weight, Tensor)
    return f"first_layer[{index}] ({type(layer).__name__}, weight {tuple(weight.shape)})"


class TrActOptimizer(Optimizer):
    """Precondition the first layer's weight gradient with TrAct, then step the inner optimizer(s).

    Args:
        optimizer: a torch optimizer, or a sequence of them stepped together (e.g. SGD for the
            first layer and Adam for the rest). It must hold every first layer's weight.
        first_layer: the ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` that
            first multiplies the raw input, or a sequence of such layers.
        lam: TrAct's damping λ > 0 (paper default 0.1), one value or one per layer.
        solve_dtype: ``None`` (default): float64 when rows < n (the Woodbury form, which loses
            digits to cancellation in fp32) or when the gradient is float64, else float32;
            ``torch.float32`` or ``torch.float64`` forces that dtype.
        chunk_bytes: bound on the bytes of unfolded input materialised at once by the hooks.
        process_group: the data-parallel group whose statistics are summed (default: the world
            group whenever torch.distributed is initialised).
        sync_statistics: ``False`` keeps every rank's statistics local (the authors' behaviour).
    """

    def __init__(
        self,
        optimizer: Optimizer | Sequence[Optimizer],
        first_layer: nn.Module | Sequence[nn.Module],
        lam: float | Sequence[float] = 0.1,
        *,
        solve_dtype: torch.dtype | None = None,
        chunk_bytes: int = unfold.DEFAULT_CHUNK_BYTES,
        process_group: dist.ProcessGroup | None = None,
        sync_statistics: bool = True,
    ) -> None:
        inner = _as_optimizers(optimizer)
        layers = _as_layers(first_layer)
        lam_list: list[object] = [lam] * len(layers)
        if isinstance(lam, Sequence) and not isinstance(lam, str):
            lam_list = list(lam)
        if len(lam_list) != len(layers):
            raise ValueError(f"lam: got {len(lam_list)} values for {len(layers)} first layers")
        lams = [check_lam(value, f"lam[{i}]") for i, value in enumerate(lam_list)]
        if solve_dtype is not None and solve_dtype not in _SOLVE_DTYPES:
            raise ValueError(
                f"solve_dtype must be torch.float32 or torch.float64, got {solve_dtype} "
                "(or None: chosen per layer and step)"
            )
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        held = {id(p) for opt in inner for group in opt.param_groups for p in group["params"]}
        for i, layer in enumerate(layers):
            if id(layer.weight) not in held:
                raise ValueError(
                    f"{_describe(i, layer)}: its weight is not in any inner optimizer's "
                    "param_groups; create the optimizer from parameters that include it "
                    "(and build the optimizer after moving or sharding the model)"
                )

        self._inner = inner
        self._lams = lams
        self._solve_dtype = solve_dtype
        self._process_group = process_group
        self._sync_statistics = sync_statistics
        self._preconditioned = False
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
        self._captures = [LayerCapture(layer, chunk_bytes) for layer in layers]

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
            self._lams = [value] * len(self._lams)
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
        self._lams[index] = value

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
            capture.reset_consumed()
        self._preconditioned = False

    @torch.no_grad()
    def precondition_(self) -> None:
        """Replace each first layer's ``weight.grad`` by its TrAct gradient, in place.

        Call it before gradient clipping so that clipping sees the TrAct gradient; ``step()``
        then does not precondition again. At most once per step: later calls do nothing.
        Raises before changing any gradient if a layer's statistics are missing or unusable.
        """
        if self._preconditioned:
            return
        captures = [c for c in self._captures if c.active]
        stats = [c.take() for c in captures]
        grads = [c.weight.grad for c in captures]
        missing = [
            g is not None and s is None and bool(_local(g).count_nonzero() > 0)
            for g, s in zip(grads, stats, strict=True)
        ]
        if (
            captures
            and self._sync_statistics
            and distributed.default_group_active(self._process_group)
        ):
            stats, missing = distributed.all_reduce_stats(
                stats,
                missing,
                [c.geometry for c in captures],
                captures[0].weight.device,
                self._process_group,
            )
        indices = [self._captures.index(c) for c in captures]
        for i, capture, miss in zip(indices, captures, missing, strict=True):
            if miss:
                raise RuntimeError(_missing_message(i, capture))
        updates: list[tuple[Tensor, Tensor]] = []
        for i, capture, s, grad in zip(indices, captures, stats, grads, strict=True):
            if grad is None or s is None:
                continue
            updates.append((grad, self._preconditioned_grad(i, capture, s, grad)))
        for grad, new in updates:
            local, _ = distributed.local_rows(grad)
            local.copy_(new.reshape(local.shape))
        self._preconditioned = True

    def _preconditioned_grad(
        self, index: int, capture: LayerCapture, s: Stats, grad: Tensor
    ) -> Tensor:
        """The TrAct gradient of this rank's rows of ``grad``, as (rows, n) in grad's dtype."""
        what = _describe(index, capture.layer)
        lam = self._lams[index]
        dtype = solve.resolve_dtype(self._solve_dtype, grad.dtype, woodbury=s.rows is not None)
        if s.rows is not None:
            factor = solve.factor_woodbury(s.rows, lam, dtype, what, inputs=grad.dtype)
        else:
            factor = solve.factor_direct(s.to_gram(), s.count, lam, dtype, what)
        local, offset = distributed.local_rows(grad)
        geo = capture.geometry
        flat = local.reshape(local.shape[0], geo.n)
        parts = []
        start = 0
        while start < flat.shape[0]:
            group = (offset + start) // geo.out_per_group
            stop = min(flat.shape[0], (group + 1) * geo.out_per_group - offset)
            parts.append(solve.apply(factor, flat[start:stop], group))
            start = stop
        if not parts:
            return flat.clone()
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(grad.dtype)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Run ``closure`` (with grad enabled), precondition, then step the inner optimizer(s)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.precondition_()
        for opt in self._inner:
            opt.step()
        for capture in self._captures:
            capture.reset()
        self._preconditioned = False
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
            self._lams = lams
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


def _local(grad: Tensor) -> Tensor:
    return distributed.local_rows(grad)[0]


def _missing_message(index: int, capture: LayerCapture) -> str:
    what = _describe(index, capture.layer)
    if capture.recorded_any:
        return (
            f"{what} has a gradient, but backward never reached the outputs of the forward passes "
            "TrAct recorded; the gradient came from elsewhere (e.g. the weight used functionally "
            "in another place). Use the layer module itself for every training forward pass."
        )
    return (
        f"{what} has a gradient, but its forward hook recorded no training pass since the last "
        "step. Likely causes: the weight is used functionally (F.conv2d(x, layer.weight)) instead "
        "of calling the layer; the model was torch.compile'd before TrActOptimizer was created "
        "(create the optimizer first); the pass ran under no_grad/inference_mode or in eval "
        "mode; or the weight was frozen (requires_grad=False) during the pass and this gradient "
        "is left over from before the last step (call zero_grad() every step). Call the layer "
        "module in train mode with grad enabled."
    )
