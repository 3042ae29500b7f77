"""The report: environment and settings, JSON, the markdown tables, and progress lines."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import tract_optim
from scripts.bench.variants import LAM

#: When the process started: progress lines and the GPU suite's time budget count from here.
START = time.monotonic()


def progress(message: str) -> None:
    """A line on stderr with the seconds since the start."""
    print(f"[{time.monotonic() - START:6.1f} s] {message}", file=sys.stderr, flush=True)


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
    if any("stats_every" in t for c in report["cases"] for t in c.get("time", {}).values()):
        notes.append(
            "- stats every K steps: the step time averaged over a refresh cycle, (refresh + "
            "(K − 1) · between) / K, from the medians of its refresh rounds and of the others"
        )
    for case in report["cases"]:
        if "failed" in case:
            notes.append(f"- {case['case']} failed: {case['failed']}")
        notes += [f"- {case['case']}, {v}: {e}" for v, e in case.get("errors", {}).items()]
    return "\n".join(lines + (["", *notes] if notes else []))


def new_report(
    args: argparse.Namespace, device: torch.device, variants: list[str], skipped: list[str]
) -> dict[str, Any]:
    """An empty report: environment, settings, the variants' names (the columns) and notes on
    what is skipped."""
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
            "stats_every": args.stats_every,
        },
        "variants": variants,
        "skipped": list(skipped),
        "cases": [],
        "memory_vs_batch": [],
    }


def write_report(report: dict[str, Any], json_path: Path | None, md_path: Path | None) -> None:
    """Write the markdown tables and the JSON, each where a path is given."""
    if md_path is not None:
        md_path.write_text(markdown(report) + "\n")
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=1) + "\n")
