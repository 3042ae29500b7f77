"""``tract_optim.solve`` against ``kit.tract_grad`` (float64 LU), with tolerances scaled to
the problem: a multiple of unit roundoff × cond(XᵀX/r + λI), never a fixed float64-noise constant.

The solve itself is pure maths (factor, status bits, condition estimate, apply); what a step does
with its status (the float64 retry, the errors and the ``PrecisionWarning``) is tested through
``TrActOptimizer`` on a bias-free Linear whose inputs are the rows. Failure paths are made
deterministic by construction (a matrix that is exactly singular in fp32) or by injecting a
failing ``cholesky_ex``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from tests.kit import U32, U64, damped, relative_error, tract_grad
from tract_optim import PrecisionWarning, TrActOptimizer, solve
from tract_optim.diagnostics import WARN_ERROR, Status
from tract_optim.settings import check_lam
from tract_optim.statistics import Stats

SETTINGS = settings(max_examples=40, deadline=None)

#: Cholesky and LU are backward stable: the forward error of either is a modest multiple of
#: u·cond(M). The Woodbury form's cancellation amplifies rounding by up to λ_max(M)/λ ≥ cond(M).
PER_COND = 1000


def bound(u: float, rows: Tensor, lam: float) -> float:
    """The error allowed for a solve with unit roundoff ``u``: PER_COND·u·λ_max(M)/λ."""
    top = torch.linalg.eigvalsh(damped(rows, lam))[:, -1].max().item()
    return PER_COND * u * top / lam


@st.composite
def problems(draw: st.DrawFn) -> tuple[Tensor, Tensor, float]:
    """Rows (groups, r, n), gradient rows (groups, m, n) and λ; r < n and r ≥ n both drawn."""
    groups = draw(st.integers(1, 3))
    n = draw(st.integers(1, 8))
    r = draw(st.integers(1, 12))
    m = draw(st.integers(1, 5))
    lam = draw(st.sampled_from([1e-3, 0.05, 0.1, 0.2, 1.0, 10.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    rows = scale * torch.randn(groups, r, n, generator=gen, dtype=torch.float64)
    grads = torch.randn(groups, m, n, generator=gen, dtype=torch.float64)
    return rows, grads, lam


def gram(rows: Tensor) -> Tensor:
    return rows.transpose(1, 2) @ rows


def direct(rows: Tensor, lam: float, dtype: torch.dtype) -> solve.Factor:
    """The direct factor of the Gram of ``rows`` (groups, r, n)."""
    return solve.factor(Stats(count=rows.shape[1], gram=gram(rows)), lam, dtype)


def woodbury(rows: Tensor, lam: float, dtype: torch.dtype) -> solve.Factor:
    """The Woodbury factor of ``rows`` themselves."""
    return solve.factor(Stats(count=rows.shape[1], rows=rows), lam, dtype)


def precondition(
    rows: Tensor, coefficients: Tensor, lam: float, **options: object
) -> tuple[Tensor, Tensor]:
    """(raw, TrAct) gradient of a bias-free Linear whose inputs are ``rows`` (1, r, n), for the
    loss Σ coefficients ⊙ output (so G = coefficientsᵀ·X), through ``TrActOptimizer``."""
    x = rows[0]
    layer = nn.Linear(x.shape[1], coefficients.shape[1], bias=False, dtype=x.dtype)
    opt = TrActOptimizer(
        torch.optim.SGD(layer.parameters(), lr=0.1),
        layer,
        lam,
        **options,  # type: ignore[arg-type]
    )
    (layer(x) * coefficients.to(x.dtype)).sum().backward()
    assert layer.weight.grad is not None
    raw = layer.weight.grad.clone()
    opt.precondition_()
    return raw, layer.weight.grad


def assert_matches(got: Tensor, rows: Tensor, grad: Tensor, lam: float, group: int) -> None:
    """``got`` is group ``group``'s G·M⁻¹ to float64 accuracy for this problem's cond(M)."""
    expected = tract_grad(rows[group : group + 1], grad, lam)
    assert got.dtype == torch.float64
    error = relative_error(got, expected)
    assert error <= bound(U64, rows[group : group + 1], lam), error


@SETTINGS
@given(problems())
def test_direct_matches_reference(problem: tuple[Tensor, Tensor, float]) -> None:
    """The direct factor + apply = G (XᵀX/r + λI)⁻¹ for every group."""
    rows, grads, lam = problem
    factor = direct(rows, lam, torch.float64)
    assert factor.rows is None and factor.count == rows.shape[1] and factor.lam == lam
    assert int(factor.status) == 0
    for g in range(rows.shape[0]):
        assert_matches(solve.apply(factor, grads[g], g), rows, grads[g], lam, g)


@SETTINGS
@given(problems())
def test_woodbury_matches_reference(problem: tuple[Tensor, Tensor, float]) -> None:
    """The Woodbury factor + apply = the same G (XᵀX/r + λI)⁻¹, whether r < n or r ≥ n."""
    rows, grads, lam = problem
    factor = woodbury(rows, lam, torch.float64)
    assert factor.rows is not None and factor.count == rows.shape[1]
    for g in range(rows.shape[0]):
        assert_matches(solve.apply(factor, grads[g], g), rows, grads[g], lam, g)


@SETTINGS
@given(problems(), st.data())
def test_any_subset_of_rows_is_preconditioned_alone(
    problem: tuple[Tensor, Tensor, float], data: st.DataObject
) -> None:
    """Rows of G are independent: a slice (an FSDP shard) gives the slice of the full result,
    up to the rounding of a differently blocked product."""
    rows, grads, lam = problem
    m = grads.shape[1]
    start = data.draw(st.integers(0, m - 1))
    stop = data.draw(st.integers(start + 1, m))
    for factor in (woodbury(rows, lam, torch.float64), direct(rows, lam, torch.float64)):
        full = solve.apply(factor, grads[0], 0)
        part = solve.apply(factor, grads[0, start:stop], 0)
        error = relative_error(part, full[start:stop])
        assert error <= 2 * bound(U64, rows[:1], lam), error


@pytest.mark.parametrize("use_woodbury", [False, True])
def test_fp32_solve_returns_fp32_close_to_fp64(use_woodbury: bool) -> None:
    """dtype=float32 works in fp32, as accurately as fp32 allows for this problem."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 5 if use_woodbury else 40, 12, generator=gen)
    grads = torch.randn(2, 6, 12, generator=gen)
    factor = (woodbury if use_woodbury else direct)(rows, 0.1, torch.float32)
    for g in range(2):
        got = solve.apply(factor, grads[g], g)
        assert got.dtype == torch.float32
        error = relative_error(got, tract_grad(rows[g : g + 1], grads[g], 0.1))
        assert error <= bound(U32, rows[g : g + 1], 0.1), error


