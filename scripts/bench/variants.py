"""The variants a case is timed with: how the first layer is trained.

Plain SGD; SGD wrapped in ``TrActOptimizer`` (this checkout's, optionally with ``chunk_bytes``, or
another checkout's as "baseline"), exact or with amortised statistics (``stats_every``); and the
authors' ``torch_tract.TrAct`` layer in place of the first layer. Every variant uses the same SGD
settings and λ, so only TrAct's cost differs.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tract_optim import TrActOptimizer

LAM = 0.1


@dataclass(frozen=True)
class Variant:
    """One way of training the first layer, under its column name in the report.

    ``tract``: the ``TrActOptimizer`` class that wraps SGD (None: SGD alone); ``chunk_bytes``
    and ``stats_every``: passed to it when not at their defaults; ``authors``: the authors'
    TrAct layer replaces the first layer.
    """

    name: str
    tract: Any = None
    chunk_bytes: int | None = None
    authors: bool = False
    stats_every: int = 1

    def optimizer(self, sgd: torch.optim.SGD, first: nn.Module) -> torch.optim.Optimizer:
        """``sgd`` as this variant steps it: alone, or wrapped in its TrActOptimizer."""
        if self.tract is None:
            return sgd
        options: dict[str, int] = {}
        if self.chunk_bytes is not None:
            options["chunk_bytes"] = self.chunk_bytes
        if self.stats_every != 1:
            options["stats_every"] = self.stats_every
        return self.tract(sgd, first, lam=LAM, **options)  # type: ignore[no-any-return]


PLAIN = Variant("plain")
TRACT = Variant("tract_optim", TrActOptimizer)
AUTHORS = Variant("torch-tract", authors=True)


def chunked(mib: int) -> Variant:
    """TrActOptimizer with ``chunk_bytes`` of ``mib`` MiB (eager cases only)."""
    return Variant(f"tract_optim, {mib} MiB chunks", TrActOptimizer, chunk_bytes=mib * 2**20)


def amortised(variant: Variant, every: int) -> Variant:
    """``variant`` refreshing its statistics every ``every`` steps (``stats_every``)."""
    return replace(variant, name=f"{variant.name}, stats every {every} steps", stats_every=every)


def takes_stats_every(tract: Any) -> bool:
    """Whether a ``TrActOptimizer`` class has the ``stats_every`` option (older ones do not)."""
    return "stats_every" in inspect.signature(tract).parameters


def baseline(checkout: Path) -> Variant:
    """TrActOptimizer of another checkout (e.g. an older commit, exported with ``git archive``)."""
    return Variant("baseline", load_baseline(checkout))


def load_baseline(checkout: Path) -> Any:
    """``TrActOptimizer`` of the tract_optim package in ``checkout``, imported as the package
    ``tract_optim_baseline`` (so that it does not replace this checkout's)."""
    init = checkout / "tract_optim" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "tract_optim_baseline", init, submodule_search_locations=[str(init.parent)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline: no tract_optim package in {checkout}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.TrActOptimizer


def authors_available() -> bool:
    """Whether the authors' package ``torch_tract`` is importable."""
    try:
        import torch_tract  # noqa: F401
    except ImportError:
        return False
    return True


def choose(
    chunk_mib: int | None, checkout: Path | None, authors: bool, stats_every: int = 1
) -> tuple[list[Variant], list[str]]:
    """The variants in report order, and notes on those left out: plain, tract_optim and (with
    ``stats_every`` > 1) its amortised variant, then baseline and its amortised variant (with
    ``checkout``; the latter only if that checkout has ``stats_every``), the chunked one (with
    ``chunk_mib``) and torch-tract (with ``authors``, if installed)."""
    variants = [PLAIN, TRACT]
    left_out: list[str] = []
    if stats_every > 1:
        variants.append(amortised(TRACT, stats_every))
    if checkout is not None:
        old = baseline(checkout)
        variants.append(old)
        if stats_every > 1 and takes_stats_every(old.tract):
            variants.append(amortised(old, stats_every))
        elif stats_every > 1:
            left_out.append(f"{amortised(old, stats_every).name}: no stats_every in {checkout}")
    if chunk_mib:
        variants.append(chunked(chunk_mib))
    if authors and authors_available():
        variants.append(AUTHORS)
    return variants, left_out
