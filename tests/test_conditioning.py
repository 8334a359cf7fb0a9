"""marginal() and condition() against dense block-inverse formulas, Monte-Carlo regression and gradcheck."""

import math

import pytest
import torch
from helpers import PARAMETRIZATIONS, matrix_for, random_spd
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN

D = 5
# Leading in order, leading out of order, trailing, scattered, one coordinate, negative indices.
DIMS = [[0, 1], [2, 0, 1], [3, 4], [3, 1], [2], [-1, 0]]
DIMS_IDS = [str(d) for d in DIMS]
# (loc batch, matrix batch, value batch): unbatched, batched, broadcasting, and a value with extra dimensions.
BATCHES = [((), (), ()), ((3,), (3,), (3,)), ((2, 1), (3,), ()), ((), (3,), (4, 1))]
BATCH_IDS = [f"loc{a}-mat{b}-x{c}" for a, b, c in BATCHES]


def dense_conditional(loc, cov, dims, value):
    """The textbook conditional through the block inverse P = Sigma^{-1} (float64, explicit inverses).

    The conditional precision is P_aa and the mean mu_a - P_aa^{-1} P_ab (x_b - mu_b); the covariance form
    Sigma_aa - Sigma_ab Sigma_bb^{-1} Sigma_ba is checked to agree, so both textbook routes are exercised.
    """
    b = [i % D for i in dims]
    a = [i for i in range(D) if i not in b]
    prec = torch.linalg.inv(cov)
    p_aa, p_ab = prec[..., a, :][..., :, a], prec[..., a, :][..., :, b]
    cond_cov = torch.linalg.inv(p_aa)
    s_ab, s_bb = cov[..., a, :][..., :, b], cov[..., b, :][..., :, b]
    schur = cov[..., a, :][..., :, a] - s_ab @ torch.linalg.inv(s_bb) @ s_ab.mT
    torch.testing.assert_close(cond_cov, schur)
    r_b = (value - loc[..., b]).unsqueeze(-1)
    mean = loc[..., a] - (cond_cov @ p_ab @ r_b).squeeze(-1)
    return mean, cond_cov


