"""Figures and tables of a results directory.

    python -m scripts.plot RESULTS_DIR

reads RESULTS_DIR/results.json (written by ``python -m scripts.reproduce``) and draws the
statistics of its ``summary`` (means, standard deviations and paired differences, computed once by
``scripts.summary``; only the per-epoch loss curves come from the runs). It writes, for the panels
it has: accuracy.png (final test accuracy vs epoch budget with ±1 std error bars, and
the paired difference to the baseline with its 95 % interval), loss.png (training-loss curves per
epoch at the longest budget, and final training loss vs budget), lambda.png (accuracy and paired
difference vs λ), input_range.png (accuracy with standardised, [0, 1] and [0, 255] inputs),
amortise.png (accuracy and paired differences to exact TrAct and to the baseline vs the statistics
refresh interval), and summary.md (the tables ``scripts.reproduce`` prints).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from scripts import summary as summ

BASELINE = summ.BASELINE
Runs = summ.Runs
COLORS = {BASELINE: "#555555"}
PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
Cells = dict[str, dict[Any, tuple[float, float]]]  # series → x → (mean, std)


def _color(name: str, names: Sequence[str]) -> str:
    others = [n for n in names if n != BASELINE]
    return COLORS.get(name) or PALETTE[others.index(name) % len(PALETTE)]


def _cells(summary: dict[str, Any], metric: str) -> Cells:
    """The mean ± std cells of ``metric`` in the summary's rows, the baseline first; a std of one
    seed is drawn as 0, and a cell without a finite value is left out."""
    out: Cells = defaultdict(dict)
    for row in summary["rows"]:
        stats = row[metric]
        for name, stat in ((BASELINE, stats["baseline"]), (row["series"], stats["series"])):
            if stat["mean"] is not None:
                out[name][row["x"]] = (stat["mean"], stat["std"] or 0.0)
    return out


def _errorbars(ax: Any, cells: Cells) -> None:
    """Every series of ``cells`` as mean ± std against x, the baseline dashed."""
    names = list(cells)
    for name, by_x in cells.items():
        xs = sorted(by_x)
        ax.errorbar(
            xs, [by_x[x][0] for x in xs], yerr=[by_x[x][1] for x in xs], label=name, marker="o",
            capsize=3, linestyle="--" if name == BASELINE else "-", color=_color(name, names),
        )  # fmt: skip


def _seeds(panel: dict[str, Any], runs: Runs) -> int:
    return len({runs[m["run_id"]]["config"]["seed"] for m in panel["members"]})


def _figure(panels: Sequence[dict[str, Any]], rows: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(panels)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    return fig, axes


def _finish(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig: Any, path: Path, note: str) -> None:
    """Write the figure with a one-line note under it, and free it."""
    import matplotlib.pyplot as plt

    fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=8, color="#444444")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _budget_axis(ax: Any, xs: Sequence[float]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(xs), [f"{x:g}" for x in xs])
    ax.minorticks_off()


def _log_loss_axis(ax: Any) -> None:
    """Log-scale y with plain-number labels at 1, 2 and 5 × each power of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(NullLocator())


def _delta_row(ax: Any, summary: dict[str, Any], xlabel: str) -> None:
    """The paired accuracy difference TrAct − baseline per x, mean ± 95 % interval."""
    names = list(dict.fromkeys(r["series"] for r in summary["rows"]))
    for i, name in enumerate(names):
        rows = [r for r in summary["rows"] if r["series"] == name and r["acc"]["paired"]]
        pairs = [r["acc"]["paired"] for r in rows]
        # One seed has no interval: draw the point alone.
        low = [p["mean"] - p["ci_low"] if p["ci_low"] is not None else 0.0 for p in pairs]
        high = [p["ci_high"] - p["mean"] if p["ci_high"] is not None else 0.0 for p in pairs]
        ax.errorbar(
            [r["x"] for r in rows], [p["mean"] for p in pairs], yerr=[low, high], marker="o",
            capsize=3, label=name, color=PALETTE[i % len(PALETTE)],
        )  # fmt: skip
    ax.axhline(0.0, color=COLORS[BASELINE], linestyle="--", linewidth=1)
    _finish(ax, xlabel, "Δ test accuracy (points)", f"{summary['title']}: TrAct − baseline")


