"""Infinite values and means give infinities where torch's MultivariateNormal gives them, whatever the
parametrization: never a finite number in place of an infinity, never a NaN where torch has an infinity."""

import math

import pytest
import torch
from helpers import DENSE, PARAMETRIZATIONS, matrix_for, random_spd
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN

D = 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_infinite_values_give_infinities(parametrization, dtype):
    """Unvalidated, a value with an infinite entry has log_prob -inf and an infinite score where torch's MVN has:
    never a finite number in place of an infinity (a clamp), never a NaN where torch has an infinity."""
    torch.manual_seed(3)
    a = torch.randn(D, D, dtype=torch.float64)
    cov = a @ a.T + D * torch.eye(D, dtype=torch.float64)
    m = matrix_for(parametrization, cov).to(dtype)
    loc = torch.zeros(D, dtype=dtype)
    inf = float("inf")
    x = torch.tensor([[inf, 0.5, 0.2], [-inf, 0.1, 0.3], [0.3, 0.2, 0.1]], dtype=dtype)
    d = JacobianMVN(loc, **{parametrization: m}, validate_args=False)
    expected = DENSE[parametrization].per_sample_grad(x, {"loc": loc, parametrization: m}, "value")
    score = d.jacobian(x, "value")
    lp = d.log_prob(x)
    reference = MultivariateNormal(loc, **{parametrization: m}, validate_args=False).log_prob(x)
    both = ~expected.isnan()  # torch's own solves meet inf - inf in some entries
    assert torch.equal(score.isinf()[both], expected.isinf()[both]), (score, expected)
    assert torch.equal(score[both].isinf() & (score[both] > 0), expected[both].isinf() & (expected[both] > 0))
    torch.testing.assert_close(score[2], expected[2])  # the finite row is untouched
    known = ~reference.isnan()
    torch.testing.assert_close(lp[known], reference[known])


def test_infinite_value_with_a_diagonal_precision_keeps_the_finite_entries():
    """With a diagonal precision, an infinite coordinate leaves the others' scores finite: -P r entry by entry."""
    p = torch.diag(torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64))
    d = JacobianMVN(torch.zeros(D, dtype=torch.float64), precision_matrix=p, validate_args=False)
    x = torch.tensor([float("inf"), 0.5, -0.25], dtype=torch.float64)
    torch.testing.assert_close(
        d.jacobian(x, "value"), -(p.diagonal() * torch.tensor([float("inf"), 0.5, -0.25], dtype=torch.float64))
    )


@pytest.mark.parametrize("where", ["value", "loc"])
def test_precision_infinite_entry_gives_minus_inf(where):
    """Precision parametrization, unvalidated: an infinite entry of the value or of loc gives -inf where torch's MVN
    does."""
    loc = torch.randn(D, dtype=torch.float64)
    p = matrix_for("precision_matrix", random_spd((), D))
    checked = []
    for i in range(D):
        for sign in (1.0, -1.0):
            bad = torch.zeros(D, dtype=torch.float64)
            bad[i] = sign * math.inf
            x, mean = (loc + bad, loc) if where == "value" else (loc, loc + bad)
            expected = MultivariateNormal(mean, precision_matrix=p, validate_args=False).log_prob(x)
            if expected.item() != -math.inf:
                continue  # torch gives NaN for this pattern: nothing to match
            actual = JacobianMVN(mean, precision_matrix=p, validate_args=False).log_prob(x)
            assert actual.item() == -math.inf, f"entry {i} = {sign * math.inf}: got {actual.item()}"
            checked.append((i, sign))
    assert checked, "torch gives -inf for no pattern: the test checks nothing"
