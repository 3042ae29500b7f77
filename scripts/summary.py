"""Numbers behind the tables: per-cell mean ± std, paired differences and speed-up factors.

Input: the panels of a grid (``Panel.to_json()`` form) and the per-run results (``train.train_run``
output) by run id. Output: one summary dict per panel (written to results.json) and the markdown
rendering of it (printed and written to summary.md). Accuracies are final test accuracies in %,
losses are final training losses in nats (cross-entropy of the final model on the un-augmented
training set). A run that diverged has no loss; it keeps its (chance-level) accuracy.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

BASELINE = "baseline"
EXACT = 1  # the x of exact TrAct in an amortised-statistics panel (stats_every = 1)
METRICS = {  # metric → (result key, scale, higher is better, label)
    "acc": ("final_test_acc", 100.0, True, "test accuracy (%)"),
    "loss": ("final_train_loss", 1.0, False, "training loss (nats)"),
}

Runs = dict[str, dict[str, Any]]
Values = dict[int, float | None]  # seed → value (None: diverged)


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation of a cell's finite values, and how many diverged."""

    mean: float | None
    std: float | None
    n: int
    diverged: int


@dataclass(frozen=True)
class Paired:
    """Per-seed differences ``other − baseline`` over the seeds both have finite values for."""

    mean: float
    se: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    better: int  # seeds where ``other`` is strictly better (higher acc, lower loss)
    ties: int


def stat(values: Values) -> Stat:
    """Mean ± sample std of the finite values (std ``None`` for fewer than two)."""
    finite = [v for v in values.values() if v is not None]
    mean = statistics.fmean(finite) if finite else None
    std = statistics.stdev(finite) if len(finite) > 1 else None
    return Stat(mean, std, len(finite), len(values) - len(finite))


