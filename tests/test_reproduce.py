"""``python -m scripts.reproduce`` end to end, its statistics, resumption, data, augmentation,
presets."""

from __future__ import annotations

import json
import math
import os
import pickle
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scripts import data, plot, presets, reproduce, summary, train
from tract_optim import TrActOptimizer

ROOT = Path(__file__).resolve().parents[1]

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Train in one thread, as the demo's workers do: the models are too small to gain from more,
    and on a shared machine extra threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quick_demo_end_to_end(tmp_path: Path) -> None:
    """--quick trains every panel of the demo in worker processes and writes per-run JSON with
    settings and curves, results.json, summary.md and the five figures; the printed numbers
    are those of the runs. ``scripts.plot`` redraws from the summary stored in results.json."""
    out = tmp_path / "quick"
    proc = subprocess.run(  # from the root: this checkout's scripts and tract_optim
        [sys.executable, "-m", "scripts.reproduce", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    for name in ("accuracy.png", "loss.png", "lambda.png", "input_range.png", "amortise.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((out / "checkpoints").iterdir())  # finished runs leave no checkpoint
    results = json.loads((out / "results.json").read_text())
    assert results["jobs"] == min(2, os.cpu_count() or 1)
    expected = presets.unique_runs(presets.build(None, presets.Overrides(), quick=True))
    runs = {r["run_id"]: r for r in results["runs"]}
    assert sorted(runs) == sorted(r.run_id for r in expected)
    assert sorted(p.stem for p in (out / "runs").glob("*.json")) == sorted(runs)
    for run in runs.values():
        cfg = train.RunConfig(**run["config"])  # every setting is recorded
        assert cfg.run_id == run["run_id"]
        assert cfg.augment == "shift1" and "±1 px" in run["augmentation"]
        assert [h["epoch"] for h in run["history"]] == list(range(1, cfg.epochs + 1))
        assert run["final_train_loss"] == run["history"][-1]["train_loss"] > 0
        assert run["final_test_acc"] == run["history"][-1]["test_acc"]
    kinds = {"budget", "lambda", "input_range", "amortise"}
    assert {p["kind"] for p in results["panels"]} == kinds
    assert [s["kind"] for s in results["summary"]] == [p["kind"] for p in results["panels"]]
    assert (out / "summary.md").read_text() in proc.stdout
    assert proc.stdout.count("| stats_every | TrAct acc (%) |") == 4

    # One printed cell against the runs, recomputed here: CNN / SGD at 2 epochs, baseline.
    panel = results["panels"][0]
    accs = [
        100 * runs[m["run_id"]]["final_test_acc"]
        for m in panel["members"]
        if m["series"] == "baseline" and m["x"] == 2
    ]
    cell = f"| 2 | {statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f} |"
    section = proc.stdout.split(f"### {panel['title']}")[1].split("###")[0]
    assert cell in section

    # A run trained in a worker process equals the same run trained here (to rounding, in case
    # the two processes' kernels sum in different orders).
    some = next(iter(runs.values()))
    cfg = train.RunConfig(**some["config"])
    here = train.train_run(cfg, data.load_digits_data(cfg.input_range), CPU)["history"]
    for mine, theirs in zip(here, some["history"], strict=True):
        assert mine == pytest.approx(theirs, rel=1e-5)

    # The plot takes its statistics from results.json's summary, not from the runs: a stored
    # mean it did not compute is what it shows, and results.json is left as it was.
    results["summary"][0]["rows"][0]["acc"]["baseline"]["mean"] = 12.345
    stored = json.dumps(results)
    (out / "results.json").write_text(stored)
    plot.main([str(out)])
    assert "| 12.35 ± " in (out / "summary.md").read_text()
    assert (out / "results.json").read_text() == stored


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(-5, 5, allow_nan=False, allow_subnormal=False),
            st.floats(-5, 5, allow_nan=False, allow_subnormal=False),
        ),
        min_size=2,
        max_size=12,
    )
)
def test_paired_statistics_match_scipy(pairs: list[tuple[float, float]]) -> None:
    """Mean, standard error and 95 % interval of the paired difference against scipy's paired
    t-test (t = mean / SE; its own confidence interval); wins and ties counted by hand."""
    from scipy import stats

    base = {s: b for s, (b, _) in enumerate(pairs)}
    other = {s: o for s, (_, o) in enumerate(pairs)}
    p = summary.paired(base, other, higher_is_better=True)
    assert p is not None
    diffs = np.array([o - b for b, o in pairs], dtype=np.float64)
    assert p.n == len(pairs)
    assert p.mean == pytest.approx(diffs.mean(), abs=1e-9)
    assert p.better == int((diffs > 0).sum()) and p.ties == int((diffs == 0).sum())
    lower = summary.paired(base, other, higher_is_better=False)
    assert lower is not None and lower.better == int((diffs < 0).sum())
    se = diffs.std(ddof=1) / math.sqrt(len(diffs))
    assert p.se == pytest.approx(se, rel=1e-6, abs=1e-9)
    if se > 1e-6:
        test = stats.ttest_rel(np.array([o for _, o in pairs]), np.array([b for b, _ in pairs]))
        ci = test.confidence_interval(0.95)
        assert p.mean / p.se == pytest.approx(test.statistic, rel=1e-6)
        assert (p.ci_low, p.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-6, abs=1e-9)


