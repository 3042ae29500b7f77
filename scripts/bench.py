"""Benchmark one training step without TrAct, with TrActOptimizer and with the authors' package.

Step time: every variant trains its own copy of the same model on the same batch; the variants
run interleaved in one process (rotating their order each round) after a warm-up, so machine
noise hits all of them alike. Reported: the median step time of each variant and, round by
round, its ratio to the plain step of the same round (median over rounds). On CUDA a step is
timed with CUDA events around it (the stream is idle before it starts, and the step is
synchronised after it, so the time includes any host read inside the step).

Peak memory: on CPU each (case, variant) runs one step in a fresh subprocess; the peak-RSS mark
is reset to the current RSS after setup, and the extra is the peak after the step minus that
baseline (``VmHWM``; ``ru_maxrss`` where /proc is missing). On CUDA, in the same process after
the timed rounds: ``torch.cuda.max_memory_allocated`` during one more step minus the memory
allocated before it.

``--gpu-suite DIR`` is the one-shot GPU preset (first layers at realistic batches, whole
ResNet-50 and ViT-S/16 steps with bf16 autocast, eager and ``torch.compile``) under a time
budget, writing JSON and markdown to DIR after every case. The authors' package (PyPI
``torch-tract``) is optional; its column is left out when it is not installed. Run
``python -m scripts.bench --help`` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
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
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import tract_optim
from scripts import models
from tract_optim import TrActOptimizer

VARIANTS = ("plain", "tract_optim", "torch-tract")
CHUNKED = "tract_optim, {} MiB chunks"  # TrActOptimizer(chunk_bytes=...), eager cases only
LAM = 0.1
#: The TrActOptimizer of each variant that uses one; ``--baseline DIR`` adds "baseline".
OPTIMIZERS: dict[str, Any] = {"tract_optim": TrActOptimizer}
START = time.monotonic()


@dataclass(frozen=True)
class Case:
    """A model, the dotted name of its first layer, an input batch shape and how to run it."""

    name: str
    build: Callable[[], nn.Module]
    first: str
    shape: tuple[int, ...]
    whole_model: bool = False
    classes: int = 0
    amp: bool = False  # forward under bf16 autocast
    compiled: bool = False  # the model wrapped in torch.compile

    def describe(self) -> str:
        tags = [tag for tag, on in (("bf16", self.amp), ("compiled", self.compiled)) if on]
        mode = "".join(f", {tag}" for tag in tags)
        return f"{self.name} (input {'×'.join(map(str, self.shape))}{mode})"


def _conv(cin: int, cout: int, k: int, stride: int, pad: int) -> Callable[[], nn.Module]:
    return lambda: nn.Conv2d(cin, cout, k, stride, pad)


def _linear(n: int, m: int) -> Callable[[], nn.Module]:
    return lambda: nn.Linear(n, m)


def cifar_stem(batch: int) -> Case:
    return Case("CIFAR stem 3→64 3×3/1", _conv(3, 64, 3, 1, 1), "", (batch, 3, 32, 32))


def imagenet_stem(batch: int, size: int = 224) -> Case:
    return Case("ImageNet stem 3→64 7×7/2", _conv(3, 64, 7, 2, 3), "", (batch, 3, size, size))


def vit_patch(batch: int, size: int = 224) -> Case:
    return Case("ViT-S/16 patch 3→384", _conv(3, 384, 16, 16, 0), "", (batch, 3, size, size))


def layer_cases(quick: bool) -> list[Case]:
    """First layers alone (the model is the layer; backward from a fixed random output gradient)."""
    b = (16, 2, 4, 4) if quick else (128, 32, 64, 64)  # --quick: smaller batches
    return [
        cifar_stem(b[0]),
        imagenet_stem(b[1]),
        vit_patch(b[2]),
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
    return [replace(imagenet_stem(b), name=f"ImageNet stem, batch {b}") for b in batches]


def load_baseline(checkout: Path) -> Any:
    """``TrActOptimizer`` of another checkout of tract_optim (e.g. an older commit, exported with
    ``git archive``), imported as the package ``tract_optim_baseline``."""
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
    amp: bool = False

    def step(self) -> None:
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
    case: Case, variant: str, base: nn.Module, device: torch.device, backend: str = "inductor"
) -> Runner:
    """A runner of ``variant`` on a copy of ``base`` (same initial weights for every variant)."""
    model = copy.deepcopy(base).to(device).train()
    if variant == "torch-tract":
        from torch_tract import TrAct

        layer = TrAct(_get(model, case.first), l=LAM)
        model = _set(model, case.first, Fp32(layer) if case.amp else layer).to(device)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    optimizer: torch.optim.Optimizer = sgd
    if variant in OPTIMIZERS:
        optimizer = OPTIMIZERS[variant](sgd, _get(model, case.first), lam=LAM)
    elif variant.startswith("tract_optim, "):
        chunk_bytes = int(variant.split()[1]) * 2**20
        optimizer = TrActOptimizer(sgd, _get(model, case.first), lam=LAM, chunk_bytes=chunk_bytes)
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
        model = torch.compile(model, backend=backend, dynamic=False)
    return Runner(model, optimizer, x, target.to(device), device, case.amp)


# --- timing --------------------------------------------------------------------------------------


def time_case(
    case: Case,
    variants: list[str],
    device: torch.device,
    warmup: int,
    runs: int,
    backend: str = "inductor",
    cuda_memory: bool = False,
) -> dict[str, Any]:
    """Interleaved step times: medians per variant and medians of per-round ratios to plain.

    A variant that fails to build or to run its first step is reported under ``errors`` and
    left out (plain failing fails the case). ``first_step_s``: the first step's time, which
    includes compilation for a compiled case. With ``cuda_memory``, each variant's extra peak
    memory of one more step is measured in this process (``memory_mib``).
    """
    torch.manual_seed(0)
    base = case.build()
    runners: dict[str, Runner] = {}
    errors: dict[str, str] = {}
    first_step: dict[str, float] = {}
    for v in variants:
        try:
            runner = make_runner(case, v, base, device, backend)
            first_step[v] = runner.timed_step()
            runners[v] = runner
        except Exception as error:  # reported, and the other variants go on
            if v == "plain":
                raise
            errors[v] = f"{type(error).__name__}: {error}"[:500]
            _release(device)
    for _ in range(warmup - 1):
        for runner in runners.values():
            runner.step()
    names = list(runners)
    times: dict[str, list[float]] = {v: [] for v in names}
    for round_ in range(runs):
        shift = round_ % len(names)
        for v in names[shift:] + names[:shift]:
            times[v].append(runners[v].timed_step())
    result: dict[str, Any] = {"time": {}, "errors": errors, "memory_mib": {}}
    for v in names:
        ratios = [t / p for t, p in zip(times[v], times["plain"], strict=True)]
        result["time"][v] = {
            "median_ms": 1e3 * statistics.median(times[v]),
            "ratio_to_plain": statistics.median(ratios),
            "times_ms": [round(1e3 * t, 3) for t in times[v]],
            "first_step_s": round(first_step[v], 3),
        }
        if cuda_memory:
            result["memory_mib"][v] = cuda_step_memory(runners[v])
    del runners
    _release(device)
    return result


def _release(device: torch.device) -> None:
    """Free what the previous case left behind, so that cases do not share memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- memory ------------------------------------------------------------------------------------


