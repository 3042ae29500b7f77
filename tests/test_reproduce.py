"""scripts/reproduce.py end to end, resumption, the CIFAR reader, augmentation and schedules."""

from __future__ import annotations

import json
import math
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import data  # noqa: E402
import reproduce  # noqa: E402
import train  # noqa: E402


def test_quick_demo_end_to_end(tmp_path: Path) -> None:
    """--quick writes one JSON per run, the combined JSON, figures and prints the table."""
    out = tmp_path / "quick"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "reproduce.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    assert len(runs) == 16  # 2 models × 2 optimizers × 2 budgets × (baseline, TrAct), 1 seed
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 16
    for name in ("accuracy.png", "curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((out / "checkpoints").iterdir())  # finished runs leave no checkpoint
    for run in runs:
        cfg = run["config"]
        assert [h["epoch"] for h in run["history"]] == list(range(1, cfg["epochs"] + 1))
        assert all(0.0 <= h["test_acc"] <= 1.0 for h in run["history"])
        # With one seed each printed cell is that run's final accuracy: find it in its row.
        section = proc.stdout.split(f"### {cfg['panel']}")[1].split("###")[0]
        row = re.search(rf"^\| {cfg['epochs']} \|(.*)$", section, re.MULTILINE)
        assert row is not None
        column = 0 if cfg["series"] == "baseline" else 1
        shown = row.group(1).split("|")[column].strip()
        assert shown == f"{100 * run['final_test_acc']:.2f} ± 0.00"
    assert "reaches the baseline's best" in proc.stdout


def _tiny(optimizer: str, schedule: str, augment: bool) -> train.RunConfig:
    return train.RunConfig(
        "p", "TrAct", "digits", "digits_cnn", optimizer, 0.05, 3, 7, True,
        batch_size=256, schedule=schedule, augment=augment, first_lr=0.1,
    )  # fmt: skip


class _Killed(Exception):
    pass


@pytest.mark.parametrize(
    ("optimizer", "schedule", "augment"),
    [("sgd", "cosine", False), ("sgd_first_adam_rest", "multistep_warmup", True)],
)
def test_resume_equals_uninterrupted(
    tmp_path: Path, optimizer: str, schedule: str, augment: bool
) -> None:
    cfg = _tiny(optimizer, schedule, augment)
    d = data.load_digits_data()
    cpu = torch.device("cpu")
    reference = train.train_run(cfg, d, cpu)

    def kill_after_two(epoch: int, _record: dict[str, float]) -> None:
        if epoch == 2:
            raise _Killed

    ckpt = tmp_path / "run.pt"
    with pytest.raises(_Killed):
        train.train_run(cfg, d, cpu, ckpt, kill_after_two)
    continued: list[int] = []
    resumed = train.train_run(cfg, d, cpu, ckpt, lambda e, _r: continued.append(e))
    assert continued == [3]  # only the missing epoch was trained
    assert resumed["history"] == reference["history"]


def test_missing_cifar_says_how_to_get_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
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


def test_augment_is_a_padded_crop_or_its_mirror() -> None:
    """Every output equals some crop of the black-padded image, possibly flipped (brute force)."""
    x = torch.randn(6, 3, 5, 5)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    out = data.augment(x, fill, torch.Generator().manual_seed(0), pad=2)
    padded = fill.view(1, 3, 1, 1).repeat(6, 1, 9, 9)
    padded[:, :, 2:7, 2:7] = x
    for i in range(6):
        crops = [padded[i, :, a : a + 5, b : b + 5] for a in range(5) for b in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)


def test_schedules_match_the_paper() -> None:
    """Cosine: 0.5(1 + cos(π t/T)). Multi-step over 200 epochs: lr 0.1 → 0.02 → 0.004 → 0.0008
    at epochs 60, 120, 160, after a linear warm-up epoch (PAPER.md, CIFAR-100)."""
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


def test_cli_resume_skips_finished_runs_and_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kill a demo grid in its third run, resume it: finished runs are kept, not retrained,
    and every run ends with the same history as in an uninterrupted grid."""
    argv = ["--quick", "--epochs", "2", "--lam", "0.1"]
    reproduce.main([*argv, "--out", str(tmp_path / "straight")])
    calls: list[str] = []
    resuming = False

    def kill(_epoch: int, _record: dict[str, float]) -> None:
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


def test_patchnorm_preset_on_cifar_files(tmp_path: Path) -> None:
    """A paper preset end to end on (tiny, random) CIFAR files: baselines without a raw-input
    first layer (patch-normalised ViTs) train too, and all four series are reported."""
    _write_fake_cifar10(tmp_path, np.random.default_rng(1))
    out = tmp_path / "out"
    argv = ["--preset", "patchnorm", "--epochs", "1", "--seeds", "1", "--data-dir", str(tmp_path)]
    reproduce.main([*argv, "--out", str(out), "--threads", "1"])
    runs = json.loads((out / "results.json").read_text())["runs"]
    series = sorted(r["config"]["series"] for r in runs)
    assert series == ["Dual PatchNorm", "TrAct λ=0.1", "baseline", "patch normalisation"]
    assert all(r["config"]["lr"] == pytest.approx(1e-3) for r in runs)  # paper's 100-epoch lr