def test_paired_uses_shared_finite_seeds_only() -> None:
    base = {0: 1.0, 1: 2.0, 2: None, 3: 5.0}
    other = {0: 2.0, 1: 2.0, 2: 9.0, 4: 7.0}
    p = summary.paired(base, other, higher_is_better=True)
    assert p is not None
    assert (p.n, p.mean, p.better, p.ties) == (2, 0.5, 1, 1)
    assert summary.paired({0: None}, {0: 1.0}, True) is None
    one = summary.paired({0: 1.0}, {0: 3.0}, True)
    assert one is not None and one.se is None and one.ci_low is None


@pytest.mark.parametrize(
    ("base", "other", "higher", "expected"),
    [
        # Baseline best 92 first at 8 epochs; TrAct's mean reaches 92 at 4: 2× faster. It was
        # at 90 at 2 epochs, so it crosses 92 at 2 · 2^(2/2) = 4 epochs exactly.
        ({1: 80, 2: 85, 4: 90, 8: 92, 16: 92}, {1: 85, 2: 90, 4: 92, 8: 93, 16: 93}, True,
         (92, 8, 4, 2.0, 4.0)),
        # Never reached: no factor.
        ({1: 80, 2: 90}, {1: 79, 2: 89.9}, True, (90, 2, None, None, None)),
        # Losses: lower is better; baseline best 0.1 at 16, TrAct ≤ 0.1 from 4 on: 4×. From 1.5
        # at 1 epoch to 0.09 at 4, 0.1 is crossed at 1 · 4^(1.4/1.41) epochs.
        ({1: 2.0, 4: 0.5, 16: 0.1}, {1: 1.5, 4: 0.09, 16: 0.05}, False,
         (0.1, 16, 4, 4.0, 4 ** (1.4 / 1.41))),
        # Reached only later than the baseline's own best: a factor below 1.
        ({1: 3.0, 2: 1.0, 4: 1.2}, {1: 3.0, 2: 1.1, 4: 0.9}, False, (1.0, 2, 4, 0.5, 2 * 2**0.5)),
        # Reached at the smallest budget: nothing to interpolate.
        ({1: 50, 2: 60}, {1: 70, 2: 80}, True, (60, 2, 1, 2.0, None)),
    ],
)  # fmt: skip
def test_speedup_factor(
    base: dict[float, float], other: dict[float, float], higher: bool, expected: tuple[Any, ...]
) -> None:
    got = summary.speedup(dict(base), dict(other), higher)
    keys = ("baseline_best", "baseline_budget", "budget", "factor", "budget_interpolated")
    assert tuple(got[k] for k in keys) == pytest.approx(expected)
    if expected[4] is not None:
        assert got["factor_interpolated"] == pytest.approx(expected[1] / expected[4])