def cuda_step_memory(runner: Runner) -> float:
    """Extra peak CUDA memory of one step over the memory allocated before it, in MiB."""
    torch.cuda.synchronize(runner.device)
    torch.cuda.reset_peak_memory_stats(runner.device)
    before = torch.cuda.memory_allocated(runner.device)
    runner.step()
    torch.cuda.synchronize(runner.device)
    return (torch.cuda.max_memory_allocated(runner.device) - before) / 2**20


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
        return cuda_step_memory(runner)
    _reset_peak_rss()
    before = _peak_rss_bytes()
    runner.step()
    return (_peak_rss_bytes() - before) / 2**20


def measure_memory(case_id: str, variant: str, args: argparse.Namespace) -> float | None:
    """Run ``measure_memory_here`` in a fresh interpreter; None if the child failed."""
    cmd = [sys.executable, "-m", "scripts.bench", "--_memory", case_id, variant]
    cmd += ["--device", args.device]
    cmd += ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    cmd += ["--baseline", str(args.baseline)] if args.baseline else []
    # glibc: a fixed mmap threshold returns every large block to the OS when freed, so RSS
    # follows the live tensors (the dynamic threshold keeps freed blocks of up to 32 MiB).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**16)}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        print(f"memory run {case_id}/{variant} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(json.loads(done.stdout.strip().splitlines()[-1])["mib"])


