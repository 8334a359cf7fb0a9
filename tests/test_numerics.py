"""Accuracy under stress against an extended-precision reference: never worse than torch's MultivariateNormal.

The cases, the exactly representable matrices and the reference are those of ``benchmarks/accuracy.py`` (which
prints the full table at larger sizes); here they run small. For every quantity torch also computes, our relative
error must stay within ``FACTOR`` times torch's (or below a floor of a few ulps); for derivatives torch cannot take
(w.r.t. a matrix it was not given) it must stay below the first-order bound ``BOUND * cond * eps``.
"""

import importlib.util
import math
import pathlib

import numpy as np
import pytest
import torch

from torch_mvn_ext import _factor

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"
_SPEC = importlib.util.spec_from_file_location("accuracy", _PATH)
accuracy = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(accuracy)

FACTOR = 4.0
FLOOR_ULPS = 16
BOUND = 2.0

# (id, dtype, d, number of points, condition number, scale, tail factor)
CASES = [
    ("float32-cond1e4", torch.float32, 16, 64, 1e4, 1.0, 1.0),
    ("float32-cond1e6", torch.float32, 16, 64, 1e6, 1.0, 1.0),
    ("float32-d128", torch.float32, 128, 4, 1e2, 1.0, 1.0),
    ("float32-2000-points", torch.float32, 4, 2000, 1e2, 1.0, 1.0),
    ("float32-scale1e-6", torch.float32, 8, 32, 1e2, 1e-6, 1.0),
    ("float32-scale1e6", torch.float32, 8, 32, 1e2, 1e6, 1.0),
    ("float32-tails", torch.float32, 8, 32, 1e2, 1.0, 1e3),
    ("float64-cond1e10", torch.float64, 16, 64, 1e10, 1.0, 1.0),
    ("float64-cond1e12", torch.float64, 16, 64, 1e12, 1.0, 1.0),
    ("float64-d128", torch.float64, 128, 4, 1e6, 1.0, 1.0),
    ("float64-2000-points", torch.float64, 4, 2000, 1e6, 1.0, 1.0),
    ("float64-scale1e-6", torch.float64, 8, 32, 1e6, 1e-6, 1.0),
    ("float64-scale1e6", torch.float64, 8, 32, 1e6, 1e6, 1.0),
    ("float64-tails", torch.float64, 8, 32, 1e6, 1.0, 1e3),
]

needs_extended = pytest.mark.skipif(
    not accuracy.EXTENDED_PRECISION, reason="numpy.longdouble has no extra precision on this platform"
)


@pytest.fixture(scope="module")
def measured():
    """Relative errors of every case and parametrization, measured once per case on first use:
    ``measured(case_id, route)[parametrization]``. ``route`` is the way float32 triangular solves run on the CPU
    (``_factor._solve_rows`` takes the right solve only on CPUs where it is faster, so both are forced here)."""
    cache = {}

    def get(case_id, route):
        if (case_id, route) not in cache:
            _, dtype, d, n, condition, scale, tail = next(c for c in CASES if c[0] == case_id)
            g = torch.Generator().manual_seed(0)
            p = accuracy.make_case(d, n, condition, scale, tail, generator=g)
            q = accuracy.make_case(d, 1, condition, scale, tail, generator=g)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(_factor, "_RIGHT_SOLVE_IS_FASTER", route == "right solve")
                cache[case_id, route] = {pm: accuracy.measure(dtype, pm, p, q) for pm in accuracy.PARAMETRIZATIONS}
        return cache[case_id, route]

    return get


def _case_params():
    for c in CASES:
        marks = [needs_extended] if c[1] == torch.float64 else []
        for route in ("left solve", "right solve") if c[1] == torch.float32 else ("left solve",):
            yield pytest.param(c[0], c[1], c[4], route, marks=marks, id=f"{c[0]}-{route.replace(' ', '-')}")


@pytest.mark.parametrize("parametrization", accuracy.PARAMETRIZATIONS)
@pytest.mark.parametrize("case_id, dtype, condition, route", list(_case_params()))
def test_at_least_as_accurate_as_torch(measured, case_id, dtype, condition, route, parametrization):
    eps = torch.finfo(dtype).eps
    condition = 2.0 ** round(math.log2(condition))
    failures = []
    for quantity, (ours, theirs) in measured(case_id, route)[parametrization].items():
        assert math.isfinite(ours), quantity
        limit = BOUND * condition * eps if theirs is None else max(FACTOR * theirs, FLOOR_ULPS * eps)
        if ours > limit:
            failures.append(f"{quantity}: {ours:.2e} > {limit:.2e} (torch: {theirs})")
    assert not failures, failures


