"""The command line of ``python -m scripts.bench``: the CPU tables, or the GPU suite."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

import scripts.bench
from scripts.bench.cases import all_cases, case_by_id
from scripts.bench.memory import measure_memory, measure_memory_here
from scripts.bench.report import markdown, new_report, progress, write_report
from scripts.bench.runner import time_case
from scripts.bench.suite import run_suite
from scripts.bench.variants import choose


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, with the defaults that depend on --quick and --gpu-suite filled in."""
    doc = scripts.bench.__doc__ or ""
    p = argparse.ArgumentParser(prog="python -m scripts.bench", description=doc.split("\n")[0])
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
        "--stats-every",
        type=int,
        default=16,
        metavar="K",
        help="add TrActOptimizer variants with stats_every=K (amortised statistics; timed over a "
        "refresh cycle, see above; default 16, 0 or 1: none)",
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
    p.add_argument(
        "--only",
        default="",
        help="run only cases whose name contains this (suite: whose 'section: case', e.g. "
        "'models, compiled' or 'ResNet-50')",
    )
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    p.add_argument("--_memory", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    suite = args.gpu_suite is not None
    args.device = args.device or ("cuda" if suite else "cpu")
    args.runs = args.runs or (3 if args.quick else 30 if suite else 15)
    args.warmup = args.warmup or (1 if args.quick else 5 if suite else 3)
    args.model_runs = args.model_runs or (20 if suite else args.runs)
    if args.stats_every < 0:
        p.error(f"--stats-every must be >= 0, got {args.stats_every}")
    if args.stats_every > 1 and min(args.runs, args.model_runs) < 2:
        p.error("--stats-every > 1 needs --runs and --model-runs >= 2 (a refresh round and one "
                "between refreshes)")  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the GPU suite, the CPU tables, or (``--_memory``) one memory measurement."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants, left_out = choose(
        args.chunk_mib, args.baseline, not args.no_authors, max(args.stats_every, 1)
    )
    if args._memory is not None:
        case_id, name = args._memory
        variant = next(v for v in variants if v.name == name)
        mib = measure_memory_here(case_by_id(case_id, args.quick), variant, device)
        print(json.dumps({"mib": mib}))
        return
    if args.gpu_suite is not None:
        run_suite(args, device, variants, left_out)
        return
    cases = all_cases(args.quick, not (args.quick or args.no_models))
    report = new_report(args, device, [v.name for v in variants], left_out)
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
                    entry["memory_mib"][v.name] = measure_memory(f"{kind}:{index}", v.name, args)
            report["cases" if kind == "timed" else "memory_vs_batch"].append(entry)
    print(markdown(report))
    write_report(report, args.json, args.markdown)


if __name__ == "__main__":
    main()