def t_quantile(level: float, dof: int) -> float:
    """The two-sided ``level`` quantile of Student's t with ``dof`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, dof))


def paired(base: Values, other: Values, higher_is_better: bool) -> Paired | None:
    """Paired difference with its standard error and 95 % t confidence interval, and the number
    of seeds on which ``other`` is better; ``None`` when no seed has both values."""
    seeds = sorted(s for s in base.keys() & other.keys())
    diffs = [o - b for s in seeds if (b := base[s]) is not None and (o := other[s]) is not None]
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    se = low = high = None
    if len(diffs) > 1:
        se = statistics.stdev(diffs) / math.sqrt(len(diffs))
        half = t_quantile(0.95, len(diffs) - 1) * se
        low, high = mean - half, mean + half
    sign = 1 if higher_is_better else -1
    better = sum(sign * d > 0 for d in diffs)
    ties = sum(d == 0 for d in diffs)
    return Paired(mean, se, low, high, len(diffs), better, ties)


def speedup(
    base: dict[float, float | None], other: dict[float, float | None], higher_is_better: bool
) -> dict[str, Any]:
    """The paper's headline metric: the baseline's best mean over budgets, the smallest budget at
    which the baseline attains it, the smallest budget at which ``other``'s mean reaches it, and
    their ratio (``None`` when ``other`` never reaches it). Budgets come from the grid, so the
    factor is resolved only to the grid's spacing; ``budget_interpolated`` estimates where between
    that budget and the one before it ``other`` crosses the best (linear in the metric against
    log budget), and ``factor_interpolated`` the matching ratio (``None`` without a budget
    before it)."""
    sign = 1 if higher_is_better else -1
    finite = {x: v for x, v in base.items() if v is not None}
    best = max(finite.values(), key=lambda v: sign * v)
    base_budget = min(x for x, v in finite.items() if v == best)
    curve = sorted((x, v) for x, v in other.items() if v is not None)
    hit = next((i for i, (_, v) in enumerate(curve) if sign * (v - best) >= 0), None)
    out: dict[str, Any] = {
        "baseline_best": best, "baseline_budget": base_budget, "budget": None, "factor": None,
        "budget_interpolated": None, "factor_interpolated": None,
    }  # fmt: skip
    if hit is None:
        return out
    budget = curve[hit][0]
    out.update(budget=budget, factor=base_budget / budget)
    if hit > 0:
        (x0, v0), (x1, v1) = curve[hit - 1], curve[hit]
        t = (best - v0) / (v1 - v0)  # v0 is short of best and v1 reaches it: 0 < t ≤ 1
        crossing = x0 * (x1 / x0) ** t
        out.update(budget_interpolated=crossing, factor_interpolated=base_budget / crossing)
    return out


def _values(panel: dict[str, Any], runs: Runs, metric: str) -> dict[str, dict[Any, Values]]:
    """series → x → seed → value of ``metric`` (scaled)."""
    key, scale, _, _ = METRICS[metric]
    out: dict[str, dict[Any, Values]] = defaultdict(lambda: defaultdict(dict))
    for m in panel["members"]:
        r = runs[m["run_id"]]
        v = r[key]
        out[m["series"]][m["x"]][r["config"]["seed"]] = None if v is None else scale * v
    return out


def _settings(panel: dict[str, Any], runs: Runs) -> str:
    """The settings every run of the panel shares, in words."""
    r = runs[panel["members"][0]["run_id"]]
    c = r["config"]
    seeds = sorted({runs[m["run_id"]]["config"]["seed"] for m in panel["members"]})
    opt = {"sgd": f"SGD (momentum {c['momentum']:g})", "adam": "Adam"}.get(
        c["optimizer"], c["optimizer"]
    )
    parts = [
        f"{c['dataset']}, model {c['model']}",
        f"{opt} lr {c['lr']:g}" if panel["kind"] != "tuning" else opt,
        f"batch {c['batch_size']}",
        f"{c['schedule']} schedule",
        f"weight decay {c['weight_decay']:g}",
        f"augmentation: {r['augmentation']}",
        f"{len(seeds)} seeds ({seeds[0]}–{seeds[-1]})" if len(seeds) > 1 else f"seed {seeds[0]}",
        f"evaluated on the {c['evaluate_on']} split",
    ]
    if c["label_smoothing"]:
        parts.insert(4, f"label smoothing {c['label_smoothing']:g}")
    return "; ".join(parts)


def panel_summary(panel: dict[str, Any], runs: Runs) -> dict[str, Any]:
    """Rows (one per x and non-baseline series) with both arms' stats and the paired
    differences; for amortised-statistics panels also exact TrAct's stats and the paired
    differences to it (``exact``, ``paired_exact``; ``None`` in exact TrAct's own row); for
    budget panels, the speed-up factor of every series in accuracy and loss; for the lr search,
    validation accuracy per lr and budget and the lr it selects."""
    values = {metric: _values(panel, runs, metric) for metric in METRICS}
    series = list(values["acc"])
    out: dict[str, Any] = {
        "title": panel["title"], "kind": panel["kind"], "settings": _settings(panel, runs),
    }  # fmt: skip
    if panel["kind"] == "tuning":
        return {**out, **_tuning(values["acc"])}
    xs = list(dict.fromkeys(m["x"] for m in panel["members"] if m["x"] is not None))
    if panel["kind"] != "input_range":
        xs.sort()  # budgets and λ ascending; input ranges keep the grid's order
    rows = []
    for name in (s for s in series if s != BASELINE):
        for x in xs:
            if x not in values["acc"][name]:
                continue
            row: dict[str, Any] = {"x": x, "series": name}
            for metric, (_, _, higher, _) in METRICS.items():
                cells = values[metric]
                base = cells[BASELINE].get(x, cells[BASELINE].get(None, {}))
                other = cells[name][x]
                p = paired(base, other, higher)
                row[metric] = {
                    "baseline": asdict(stat(base)),
                    "series": asdict(stat(other)),
                    "paired": None if p is None else asdict(p),
                }
                if panel["kind"] == "amortise":
                    exact = cells[name].get(EXACT, {})
                    q = None if x == EXACT else paired(exact, other, higher)
                    row[metric]["exact"] = asdict(stat(exact))
                    row[metric]["paired_exact"] = None if q is None else asdict(q)
            rows.append(row)
    out["rows"] = rows
    if panel["kind"] == "budget":
        out["speedup"] = [
            {"series": name, "metric": metric, **_speedup(values[metric], name, higher)}
            for name in series
            if name != BASELINE
            for metric, (_, _, higher, _) in METRICS.items()
        ]
    return out


def _speedup(cells: dict[str, dict[Any, Values]], name: str, higher: bool) -> dict[str, Any]:
    means = {s: {x: stat(v).mean for x, v in cells[s].items()} for s in (BASELINE, name)}
    return speedup(means[BASELINE], means[name], higher)


def _tuning(acc: dict[str, dict[Any, Values]]) -> dict[str, Any]:
    """Mean validation accuracy per lr and budget, and the best lr of every budget."""
    rows = [
        {"series": name, "by_budget": {x: stat(v).mean for x, v in sorted(cells.items())}}
        for name, cells in acc.items()
    ]
    budgets = sorted({x for r in rows for x in r["by_budget"]})
    selected = {
        b: max(rows, key=lambda r: r["by_budget"].get(b) or -math.inf)["series"] for b in budgets
    }
    return {"rows": rows, "selected": selected}


def summarize(panels: Sequence[dict[str, Any]], runs: Runs) -> list[dict[str, Any]]:
    """``panel_summary`` of every panel."""
    return [panel_summary(p, runs) for p in panels]


# ---------------------------------------------------------------------------------------------
# Markdown


def _num(v: float | None, digits: int) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _cell(s: dict[str, Any], digits: int) -> str:
    if s["mean"] is None:
        return f"diverged ({s['diverged']})"
    text = f"{_num(s['mean'], digits)} ± {_num(s['std'], digits)}"
    return text + (f" ({s['diverged']} diverged)" if s["diverged"] else "")


def _delta(p: dict[str, Any] | None, digits: int) -> str:
    if p is None:
        return "—"
    if p["se"] is None:
        return f"{p['mean']:+.{digits}f} (n = 1)"
    return (
        f"{p['mean']:+.{digits}f} ± {p['se']:.{digits}f} "
        f"[{p['ci_low']:+.{digits}f}, {p['ci_high']:+.{digits}f}]"
    )


def _count(p: dict[str, Any] | None) -> str:
    if p is None:
        return "—"
    ties = f" ({p['ties']} tied)" if p["ties"] else ""
    return f"{p['better']}/{p['n']}{ties}"


DIGITS = {"acc": 2, "loss": 4}


def _fmt_x(x: Any) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) else str(x)


def _table(summary: dict[str, Any]) -> list[str]:
    kind = summary["kind"]
    names = {r["series"] for r in summary["rows"]}
    x_head = {"budget": "epochs", "lambda": "λ", "input_range": "inputs"}[kind]
    head = [x_head] + (["series"] if len(names) > 1 else [])
    for metric in METRICS:
        short = "acc (%)" if metric == "acc" else "train loss"
        if kind != "lambda":
            head.append(f"baseline {short}")
        head += [f"TrAct {short}", f"Δ {'pts' if metric == 'acc' else 'loss'} ± SE [95% CI]"]
        head.append("TrAct higher" if metric == "acc" else "TrAct lower")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in summary["rows"]:
        cells = [_fmt_x(row["x"])] + ([row["series"]] if len(names) > 1 else [])
        for metric, digits in DIGITS.items():
            m = row[metric]
            if kind != "lambda":
                cells.append(_cell(m["baseline"], digits))
            cells += [_cell(m["series"], digits), _delta(m["paired"], digits), _count(m["paired"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _speedup_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    for s in summary["speedup"]:
        metric = "test accuracy" if s["metric"] == "acc" else "training loss"
        best = f"{s['baseline_best']:.{DIGITS[s['metric']]}f}"
        where = f"at {s['baseline_budget']:g} epochs"
        if s["budget"] is None:
            verdict = "does not reach it at any budget tried (no speed-up on this grid)"
        else:
            verdict = f"reaches it at {s['budget']:g} epochs: speed-up {s['factor']:g}× on the grid"
            if s["budget_interpolated"] is not None:
                verdict += (
                    f" (≈ {s['factor_interpolated']:.2f}× interpolated: crossing at "
                    f"≈ {s['budget_interpolated']:.1f} epochs)"
                )
            else:
                verdict += " (at the smallest budget: a lower bound)"
        lines.append(
            f"- {metric}: the baseline's best mean is {best} ({where}); {s['series']} {verdict}"
        )
    return lines


def _amortise_table(summary: dict[str, Any]) -> list[str]:
    """Accuracy per ``stats_every`` and its paired differences to exact TrAct and the baseline."""
    head = [
        "stats_every", "TrAct acc (%)", "Δ pts vs exact ± SE [95% CI]", "higher than exact",
        "Δ pts vs baseline ± SE [95% CI]", "higher than baseline",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    digits = DIGITS["acc"]
    for row in summary["rows"]:
        acc = row["acc"]
        exact = ["(exact)"] * 2 if row["x"] == EXACT else [
            _delta(acc["paired_exact"], digits), _count(acc["paired_exact"])
        ]  # fmt: skip
        cells = [_fmt_x(row["x"]), _cell(acc["series"], digits), *exact]
        cells += [_delta(acc["paired"], digits), _count(acc["paired"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _baseline_line(summary: dict[str, Any]) -> str:
    row = summary["rows"][0]
    acc = _cell(row["acc"]["baseline"], DIGITS["acc"])
    loss = _cell(row["loss"]["baseline"], DIGITS["loss"])
    return f"Baseline (no λ): test accuracy {acc} %, training loss {loss}."


def _tuning_table(summary: dict[str, Any]) -> list[str]:
    budgets = list(summary["selected"])
    head = ["lr", *(f"{b:g} epochs" for b in budgets)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in summary["rows"]:
        cells = [row["series"]]
        for b in budgets:
            text = _num(row["by_budget"].get(b), 2)
            cells.append(f"**{text}**" if summary["selected"][b] == row["series"] else text)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(summaries: Sequence[dict[str, Any]]) -> str:
    """All panels as markdown: a settings line, the table, and (budget panels) the speed-ups."""
    lines: list[str] = []
    for s in summaries:
        lines += [f"### {s['title']}", "", s["settings"], ""]
        if s["kind"] == "tuning":
            lines += [
                "Mean validation accuracy (%) over seeds; bold: the lr selected for that budget.",
                "",
                *_tuning_table(s),
                "",
            ]
            continue
        if s["kind"] in ("lambda", "amortise"):
            lines += [_baseline_line(s), ""]
        lines += _amortise_table(s) if s["kind"] == "amortise" else _table(s)
        if s["kind"] == "budget":
            lines += ["", *_speedup_lines(s)]
        lines.append("")
    if all(s["kind"] == "tuning" for s in summaries):
        return "\n".join(lines)
    lines += [
        "Accuracy: final test accuracy (%), mean ± std over seeds. Training loss: cross-entropy "
        "(nats) of the final model on the un-augmented training set. Δ: TrAct − baseline per "
        "seed (same initialisation and batches), mean ± standard error [95 % t interval]; the "
        "last column of each metric counts the seeds where TrAct is better. Speed-up: the "
        "baseline's best budget over the smallest budget at which TrAct's mean reaches the "
        "baseline's best mean on the budget grid; the interpolated factor places the crossing "
        "between the two budgets around it, linear in the metric against log budget (an "
        "estimate).",
        "",
    ]
    if any(s["kind"] == "amortise" for s in summaries):
        lines += [
            "Amortised statistics: TrAct refreshes the first layer's statistics every stats_every "
            "steps and reuses its factor in between; stats_every = 1 is exact TrAct (the same runs "
            "as in the budget panels). Δ vs exact and vs baseline: per-seed accuracy differences "
            "(same initialisation and batches), mean ± standard error [95 % t interval]; 'higher' "
            "counts the seeds where the amortised run's accuracy is higher.",
            "",
        ]
    return "\n".join(lines)