def plot_accuracy(
    panels: Sequence[dict[str, Any]], runs: Runs, summaries: Sequence[dict[str, Any]], path: Path
) -> None:
    """Top: final test accuracy vs epoch budget, mean ± 1 std over seeds. Bottom: the paired
    difference to the baseline with its 95 % interval. One column per panel."""
    fig, axes = _figure(panels, rows=2)
    for col, (panel, summary) in enumerate(zip(panels, summaries, strict=True)):
        ax = axes[0][col]
        cells = _cells(summary, "acc")
        _errorbars(ax, cells)
        budgets = sorted({x for c in cells.values() for x in c})
        _budget_axis(ax, budgets)
        _finish(ax, "training budget (epochs)", "test accuracy (%)", panel["title"])
        _delta_row(axes[1][col], summary, "training budget (epochs)")
        _budget_axis(axes[1][col], budgets)
    seeds = _seeds(panels[0], runs)
    _save(
        fig, path,
        f"top: mean ± 1 std over {seeds} seeds; bottom: per-seed difference (same initialisation "
        "and batches), mean ± 95 % t interval; TrAct reuses the baseline's lr",
    )  # fmt: skip


def plot_loss(
    panels: Sequence[dict[str, Any]], runs: Runs, summaries: Sequence[dict[str, Any]], path: Path
) -> None:
    """Top: training loss per epoch at each panel's longest budget (mean; range over seeds
    shaded).
    Bottom: final training loss vs budget (mean ± 1 std). Log-scale losses."""
    fig, axes = _figure(panels, rows=2)
    for col, (panel, summary) in enumerate(zip(panels, summaries, strict=True)):
        top, bottom = axes[0][col], axes[1][col]
        longest = max(m["x"] for m in panel["members"])
        curves: dict[str, list[list[float]]] = defaultdict(list)
        for m in panel["members"]:
            history = runs[m["run_id"]]["history"]
            if m["x"] == longest and all(h["train_loss"] is not None for h in history):
                curves[m["series"]].append([h["train_loss"] for h in history])
        names = list(curves)
        for name, per_seed in curves.items():
            epochs = range(1, len(per_seed[0]) + 1)
            columns = [list(col) for col in zip(*per_seed, strict=True)]
            color = _color(name, names)
            style = "--" if name == BASELINE else "-"
            top.plot(epochs, [statistics.fmean(c) for c in columns], style, label=name, color=color)
            # The range over seeds (a mean - std band can reach below zero on a log axis).
            lows, highs = [min(c) for c in columns], [max(c) for c in columns]
            top.fill_between(epochs, lows, highs, color=color, alpha=0.15)
        _log_loss_axis(top)
        top.xaxis.get_major_locator().set_params(integer=True)
        _finish(top, f"epoch (of a {longest}-epoch run)", "training loss (nats)", panel["title"])
        cells = _cells(summary, "loss")
        _errorbars(bottom, cells)
        _log_loss_axis(bottom)
        _budget_axis(bottom, sorted({x for c in cells.values() for x in c}))
        _finish(bottom, "training budget (epochs)", "final training loss (nats)", panel["title"])
    seeds = _seeds(panels[0], runs)
    _save(
        fig, path,
        f"cross-entropy of the model on the un-augmented training set after each epoch; top: mean "
        f"and range over {seeds} seeds; bottom: mean ± 1 std",
    )  # fmt: skip


