"""The run grids: the CPU digits demo and the paper's CIFAR experiments.

The paper: F. Petersen, C. Borgelt and S. Ermon, "TrAct: Making First-layer Pre-Activations
Trainable", NeurIPS 2024 (arXiv 2410.23970); figure numbers below are its figures.

A grid is a list of panels; a panel is what one table and one subplot show: members, each a run
with the series (line or bar) and x value (budget, λ or input range) it is drawn at. The same run
can belong to several panels (it is trained once). Every TrAct run is paired with the baseline
run of the same seed, budget and learning rate: the learning rate is the baseline's best and
TrAct reuses it, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from scripts.train import RunConfig

BASELINE = "baseline"
#: Panel kinds: accuracy vs epoch budget, vs λ (one baseline for the panel), vs input range, vs
#: TrAct's statistics refresh interval ``stats_every`` (one baseline; 1 is exact TrAct, the
#: reference of the others), and the demo's learning-rate search (validation accuracy vs budget,
#: one series per lr).
KINDS = ("budget", "lambda", "input_range", "amortise", "tuning")
RANGE_LABELS = {"standard": "standardised", "unit": "[0, 1]", "byte": "[0, 255]"}


def tract_series(lam: float) -> str:
    """The label of TrAct with damping ``lam``."""
    return f"TrAct λ={lam:g}"


@dataclass(frozen=True)
class Member:
    """One run of a panel: its series, and its x value (``None``: the panel's single reference,
    drawn across the whole x range, as the baseline of a λ sweep)."""

    series: str
    x: float | str | None
    run: RunConfig


@dataclass(frozen=True)
class Panel:
    """One table and one subplot."""

    title: str
    kind: str
    members: tuple[Member, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Panel.kind must be one of {KINDS}, got {self.kind!r}")

    def to_json(self) -> dict[str, Any]:
        """The panel with run ids instead of configurations (results.json's ``panels``)."""
        members = [{"series": m.series, "x": m.x, "run_id": m.run.run_id} for m in self.members]
        return {"title": self.title, "kind": self.kind, "members": members}


@dataclass(frozen=True)
class Overrides:
    """Command-line overrides; ``None`` keeps the preset's value."""

    epochs: Sequence[int] | None = None
    seeds: int | None = None
    lams: Sequence[float] | None = None


def _budget_panel(
    title: str, base: RunConfig, epochs: Sequence[int], seeds: int, lams: Sequence[float],
    lr_table: dict[int, float] | None = None,
) -> Panel:  # fmt: skip
    """Baseline and TrAct (one series per λ) at every budget and seed; lr from ``lr_table``
    (largest listed budget ≤ the run's) when given, else the template's."""
    members = []
    for e in epochs:
        lr = base.lr if lr_table is None else lr_for(e, lr_table)
        for s in range(seeds):
            run = replace(base, epochs=e, seed=s, lr=lr)
            members.append(Member(BASELINE, e, run))
            members += [Member(tract_series(lam), e, replace(run, lam=lam)) for lam in lams]
    return Panel(title, "budget", tuple(members))


def _lambda_panel(title: str, base: RunConfig, seeds: int, lams: Sequence[float]) -> Panel:
    """TrAct at every λ against one baseline, at the template's budget."""
    members = []
    for s in range(seeds):
        run = replace(base, seed=s)
        members.append(Member(BASELINE, None, run))
        members += [Member("TrAct", lam, replace(run, lam=lam)) for lam in lams]
    return Panel(title, "lambda", tuple(members))


def _range_panel(title: str, base: RunConfig, seeds: int, lams: Sequence[float]) -> Panel:
    """Baseline and TrAct with standardised, [0, 1] and [0, 255] inputs; every run keeps the
    template's learning rate (the one tuned for standardised inputs), as in the paper's Fig. 8."""
    members = []
    for rng, label in RANGE_LABELS.items():
        for s in range(seeds):
            run = replace(base, input_range=rng, seed=s)
            members.append(Member(BASELINE, label, run))
            members += [Member(tract_series(lam), label, replace(run, lam=lam)) for lam in lams]
    return Panel(title, "input_range", tuple(members))


def _amortise_panel(
    title: str, base: RunConfig, seeds: int, lam: float, every: Sequence[int]
) -> Panel:
    """TrAct with λ = ``lam`` at every ``stats_every`` in ``every`` against one baseline, at the
    template's budget; the members at ``stats_every`` = 1 are exact TrAct (the same runs as a
    budget panel's TrAct at that budget, so they are trained once)."""
    members = []
    for s in range(seeds):
        run = replace(base, seed=s)
        members.append(Member(BASELINE, None, run))
        members += [Member("TrAct", k, replace(run, lam=lam, stats_every=k)) for k in every]
    return Panel(title, "amortise", tuple(members))


# ---------------------------------------------------------------------------------------------
# The digits demo (CPU)


@dataclass(frozen=True)
class DemoSetting:
    """A model/optimizer pair of the demo, its baseline learning rate per budget (from the
    search over ``lr_grid``)."""

    title: str
    model: str
    optimizer: str
    lrs: tuple[tuple[int, float], ...]  # (budget, lr)
    lr_grid: tuple[float, ...]

    def lr(self, epochs: int) -> float:
        """The searched lr of the largest searched budget ≤ ``epochs``."""
        return lr_for(epochs, dict(self.lrs))

    def template(self, epochs: int, lr: float | None = None) -> RunConfig:
        """The baseline run of this setting (seed 0) with the demo's protocol."""
        return RunConfig(
            "digits", self.model, self.optimizer, self.lr(epochs) if lr is None else lr, epochs,
            0, batch_size=64, augment="shift1",
        )  # fmt: skip


# Learning rates: per budget, the baseline's best mean validation accuracy over 5 seeds, on a
# stratified 20 % of the training images held out from training (`python -m scripts.reproduce
# --tune-lr`; the test set is not used). TrAct reuses them untuned. ViT / SGD, a setting the
# paper did not run (its ViT trains with Adam), is not part of the demo.
DEMO_SETTINGS = (
    DemoSetting("CNN / SGD", "digits_cnn", "sgd",
                ((1, 1.0), (2, 1.0), (4, 1.0), (8, 1.0), (16, 0.3)), (0.1, 0.3, 1.0, 3.0)),
    DemoSetting("CNN / Adam", "digits_cnn", "adam",
                ((1, 1e-2), (2, 3e-2), (4, 3e-2), (8, 1e-2), (16, 3e-2)),
                (3e-3, 1e-2, 3e-2, 0.1)),
    DemoSetting("ViT / Adam", "digits_transformer", "adam",
                ((1, 3e-3), (2, 3e-3), (4, 3e-3), (8, 3e-3), (16, 3e-3)),
                (3e-4, 1e-3, 3e-3, 1e-2)),
)  # fmt: skip
DEMO_EPOCHS = (1, 2, 4, 8, 16)
DEMO_SEEDS = 10
DEMO_LAM = 0.1
DEMO_LAMS = (0.05, 0.1, 0.2, 0.5, 1.0)  # the λ panel (paper Fig. 6)
SHORT_BUDGET = 2  # epochs of the λ and input-range panels
#: The amortised-statistics panels: TrAct λ = DEMO_LAM at these ``stats_every`` and budgets.
AMORTISE_EVERY = (1, 4, 16, 64)
AMORTISE_EPOCHS = (2, 8)
TUNE_SEEDS = 5
QUICK_EPOCHS = (1, 2)
QUICK_SEEDS = 2
QUICK_SHORT_BUDGET = 1


def demo(o: Overrides, quick: bool = False) -> list[Panel]:
    """Digits: accuracy vs budget for each setting; λ and input-range panels for the CNN / SGD
    and ViT / Adam settings at one short budget; amortised-statistics panels for those two
    settings at two budgets (``--quick``: its two budgets)."""
    epochs = o.epochs or (QUICK_EPOCHS if quick else DEMO_EPOCHS)
    seeds = o.seeds or (QUICK_SEEDS if quick else DEMO_SEEDS)
    short = QUICK_SHORT_BUDGET if quick else SHORT_BUDGET
    lams = o.lams or (DEMO_LAM,)
    panels = [
        _budget_panel(d.title, d.template(1), epochs, seeds, lams, dict(d.lrs))
        for d in DEMO_SETTINGS
    ]
    short_settings = [d for d in DEMO_SETTINGS if d.title in ("CNN / SGD", "ViT / Adam")]
    budget = f"{short} epoch" + ("s" if short != 1 else "")
    for d in short_settings:
        title = f"λ: {d.title}, {budget}"
        panels.append(_lambda_panel(title, d.template(short), seeds, o.lams or DEMO_LAMS))
    for d in short_settings:
        title = f"input range: {d.title}, {budget}"
        panels.append(_range_panel(title, d.template(short), seeds, lams))
    for d in short_settings:
        for e in QUICK_EPOCHS if quick else AMORTISE_EPOCHS:
            title = f"amortised statistics: {d.title}, {e} epoch" + ("s" if e != 1 else "")
            panels.append(_amortise_panel(title, d.template(e), seeds, DEMO_LAM, AMORTISE_EVERY))
    return panels


def tune_lr(o: Overrides, quick: bool = False) -> list[Panel]:
    """The demo's learning-rate search: the baseline of every setting at each lr of its grid,
    trained on the training images minus a held-out 20 % and scored on those."""
    epochs = o.epochs or (QUICK_EPOCHS if quick else DEMO_EPOCHS)
    seeds = o.seeds or (1 if quick else TUNE_SEEDS)
    panels = []
    for d in DEMO_SETTINGS:
        members = []
        for lr in d.lr_grid:
            base = replace(d.template(1, lr), evaluate_on="validation")
            members += [
                Member(f"lr {lr:g}", e, replace(base, epochs=e, seed=s))
                for e in epochs
                for s in range(seeds)
            ]
        panels.append(Panel(f"lr search: {d.title}", "tuning", tuple(members)))
    return panels


# ---------------------------------------------------------------------------------------------
# The paper's CIFAR experiments (GPU)

# Paper learning rates per epoch budget (Fig. 3 Adam, Fig. 4 ViT).
RESNET_ADAM_LR = {100: 1e-2, 200: 1e-2, 400: 1e-3, 800: 1e-3}
VIT_ADAM_LR = {100: 1e-3, 200: 10**-3.2, 400: 10**-3.5, 800: 10**-3.5}
CIFAR_EPOCHS = (100, 200, 400, 800)
PAPER_LAMS = (0.05, 0.1, 0.2)  # the λ grid of Fig. 3 and Fig. 4
CIFAR_SEEDS = 5


def lr_for(epochs: int, table: dict[int, float]) -> float:
    """The table's lr for the largest listed budget ≤ ``epochs`` (the smallest one below it)."""
    below = [e for e in table if e <= epochs]
    return table[max(below) if below else min(table)]


def _resnet(
    dataset: str, opt: str, *, weight_decay: float = 0.0, schedule: str = "cosine"
) -> RunConfig:
    """A CIFAR ResNet-18 baseline template: SGD lr 0.08 (budget, seed and lr set by the grid),
    batch 128, random crop (pad 4) + flip. Weight decay 0 on CIFAR-10 for SGD and Adam alike:
    the paper states none there, and the authors' CIFAR example script uses none."""
    return RunConfig(
        dataset, "resnet18", opt, 0.08, 1, 0, augment="crop4_flip",
        weight_decay=weight_decay, schedule=schedule,
    )  # fmt: skip


def _vit(model: str = "vit") -> RunConfig:
    """A CIFAR-10 ViT baseline template: Adam, label smoothing 0.1, crop + flip (assumed)."""
    return RunConfig(
        "cifar10", model, "adam", 1e-3, 1, 0, augment="crop4_flip", label_smoothing=0.1
    )


def cifar10_resnet18_sgd(o: Overrides) -> list[Panel]:
    """Fig. 3 left: SGD momentum 0.9, lr 0.08, cosine, batch 128, λ ∈ {0.05, 0.1, 0.2}."""
    base = _resnet("cifar10", "sgd")
    return [
        _budget_panel(
            "CIFAR-10 ResNet-18 / SGD", base, o.epochs or CIFAR_EPOCHS, o.seeds or CIFAR_SEEDS,
            o.lams or PAPER_LAMS,
        )
    ]  # fmt: skip


def cifar10_resnet18_adam(o: Overrides) -> list[Panel]:
    """Fig. 3 right: Adam, lr 1e-2 (100/200 epochs) or 1e-3 (400/800), cosine, batch 128."""
    base = _resnet("cifar10", "adam")
    return [
        _budget_panel(
            "CIFAR-10 ResNet-18 / Adam", base, o.epochs or CIFAR_EPOCHS, o.seeds or CIFAR_SEEDS,
            o.lams or PAPER_LAMS, RESNET_ADAM_LR,
        )
    ]  # fmt: skip


def cifar10_vit(o: Overrides) -> list[Panel]:
    """Fig. 4: the small ViT, Adam with the paper's lr per budget, label smoothing 0.1."""
    return [
        _budget_panel(
            "CIFAR-10 ViT / Adam", _vit(), o.epochs or CIFAR_EPOCHS, o.seeds or CIFAR_SEEDS,
            o.lams or PAPER_LAMS, VIT_ADAM_LR,
        )
    ]  # fmt: skip


def cifar100_resnet18_sgd(o: Overrides) -> list[Panel]:
    """Fig. 10: SGD, wd 5e-4, lr 0.1 with warm-up and steps at 60/120/160 of 200 epochs
    (scaled to 30 %/60 %/80 % of shorter budgets: an assumption)."""
    base = replace(
        _resnet("cifar100", "sgd", weight_decay=5e-4, schedule="multistep_warmup"), lr=0.1
    )
    return [
        _budget_panel(
            "CIFAR-100 ResNet-18 / SGD", base, o.epochs or (100, 133, 200),
            o.seeds or CIFAR_SEEDS, o.lams or (0.1,),
        )
    ]  # fmt: skip


def lambda_sweep(o: Overrides) -> list[Panel]:
    """Fig. 6: ResNet-18 / SGD on CIFAR-10 at one budget over a wide range of λ."""
    lams = o.lams or (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
    return [
        _lambda_panel(
            f"CIFAR-10 ResNet-18 / SGD, {e} epochs", replace(_resnet("cifar10", "sgd"), epochs=e),
            o.seeds or CIFAR_SEEDS, lams,
        )
        for e in o.epochs or (100,)
    ]  # fmt: skip


def input_range(o: Overrides) -> list[Panel]:
    """Fig. 8: standardised vs [0, 1] vs [0, 255] inputs, baseline and TrAct over λ."""
    lams = o.lams or (0.05, 0.1, 0.2, 0.5, 1.0)
    return [
        _range_panel(
            f"CIFAR-10 ResNet-18 / SGD, {e} epochs", replace(_resnet("cifar10", "sgd"), epochs=e),
            o.seeds or CIFAR_SEEDS, lams,
        )
        for e in o.epochs or (100,)
    ]  # fmt: skip


def patchnorm(o: Overrides) -> list[Panel]:
    """Fig. 7: the ViT with patch-wise normalisation or Dual PatchNorm vs TrAct."""
    panel = cifar10_vit(replace(o, lams=o.lams or (0.1,)))[0]
    extra = [
        Member(label, m.x, replace(m.run, model=model))
        for m in panel.members
        if m.series == BASELINE
        for model, label in (("vit_patchnorm", "patch normalisation"),
                             ("vit_dualpatchnorm", "Dual PatchNorm"))
    ]  # fmt: skip
    title = "CIFAR-10 ViT: TrAct vs patch normalisation"
    return [Panel(title, "budget", panel.members + tuple(extra))]


def sgd_first_adam_rest(o: Overrides) -> list[Panel]:
    """Fig. 9: Adam everywhere vs Adam + TrAct vs SGD + TrAct on the first layer (lr 0.08, an
    assumption) with Adam on the rest."""
    panel = cifar10_resnet18_adam(replace(o, lams=o.lams or (0.1,)))[0]
    extra = [
        Member(
            f"SGD+TrAct first layer (λ={m.run.lam:g}), Adam rest", m.x,
            replace(m.run, optimizer="sgd_first_adam_rest"),
        )
        for m in panel.members
        if m.run.lam is not None
    ]  # fmt: skip
    title = "CIFAR-10 ResNet-18: optimizer of the first layer"
    return [Panel(title, "budget", panel.members + tuple(extra))]


PRESETS = {
    "cifar10-resnet18-sgd": cifar10_resnet18_sgd,
    "cifar10-resnet18-adam": cifar10_resnet18_adam,
    "cifar10-vit": cifar10_vit,
    "cifar100-resnet18-sgd": cifar100_resnet18_sgd,
    "lambda-sweep": lambda_sweep,
    "input-range": input_range,
    "patchnorm": patchnorm,
    "sgd-first-adam-rest": sgd_first_adam_rest,
}


def build(name: str | None, o: Overrides, quick: bool = False, tune: bool = False) -> list[Panel]:
    """The panels of preset ``name`` (``None``: the digits demo, or its lr search with
    ``tune``)."""
    if tune:
        if name is not None:
            raise ValueError("--tune-lr is the digits demo's learning-rate search; drop --preset")
        return tune_lr(o, quick)
    return demo(o, quick) if name is None else PRESETS[name](o)


def unique_runs(panels: Sequence[Panel]) -> list[RunConfig]:
    """Every run of the panels once, in first-seen order."""
    seen: dict[str, RunConfig] = {}
    for panel in panels:
        for m in panel.members:
            seen.setdefault(m.run.run_id, m.run)
    return list(seen.values())
