"""hessian(), fisher_information() and natural_gradient() against torch.func, Monte Carlo and dense solves."""

import math

import pytest
import torch
from helpers import DENSE, PARAMETRIZATIONS, SHAPE_GRID, SHAPE_IDS, grid_case, matrix_for, random_spd, vech_of_full
from torch.distributions import MultivariateNormal
from torch.func import hessian, vmap

from torch_mvn_ext import JacobianMVN

D = 3
K = D * (D + 1) // 2
ROWS, COLS = torch.tril_indices(D, D)
COORDINATES = ("loc",) + PARAMETRIZATIONS


def from_vech(theta, name):
    """The matrix whose vech coordinates (``torch.tril_indices`` order) are ``theta``."""
    m = torch.zeros(D, D, dtype=theta.dtype).index_put((ROWS, COLS), theta)
    if name == "scale_tril":
        return m
    return m + m.tril(-1).mT


def duplication_matrix(d, dtype):
    """The d^2 x k matrix D with vec(M) = D vech(M) for symmetric M (row-major vec)."""
    rows, cols = torch.tril_indices(d, d)
    dup = torch.zeros(d * d, len(rows), dtype=dtype)
    for n, (i, j) in enumerate(zip(rows.tolist(), cols.tolist())):
        dup[i * d + j, n] = 1.0
        dup[j * d + i, n] = 1.0
    return dup


def expected_hessian(loc, cov, name):
    """Minus the exact expected Hessian of torch's MVN log-density in ``name``'s coordinates.

    The Hessian w.r.t. any of the coordinates is affine in ``r r^T``, so its mean over the 2d sigma points
    ``loc ± sqrt(d) L e_i`` (whose second moment is exactly Sigma) is its expectation under the distribution.
    """
    scale_tril = torch.linalg.cholesky(cov)
    points = torch.cat([loc + math.sqrt(D) * scale_tril.mT, loc - math.sqrt(D) * scale_tril.mT])
    if name == "loc":
        theta = loc

        def log_prob(theta, x):
            return MultivariateNormal(theta, covariance_matrix=cov, validate_args=False).log_prob(x)

    else:
        theta = matrix_for(name, cov)[ROWS, COLS]

        def log_prob(theta, x):
            return MultivariateNormal(loc, **{name: from_vech(theta, name)}, validate_args=False).log_prob(x)

    return -vmap(hessian(log_prob), in_dims=(None, 0))(theta, points).mean(0)


@pytest.mark.parametrize("shapes", SHAPE_GRID[:6], ids=SHAPE_IDS[:6])
@pytest.mark.parametrize("wrt", ("value", "loc"))
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_hessian_matches_torch_func(parametrization, wrt, shapes, assert_close):
    params, x = grid_case(DENSE[parametrization], shapes, D)
    d = JacobianMVN(**params)
    S = torch.broadcast_shapes(x.shape[:-1], d.batch_shape)
    xs, locs = x.expand(S + (D,)).reshape(-1, D), params["loc"].expand(S + (D,)).reshape(-1, D)
    mats = params[parametrization].expand(S + (D, D)).reshape(-1, D, D)

    def log_prob(x, loc, m):
        return MultivariateNormal(loc, **{parametrization: m}, validate_args=False).log_prob(x)

    expected = vmap(hessian(log_prob, argnums=0 if wrt == "value" else 1))(xs, locs, mats).reshape(S + (D, D))
    h = d.hessian(x, wrt)
    assert h.shape == S + (D, D)
    assert_close(h, expected)


@pytest.mark.parametrize("wrt", COORDINATES)
def test_fisher_information_is_minus_the_expected_hessian(wrt, assert_close):
    loc = torch.randn(2, 1, D, dtype=torch.float64)
    cov = random_spd((3,), D)
    members = torch.broadcast_shapes(loc.shape[:-1], cov.shape[:-2])
    flat_loc, flat_cov = loc.expand(members + (D,)).reshape(-1, D), cov.expand(members + (D, D)).reshape(-1, D, D)
    expected = vmap(expected_hessian, in_dims=(0, 0, None))(flat_loc, flat_cov, wrt)
    expected = expected.reshape(members + expected.shape[-2:])
    for parametrization in PARAMETRIZATIONS:
        d = JacobianMVN(loc, **{parametrization: matrix_for(parametrization, cov)})
        info = d.fisher_information(wrt)
        assert info.shape == (2, 3) + ((D, D) if wrt == "loc" else (K, K))
        assert_close(info, expected)