# --- status bits ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_statistics_set_their_bit(bad: float) -> None:
    grams = torch.eye(3)[None].clone()
    grams[0, 1, 2] = bad
    status = int(solve.factor(Stats(count=4, gram=grams), 0.1, torch.float32).status)
    assert status & Status.NON_FINITE
    rows = torch.ones(1, 2, 3)
    rows[0, 1, 1] = bad
    assert int(woodbury(rows, 0.1, torch.float64).status) & Status.NON_FINITE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_indefinite_matrix_sets_its_bit(dtype: torch.dtype) -> None:
    """A matrix that is indefinite even in fp64 (impossible from real data)."""
    factor = solve.factor(Stats(count=1, gram=-10 * torch.eye(3)[None]), 0.1, dtype)
    assert int(factor.status) & Status.NOT_POSITIVE_DEFINITE


# --- the fp64 retry ------------------------------------------------------------------------------

#: Inputs of scale 1e4 whose columns (direct form) or rows (Woodbury form) are all equal: the
#: damped matrix is 2²⁶·11ᵀ + λI. λ = 0.1 is below half an fp32 ulp of 2²⁶ (4), so in fp32 the
#: matrix is exactly 2²⁶·11ᵀ, and with every step exact (√2²⁶ = 2¹³) its Cholesky factorisation
#: meets a pivot of exactly 0 on any CPU and BLAS. In fp64 it is positive definite.
SCALE = 2.0**13


def singular_in_fp32(woodbury: bool) -> Tensor:
    """Rows (1, r, n) of ±2¹³, all columns equal (direct) or all rows equal (Woodbury, r < n)."""
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0])
    if woodbury:  # XXᵀ/r = (n·2²⁶/r)·11ᵀ with n = 4r
        return SCALE * torch.ones(4, 1) @ torch.tensor([[1.0, -1.0] * 8])[None]
    return (SCALE * signs[:, None] * torch.ones(1, 3))[None]  # XᵀX/r = 2²⁶·11ᵀ


