"""Forward-mode derivatives (``torch.func.jvp``, ``jacfwd``, ``hessian``) of every method with a closed form, against
reverse mode (``jacrev``, ``vjp``) and against torch's ``MultivariateNormal``, at sizes that take every route.

The routes: ``d`` below 32, in ``[32, 128)`` with fewer and with more points than ``d`` (where the covariance
parametrization forms ``alpha`` with :math:`\\Sigma^{-1}`), and from 128 on; :math:`\\Sigma^{-1}` from
``cholesky_inverse`` or from a triangular inverse; float32 solves from the left or the right. Large sizes are checked
through the adjoint identity :math:`\\langle J t, w\\rangle = \\langle t, J^\\top w\\rangle` (one ``jvp`` and one
``vjp``), small ones through whole Jacobians and Hessians.
"""

import pytest
import torch
from helpers import PARAMETRIZATIONS, WRT, matrix_for, random_spd
from torch.distributions import MultivariateNormal
from torch.func import hessian, jacfwd, jacrev, jvp, vjp

from torch_mvn_ext import JacobianMVN, _factor

# (d, points): every route of alpha and of the solves.
ROUTES = [(3, 5), (40, 20), (40, 50), (130, 140)]
ROUTE_IDS = [f"d{d}-n{n}" for d, n in ROUTES]


def _project(parametrization, m):
    """Tangents and points that the parametrization admits: symmetric matrices, or lower-triangular ones."""
    return m.tril() if parametrization == "scale_tril" else (m + m.mT) / 2


def _inputs(parametrization, d, n, seed=0):
    torch.manual_seed(seed)
    loc = torch.randn(d, dtype=torch.float64)
    m = matrix_for(parametrization, random_spd((), d, condition=5.0))
    x = torch.randn(n, d, dtype=torch.float64)
    return x, loc, m


def _functions(parametrization):
    """Each closed-form method as a function of ``(x, loc, m)``, returning one tensor."""

    def dist(loc, m, cls=JacobianMVN):
        return cls(loc, **{parametrization: _project(parametrization, m)}, validate_args=False)

    out = {
        "log_prob": lambda x, loc, m: dist(loc, m).log_prob(x),
        "log_prob_and_grads-sum": lambda x, loc, m: torch.cat(
            [g.reshape(-1) for g in dist(loc, m).log_prob_and_grads(x, WRT, reduction="sum")[1].values()]
        ),
        "entropy": lambda x, loc, m: dist(loc, m).entropy(),
    }
    for wrt in WRT:
        out[f"jacobian-{wrt}"] = lambda x, loc, m, wrt=wrt: dist(loc, m).jacobian(x, wrt)
    return out


FUNCTION_NAMES = list(_functions("covariance_matrix"))


def _tangents(parametrization, x, loc, m):
    return x.clone().normal_(), loc.clone().normal_(), _project(parametrization, torch.randn_like(m))


@pytest.fixture(params=["cholesky_inverse", "triangular_inverse"])
def sigma_inverse_route(request, monkeypatch):
    monkeypatch.setattr(_factor, "_CHOLESKY_INVERSE_ON_CPU", request.param == "cholesky_inverse")


@pytest.mark.usefixtures("sigma_inverse_route")
@pytest.mark.parametrize("d, n", ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("name", FUNCTION_NAMES)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_jvp_is_the_adjoint_of_vjp(parametrization, name, d, n):
    """Forward mode agrees with reverse mode: <J t, w> = <t, J^T w> for random t and w, on every route."""
    if d > 40 and name.startswith("jacobian-") and name.endswith(("_matrix", "scale_tril")):
        n = 8  # (n, d, d) outputs: the routes of alpha and the solves are the same at a few points
    f = _functions(parametrization)[name]
    x, loc, m = _inputs(parametrization, d, n)
    tangents = _tangents(parametrization, x, loc, m)
    value, forward = jvp(f, (x, loc, m), tangents)
    w = torch.randn_like(value)
    _, pullback = vjp(f, x, loc, m)
    reverse = sum((t * g).sum() for t, g in zip(tangents, pullback(w)))
    lhs = (forward * w).sum()
    scale = max(1.0, lhs.abs().item(), reverse.abs().item())
    assert abs(lhs.item() - reverse.item()) <= 1e-9 * scale, (lhs.item(), reverse.item())


@pytest.mark.usefixtures("sigma_inverse_route")
@pytest.mark.parametrize("d, n", [(3, 5), (40, 50)], ids=["d3-n5", "d40-n50"])
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_hessian_of_log_prob_matches_torch(parametrization, d, n, assert_close):
    """torch.func.hessian (forward over reverse) of the summed log_prob w.r.t. the matrix equals jacrev(jacrev) and
    torch's MVN's hessian: the case where a wrong forward-mode rule of cholesky_inverse showed (d = 40, n = 50)."""
    x, loc, m = _inputs(parametrization, d, n)

    def f(cls):
        return lambda a: cls(loc, **{parametrization: _project(parametrization, a)}).log_prob(x).sum()

    ours = hessian(f(JacobianMVN))(m)
    assert_close(ours, jacrev(jacrev(f(JacobianMVN)))(m), rtol=1e-8, atol=1e-8)
    assert_close(ours, hessian(f(MultivariateNormal))(m), rtol=1e-8, atol=1e-8)


@pytest.mark.usefixtures("sigma_inverse_route")
@pytest.mark.parametrize("name", FUNCTION_NAMES)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_jacfwd_equals_jacrev(parametrization, name, assert_close):
    """Whole forward-mode Jacobians of every closed form w.r.t. value, loc and matrix at d = 3."""
    f = _functions(parametrization)[name]
    x, loc, m = _inputs(parametrization, 3, 4)
    forward = jacfwd(f, argnums=(0, 1, 2))(x, loc, m)
    reverse = jacrev(f, argnums=(0, 1, 2))(x, loc, m)
    for a, b in zip(forward, reverse):
        assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("right_solve", [False, True], ids=["left-solve", "right-solve"])
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_float32_hessian_on_both_solve_routes(monkeypatch, parametrization, right_solve):
    """float32 takes the right-solve route on some CPUs: forward over reverse agrees with torch's MVN there too."""
    monkeypatch.setattr(_factor, "_RIGHT_SOLVE_IS_FASTER", right_solve)
    x, loc, m = (t.float() for t in _inputs(parametrization, 40, 50))

    def f(cls):
        return lambda a: cls(loc, **{parametrization: _project(parametrization, a)}).log_prob(x).sum()

    ours, theirs = hessian(f(JacobianMVN))(m), hessian(f(MultivariateNormal))(m)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-3


def test_forward_ad_dual_tensors_match_finite_differences():
    """torch.autograd.forward_ad (dual tensors, no torch.func) takes the same correct routes, in-place kernels
    included, and agrees with central differences."""
    import torch.autograd.forward_ad as fwad

    x, loc, m = _inputs("covariance_matrix", 40, 50)
    t = _project("covariance_matrix", torch.randn_like(m))

    def f(a):
        d = JacobianMVN(loc, a)
        return torch.cat([d.jacobian(x, "covariance_matrix").reshape(-1), d.precision_matrix.reshape(-1)])

    with fwad.dual_level():
        forward = fwad.unpack_dual(f(fwad.make_dual(m, t))).tangent
    h = 1e-5
    expected = (f(m + h * t) - f(m - h * t)) / (2 * h)
    torch.testing.assert_close(forward, expected, rtol=1e-6, atol=1e-6)
