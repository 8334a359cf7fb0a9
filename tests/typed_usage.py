"""A user's typed script: ``tests/test_typing.py`` checks it with ``mypy --strict`` against the package where a fresh
interpreter finds it (every call below must type-check without a cast or an ignore) and runs it, so that the types the
annotations promise are the types the calls return.

``assert_type`` fails the type check when the inferred type is not exactly the one written; at run time it does
nothing, and ``check`` confirms the same type on the real result.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from torch_mvn_ext import JacobianMVN

if sys.version_info >= (3, 11):
    from typing import assert_type
else:  # torch depends on typing_extensions
    from typing_extensions import assert_type


def check(value: object, kind: type) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")


def scores(d: JacobianMVN, x: Tensor) -> Tensor:
    """A typed helper returning the per-sample score: no cast from a union."""
    return d.jacobian(x, "value")


def main() -> None:
    torch.manual_seed(0)
    cov = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.5]], dtype=torch.float64)
    d = JacobianMVN(torch.zeros(3, dtype=torch.float64), covariance_matrix=cov)
    x = d.sample(torch.Size([5]))
    assert_type(x, Tensor)

    # One name: a tensor, with or without keywords and out=.
    score = d.jacobian(x, "value")
    assert_type(score, Tensor)
    check(score, Tensor)
    n, k = score.shape
    default = d.jacobian(x)
    assert_type(default, Tensor)
    check(default, Tensor)
    vech = d.jacobian(x, wrt="scale_tril", layout="vech")
    assert_type(vech, Tensor)
    check(vech, Tensor)
    buffer = torch.empty(n, k, k, dtype=x.dtype)
    written = d.jacobian(x, "covariance_matrix", out=buffer)
    assert_type(written, Tensor)
    check(written, Tensor)
    check(scores(d, x), Tensor)

    # A tuple or a list of names: a dict of tensors, also with a dict for out=.
    by_name = d.jacobian(x, ("loc", "covariance_matrix"))
    assert_type(by_name, dict[str, Tensor])
    check(by_name, dict)
    check(by_name["loc"], Tensor)
    from_list = d.jacobian(x, ["value", "precision_matrix"], layout="vech")
    assert_type(from_list, dict[str, Tensor])
    check(from_list["precision_matrix"], Tensor)
    into = d.jacobian(x, ("value",), out={"value": torch.empty(n, k, dtype=x.dtype)})
    assert_type(into, dict[str, Tensor])
    check(into["value"], Tensor)

    # One pass: log-density and a dict of gradients.
    lp, grads = d.log_prob_and_grads(x, reduction="sum")
    assert_type(lp, Tensor)
    assert_type(grads, dict[str, Tensor])
    check(grads["covariance_matrix"], Tensor)

    # Gaussian algebra: dims as a list, a range or an integer tensor.
    m = d.marginal([0, 2])
    assert_type(m, JacobianMVN)
    check(m, JacobianMVN)
    check(d.marginal(range(2)), JacobianMVN)
    c = d.condition(torch.tensor([1]), torch.tensor([0.5], dtype=torch.float64))
    assert_type(c, JacobianMVN)
    check(c.jacobian(x[:, [0, 2]], "loc"), Tensor)

    # Information geometry.
    fisher = d.fisher_information("covariance_matrix")
    assert_type(fisher, Tensor)
    check(fisher, Tensor)
    natural = d.natural_gradient({"loc": grads["loc"], "covariance_matrix": grads["covariance_matrix"]})
    assert_type(natural, dict[str, Tensor])
    check(natural["loc"], Tensor)
    assert_type(d.hessian(x), Tensor)

    # From torch's distribution, and batched.
    mvn = torch.distributions.MultivariateNormal(torch.zeros(2), covariance_matrix=torch.eye(2))
    converted = JacobianMVN.from_distribution(mvn)
    assert_type(converted, JacobianMVN)
    batch = converted.expand((4,))
    assert_type(batch, JacobianMVN)
    check(batch, JacobianMVN)
    print("ok")


if __name__ == "__main__":
    main()
