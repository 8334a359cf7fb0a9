"""One consistent state: every method reads what the distribution derived at construction, as torch's MVN does, so
that an in-place change to the caller's tensors afterwards changes no answer."""

import pytest
import torch
from helpers import DENSE, PARAMETRIZATIONS, WRT, matrix_for, random_spd
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN

D = 3


def _everything(d, x):
    """Every method's answer that depends on the matrix, as a flat dict."""
    out = {
        "variance": d.variance,
        "stddev": d.stddev,
        "scale_tril": d.scale_tril,
        "log_prob": d.log_prob(x),
        "entropy": d.entropy(),
        "hessian": d.hessian(x),
        "fisher-loc": d.fisher_information("loc"),
        "natural_gradient-loc": d.natural_gradient({"loc": x[0]})["loc"],
        "marginal": d.marginal([2, 0]).log_prob(x[..., [2, 0]]),
        "condition": d.condition([1], x[..., 1:2]).log_prob(x[..., [0, 2]]),
    }
    for name in ("covariance_matrix", "precision_matrix"):
        if name != d.parametrization:  # the given matrix is the caller's tensor, in torch's MVN too
            out[name] = getattr(d, name)
        out[f"fisher-{name}"] = d.fisher_information(name)
    for layout in ("full", "vech"):
        for name, jac in d.jacobian(x, WRT, layout=layout).items():
            out[f"jacobian-{name}-{layout}"] = jac
    _, grads = d.log_prob_and_grads(x, WRT, reduction="sum")
    out.update({f"lpg-sum-{k}": v for k, v in grads.items()})
    return out


@pytest.mark.parametrize("parametrization", ["covariance_matrix", "precision_matrix"])
def test_in_place_change_of_the_callers_matrix_changes_no_answer(parametrization, assert_close):
    cov = random_spd((), D)
    loc = torch.randn(D, dtype=torch.float64)
    x = torch.randn(5, D, dtype=torch.float64)
    m = matrix_for(parametrization, cov)
    expected = _everything(JacobianMVN(loc, **{parametrization: m.clone()}), x)
    # torch's MVN for the numbers that it has, before the change
    reference = MultivariateNormal(loc, **{parametrization: m.clone()})
    d = JacobianMVN(loc, **{parametrization: m})
    m.mul_(4.0)  # after construction: an optimizer step, say
    got = _everything(d, x)
    for key, value in expected.items():
        assert_close(got[key], value, msg=lambda msg, key=key: f"{key}: {msg}")
    assert_close(d.variance, reference.variance)
    assert_close(d.hessian(x), -reference.precision_matrix.expand(5, D, D))


def test_in_place_change_of_a_given_scale_tril_is_seen_as_by_torch(assert_close):
    """A given scale_tril is the factor itself, in torch's MVN too: both read its new values alike, everywhere."""
    tril = torch.linalg.cholesky(random_spd((), D))
    loc = torch.randn(D, dtype=torch.float64)
    x = torch.randn(5, D, dtype=torch.float64)
    ours, theirs = JacobianMVN(loc, scale_tril=tril), MultivariateNormal(loc, scale_tril=tril)
    tril.mul_(2.0)
    for name in ("variance", "covariance_matrix", "precision_matrix"):
        assert_close(getattr(ours, name), getattr(theirs, name))
    assert_close(ours.log_prob(x), theirs.log_prob(x))
    assert_close(ours.hessian(x), -theirs.precision_matrix.expand(5, D, D))
    params = {"loc": loc, "scale_tril": tril}
    assert_close(ours.jacobian(x, "loc"), DENSE["scale_tril"].per_sample_grad(x, params, "loc"))


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_in_place_change_of_the_callers_loc_is_seen_as_by_torch(parametrization, assert_close):
    """loc is the caller's tensor in torch's MVN (its mean is a view of it): both read its new values alike."""
    cov = random_spd((), D)
    loc = torch.randn(D, dtype=torch.float64)
    x = torch.randn(5, D, dtype=torch.float64)
    m = matrix_for(parametrization, cov)
    ours, theirs = JacobianMVN(loc, **{parametrization: m}), MultivariateNormal(loc, **{parametrization: m})
    loc.add_(1.0)
    assert_close(ours.log_prob(x), theirs.log_prob(x))
    assert_close(ours.mean, theirs.mean)