def plot_lambda(
    panels: Sequence[dict[str, Any]], runs: Runs, summaries: Sequence[dict[str, Any]], path: Path
) -> None:
    """Top: TrAct's test accuracy vs λ (mean ± 1 std) against the baseline's (line and band).
    Bottom: the paired difference to the baseline with its 95 % interval."""
    fig, axes = _figure(panels, rows=2)
    for col, (panel, summary) in enumerate(zip(panels, summaries, strict=True)):
        ax = axes[0][col]
        tract = _cells(summary, "acc")["TrAct"]
        lams = sorted(tract)
        ax.errorbar(
            lams, [tract[x][0] for x in lams], yerr=[tract[x][1] for x in lams], marker="o",
            capsize=3, label="TrAct", color=PALETTE[0],
        )  # fmt: skip
        base = summary["rows"][0]["acc"]["baseline"]  # one baseline for every λ
        mean, std = base["mean"], base["std"] or 0.0
        ax.axhline(mean, linestyle="--", color=COLORS[BASELINE], label="baseline")
        ax.axhspan(mean - std, mean + std, color=COLORS[BASELINE], alpha=0.12)
        _finish(ax, "λ (TrAct damping)", "test accuracy (%)", panel["title"])
        _delta_row(axes[1][col], summary, "λ (TrAct damping)")
        for a in (ax, axes[1][col]):
            a.set_xscale("log")
            a.set_xticks(lams, [f"{x:g}" for x in lams])
            a.minorticks_off()
    seeds = _seeds(panels[0], runs)
    _save(
        fig, path,
        f"top: mean ± 1 std over {seeds} seeds (baseline: dashed line and band); bottom: "
        "per-seed difference, mean ± 95 % t interval",
    )  # fmt: skip


def plot_input_range(
    panels: Sequence[dict[str, Any]], runs: Runs, summaries: Sequence[dict[str, Any]], path: Path
) -> None:
    """Grouped bars: test accuracy (mean ± 1 std) of each series for each input range (the
    paired differences are in the table)."""
    fig, axes = _figure(panels)
    for ax, panel, summary in zip(axes[0], panels, summaries, strict=True):
        cells = _cells(summary, "acc")
        names = list(cells)
        ranges = list(dict.fromkeys(row["x"] for row in summary["rows"]))  # the grid's order
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            stats = [cells[name][r] for r in ranges]
            pos = [j + (i - (len(names) - 1) / 2) * width for j in range(len(ranges))]
            means = [m for m, _ in stats]
            ax.bar(
                pos, means, width, yerr=[s for _, s in stats], capsize=3, label=name,
                color=_color(name, names), alpha=0.85,
            )  # fmt: skip
            for x, m in zip(pos, means, strict=True):
                ax.text(x, 2, f"{m:.1f}", ha="center", va="bottom", fontsize=7, color="white")
        ax.set_xticks(range(len(ranges)), ranges)
        ax.set_ylim(0, 115)  # headroom for the legend above 100 %
        ax.set_yticks(range(0, 101, 20))
        _finish(ax, "input range (model inputs)", "test accuracy (%)", panel["title"])
        ax.legend(fontsize=8, loc="upper center", ncol=len(names))
    seeds = _seeds(panels[0], runs)
    _save(
        fig, path,
        f"mean ± 1 std over {seeds} seeds; both arms keep the lr tuned for standardised inputs",
    )  # fmt: skip