# --- the GPU suite -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SuiteItem:
    """One case of the suite and the seconds it is expected to take per variant at most."""

    section: str
    case: Case
    seconds_per_variant: float


def suite_items(tiny: bool) -> list[SuiteItem]:
    """The GPU suite in order of priority: layers (fp32, bf16), whole models eager, whole models
    compiled, layers compiled. ``tiny``: the same code paths at toy sizes, with one block per
    ResNet stage, ResNet widths / 8 and two ViT blocks (a CPU smoke test)."""
    batch, big, size = (2, 2, 32) if tiny else (512, 256, 224)
    layers = [cifar_stem(batch), imagenet_stem(big, size), vit_patch(big, size)]
    mb, depths, width, vit_depth = (2, (1, 1, 1, 1), 8, 2) if tiny else (128, (3, 4, 6, 3), 64, 12)
    whole = [
        Case(
            "ResNet-50",
            lambda: models.ResNet(depths, width=width),
            "conv1",
            (mb, 3, size, size),
            True,
            1000,
        ),
        Case(
            "ViT-S/16",
            lambda: models.ViT(image_size=size, depth=vit_depth),
            "patch_embed",
            (mb, 3, size, size),
            True,
            1000,
        ),
    ]
    items = [SuiteItem("layers, eager, fp32", c, 10) for c in layers]
    items += [SuiteItem("layers, eager, bf16", replace(c, amp=True), 10) for c in layers]
    items += [SuiteItem("models, eager, bf16", replace(c, amp=True), 20) for c in whole]
    # Compilation dominates: ViT-S/16 first (it compiles faster than ResNet-50).
    resnet, vit = (replace(c, amp=True, compiled=True) for c in whole)
    items += [SuiteItem("models, compiled, bf16", vit, 80)]
    items += [SuiteItem("models, compiled, bf16", resnet, 120)]
    items += [
        SuiteItem("layers, compiled, bf16", replace(c, amp=True, compiled=True), 40) for c in layers
    ]
    return items


def run_suite(args: argparse.Namespace, device: torch.device, variants: list[str]) -> None:
    """Run ``suite_items`` within ``args.budget_s`` seconds from the start of the process,
    dropping the authors' variant and then whole cases that would not fit, and rewrite the
    report in ``args.gpu_suite`` after every case (so a killed run keeps what it measured)."""
    out: Path = args.gpu_suite
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    report = new_report(args, device, variants)
    report["settings"]["budget_s"] = args.budget_s
    report["skipped"] = []
    for item in suite_items(args.tiny):
        case = item.case
        left = args.budget_s - (time.monotonic() - START)
        # Inside torch.compile the statistics are never chunked: no chunk-size variant there.
        chosen = [v for v in variants if not (case.compiled and v.startswith("tract_optim, "))]
        while len(chosen) > 2 and item.seconds_per_variant * len(chosen) > left:
            chosen.pop()
        if item.seconds_per_variant * len(chosen) > left:
            report["skipped"].append(f"{case.describe()}: {left:.0f} s of the budget left")
            progress(f"skipping {case.describe()} ({left:.0f} s left)")
        else:
            progress(f"{item.section}: {case.describe()} with {', '.join(chosen)} …")
            entry = suite_case(item, chosen, args, device)
            report["cases"].append(entry)
            print(markdown_row(entry, variants), flush=True)
        write_report(report, out / "bench.json", out / "bench.md")
    progress("done")
    print(markdown(report), flush=True)