def test_digits_input_ranges_and_validation_split() -> None:
    """The three input ranges are the same images (same split) mapped from scikit-learn's 0 … 16
    intensities; the validation split is a stratified 20 % of the training images, disjoint from
    what is trained on, and leaves the test images out."""
    from sklearn.datasets import load_digits

    raw = load_digits().images.astype(np.float64)
    by_range = {r: data.load_digits_data(r) for r in data.INPUT_RANGES}
    unit, byte, std = by_range["unit"], by_range["byte"], by_range["standard"]
    np.testing.assert_allclose(byte.train_x.double().numpy(), 255 * unit.train_x.double().numpy(),
                               rtol=1e-5, atol=1e-4)  # fmt: skip
    assert unit.train_x.min() == 0 and unit.train_x.max() == 1
    # Every unit-range image is one of the dataset's images divided by 16.
    flat = {tuple(np.round(img.ravel() / 16, 5)) for img in raw}
    assert all(tuple(np.round(x.double().numpy().ravel(), 5)) in flat for x in unit.test_x)
    x = unit.train_x.double().numpy() * 16
    expected = (x - x.mean()) / x.std()
    np.testing.assert_allclose(std.train_x.double().numpy(), expected, rtol=1e-4, atol=1e-4)
    assert std.fill.item() == pytest.approx(-x.mean() / x.std(), rel=1e-5)
    assert unit.fill.item() == 0 and byte.fill.item() == 0
    for d in by_range.values():
        assert torch.equal(d.train_y, unit.train_y) and torch.equal(d.test_y, unit.test_y)
    assert (len(unit.train_y), len(unit.test_y)) == (1257, 540)

    val = data.load_digits_data("unit", validation=True)
    assert (len(val.train_y), len(val.test_y)) == (1005, 252)
    rows = lambda t: {tuple(r) for r in t.reshape(len(t), -1).tolist()}  # noqa: E731
    train_rows, held_out = rows(val.train_x), rows(val.test_x)
    assert train_rows | held_out <= rows(unit.train_x)
    assert not held_out & rows(unit.test_x)
    assert np.bincount(val.test_y.numpy()).min() >= 24  # stratified: every digit held out


def test_shift_augmentation_is_a_one_pixel_shift_without_flips() -> None:
    """Brute force: every output is one of the 9 crops of the 1-px padded image (never mirrored),
    and over a batch all 9 shifts occur; crop4_flip mirrors some images."""
    x = torch.randn(200, 1, 5, 5)
    fill = torch.tensor([-2.0])
    out = data.augment(x, fill, torch.Generator().manual_seed(0), data.AUGMENTATIONS["shift1"])
    padded = torch.full((200, 1, 7, 7), -2.0)
    padded[:, :, 1:6, 1:6] = x
    seen = set()
    for i in range(200):
        hits = [(a, b) for a in range(3) for b in range(3)
                if torch.equal(out[i], padded[i, :, a : a + 5, b : b + 5])]  # fmt: skip
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) == 9

    flip = data.AUGMENTATIONS["crop4_flip"]
    out = data.augment(x, fill, torch.Generator().manual_seed(0), flip)
    padded = torch.full((200, 1, 13, 13), -2.0)
    padded[:, :, 4:9, 4:9] = x
    mirrored = 0
    for i in range(200):
        crops = [padded[i, :, a : a + 5, b : b + 5] for a in range(9) for b in range(9)]
        plain = any(torch.equal(out[i], c) for c in crops)
        flipped = any(torch.equal(out[i], c.flip(-1)) for c in crops)
        assert plain or flipped
        mirrored += flipped and not plain
    assert mirrored > 50


def _tiny(optimizer: str, schedule: str, augment: str) -> train.RunConfig:
    return train.RunConfig(
        "digits", "digits_cnn", optimizer, 0.05, 2, 7, lam=0.1, batch_size=256,
        schedule=schedule, augment=augment, first_lr=0.1,
    )  # fmt: skip


class _Killed(Exception):
    pass


