"""Turn a results directory into paper-style figures and a markdown table.

    python scripts/plot.py RESULTS_DIR

reads RESULTS_DIR/runs/*.json (one file per run, written by reproduce.py) and writes
RESULTS_DIR/accuracy.png (final test accuracy vs epoch budget, or vs λ; baselines dashed, TrAct
solid, ±1 std shaded, one panel per model/optimizer, like Fig. 3 of the paper),
RESULTS_DIR/curves.png (test accuracy per epoch of each panel's longest budget) and
RESULTS_DIR/summary.md (the table reproduce.py prints).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASELINE = "baseline"


@dataclass(frozen=True)
class Cell:
    """Final test accuracies of the runs of one panel, series and x value (budget or λ)."""

    by_seed: tuple[tuple[int, float], ...]

    @property
    def accs(self) -> list[float]:
        return [acc for _, acc in self.by_seed]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accs)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accs) if len(self.accs) > 1 else 0.0

    def text(self) -> str:
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f}"


def paired(base: Cell, other: Cell) -> str:
    """Mean accuracy difference over the seeds both share (same init and data order), in
    points, and on how many of them ``other`` is ahead."""
    ref = dict(base.by_seed)
    diffs = [acc - ref[seed] for seed, acc in other.by_seed if seed in ref]
    if not diffs:
        return ""
    wins = sum(d > 0 for d in diffs)
    return f"{100 * statistics.fmean(diffs):+.2f} ({wins}/{len(diffs)})"


Table = dict[str, dict[str, dict[float, Cell]]]  # panel → series → x → cell


def load_results(results_dir: Path) -> list[dict[str, Any]]:
    """Every run's result dict under ``results_dir/runs``, in the grid's order where
    ``results.json`` records it (so panels come out as reproduce.py printed them)."""
    files = sorted((results_dir / "runs").glob("*.json"))
    if not files:
        raise SystemExit(f"no run results in {results_dir / 'runs'}; run reproduce.py first")
    runs = [json.loads(f.read_text()) for f in files]
    order: dict[str, int] = {}
    if (results_dir / "results.json").exists():
        grid = json.loads((results_dir / "results.json").read_text())["runs"]
        order = {r["run_id"]: i for i, r in enumerate(grid)}
    return sorted(runs, key=lambda r: order.get(r["run_id"], len(order)))


def _x(config: dict[str, Any]) -> float:
    """A run's x value: its budget, or its λ where the panel plots against λ (a run without
    TrAct then has none: NaN, drawn as a horizontal line)."""
    if config["x_axis"] != "lam":
        return float(config["epochs"])
    return float(config["lam"]) if config["tract"] else math.nan


def tabulate(results: list[dict[str, Any]]) -> Table:
    """Group final test accuracies by panel, series and x value, in first-seen order."""
    accs: dict[str, dict[str, dict[float, list[tuple[int, float]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in results:
        c = r["config"]
        accs[c["panel"]][c["series"]][_x(c)].append((c["seed"], r["final_test_acc"]))
    return {
        panel: {
            s: {x: Cell(tuple(sorted(v))) for x, v in sorted(xs.items())}
            for s, xs in series.items()
        }
        for panel, series in accs.items()
    }


def _x_axis(results: list[dict[str, Any]], panel: str) -> str:
    return next(r["config"]["x_axis"] for r in results if r["config"]["panel"] == panel)


def first_match(table: dict[str, dict[float, Cell]], series: str) -> tuple[float, float | None]:
    """The baseline's best mean accuracy and the smallest budget where ``series`` reaches it."""
    best = max(c.mean for c in table[BASELINE].values())
    hits = [x for x, c in table[series].items() if c.mean >= best]
    return best, (min(hits) if hits else None)


def _xs(series: dict[str, dict[float, Cell]]) -> list[float]:
    """The x values of a panel, without the NaN of runs that have no λ."""
    return sorted({x for cells in series.values() for x in cells if not math.isnan(x)})


def _cell(cells: dict[float, Cell], x: float) -> Cell | None:
    """The cell at ``x``; a series without λ (NaN) has the same cell everywhere."""
    flat = [c for key, c in cells.items() if math.isnan(key)]
    return flat[0] if flat else cells.get(x)


def _fmt_x(x: float) -> str:
    return f"{x:g}"


