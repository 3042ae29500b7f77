"""One preconditioning step over every first layer: gather, synchronise, solve, check, write.

Every layer's statistics are summed over data-parallel ranks in one collective (``distributed``),
factorised and applied to the layer's local gradient rows (``solve``) without host reads; then
all layers' ``Status`` bits are read at once (``diagnostics``; nothing is read in capturable mode,
where an unusable layer gets a NaN gradient instead). Only when every layer is usable is any
gradient written, so an error leaves every gradient and statistic as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import diagnostics, distributed, solve
from .amortise import Kept
from .capture import Target
from .diagnostics import Status
from .settings import Settings
from .statistics import Stats


@dataclass
class Job:
    """One layer's work in this step: its gradient and λ, then what the step computes."""

    target: Target
    grad: Tensor
    lam: float
    lam_tensor: Tensor | None = None  # capturable mode: λ on the device, updated in place
    stats: Stats | None = None
    dtype: torch.dtype = torch.float32
    new: Tensor | None = None
    status: Tensor | None = None
    factor: solve.Factor | None = None
    fresh_factor: bool = False  # made this step (not reused between refreshes)


def run(jobs: list[Job], settings: Settings, fresh: list[bool]) -> None:
    """Replace each job's gradient by its TrAct gradient, in place. ``fresh[k]``: whether job k's
    gradient has statistics (a gradient a step already used has none). A layer between two
    statistics refreshes (``amortise``) reuses its kept statistics and factor."""
    refresh = [j.target.collecting for j in jobs]
    stats: list[Stats | None] = [
        j.target.ledger.total() if use and again else None
        for j, use, again in zip(jobs, fresh, refresh, strict=True)
    ]
    picked = [k for k, again in enumerate(refresh) if again]
    if (
        picked
        and settings.sync_statistics
        and distributed.default_group_active(settings.process_group)
    ):
        summed = distributed.all_reduce_stats(
            [stats[k] for k in picked],
            [jobs[k].target.geometry for k in picked],
            [jobs[k].target.precision.dtype(jobs[k].grad.dtype) for k in picked],
            jobs[0].grad.device,
            settings.process_group,
        )
        for k, total in zip(picked, summed, strict=True):
            stats[k] = total
    for job, new, use, again in zip(jobs, stats, fresh, refresh, strict=True):
        kept = job.target.kept
        s = new
        if kept is not None and again:  # a refresh (every step of a capturable one)
            s = None if new is None else kept.refresh(new, settings.stats_decay)
        elif isinstance(kept, Kept):  # between refreshes: the kept statistics, if passes counted
            s = kept.stats if use and job.target.ledger.commits > 0 else None
        job.stats = s
        job.dtype = solve.resolve_dtype(
            settings.solve_dtype,
            s.accuracy if s is not None else job.grad.dtype,
            s is not None and s.rows is not None,
        )
        lam = job.lam_tensor if job.lam_tensor is not None else job.lam
        between = isinstance(kept, Kept) and not again
        reuse = kept.factor(lam, job.dtype) if isinstance(kept, Kept) and between else None
        _solve(job, job.dtype, reuse, invert=between)
    if settings.capturable:
        for job in jobs:
            assert job.new is not None and job.status is not None
            usable = job.status & int(Status.unusable()) == 0
            job.new = torch.where(usable, job.new, torch.nan)
    else:
        _check(jobs)
    for job in jobs:
        assert job.new is not None
        local, _ = distributed.local_rows(job.grad)
        if job.factor is not None or settings.capturable:
            local.copy_(job.new.reshape(local.shape))
        kept = job.target.kept
        if isinstance(kept, Kept) and job.factor is not None and job.fresh_factor:
            kept.keep_factor(job.factor, job.lam, job.dtype)
        job.target.ledger.mark_preconditioned()


def _solve(
    job: Job, dtype: torch.dtype, reuse: solve.Factor | None = None, invert: bool = False
) -> None:
    """This rank's rows of the TrAct gradient (rows, n), its status bits and its factor (``reuse``
    if given, already checked), without host reads. ``invert``: apply a new factor through its
    inverse, as a kept factor is applied between refreshes (so that a resume, which refactors,
    rounds the same way)."""
    local, offset = distributed.local_rows(job.grad)
    flat = local.reshape(local.shape[0], job.target.geometry.n)
    stats = job.stats
    if stats is None:
        job.new, job.factor = flat, None
        job.status = torch.where(flat.ne(0).any(), int(Status.MISSING), 0)
        return
    if reuse is not None:
        factor, status = reuse, torch.zeros((), dtype=torch.int64, device=flat.device)
    else:
        lam = job.lam_tensor if job.lam_tensor is not None else job.lam
        factor = solve.factor(stats, lam, dtype)
        if invert:
            factor = solve.with_inverse(factor)
        eps = max(torch.finfo(dtype).eps, torch.finfo(factor.known).eps) / 2
        status = factor.status + torch.where(
            eps * factor.cond > diagnostics.WARN_ERROR, int(Status.IMPRECISE), 0
        )
        if stats.gram is not None:
            status = status + torch.where(
                job.target.precision.needs_wide(factor.cond), int(Status.WIDE), 0
            )
        if isinstance(stats.count, Tensor):
            missing = (stats.count == 0) & flat.ne(0).any()
            status = status + torch.where(missing, int(Status.MISSING), 0)
    new = solve.apply_rows(factor, flat, offset, job.target.geometry.out_per_group)
    job.new, job.status, job.factor = new.to(job.grad.dtype), status, factor
    job.fresh_factor = reuse is None


def _check(jobs: list[Job]) -> None:
    """Read every layer's status once; redo in float64 a factorisation that failed below it (a
    second read, on that path only); raise, naming the layer, if any stays unusable; then warn
    and let each layer's precision policy see its step."""
    codes = diagnostics.read([j.status for j in jobs if j.status is not None])
    for k, job in enumerate(jobs):
        what = job.target.describe()
        if codes[k] & Status.MISSING:
            raise RuntimeError(diagnostics.missing(what, job.target.ledger.recorded))
        if codes[k] & Status.unusable():
            if codes[k] & Status.NOT_POSITIVE_DEFINITE and job.dtype != torch.float64:
                _solve(job, torch.float64)
                assert job.status is not None
                codes[k] = diagnostics.read([job.status])[0]
            known = job.stats.accuracy if job.stats is not None else torch.float64
            diagnostics.raise_unusable(codes[k], what, job.lam, known)
    for job, code in zip(jobs, codes, strict=True):
        factor = job.factor
        if factor is None or not job.fresh_factor:
            continue
        if code & Status.IMPRECISE:
            diagnostics.warn_imprecise(
                float(factor.cond), job.lam, job.target.describe(), factor.dtype, factor.known
            )
        if job.stats is not None and job.stats.gram is not None:
            job.target.precision.observe(bool(code & Status.WIDE))
