"""kl_divergence for every pair with a JacobianMVN or JacobianLowRankMVN side: values, dispatch, broadcasting, Monte
Carlo, memory and errors."""

import itertools

import pyro
import pyro.distributions as pyro_dist
import pytest
import torch
from helpers import random_spd
from kl_cases import (
    JACOBIAN_KINDS,
    KINDS,
    LOWRANK_KIND,
    OTHER_KINDS,
    PAIR_IDS,
    PAIRS,
    build,
    dense,
    dense_kl,
    index_params,
    params_from_dense,
    random_params,
    reference_kl,
    torch_equivalent,
)
from timing import peak_bytes  # benchmarks/timing.py: peak memory as the benchmark measures it
from torch.distributions import (
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    kl_divergence,
)
from torch.distributions.kl import _dispatch_kl

import torch_mvn_ext.kl
from torch_mvn_ext import JacobianLowRankMVN, JacobianMVN

D = 3
# (p batch, q batch): unbatched, either side with fewer batch dimensions, and a pair that only broadcasts.
KL_SHAPES = [((), ()), ((2, 3), (3,)), ((3,), (2, 3)), ((8, 1), (6,))]
KL_SHAPE_IDS = [f"p{p}-q{q}" for p, q in KL_SHAPES]
# Pairs that torch or Pyro already cover once the JacobianMVN is replaced by torch's MultivariateNormal and the
# JacobianLowRankMVN by torch's LowRankMultivariateNormal (Pyro's Independent rule takes a MultivariateNormal q only).
TORCH_PAIRS = [(p, q) for p, q in PAIRS if "Independent" not in q and not ("Independent" in p and "LowRank" in q)]
# One pair per branch of the formula: q whitens with L, with T, through Woodbury or by its scales; p brings L,
# T = L^{-1}, a low-rank factor with a diagonal, or only a diagonal.
FORMULA_PAIRS = [
    ("JacobianMVN-covariance_matrix", "JacobianMVN-precision_matrix"),
    ("JacobianMVN-precision_matrix", "JacobianMVN-scale_tril"),
    ("MultivariateNormal", "JacobianMVN-precision_matrix"),
    ("JacobianMVN-precision_matrix", "LowRankMultivariateNormal"),
    ("LowRankMultivariateNormal", "JacobianMVN-covariance_matrix"),
    ("pyro.LowRankMultivariateNormal", "JacobianMVN-precision_matrix"),
    ("JacobianMVN-precision_matrix", "Independent(Normal)"),
    ("Independent(Normal)", "JacobianMVN-scale_tril"),
    ("pyro.Independent(pyro.Normal)", "JacobianMVN-precision_matrix"),
]
# One pair per partner of a JacobianLowRankMVN, each way: itself, each parametrization of JacobianMVN, torch's and
# Pyro's full-rank and low-rank classes, and the diagonal ones.
LOWRANK_PAIRS = [
    (LOWRANK_KIND, LOWRANK_KIND),
    (LOWRANK_KIND, "JacobianMVN-covariance_matrix"),
    ("JacobianMVN-precision_matrix", LOWRANK_KIND),
    (LOWRANK_KIND, "JacobianMVN-scale_tril"),
    ("MultivariateNormal", LOWRANK_KIND),
    (LOWRANK_KIND, "pyro.MultivariateNormal"),
    (LOWRANK_KIND, "LowRankMultivariateNormal"),
    ("pyro.LowRankMultivariateNormal", LOWRANK_KIND),
    (LOWRANK_KIND, "Independent(Normal)"),
    ("pyro.Independent(pyro.Normal)", LOWRANK_KIND),
]
LOWRANK_PAIR_IDS = [f"{p}||{q}" for p, q in LOWRANK_PAIRS]
OTHER_TYPES = (
    MultivariateNormal,
    pyro_dist.MultivariateNormal,
    LowRankMultivariateNormal,
    pyro_dist.LowRankMultivariateNormal,
    Independent,
    pyro_dist.Independent,
)


@pytest.mark.parametrize("shapes", KL_SHAPES, ids=KL_SHAPE_IDS)
@pytest.mark.parametrize("p_kind, q_kind", PAIRS, ids=PAIR_IDS)
def test_matches_dense_reference(p_kind, q_kind, shapes, assert_close):
    p_batch, q_batch = shapes
    p_params, q_params = random_params(p_kind, p_batch, D), random_params(q_kind, q_batch, D)
    kl = kl_divergence(build(p_kind, p_params), build(q_kind, q_params))
    assert kl.shape == torch.broadcast_shapes(p_batch, q_batch)
    assert_close(kl, reference_kl(p_kind, p_params, q_kind, q_params))


