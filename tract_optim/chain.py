"""Several torch optimizers stepped as one (e.g. SGD for the first layer and Adam for the rest).

``OptimizerChain`` has the parts of the ``torch.optim.Optimizer`` interface a wrapper forwards:
``param_groups`` (a live view of every inner group, in order), ``state`` (each parameter's
entry read from, and created in, the optimizer that holds it), ``defaults`` (the first one's),
``step``, ``zero_grad``, ``add_param_group(group, index=)`` and a state dict in torch's own shape:
``{"state": {i: ...}, "param_groups": [...]}`` with parameters numbered across the optimizers in
order, plus ``"groups_per_optimizer"`` to split it again. State dicts of the earlier
``{"optimizers": [...]}`` form load too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping, MutableSequence, Sequence
from typing import Any, overload

from torch.optim import Optimizer


class OptimizerChain:
    """Optimizers stepped in order as one."""

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        self.optimizers = tuple(optimizers)
        self._groups = _Groups(self.optimizers)
        self._state = _State(self.optimizers)

    @property
    def param_groups(self) -> _Groups:
        return self._groups

    @property
    def state(self) -> _State:
        return self._state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizers[0].defaults

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any], index: int = 0) -> None:
        """Add a parameter group to inner optimizer ``index``."""
        if not 0 <= index < len(self.optimizers):
            raise IndexError(f"add_param_group: index {index} out of range({len(self.optimizers)})")
        self.optimizers[index].add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """One torch-shaped state dict; parameters are numbered across the optimizers in order."""
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        counts: list[int] = []
        offset = 0
        for opt in self.optimizers:
            inner = opt.state_dict()
            state.update({offset + k: v for k, v in inner["state"].items()})
            groups += [
                {**g, "params": [offset + i for i in g["params"]]} for g in inner["param_groups"]
            ]
            counts.append(len(inner["param_groups"]))
            offset += sum(len(g["params"]) for g in inner["param_groups"])
        return {"state": state, "param_groups": groups, "groups_per_optimizer": counts}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load ``state_dict()``'s form (or the earlier ``{"optimizers": [...]}`` form); checked
        against every optimizer before any is loaded."""
        parts = self._split(state_dict)
        for i, (opt, part) in enumerate(zip(self.optimizers, parts, strict=True)):
            have = [len(g["params"]) for g in opt.param_groups]
            got = [len(g["params"]) for g in part.get("param_groups", [])]
            if have != got:
                raise ValueError(
                    f"state_dict for optimizers[{i}] has param groups of sizes {got}, "
                    f"optimizers[{i}] has {have}; load a state dict saved from the same setup"
                )
        for opt, part in zip(self.optimizers, parts, strict=True):
            opt.load_state_dict(dict(part))

    def _split(self, state_dict: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """The inner state dicts held by ``state_dict``."""
        count = len(self.optimizers)
        if "optimizers" in state_dict:
            parts = list(state_dict["optimizers"])
            if len(parts) != count:
                raise ValueError(
                    f"state_dict holds {len(parts)} optimizers' states, this chain has {count}"
                )
            return parts
        counts = state_dict.get("groups_per_optimizer")
        if counts is None or len(counts) != count:
            raise ValueError(
                f"state_dict must come from {count} optimizers stepped together (its "
                "'groups_per_optimizer' says how to split it); a single optimizer's state dict "
                "cannot be loaded into several"
            )
        groups = list(state_dict["param_groups"])
        split: list[Mapping[str, Any]] = []
        start = 0
        for n_groups in counts:
            mine = groups[start : start + n_groups]
            start += n_groups
            ids = {i for g in mine for i in g["params"]}
            base = min(ids, default=0)
            split.append(
                {
                    "state": {k - base: v for k, v in state_dict["state"].items() if k in ids},
                    "param_groups": [
                        {**g, "params": [i - base for i in g["params"]]} for g in mine
                    ],
                }
            )
        return split

    def __repr__(self) -> str:
        return "\n".join(repr(opt) for opt in self.optimizers)


class _Groups(MutableSequence[dict[str, Any]]):
    """Every inner optimizer's parameter groups, in order: the same dicts, read live (torch's
    ``load_state_dict`` replaces an optimizer's list, so a copy would go stale). Adding or
    removing groups through it raises: use ``add_param_group(group, index=)``."""

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        self._optimizers = optimizers

    def _all(self) -> list[dict[str, Any]]:
        return [g for opt in self._optimizers for g in opt.param_groups]

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        return self._all()[index]

    def __len__(self) -> int:
        return sum(len(opt.param_groups) for opt in self._optimizers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._all())

    def __setitem__(self, index: Any, value: Any) -> None:
        raise TypeError(_GROUPS_FIXED)

    def __delitem__(self, index: Any) -> None:
        raise TypeError(_GROUPS_FIXED)

    def insert(self, index: int, value: dict[str, Any]) -> None:
        raise TypeError(_GROUPS_FIXED)

    def __eq__(self, other: object) -> bool:
        return list(self) == other

    def __repr__(self) -> str:
        return repr(self._all())


_GROUPS_FIXED = (
    "the parameter groups of several optimizers stepped together are a view; add a group with "
    "add_param_group(group, index=i) on the TrActOptimizer (i: which inner optimizer)"
)


class _State(MutableMapping[Any, Any]):
    """The inner optimizers' states as one live mapping; ``view[p]`` reads (and, like torch's
    defaultdict, creates) the entry in the optimizer that holds ``p``."""

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        self._optimizers = optimizers

    def _owner(self, key: Any) -> Optimizer | None:
        for opt in self._optimizers:
            if key in opt.state or any(
                key is p for group in opt.param_groups for p in group["params"]
            ):
                return opt
        return None

    def __getitem__(self, key: Any) -> Any:
        opt = self._owner(key)
        if opt is None:
            raise KeyError(key)
        return opt.state[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        opt = self._owner(key)
        if opt is None:
            raise KeyError(f"{key!r} is not a parameter of any inner optimizer")
        opt.state[key] = value

    def __delitem__(self, key: Any) -> None:
        opt = self._owner(key)
        if opt is None or key not in opt.state:
            raise KeyError(key)
        del opt.state[key]

    def __contains__(self, key: object) -> bool:
        return any(key in opt.state for opt in self._optimizers)

    def __iter__(self) -> Iterator[Any]:
        return (key for opt in self._optimizers for key in opt.state)

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers)