@pytest.mark.parametrize(
    ("optimizer", "schedule", "augment"),
    [("sgd", "cosine", "none"), ("sgd_first_adam_rest", "multistep_warmup", "shift1")],
)
def test_resume_equals_uninterrupted(
    tmp_path: Path, optimizer: str, schedule: str, augment: str
) -> None:
    cfg = _tiny(optimizer, schedule, augment)
    d = data.load_digits_data()
    reference = train.train_run(cfg, d, CPU)

    def kill_after_one(epoch: int, _record: dict[str, Any]) -> None:
        if epoch == 1:
            raise _Killed

    ckpt = tmp_path / "run.pt"
    with pytest.raises(_Killed):
        train.train_run(cfg, d, CPU, ckpt, kill_after_one)
    continued: list[int] = []
    resumed = train.train_run(cfg, d, CPU, ckpt, lambda e, _r: continued.append(e))
    assert continued == [2]  # only the missing epoch was trained
    assert resumed["history"] == reference["history"]


def test_divergence_is_recorded_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """A training loss that stops being finite ends the run, marked diverged, with JSON-valid
    ``None`` losses; the summary reports the cell as diverged instead of a number."""
    calls = []

    def nan_in_second_epoch(cfg: train.RunConfig, t: train.Trainer, d: data.ImageData) -> float:
        calls.append(1)
        return math.nan if len(calls) == 2 else 1.0

    monkeypatch.setattr(train, "_train_epoch", nan_in_second_epoch)
    cfg = replace(_tiny("sgd", "cosine", "none"), epochs=4)
    result = train.train_run(cfg, data.load_digits_data(), CPU)
    assert result["diverged"] and len(result["history"]) == 2
    assert result["history"][-1]["batch_loss"] is None
    json.dumps(result, allow_nan=False)
    values: summary.Values = {0: None, 1: 0.5}
    s = summary.stat(values)
    assert (s.mean, s.std, s.n, s.diverged) == (0.5, None, 1, 1)
    assert summary._cell(summary.asdict(summary.stat({0: None})), 2) == "diverged (1)"


def test_cli_resume_skips_finished_runs_and_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kill a grid in its third run, resume it: finished runs are kept, not retrained, and every
    run ends with the same history as in an uninterrupted grid."""
    base = replace(_tiny("sgd", "cosine", "shift1"), lam=None)
    panel = presets._budget_panel("tiny", base, (1, 2), 2, (0.1,))
    monkeypatch.setattr(presets, "build", lambda *_a, **_k: [panel])
    argv = ["--jobs", "1"]
    reproduce.main([*argv, "--out", str(tmp_path / "straight")])
    calls: list[str] = []
    resuming = False

    def kill(_epoch: int, _record: dict[str, Any]) -> None:
        raise _Killed

    def killed_in_third_run(run: train.RunConfig, *args: Any) -> dict[str, Any]:
        calls.append(run.run_id)
        d, device, checkpoint, on_epoch = args
        killed = len(calls) == 3 and not resuming
        return train.train_run(run, d, device, checkpoint, kill if killed else on_epoch)

    monkeypatch.setattr(reproduce, "train_run", killed_in_third_run)
    with pytest.raises(_Killed):
        reproduce.main([*argv, "--out", str(tmp_path / "resumed")])
    assert len(list((tmp_path / "resumed" / "runs").glob("*.json"))) == 2
    assert len(list((tmp_path / "resumed" / "checkpoints").glob("*.pt"))) == 1
    calls.clear()
    resuming = True
    reproduce.main([*argv, "--out", str(tmp_path / "resumed"), "--resume"])
    assert len(calls) == 8 - 2  # the two finished runs were loaded, not trained

    def histories(name: str) -> dict[str, object]:
        runs = json.loads((tmp_path / name / "results.json").read_text())["runs"]
        return {r["run_id"]: r["history"] for r in runs}

    assert histories("resumed") == histories("straight")


def test_presets_pair_tract_with_its_baseline() -> None:
    """Every TrAct run equals a baseline run of the same panel except for λ and stats_every
    (same seed, budget, lr, inputs); the paper's ResNet presets run λ ∈ {0.05, 0.1, 0.2}; SGD and
    Adam presets share their weight decay; the demo's lrs come from their search grids."""
    for name in [None, *presets.PRESETS]:
        for panel in presets.build(name, presets.Overrides(epochs=[100], seeds=2)):
            baselines = {m.run for m in panel.members if m.series == presets.BASELINE}
            for m in panel.members:
                if m.run.lam is not None and m.run.optimizer != "sgd_first_adam_rest":
                    assert replace(m.run, lam=None, stats_every=1) in baselines, (name, m)
    for name in ("cifar10-resnet18-sgd", "cifar10-resnet18-adam"):
        lams = {m.run.lam for m in presets.build(name, presets.Overrides())[0].members}
        assert lams == {None, 0.05, 0.1, 0.2}
    decay = {
        m.run.weight_decay
        for name in ("cifar10-resnet18-sgd", "cifar10-resnet18-adam", "sgd-first-adam-rest")
        for m in presets.build(name, presets.Overrides())[0].members
    }
    assert decay == {0.0}
    for d in presets.DEMO_SETTINGS:
        assert {lr for _, lr in d.lrs} <= set(d.lr_grid)
        assert [b for b, _ in d.lrs] == list(presets.DEMO_EPOCHS)
    demo = presets.build(None, presets.Overrides())
    for p in demo:
        setting = next(d for d in presets.DEMO_SETTINGS if p.title.endswith(d.title)
                       or f"{d.title}," in p.title)  # fmt: skip
        for m in p.members:  # standardised-input lr of that budget, for every input range
            assert m.run.lr == setting.lr(m.run.epochs)
    assert {m.run.input_range for p in demo for m in p.members} == set(data.INPUT_RANGES)


