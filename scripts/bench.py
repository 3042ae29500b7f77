"""Benchmark one training step without TrAct, with TrActOptimizer and with the authors' package.

Step time: every variant trains its own copy of the same model on the same batch; the variants
run interleaved in one process (rotating their order each round) after a warm-up, so machine
noise hits all of them alike. Reported: the median step time of each variant and, round by
round, its ratio to the plain step of the same round (median over rounds).

Peak memory: each (case, variant) runs one step in a fresh subprocess. CPU: the peak-RSS mark is
reset to the current RSS after setup, and the extra is the peak after the step minus that
baseline (``VmHWM``; ``ru_maxrss`` where /proc is missing); CUDA:
``torch.cuda.max_memory_allocated`` during the step minus the memory allocated before it.

The authors' package (PyPI ``torch-tract``) is optional; its column is left out when it is not
installed. Run ``python scripts/bench.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import tract_optim
from tract_optim import TrActOptimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # a sibling script module

VARIANTS = ("plain", "tract_optim", "torch-tract")
LAM = 0.1


@dataclass(frozen=True)
class Case:
    """A model, the dotted name of its first layer, and an input batch shape."""

    name: str
    build: Callable[[], nn.Module]
    first: str
    shape: tuple[int, ...]
    whole_model: bool = False
    classes: int = 0

    def describe(self) -> str:
        return f"{self.name} (input {'×'.join(map(str, self.shape))})"


def _conv(cin: int, cout: int, k: int, stride: int, pad: int) -> Callable[[], nn.Module]:
    return lambda: nn.Conv2d(cin, cout, k, stride, pad)


def _linear(n: int, m: int) -> Callable[[], nn.Module]:
    return lambda: nn.Linear(n, m)


def layer_cases(quick: bool) -> list[Case]:
    """First layers alone (the model is the layer; backward from a fixed random output gradient)."""
    b = (16, 2, 4, 4) if quick else (128, 32, 64, 64)  # --quick: smaller batches
    return [
        Case("CIFAR stem 3→64 3×3/1", _conv(3, 64, 3, 1, 1), "", (b[0], 3, 32, 32)),
        Case("ImageNet stem 3→64 7×7/2", _conv(3, 64, 7, 2, 3), "", (b[1], 3, 224, 224)),
        Case("ViT-S/16 patch 3→384", _conv(3, 384, 16, 16, 0), "", (b[2], 3, 224, 224)),
        Case("patch 32 (n=3072) 3→384", _conv(3, 384, 32, 32, 0), "", (b[3], 3, 224, 224)),
        Case("Linear 784→256 (r<n)", _linear(784, 256), "", (32, 784)),
    ]


def model_cases() -> list[Case]:
    """Whole models of the paper (cross-entropy loss on random labels)."""
    return [
        Case("CIFAR ResNet-18", models.cifar_resnet18, "conv1", (128, 3, 32, 32), True, 10),
        Case("CIFAR ViT (paper)", models.cifar_vit, "patch_embed", (128, 3, 32, 32), True, 10),
    ]


def memory_cases(quick: bool) -> list[Case]:
    """The ImageNet stem at growing batch sizes (memory only)."""
    batches = (1, 2) if quick else (8, 32, 128)
    return [
        Case(f"ImageNet stem, batch {b}", _conv(3, 64, 7, 2, 3), "", (b, 3, 224, 224))
        for b in batches
    ]


def authors_available() -> bool:
    try:
        import torch_tract  # noqa: F401
    except ImportError:
        return False
    return True


# --- one variant of one case -------------------------------------------------------------------


@dataclass
class Runner:
    """A model, its optimizer and a fixed batch: ``step()`` is one full training step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: Tensor
    target: Tensor  # class labels (a whole model) or the output gradient (a layer alone)
    device: torch.device

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(self.x)
        if not self.target.is_floating_point():
            nn.functional.cross_entropy(out, self.target).backward()
        else:
            # A layer alone: backpropagate a fixed dense output gradient. A loss such as
            # mean(out²) would add passes over the (large) output to every variant's step.
            out.backward(self.target)
        self.optimizer.step()

    def timed_step(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def _get(model: nn.Module, dotted: str) -> nn.Module:
    return model.get_submodule(dotted) if dotted else model


def _set(model: nn.Module, dotted: str, layer: nn.Module) -> nn.Module:
    """Replace the submodule ``dotted`` (the model itself when empty); returns the model."""
    if not dotted:
        return layer
    parent, _, name = dotted.rpartition(".")
    setattr(_get(model, parent), name, layer)
    return model


def make_runner(case: Case, variant: str, base: nn.Module, device: torch.device) -> Runner:
    """A runner of ``variant`` on a copy of ``base`` (same initial weights for every variant)."""
    model = copy.deepcopy(base).to(device).train()
    if variant == "torch-tract":
        from torch_tract import TrAct

        model = _set(model, case.first, TrAct(_get(model, case.first), l=LAM)).to(device)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    optimizer: torch.optim.Optimizer = sgd
    if variant == "tract_optim":
        optimizer = TrActOptimizer(sgd, _get(model, case.first), lam=LAM)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=generator).to(device)
    if case.whole_model:
        target = torch.randint(case.classes, (case.shape[0],), generator=generator)
    else:
        # The output's shape from a meta-device copy: a real forward here would leave freed
        # memory behind that the measured step could reuse.
        shape = copy.deepcopy(base).to("meta")(x.to("meta")).shape
        target = torch.randn(shape, generator=generator) / math.prod(shape)
    return Runner(model, optimizer, x, target.to(device), device)


# --- timing --------------------------------------------------------------------------------------


