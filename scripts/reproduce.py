"""Baseline vs TrAct: the CPU digits demo (default) and the paper's CIFAR experiments (--preset).

    python -m scripts.reproduce                 # digits demo, 2 CPU cores, a few minutes
    python -m scripts.reproduce --quick         # every demo panel at a tiny size, under a minute
    python -m scripts.reproduce --tune-lr       # the demo's baseline learning-rate search
    python -m scripts.reproduce --preset cifar10-resnet18-sgd --data-dir ~/data --device cuda

Writes OUT/runs/RUN_ID.json per run (every setting, per-epoch training loss and test accuracy,
final numbers), OUT/results.json (panels, summary and all runs), OUT/summary.md and the figures
(accuracy.png, loss.png, lambda.png, input_range.png, amortise.png); prints the tables. Each run
checkpoints every epoch to OUT/checkpoints; ``--resume`` keeps finished runs and continues
unfinished ones from their last epoch, to the same final numbers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from scripts import data, plot, presets, summary
from scripts.train import RunConfig, load_data, train_run

DataKey = tuple[str, str, str]  # dataset, input range, evaluation split


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.reproduce",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(presets.PRESETS), help="paper experiment")
    parser.add_argument("--quick", action="store_true", help="every demo panel, tiny (CI)")
    parser.add_argument(
        "--tune-lr", action="store_true", help="the demo's baseline lr search (validation split)"
    )
    parser.add_argument("--out", type=Path, help="results directory (default results/NAME)")
    parser.add_argument("--epochs", type=int, nargs="+", help="epoch budgets")
    parser.add_argument("--seeds", type=int, help="number of seeds (0 … N-1)")
    parser.add_argument("--lam", type=float, nargs="+", help="TrAct λ value(s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    parser.add_argument(
        "--jobs", type=int, default=None,
        help="runs trained in parallel processes (default: 2 for the demo, 1 for presets)",
    )  # fmt: skip
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="CIFAR root folder")
    parser.add_argument("--download", action="store_true", help="fetch CIFAR if it is missing")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep finished runs in OUT and continue unfinished ones from their checkpoints "
        "(without it, OUT/runs and OUT/checkpoints are cleared first)",
    )
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be ≥ 1, got {args.jobs}")
    return args


def _device(name: str | None) -> torch.device:
    if name is not None:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _key(run: RunConfig) -> DataKey:
    return (run.dataset, run.input_range, run.evaluate_on)


@functools.lru_cache(maxsize=8)
def _dataset(key: DataKey, data_dir: Path, device: str) -> data.ImageData:
    """The data of runs with this key, loaded once per process and kept on ``device``."""
    template = RunConfig(key[0], "digits_cnn", "sgd", 0.1, 1, 0, input_range=key[1],
                         evaluate_on=key[2])  # fmt: skip
    return load_data(template, data_dir).to(torch.device(device))


def _run_one(
    run: RunConfig,
    data_dir: Path,
    device: str,
    out: Path,
    resume: bool,
    tick: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train one run (with ``resume``: load it if finished, else continue it) and write its JSON."""
    result_path = out / "runs" / f"{run.run_id}.json"
    checkpoint = out / "checkpoints" / f"{run.run_id}.pt"
    if resume and result_path.exists():
        done = dict(json.loads(result_path.read_text()))
        if done["config"] == run.as_dict():
            return done
    d = _dataset(_key(run), data_dir, device)
    result = train_run(run, d, torch.device(device), checkpoint, tick)
    result_path.write_text(json.dumps(result, indent=1))
    checkpoint.unlink(missing_ok=True)
    return result


def _init_worker(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def _train_all(
    runs: list[RunConfig], args: argparse.Namespace, device: str, out: Path, jobs: int, name: str
) -> list[dict[str, Any]]:
    """Every run, in this process (one progress tick per epoch) or in ``jobs`` processes (one
    tick per finished run); results in the order of ``runs``."""
    total = sum(r.epochs for r in runs)
    by_id: dict[str, dict[str, Any]] = {}
    with tqdm(total=total, desc=f"{name}: {len(runs)} runs", unit="epoch") as bar:
        if jobs == 1:
            for run in runs:
                done = 0

                def tick(epoch: int, _record: dict[str, Any]) -> None:
                    nonlocal done
                    bar.update(epoch - done)  # a resumed run jumps over its finished epochs
                    done = epoch

                by_id[run.run_id] = _run_one(run, args.data_dir, device, out, args.resume, tick)
                bar.update(run.epochs - done)
        else:
            ctx = get_context("spawn")  # a forked torch with live thread pools can hang
            with ProcessPoolExecutor(
                jobs, mp_context=ctx, initializer=_init_worker, initargs=(torch.get_num_threads(),)
            ) as pool:
                futures = {
                    pool.submit(_run_one, run, args.data_dir, device, out, args.resume): run
                    for run in runs
                }
                for future in as_completed(futures):
                    run = futures[future]
                    by_id[run.run_id] = future.result()
                    bar.update(run.epochs)
    return [by_id[r.run_id] for r in runs]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.preset is None:
        torch.set_num_threads(1)  # the demo's models are too small to gain from more threads
    name = args.preset or ("tune-lr" if args.tune_lr else "demo")
    name += "-quick" if args.quick else ""
    out: Path = args.out or Path("results") / name
    overrides = presets.Overrides(args.epochs, args.seeds, args.lam)
    try:
        panels = presets.build(args.preset, overrides, quick=args.quick, tune=args.tune_lr)
    except ValueError as err:
        sys.exit(f"error: {err}")
    runs = presets.unique_runs(panels)
    device = str(_device(args.device))
    try:
        for key in dict.fromkeys(_key(r) for r in runs):
            if key[0] != "digits" and args.download:
                data.download_cifar(key[0], args.data_dir)
            _dataset(key, args.data_dir, device)
    except data.DataMissingError as err:
        sys.exit(f"error: {err}")
    for sub in ("runs", "checkpoints"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        if not args.resume:
            for stale in [*(out / sub).glob("*.json"), *(out / sub).glob("*.pt")]:
                stale.unlink()
    (out / "results.json").unlink(missing_ok=True)
    jobs = args.jobs or (min(2, os.cpu_count() or 1) if args.preset is None else 1)
    start = time.perf_counter()
    results = _train_all(runs, args, device, out, jobs, name)
    wall = time.perf_counter() - start
    panel_json = [p.to_json() for p in panels]
    by_id = {r["run_id"]: r for r in results}
    meta = {
        "preset": name, "argv": sys.argv[1:] if argv is None else argv, "jobs": jobs,
        "threads_per_job": torch.get_num_threads(), "device": device, "wall_time_s": wall,
    }  # fmt: skip
    summaries = summary.summarize(panel_json, by_id)
    payload = {**meta, "panels": panel_json, "summary": summaries, "runs": results}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    print(plot.write_all(out, panel_json, by_id, summaries))
    print(f"{len(results)} runs in {wall:.0f} s ({jobs} parallel jobs); results in {out}")


if __name__ == "__main__":
    main()