def suite_case(
    item: SuiteItem, variants: list[str], args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """The report entry of one case of the suite; a failure is recorded, not raised."""
    case = item.case
    entry: dict[str, Any] = {"case": case.describe(), "section": item.section}
    runs = args.model_runs if case.whole_model else args.runs
    try:
        entry.update(
            time_case(
                case,
                variants,
                device,
                args.warmup,
                runs,
                args.compile_backend,
                cuda_memory=device.type == "cuda",
            )
        )
    except Exception as error:  # a failed case must not lose the others
        entry["failed"] = f"{type(error).__name__}: {error}"[:500]
        _release(device)
    return entry


def progress(message: str) -> None:
    print(f"[{time.monotonic() - START:6.1f} s] {message}", file=sys.stderr, flush=True)


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
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
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


def markdown_row(case: dict[str, Any], variants: list[str]) -> str:
    """One case as a row of the step-time table."""
    cells = [case["case"]]
    for v in variants:
        t = case.get("time", {}).get(v)
        if t is not None:
            cells.append(f"{t['median_ms']:.1f} ({t['ratio_to_plain']:.3f}×)")
        else:
            cells.append("failed" if v in case.get("errors", {}) or "failed" in case else "—")
    cells += [_fmt(case["memory_mib"].get(v), ".1f") for v in variants] if "time" in case else []
    cells += ["—"] * (1 + 2 * len(variants) - len(cells))
    return "| " + " | ".join(cells) + " |"


def markdown(report: dict[str, Any]) -> str:
    """The step-time table, the memory-vs-batch table and notes on skipped or failed runs."""
    variants: list[str] = report["variants"]
    head = "| case | " + " | ".join(f"{v} ms (× plain)" for v in variants)
    head += " | " + " | ".join(f"{v} +MiB" for v in variants) + " |"
    lines = [head, "|" + " --- |" * (1 + 2 * len(variants))]
    lines += [markdown_row(case, variants) for case in report["cases"]]
    if report["memory_vs_batch"]:
        lines += ["", "| memory case | " + " | ".join(f"{v} +MiB" for v in variants) + " |"]
        lines.append("|" + " --- |" * (1 + len(variants)))
        for case in report["memory_vs_batch"]:
            cells = [case["case"]] + [_fmt(case["memory_mib"].get(v), ".1f") for v in variants]
            lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- skipped: {s}" for s in report.get("skipped", [])]
    for case in report["cases"]:
        if "failed" in case:
            notes.append(f"- {case['case']} failed: {case['failed']}")
        notes += [f"- {case['case']}, {v}: {e}" for v, e in case.get("errors", {}).items()]
    return "\n".join(lines + (["", *notes] if notes else []))


def new_report(
    args: argparse.Namespace, device: torch.device, variants: list[str]
) -> dict[str, Any]:
    return {
        "environment": environment(device),
        "settings": {
            "runs": args.runs,
            "model_runs": args.model_runs,
            "warmup": args.warmup,
            "lam": LAM,
            "quick": args.quick,
            "compile_backend": args.compile_backend,
            "baseline": None if args.baseline is None else str(args.baseline),
        },
        "variants": variants,
        "cases": [],
        "memory_vs_batch": [],
    }


def write_report(report: dict[str, Any], json_path: Path | None, md_path: Path | None) -> None:
    if md_path is not None:
        md_path.write_text(markdown(report) + "\n")
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=1) + "\n")


# --- main --------------------------------------------------------------------------------------