@needs_extended
def test_reference_is_far_more_accurate_than_float64():
    """The extended-precision inverse of an exactly stored covariance with condition number ~1e12 matches its
    exactly known inverse to ~cond * 1e-19, a thousand times below float64's own error cond * 1e-16."""
    loc, cov, prec, _ = accuracy.make_case(16, 1, 1e12, generator=torch.Generator().manual_seed(0))
    _, reference_prec, _, _ = accuracy._gaussian("covariance_matrix", cov, accuracy.LD)
    exact = prec.numpy().astype(accuracy.LD)
    error = float(np.abs(reference_prec - exact).max() / np.abs(exact).max())
    float64_error = (torch.cholesky_inverse(torch.linalg.cholesky(cov)) - prec).abs().max() / prec.abs().max()
    assert error < 1e-6 and error < float64_error.item() / 100


@needs_extended
def test_exact_construction():
    """Every entry of the covariance and of its inverse is stored exactly: their product, summed in extended
    precision (where these dyadic sums are exact), is the identity to the last bit; the condition number is the one
    asked for."""
    _, cov, prec, _ = accuracy.make_case(64, 1, 2.0**30, scale=2.0**-10, generator=torch.Generator().manual_seed(1))
    product = cov.numpy().astype(accuracy.LD) @ prec.numpy().astype(accuracy.LD)
    assert np.array_equal(product, np.eye(64))
    eig = torch.linalg.eigvalsh(cov)
    assert abs((eig.max() / eig.min()).log2().item() - 30) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("parametrization", ["scale_tril", "covariance_matrix"])
def test_large_float32_factors_keep_the_left_solve(monkeypatch, parametrization):
    """On CPUs where float32 solves run from the right (faster, but less accurate as ``d`` grows: 2.2x torch's
    error at d = 512), large factors keep the left solve and torch's accuracy."""
    monkeypatch.setattr(_factor, "_RIGHT_SOLVE_IS_FASTER", True)
    g = torch.Generator().manual_seed(0)
    p = accuracy.make_case(512, 16, 1e2, 1.0, 1.0, generator=g)
    q = accuracy.make_case(512, 1, 1e2, 1.0, 1.0, generator=g)
    errors = accuracy.measure(torch.float32, parametrization, p, q)
    for quantity in ("log_prob", "value"):
        ours, theirs = errors[quantity]
        assert ours <= max(1.25 * theirs, 4 * torch.finfo(torch.float32).eps), (quantity, ours, theirs)


@pytest.mark.parametrize("d", [2, 8])
def test_summed_precision_gradient_near_the_optimum(d):
    """The gradient of the summed log_prob w.r.t. the precision at 2^20 float32 points drawn from the distribution,
    where it is a small difference of two large sums, 1/2 (N Sigma - sum_s r r^T): in closed form and by autograd,
    within torch's error (one GEMM over all points, then the subtraction, left 20-46 times torch's error here)."""
    case = accuracy.make_case(d, 2**20, 1e2, generator=torch.Generator().manual_seed(0))
    errors = accuracy.measure_summed(torch.float32, "precision_matrix", case)
    for path, (ours, theirs) in errors.items():
        assert ours <= max(theirs, FLOOR_ULPS * torch.finfo(torch.float32).eps), (path, ours, theirs)


@pytest.mark.parametrize("dtype, condition", [(torch.float32, 1e3), (torch.float64, 1e8)], ids=["float32", "float64"])
@pytest.mark.parametrize("d", [2, 3])
def test_many_small_gaussians_as_accurate_as_torch(d, dtype, condition):
    """The elementwise factors of many small members (benchmarks/accuracy_small.py, which the accuracy table runs at
    more members and seeds): each quantity's worst member within FACTOR times torch's error, or a few ulps."""
    small = accuracy.accuracy_small
    members = 1024 * d  # enough to take the elementwise factors
    floor = FLOOR_ULPS * torch.finfo(dtype).eps
    for seed in range(2):
        for quantity, (ours, theirs) in small.measure(members, d, condition, dtype, seed).items():
            assert ours <= max(FACTOR * theirs, floor), (quantity, seed, ours, theirs)