def test_stats_every_keeps_earlier_run_ids_and_reaches_the_optimizer() -> None:
    """stats_every = 1 leaves a run's recorded config and id as they were before the setting
    existed (pinned here), so earlier results stay reusable with --resume; any other value
    changes the id, is recorded, and reaches TrActOptimizer (whose state then counts steps)."""
    exact = replace(presets.DEMO_SETTINGS[0].template(2), lam=0.1)
    assert exact.run_id == "digits_digits_cnn_sgd_standard_tract-lam0.1_lr1_e2_s0_c1b8d19f"
    assert "stats_every" not in exact.as_dict()
    every = replace(exact, stats_every=16)
    assert every.run_id.startswith("digits_digits_cnn_sgd_standard_tract-lam0.1-every16_lr1_e2_")
    assert every.as_dict()["stats_every"] == 16 and train.RunConfig(**every.as_dict()) == every
    train_x = data.load_digits_data().train_x
    for cfg, counts_steps in ((exact, False), (every, True)):
        optimizer = train.build(cfg, train_x, CPU).optimizer
        assert isinstance(optimizer, TrActOptimizer)
        assert ("step" in optimizer.preconditioner.state_dict()) == counts_steps
        optimizer.remove()
    with pytest.raises(ValueError, match="stats_every"):
        replace(exact, lam=None, stats_every=4)
    with pytest.raises(ValueError, match="stats_every"):
        replace(exact, stats_every=0)


@pytest.mark.parametrize("quick", [False, True])
def test_amortise_panels_reuse_the_budget_runs(quick: bool) -> None:
    """The amortised-statistics panels (CNN / SGD and ViT / Adam, two budgets each) pair TrAct
    at every stats_every with the very baseline and exact-TrAct runs of the budget panels (same
    run ids: trained once), so they add only the stats_every > 1 runs."""
    panels = presets.build(None, presets.Overrides(), quick=quick)
    amortise = [p for p in panels if p.kind == "amortise"]
    budgets = presets.QUICK_EPOCHS if quick else presets.AMORTISE_EPOCHS
    seeds = presets.QUICK_SEEDS if quick else presets.DEMO_SEEDS
    settings = ("CNN / SGD", "ViT / Adam")
    assert [p.title for p in amortise] == [
        f"amortised statistics: {s}, {e} epoch" + ("s" if e != 1 else "")
        for s in settings
        for e in budgets
    ]
    budget_runs = {
        m.run.run_id: (p.title, m.series) for p in panels if p.kind == "budget" for m in p.members
    }
    for panel in amortise:
        setting = next(s for s in settings if f": {s}," in panel.title)
        assert {m.x for m in panel.members} == {None, *presets.AMORTISE_EVERY}
        for m in panel.members:
            assert m.run.lam == (None if m.x is None else presets.DEMO_LAM)
            assert m.run.stats_every == (1 if m.x is None else m.x)
            assert m.run.epochs in budgets
            if m.x in (None, 1):
                series = presets.BASELINE if m.x is None else presets.tract_series(0.1)
                assert budget_runs[m.run.run_id] == (setting, series)
    others = [m for p in amortise for m in p.members if m.x not in (None, 1)]
    assert not {m.run.run_id for m in others} & budget_runs.keys()
    without = [p for p in panels if p.kind != "amortise"]
    added = len(presets.unique_runs(panels)) - len(presets.unique_runs(without))
    assert added == len(others) == len(settings) * len(budgets) * 3 * seeds


