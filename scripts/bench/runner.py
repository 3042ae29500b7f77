"""One variant of one case as a runnable training step, and the interleaved timing of a case."""

from __future__ import annotations

import copy
import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from scripts.bench.cases import Case
from scripts.bench.variants import LAM, PLAIN, Variant


@dataclass
class Runner:
    """A model, its optimizer and a fixed batch: ``step()`` is one full training step.

    ``stats_every``: the optimizer's statistics refresh interval; ``steps`` counts the steps
    taken, so a step is a refresh when ``steps % stats_every == 0`` before it (the first one is).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: Tensor
    target: Tensor  # class labels (a whole model) or the output gradient (a layer alone)
    device: torch.device
    amp: bool = False
    stats_every: int = 1
    steps: int = 0

    @property
    def refreshes_next(self) -> bool:
        """Whether the next step refreshes the statistics (always, for exact TrAct)."""
        return self.steps % self.stats_every == 0

    def align(self) -> None:
        """Take untimed steps until the next one is a refresh."""
        while not self.refreshes_next:
            self.step()

    def step(self) -> None:
        self.steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(self.x)
            if not self.target.is_floating_point():
                loss = nn.functional.cross_entropy(out, self.target)
        if not self.target.is_floating_point():
            loss.backward()
        else:
            # A layer alone: backpropagate a fixed dense output gradient. A loss such as
            # mean(out²) would add passes over the (large) output to every variant's step.
            if self.target.dtype != out.dtype:  # bf16 output under autocast: convert once
                self.target = self.target.to(out.dtype)
            out.backward(self.target)
        self.optimizer.step()

    def timed_step(self) -> float:
        """Seconds of one step: CUDA events on a GPU (idle stream before, synchronised after)."""
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            self.step()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / 1e3
        start_s = time.perf_counter()
        self.step()
        return time.perf_counter() - start_s

    def cuda_step_memory(self) -> float:
        """Extra peak CUDA memory of one step over the memory allocated before it, in MiB."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.step()
        torch.cuda.synchronize(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - before) / 2**20


def _get(model: nn.Module, dotted: str) -> nn.Module:
    return model.get_submodule(dotted) if dotted else model


def _set(model: nn.Module, dotted: str, layer: nn.Module) -> nn.Module:
    """Replace the submodule ``dotted`` (the model itself when empty); returns the model."""
    if not dotted:
        return layer
    parent, _, name = dotted.rpartition(".")
    setattr(_get(model, parent), name, layer)
    return model


