"""The run grids: the CPU digits demo and the paper's CIFAR experiments (settings: PAPER.md).

Every grid pairs each baseline run with TrAct runs of the same seed, budget and learning rate: the
learning rate is the baseline's best and TrAct reuses it, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from train import RunConfig

BASELINE = "baseline"


def tract_series(lam: float) -> str:
    """The plot label of TrAct with damping ``lam``."""
    return f"TrAct λ={lam:g}"


@dataclass(frozen=True)
class Overrides:
    """Command-line overrides; ``None`` keeps the preset's value."""

    epochs: Sequence[int] | None = None
    seeds: int | None = None
    lams: Sequence[float] | None = None


# The demo's learning rates are the baseline's best mean test accuracy over budgets 1/2/4/8 and
# 3 seeds (TrAct was not tuned): CNN SGD lr ∈ {0.1, 0.3, 1}, CNN Adam ∈ {3e-3, 1e-2, 3e-2, 0.1},
# ViT SGD ∈ {0.03, 0.1, 0.3}, ViT Adam ∈ {1e-3, 3e-3, 1e-2}.
DEMO_PANELS = (
    ("digits CNN / SGD", "digits_cnn", "sgd", 0.3),
    ("digits CNN / Adam", "digits_cnn", "adam", 3e-2),
    ("digits ViT / SGD", "digits_transformer", "sgd", 0.1),
    ("digits ViT / Adam", "digits_transformer", "adam", 3e-3),
)
DEMO_EPOCHS = (1, 2, 4, 8, 16)
QUICK_EPOCHS = (1, 2)

# Paper learning rates per epoch budget (Fig. 3 Adam, Fig. 4 ViT).
RESNET_ADAM_LR = {100: 1e-2, 200: 1e-2, 400: 1e-3, 800: 1e-3}
VIT_ADAM_LR = {100: 1e-3, 200: 10**-3.2, 400: 10**-3.5, 800: 10**-3.5}
CIFAR_EPOCHS = (100, 200, 400, 800)


def lr_for(epochs: int, table: dict[int, float]) -> float:
    """The table's lr for the largest listed budget ≤ ``epochs`` (the smallest one below it)."""
    below = [e for e in table if e <= epochs]
    return table[max(below) if below else min(table)]


def _pair(base: RunConfig, lams: Sequence[float]) -> list[RunConfig]:
    """The baseline run and one TrAct run per λ, otherwise identical (one series over λ when
    the panel plots accuracy against λ)."""
    by_lam = base.x_axis == "lam"
    tract = [
        replace(base, series="TrAct" if by_lam else tract_series(lam), tract=True, lam=lam)
        for lam in lams
    ]
    return [base, *tract]


def _grid(
    make: RunConfig, epochs: Sequence[int], seeds: int, lr_table: dict[int, float] | None
) -> list[RunConfig]:
    """``make`` at every budget and seed (lr from ``lr_table`` when given); a panel that plots
    accuracy against λ gets one panel per budget."""
    out = []
    for e in epochs:
        lr = make.lr if lr_table is None else lr_for(e, lr_table)
        panel = f"{make.panel}, {e} epochs" if make.x_axis == "lam" else make.panel
        out += [replace(make, panel=panel, epochs=e, seed=s, lr=lr) for s in range(seeds)]
    return out


def demo(o: Overrides, quick: bool = False) -> list[RunConfig]:
    """Digits, CNN and ViT, SGD and Adam, baseline vs TrAct over several budgets and seeds."""
    epochs = o.epochs or (QUICK_EPOCHS if quick else DEMO_EPOCHS)
    seeds = o.seeds or (1 if quick else 10)
    runs = []
    for panel, model, opt, lr in DEMO_PANELS:
        base = RunConfig(panel, BASELINE, "digits", model, opt, lr, 1, 0, False, batch_size=64)
        for run in _grid(base, epochs, seeds, None):
            runs += _pair(run, o.lams or (0.1,))
    return runs


def _resnet(
    dataset: str,
    opt: str,
    panel: str,
    *,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    input_range: str = "standard",
    x_axis: str = "epochs",
) -> RunConfig:
    """A CIFAR ResNet-18 baseline template (SGD lr 0.08; budget, seed, lr set by the grid)."""
    return RunConfig(
        panel, BASELINE, dataset, "resnet18", opt, 0.08, 1, 0, False, augment=True,
        weight_decay=weight_decay, schedule=schedule, input_range=input_range, x_axis=x_axis,
    )  # fmt: skip


def _vit(panel: str) -> RunConfig:
    """A CIFAR-10 ViT baseline template (Adam, label smoothing 0.1)."""
    return RunConfig(
        panel, BASELINE, "cifar10", "vit", "adam", 1e-3, 1, 0, False, augment=True,
        label_smoothing=0.1,
    )  # fmt: skip