#: Options that make the step factor in float32 (the default would already be float64 here).
FP32 = {"stats_dtype": torch.float32, "solve_dtype": torch.float32}


def coefficients(rows: Tensor, m: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(rows.shape[1], m, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("woodbury", [False, True], ids=["direct", "woodbury"])
def test_fp32_failure_retries_with_the_matrix_rebuilt_in_fp64(woodbury: bool) -> None:
    """A fp32 Cholesky that fails is redone in fp64 from the statistics, where λ survives; the
    already rounded fp32 matrix would fail in fp64 too."""
    rows = singular_in_fp32(woodbury)
    side = rows[0] @ rows[0].T if woodbury else rows[0].T @ rows[0]
    rounded = (side / rows.shape[1]).float() + 0.1 * torch.eye(side.shape[0])
    assert torch.linalg.cholesky_ex(rounded).info.item() > 0  # fp32 fails ...
    assert torch.linalg.cholesky_ex(rounded.double()).info.item() > 0  # ... and so would a cast
    assert int(direct(rows, 0.1, torch.float32).status) & Status.NOT_POSITIVE_DEFINITE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)  # cond(M) ≈ 1e9, rightly
        raw, got = precondition(rows, coefficients(rows), 0.1, **FP32)
    error = relative_error(got, tract_grad(rows, raw, 0.1))
    assert error <= bound(U64, rows, 0.1), error


@pytest.mark.parametrize("woodbury", [False, True], ids=["direct", "woodbury"])
def test_failure_in_fp64_too_raises_naming_layer_and_lam(woodbury: bool) -> None:
    """λ = 1e-30 vanishes against 2²⁶ in fp64 as well: the matrix is singular in both."""
    rows = singular_in_fp32(woodbury)
    with pytest.raises(
        FloatingPointError, match=r"first_layer\[0\] .*lam = 1e-30\) is not numerically"
    ):
        precondition(rows, coefficients(rows), 1e-30, **FP32)


@contextmanager
def fp32_cholesky_fails() -> Iterator[None]:
    """Inject a failure into every Cholesky factorisation below float64."""
    real = torch.linalg.cholesky_ex

    def failing(matrix: Tensor) -> tuple[Tensor, Tensor]:
        chol, info = real(matrix)
        if matrix.dtype != torch.float64:
            info = torch.ones_like(info)
        return chol, info

    with mock.patch.object(torch.linalg, "cholesky_ex", failing):
        yield


@SETTINGS
@given(
    problems(),
    st.sampled_from([1e-6, 1.0, 1e4]),
    st.booleans(),
    st.sampled_from([1e-12, 1e-6, 0.1]),
)
def test_retry_succeeds_wherever_a_float64_solve_does(
    problem: tuple[Tensor, Tensor, float], scale: float, deficient: bool, lam: float
) -> None:
    """With fp32 failing, the retry gives bit for bit what solve_dtype=float64 gives (or the same
    error), for rank-deficient statistics and input scales from 1e-6 to 1e4, r < n and r ≥ n."""
    rows, _, _ = problem
    rows = (scale * rows[:1]).float()
    if deficient:
        rows[..., -1] = rows[..., 0]
    c = coefficients(rows)
    wide = {"stats_dtype": torch.float32, "solve_dtype": torch.float64}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        try:
            expected = precondition(rows, c, lam, **wide)[1]
        except FloatingPointError:
            with fp32_cholesky_fails(), pytest.raises(FloatingPointError):
                precondition(rows, c, lam, **FP32)
            return
        with fp32_cholesky_fails():
            got = precondition(rows, c, lam, **FP32)[1]
    assert torch.equal(got, expected)


# --- unusable statistics -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("r", [2, 8], ids=["woodbury", "direct"])
def test_non_finite_statistics_raise_naming_the_layer(bad: float, r: int) -> None:
    rows = torch.ones(1, r, 3)
    rows[0, 1, 1] = bad
    with pytest.raises(FloatingPointError, match=r"first_layer\[0\] .*inf or NaN"):
        precondition(rows, torch.ones(r, 2), 0.1)


def test_overflowing_fp32_gram_raises() -> None:
    """Finite rows whose fp32 product overflows are caught rather than solved into NaN."""
    rows = torch.full((1, 8, 3), 3e19)
    with pytest.raises(FloatingPointError, match="inf or NaN"):
        precondition(rows, torch.ones(8, 2), 0.1, **FP32)


# --- the accuracy warning ----------------------------------------------------------------------


def deficient_rows(seed: int, r: int = 96, n: int = 24) -> Tensor:
    """Standardised fp32 rows (1, r, n) with two equal columns: λ_min(XᵀX/r) = 0 exactly."""
    rows = torch.randn(1, r, n, generator=torch.Generator().manual_seed(seed))
    rows[..., -1] = rows[..., 0]
    return rows


def warnings_of(make: Callable[[], object]) -> list[str]:
    """The messages of the PrecisionWarnings raised by ``make()``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make()
    return [str(w.message) for w in caught if issubclass(w.category, PrecisionWarning)]


def test_small_lam_on_fp32_statistics_warns_naming_layer_lam_and_remedy() -> None:
    """cond(M) ≈ 2e6: an fp32 Gram fixes the update to ~0.1 only; λ = 0.1 is silent; float64
    statistics (the default's choice here) are silent at λ = 1e-6 too."""
    rows = deficient_rows(0)
    c = coefficients(rows)
    for solve_dtype in (torch.float32, torch.float64):  # a float64 solve cannot undo the Gram
        options = {"stats_dtype": torch.float32, "solve_dtype": solve_dtype}
        found = warnings_of(partial(precondition, rows, c, 1e-6, **options))
        assert len(found) == 1
        pattern = (
            r"^first_layer\[0\] \(Linear, .*\): with lam = 1e-06 .* condition number ~1e\+0[56]"
        )
        assert re.search(pattern, found[0]), found[0]
        assert "increase lam or pass stats_dtype=torch.float64" in found[0]
        assert ("solve_dtype" in found[0]) == (solve_dtype == torch.float32)
    assert not warnings_of(lambda: precondition(rows, c, 0.1, **FP32))
    assert not warnings_of(lambda: precondition(rows, c, 1e-6))


def test_fp32_woodbury_warns_and_suggests_float64() -> None:
    """The fp32 Woodbury form at small λ warns and names the remedy; in float64 (the default),
    from exact rows, it is silent."""
    rows = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(0))
    c = coefficients(rows)
    found = warnings_of(lambda: precondition(rows, c, 1e-4, solve_dtype=torch.float32))
    assert len(found) == 1 and "solve_dtype=torch.float64" in found[0]
    assert not warnings_of(lambda: precondition(rows, c, 1e-6))


def test_extreme_condition_warns_with_its_size() -> None:
    """cond(M) = 1e60 (beyond float32) is reported, not overflowed into a crash."""
    rows = torch.tensor([[[1e15, 0.0]]]).repeat(1, 4, 1)  # XᵀX/r = diag(1e30, 0)
    found = warnings_of(partial(precondition, rows, torch.ones(4, 1), 1e-30, **FP32))
    # float32 square roots in the factor may put the lower-bound estimate just under 1e60
    assert len(found) == 1 and re.search(r"condition number ~1e\+(59|60)\b", found[0])


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 48),
    extra=st.integers(0, 64),
    exponent=st.floats(-7, 0),
    kind=st.sampled_from(["standardised", "deficient", "correlated"]),
)
def test_no_warning_means_accurate(
    seed: int, n: int, extra: int, exponent: float, kind: str
) -> None:
    """The direct solve of fp32 statistics is within 1e-2 of float64 unless it warned (the
    warning fires at a predicted 1e-3; the prediction overestimates)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(1, n + extra, n, generator=gen)
    if kind == "deficient":
        rows[..., -1] = rows[..., 0]
    elif kind == "correlated":
        rows = rows @ torch.randn(n, n, generator=gen)
    lam = 10.0**exponent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raw, got = precondition(rows, torch.randn(n + extra, 3, generator=gen), lam, **FP32)
    if not caught:
        assert relative_error(got, tract_grad(rows, raw, lam)) <= 10 * WARN_ERROR


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 40), spread=st.floats(0, 8))
def test_condition_estimate_is_a_close_lower_bound(seed: int, n: int, spread: float) -> None:
    """The estimate behind the warning lies in [cond/30, cond] (measured: mostly above cond/2)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = 10.0 ** (spread * torch.rand(n, generator=gen, dtype=torch.float64))
    matrix = (q * eig) @ q.T
    matrix = (matrix + matrix.T)[None] / 2
    chol, info = torch.linalg.cholesky_ex(matrix)
    assert int(info.max()) == 0
    estimate = float(solve.condition_estimate(chol, lam=1.0, woodbury=False))
    true = torch.linalg.cond(matrix[0]).item()
    assert true / 30 <= estimate <= true * (1 + 1e-6)


