"""jacobian() and log_prob_and_grads() against per-sample autograd through torch's class, for every structure of
``helpers.STRUCTURES``, and the dense structure's vech layout."""

import pytest
import torch
from helpers import (
    DENSE,
    PARAMETRIZATIONS,
    SHAPE_GRID,
    SHAPE_IDS,
    STRUCTURE_LAYOUTS,
    STRUCTURE_WRT,
    WRT,
    grid_case,
    matrix_for,
    random_spd,
    vech_of_full,
)
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN

D = 3


def vech_by_finite_differences(loc, m, x, wrt, h=1e-6):
    """Central differences of log_prob w.r.t. each unique element of ``wrt``'s matrix ``m``."""
    rows, cols = torch.tril_indices(D, D)
    columns = []
    for i, j in zip(rows.tolist(), cols.tolist()):
        e = torch.zeros(D, D, dtype=m.dtype)
        e[i, j] = 1.0
        if wrt != "scale_tril":
            e[j, i] = 1.0
        plus = MultivariateNormal(loc, **{wrt: m + h * e}).log_prob(x)
        minus = MultivariateNormal(loc, **{wrt: m - h * e}).log_prob(x)
        columns.append((plus - minus) / (2 * h))
    return torch.stack(columns, -1)


@pytest.mark.parametrize("shapes", SHAPE_GRID, ids=SHAPE_IDS)
@pytest.mark.parametrize("structure, wrt", STRUCTURE_WRT)
def test_full_layout_matches_per_sample_autograd(structure, wrt, shapes, assert_close):
    params, x = grid_case(structure, shapes, D)
    d = structure.ours(**params)
    jac = d.jacobian(x, wrt)
    S = torch.broadcast_shapes(x.shape[:-1], d.batch_shape)
    assert jac.shape == S + structure.event_shape(params, wrt)
    assert_close(jac, structure.per_sample_grad(x, params, wrt))


