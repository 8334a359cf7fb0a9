"""Differential test: seeded random cases, each compared with torch's ``MultivariateNormal`` on every attribute and
method, with autograd and ``torch.func`` on every derivative, and with the library's own other routes.

Each case draws (from its own seed) the event size ``d`` in 1..6, the dtype, the parametrization, ``validate_args``
and batch shapes for ``loc``, the matrix and the value that broadcast with one another (size-0 and size-1 dimensions,
unbatched, extra sample dimensions). Run more cases with ``pytest tests/test_differential.py --differential-cases N``.
"""

import random
from dataclasses import dataclass

import torch
from helpers import DENSE, PARAMETRIZATIONS, TOLERANCES, WRT, matrix_for, random_spd, vech_of_full
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN

DEFAULT_CASES = 250
FIRST_SEED = 1000
TENSOR_ATTRIBUTES = ("loc", "scale_tril", "covariance_matrix", "precision_matrix", "mean", "mode", "variance", "stddev")


@dataclass(frozen=True)
class Case:
    seed: int
    d: int
    dtype: torch.dtype
    parametrization: str
    validate_args: bool
    loc_batch: tuple
    matrix_batch: tuple
    value_batch: tuple

    def __str__(self):
        return (
            f"seed={self.seed} d={self.d} {str(self.dtype).removeprefix('torch.')} {self.parametrization} "
            f"validate_args={self.validate_args} loc{self.loc_batch} matrix{self.matrix_batch} "
            f"value{self.value_batch}"
        )

    @property
    def id(self):
        dtype = str(self.dtype).removeprefix("torch.")
        v = "val" if self.validate_args else "noval"
        return (
            f"s{self.seed}-d{self.d}-{dtype}-{self.parametrization}-{v}-"
            f"loc{self.loc_batch}-mat{self.matrix_batch}-x{self.value_batch}".replace(" ", "")
        )


def _sub_batch(rng, batch):
    """A shape that broadcasts to ``batch``: a suffix of it with some sizes replaced by 1."""
    suffix = batch[len(batch) - rng.randint(0, len(batch)) :] if batch else ()
    return tuple(1 if rng.random() < 0.3 else n for n in suffix)


def draw_case(seed):
    rng = random.Random(seed)
    batch = tuple(rng.choice([0, 1, 2, 3, 3, 4]) if rng.random() > 0.1 else 0 for _ in range(rng.randint(0, 3)))
    # Mostly non-empty batches: a size-0 dimension in about one case in eight.
    if 0 in batch and rng.random() < 0.6:
        batch = tuple(n or 2 for n in batch)
    loc_batch, matrix_batch = _sub_batch(rng, batch), _sub_batch(rng, batch)
    # The distribution's batch shape is what loc and matrix broadcast to; the value adds sample dimensions.
    dist_batch = torch.broadcast_shapes(loc_batch, matrix_batch)
    sample = tuple(rng.randint(1, 3) for _ in range(rng.randint(0, 2)))
    if rng.random() < 0.7:
        value_batch = sample + tuple(1 if rng.random() < 0.3 else n for n in dist_batch)
    else:
        value_batch = _sub_batch(rng, tuple(dist_batch))
    return Case(
        seed=seed,
        d=rng.randint(1, 6),
        dtype=rng.choice([torch.float32, torch.float64]),
        parametrization=rng.choice(PARAMETRIZATIONS),
        validate_args=rng.random() < 0.5,
        loc_batch=loc_batch,
        matrix_batch=matrix_batch,
        value_batch=value_batch,
    )


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        n = metafunc.config.getoption("differential_cases") or DEFAULT_CASES
        cases = [draw_case(FIRST_SEED + i) for i in range(n)]
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