# --- λ and the solve dtype -----------------------------------------------------------------------


@pytest.mark.parametrize("lam", [1e-30, 1e-6, 0.1, 1, 1e30])
def test_check_lam_accepts_the_representable_range(lam: float) -> None:
    assert check_lam(lam, "lam") == lam and type(check_lam(lam, "lam")) is float


@pytest.mark.parametrize("lam", [1e39, 1e-40, 1e31, 9e-31])
def test_check_lam_rejects_lam_outside_the_range_naming_it(lam: float) -> None:
    with pytest.raises(ValueError, match=r"^lam\[2\] = .* is outside \[1e-30, 1e\+30\]"):
        check_lam(lam, "lam[2]")


@pytest.mark.parametrize("lam", [1e39, 1e-40])
def test_unrepresentable_lam_is_refused_everywhere_before_any_change(lam: float) -> None:
    """Construction, set_lam and load_state_dict all refuse it, naming λ; nothing changes."""
    layer = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"^lam\[0\] = .* outside"):
        TrActOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1), layer, lam)
    opt = TrActOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1), layer, 0.1)
    with pytest.raises(ValueError, match=r"^lam = .* outside"):
        opt.set_lam(lam)
    saved = opt.state_dict()
    saved["tract"]["lam"] = [lam]
    with pytest.raises(ValueError, match=r"^state_dict\['tract'\]\['lam'\]\[0\] = .* outside"):
        opt.load_state_dict(saved)
    assert opt.lams == (0.1,)


