"""``JacobianMVN.from_distribution``: an existing torch or Pyro MultivariateNormal becomes a JacobianMVN of the same
numbers and gradients, sharing the source's factor; other distributions are refused."""

import pyro.distributions as dist
import pytest
import torch
from helpers import DENSE, PARAMETRIZATIONS, matrix_for, random_spd
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN

D = 3


SOURCES = {"torch": MultivariateNormal, "pyro": dist.MultivariateNormal}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_from_distribution_matches_source(source, parametrization, assert_close):
    loc = torch.randn(2, 1, D, dtype=torch.float64, requires_grad=True)
    m = matrix_for(parametrization, random_spd((3,), D)).requires_grad_()
    mvn = SOURCES[source](loc, **{parametrization: m})
    ours = JacobianMVN.from_distribution(mvn)
    assert type(ours) is JacobianMVN
    assert ours.parametrization == parametrization
    assert ours.batch_shape == mvn.batch_shape == (2, 3)
    assert ours.event_shape == mvn.event_shape
    x = torch.randn(4, 2, 3, D, dtype=torch.float64)
    assert_close(ours.log_prob(x), mvn.log_prob(x))
    torch.manual_seed(2)
    expected = mvn.rsample((5,))
    torch.manual_seed(2)
    assert_close(ours.rsample((5,)), expected)
    # Gradients flow to the source's own parameters, through the factor both share (so the source's graph is kept
    # for the second backward, as it would be for two backwards through the source itself).
    expected_grads = torch.autograd.grad(mvn.log_prob(x).sum(), (loc, m), retain_graph=True)
    grads = torch.autograd.grad(ours.log_prob(x).sum(), (loc, m))
    for g, e in zip(grads, expected_grads):
        assert_close(g, e)
    # Per-sample jacobian against torch.func through torch's MVN, w.r.t. the source's matrix.
    loc_d, m_d = loc.detach(), m.detach()[0]
    x1 = x[:, 0, 0]
    params = {"loc": loc_d[0, 0], parametrization: m_d}
    expected_jac = DENSE[parametrization].per_sample_grad(x1, params, parametrization)
    single = JacobianMVN.from_distribution(SOURCES[source](loc_d[0, 0], **{parametrization: m_d}))
    assert_close(single.jacobian(x1, parametrization), expected_jac)


@pytest.mark.parametrize("parametrization", ["covariance_matrix", "scale_tril"])
def test_from_distribution_reuses_the_factor(parametrization):
    mvn = MultivariateNormal(
        torch.zeros(D, dtype=torch.float64), **{parametrization: matrix_for(parametrization, random_spd((2,), D))}
    )
    source_factor = mvn._unbroadcasted_scale_tril
    ours = JacobianMVN.from_distribution(mvn)
    # No new Cholesky factorization: the factor is the source's tensor, not an equal copy.
    assert ours.scale_tril.data_ptr() == source_factor.data_ptr()


def test_from_distribution_reuses_the_precision_factor():
    p = matrix_for("precision_matrix", random_spd((2,), D))
    mvn = MultivariateNormal(torch.zeros(D, dtype=torch.float64), precision_matrix=p)
    ours = JacobianMVN.from_distribution(mvn)
    assert ours.precision_matrix.data_ptr() == p.data_ptr()
    assert ours.scale_tril.data_ptr() == mvn._unbroadcasted_scale_tril.data_ptr()


@pytest.mark.parametrize(
    "other",
    [
        torch.distributions.Normal(torch.zeros(D), 1.0),
        torch.distributions.LowRankMultivariateNormal(torch.zeros(D), torch.ones(D, 1), torch.ones(D)),
        dist.Normal(torch.zeros(D), 1.0).to_event(1),
    ],
)
def test_from_distribution_rejects_other_distributions(other):
    with pytest.raises((ValueError, TypeError), match=type(other).__name__):
        JacobianMVN.from_distribution(other)


def test_from_distribution_scale_tril_gradient_has_the_users_shape(assert_close):
    """torch keeps a given scale_tril as is: the summed gradient w.r.t. it has its shape and autograd's value."""
    tril = torch.linalg.cholesky(random_spd((), D)).requires_grad_()
    mvn = MultivariateNormal(torch.zeros(2, D, dtype=torch.float64), scale_tril=tril)
    x = torch.randn(4, 2, D, dtype=torch.float64)
    _, grads = JacobianMVN.from_distribution(mvn).log_prob_and_grads(x, ("scale_tril",), reduction="sum")
    (expected,) = torch.autograd.grad(mvn.log_prob(x).sum(), (tril,))
    assert grads["scale_tril"].shape == tril.shape
    assert_close(grads["scale_tril"], expected)