@pytest.mark.parametrize("batches", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("dims", DIMS, ids=DIMS_IDS)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_condition_matches_the_dense_formula(parametrization, dims, batches, assert_close):
    loc_batch, mat_batch, value_batch = batches
    loc = torch.randn(*loc_batch, D, dtype=torch.float64)
    cov = random_spd(mat_batch, D)
    value = torch.randn(*value_batch, len(dims), dtype=torch.float64)
    d = JacobianMVN(loc, **{parametrization: matrix_for(parametrization, cov)})
    c = d.condition(dims, value)
    mean, cond_cov = dense_conditional(loc, cov, dims, value)
    shape = torch.broadcast_shapes(value_batch, d.batch_shape)
    assert isinstance(c, JacobianMVN)
    assert c.batch_shape == shape and c.event_shape == (D - len(dims),)
    assert_close(c.mean, mean.expand(shape + c.event_shape))
    assert_close(c.covariance_matrix, cond_cov.expand(shape + c.event_shape * 2))
    x = torch.randn(6, *shape, D - len(dims), dtype=torch.float64)
    assert_close(c.log_prob(x), MultivariateNormal(mean, cond_cov).log_prob(x))


@pytest.mark.parametrize("dims", DIMS + [[4, 2, 0, 1, 3]], ids=DIMS_IDS + ["permutation"])
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_marginal_matches_the_dense_formula(parametrization, dims, assert_close):
    loc = torch.randn(2, 1, D, dtype=torch.float64)
    cov = random_spd((3,), D)
    d = JacobianMVN(loc, **{parametrization: matrix_for(parametrization, cov)})
    m = d.marginal(dims)
    mean, sub = loc[..., dims], cov[..., dims, :][..., :, dims]
    assert m.batch_shape == (2, 3) and m.event_shape == (len(dims),)
    assert_close(m.mean, mean.expand(2, 3, len(dims)))
    assert_close(m.covariance_matrix, sub.expand(2, 3, len(dims), len(dims)))
    assert_close(m.precision_matrix, torch.linalg.inv(sub).expand(2, 3, len(dims), len(dims)))
    x = torch.randn(4, 2, 3, len(dims), dtype=torch.float64)
    assert_close(m.log_prob(x), MultivariateNormal(mean, sub).log_prob(x))


def test_precision_conditioning_never_inverts_nor_forms_sigma(monkeypatch, assert_close):
    cov = random_spd((), D)
    prec = matrix_for("precision_matrix", cov)
    loc = torch.randn(D, dtype=torch.float64)
    value = torch.randn(2, 2, dtype=torch.float64)

    def forbidden(*args, **kwargs):
        raise AssertionError("the precision path must not invert")

    d = JacobianMVN(loc, precision_matrix=prec)
    expected = [dense_conditional(loc, cov, dims, value) for dims in ([0, 1], [3, 1])]
    monkeypatch.setattr(torch, "inverse", forbidden)
    monkeypatch.setattr(torch, "cholesky_inverse", forbidden)
    monkeypatch.setattr(torch.linalg, "inv", forbidden)
    results = [d.condition(dims, value) for dims in ([0, 1], [3, 1])]
    results.append(d.marginal([3, 1]))
    assert all(r.parametrization == "precision_matrix" for r in results)
    assert "covariance_matrix" not in vars(d._state) and "scale_tril" not in vars(d._state)
    means = [r.mean for r in results[:2]]
    monkeypatch.undo()
    for m, r, (mean, cond_cov) in zip(means, results, expected):
        assert_close(m, mean)
        assert_close(r.covariance_matrix, cond_cov.expand_as(r.covariance_matrix))
    assert_close(results[2].covariance_matrix, cov[[3, 1]][:, [3, 1]])


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_results_are_complete_distributions(parametrization, assert_close):
    """jacobian, log_prob_and_grads, rsample, entropy, hessian and conditioning again, on a conditional."""
    cov = random_spd((2,), D)
    d = JacobianMVN(torch.randn(2, D, dtype=torch.float64), **{parametrization: matrix_for(parametrization, cov)})
    c = d.condition([3, 0], torch.randn(2, 2, dtype=torch.float64))
    ref = MultivariateNormal(c.mean, c.covariance_matrix)
    x = torch.randn(5, 2, 3, dtype=torch.float64).requires_grad_()
    assert_close(c.jacobian(x, "value"), torch.autograd.grad(ref.log_prob(x).sum(), x)[0])
    cov_leaf = c.covariance_matrix.detach().clone().requires_grad_()
    lp, grads = c.log_prob_and_grads(x.detach(), ("covariance_matrix",), reduction="sum")
    expected = torch.autograd.grad(MultivariateNormal(c.mean, cov_leaf).log_prob(x.detach()).sum(), cov_leaf)[0]
    assert_close(grads["covariance_matrix"], expected)
    assert_close(c.entropy(), ref.entropy())
    assert c.rsample((4,)).shape == (4, 2, 3)
    assert_close(c.hessian(x.detach()), -ref.precision_matrix.expand(5, 2, 3, 3))
    assert_close(c.marginal([1]).variance, ref.variance[..., 1:2])
    # Conditioning in two steps equals conditioning at once.
    value = torch.randn(2, 2, dtype=torch.float64)
    once = d.condition([1, 2], value)
    twice = d.condition([1], value[..., :1]).condition([1], value[..., 1:])
    assert_close(twice.mean, once.mean)
    assert_close(twice.covariance_matrix, once.covariance_matrix)


def test_condition_regression_on_samples():
    """Seeded Monte Carlo: least squares of x_a on x_b over samples recovers the conditional mean's slope and
    intercept, and the residual covariance the conditional covariance, within 5 standard errors."""
    d_ = 3
    cov = random_spd((), d_)
    loc = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    d = JacobianMVN(loc, scale_tril=torch.linalg.cholesky(cov))
    n = 100_000
    x = d.sample((n,))
    b, a = [1], [0, 2]
    design = torch.cat([torch.ones(n, 1, dtype=torch.float64), x[:, b]], -1)
    coef = torch.linalg.lstsq(design, x[:, a]).solution  # (1 + |b|, |a|): intercept and slope
    resid = x[:, a] - design @ coef
    at_zero = d.condition(b, torch.zeros(1, dtype=torch.float64))
    at_one = d.condition(b, torch.ones(1, dtype=torch.float64))
    slope, intercept = at_one.mean - at_zero.mean, at_zero.mean
    cond_cov = at_zero.covariance_matrix
    coef_cov = torch.linalg.inv(design.T @ design)  # times the residual variance of each output
    se = (coef_cov.diagonal()[:, None] * cond_cov.diagonal()[None, :]).sqrt()
    assert ((coef - torch.stack([intercept, slope])) / se).abs().max() < 5
    emp = resid.T @ resid / (n - 2)
    se_cov = ((cond_cov**2 + cond_cov.diagonal()[:, None] * cond_cov.diagonal()[None, :]) / n).sqrt()
    assert ((emp - cond_cov) / se_cov).abs().max() < 5


@pytest.mark.parametrize("dims", [[0, 1], [3, 1]], ids=["leading", "scattered"])
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_gradcheck(parametrization, dims):
    d_ = 4
    cov = random_spd((), d_)
    loc = torch.randn(d_, dtype=torch.float64, requires_grad=True)
    matrix = matrix_for(parametrization, cov).requires_grad_()
    value = torch.randn(2, len(dims), dtype=torch.float64, requires_grad=True)

    def build(loc, matrix):
        # Perturb within the symmetric (or lower-triangular) matrices.
        matrix = matrix.tril() if parametrization == "scale_tril" else (matrix + matrix.mT) / 2
        return JacobianMVN(loc, **{parametrization: matrix})

    def conditional(loc, matrix, value):
        c = build(loc, matrix).condition(dims, value)
        return c.mean, c.covariance_matrix, c.scale_tril

    def marginal(loc, matrix):
        m = build(loc, matrix).marginal(dims)
        return m.mean, m.covariance_matrix, m.precision_matrix

    assert torch.autograd.gradcheck(conditional, (loc, matrix, value), fast_mode=True)
    assert torch.autograd.gradcheck(marginal, (loc, matrix), fast_mode=True)


def test_empty_dims_condition_on_nothing(assert_close):
    d = JacobianMVN(torch.randn(3, D, dtype=torch.float64), covariance_matrix=random_spd((3,), D))
    c = d.condition([], torch.zeros(2, 1, 0, dtype=torch.float64))
    assert c.batch_shape == (2, 3) and c.event_shape == (D,)
    assert_close(c.covariance_matrix, d.covariance_matrix.expand(2, 3, D, D))


def test_negative_dims_count_from_the_end(assert_close):
    d = JacobianMVN(torch.randn(D, dtype=torch.float64), precision_matrix=random_spd((), D))
    value = torch.randn(2, dtype=torch.float64)
    assert_close(d.condition([-1, 1], value).mean, d.condition([D - 1, 1], value).mean)
    assert_close(d.marginal([-2]).covariance_matrix, d.marginal([D - 2]).covariance_matrix)
    assert_close(d.marginal(torch.tensor([4, 0])).covariance_matrix, d.marginal((4, 0)).covariance_matrix)


def test_argument_errors():
    d = JacobianMVN(torch.zeros(4, D, dtype=torch.float64), covariance_matrix=random_spd((4,), D))
    two = torch.zeros(2, dtype=torch.float64)
    cases = [
        (lambda: d.marginal([1, 1]), r"repeats the event index\(es\) \[1\]"),
        (lambda: d.marginal([0, -D]), r"repeats the event index\(es\) \[0\]"),
        (lambda: d.marginal([D]), rf"out of range for event size {D} \(allowed: {-D} to {D - 1}\)"),
        (lambda: d.marginal([1.0]), "dims must contain ints"),
        (lambda: d.marginal([True]), "dims must contain ints"),
        (lambda: d.marginal(2), "dims must be a sequence"),
        (lambda: d.marginal(torch.tensor([0.0])), "dims must be a sequence of ints"),
        (lambda: d.marginal([]), "dims is empty"),
        (lambda: d.condition(range(D), torch.zeros(D)), "leaves no coordinate"),
        (lambda: d.condition([0, 1], torch.zeros(3, dtype=torch.float64)), r"must end in \(2,\) \(len\(dims\) = 2\)"),
        (lambda: d.condition([0, 1], two.expand(5, 2)), r"does not broadcast with the distribution's batch_shape"),
        (lambda: d.condition([0, 1], [0.0, 1.0]), "value must be a torch.Tensor"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert math.isfinite(d.condition([0, 1], two).log_prob(torch.zeros(3, dtype=torch.float64)).sum().item())


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_expanded_distribution_keeps_its_batch_shape(parametrization, assert_close):
    matrix = matrix_for(parametrization, random_spd((), D))
    d = JacobianMVN(torch.randn(D, dtype=torch.float64), **{parametrization: matrix})
    big = d.expand((4, 2))
    value = torch.randn(2, 2, dtype=torch.float64)
    for dims in ([0, 1], [3, 1]):
        m, c = big.marginal(dims), big.condition(dims, value)
        assert m.batch_shape == c.batch_shape == (4, 2)
        assert_close(m.covariance_matrix, d.marginal(dims).covariance_matrix.expand(4, 2, 2, 2))
        assert_close(c.mean, d.condition(dims, value).mean.expand(4, 2, D - 2))