class Checker:
    """``assert_close`` and shape checks whose failure messages show the case."""

    def __init__(self, case):
        self.case = case
        self.tol = dict(TOLERANCES[case.dtype])
        if case.dtype == torch.float32:  # d up to 6, condition number 10: float32 round-off reaches a few 1e-4
            self.tol = dict(rtol=1e-3, atol=1e-3)

    def close(self, what, actual, expected):
        assert isinstance(actual, torch.Tensor), f"[{self.case}] {what}: got {type(actual).__name__}"
        self.shape(what, actual, expected.shape)
        torch.testing.assert_close(
            actual.to(expected.dtype), expected, **self.tol, msg=lambda m: f"[{self.case}] {what}: {m}"
        )

    def shape(self, what, actual, shape):
        assert actual.shape == torch.Size(shape), f"[{self.case}] {what}: shape {tuple(actual.shape)} != {tuple(shape)}"

    def dtype(self, what, actual, dtype):
        assert actual.dtype == dtype, f"[{self.case}] {what}: dtype {actual.dtype} != {dtype}"


def _inputs(case):
    """``(loc, matrix, x)``: the arguments, in the case's dtype."""
    torch.manual_seed(case.seed)
    d = case.d
    cov = random_spd(case.matrix_batch, d, condition=10.0)
    loc = torch.randn(*case.loc_batch, d, dtype=torch.float64)
    x = 1.5 * torch.randn(*case.value_batch, d, dtype=torch.float64)
    matrix = matrix_for(case.parametrization, cov)
    return loc.to(case.dtype), matrix.to(case.dtype), x.to(case.dtype)


def _pair(case, loc, matrix):
    """The case's JacobianMVN and torch's MVN of the same arguments (torch's unvalidated where a batch dimension has
    size 0: its constraint checks cannot reshape an empty batch)."""
    empty = 0 in case.loc_batch or 0 in case.matrix_batch
    kwargs = {case.parametrization: matrix}
    return (
        JacobianMVN(loc, **kwargs, validate_args=case.validate_args),
        MultivariateNormal(loc, **kwargs, validate_args=case.validate_args and not empty),
    )


def _torch_log_prob(mvn, x):
    """torch's ``mvn.log_prob(x)``; where the broadcast batch is empty (torch's ``_batch_mahalanobis`` then divides by
    zero), the empty result, still connected to ``x``, ``loc`` and the matrix for autograd."""
    S = torch.broadcast_shapes(x.shape[:-1], mvn.batch_shape)
    if S.numel():
        return mvn.log_prob(x)
    return (0.0 * (x.sum() + mvn.loc.sum() + mvn._unbroadcasted_scale_tril.sum())).expand(S)


def _float64_params(case, loc, matrix):
    """The case's arguments in float64: the reference's parameters for the distribution they define."""
    return {"loc": loc.double(), case.parametrization: matrix.double()}


