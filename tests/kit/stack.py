"""Helpers for the training-stack tests: a multi-process runner, comparisons of state dicts and
nested state, and a ``torch.compile`` backend that counts compilations.

``run_workers`` starts N processes joined by a gloo process group on 127.0.0.1 and returns what
each rank's function returned. It never hangs: a rank that fails stops the others at once, and the
whole run is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import datetime
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch._dynamo.backends.registry import lookup_backend

from .reference import relative_error

Worker = Callable[[int, int], Any]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(fn: Worker, rank: int, world: int, port: int, out: str, timeout: float) -> None:
    """One rank: join the group, run ``fn``, save its result (or its traceback) under ``out``."""
    torch.set_num_threads(1)
    path = Path(out)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            result = fn(rank, world)
        finally:
            dist.destroy_process_group()
        torch.save(result, path / f"rank{rank}.pt")
    except BaseException:
        (path / f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1) from None


def run_workers(fn: Worker, world: int = 2, timeout: float = 120.0) -> list[Any]:
    """``[fn(rank, world) for rank in range(world)]``, each in its own gloo process.

    ``fn`` must be importable (a module-level function). Raises ``RuntimeError`` with the failing
    ranks' tracebacks, or ``TimeoutError`` after ``timeout`` seconds; no process outlives the call.
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        port = free_port()
        procs = [
            ctx.Process(target=_entry, args=(fn, rank, world, port, out, timeout), daemon=True)
            for rank in range(world)
        ]
        for proc in procs:
            proc.start()
        try:
            _wait(procs, timeout)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join()
        errors = sorted(Path(out).glob("rank*.err"))
        if errors or any(proc.exitcode != 0 for proc in procs):
            details = "\n".join(f"{e.stem}:\n{e.read_text()}" for e in errors)
            codes = [proc.exitcode for proc in procs]
            raise RuntimeError(f"worker processes failed (exit codes {codes})\n{details}")
        return [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]


def _wait(procs: list[Any], timeout: float) -> None:
    """Return once every process ended or one failed; raise ``TimeoutError`` past ``timeout``."""
    deadline = time.monotonic() + timeout
    while any(proc.is_alive() for proc in procs):
        if any(proc.exitcode not in (None, 0) for proc in procs):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker processes still running after {timeout} s; killed")
        time.sleep(0.05)


def max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def max_relative_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    """Largest ``relative_error`` over the entries of two state dicts with the same keys."""
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    return max(relative_error(got[k], want[k]) for k in want)


def assert_same(a: Any, b: Any) -> None:
    """Deep equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


class CountingBackend:
    """A ``torch.compile`` backend that counts compilations and delegates to ``aot_eager``."""

    def __init__(self) -> None:
        self.compilations = 0
        self._inner = lookup_backend("aot_eager")

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Any:
        self.compilations += 1
        return self._inner(gm, example_inputs)
