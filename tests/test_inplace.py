"""In-place changes of the value or of ``loc`` between ``log_prob`` and ``backward()``: the gradients (and those of
a double backward) are torch's MultivariateNormal's."""

import pytest
import torch
from helpers import PARAMETRIZATIONS, matrix_for, random_spd
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN

D = 3


def _inplace_run(cls, parametrization, change, create_graph):
    """Gradients of ``log_prob(...).sum()`` w.r.t. (value leaf, loc, matrix) after ``change`` modified ``value`` or
    ``loc`` in place; with ``create_graph``, also the gradients of a function of those gradients."""
    torch.manual_seed(4)
    loc = torch.randn(D, dtype=torch.float64, requires_grad=True)
    m = matrix_for(parametrization, random_spd((), D)).requires_grad_()
    x_leaf = torch.randn(4, D, dtype=torch.float64, requires_grad=True)
    x = x_leaf * 1.0  # a buffer derived from a leaf, which may be modified in place
    lp = cls(loc, **{parametrization: m}).log_prob(x).sum()
    if change == "value":
        x.add_(1.0)
    else:  # an optimizer step on loc
        with torch.no_grad():
            loc.add_(0.5)
    inputs = (x_leaf, loc, m)
    grads = torch.autograd.grad(lp, inputs, create_graph=create_graph)
    if not create_graph:
        return grads
    weights = [torch.linspace(0.5, 1.5, g.numel(), dtype=g.dtype).reshape(g.shape) for g in grads]
    second = torch.autograd.grad(sum((w * g).sum() for w, g in zip(weights, grads)), inputs, allow_unused=True)
    return grads + tuple(torch.zeros_like(i) if s is None else s for i, s in zip(inputs, second))


@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "double-backward"])
@pytest.mark.parametrize("change", ["value", "loc"])
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_inplace_change_before_backward_matches_torch(parametrization, change, create_graph, assert_close):
    expected = _inplace_run(MultivariateNormal, parametrization, change, create_graph)
    actual = _inplace_run(JacobianMVN, parametrization, change, create_graph)
    names = ["value", "loc", parametrization] * 2
    for name, a, e in zip(names, actual, expected):
        assert_close(a, e, msg=lambda m, name=name: f"gradient w.r.t. {name}: {m}")
