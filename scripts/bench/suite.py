"""The one-shot GPU suite: first layers and whole ImageNet models, eager and compiled, fp32 and
bf16, in order of priority within a time budget (``--gpu-suite DIR``)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from scripts import models
from scripts.bench.cases import Case, cifar_stem, imagenet_stem, vit_patch
from scripts.bench.report import START, markdown, markdown_row, new_report, progress, write_report
from scripts.bench.runner import release, time_case
from scripts.bench.variants import Variant


@dataclass(frozen=True)
class SuiteItem:
    """One case of the suite and the seconds one variant of it is expected to take on an H200.

    Calibrated on the one earlier H200 run (BENCHMARKS.md), where the start, the eager cases
    (four variants) and the compiled ViT-S/16 (three) took 160 s together and a compiled stem
    50–90 s with three variants; ResNet-50's compilation is a guess (1.4 × ViT-S/16's).
    Compilation dominates the compiled cases: their seconds are per compiled graph.
    """

    section: str
    case: Case
    seconds_per_variant: float

    def seconds(self, variant: Variant) -> float:
        """How long ``variant`` is expected to take: compiled with amortised statistics, twice
        as long (a refresh step and a step between refreshes compile two graphs)."""
        graphs = 2 if self.case.compiled and variant.stats_every > 1 else 1
        return self.seconds_per_variant * graphs

    def variants(self, variants: list[Variant]) -> list[Variant]:
        """Those of ``variants`` that apply: inside torch.compile the statistics are never
        chunked, so a compiled case has no chunk-size variant."""
        return [v for v in variants if not (self.case.compiled and v.chunk_bytes is not None)]


def expected_seconds(items: list[SuiteItem], variants: list[Variant]) -> float:
    """How long every item with every variant that applies is expected to take."""
    return sum(item.seconds(v) for item in items for v in item.variants(variants))


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
    items = [SuiteItem("layers, eager, fp32", c, 1.5) for c in layers]
    items += [SuiteItem("layers, eager, bf16", replace(c, amp=True), 1.5) for c in layers]
    items += [SuiteItem("models, eager, bf16", replace(c, amp=True), 5) for c in whole]
    # Compilation dominates: ViT-S/16 first (it compiles faster than ResNet-50).
    resnet, vit = (replace(c, amp=True, compiled=True) for c in whole)
    items += [SuiteItem("models, compiled, bf16", vit, 35)]
    items += [SuiteItem("models, compiled, bf16", resnet, 50)]
    items += [
        SuiteItem("layers, compiled, bf16", replace(c, amp=True, compiled=True), 20) for c in layers
    ]
    return items


def run_suite(
    args: argparse.Namespace, device: torch.device, variants: list[Variant], left_out: list[str]
) -> None:
    """Run ``suite_items`` within ``args.budget_s`` seconds from the start of the process,
    dropping variants from the end of the list (the authors' first) and then whole cases that
    are not expected to fit, and rewrite the report in ``args.gpu_suite`` after every case (so a
    killed run keeps what it measured)."""
    out: Path = args.gpu_suite
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    names = [v.name for v in variants]
    report = new_report(args, device, names, left_out)
    items = [i for i in suite_items(args.tiny) if args.only in f"{i.section}: {i.case.describe()}"]
    expected = expected_seconds(items, variants)
    report["settings"].update(budget_s=args.budget_s, expected_s=expected)
    progress(f"{len(items)} cases with every variant: about {expected:.0f} s on an H200 "
             f"(budget {args.budget_s:.0f} s)")  # fmt: skip
    for item in items:
        case = item.case
        left = args.budget_s - (time.monotonic() - START)
        chosen = item.variants(variants)
        while len(chosen) > 2 and sum(map(item.seconds, chosen)) > left:
            chosen.pop()
        if sum(map(item.seconds, chosen)) > left:
            report["skipped"].append(f"{case.describe()}: {left:.0f} s of the budget left")
            progress(f"skipping {case.describe()} ({left:.0f} s left)")
        else:
            progress(
                f"{item.section}: {case.describe()} with {', '.join(v.name for v in chosen)} …"
            )
            entry = suite_case(item, chosen, args, device)
            report["cases"].append(entry)
            print(markdown_row(entry, names), flush=True)
        write_report(report, out / "bench.json", out / "bench.md")
    progress("done")
    print(markdown(report), flush=True)


def suite_case(
    item: SuiteItem, variants: list[Variant], args: argparse.Namespace, device: torch.device
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
        release(device)
    return entry
