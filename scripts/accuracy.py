"""How close TrActOptimizer's update is to a float64 reference, per solve path, precision,
inputs and λ.

Each case is a Linear first layer (n inputs, 32 outputs) on r rows and the loss ⟨z, C⟩ for a
random C, so the raw gradient G = Cᵀx lies in the row space of x, as a first layer's gradient
always does. Rows are standardised Gaussian, or the 16×16 RGB patches of smooth image-like
batches in [0, 1] or [0, 255] (the paper's Fig. 8 settings; n = 768 only). Two steps on the same
inputs, each a forward/backward then ``opt.precondition_()``; the second step's result (made with
the statistics precision the default settings chose on the first) is compared with
G·(xᵀx/r + λI)⁻¹ from the same raw G and the model's exact inputs, in float64 with
``torch.linalg.solve`` (``tests.kit.tract_grad``: LU, not the library's Cholesky). Reported: the
largest max|got − ref| / max|ref| over seeds and over the (n, r) of each path, and "⚠ k/N" where
k of the N cases raised tract_optim's PrecisionWarning.

Paths: ``woodbury`` (r < n: the library keeps the rows and solves on the r×r side) and
``direct`` (r ≥ n: the hooks accumulate a Gram, solved on the n×n side). Precisions: ``fp32``
(fp32 model), ``bf16-autocast`` (fp32 model, forward under CPU bfloat16 autocast) and ``fp64``
(float64 model and inputs).

    python -m scripts.accuracy                 # the README's table (several minutes on 2 cores)
    python -m scripts.accuracy --quick         # n = 768 only, one seed
    python -m scripts.accuracy --solve-dtype float32 --json out.json
    python -m scripts.accuracy --timing        # cost of the fp32 vs fp64 Woodbury solve
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.kit import relative_error, tract_grad
from tract_optim import TrActOptimizer

LAMS = (0.2, 0.1, 0.05, 1e-2, 1e-4, 1e-6)
MODES = ("fp32", "bf16-autocast", "fp64")
#: Input kinds, and the precision modes each is measured in.
INPUTS = {"standardised": MODES, "[0, 1]": ("fp32",), "[0, 255]": ("fp32",)}
OUTPUTS = 32
DTYPES = {"auto": None, "float32": torch.float32, "float64": torch.float64}


def cases(quick: bool) -> dict[str, list[tuple[int, int]]]:
    """(n, r) per path: a ViT-B/16 patch embedding (n = 768) and a 32×32 one (n = 3072)."""
    widths = (768,) if quick else (768, 3072)
    return {
        "woodbury": [(n, r) for n in widths for r in (8, 64)],
        "direct": [(n, r) for n in widths for r in (n, 2 * n)],
    }


def image_rows(r: int, n: int, kind: str, gen: torch.Generator) -> Tensor:
    """r rows of n = 3·p² values: the p×p RGB patches of smooth images (upsampled noise plus a
    little fine noise, rounded to integers in [0, 255]), scaled to [0, 1] for ``"[0, 1]"``."""
    p = round((n // 3) ** 0.5)
    assert 3 * p * p == n, n
    images = -(-r // 4)  # 4 patches an image, 2×2
    low = torch.randn(images, 3, 4, 4, generator=gen, dtype=torch.float64)
    up = F.interpolate(low, size=(2 * p, 2 * p), mode="bicubic", align_corners=False)
    up = up / up.std() + 0.02 * torch.randn(up.shape, generator=gen, dtype=torch.float64)
    x = (128 + 60 * up).clamp(0, 255).round()
    rows = F.unfold(x, p, stride=p).transpose(1, 2).reshape(-1, n)[:r]
    return rows / 255 if kind == "[0, 1]" else rows


def tract_gradient(
    x: Tensor, out_grad: Tensor, lam: float, mode: str, solve_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor, bool, str]:
    """(raw G, TrAct gradient, whether a PrecisionWarning was raised, the statistics precision
    chosen) of the second of two steps of a fresh Linear on inputs x and loss ⟨z, out_grad⟩."""
    layer = nn.Linear(x.shape[1], OUTPUTS, bias=False, dtype=x.dtype)
    kwargs: dict[str, Any] = {} if solve_dtype is None else {"solve_dtype": solve_dtype}
    opt = TrActOptimizer(torch.optim.SGD(layer.parameters(), lr=0.0), layer, lam, **kwargs)
    for _ in range(2):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-autocast"):
            z = layer(x)
        (z.to(x.dtype) * out_grad).sum().backward()
        assert layer.weight.grad is not None
        raw = layer.weight.grad.clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.precondition_()
        opt.step()
    chosen = opt.state_dict()["tract"]["stats_dtype"][0]
    opt.remove()
    warned = any(w.category.__name__ == "PrecisionWarning" for w in caught)
    return raw, layer.weight.grad, warned, chosen


def measure(quick: bool, solve_dtype: torch.dtype | None) -> list[dict[str, Any]]:
    """One record per (path, inputs, n, r, mode, λ, seed)."""
    records = []
    for path, shapes in cases(quick).items():
        for inputs, modes in INPUTS.items():
            for n, r in shapes:
                if inputs != "standardised" and n != 768:
                    continue
                for seed in range(1 if quick else 2):
                    gen = torch.Generator().manual_seed(seed)
                    x64 = (
                        torch.randn(r, n, generator=gen, dtype=torch.float64)
                        if inputs == "standardised"
                        else image_rows(r, n, inputs, gen)
                    )
                    out_grad = torch.randn(r, OUTPUTS, generator=gen, dtype=torch.float64)
                    for mode in modes:
                        dtype = torch.float64 if mode == "fp64" else torch.float32
                        x, c = x64.to(dtype), out_grad.to(dtype)
                        for lam in LAMS:
                            raw, got, warned, chosen = tract_gradient(x, c, lam, mode, solve_dtype)
                            error = relative_error(got, tract_grad(x[None], raw, lam))
                            records.append(
                                {"path": path, "inputs": inputs, "n": n, "r": r, "mode": mode}
                                | {"lam": lam, "seed": seed, "error": error, "warned": warned}
                                | {"statistics": chosen}
                            )
                            note = " (warned)" if warned else ""
                            print(
                                f"{path:8} {inputs:12} n={n:4} r={r:4} {mode:13} λ={lam:<6g} "
                                f"{error:.2e} {chosen}{note}"
                            )
    return records


def cell(records: list[dict[str, Any]]) -> str:
    """The worst error of some cases, and "⚠ k/N" when k of the N cases raised a warning."""
    worst = f"{max(rec['error'] for rec in records):.0e}"
    warned = sum(rec["warned"] for rec in records)
    return f"{worst} ⚠ {warned}/{len(records)}" if warned else worst


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per (path, precision, inputs), one column per λ, the worst error."""
    head = "| path | precision | inputs | " + " | ".join(f"λ = {lam:g}" for lam in LAMS) + " |"
    lines = [head, "| --- | --- | --- |" + " --- |" * len(LAMS)]
    for path in ("woodbury", "direct"):
        for inputs, modes in INPUTS.items():
            for mode in modes:
                key = (path, inputs, mode)
                cells = [
                    cell(
                        [
                            r
                            for r in records
                            if (r["path"], r["inputs"], r["mode"]) == key and r["lam"] == lam
                        ]
                    )
                    for lam in LAMS
                ]
                lines.append(f"| {path} | {mode} | {inputs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing(rounds: int) -> str:
    """Median per-round ratio of precondition_() time, fp64 over fp32 solve, Woodbury path."""
    lines = ["| n | r | m | fp32 ms | fp64 ms | fp64 / fp32 |", "|" + " --- |" * 6]
    for n, r, m in ((768, 64, 768), (768, 512, 768), (3072, 256, 768), (3072, 2048, 768)):
        x = torch.randn(r, n)
        out_grad = torch.randn(r, m)
        times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.float64: []}
        for i in range(rounds + 1):
            for dtype in (torch.float32, torch.float64):
                layer = nn.Linear(n, m, bias=False)
                sgd = torch.optim.SGD(layer.parameters(), lr=1.0)
                opt = TrActOptimizer(sgd, layer, 0.1, solve_dtype=dtype)
                (layer(x) * out_grad).sum().backward()
                start = time.perf_counter()
                opt.precondition_()
                if i:  # round 0 is a warm-up
                    times[dtype].append(time.perf_counter() - start)
                opt.remove()
        ratio = statistics.median(
            b / a for a, b in zip(times[torch.float32], times[torch.float64], strict=True)
        )
        ms = [1e3 * statistics.median(times[d]) for d in (torch.float32, torch.float64)]
        lines.append(f"| {n} | {r} | {m} | {ms[0]:.2f} | {ms[1]:.2f} | {ratio:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m scripts.accuracy",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="n = 768 only, one seed")
    p.add_argument("--solve-dtype", choices=DTYPES, default="auto", help="default: auto")
    p.add_argument("--json", type=Path, default=None, help="write every record here")
    p.add_argument("--timing", action="store_true", help="time the fp32 and fp64 Woodbury solves")
    p.add_argument("--rounds", type=int, default=15, help="timing rounds (default 15)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.timing:
        print(timing(args.rounds))
        return
    records = measure(args.quick, DTYPES[args.solve_dtype])
    print(table(records))
    if args.json is not None:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
