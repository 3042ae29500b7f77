"""Smoke test of ``scripts/bench.py --quick``: it runs, and its report is complete and consistent.

No timing assertions: only the structure of the report and relations that hold for any timings
(recomputed here from the raw per-round times the report also records).
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
Report = tuple[dict[str, Any], str]  # the JSON report and the markdown tables


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    out = tmp_path_factory.mktemp("bench")
    json_path, md_path = out / "bench.json", out / "bench.md"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--threads", "1"]
    cmd += ["--json", str(json_path), "--markdown", str(md_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(json_path.read_text()), md_path.read_text()


def test_report_has_every_case_and_variant(quick_report: Report) -> None:
    report, _ = quick_report
    variants = report["variants"]
    assert variants[:2] == ["plain", "tract_optim"]
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


def test_medians_and_ratios_follow_from_the_raw_times(
    quick_report: Report,
) -> None:
    report, _ = quick_report
    runs = report["settings"]["runs"]
    for case in report["cases"]:
        plain = case["time"]["plain"]["times_ms"]
        for result in case["time"].values():
            times = result["times_ms"]
            assert len(times) == runs and all(t > 0 for t in times)
            assert result["median_ms"] == pytest.approx(statistics.median(times), rel=1e-3)
            ratios = [t / p for t, p in zip(times, plain, strict=True)]
            assert result["ratio_to_plain"] == pytest.approx(statistics.median(ratios), rel=1e-3)
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
