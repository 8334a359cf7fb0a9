"""Results of the derivative and information methods, and the variance, are not views of the distribution's state
or of the caller's tensors: editing one in place changes nothing else."""

import pytest
import torch
from helpers import PARAMETRIZATIONS, WRT, matrix_for, random_spd

from torch_mvn_ext import JacobianMVN

D = 3


def _edit(t):
    """``t.diagonal().add_(1)`` (or ``add_(1)`` for a vector), unless ``t`` is a view that cannot be written, which
    protects it as well."""
    try:
        with torch.no_grad():
            (t.diagonal(dim1=-2, dim2=-1) if t.dim() >= 2 and t.shape[-1] == t.shape[-2] else t).add_(1.0)
    except RuntimeError as e:
        assert "single memory location" in str(e), str(e)


def _results(d, x):
    out = {f"jacobian[{w}]": d.jacobian(x, w) for w in WRT}
    out.update({f"hessian[{w}]": d.hessian(x, w) for w in ("value", "loc")})
    out.update({f"fisher_information[{w}]": d.fisher_information(w) for w in WRT[1:]})
    out["log_prob"] = d.log_prob(x)
    return out


RESULT_METHODS = {
    "jacobian": lambda d, x, grads: d.jacobian(x, d.parametrization),
    "jacobian_value": lambda d, x, grads: d.jacobian(x, "value"),
    "hessian": lambda d, x, grads: d.hessian(x, "value"),
    "fisher_loc": lambda d, x, grads: d.fisher_information("loc"),
    "fisher_matrix": lambda d, x, grads: d.fisher_information(d.parametrization),
    "natural_gradient_loc": lambda d, x, grads: d.natural_gradient({"loc": grads["loc"]})["loc"],
    "natural_gradient_matrix": lambda d, x, grads: d.natural_gradient({"precision_matrix": grads["matrix"]})[
        "precision_matrix"
    ],
    "log_prob_and_grads": lambda d, x, grads: d.log_prob_and_grads(x, ("loc", d.parametrization))[1][d.parametrization],
}


@pytest.mark.parametrize("method", RESULT_METHODS)
@pytest.mark.parametrize("x_batch", [(), (6,)], ids=["one-point", "six-points"])
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_editing_a_result_changes_nothing_else(parametrization, x_batch, method, assert_close):
    loc = torch.randn(D, dtype=torch.float64)
    m = matrix_for(parametrization, random_spd((), D))
    x = torch.randn(*x_batch, D, dtype=torch.float64)
    grads = {"loc": torch.randn(D, dtype=torch.float64), "matrix": random_spd((), D)}
    inputs = {"loc": loc, "matrix": m, "x": x, "grad_loc": grads["loc"], "grad_matrix": grads["matrix"]}
    saved = {k: v.clone() for k, v in inputs.items()}
    d = JacobianMVN(loc, **{parametrization: m})
    _edit(RESULT_METHODS[method](d, x, grads))
    for k, v in inputs.items():
        assert torch.equal(v, saved[k]), f"{method} returned a view of the caller's {k}, which the edit changed"
    fresh = JacobianMVN(saved["loc"], **{parametrization: saved["matrix"]})
    expected, actual = _results(fresh, saved["x"]), _results(d, saved["x"])
    for k in expected:
        assert_close(actual[k], expected[k], msg=lambda msg, k=k: f"{k} after editing {method}'s result: {msg}")


def test_variance_is_not_a_view_of_the_callers_matrix():
    cov = random_spd((), D)
    original = cov.clone()
    d = JacobianMVN(torch.zeros(D, dtype=torch.float64), covariance_matrix=cov)
    d.variance.mul_(10.0)
    torch.testing.assert_close(cov, original, rtol=0, atol=0)
    # from the factor, as torch's MVN computes it: the diagonal to rounding
    torch.testing.assert_close(d.variance, original.diagonal())
