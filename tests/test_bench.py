"""Smoke tests of ``python -m scripts.bench``: ``--quick`` (CPU) and the GPU suite's logic on CPU
at toy sizes (``--gpu-suite --tiny``): they run, and their reports are complete and consistent.

No timing assertions: only the structure of the reports and relations that hold for any timings
(recomputed here from the raw per-round times the report also records).
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from scripts.bench import runner
from scripts.bench.__main__ import parse_args
from scripts.bench.cases import cifar_stem
from scripts.bench.suite import SuiteItem
from scripts.bench.variants import LAM, PLAIN, TRACT, amortised, choose, chunked

ROOT = Path(__file__).resolve().parents[1]
CHUNKED = "tract_optim, 1 MiB chunks"
EVERY = "tract_optim, stats every 16 steps"  # the default --stats-every
Report = tuple[dict[str, Any], str]  # the JSON report and the markdown tables


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m scripts.bench ARGS`` from the root: this checkout's scripts and tract_optim."""
    cmd = [sys.executable, "-m", "scripts.bench", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    out = tmp_path_factory.mktemp("bench")
    json_path, md_path = out / "bench.json", out / "bench.md"
    args = ["--quick", "--threads", "1", "--json", str(json_path), "--markdown", str(md_path)]
    # This checkout as its own baseline; the memory subprocesses rebuild both extra variants.
    run_bench(*args, "--baseline", str(ROOT), "--chunk-mib", "1")
    return json.loads(json_path.read_text()), md_path.read_text()


def test_report_has_every_case_and_variant(quick_report: Report) -> None:
    report, _ = quick_report
    variants = report["variants"]
    baseline_every = "baseline, stats every 16 steps"
    assert variants[:6] == ["plain", "tract_optim", EVERY, "baseline", baseline_every, CHUNKED]
    assert report["settings"]["baseline"] == str(ROOT)
    names = [c["case"] for c in report["cases"]]
    expected = ["CIFAR stem", "ImageNet stem", "ViT-S/16 patch", "patch 32", "Linear 784→256"]
    assert len(names) == len(expected)
    assert all(n.startswith(e) for n, e in zip(names, expected, strict=True))
    for case in report["cases"]:
        assert set(case["time"]) == set(variants)
    assert len(report["memory_vs_batch"]) == 2
    for case in report["memory_vs_batch"]:
        assert set(case["memory_mib"]) == set(variants)
        assert all(math.isfinite(v) for v in case["memory_mib"].values())


def _cycle(values: list[float], refresh: list[bool], every: int) -> float:
    """The mean over a refresh cycle of the refresh rounds' and the other rounds' medians."""
    on = statistics.median(v for v, r in zip(values, refresh, strict=True) if r)
    off = statistics.median(v for v, r in zip(values, refresh, strict=True) if not r)
    return (on + (every - 1) * off) / every


def test_medians_and_ratios_follow_from_the_raw_times(
    quick_report: Report,
) -> None:
    """Exact variants: medians over rounds. Amortised ones (stats every 16 steps): the first
    timed round is a refresh and the others lie between refreshes (3 rounds < 16), and the step
    time and ratio are the means over a refresh cycle of the two kinds' medians."""
    report, _ = quick_report
    runs = report["settings"]["runs"]
    for case in report["cases"]:
        plain = case["time"]["plain"]["times_ms"]
        for result in case["time"].values():
            times = result["times_ms"]
            assert len(times) == runs and all(t > 0 for t in times)
            ratios = [t / p for t, p in zip(times, plain, strict=True)]
            if "stats_every" in result:
                every, refresh = result["stats_every"], result["refresh"]
                assert every == 16 and refresh == [True] + [False] * (runs - 1)
                assert result["refresh_ms"] == pytest.approx(times[0], rel=1e-3)
                step, ratio = _cycle(times, refresh, every), _cycle(ratios, refresh, every)
            else:
                step, ratio = statistics.median(times), statistics.median(ratios)
            assert result["median_ms"] == pytest.approx(step, rel=1e-3)
            assert result["ratio_to_plain"] == pytest.approx(ratio, rel=1e-3)
        assert case["time"]["plain"]["ratio_to_plain"] == 1.0


def test_environment_and_markdown(quick_report: Report) -> None:
    report, table = quick_report
    env = report["environment"]
    for key in ("machine", "processor", "python", "torch", "tract_optim", "device"):
        assert env[key]
    assert env["torch_threads"] == 1
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    # A header plus one row per case, in each of the two tables.
    assert len(rows) == 2 + len(report["cases"]) + len(report["memory_vs_batch"])
    for case in report["cases"] + report["memory_vs_batch"]:
        assert any(row.startswith(f"| {case['case']} |") for row in rows)


def test_a_variant_carries_its_chunk_size() -> None:
    """The chunk size is a field of the variant, passed to its TrActOptimizer with λ (never
    parsed back out of the column name); the columns come in report order."""
    calls: list[dict[str, Any]] = []

    def tract(sgd: torch.optim.SGD, first: nn.Module, **kwargs: Any) -> torch.optim.SGD:
        calls.append(kwargs)
        return sgd

    layer = nn.Linear(2, 2)
    sgd = torch.optim.SGD(layer.parameters(), lr=0.1)
    three = chunked(3)
    assert three.name == "tract_optim, 3 MiB chunks" and three.chunk_bytes == 3 * 2**20
    assert replace(three, tract=tract).optimizer(sgd, layer) is sgd
    every = amortised(replace(TRACT, tract=tract), 4)
    assert every.name == "tract_optim, stats every 4 steps" and every.optimizer(sgd, layer) is sgd
    assert calls == [{"lam": LAM, "chunk_bytes": 3 * 2**20}, {"lam": LAM, "stats_every": 4}]
    assert PLAIN.optimizer(sgd, layer) is sgd
    chosen, left_out = choose(3, None, authors=False)
    assert [v.name for v in chosen] == ["plain", "tract_optim", "tract_optim, 3 MiB chunks"]
    assert left_out == []
    chosen, _ = choose(None, None, False, 8)
    assert [(v.name, v.stats_every) for v in chosen] == [
        ("plain", 1), ("tract_optim", 1), ("tract_optim, stats every 8 steps", 8)
    ]  # fmt: skip


def test_a_baseline_without_stats_every_has_no_amortised_variant(tmp_path: Path) -> None:
    """--baseline with an older checkout whose TrActOptimizer has no ``stats_every``: its exact
    variant is kept, its amortised one is left out with a note (the report's "skipped")."""
    package = tmp_path / "tract_optim"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from tract_optim import TrActOptimizer as _Current\n\n\n"
        "class TrActOptimizer(_Current):\n"
        "    def __init__(self, optimizer, first_layer, lam=0.1, *, chunk_bytes=None):\n"
        "        super().__init__(optimizer, first_layer, lam, chunk_bytes=chunk_bytes)\n"
    )
    try:
        chosen, left_out = choose(None, tmp_path, False, 16)
    finally:
        sys.modules.pop("tract_optim_baseline", None)
    assert [v.name for v in chosen] == ["plain", "tract_optim", EVERY, "baseline"]
    assert left_out == [f"baseline, stats every 16 steps: no stats_every in {tmp_path}"]