def test_differential(case):
    check = Checker(case)
    d = case.d
    loc, matrix, x = _inputs(case)
    ours, theirs = _pair(case, loc, matrix)
    S = torch.broadcast_shapes(x.shape[:-1], theirs.batch_shape)

    # Attributes and methods against torch's MVN.
    assert ours.batch_shape == theirs.batch_shape, f"[{case}] batch_shape {ours.batch_shape} != {theirs.batch_shape}"
    assert ours.event_shape == theirs.event_shape, f"[{case}] event_shape {ours.event_shape} != {theirs.event_shape}"
    assert ours.parametrization == case.parametrization, f"[{case}] parametrization {ours.parametrization}"
    for name in TENSOR_ATTRIBUTES:
        check.close(name, getattr(ours, name), getattr(theirs, name))
        check.dtype(name, getattr(ours, name), case.dtype)
    check.close("log_prob", ours.log_prob(x), _torch_log_prob(theirs, x))
    check.close("entropy", ours.entropy(), theirs.entropy())
    for method in ("rsample", "sample"):
        torch.manual_seed(case.seed + 1)
        expected = getattr(theirs, method)((2,))
        torch.manual_seed(case.seed + 1)
        check.close(method, getattr(ours, method)((2,)), expected)
    new_batch = (2,) + tuple(theirs.batch_shape)
    ours_e, theirs_e = ours.expand(new_batch), theirs.expand(new_batch)
    assert type(ours_e) is JacobianMVN and ours_e.batch_shape == theirs_e.batch_shape, f"[{case}] expand"
    x_e = theirs_e.sample()
    check.close("expand().log_prob", ours_e.log_prob(x_e), _torch_log_prob(theirs_e, x_e))
    check.close("expand().precision_matrix", ours_e.precision_matrix, theirs_e.precision_matrix)

    # Autograd through log_prob(...).sum() against autograd through torch's MVN.
    def autograd_grads(cls):
        xl, ll, ml = (t.detach().clone().requires_grad_() for t in (x, loc, matrix))
        validate = (ours if cls is JacobianMVN else theirs)._validate_args
        built = cls(ll, **{case.parametrization: ml}, validate_args=validate)
        lp = (built.log_prob(xl) if cls is JacobianMVN else _torch_log_prob(built, xl)).sum()
        return dict(zip(("value", "loc", case.parametrization), torch.autograd.grad(lp, (xl, ll, ml))))

    expected_sum = autograd_grads(MultivariateNormal)
    actual_sum = autograd_grads(JacobianMVN)
    for name in expected_sum:
        check.close(f"autograd w.r.t. {name}", actual_sum[name], expected_sum[name])

    # Per-sample jacobian for every wrt, both layouts, against vmap(grad) through torch's MVN in float64.
    structure, params64 = DENSE[case.parametrization], _float64_params(case, loc, matrix)
    jac = {}
    for wrt in WRT:
        jac[wrt] = ours.jacobian(x, wrt)
        expected = structure.per_sample_grad(x.double(), params64, wrt)
        check.close(f"jacobian(wrt={wrt!r})", jac[wrt], expected)
        check.dtype(f"jacobian(wrt={wrt!r})", jac[wrt], case.dtype)
        vech = ours.jacobian(x, wrt, layout="vech")
        check.close(f"jacobian(wrt={wrt!r}, layout='vech')", vech, vech_of_full(jac[wrt], wrt))

    # log_prob_and_grads: "none" equals jacobian, "sum" equals autograd (with the user's tensors' shapes).
    for layout in ("full", "vech"):
        lp, grads = ours.log_prob_and_grads(x, WRT, reduction="none", layout=layout)
        check.close("log_prob_and_grads log_prob", lp, _torch_log_prob(theirs, x))
        for wrt in WRT:
            check.close(
                f"log_prob_and_grads(reduction='none', layout={layout!r})[{wrt!r}]",
                grads[wrt],
                ours.jacobian(x, wrt, layout=layout),
            )
    _, grads = ours.log_prob_and_grads(x, WRT, reduction="sum")
    for name, expected in expected_sum.items():
        check.close(f"log_prob_and_grads(reduction='sum')[{name!r}]", grads[name], expected)
    for other in PARAMETRIZATIONS:
        if other == case.parametrization:
            continue
        # The gradient w.r.t. another matrix of the same distribution, one per batch member.
        m_other = structure.reparametrize(params64, other)[other].expand(tuple(theirs.batch_shape) + (d, d)).clone()
        m_other.requires_grad_()
        other_mvn = MultivariateNormal(loc.double(), **{other: m_other}, validate_args=False)
        lp = _torch_log_prob(other_mvn, x.double()).sum()
        (expected,) = torch.autograd.grad(lp, m_other)
        check.close(f"log_prob_and_grads(reduction='sum')[{other!r}]", grads[other], expected)

    # Internal consistency: Hessians, marginal of every dimension, conditioning on nothing.
    minus_p = -theirs.precision_matrix.expand(S + (d, d))
    for wrt in ("value", "loc"):
        check.close(f"hessian(wrt={wrt!r})", ours.hessian(x, wrt), minus_p)
    lp = _torch_log_prob(theirs, x)
    check.close("marginal(all dims).log_prob", ours.marginal(list(range(d))).log_prob(x), lp)
    check.close("condition([], empty).log_prob", ours.condition([], x.new_zeros(0)).log_prob(x), lp)