@pytest.mark.parametrize("shapes", SHAPE_GRID[:6], ids=SHAPE_IDS[:6])
@pytest.mark.parametrize("wrt", PARAMETRIZATIONS)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_vech_layout_matches_finite_differences(parametrization, wrt, shapes):
    structure = DENSE[parametrization]
    params, x = grid_case(structure, shapes, D)
    d = structure.ours(**params)
    jac = d.jacobian(x, wrt, layout="vech")
    assert jac.shape == d.log_prob(x).shape + (D * (D + 1) // 2,)
    m = structure.reparametrize(params, wrt)[wrt]
    torch.testing.assert_close(jac, vech_by_finite_differences(params["loc"], m, x, wrt), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("wrt", PARAMETRIZATIONS)
def test_vech_is_the_lower_triangle_of_full(wrt, assert_close):
    d = JacobianMVN(torch.randn(2, D, dtype=torch.float64), covariance_matrix=random_spd((2,), D))
    x = torch.randn(5, 2, D, dtype=torch.float64)
    full = d.jacobian(x, wrt)
    assert_close(d.jacobian(x, wrt, layout="vech"), vech_of_full(full, wrt))
    if wrt == "scale_tril":
        assert (full.triu(1) == 0).all()
    else:
        assert_close(full, full.mT)


def test_tuple_wrt_returns_a_dict_and_layout_is_ignored_for_vectors(assert_close):
    d = JacobianMVN(torch.zeros(D, dtype=torch.float64), scale_tril=torch.linalg.cholesky(random_spd((), D)))
    x = torch.randn(4, D, dtype=torch.float64)
    out = d.jacobian(x, ["value", "scale_tril"], layout="vech")
    assert isinstance(out, dict) and list(out) == ["value", "scale_tril"]
    assert_close(out["value"], d.jacobian(x, "value", layout="full"))
    assert_close(out["scale_tril"], d.jacobian(x, "scale_tril", layout="vech"))


@pytest.mark.parametrize("structure, layout", STRUCTURE_LAYOUTS)
def test_log_prob_and_grads_none_equals_jacobian(structure, layout, assert_close):
    d = structure.ours(**structure.random_params((3,), D, loc_batch_shape=(2, 1)))
    x = torch.randn(4, 2, 3, D, dtype=torch.float64)
    kw = structure.layout_kwargs(layout)
    lp, grads = d.log_prob_and_grads(x, **kw)
    assert list(grads) == ["value", "loc", *structure.params]
    assert_close(lp, d.log_prob(x))
    for name, g in grads.items():
        assert_close(g, d.jacobian(x, name, **kw))
    _, all_grads = d.log_prob_and_grads(x, structure.wrt, **kw)
    assert list(all_grads) == list(structure.wrt)


SUM_CASES = [
    # (loc shape, matrix batch, value shape): the broadcasting case first.
    ((3, D), (), (7, 1, D)),
    ((D,), (), (7, D)),
    ((2, 1, D), (3,), (5, 2, 3, D)),
    ((4, D), (4,), (4, D)),
    ((D,), (2,), (1, D)),
]


@pytest.mark.parametrize("case", SUM_CASES, ids=[str(c) for c in SUM_CASES])
@pytest.mark.parametrize("structure, layout", STRUCTURE_LAYOUTS)
def test_sum_reduction_matches_autograd(structure, layout, case, assert_close):
    loc_shape, batch, x_shape = case
    params = structure.random_params(batch, D, loc_batch_shape=loc_shape[:-1])
    x = torch.randn(x_shape, dtype=torch.float64)
    d = structure.ours(**params)
    lp, grads = d.log_prob_and_grads(x, structure.wrt, reduction="sum", **structure.layout_kwargs(layout))
    for name in structure.wrt:
        # The tensors the user passed; for a wrt the constructor does not take, its batch_shape tensor.
        leaves = {k: v.clone() for k, v in structure.reparametrize(params, name).items()}
        if name not in params and name != "value":
            leaves[name] = leaves[name].expand(d.batch_shape + structure.event_shape(params, name)).clone()
        leaves["value"] = x.clone()
        for t in leaves.values():
            t.requires_grad_()
        value = leaves.pop("value")
        ref_lp = structure.reference(**leaves).log_prob(value)
        (expected,) = torch.autograd.grad(ref_lp.sum(), value if name == "value" else leaves[name])
        expected = structure.layouts[layout](expected, name)
        assert grads[name].shape == expected.shape, name
        assert_close(grads[name], expected, msg=name)
    assert_close(lp, ref_lp.detach())


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dist_dtype", [torch.float32, torch.float64])
def test_sum_reduction_value_gradient_has_the_values_dtype(dist_dtype, value_dtype, assert_close):
    """As torch.autograd.grad returns it: the gradient w.r.t. the value in the value's dtype, w.r.t. the parameters
    in theirs, whatever the distribution casts the value to."""
    loc = torch.randn(D, dtype=dist_dtype, requires_grad=True)
    cov = random_spd((), D).to(dist_dtype)
    x = torch.randn(4, D, dtype=value_dtype, requires_grad=True)
    _, grads = JacobianMVN(loc.detach(), cov).log_prob_and_grads(x.detach(), ("value", "loc"), reduction="sum")
    expected = torch.autograd.grad(MultivariateNormal(loc, cov).log_prob(x).sum(), (x, loc))
    for g, e in zip(grads.values(), expected):
        assert g.dtype == e.dtype
        assert_close(g.double(), e.double(), atol=1e-5, rtol=1e-5)


def test_sum_reduction_builds_no_autograd_graph():
    loc = torch.zeros(D, dtype=torch.float64)
    d = JacobianMVN(loc, covariance_matrix=random_spd((), D))
    lp, grads = d.log_prob_and_grads(torch.randn(5, D, dtype=torch.float64), reduction="sum")
    assert lp.grad_fn is None and all(g.grad_fn is None for g in grads.values())


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_jacobian_is_differentiable(parametrization, assert_close):
    """A score-matching loss on jacobian(x, "value") backpropagates like the autograd-built score."""
    cov = random_spd((), D)
    m = matrix_for(parametrization, cov).requires_grad_()
    loc = torch.randn(D, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, D, dtype=torch.float64, requires_grad=True)
    loss = JacobianMVN(loc, **{parametrization: m}).jacobian(x, "value").pow(2).sum()
    ours = torch.autograd.grad(loss, (loc, m))

    def score(x):
        lp = MultivariateNormal(loc, **{parametrization: m}).log_prob(x).sum()
        return torch.autograd.grad(lp, x, create_graph=True)[0]

    expected = torch.autograd.grad(score(x).pow(2).sum(), (loc, m))
    for a, b in zip(ours, expected):
        assert_close(a, b)


def test_float32_jacobians_match_float64_reference():
    cov = random_spd((2,), D)
    loc = torch.randn(2, D, dtype=torch.float64)
    x = torch.randn(9, 2, D, dtype=torch.float64)
    d64 = JacobianMVN(loc, covariance_matrix=cov)
    d32 = JacobianMVN(loc.float(), covariance_matrix=cov.float())
    for wrt in WRT:
        torch.testing.assert_close(d32.jacobian(x.float(), wrt), d64.jacobian(x, wrt).float(), rtol=1e-4, atol=1e-5)


# Per-sample matrix Jacobians of parameters that require grad (an nn.Parameter in a training loop), and under vmap.


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("wrt", PARAMETRIZATIONS)
@pytest.mark.parametrize("layout", ["full", "vech"])
def test_matrix_jacobian_of_parameters_that_require_grad(parametrization, wrt, layout, assert_close):
    """The result equals the one without grad and is differentiable: the gradient of a function of it w.r.t. ``loc``
    and the matrix equals autograd's through per-sample ``torch.func`` Jacobians of torch's MVN."""
    loc = torch.randn(D, dtype=torch.float64, requires_grad=True)
    m = matrix_for(parametrization, random_spd((), D)).requires_grad_()
    x = torch.randn(5, D, dtype=torch.float64)
    ours = JacobianMVN(loc, **{parametrization: m}).jacobian(x, wrt, layout=layout)
    with torch.no_grad():
        plain = JacobianMVN(loc, **{parametrization: m}).jacobian(x, wrt, layout=layout)
    assert_close(ours, plain)

    def reference(loc, m):  # d log p / d wrt per sample, through torch's MVN parametrized by wrt, full layout
        return DENSE[parametrization].per_sample_grad(x, {"loc": loc, parametrization: m}, wrt)

    full = ours if layout == "full" else None
    if full is not None:
        assert_close(full, reference(loc, m).detach())
    weights = torch.randn(ours.shape, dtype=torch.float64)
    grads = torch.autograd.grad((ours * weights).sum(), (loc, m))
    if layout == "full":
        expected = torch.autograd.grad((reference(loc, m) * weights).sum(), (loc, m))
        assert_close(grads[0], expected[0])
        # Gradients w.r.t. the matrix agree on the perturbations it admits: symmetric ones (the two routes split an
        # off-diagonal pair between (i, j) and (j, i) differently) or, for scale_tril, lower-triangular ones.
        if parametrization == "scale_tril":
            assert_close(grads[1].tril(), expected[1].tril())
        else:
            assert_close(grads[1] + grads[1].mT, expected[1] + expected[1].mT)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("wrt", PARAMETRIZATIONS)
@pytest.mark.parametrize("layout", ["full", "vech"])
def test_matrix_jacobian_under_vmap(parametrization, wrt, layout, assert_close):
    m = matrix_for(parametrization, random_spd((), D))
    dist_ = JacobianMVN(torch.randn(D, dtype=torch.float64), **{parametrization: m})
    x = torch.randn(6, D, dtype=torch.float64)
    batched = torch.func.vmap(lambda xi: dist_.jacobian(xi, wrt, layout=layout))(x)
    assert_close(batched, dist_.jacobian(x, wrt, layout=layout))