@pytest.mark.parametrize("p_kind, q_kind", TORCH_PAIRS, ids=[f"{p}||{q}" for p, q in TORCH_PAIRS])
def test_matches_torch_kl(p_kind, q_kind, assert_close):
    p_params, q_params = random_params(p_kind, (2, 1), D), random_params(q_kind, (3,), D)
    ours = kl_divergence(build(p_kind, p_params), build(q_kind, q_params))
    theirs = kl_divergence(torch_equivalent(p_kind, p_params), torch_equivalent(q_kind, q_params))
    assert_close(ours, theirs)


@pytest.mark.parametrize(
    "p_type, q_type",
    [
        *itertools.product((JacobianMVN,), (JacobianMVN,) + OTHER_TYPES),
        *itertools.product(OTHER_TYPES, (JacobianMVN,)),
    ],
    ids=lambda t: f"{t.__module__.split('.')[0]}.{t.__name__}",
)
def test_dispatch_is_unambiguous_and_ours(p_type, q_type):
    """torch's dispatcher picks one of our rules for every type pair, Pyro's subclasses included, without its
    "Ambiguous kl_divergence" RuntimeWarning (an error here, as every warning is)."""
    fun = _dispatch_kl(p_type, q_type)
    assert fun.__module__ == torch_mvn_ext.kl.__name__


@pytest.mark.parametrize("p_type, q_type", [
    *itertools.product((JacobianLowRankMVN,), (JacobianLowRankMVN, JacobianMVN) + OTHER_TYPES),
    *itertools.product((JacobianMVN,) + OTHER_TYPES, (JacobianLowRankMVN,)),
], ids=lambda t: f"{t.__module__.split('.')[0]}.{t.__name__}")
def test_lowrank_dispatch_is_unambiguous(p_type, q_type):
    """torch's dispatcher finds a rule for every type pair with a JacobianLowRankMVN side, without its "Ambiguous
    kl_divergence" RuntimeWarning (an error here). Where torch has a rule of its own for the base classes (low-rank
    or full-rank against low-rank) it may be the one found; every other pair can only be this package's."""
    fun = _dispatch_kl(p_type, q_type)
    assert fun is not NotImplemented
    if not all(issubclass(t, (LowRankMultivariateNormal, MultivariateNormal)) for t in (p_type, q_type)):
        assert fun.__module__.split(".")[0] == "torch_mvn_ext", fun.__module__


@pytest.mark.parametrize("p_kind, q_kind", FORMULA_PAIRS + LOWRANK_PAIRS, ids=[
    f"{p}||{q}" for p, q in FORMULA_PAIRS + LOWRANK_PAIRS])
def test_batched_equals_looped(p_kind, q_kind, assert_close):
    p_batch, q_batch = (4, 1), (3,)
    batch_shape = torch.broadcast_shapes(p_batch, q_batch)
    p_params, q_params = random_params(p_kind, p_batch, D), random_params(q_kind, q_batch, D)
    batched = kl_divergence(build(p_kind, p_params), build(q_kind, q_params))
    assert batched.shape == batch_shape
    looped = torch.stack(
        [
            kl_divergence(
                build(p_kind, index_params(p_params, batch_shape, i), validate_args=False),
                build(q_kind, index_params(q_params, batch_shape, i), validate_args=False),
            )
            for i in itertools.product(*map(range, batch_shape))
        ]
    ).reshape(batch_shape)
    assert_close(batched, looped)