def _fake_result(run: train.RunConfig, acc: float, loss: float) -> dict[str, Any]:
    """What ``train_run`` returns, as far as the summary and the figures read it."""
    return {
        "run_id": run.run_id,
        "config": run.as_dict(),
        "augmentation": "none",
        "final_test_acc": acc,
        "final_train_loss": loss,
    }


def test_amortise_summary_pairs_with_exact_tract_and_the_baseline(tmp_path: Path) -> None:
    """Synthetic accuracies: every stats_every is paired seed by seed with exact TrAct
    (stats_every = 1) and with the baseline; exact TrAct's own row has no pairing with itself;
    summary.md has the panel's table and amortise.png is written."""
    template = presets.DEMO_SETTINGS[0].template(2)
    amortise = presets._amortise_panel("amortised", template, 3, 0.1, (1, 4, 16))
    acc = {  # x → accuracy per seed 0, 1, 2 (None: the baseline)
        None: [0.80, 0.90, 0.70],
        1: [0.86, 0.95, 0.77],
        4: [0.85, 0.96, 0.75],
        16: [0.87, 0.95, 0.79],
    }
    runs = {
        m.run.run_id: _fake_result(m.run, acc[m.x][m.run.seed], 1.0 - acc[m.x][m.run.seed])
        for m in amortise.members
    }
    panel = amortise.to_json()
    (result,) = summary.summarize([panel], runs)
    assert result["kind"] == "amortise" and [r["x"] for r in result["rows"]] == [1, 4, 16]
    pct = {x: {s: 100 * a for s, a in enumerate(v)} for x, v in acc.items()}
    for row in result["rows"]:
        x, got = row["x"], row["acc"]
        assert got["series"] == summary.asdict(summary.stat(pct[x]))
        assert got["exact"] == summary.asdict(summary.stat(pct[1]))
        assert got["baseline"] == summary.asdict(summary.stat(pct[None]))
        assert got["paired"] == summary.asdict(summary.paired(pct[None], pct[x], True))
        if x == 1:
            assert got["paired_exact"] is None
        else:
            expected = summary.paired(pct[1], pct[x], True)
            assert expected is not None and got["paired_exact"] == summary.asdict(expected)
    four = result["rows"][1]["acc"]["paired_exact"]
    assert four["mean"] == pytest.approx(-2 / 3) and (four["better"], four["n"]) == (1, 3)
    loss = result["rows"][1]["loss"]["paired_exact"]  # lower is better for losses
    assert loss["mean"] == pytest.approx(2 / 300) and loss["better"] == 1

    text = plot.write_all(tmp_path, [panel], runs, [result])
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| stats_every | TrAct acc (%) | Δ pts vs exact")
    assert rows[2].startswith("| 1 | ") and "| (exact) | (exact) |" in rows[2]
    cells = rows[3].split(" | ")
    assert cells[2:4] == [summary._delta(four, 2), "1/3"]
    assert "Amortised statistics:" in text
    assert (tmp_path / "amortise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_cifar_says_how_to_get_it(tmp_path: Path) -> None:
    argv = ["--preset", "cifar10-resnet18-sgd", "--data-dir", str(tmp_path), "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as info:
        reproduce.main(argv)
    message = str(info.value.code)
    assert "cifar-10-batches-py" in message
    assert "--download" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message


def _write_fake_cifar10(root: Path, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Five train batches and a test batch in the official pickle layout; returns the train set."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, size=4).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": x, b"labels": y, b"batch_label": name.encode()}, f)
        if name != "test_batch":
            images.append(x)
            labels += y
    return np.concatenate(images), np.array(labels)


def test_cifar_reader_matches_the_pickle_layout(tmp_path: Path) -> None:
    raw, labels = _write_fake_cifar10(tmp_path, np.random.default_rng(0))
    mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2023, 0.1994, 0.2010])
    pixels = raw.reshape(20, 3, 32, 32).astype(np.float64)  # rows: 1024 R, 1024 G, 1024 B
    expected = {
        "standard": (pixels / 255 - mean[:, None, None]) / std[:, None, None],
        "unit": pixels / 255,
        "byte": pixels,
    }
    for input_range, want in expected.items():
        loaded = data.load_cifar("cifar10", tmp_path, input_range)
        np.testing.assert_allclose(loaded.train_x.double().numpy(), want, rtol=1e-6, atol=1e-5)
        np.testing.assert_array_equal(loaded.train_y.numpy(), labels)
        assert loaded.test_x.shape == (4, 3, 32, 32)
        black = {"standard": -mean / std, "unit": np.zeros(3), "byte": np.zeros(3)}[input_range]
        np.testing.assert_allclose(loaded.fill.double().numpy(), black, rtol=1e-6)