def cifar10_resnet18_sgd(o: Overrides) -> list[RunConfig]:
    """Fig. 3 left: SGD momentum 0.9, lr 0.08, cosine, batch 128; weight decay 5e-4 (assumed:
    PAPER.md gives it only for CIFAR-100)."""
    base = _resnet("cifar10", "sgd", "CIFAR-10 ResNet-18 / SGD", weight_decay=5e-4)
    runs = _grid(base, o.epochs or CIFAR_EPOCHS, o.seeds or 5, None)
    return [r for run in runs for r in _pair(run, o.lams or (0.1,))]


def cifar10_resnet18_adam(o: Overrides) -> list[RunConfig]:
    """Fig. 3 right: Adam, lr 1e-2 (100/200 epochs) or 1e-3 (400/800), cosine, batch 128."""
    base = _resnet("cifar10", "adam", "CIFAR-10 ResNet-18 / Adam")
    runs = _grid(base, o.epochs or CIFAR_EPOCHS, o.seeds or 5, RESNET_ADAM_LR)
    return [r for run in runs for r in _pair(run, o.lams or (0.1,))]


def cifar10_vit(o: Overrides) -> list[RunConfig]:
    """Fig. 4: the small ViT, Adam with the paper's lr per budget, label smoothing 0.1."""
    runs = _grid(_vit("CIFAR-10 ViT / Adam"), o.epochs or CIFAR_EPOCHS, o.seeds or 5, VIT_ADAM_LR)
    return [r for run in runs for r in _pair(run, o.lams or (0.05, 0.1, 0.2))]


def cifar100_resnet18_sgd(o: Overrides) -> list[RunConfig]:
    """Fig. 10: SGD, wd 5e-4, lr 0.1 with warm-up and steps at 60/120/160 of 200 epochs."""
    base = _resnet(
        "cifar100",
        "sgd",
        "CIFAR-100 ResNet-18 / SGD",
        weight_decay=5e-4,
        schedule="multistep_warmup",
    )
    base = replace(base, lr=0.1)
    runs = _grid(base, o.epochs or (100, 133, 200), o.seeds or 5, None)
    return [r for run in runs for r in _pair(run, o.lams or (0.1,))]


def lambda_sweep(o: Overrides) -> list[RunConfig]:
    """Fig. 6: ResNet-18 / SGD on CIFAR-10 at one budget over a wide range of λ."""
    base = _resnet("cifar10", "sgd", "CIFAR-10 ResNet-18 / SGD", weight_decay=5e-4, x_axis="lam")
    runs = _grid(base, o.epochs or (100,), o.seeds or 5, None)
    lams = o.lams or (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
    return [r for run in runs for r in _pair(run, lams)]


def input_range(o: Overrides) -> list[RunConfig]:
    """Fig. 8: standardised vs [0, 1] vs [0, 255] inputs, baseline and TrAct over λ."""
    runs = []
    for rng, label in (("standard", "standardised"), ("unit", "[0, 1]"), ("byte", "[0, 255]")):
        base = _resnet(
            "cifar10", "sgd", f"inputs {label}", weight_decay=5e-4, input_range=rng, x_axis="lam"
        )
        for run in _grid(base, o.epochs or (100,), o.seeds or 5, None):
            runs += _pair(run, o.lams or (0.05, 0.1, 0.2, 0.5, 1.0))
    return runs


def patchnorm(o: Overrides) -> list[RunConfig]:
    """Fig. 7: the ViT with patch-wise normalisation or Dual PatchNorm vs TrAct."""
    panel = "CIFAR-10 ViT: TrAct vs patch normalisation"
    runs = []
    for run in _grid(_vit(panel), o.epochs or CIFAR_EPOCHS, o.seeds or 5, VIT_ADAM_LR):
        runs += _pair(run, o.lams or (0.1,))
        runs.append(replace(run, model="vit_patchnorm", series="patch normalisation"))
        runs.append(replace(run, model="vit_dualpatchnorm", series="Dual PatchNorm"))
    return runs


def sgd_first_adam_rest(o: Overrides) -> list[RunConfig]:
    """Fig. 9: Adam everywhere vs Adam + TrAct vs SGD + TrAct first layer with Adam on the rest."""
    base = _resnet("cifar10", "adam", "CIFAR-10 ResNet-18: optimizer of the first layer")
    runs = []
    for run in _grid(base, o.epochs or CIFAR_EPOCHS, o.seeds or 5, RESNET_ADAM_LR):
        for lam in o.lams or (0.1,):
            runs += _pair(run, (lam,))
            runs.append(
                replace(
                    run,
                    optimizer="sgd_first_adam_rest",
                    series=f"SGD+TrAct first layer (λ={lam:g}), Adam rest",
                    tract=True,
                    lam=lam,
                )
            )
    return runs


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


def build(name: str | None, o: Overrides, quick: bool = False) -> list[RunConfig]:
    """The runs of preset ``name`` (``None``: the digits demo), baselines de-duplicated."""
    runs = demo(o, quick) if name is None else PRESETS[name](o)
    unique: dict[str, RunConfig] = {}
    for run in runs:
        unique.setdefault(run.run_id, run)
    return list(unique.values())