def time_case(
    case: Case, variants: list[str], device: torch.device, warmup: int, runs: int
) -> dict[str, Any]:
    """Interleaved step times: medians per variant and medians of per-round ratios to plain."""
    torch.manual_seed(0)
    base = case.build()
    runners = {v: make_runner(case, v, base, device) for v in variants}
    for _ in range(warmup):
        for runner in runners.values():
            runner.step()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for round_ in range(runs):
        shift = round_ % len(variants)
        for v in variants[shift:] + variants[:shift]:
            times[v].append(runners[v].timed_step())
    result: dict[str, Any] = {}
    for v in variants:
        ratios = [t / p for t, p in zip(times[v], times["plain"], strict=True)]
        result[v] = {
            "median_ms": 1e3 * statistics.median(times[v]),
            "ratio_to_plain": statistics.median(ratios),
            "times_ms": [round(1e3 * t, 3) for t in times[v]],
        }
    return result


# --- memory (one subprocess per case and variant) ------------------------------------------------


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


def measure_memory_here(case: Case, variant: str, device: torch.device) -> float:
    """Extra peak bytes of one training step of ``variant`` over the memory before it, in MiB."""
    torch.manual_seed(0)
    runner = make_runner(case, variant, case.build(), device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        runner.step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        _reset_peak_rss()
        before = _peak_rss_bytes()
        runner.step()
        peak = _peak_rss_bytes()
    return (peak - before) / 2**20


def measure_memory(case_id: str, variant: str, args: argparse.Namespace) -> float | None:
    """Run ``measure_memory_here`` in a fresh interpreter; None if the child failed."""
    cmd = [sys.executable, __file__, "--_memory", case_id, variant, "--device", args.device]
    cmd += ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    # glibc: a fixed mmap threshold returns every large block to the OS when freed, so RSS
    # follows the live tensors (the dynamic threshold keeps freed blocks of up to 32 MiB).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**16)}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        print(f"memory run {case_id}/{variant} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(json.loads(done.stdout.strip().splitlines()[-1])["mib"])


# --- report ------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    """Machine, versions and thread count, for the JSON."""
    info: dict[str, Any] = {
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tract_optim": tract_optim.__version__,
        "torch_tract": _version("torch-tract"),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    """The step-time table and the memory-vs-batch table."""
    variants: list[str] = report["variants"]
    head = "| case | " + " | ".join(f"{v} ms (× plain)" for v in variants)
    head += " | " + " | ".join(f"{v} +MiB" for v in variants) + " |"
    lines = [head, "|" + " --- |" * (1 + 2 * len(variants))]
    for case in report["cases"]:
        cells = [case["case"]]
        for v in variants:
            t = case["time"][v]
            cells.append(f"{t['median_ms']:.1f} ({t['ratio_to_plain']:.3f}×)")
        cells += [_fmt(case["memory_mib"].get(v), ".1f") for v in variants]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| memory case | " + " | ".join(f"{v} +MiB" for v in variants) + " |"]
    lines.append("|" + " --- |" * (1 + len(variants)))
    for case in report["memory_vs_batch"]:
        cells = [case["case"]] + [_fmt(case["memory_mib"].get(v), ".1f") for v in variants]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------


def all_cases(quick: bool, with_models: bool) -> dict[str, list[Case]]:
    timed = layer_cases(quick) + (model_cases() if with_models else [])
    return {"timed": timed, "memory": memory_cases(quick)}


def _case_by_id(case_id: str, quick: bool) -> Case:
    kind, index = case_id.split(":")
    return all_cases(quick, True)[kind][int(index)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small batches, 3 runs, no models, memory only vs batch (< 1 minute)",
    )
    p.add_argument("--runs", type=int, default=None, help="counted rounds (default 15, quick 3)")
    p.add_argument(
        "--model-runs", type=int, default=None, help="counted rounds of whole models (--runs)"
    )
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-models", action="store_true", help="skip the whole-model cases")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--no-authors", action="store_true", help="skip the torch-tract variant")
    p.add_argument("--only", default="", help="run only cases whose name contains this")
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    p.add_argument("--_memory", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.runs = args.runs or (3 if args.quick else 15)
    args.warmup = args.warmup or (1 if args.quick else 3)
    args.model_runs = args.model_runs or args.runs
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args._memory is not None:
        case_id, variant = args._memory
        mib = measure_memory_here(_case_by_id(case_id, args.quick), variant, device)
        print(json.dumps({"mib": mib}))
        return
    variants = [
        v for v in VARIANTS if v != "torch-tract" or (authors_available() and not args.no_authors)
    ]
    cases = all_cases(args.quick, not (args.quick or args.no_models))
    report: dict[str, Any] = {
        "environment": environment(device),
        "settings": {
            "runs": args.runs,
            "model_runs": args.model_runs,
            "warmup": args.warmup,
            "lam": LAM,
            "quick": args.quick,
        },
        "variants": variants,
        "cases": [],
        "memory_vs_batch": [],
    }
    for kind in ("timed", "memory"):
        for index, case in enumerate(cases[kind]):
            if args.only not in case.name:
                continue
            entry: dict[str, Any] = {"case": case.describe(), "memory_mib": {}}
            if kind == "timed":
                print(f"timing {case.describe()} …", file=sys.stderr, flush=True)
                runs = args.model_runs if case.whole_model else args.runs
                entry["time"] = time_case(case, variants, device, args.warmup, runs)
            if not args.no_memory and (kind == "memory" or not args.quick):
                for v in variants:
                    entry["memory_mib"][v] = measure_memory(f"{kind}:{index}", v, args)
            report["cases" if kind == "timed" else "memory_vs_batch"].append(entry)
    table = markdown(report)
    print(table)
    if args.markdown is not None:
        args.markdown.write_text(table + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