def test_schedules_match_the_paper() -> None:
    """Cosine: 0.5(1 + cos(π t/T)). Multi-step over 200 epochs: lr 0.1 → 0.02 → 0.004 → 0.0008
    at epochs 60, 120, 160, after a linear warm-up epoch (the paper's CIFAR-100 schedule)."""
    steps = 10
    cosine = train.Schedule("cosine", 4, steps)
    for t in (0, 7, 20, 40):
        assert cosine(t) == pytest.approx(0.5 * (1 + math.cos(math.pi * t / 40)))
    multi = train.Schedule("multistep_warmup", 200, steps)
    assert [multi(s) for s in range(steps)] == pytest.approx([(s + 1) / steps for s in range(10)])
    expected = {1: 0.1, 59: 0.1, 60: 0.02, 119: 0.02, 120: 0.004, 159: 0.004, 160: 0.0008}
    for epoch, lr in expected.items():
        assert 0.1 * multi(epoch * steps) == pytest.approx(lr)
        assert 0.1 * multi(epoch * steps + steps - 1) == pytest.approx(lr)


def test_bad_run_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="augment"):
        train.RunConfig("digits", "digits_cnn", "sgd", 0.1, 1, 0, augment="flip")
    with pytest.raises(ValueError, match="lam"):
        train.RunConfig("digits", "digits_cnn", "sgd", 0.1, 1, 0, lam=0.0)
    with pytest.raises(ValueError, match="only wired up with TrAct"):
        train.RunConfig("digits", "digits_cnn", "sgd_first_adam_rest", 0.1, 1, 0)


def test_patchnorm_preset_on_cifar_files(tmp_path: Path) -> None:
    """A paper preset end to end on (tiny, random) CIFAR files: baselines without a raw-input
    first layer (patch-normalised ViTs) train too, and all four series are reported."""
    _write_fake_cifar10(tmp_path, np.random.default_rng(1))
    out = tmp_path / "out"
    argv = ["--preset", "patchnorm", "--epochs", "1", "--seeds", "1", "--data-dir", str(tmp_path)]
    reproduce.main([*argv, "--out", str(out), "--threads", "1"])
    results = json.loads((out / "results.json").read_text())
    series = sorted(m["series"] for m in results["panels"][0]["members"])
    assert series == ["Dual PatchNorm", "TrAct λ=0.1", "baseline", "patch normalisation"]
    assert all(r["config"]["lr"] == pytest.approx(1e-3) for r in results["runs"])  # paper lr
    assert (out / "accuracy.png").exists() and (out / "loss.png").exists()
