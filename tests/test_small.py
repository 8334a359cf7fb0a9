"""Many small Gaussians: a batch of members with their own small matrices takes the elementwise factors
(``torch_mvn_ext._small``), which must give torch's numbers, errors and gradients for every method."""

import pytest
import torch
from helpers import PARAMETRIZATIONS, WRT, matrix_for, random_spd
from torch.distributions import MultivariateNormal
from torch.func import grad, vmap

from torch_mvn_ext import JacobianMVN, _small
from torch_mvn_ext._factor import NotPositiveDefiniteError

B = 40  # members: above MIN_MEMBERS_PER_D * d as the tests set it
SIZES = [1, 2, 3, 5, _small.MAX_D]
# (loc batch, matrix batch, value batch): one value per member, sample dimensions, a broadcast loc, two batch dims.
SHAPES = [((B,), (B,), (B,)), ((B,), (B,), (3, B)), ((), (B,), (2, B)), ((2, 1), (2, B // 2), (2, B // 2))]
SHAPE_IDS = ["one-each", "samples", "shared-loc", "two-dims"]


@pytest.fixture(autouse=True)
def few_members(monkeypatch):
    """The elementwise factors from 2 d members on, so that small batches (fast references) take them: the threshold
    is a matter of speed, not of the numbers."""
    monkeypatch.setattr(_small, "MIN_MEMBERS_PER_D", 2)


@pytest.fixture
def general(monkeypatch):
    """Switches the elementwise factors off (for the general path's own numbers and errors)."""
    monkeypatch.setattr(_small, "MAX_D", 0)


def _case(parametrization, d, shapes, dtype=torch.float64):
    loc_batch, mat_batch, x_batch = shapes
    loc = torch.randn(*loc_batch, d, dtype=dtype)
    m = matrix_for(parametrization, random_spd(mat_batch, d)).to(dtype)
    x = torch.randn(*x_batch, d, dtype=dtype)
    return loc, m, x


def test_the_elementwise_factors_are_chosen_by_size():
    cov = random_spd((B,), 3)
    assert JacobianMVN(torch.zeros(3, dtype=torch.float64), cov)._state.factor.kind == "elementwise_cholesky"
    assert JacobianMVN(torch.zeros(3, dtype=torch.float64), cov[0])._state.factor.kind == "cholesky"  # one matrix
    few = random_spd((_small.MIN_MEMBERS_PER_D * 3 - 1,), 3)
    assert JacobianMVN(torch.zeros(3, dtype=torch.float64), few)._state.factor.kind == "cholesky"
    big = random_spd((B,), _small.MAX_D + 1)
    assert JacobianMVN(torch.zeros(_small.MAX_D + 1, dtype=torch.float64), big)._state.factor.kind == "cholesky"
    for name, kind in [("precision_matrix", "elementwise_precision"), ("scale_tril", "elementwise_scale_tril")]:
        d = JacobianMVN(torch.zeros(3, dtype=torch.float64), **{name: matrix_for(name, cov)})
        assert d._state.factor.kind == kind


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shapes", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_every_method_matches_torch(parametrization, d, shapes, dtype, assert_close):
    loc, m, x = _case(parametrization, d, shapes, dtype)
    ours = JacobianMVN(loc, **{parametrization: m})
    theirs = MultivariateNormal(loc, **{parametrization: m})
    assert ours._state.factor.kind.startswith("elementwise")
    tol = {} if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    for name in ("scale_tril", "covariance_matrix", "precision_matrix", "variance", "stddev"):
        assert_close(getattr(ours, name), getattr(theirs, name), **tol)
    assert_close(ours.log_prob(x), theirs.log_prob(x), **tol)
    assert_close(ours.entropy(), theirs.entropy(), **tol)
    for method in ("rsample", "sample"):
        torch.manual_seed(1)
        expected = getattr(theirs, method)((2,))
        torch.manual_seed(1)
        assert_close(getattr(ours, method)((2,)), expected, **tol)


@pytest.mark.parametrize("shapes", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_derivatives_match_autograd_through_torch(parametrization, d, shapes, assert_close):
    """jacobian (every wrt, both layouts), log_prob_and_grads (both reductions) and autograd through log_prob,
    against vmap(grad) and autograd through torch's MVN."""
    loc, m, x = _case(parametrization, d, shapes)
    ours = JacobianMVN(loc, **{parametrization: m})
    S = torch.broadcast_shapes(x.shape[:-1], ours.batch_shape)
    xs, locs = x.expand(S + (d,)).reshape(-1, d), loc.expand(S + (d,)).reshape(-1, d)
    for wrt in WRT:
        name = wrt if wrt not in ("value", "loc") else parametrization
        mat = getattr(ours, name).detach().expand(S + (d, d)).reshape(-1, d, d).clone()

        def lp(xi, li, mi, name=name):
            return MultivariateNormal(li, **{name: mi}, validate_args=False).log_prob(xi)

        argnum = {"value": 0, "loc": 1}.get(wrt, 2)
        expected = vmap(grad(lp, argnums=argnum))(xs, locs, mat)
        got = ours.jacobian(x, wrt)
        assert_close(got.reshape(expected.shape), expected)
        assert got.is_contiguous()
        if wrt not in ("value", "loc"):
            rows, cols = torch.tril_indices(d, d)
            vech = ours.jacobian(x, wrt, layout="vech")
            weight = 1.0 if wrt == "scale_tril" else torch.where(rows == cols, 1.0, 2.0).double()
            assert_close(vech, got[..., rows, cols] * weight)
    _, none = ours.log_prob_and_grads(x, WRT, reduction="none")
    for wrt in WRT:
        assert_close(none[wrt], ours.jacobian(x, wrt))
    xl, ll, ml = (t.clone().requires_grad_() for t in (x, loc, m))
    expected_sum = torch.autograd.grad(MultivariateNormal(ll, **{parametrization: ml}).log_prob(xl).sum(), (xl, ll, ml))
    _, grads = ours.log_prob_and_grads(x, reduction="sum")
    actual_autograd = torch.autograd.grad(JacobianMVN(ll, **{parametrization: ml}).log_prob(xl).sum(), (xl, ll, ml))
    for name, a, b in zip(("value", "loc", parametrization), actual_autograd, expected_sum):
        assert_close(grads[name], b)
        assert_close(a, b)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_second_order_and_torch_func(parametrization):
    """gradcheck and gradgradcheck through log_prob built on the elementwise factors (float64)."""
    loc, m, x = _case(parametrization, 3, ((B,), (B,), (B,)))
    m = m[: _small.MIN_MEMBERS_PER_D * 3].clone()
    loc, x = loc[: m.shape[0]].clone(), x[: m.shape[0]].clone()

    def f(x, loc, m):
        sym = m.tril() if parametrization == "scale_tril" else (m + m.mT) / 2
        d = JacobianMVN(loc, **{parametrization: sym})
        assert d._state.factor.kind.startswith("elementwise")
        return d.log_prob(x)

    inputs = tuple(t.clone().requires_grad_() for t in (x, loc, m))
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("validate_args", [True, False])
@pytest.mark.parametrize("parametrization", ["covariance_matrix", "precision_matrix"])
def test_one_member_not_positive_definite_raises_the_same_error(parametrization, validate_args, monkeypatch):
    m = matrix_for(parametrization, random_spd((B,), 3))
    m[7] = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    loc = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(NotPositiveDefiniteError) as elementwise:
        JacobianMVN(loc, **{parametrization: m}, validate_args=validate_args)
    monkeypatch.setattr(_small, "MAX_D", 0)
    with pytest.raises(NotPositiveDefiniteError) as general:
        JacobianMVN(loc, **{parametrization: m}, validate_args=validate_args)
    assert str(elementwise.value) == str(general.value)
    assert "Batch element 7" in str(elementwise.value) or "7" in str(elementwise.value)


def test_from_distribution_takes_the_elementwise_factors(assert_close):
    cov = random_spd((B,), 2)
    mvn = MultivariateNormal(torch.zeros(B, 2, dtype=torch.float64), cov)
    ours = JacobianMVN.from_distribution(mvn)
    assert ours._state.factor.kind == "elementwise_cholesky"
    x = torch.randn(B, 2, dtype=torch.float64)
    assert_close(ours.log_prob(x), mvn.log_prob(x))
    zero = torch.zeros(2, dtype=torch.float64)
    expected = vmap(grad(lambda xi, ci: MultivariateNormal(zero, ci, validate_args=False).log_prob(xi)))
    assert_close(ours.jacobian(x, "value"), expected(x, cov))


def test_matches_the_general_path(monkeypatch, assert_close):
    """With the elementwise factors switched off, the same numbers: the two routes agree."""
    loc, m, x = _case("covariance_matrix", 3, SHAPES[1])
    e = JacobianMVN(loc, m)
    monkeypatch.setattr(_small, "MAX_D", 0)
    d = JacobianMVN(loc, m)
    assert d._state.factor.kind == "cholesky"
    general_out = d.log_prob_and_grads(x, WRT, reduction="sum")
    assert e._state.factor.kind == "elementwise_cholesky"
    elementwise_out = e.log_prob_and_grads(x, WRT, reduction="sum")
    assert_close(elementwise_out[0], general_out[0])
    for k in WRT:
        assert_close(elementwise_out[1][k], general_out[1][k])


@pytest.mark.parametrize("under_no_grad", ["marginal", "kl"])
def test_a_no_grad_call_first_keeps_the_gradient(under_no_grad, assert_close):
    """The factor's matrix is assembled on demand: asked for first under torch.no_grad() (a marginal, a KL), it must
    not cut the later gradients of log_prob off from the covariance."""
    loc, cov, x = _case("covariance_matrix", 2, SHAPES[0])
    grads = []
    for cls in (JacobianMVN, MultivariateNormal):
        c = cov.clone().requires_grad_()
        d = cls(loc, c)
        with torch.no_grad():
            if under_no_grad == "marginal" and cls is JacobianMVN:
                d.marginal([0])
            elif under_no_grad == "kl":
                torch.distributions.kl_divergence(d, MultivariateNormal(loc, cov))
        (grad_c,) = torch.autograd.grad(d.log_prob(x.clone().requires_grad_()).sum(), c)
        grads.append(grad_c)
    assert_close(*grads)