def markdown(results: list[dict[str, Any]]) -> str:
    """Mean ± std test accuracy (%) per panel × budget (or λ) × series, the paired difference
    to the baseline, then the budget at which each series reaches the baseline's best."""
    table = tabulate(results)
    lines: list[str] = []
    for panel, series in table.items():
        names = list(series)
        by_lam = _x_axis(results, panel) == "lam"
        xs = _xs(series)
        others = [n for n in names if n != BASELINE] if BASELINE in series else []
        head = ["λ" if by_lam else "epochs", *names, *(f"Δ {n} (wins)" for n in others)]
        lines += [f"### {panel}", "", "| " + " | ".join(head) + " |"]
        lines.append("|" + " --- |" * len(head))
        for x in xs:
            cells = [_cell(series[name], x) for name in names]
            row = [_fmt_x(x), *(c.text() if c else "" for c in cells)]
            base = _cell(series[BASELINE], x) if others else None
            for name in others:
                other = _cell(series[name], x)
                row.append(paired(base, other) if base and other else "")
            lines.append("| " + " | ".join(row) + " |")
        if BASELINE in series and not by_lam:
            lines.append("")
            for name in names:
                if name == BASELINE:
                    continue
                best, hit = first_match(series, name)
                where = f"at {_fmt_x(hit)} epochs" if hit is not None else "at no budget tried"
                lines.append(f"- {name} reaches the baseline's best ({100 * best:.2f}%) {where}")
        lines.append("")
    return "\n".join(lines)


def _style(name: str) -> dict[str, Any]:
    return {"linestyle": "--" if name == BASELINE or "TrAct" not in name else "-", "marker": "o"}


def plot_accuracy(results: list[dict[str, Any]], path: Path) -> None:
    """Final test accuracy vs budget (or λ), one panel per model/optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = tabulate(results)
    fig, axes = plt.subplots(1, len(table), figsize=(4.2 * len(table), 3.6), squeeze=False)
    for ax, (panel, series) in zip(axes[0], table.items(), strict=True):
        by_lam = _x_axis(results, panel) == "lam"
        xs_all = _xs(series)
        for name, cells in series.items():
            xs = [x for x in xs_all if _cell(cells, x) is not None]
            picked = [_cell(cells, x) for x in xs]
            mean = [100 * c.mean for c in picked if c is not None]
            std = [100 * c.std for c in picked if c is not None]
            (line,) = ax.plot(xs, mean, label=name, **_style(name))
            low = [m - s for m, s in zip(mean, std, strict=True)]
            high = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
        ax.set_xscale("log", base=10 if by_lam else 2)
        ax.set_xticks(xs_all, [_fmt_x(x) for x in xs_all])
        _style_panel(ax, "λ" if by_lam else "epochs", panel)
    _save(fig, path)


def _style_panel(ax: Any, xlabel: str, title: str) -> None:
    """Labels, title, grid and legend shared by every accuracy panel."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig: Any, path: Path) -> None:
    """Write the figure as a PNG and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(results: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy per epoch for each panel's longest budget (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(tabulate(results))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        runs = [r for r in results if r["config"]["panel"] == panel]
        longest = max(r["config"]["epochs"] for r in runs)
        curves: dict[str, list[list[float]]] = defaultdict(list)
        for r in runs:
            if r["config"]["epochs"] == longest:
                curves[r["config"]["series"]].append([h["test_acc"] for h in r["history"]])
        for name, accs in curves.items():
            mean = [100 * statistics.fmean(col) for col in zip(*accs, strict=True)]
            ax.plot(range(1, len(mean) + 1), mean, label=name, **{**_style(name), "marker": ""})
        _style_panel(ax, f"epoch (budget {longest})", panel)
    _save(fig, path)


def write_all(results_dir: Path, results: list[dict[str, Any]]) -> str:
    """Write summary.md, accuracy.png and curves.png; return the markdown table."""
    text = markdown(results)
    (results_dir / "summary.md").write_text(text)
    plot_accuracy(results, results_dir / "accuracy.png")
    plot_curves(results, results_dir / "curves.png")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", type=Path)
    args = parser.parse_args()
    print(write_all(args.results_dir, load_results(args.results_dir)))


if __name__ == "__main__":
    main()
