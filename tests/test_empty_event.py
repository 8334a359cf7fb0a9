"""Event size d = 0: every derivative, Fisher information and natural gradient is an empty tensor of the shape the
formulas give (torch's own MultivariateNormal raises at d = 0, so the shapes are the formulas' and autograd's).

The log-density of the zero-dimensional Gaussian is 0 (an empty sum, and det of the empty matrix is 1); with
``S = broadcast_shapes(value.shape[:-1], batch_shape)`` the per-sample derivatives have shape ``S + (0,)`` or
``S + (0, 0)``, the vech layout ``S + (0,)``, the Fisher information ``batch_shape + (0, 0)``.
"""

import pytest
import torch
from helpers import PARAMETRIZATIONS, WRT

from torch_mvn_ext import JacobianMVN

# (loc batch, matrix batch, value batch), as in helpers.SHAPE_GRID
SHAPES = [((), (), (4,)), ((3,), (), (2, 3)), ((), (3,), (3,)), ((2, 1), (3,), (5, 2, 3))]
SHAPE_IDS = [f"loc{a}-mat{b}-x{c}" for a, b, c in SHAPES]


def empty_case(parametrization, shapes, requires_grad=False):
    loc_batch, mat_batch, x_batch = shapes
    loc = torch.zeros(*loc_batch, 0, dtype=torch.float64, requires_grad=requires_grad)
    matrix = torch.zeros(*mat_batch, 0, 0, dtype=torch.float64, requires_grad=requires_grad)
    x = torch.zeros(*x_batch, 0, dtype=torch.float64, requires_grad=requires_grad)
    return loc, matrix, x, JacobianMVN(loc, **{parametrization: matrix})


def formula_shape(S, wrt, layout):
    if wrt in ("value", "loc"):
        return S + (0,)
    return S + ((0,) if layout == "vech" else (0, 0))


@pytest.mark.parametrize("shapes", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_per_sample_derivatives_are_empty_of_the_formula_shape(parametrization, shapes):
    loc, matrix, x, d = empty_case(parametrization, shapes)
    S = torch.broadcast_shapes(x.shape[:-1], loc.shape[:-1], matrix.shape[:-2])
    torch.testing.assert_close(d.log_prob(x), torch.zeros(S, dtype=torch.float64), rtol=0, atol=0)
    for layout in ("full", "vech"):
        jac = d.jacobian(x, WRT, layout=layout)
        lp, grads = d.log_prob_and_grads(x, WRT, layout=layout)
        torch.testing.assert_close(lp, torch.zeros(S, dtype=torch.float64), rtol=0, atol=0)
        for wrt in WRT:
            assert jac[wrt].shape == grads[wrt].shape == formula_shape(S, wrt, layout), (wrt, layout)
            buf = torch.empty(formula_shape(S, wrt, layout), dtype=torch.float64)
            assert d.jacobian(x, wrt, layout=layout, out=buf).shape == buf.shape


@pytest.mark.parametrize("shapes", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_summed_gradients_have_autograds_shapes(parametrization, shapes):
    """reduction="sum" gives what torch.autograd.grad gives for the user's tensors: empty, in their shapes (the
    batch_shape matrix for a matrix other than the parametrization)."""
    loc, matrix, x, d = empty_case(parametrization, shapes, requires_grad=True)
    expected = dict(zip(("value", "loc", parametrization), torch.autograd.grad(d.log_prob(x).sum(), (x, loc, matrix))))
    for layout in ("full", "vech"):
        _, grads = d.log_prob_and_grads(x.detach(), WRT, reduction="sum", layout=layout)
        for wrt in WRT:
            if wrt in expected:
                shape = expected[wrt].shape
                if layout == "vech" and wrt not in ("value", "loc"):
                    shape = shape[:-2] + (0,)
            else:
                shape = formula_shape(d.batch_shape, wrt, layout)
            assert grads[wrt].shape == shape, (wrt, layout)


@pytest.mark.parametrize("shapes", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_fisher_information_and_natural_gradient_are_empty(parametrization, shapes):
    _, _, _, d = empty_case(parametrization, shapes)
    assert d.fisher_information("loc").shape == d.batch_shape + (0, 0)
    for wrt in PARAMETRIZATIONS:
        assert d.fisher_information(wrt).shape == d.batch_shape + (0, 0), wrt
        g = torch.zeros(0, 0, dtype=torch.float64)
        assert d.natural_gradient({wrt: g})[wrt].shape == d.batch_shape + (0, 0), wrt
    assert d.natural_gradient({"loc": torch.zeros(0, dtype=torch.float64)})["loc"].shape == d.batch_shape + (0,)