@pytest.mark.parametrize(
    ("requested", "stats", "woodbury", "expected"),
    [
        (None, torch.float32, False, torch.float32),
        (None, torch.float64, False, torch.float64),
        (None, torch.float32, True, torch.float64),
        (torch.float32, torch.float64, True, torch.float32),
        (torch.float32, torch.float32, True, torch.float32),
        (torch.float64, torch.float32, False, torch.float64),
    ],
)
def test_resolve_dtype(
    requested: torch.dtype | None, stats: torch.dtype, woodbury: bool, expected: torch.dtype
) -> None:
    """None: the statistics' precision, and float64 for Woodbury; else honoured."""
    assert solve.resolve_dtype(requested, stats, woodbury) == expected


@pytest.mark.parametrize(
    ("model", "stats_dtype", "r", "woodbury", "expected"),
    [
        (torch.float32, torch.float32, 40, False, torch.float32),
        (torch.float32, None, 40, False, torch.float64),  # the automatic precision's probe
        (torch.float64, None, 40, False, torch.float64),
        (torch.float32, None, 5, True, torch.float64),
        (torch.bfloat16, torch.float32, 5, True, torch.float64),
    ],
)
def test_optimizer_solves_in_the_resolved_dtype_by_default(
    model: torch.dtype,
    stats_dtype: torch.dtype | None,
    r: int,
    woodbury: bool,
    expected: torch.dtype,
) -> None:
    """Without solve_dtype, TrActOptimizer asks the solve for resolve_dtype's choice."""
    layer = nn.Linear(12, 3, dtype=model)
    opt = TrActOptimizer(
        torch.optim.SGD(layer.parameters(), lr=0.1), layer, stats_dtype=stats_dtype
    )
    layer(torch.randn(r, 12, dtype=model)).float().square().sum().backward()
    with mock.patch.object(solve, "factor", wraps=solve.factor) as spy:
        opt.precondition_()
    assert spy.call_count == 1
    stats, _, dtype = spy.call_args.args[:3]
    assert (stats.rows is not None) == woodbury
    assert dtype == expected