def test_factor_shared_across_the_batch(assert_close):
    """A matrix with a smaller batch than its loc is factorized once and meets every loc and partner."""
    p_cov, q_cov = random_spd((), D), random_spd((3, 1), D)
    p_loc, q_loc = torch.randn(5, D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    q_prec = torch.linalg.inv(q_cov)
    for p_name, p_matrix in (("covariance_matrix", p_cov), ("precision_matrix", torch.linalg.inv(p_cov))):
        p = JacobianMVN(p_loc, **{p_name: p_matrix})
        for q in (JacobianMVN(q_loc, covariance_matrix=q_cov), JacobianMVN(q_loc, precision_matrix=q_prec)):
            assert_close(kl_divergence(p, q), dense_kl(p_loc, p_cov, q_loc, q_cov))
            assert_close(kl_divergence(q, p), dense_kl(q_loc, q_cov, p_loc, p_cov))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("jacobian_kind", JACOBIAN_KINDS)
def test_zero_between_two_parametrizations_of_one_distribution(jacobian_kind, kind):
    """KL(p, q) = KL(q, p) = KL(p, p) = 0 when q is the same Gaussian as p in another parametrization or type."""
    params = {k: v.detach() for k, v in random_params(kind, (2,), D).items()}
    other = build(kind, params)
    ours = build(jacobian_kind, params_from_dense(jacobian_kind, *dense(kind, params)))
    zero = torch.zeros(2, dtype=torch.float64)
    for p, q in ((ours, other), (other, ours), (ours, ours)):
        torch.testing.assert_close(kl_divergence(p, q), zero, rtol=0, atol=1e-12)


def test_zero_between_a_lowrank_and_the_same_distribution_of_another_class():
    """KL(p, q) = KL(q, p) = 0 between a JacobianLowRankMVN and itself, torch's and Pyro's low-rank classes with the
    same parameters, a JacobianMVN and MultivariateNormal of its covariance, and (with a zero factor) Independent."""
    params = {k: v.detach() for k, v in random_params(LOWRANK_KIND, (2,), D).items()}
    ours = build(LOWRANK_KIND, params)
    loc, cov = dense(LOWRANK_KIND, params)
    others = [
        ours,
        build(LOWRANK_KIND, params),
        build("LowRankMultivariateNormal", params),
        build("pyro.LowRankMultivariateNormal", params),
        build("MultivariateNormal", {"loc": loc, "covariance_matrix": cov}),
        *(build(k, params_from_dense(k, loc, cov)) for k in JACOBIAN_KINDS),
    ]
    zero = torch.zeros(2, dtype=torch.float64)
    for other in others:
        for p, q in ((ours, other), (other, ours)):
            torch.testing.assert_close(kl_divergence(p, q), zero, rtol=0, atol=1e-12)
    diagonal = JacobianLowRankMVN(params["loc"], torch.zeros_like(params["cov_factor"]), params["cov_diag"])
    independent = build("Independent(Normal)", {"loc": params["loc"], "scale": params["cov_diag"].sqrt()})
    for p, q in ((diagonal, independent), (independent, diagonal)):
        torch.testing.assert_close(kl_divergence(p, q), zero, rtol=0, atol=1e-12)


def test_expanded_and_converted_lowrank(assert_close):
    """An expanded JacobianLowRankMVN, and one converted from an expanded torch LowRankMultivariateNormal, meet the
    others with the batch shape and numbers of the same distribution built with that batch shape."""
    params = {k: v.detach() for k, v in random_params(LOWRANK_KIND, (3,), D).items()}
    reference = build(LOWRANK_KIND, {k: v.expand((2,) + v.shape) for k, v in params.items()})
    others = [build(kind, {k: v.detach() for k, v in random_params(kind, (3,), D).items()})
              for kind in ("JacobianMVN-precision_matrix", "LowRankMultivariateNormal", "Independent(Normal)")]
    expanded = build(LOWRANK_KIND, params).expand((2, 3))
    converted = JacobianLowRankMVN.from_distribution(build("LowRankMultivariateNormal", params).expand((2, 3)))
    for ours in (expanded, converted):
        for other in others:
            assert_close(kl_divergence(ours, other), kl_divergence(reference, other))
            assert_close(kl_divergence(other, ours), kl_divergence(other, reference))


MONTE_CARLO_PAIRS = [
    ("JacobianMVN-precision_matrix", "JacobianMVN-covariance_matrix"),
    ("JacobianMVN-scale_tril", "pyro.LowRankMultivariateNormal"),
    ("JacobianMVN-covariance_matrix", "Independent(Normal)"),
    ("LowRankMultivariateNormal", "JacobianMVN-precision_matrix"),
    ("pyro.Independent(pyro.Normal)", "JacobianMVN-scale_tril"),
    (LOWRANK_KIND, LOWRANK_KIND),
    (LOWRANK_KIND, "JacobianMVN-precision_matrix"),
    ("JacobianMVN-scale_tril", LOWRANK_KIND),
    ("Independent(Normal)", LOWRANK_KIND),
    (LOWRANK_KIND, "pyro.LowRankMultivariateNormal"),
]


@pytest.mark.parametrize("p_kind, q_kind", MONTE_CARLO_PAIRS, ids=[f"{p}||{q}" for p, q in MONTE_CARLO_PAIRS])
def test_monte_carlo(p_kind, q_kind):
    """The closed form is within a few standard errors of the sample mean of log p(x) - log q(x), x ~ p."""
    p = build(p_kind, {k: v.detach() for k, v in random_params(p_kind, (), D).items()})
    q = build(q_kind, {k: v.detach() for k, v in random_params(q_kind, (), D).items()})
    n = 100_000
    x = p.sample((n,))
    log_ratio = p.log_prob(x) - q.log_prob(x)
    standard_error = log_ratio.std() / n**0.5
    assert (log_ratio.mean() - kl_divergence(p, q)).abs() < 5 * standard_error


@pytest.mark.parametrize("kind", OTHER_KINDS)
def test_event_size_mismatch_names_both_shapes(kind):
    ours = JacobianMVN(torch.zeros(D), covariance_matrix=torch.eye(D))
    other = build(kind, {k: v.detach().float() for k, v in random_params(kind, (), D + 1).items()})
    for p, q in ((ours, other), (other, ours)):
        pattern = rf"event_shape \({p.event_shape[0]},\) .*event_shape \({q.event_shape[0]},\)"
        with pytest.raises(ValueError, match=pattern):
            kl_divergence(p, q)


@pytest.mark.parametrize("kind", (LOWRANK_KIND,) + JACOBIAN_KINDS + OTHER_KINDS)
def test_lowrank_event_size_mismatch_raises_value_error(kind):
    ours = JacobianLowRankMVN(torch.zeros(D), torch.ones(D, 2), torch.ones(D))
    other = build(kind, {k: v.detach().float() for k, v in random_params(kind, (), D + 1).items()})
    for p, q in ((ours, other), (other, ours)):
        with pytest.raises(ValueError, match="event"):
            kl_divergence(p, q)


def test_lowrank_batch_mismatch_raises_value_error():
    p = JacobianLowRankMVN(torch.zeros(2, D), torch.ones(D, 2), torch.ones(D))
    for q in (JacobianMVN(torch.zeros(3, D), precision_matrix=torch.eye(D)),
              JacobianLowRankMVN(torch.zeros(3, D), torch.ones(D, 2), torch.ones(D))):
        for pair in ((p, q), (q, p)):
            with pytest.raises(ValueError, match=r"(?s)(?=.*\b2\b)(?=.*\b3\b)"):
                kl_divergence(*pair)


def test_batch_mismatch_names_both_shapes():
    p = JacobianMVN(torch.zeros(2, D), covariance_matrix=torch.eye(D))
    q = JacobianMVN(torch.zeros(3, D), precision_matrix=torch.eye(D))
    with pytest.raises(ValueError, match=r"batch_shape \(2,\) .*batch_shape \(3,\)"):
        kl_divergence(p, q)


@pytest.mark.parametrize(
    "base, ndims",
    [
        (lambda: torch.distributions.Laplace(torch.zeros(D), torch.ones(D)), 1),
        (lambda: Normal(torch.zeros(2, D), torch.ones(2, D)), 2),
    ],
    ids=["Laplace-1", "Normal-2"],
)
def test_other_independent_bases_are_not_implemented(base, ndims):
    ours = JacobianMVN(torch.zeros(D), covariance_matrix=torch.eye(D))
    independent = Independent(base(), ndims)
    for p, q in ((ours, independent), (independent, ours)):
        with pytest.raises(NotImplementedError):
            kl_divergence(p, q)


def test_independent_delta_keeps_pyros_rule(assert_close):
    """Pyro's KL(Independent(Delta, 1), MultivariateNormal) = -log q(v) still applies to a JacobianMVN q."""
    v = torch.randn(D, dtype=torch.float64)
    loc, cov = torch.randn(D, dtype=torch.float64), random_spd((), D)
    q = JacobianMVN(loc, precision_matrix=torch.linalg.inv(cov))
    kl = kl_divergence(pyro_dist.Delta(v).to_event(1), q)
    assert_close(kl, -MultivariateNormal(loc, cov).log_prob(v))


@pytest.mark.parametrize("p_kind, q_kind", FORMULA_PAIRS + LOWRANK_PAIRS, ids=[
    f"{p}||{q}" for p, q in FORMULA_PAIRS + LOWRANK_PAIRS])
def test_float32(p_kind, q_kind, assert_close):
    p_params, q_params = random_params(p_kind, (2,), D), random_params(q_kind, (2,), D)
    kl64 = kl_divergence(build(p_kind, p_params), build(q_kind, q_params))
    p32 = build(p_kind, {k: v.detach().float() for k, v in p_params.items()})
    kl32 = kl_divergence(p32, build(q_kind, {k: v.detach().float() for k, v in q_params.items()}))
    assert kl32.dtype == torch.float32
    assert_close(kl32, kl64.detach().float())


def test_trace_mean_field_elbo_uses_the_closed_form(assert_close):
    """Pyro's TraceMeanField_ELBO of a latent-only model is exactly KL(guide, prior)."""
    prior_loc, prior_cov = torch.randn(D, dtype=torch.float64), random_spd((), D)
    guide_loc, guide_cov = torch.randn(D, dtype=torch.float64), random_spd((), D)

    def model():
        pyro.sample("z", pyro_dist.MultivariateNormal(prior_loc, prior_cov))

    def guide():
        pyro.sample("z", JacobianMVN(guide_loc, precision_matrix=torch.linalg.inv(guide_cov)))

    loss = pyro.infer.TraceMeanField_ELBO().differentiable_loss(model, guide)
    assert_close(loss, dense_kl(guide_loc, guide_cov, prior_loc, prior_cov))


def test_trace_mean_field_elbo_uses_the_closed_form_for_a_lowrank_guide(assert_close):
    """The same with a JacobianLowRankMVN guide and a full-rank prior."""
    prior_loc, prior_cov = torch.randn(D, dtype=torch.float64), random_spd((), D)
    params = {k: v.detach() for k, v in random_params(LOWRANK_KIND, (), D).items()}

    def model():
        pyro.sample("z", pyro_dist.MultivariateNormal(prior_loc, prior_cov))

    def guide():
        pyro.sample("z", JacobianLowRankMVN(**params))

    loss = pyro.infer.TraceMeanField_ELBO().differentiable_loss(model, guide)
    assert_close(loss, dense_kl(*dense(LOWRANK_KIND, params), prior_loc, prior_cov))


BIG_D = 2048
CHEAP_PAIRS = [
    (LOWRANK_KIND, LOWRANK_KIND),
    (LOWRANK_KIND, "LowRankMultivariateNormal"),
    ("pyro.LowRankMultivariateNormal", LOWRANK_KIND),
    (LOWRANK_KIND, "Independent(Normal)"),
    ("Independent(Normal)", LOWRANK_KIND),
]


# torch 2.11's profiler says, on a second profile in one process, that each profile keeps only its own events.
@pytest.mark.filterwarnings("ignore:Warning. Profiler clears events:UserWarning")
@pytest.mark.parametrize("p_kind, q_kind", CHEAP_PAIRS, ids=[f"{p}||{q}" for p, q in CHEAP_PAIRS])
def test_lowrank_and_diagonal_pairs_form_no_d_by_d_matrix(p_kind, q_kind, assert_close):
    """O(d k^2) per member when both sides are low-rank or diagonal: at d = 2048 the KL holds far less than one
    d x d float64 matrix (33.5 MB), and it still equals torch's low-rank rule."""
    p_params = {k: v.detach() for k, v in random_params(p_kind, (), BIG_D).items()}
    q_params = {k: v.detach() for k, v in random_params(q_kind, (), BIG_D).items()}

    def run():
        return kl_divergence(build(p_kind, p_params, validate_args=False), build(q_kind, q_params, validate_args=False))

    run()  # warm up: one-off allocations are not counted
    peak, kl = peak_bytes(run)
    dense_bytes = BIG_D * BIG_D * 8
    assert peak < dense_bytes / 4, f"peak {peak} bytes is {peak / dense_bytes:.2f} of a d x d float64 matrix"
    # torch's own low-rank rule, O(d k^2) too, with a diagonal side written as a zero-factor low-rank Gaussian.
    expected = kl_divergence(_as_torch_lowrank(p_kind, p_params), _as_torch_lowrank(q_kind, q_params))
    assert_close(kl, expected, rtol=1e-8, atol=1e-8)


def _as_torch_lowrank(kind, params):
    if "Independent" in kind:
        scale = params["scale"]
        return LowRankMultivariateNormal(params["loc"], scale.new_zeros(scale.shape + (1,)), scale**2)
    return LowRankMultivariateNormal(**params)