class Fp32(nn.Module):
    """A layer run in fp32 inside an autocast region. The authors' layer needs it: its autograd
    Function is not autocast-aware (its backward multiplies bf16 by fp32 tensors and fails)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.layer(x.float())  # type: ignore[no-any-return]


def make_runner(
    case: Case, variant: Variant, base: nn.Module, device: torch.device, backend: str = "inductor"
) -> Runner:
    """A runner of ``variant`` on a copy of ``base`` (same initial weights for every variant)."""
    model = copy.deepcopy(base).to(device).train()
    if variant.authors:
        from torch_tract import TrAct

        layer = TrAct(_get(model, case.first), l=LAM)
        model = _set(model, case.first, Fp32(layer) if case.amp else layer).to(device)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    optimizer = variant.optimizer(sgd, _get(model, case.first))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=generator).to(device)
    if case.whole_model:
        target = torch.randint(case.classes, (case.shape[0],), generator=generator)
    else:
        # The output's shape from a meta-device copy: a real forward here would leave freed
        # memory behind that the measured step could reuse.
        shape = copy.deepcopy(base).to("meta")(x.to("meta")).shape
        target = torch.randn(shape, generator=generator) / math.prod(shape)
    if case.compiled:
        # Dynamo does not guard on module hooks by default: the variants' models share their
        # classes' code, so the first variant compiled (plain, without TrAct's hook) would
        # serve them all.
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        # Each variant compiles the shared code once (an amortised one twice: refresh and
        # between): with every variant on, more than Dynamo's default limit of 8 per code object.
        torch._dynamo.config.recompile_limit = 32
        model = torch.compile(model, backend=backend, dynamic=False)
    return Runner(model, optimizer, x, target.to(device), device, case.amp, variant.stats_every)


def time_case(
    case: Case,
    variants: list[Variant],
    device: torch.device,
    warmup: int,
    runs: int,
    backend: str = "inductor",
    cuda_memory: bool = False,
) -> dict[str, Any]:
    """Interleaved step times: medians per variant and medians of per-round ratios to plain
    (for an amortised variant, the mean over a refresh cycle: ``cycle_summary``).

    A variant that fails to build or to run its first step is reported under ``errors`` and
    left out (plain failing fails the case). ``first_step_s``: the first step's time, which
    includes compilation for a compiled case. After the warm-up every amortised variant is
    aligned so that its first timed round is a refresh (its later rounds cycle through the
    steps between refreshes). With ``cuda_memory``, each variant's extra peak memory of one more
    step (a refresh) is measured in this process (``memory_mib``).
    """
    torch.manual_seed(0)
    if case.compiled:
        torch._dynamo.reset()  # the previous cases' graphs: nothing shared, nothing to guard
    base = case.build()
    runners: dict[str, Runner] = {}
    errors: dict[str, str] = {}
    first_step: dict[str, float] = {}
    for variant in variants:
        try:
            runner = make_runner(case, variant, base, device, backend)
            first_step[variant.name] = runner.timed_step()
            runners[variant.name] = runner
        except Exception as error:  # reported, and the other variants go on
            if variant == PLAIN:
                raise
            errors[variant.name] = f"{type(error).__name__}: {error}"[:500]
            release(device)
    for _ in range(warmup - 1):
        for runner in runners.values():
            runner.step()
    for runner in runners.values():
        runner.align()
    names = list(runners)
    times: dict[str, list[float]] = {v: [] for v in names}
    refresh: dict[str, list[bool]] = {v: [] for v in names}
    for round_ in range(runs):
        shift = round_ % len(names)
        for v in names[shift:] + names[:shift]:
            refresh[v].append(runners[v].refreshes_next)
            times[v].append(runners[v].timed_step())
    result: dict[str, Any] = {"time": {}, "errors": errors, "memory_mib": {}}
    for v in names:
        ratios = [t / p for t, p in zip(times[v], times[PLAIN.name], strict=True)]
        every = runners[v].stats_every
        extra: dict[str, Any] = {}
        if every == 1:
            step, ratio = statistics.median(times[v]), statistics.median(ratios)
        else:
            cycle = cycle_summary(times[v], refresh[v], every)
            step, ratio = cycle["cycle"], cycle_summary(ratios, refresh[v], every)["cycle"]
            extra = {
                "refresh_ms": 1e3 * cycle["refresh"],
                "between_ms": 1e3 * cycle["between"],
                "stats_every": every,
                "refresh": refresh[v],
            }
        result["time"][v] = {
            "median_ms": 1e3 * step,
            "ratio_to_plain": ratio,
            "times_ms": [round(1e3 * t, 6) for t in times[v]],  # ns: ratios recompute
            "first_step_s": round(first_step[v], 3),
            **extra,
        }
        if cuda_memory:
            runners[v].align()  # the peak is a refresh step's
            result["memory_mib"][v] = runners[v].cuda_step_memory()
    del runners
    release(device)
    return result


def cycle_summary(values: list[float], refresh: list[bool], every: int) -> dict[str, float]:
    """The median of the refresh rounds' ``values``, that of the rounds between refreshes, and
    the mean over a refresh cycle of ``every`` steps, (refresh + (every − 1) · between) / every:
    an amortised optimizer's fair step time (or ratio), whatever share of refreshes the rounds
    happened to hold. Needs a round of each kind."""
    on = [v for v, r in zip(values, refresh, strict=True) if r]
    off = [v for v, r in zip(values, refresh, strict=True) if not r]
    if not on or not off:
        raise ValueError("an amortised variant needs a refresh round and a round between refreshes")
    fresh, between = statistics.median(on), statistics.median(off)
    return {"refresh": fresh, "between": between, "cycle": (fresh + (every - 1) * between) / every}


def release(device: torch.device) -> None:
    """Free what the previous case left behind, so that cases do not share memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
