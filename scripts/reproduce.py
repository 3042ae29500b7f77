"""Baseline vs TrAct: the CPU digits demo (default) and the paper's CIFAR experiments (--preset).

    python scripts/reproduce.py                 # digits demo, CPU, a few minutes
    python scripts/reproduce.py --quick         # smoke test, under a minute
    python scripts/reproduce.py --preset cifar10-resnet18-sgd --data-dir ~/data --device cuda

Writes OUT/runs/RUN_ID.json per run (configuration, per-epoch train/test accuracy and loss, wall
time), OUT/results.json (all runs), OUT/summary.md, OUT/accuracy.png and OUT/curves.png; prints the
table. Each run checkpoints every epoch to OUT/checkpoints; ``--resume`` keeps finished runs and
continues unfinished ones from their last epoch, to the same final numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import data
import plot
import presets
import torch
from tqdm import tqdm
from train import RunConfig, load_data, train_run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(presets.PRESETS), help="paper experiment")
    parser.add_argument("--quick", action="store_true", help="reduced demo (CI smoke test)")
    parser.add_argument("--out", type=Path, help="results directory (default results/PRESET)")
    parser.add_argument("--epochs", type=int, nargs="+", help="epoch budgets")
    parser.add_argument("--seeds", type=int, help="number of seeds (0 … N-1)")
    parser.add_argument("--lam", type=float, nargs="+", help="TrAct λ value(s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="CIFAR root folder")
    parser.add_argument("--download", action="store_true", help="fetch CIFAR if it is missing")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep finished runs in OUT and continue unfinished ones from their checkpoints "
        "(without it, OUT/runs and OUT/checkpoints are cleared first)",
    )
    return parser.parse_args(argv)


def _device(name: str | None) -> torch.device:
    if name is not None:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _datasets(
    runs: list[RunConfig], args: argparse.Namespace, device: torch.device
) -> dict[tuple[str, str], data.ImageData]:
    """Each (dataset, input range) the grid needs, loaded once and moved to ``device``."""
    out = {}
    for run in runs:
        key = (run.dataset, run.input_range)
        if key in out:
            continue
        if run.dataset != "digits" and args.download:
            data.download_cifar(run.dataset, args.data_dir)
        out[key] = load_data(run, args.data_dir).to(device)
    return out


def _run_one(
    run: RunConfig,
    d: data.ImageData,
    device: torch.device,
    out: Path,
    resume: bool,
    bar: tqdm[Any],
) -> dict[str, Any]:
    """Train one run (with ``resume``: load it if finished, else continue it) and write its JSON."""
    result_path = out / "runs" / f"{run.run_id}.json"
    checkpoint = out / "checkpoints" / f"{run.run_id}.pt"
    if resume and result_path.exists():
        bar.update(run.epochs)
        return dict(json.loads(result_path.read_text()))
    bar.set_postfix_str(f"{run.series} · {run.panel} · {run.epochs} ep · seed {run.seed}")
    done = 0

    def tick(epoch: int, _record: dict[str, float]) -> None:
        nonlocal done
        bar.update(epoch - done)  # a resumed run jumps over the epochs it had already
        done = epoch

    result = train_run(run, d, device, checkpoint, tick)
    result_path.write_text(json.dumps(result, indent=1))
    checkpoint.unlink(missing_ok=True)
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.preset is None:
        torch.set_num_threads(1)  # the demo's models are too small to gain from more threads
    name = args.preset or ("demo-quick" if args.quick else "demo")
    out: Path = args.out or Path("results") / name
    overrides = presets.Overrides(args.epochs, args.seeds, args.lam)
    runs = presets.build(args.preset, overrides, quick=args.quick)
    device = _device(args.device)
    try:
        datasets = _datasets(runs, args, device)
    except data.DataMissingError as err:
        sys.exit(f"error: {err}")
    for sub in ("runs", "checkpoints"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        if not args.resume:
            for stale in [*(out / sub).glob("*.json"), *(out / sub).glob("*.pt")]:
                stale.unlink()
    if not args.resume:
        (out / "results.json").unlink(missing_ok=True)
    start = time.perf_counter()
    results = []
    total = sum(r.epochs for r in runs)
    with tqdm(total=total, desc=f"{name}: {len(runs)} runs", unit="epoch") as bar:
        for run in runs:
            d = datasets[(run.dataset, run.input_range)]
            results.append(_run_one(run, d, device, out, args.resume, bar))
    meta = {"preset": name, "argv": sys.argv[1:], "wall_time_s": time.perf_counter() - start}
    (out / "results.json").write_text(json.dumps({**meta, "runs": results}, indent=1))
    print(plot.write_all(out, results))
    print(
        f"{len(results)} runs in {meta['wall_time_s']:.0f} s; results, table and figures in {out}"
    )


if __name__ == "__main__":
    main()
