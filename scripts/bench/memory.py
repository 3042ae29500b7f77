"""Peak memory of one training step, measured in a fresh interpreter per (case, variant).

A fresh process, so that no case or variant reuses memory that another one freed. On CPU the
peak-RSS mark is lowered to the current RSS after setup and read again after the step; on CUDA
it is ``Runner.cuda_step_memory``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

from scripts.bench.cases import Case
from scripts.bench.runner import make_runner
from scripts.bench.variants import Variant


def _peak_rss_bytes() -> int:
    """This process's peak RSS. On Linux ``VmHWM`` of this address space: ``ru_maxrss`` is also
    raised by the parent's RSS, inherited through fork/exec, which would hide the step."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_peak_rss() -> None:
    """Lower the peak-RSS mark to the current RSS (Linux ≥ 4.0), so that imports and setup
    that peaked higher than the step do not hide it; elsewhere the mark stays as it is."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def measure_memory_here(case: Case, variant: Variant, device: torch.device) -> float:
    """Extra peak bytes of one training step of ``variant`` over the memory before it, in MiB
    (the first step: a statistics refresh, also for an amortised variant)."""
    torch.manual_seed(0)
    runner = make_runner(case, variant, case.build(), device)
    if device.type == "cuda":
        return runner.cuda_step_memory()
    _reset_peak_rss()
    before = _peak_rss_bytes()
    runner.step()
    return (_peak_rss_bytes() - before) / 2**20


def measure_memory(case_id: str, variant: str, args: argparse.Namespace) -> float | None:
    """``measure_memory_here`` in a fresh ``python -m scripts.bench --_memory CASE VARIANT``
    with the options that define the case and the variant; None if the child failed."""
    cmd = [sys.executable, "-m", "scripts.bench", "--_memory", case_id, variant]
    cmd += ["--device", args.device, "--threads", str(args.threads)]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--baseline", str(args.baseline)] if args.baseline else []
    cmd += ["--chunk-mib", str(args.chunk_mib)] if args.chunk_mib else []
    cmd += ["--stats-every", str(args.stats_every)]
    # glibc: a fixed mmap threshold returns every large block to the OS when freed, so RSS
    # follows the live tensors (the dynamic threshold keeps freed blocks of up to 32 MiB).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**16)}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        print(f"memory run {case_id}/{variant} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(json.loads(done.stdout.strip().splitlines()[-1])["mib"])