def _fisher_reference(wrt, cov):
    r"""Dense float64 Fisher information in vech coordinates: :math:`\frac12 D^\top (M \otimes M) D` for the
    symmetric matrices (:math:`M = P` for the covariance, :math:`\Sigma` for the precision), and for the scale_tril
    the covariance's pulled back through the Jacobian of :math:`\mathrm{vech}(L) \mapsto \mathrm{vech}(L L^\top)`."""
    d = cov.shape[-1]
    prec = torch.linalg.inv(cov)
    dup = duplication_matrix(d, torch.float64)

    def sym(m):
        return 0.5 * dup.mT @ torch.kron(m, m) @ dup

    if wrt == "covariance_matrix":
        return sym(prec)
    if wrt == "precision_matrix":
        return sym(cov)
    rows, cols = torch.tril_indices(d, d)
    L = torch.linalg.cholesky(cov)

    def vech_sigma(v):
        tril = torch.zeros(d, d, dtype=v.dtype).index_put((rows, cols), v)
        s = tril @ tril.mT
        return s[rows, cols]

    jac = torch.func.jacrev(vech_sigma)(L[rows, cols])
    return jac.mT @ sym(prec) @ jac


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("wrt", PARAMETRIZATIONS)
def test_fisher_information_matches_dense_reference(wrt, parametrization, assert_close):
    cov = random_spd((2,), 4)
    d = JacobianMVN(torch.zeros(2, 4, dtype=torch.float64), **{parametrization: matrix_for(parametrization, cov)})
    f = d.fisher_information(wrt)
    assert f.shape == (2, 10, 10)
    for i in range(2):
        assert_close(f[i], _fisher_reference(wrt, cov[i]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("wrt", PARAMETRIZATIONS)
def test_fisher_information_is_the_score_covariance(wrt):
    """Seeded Monte Carlo: E[g g^T] of the per-sample vech scores, within 5 standard errors of each entry."""
    loc = torch.randn(D, dtype=torch.float64)
    d = JacobianMVN(loc, scale_tril=torch.linalg.cholesky(random_spd((), D)))
    n = 40_000
    scores = d.jacobian(d.sample((n,)), wrt, layout="vech")
    products = scores.unsqueeze(-1) * scores.unsqueeze(-2)
    err = (products.mean(0) - d.fisher_information(wrt)) / (products.std(0) / math.sqrt(n))
    assert err.abs().max() < 5
    assert (scores.mean(0) / (scores.std(0) / math.sqrt(n))).abs().max() < 5  # scores have mean zero


@pytest.mark.parametrize("wrt", ("covariance_matrix", "precision_matrix"))
def test_symmetric_fisher_is_the_duplication_kronecker_form(wrt, assert_close):
    cov = random_spd((), D)
    m = torch.cholesky_inverse(torch.linalg.cholesky(cov)) if wrt == "covariance_matrix" else cov
    dup = duplication_matrix(D, torch.float64)
    expected = 0.5 * dup.T @ torch.kron(m, m) @ dup
    d = JacobianMVN(torch.zeros(D, dtype=torch.float64), covariance_matrix=cov)
    assert_close(d.fisher_information(wrt), expected)


def test_fisher_information_layout_and_wrt_errors():
    d = JacobianMVN(torch.zeros(D, dtype=torch.float64), covariance_matrix=random_spd((), D))
    assert d.fisher_information("loc", layout="full").shape == (D, D)
    for name in PARAMETRIZATIONS:
        with pytest.raises(ValueError, match="singular"):
            d.fisher_information(name, layout="full")
    with pytest.raises(ValueError, match="wrt must be one of 'loc'"):
        d.fisher_information("value")
    with pytest.raises(ValueError, match="layout must be one of"):
        d.fisher_information("loc", layout="dense")
    with pytest.raises(ValueError, match="wrt must be one of 'value', 'loc'"):
        d.hessian(torch.zeros(D), "covariance_matrix")
    with pytest.raises(ValueError, match="value has shape"):
        d.hessian(torch.zeros(D + 1))


@pytest.mark.parametrize("name", COORDINATES)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_natural_gradient_solves_the_fisher_system(parametrization, name, assert_close):
    """F^{-1} g by a dense solve, with F the Kronecker form for the symmetric matrices (independent of the
    closed form) and fisher_information (checked above against autograd) for loc and scale_tril."""
    cov = random_spd((3,), D)
    d = JacobianMVN(torch.randn(D, dtype=torch.float64), **{parametrization: matrix_for(parametrization, cov)})
    if name == "loc":
        g = torch.randn(2, 1, D, dtype=torch.float64)
    else:
        g = torch.randn(2, 1, D, D, dtype=torch.float64)
        g = g.tril() if name == "scale_tril" else g + g.mT
    nat = d.natural_gradient({name: g})[name]
    assert nat.shape == (2, 3) + g.shape[-2 if name != "loc" else -1 :]
    dup = duplication_matrix(D, torch.float64)
    for i in range(2):
        for j in range(3):
            if name == "loc":
                assert_close(nat[i, j], torch.linalg.solve(d.fisher_information("loc")[j], g[i, 0]))
                continue
            if name == "scale_tril":
                info = d.fisher_information(name)[j]
            else:
                m = cov[j] if name == "precision_matrix" else torch.linalg.inv(cov[j])
                info = 0.5 * dup.T @ torch.kron(m, m) @ dup
            expected = torch.linalg.solve(info, vech_of_full(g[i, 0], name))
            assert_close(nat[i, j][ROWS, COLS], expected)
            if name == "scale_tril":
                assert (nat[i, j].triu(1) == 0).all()
            else:
                assert_close(nat[i, j], nat[i, j].mT)


def test_natural_gradient_of_a_log_likelihood(assert_close):
    """Gradients from jacobian(reduction='sum') in, the textbook forms out; non-symmetric gradients are
    treated through their symmetric part, and loc and the matrix go through together."""
    cov = random_spd((), D)
    prec = torch.cholesky_inverse(torch.linalg.cholesky(cov))
    d = JacobianMVN(torch.randn(D, dtype=torch.float64), precision_matrix=prec)
    x = torch.randn(20, D, dtype=torch.float64)
    for name, m in (("covariance_matrix", cov), ("precision_matrix", prec)):
        _, grads = d.log_prob_and_grads(x, ("loc", name), reduction="sum")
        nat = d.natural_gradient(grads)
        assert_close(nat["loc"], cov @ grads["loc"])
        assert_close(nat[name], 2 * m @ grads[name] @ m)
        a = torch.randn(D, D, dtype=torch.float64)
        skewed = grads[name] + a - a.mT  # same symmetric part, the same gradient in vech coordinates
        assert_close(d.natural_gradient({name: skewed})[name], nat[name])


def test_natural_gradient_float32_follows_inputs():
    d = JacobianMVN(torch.zeros(D), scale_tril=torch.eye(D) * 2)
    nat = d.natural_gradient({"loc": torch.ones(D), "scale_tril": torch.eye(D)})
    assert nat["loc"].dtype == nat["scale_tril"].dtype == torch.float32
    torch.testing.assert_close(nat["loc"], torch.full((D,), 4.0))
    torch.testing.assert_close(nat["scale_tril"], torch.eye(D) * 2)  # L (diag(L^T I) / 2) = L L / 2 = L


def test_natural_gradient_errors():
    d = JacobianMVN(torch.zeros(4, D, dtype=torch.float64), covariance_matrix=random_spd((4,), D))
    eye = torch.eye(D, dtype=torch.float64)
    with pytest.raises(ValueError, match="non-empty dict"):
        d.natural_gradient({})
    with pytest.raises(ValueError, match="non-empty dict"):
        d.natural_gradient([eye])
    with pytest.raises(ValueError, match="each key of grads must be one of"):
        d.natural_gradient({"value": torch.zeros(D, dtype=torch.float64)})
    with pytest.raises(ValueError, match="covariance_matrix and precision_matrix"):
        d.natural_gradient({"covariance_matrix": eye, "precision_matrix": eye})
    with pytest.raises(ValueError, match=r"grads\['loc'\] has shape \(4, 2\) but must end in \(3,\)"):
        d.natural_gradient({"loc": torch.zeros(4, 2, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"does not broadcast with the distribution's batch_shape \(4,\)"):
        d.natural_gradient({"covariance_matrix": eye.expand(5, D, D)})


def test_expanded_distribution_keeps_its_batch_shape(assert_close):
    cov = random_spd((), D)
    d = JacobianMVN(torch.randn(D, dtype=torch.float64), precision_matrix=matrix_for("precision_matrix", cov))
    big = d.expand((4, 2))
    assert big.hessian(torch.zeros(3, 1, 1, D, dtype=torch.float64)).shape == (3, 4, 2, D, D)
    for wrt in COORDINATES:
        info = d.fisher_information(wrt)
        assert_close(big.fisher_information(wrt), info.expand((4, 2) + info.shape))
    ones, eye = torch.ones(D, dtype=torch.float64), torch.eye(D, dtype=torch.float64)
    nat = big.natural_gradient({"loc": ones, "covariance_matrix": eye})
    assert_close(nat["loc"], (cov @ ones).expand(4, 2, D))
    assert_close(nat["covariance_matrix"], (2 * cov @ cov).expand(4, 2, D, D))
