"""Unvalidated, unsymmetric matrices: log_prob reads the triangle torch's MultivariateNormal reads, and every other
method reads the same one."""

import pytest
import torch
from helpers import PARAMETRIZATIONS, WRT, matrix_for, random_spd
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN

D = 3


def _unsymmetric(parametrization):
    """An unsymmetric matrix and the symmetric one that torch's MVN reads from it: ``torch.linalg.cholesky`` reads the
    lower triangle of a covariance; a precision goes through the Cholesky factor of the flipped matrix, which reads
    the upper triangle."""
    sym = matrix_for(parametrization, random_spd((2,), D))
    noise = torch.randn(2, D, D, dtype=torch.float64)
    if parametrization == "covariance_matrix":
        m = sym + noise.triu(1)
        read = m.tril() + m.tril(-1).mT
    else:
        m = sym + noise.tril(-1)
        read = m.triu() + m.triu(1).mT
    assert torch.equal(read, sym)
    return m, sym


SYMMETRIZED_METHODS = {
    "marginal": lambda d, x, g: d.marginal([2, 0]).log_prob(x[..., [2, 0]]),
    "marginal_leading": lambda d, x, g: d.marginal([0, 1]).log_prob(x[..., :2]),
    "condition": lambda d, x, g: d.condition([1], x[..., 1:2]).log_prob(x[..., [0, 2]]),
    "condition_leading": lambda d, x, g: d.condition([0], x[..., :1]).log_prob(x[..., 1:]),
    "hessian": lambda d, x, g: d.hessian(x),
    "natural_gradient_loc": lambda d, x, g: d.natural_gradient({"loc": g[0]})["loc"],
    "natural_gradient_covariance": lambda d, x, g: d.natural_gradient({"covariance_matrix": g[1]})["covariance_matrix"],
    "natural_gradient_precision": lambda d, x, g: d.natural_gradient({"precision_matrix": g[1]})["precision_matrix"],
    "natural_gradient_scale_tril": lambda d, x, g: d.natural_gradient({"scale_tril": g[1]})["scale_tril"],
    **{f"fisher_information_{w}": (lambda d, x, g, w=w: d.fisher_information(w)) for w in WRT[1:]},
    **{f"jacobian_{w}": (lambda d, x, g, w=w: d.jacobian(x, w)) for w in WRT},
    **{
        f"log_prob_and_grads_{w}": (lambda d, x, g, w=w: d.log_prob_and_grads(x, (w,), reduction="sum")[1][w])
        for w in PARAMETRIZATIONS
    },
    "scale_tril": lambda d, x, g: d.scale_tril,
    "covariance_matrix": lambda d, x, g: d.covariance_matrix,
    "precision_matrix": lambda d, x, g: d.precision_matrix,
    "variance": lambda d, x, g: d.variance,
    "entropy": lambda d, x, g: d.entropy(),
    "rsample": lambda d, x, g: d.rsample((3,)),
}


@pytest.mark.parametrize("parametrization", ["covariance_matrix", "precision_matrix"])
def test_unsymmetric_log_prob_reads_what_torch_reads(parametrization, assert_close):
    m, sym = _unsymmetric(parametrization)
    loc = torch.randn(D, dtype=torch.float64)
    x = torch.randn(5, 2, D, dtype=torch.float64)
    expected = MultivariateNormal(loc, **{parametrization: m}, validate_args=False).log_prob(x)
    assert_close(MultivariateNormal(loc, **{parametrization: sym}).log_prob(x), expected)
    assert_close(JacobianMVN(loc, **{parametrization: m}, validate_args=False).log_prob(x), expected)


# The given matrix itself is returned as given, as torch's MVN returns it; every derived one is compared.
@pytest.mark.parametrize(
    ("parametrization", "method"),
    [(p, method) for p in ("covariance_matrix", "precision_matrix") for method in SYMMETRIZED_METHODS if method != p],
)
def test_unsymmetric_matrix_methods_agree_with_log_prob(parametrization, method, assert_close):
    m, sym = _unsymmetric(parametrization)
    loc = torch.randn(D, dtype=torch.float64)
    x = torch.randn(5, 2, D, dtype=torch.float64)
    g = (torch.randn(D, dtype=torch.float64), torch.randn(D, D, dtype=torch.float64))
    fn = SYMMETRIZED_METHODS[method]
    torch.manual_seed(3)
    actual = fn(JacobianMVN(loc, **{parametrization: m}, validate_args=False), x, g)
    torch.manual_seed(3)
    expected = fn(JacobianMVN(loc, **{parametrization: sym}, validate_args=False), x, g)
    assert_close(actual, expected)