def test_the_runner_counts_steps_as_the_optimizer_does() -> None:
    """An amortised variant's runner knows which step refreshes: its count is the step count the
    optimizer keeps (refreshing when it is a multiple of stats_every, the first step included),
    ``align`` advances to the next refresh, and a run needs a refresh and a between round."""
    case = cifar_stem(2)
    variant = amortised(TRACT, 4)
    run = runner.make_runner(case, variant, case.build(), torch.device("cpu"))
    assert run.stats_every == 4 and run.refreshes_next
    for steps in (1, 2):
        run.step()
        assert run.steps == steps == run.optimizer.preconditioner.state_dict()["step"]
    assert not run.refreshes_next
    run.align()
    assert run.steps == 4 == run.optimizer.preconditioner.state_dict()["step"]
    assert run.refreshes_next
    got = runner.cycle_summary([8.0, 1.0, 2.0, 9.0], [True, False, False, True], 4)
    assert got == {"refresh": 8.5, "between": 1.5, "cycle": (8.5 + 3 * 1.5) / 4}
    with pytest.raises(ValueError, match="a refresh round and a round between"):
        runner.cycle_summary([1.0], [True], 4)
    with pytest.raises(SystemExit):
        parse_args(["--runs", "1"])
    assert parse_args(["--runs", "1", "--stats-every", "0"]).runs == 1


