"""Property-based invariants over random shapes, parametrizations and well-conditioned matrices (hypothesis)."""

import torch
from helpers import DENSE, PARAMETRIZATIONS, WRT, matrix_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributions import MultivariateNormal, kl_divergence

from torch_mvn_ext import JacobianMVN

SETTINGS = settings(
    max_examples=20,
    deadline=None,
    database=None,
    # The autouse seed fixture runs once per test, not per example; every example draws its own generator seed.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
TOL = dict(rtol=1e-8, atol=1e-8)


def random_spd(generator, batch_shape, d, condition):
    """SPD matrices with eigenvalues log-uniform in ``[1, condition]`` and random eigenvectors."""
    q, _ = torch.linalg.qr(torch.randn(*batch_shape, d, d, dtype=torch.float64, generator=generator))
    u = torch.rand(*batch_shape, d, dtype=torch.float64, generator=generator)
    m = (q * condition ** u.unsqueeze(-2)) @ q.mT
    return (m + m.mT) / 2


@st.composite
def problems(draw, d=None, full=None):
    r"""``(loc, cov, value, parametrization)`` with ``d`` in 1..4 and batch shapes of loc, matrix and value that
    broadcast to ``full`` (each of its dimensions kept or set to 1, leading ones possibly dropped; the value may
    have an extra leading sample dimension)."""
    if d is None:
        d = draw(st.integers(1, 4))
    if full is None:
        full = draw(st.lists(st.integers(1, 3), max_size=2))

    def part(drop=True):
        shape = [draw(st.sampled_from([n, 1])) for n in full]
        return tuple(shape[draw(st.integers(0, len(shape))) if drop else 0 :])

    loc_batch, matrix_batch = part(), part()
    extra = tuple(draw(st.lists(st.integers(1, 3), max_size=1)))
    value_batch = extra + part(drop=not extra)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    condition = draw(st.floats(1.0, 100.0))
    loc = torch.randn(*loc_batch, d, dtype=torch.float64, generator=g)
    cov = random_spd(g, matrix_batch, d, condition)
    value = loc + torch.randn(*value_batch, d, dtype=torch.float64, generator=g) * 2
    return loc, cov, value, draw(st.sampled_from(PARAMETRIZATIONS))


def build(parametrization, loc, cov):
    return JacobianMVN(loc, **{parametrization: matrix_for(parametrization, cov)})


@SETTINGS
@given(problems())
def test_log_prob_agrees_across_parametrizations_and_with_torch(problem):
    loc, cov, value, _ = problem
    expected = MultivariateNormal(loc, cov).log_prob(value)
    for parametrization in PARAMETRIZATIONS:
        d = build(parametrization, loc, cov)
        torch.testing.assert_close(d.log_prob(value), expected, **TOL)
        torch.testing.assert_close(d.entropy(), MultivariateNormal(loc, cov).entropy(), **TOL)


@SETTINGS
@given(problems(), st.sampled_from(WRT))
def test_jacobian_agrees_with_autograd(problem, wrt):
    """Element ``[s]`` of ``jacobian`` is the gradient of ``log_prob(value)[s]`` w.r.t. its own batch member's
    parameter: the per-sample ``vmap(grad)`` through torch's MVN parametrized by ``wrt``'s matrix."""
    loc, cov, value, parametrization = problem
    structure = DENSE[parametrization]
    params = {"loc": loc, parametrization: matrix_for(parametrization, cov)}
    d = structure.ours(**params)
    expected = structure.per_sample_grad(value, params, wrt)
    torch.testing.assert_close(d.jacobian(value, wrt), expected, **TOL)
    _, grads = d.log_prob_and_grads(value, (wrt,))
    torch.testing.assert_close(grads[wrt], expected, **TOL)


@SETTINGS
@given(problems(), st.sampled_from(PARAMETRIZATIONS))
def test_vech_and_full_round_trip(problem, wrt):
    loc, cov, value, parametrization = problem
    d = build(parametrization, loc, cov)
    full = d.jacobian(value, wrt)
    vech = d.jacobian(value, wrt, layout="vech")
    n = loc.shape[-1]
    rows, cols = torch.tril_indices(n, n)
    assert vech.shape == full.shape[:-2] + (n * (n + 1) // 2,)
    back = torch.zeros_like(full)
    if wrt == "scale_tril":
        back[..., rows, cols] = vech
    else:
        # Unique elements: off-diagonal entries of the vech form count both (i, j) and (j, i).
        half = torch.where(rows == cols, vech, vech / 2)
        back[..., rows, cols] = half
        back[..., cols, rows] = half
    torch.testing.assert_close(back, full, **TOL)


@SETTINGS
@given(st.integers(1, 4), st.lists(st.integers(1, 3), max_size=2), st.data())
def test_kl_is_nonnegative_and_zero_on_itself(d, full, data):
    """KL(p, p) = 0 whatever the two parametrizations; KL(p, q) >= 0 and equals torch's MVN-MVN KL."""
    loc, cov, _, parametrization = data.draw(problems(d, full))
    q_loc, q_cov, _, q_parametrization = data.draw(problems(d, full))
    p = build(parametrization, loc, cov)
    zero = kl_divergence(p, build(q_parametrization, loc, cov))
    torch.testing.assert_close(zero, torch.zeros_like(zero), rtol=0, atol=1e-9)
    kl = kl_divergence(p, build(q_parametrization, q_loc, q_cov))
    # KL >= 0 up to rounding: hypothesis may draw q equal to p, where the exact value is 0.
    assert bool((kl >= -1e-9).all())
    expected = kl_divergence(MultivariateNormal(loc, cov), MultivariateNormal(q_loc, q_cov))
    torch.testing.assert_close(kl, expected, **TOL)


@SETTINGS
@given(problems(), st.lists(st.integers(1, 3), max_size=2))
def test_expand_then_log_prob_equals_broadcasting(problem, extra):
    """``expand(extra + batch_shape)`` then ``log_prob``/``jacobian`` equals letting a value of that shape broadcast
    against the unexpanded distribution."""
    loc, cov, _, parametrization = problem
    d = build(parametrization, loc, cov)
    batch_shape = torch.Size(extra) + d.batch_shape
    expanded = d.expand(batch_shape)
    assert type(expanded) is JacobianMVN and expanded.parametrization == parametrization
    assert expanded.batch_shape == batch_shape
    for value in (d.sample(), d.sample(extra)):
        torch.testing.assert_close(expanded.log_prob(value), d.log_prob(value).expand(batch_shape), **TOL)
        jac = d.jacobian(value, ("loc", parametrization))
        for name, t in expanded.jacobian(value, ("loc", parametrization)).items():
            torch.testing.assert_close(t, jac[name].expand(t.shape), **TOL)


def test_problem_strategy_reaches_broadcasting():
    """The strategy is not vacuous: it produces batch shapes that only broadcast."""
    seen = []

    @settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(problems())
    def collect(problem):
        loc, cov, value, _ = problem
        seen.append((loc.shape[:-1], cov.shape[:-2], value.shape[:-1]))

    collect()
    assert any(a != b for a, b, _ in seen) and any(len(c) > len(a) for a, _, c in seen)