def all_cases(quick: bool, with_models: bool) -> dict[str, list[Case]]:
    timed = layer_cases(quick) + (model_cases() if with_models else [])
    return {"timed": timed, "memory": memory_cases(quick)}


def _case_by_id(case_id: str, quick: bool) -> Case:
    kind, index = case_id.split(":")
    return all_cases(quick, True)[kind][int(index)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu; suite: cuda)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small batches, 3 runs, no models, memory only vs batch (< 1 minute)",
    )
    p.add_argument(
        "--gpu-suite",
        type=Path,
        default=None,
        metavar="DIR",
        help="the one-shot GPU preset: layers at batch 256, ResNet-50 and ViT-S/16 at batch 128 "
        "with bf16 autocast, eager and compiled, within --budget-s; writes DIR/bench.json and "
        "DIR/bench.md after every case",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=360.0,
        help="suite: seconds from the start within which to finish (default 360)",
    )
    p.add_argument("--tiny", action="store_true", help="suite: toy sizes (a CPU smoke test)")
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the compiled cases (default inductor)",
    )
    p.add_argument(
        "--runs", type=int, default=None, help="counted rounds (default 15, quick 3, suite 30)"
    )
    p.add_argument(
        "--model-runs",
        type=int,
        default=None,
        help="counted rounds of whole models (default --runs, suite 20)",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="warm-up rounds (default 3, quick 1, suite 5)"
    )
    p.add_argument(
        "--chunk-mib",
        type=int,
        default=None,
        help="add a tract_optim variant with chunk_bytes of this many MiB to the eager cases "
        "(the default is 16 MiB on CPU and 256 MiB on CUDA devices)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="DIR",
        help="add a 'baseline' variant: TrActOptimizer of the checkout in DIR (before/after "
        "ratios side by side in one run)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-models", action="store_true", help="skip the whole-model cases")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--no-authors", action="store_true", help="skip the torch-tract variant")
    p.add_argument("--only", default="", help="run only cases whose name contains this")
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    p.add_argument("--_memory", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    suite = args.gpu_suite is not None
    args.device = args.device or ("cuda" if suite else "cpu")
    args.runs = args.runs or (3 if args.quick else 30 if suite else 15)
    args.warmup = args.warmup or (1 if args.quick else 5 if suite else 3)
    args.model_runs = args.model_runs or (20 if suite else args.runs)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.baseline is not None:
        OPTIMIZERS["baseline"] = load_baseline(args.baseline)
    if args._memory is not None:
        case_id, variant = args._memory
        mib = measure_memory_here(_case_by_id(case_id, args.quick), variant, device)
        print(json.dumps({"mib": mib}))
        return
    variants = [
        v for v in VARIANTS if v != "torch-tract" or (authors_available() and not args.no_authors)
    ]
    if args.chunk_mib:
        variants.insert(2, CHUNKED.format(args.chunk_mib))
    if args.baseline is not None:
        variants.insert(2, "baseline")
    if args.gpu_suite is not None:
        run_suite(args, device, variants)
        return
    cases = all_cases(args.quick, not (args.quick or args.no_models))
    report = new_report(args, device, variants)
    for kind in ("timed", "memory"):
        for index, case in enumerate(cases[kind]):
            if args.only not in case.name:
                continue
            entry: dict[str, Any] = {"case": case.describe(), "memory_mib": {}}
            if kind == "timed":
                progress(f"timing {case.describe()} …")
                runs = args.model_runs if case.whole_model else args.runs
                entry.update(time_case(case, variants, device, args.warmup, runs))
            if not args.no_memory and (kind == "memory" or not args.quick):
                for v in variants:
                    entry["memory_mib"][v] = measure_memory(f"{kind}:{index}", v, args)
            report["cases" if kind == "timed" else "memory_vs_batch"].append(entry)
    print(markdown(report))
    write_report(report, args.json, args.markdown)


if __name__ == "__main__":
    main()