def plot_amortise(
    panels: Sequence[dict[str, Any]], runs: Runs, summaries: Sequence[dict[str, Any]], path: Path
) -> None:
    """Top: TrAct's test accuracy vs ``stats_every`` (mean ± 1 std) against the levels of exact
    TrAct (``stats_every`` = 1, dotted) and the baseline (dashed line and band). Bottom: the paired
    differences to exact TrAct and to the baseline with their 95 % intervals. One column per
    setting and budget."""
    fig, axes = _figure(panels, rows=2)
    tract, base_color = PALETTE[0], COLORS[BASELINE]
    for col, (panel, summary) in enumerate(zip(panels, summaries, strict=True)):
        top, bottom = axes[0][col], axes[1][col]
        rows = summary["rows"]
        every = [r["x"] for r in rows]
        cells = [
            (r["x"], r["acc"]["series"]) for r in rows if r["acc"]["series"]["mean"] is not None
        ]
        top.errorbar(
            [x for x, _ in cells], [c["mean"] for _, c in cells],
            yerr=[c["std"] or 0.0 for _, c in cells], marker="o", capsize=3, label="TrAct",
            color=tract,
        )  # fmt: skip
        exact, base = rows[0]["acc"]["exact"], rows[0]["acc"]["baseline"]
        if exact["mean"] is not None:
            top.axhline(exact["mean"], linestyle=":", color=tract, label="exact TrAct")
        if base["mean"] is not None:
            std = base["std"] or 0.0
            top.axhline(base["mean"], linestyle="--", color=base_color, label="baseline")
            top.axhspan(base["mean"] - std, base["mean"] + std, color=base_color, alpha=0.12)
        _finish(top, "stats_every (steps per statistics refresh)", "test accuracy (%)",
                panel["title"])  # fmt: skip
        # The two differences side by side at each stats_every (a small offset on the log axis).
        for key, label, color, shift in (
            ("paired_exact", "TrAct − exact TrAct", tract, 0.92),
            ("paired", "TrAct − baseline", base_color, 1.08),
        ):
            pairs = [(r["x"], r["acc"][key]) for r in rows if r["acc"][key] is not None]
            low = [p["mean"] - p["ci_low"] if p["ci_low"] is not None else 0.0 for _, p in pairs]
            high = [p["ci_high"] - p["mean"] if p["ci_high"] is not None else 0.0 for _, p in pairs]
            bottom.errorbar(
                [x * shift for x, _ in pairs], [p["mean"] for _, p in pairs], yerr=[low, high],
                marker="o", capsize=3, linestyle="none", label=label, color=color,
            )  # fmt: skip
        bottom.axhline(0.0, color=base_color, linewidth=1)
        _finish(bottom, "stats_every (steps per statistics refresh)", "Δ test accuracy (points)",
                "paired differences, mean ± 95 % interval")  # fmt: skip
        for ax in (top, bottom):
            _budget_axis(ax, every)
    seeds = _seeds(panels[0], runs)
    _save(
        fig, path,
        f"top: mean ± 1 std over {seeds} seeds (exact TrAct: dotted; baseline: dashed line and "
        "band); bottom: per-seed difference, mean ± 95 % t interval; λ and lr as in the budget "
        "panels",
    )  # fmt: skip


Draw = Callable[[Sequence[dict[str, Any]], Runs, Sequence[dict[str, Any]], Path], None]
FIGURES: dict[str, tuple[str, Draw]] = {
    "budget": ("accuracy.png", plot_accuracy),
    "lambda": ("lambda.png", plot_lambda),
    "input_range": ("input_range.png", plot_input_range),
    "amortise": ("amortise.png", plot_amortise),
}


def write_all(
    results_dir: Path,
    panels: Sequence[dict[str, Any]],
    runs: Runs,
    summaries: Sequence[dict[str, Any]],
) -> str:
    """Write summary.md (from ``summaries``) and the figures of every panel kind present; return
    the markdown."""
    text = summ.markdown(summaries)
    (results_dir / "summary.md").write_text(text)
    by_title = {s["title"]: s for s in summaries}
    for kind, (name, draw) in FIGURES.items():
        chosen = [p for p in panels if p["kind"] == kind]
        if chosen:
            draw(chosen, runs, [by_title[p["title"]] for p in chosen], results_dir / name)
    budget = [p for p in panels if p["kind"] == "budget"]
    if budget:
        plot_loss(budget, runs, [by_title[p["title"]] for p in budget], results_dir / "loss.png")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.plot", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("results_dir", type=Path)
    args = parser.parse_args(argv)
    path = args.results_dir / "results.json"
    if not path.exists():
        raise SystemExit(
            f"no {path}; run python -m scripts.reproduce (with --resume to finish a killed run)"
        )
    results = json.loads(path.read_text())
    runs = {r["run_id"]: r for r in results["runs"]}
    print(write_all(args.results_dir, results["panels"], runs, results["summary"]))


if __name__ == "__main__":
    main()