def test_a_compiled_amortised_variant_counts_twice_in_the_suite_budget() -> None:
    """Two graphs (refresh and between) to compile: twice a variant's seconds, compiled only."""
    case = cifar_stem(2)
    every = amortised(TRACT, 16)
    assert SuiteItem("eager", case, 10).seconds(every) == 10
    compiled = SuiteItem("compiled", replace(case, compiled=True), 40)
    assert compiled.seconds(every) == 80 and compiled.seconds(TRACT) == 40


# --- the GPU suite, on CPU at toy sizes ----------------------------------------------------------

SECTIONS = (
    ["layers, eager, fp32"] * 3
    + ["layers, eager, bf16"] * 3
    + ["models, eager, bf16"] * 2
    + ["models, compiled, bf16"] * 2
    + ["layers, compiled, bf16"] * 3
)


@pytest.fixture(scope="module")
def suite_report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    """The whole suite: Dynamo's ``eager`` backend (compilation without Inductor's minutes of
    C++), one round each, and a 1 MiB chunk-size variant."""
    out = tmp_path_factory.mktemp("suite")
    args = ["--gpu-suite", str(out), "--device", "cpu", "--tiny", "--compile-backend", "eager"]
    args += ["--runs", "2", "--model-runs", "2", "--warmup", "1", "--threads", "1"]
    done = run_bench(*args, "--chunk-mib", "1", "--budget-s", "3600")
    # Progress is printed as it goes: a line per case on stderr, a table row per case on stdout.
    assert done.stderr.count(" …") == len(SECTIONS)
    assert done.stdout.count("(1.000×)") >= len(SECTIONS)
    assert "recompile_limit" not in done.stderr  # every compiled variant stays compiled
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_suite_runs_every_case_in_priority_order(suite_report: Report) -> None:
    report, _ = suite_report
    cases = report["cases"]
    assert [c["section"] for c in cases] == SECTIONS
    names = [c["case"] for c in cases]
    assert names[8].startswith("ViT-S/16 (") and names[9].startswith("ResNet-50 (")
    assert all(", bf16" in n for n in names[3:]) and all(", compiled" in n for n in names[8:])
    assert report["skipped"] == [] and report["environment"]["device"] == "cpu"


def test_suite_times_every_variant_with_tract_optim_never_failing(suite_report: Report) -> None:
    """Compiled cases leave the chunk-size variant out (nothing is chunked under compile) and
    record the first step, which includes compilation; the amortised variant runs everywhere,
    compiled too, a refresh round then one between; the authors' variant may only fail."""
    report, _ = suite_report
    for case in report["cases"]:
        assert "failed" not in case
        expected = {"plain", "tract_optim", EVERY}
        expected |= set() if ", compiled" in case["case"] else {CHUNKED}
        assert expected <= set(case["time"]) <= set(report["variants"])
        assert set(case["errors"]) <= {"torch-tract"}
        for result in case["time"].values():
            assert result["first_step_s"] > 0 and len(result["times_ms"]) == 2
        assert case["time"][EVERY]["refresh"] == [True, False]
    assert report["variants"][:4] == ["plain", "tract_optim", EVERY, CHUNKED]


def test_suite_markdown_has_a_row_per_case(suite_report: Report) -> None:
    report, table = suite_report
    for case in report["cases"]:
        assert sum(line.startswith(f"| {case['case']} |") for line in table.splitlines()) == 1


def test_suite_skips_what_does_not_fit_the_budget(tmp_path: Path) -> None:
    """No time left: every case is skipped, and the report says which and why; ``--only``
    picks cases by section and name; the expected time of what is picked is recorded."""
    run_bench("--gpu-suite", str(tmp_path), "--device", "cpu", "--tiny", "--budget-s", "0")
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["cases"] == [] and len(report["skipped"]) == len(SECTIONS)
    table = (tmp_path / "bench.md").read_text()
    assert table.count("- skipped: ") == len(SECTIONS)
    everything = report["settings"]["expected_s"]
    args = ["--gpu-suite", str(tmp_path), "--device", "cpu", "--tiny", "--budget-s", "0"]
    run_bench(*args, "--only", "models, compiled")
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [s.split(" (")[0] for s in report["skipped"]] == ["ViT-S/16", "ResNet-50"]
    assert 0 < report["settings"]["expected_s"] < everything
