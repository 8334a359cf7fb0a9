"""JacobianMVN inside Pyro programs: every site, handler and ELBO gives what Pyro's own MultivariateNormal gives."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import PARAMETRIZATIONS, matrix_for, random_spd
from pyro import poutine
from pyro.infer import SVI, JitTrace_ELBO, Predictive, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro_models import ConjugateGaussian, full_rank_guide
from torch.distributions import constraints

from torch_mvn_ext import JacobianMVN

D = 3
JIT_DEPRECATION = "ignore:`torch.jit.trace` is deprecated:DeprecationWarning"
ELBOS = {
    "Trace_ELBO": lambda: Trace_ELBO(max_plate_nesting=1),
    "Trace_ELBO-vectorized": lambda: Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1),
    "TraceGraph_ELBO": lambda: TraceGraph_ELBO(max_plate_nesting=1),
    "TraceMeanField_ELBO": lambda: TraceMeanField_ELBO(max_plate_nesting=1),
    "JitTrace_ELBO": lambda: JitTrace_ELBO(max_plate_nesting=1),
}


@pytest.fixture(autouse=True)
def param_store():
    """Pyro's param store is global: every test starts and ends with an empty one."""
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def loss_and_grads(elbo, model, guide, *args):
    """The ELBO loss and its gradient w.r.t. every param, from a fixed random state."""
    pyro.set_rng_seed(1)
    loss = elbo.loss_and_grads(model, guide, *args)
    params = pyro.get_param_store()
    grads = {name: params.get_param(name).unconstrained().grad.clone() for name in params.keys()}
    for name in params.keys():
        params.get_param(name).unconstrained().grad = None
    return loss, grads


def _layers(d):
    """The wrapper classes around a distribution (Independent, MaskedDistribution, ...) and the innermost one."""
    wrappers = []
    while hasattr(d, "base_dist"):
        wrappers.append(type(d))
        d = d.base_dist
    return wrappers, d


def test_sample_site_shapes_and_methods(assert_close):
    loc = torch.randn(4, D, dtype=torch.float64)
    cov = random_spd((), D)
    ours, theirs = JacobianMVN(loc, cov), dist.MultivariateNormal(loc, cov)
    pyro.set_rng_seed(0)
    x = ours()
    pyro.set_rng_seed(0)
    assert_close(x, theirs())
    for make in (
        lambda d: d.expand_by([5]),
        lambda d: d.to_event(1),
        lambda d: d.expand_by([2, 1]).to_event(2),
        lambda d: d.mask(torch.tensor([True, False, True, True])),
    ):
        a, b = make(ours), make(theirs)
        (wrappers, base), (ref_wrappers, ref_base) = _layers(a), _layers(b)
        assert wrappers == ref_wrappers and type(base) is JacobianMVN and type(ref_base) is dist.MultivariateNormal
        assert (a.batch_shape, a.event_shape) == (b.batch_shape, b.event_shape)
        assert_close(a.log_prob(x), b.log_prob(x))
        assert a.shape() == b.shape()


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_infer_shapes(parametrization):
    shapes = dict(loc=(5, 1, D), **{parametrization: (4, D, D)})
    expected = dist.MultivariateNormal.infer_shapes(**shapes)
    assert JacobianMVN.infer_shapes(**shapes) == expected
    matrix = matrix_for(parametrization, random_spd((4,), D))
    d = JacobianMVN(torch.zeros(shapes["loc"], dtype=torch.float64), **{parametrization: matrix})
    assert (d.batch_shape, d.event_shape) == tuple(map(torch.Size, expected))


def _plated_model(mvn, scale_tril, mask, data):
    """Nested plates, a batched and a broadcast MVN, a masked site, a scaled site and ``to_event``."""
    loc = pyro.param("loc", torch.zeros(D, dtype=torch.float64))
    with pyro.plate("groups", data.shape[-3], dim=-2):
        group_loc = pyro.sample("group_loc", mvn(loc, scale_tril=scale_tril))
        with pyro.plate("data", data.shape[-2], dim=-1):
            pyro.sample("obs", mvn(group_loc, scale_tril=scale_tril).mask(mask), obs=data)
    with poutine.scale(scale=3.0):
        pyro.sample("extra", mvn(loc, scale_tril=scale_tril).expand_by([2]).to_event(1))


def test_plated_masked_scaled_sites_match_pyro(assert_close):
    scale_tril = torch.linalg.cholesky(random_spd((), D))
    data = torch.randn(4, 6, D, dtype=torch.float64)
    mask = torch.rand(4, 6) < 0.6
    traces = {}
    for mvn in (JacobianMVN, dist.MultivariateNormal):
        pyro.clear_param_store()
        pyro.set_rng_seed(2)
        trace = poutine.trace(_plated_model).get_trace(mvn, scale_tril, mask, data)
        trace.compute_log_prob()
        traces[mvn] = trace
    ours, theirs = traces[JacobianMVN], traces[dist.MultivariateNormal]
    for name in ("group_loc", "obs", "extra"):
        assert_close(ours.nodes[name]["value"], theirs.nodes[name]["value"])
        assert_close(ours.nodes[name]["log_prob"], theirs.nodes[name]["log_prob"])
        assert ours.nodes[name]["scale"] == theirs.nodes[name]["scale"]
    assert ours.nodes["obs"]["log_prob"].shape == (4, 6)
    assert (ours.nodes["obs"]["log_prob"][~mask] == 0).all()
    # An independent reference for the masked site: torch's MVN, summed by hand.
    ref = torch.distributions.MultivariateNormal(ours.nodes["group_loc"]["value"], scale_tril=scale_tril)
    assert_close(ours.nodes["obs"]["log_prob"], ref.log_prob(data) * mask)
    assert_close(ours.log_prob_sum(), theirs.log_prob_sum())


def test_replay_condition_and_predictive(assert_close):
    problem = ConjugateGaussian(d=D)
    guide = full_rank_guide(JacobianMVN, D)
    guide_trace = poutine.trace(guide).get_trace(problem.data)
    mu = guide_trace.nodes["mu"]["value"]
    for mvn in (JacobianMVN, dist.MultivariateNormal):
        model = problem.model(mvn)
        replayed = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(problem.data)
        conditioned = poutine.trace(poutine.condition(model, {"mu": mu})).get_trace(problem.data)
        assert_close(replayed.log_prob_sum(), conditioned.log_prob_sum())
        assert_close(replayed.nodes["mu"]["value"], mu)
    ref = torch.distributions.MultivariateNormal(mu, problem.noise_cov).log_prob(problem.data).sum()
    ref = ref + torch.distributions.MultivariateNormal(problem.prior_loc, problem.prior_cov).log_prob(mu)
    assert_close(replayed.log_prob_sum(), ref)
    samples = {}
    for mvn in (JacobianMVN, dist.MultivariateNormal):
        pyro.set_rng_seed(3)
        predictive = Predictive(problem.model(mvn), guide=guide, num_samples=7, return_sites=("mu", "obs"))
        samples[mvn] = predictive(n=5)
    for site in ("mu", "obs"):
        assert samples[JacobianMVN][site].shape == samples[dist.MultivariateNormal][site].shape
        assert_close(samples[JacobianMVN][site], samples[dist.MultivariateNormal][site])
    assert samples[JacobianMVN]["obs"].shape == (7, 5, D)


@pytest.mark.filterwarnings(JIT_DEPRECATION)
@pytest.mark.parametrize("elbo", ELBOS, ids=list(ELBOS))
@pytest.mark.parametrize("likelihood", PARAMETRIZATIONS)
def test_elbo_and_gradients_match_pyro(elbo, likelihood, assert_close):
    problem = ConjugateGaussian(d=D, likelihood=likelihood)
    results = []
    for mvn in (JacobianMVN, dist.MultivariateNormal):
        pyro.clear_param_store()
        guide = full_rank_guide(mvn, D)
        pyro.set_rng_seed(0)
        poutine.trace(guide).get_trace(problem.data)  # create the params
        pyro.param("guide_loc").data.normal_()
        results.append(loss_and_grads(ELBOS[elbo](), problem.model(mvn), guide, problem.data))
    (loss, grads), (ref_loss, ref_grads) = results
    # Under torch.jit.trace, torch's MultivariateNormal.log_prob turns its d * log(2 pi) into a float32
    # tensor (the traced event size is an integer tensor): Pyro's loss is off by ~1e-8 relative, ours is not.
    loss_tol = dict(rtol=1e-7, atol=0) if elbo == "JitTrace_ELBO" else {}
    assert_close(torch.tensor(loss, dtype=torch.float64), torch.tensor(ref_loss, dtype=torch.float64), **loss_tol)
    assert grads.keys() == ref_grads.keys() == {"guide_loc", "guide_scale_tril"}
    for name in grads:
        assert_close(grads[name], ref_grads[name])


@pytest.mark.parametrize(
    "guide_mvn,model_mvn",
    [
        (JacobianMVN, JacobianMVN),
        (JacobianMVN, dist.MultivariateNormal),
        (dist.MultivariateNormal, JacobianMVN),
    ],
    ids=["ours-ours", "ours-pyro", "pyro-ours"],
)
def test_mean_field_elbo_uses_the_analytic_kl(guide_mvn, model_mvn, assert_close):
    r"""TraceMeanField_ELBO's loss is :math:`-\log p(x \mid \mu_s) + KL(q \| p)` with the closed-form KL.

    A Monte Carlo KL term would be :math:`\log q(\mu_s) - \log p(\mu_s)` instead, which differs.
    """
    problem = ConjugateGaussian(d=D)
    guide = full_rank_guide(guide_mvn, D)
    pyro.set_rng_seed(0)
    guide_trace = poutine.trace(guide).get_trace(problem.data)
    q = guide_trace.nodes["mu"]["fn"]
    pyro.set_rng_seed(0)
    loss = TraceMeanField_ELBO(max_plate_nesting=1).loss(problem.model(model_mvn), guide, problem.data)
    # Dense closed form of KL(q || prior), independent of any registered KL.
    Sq, S0, m = q.covariance_matrix.detach(), problem.prior_cov, q.loc.detach() - problem.prior_loc
    kl = 0.5 * (
        torch.trace(torch.linalg.solve(S0, Sq))
        + m @ torch.linalg.solve(S0, m)
        - D
        + torch.logdet(S0)
        - torch.logdet(Sq)
    )
    mu = guide_trace.nodes["mu"]["value"].detach()
    log_lik = torch.distributions.MultivariateNormal(mu, problem.noise_cov).log_prob(problem.data).sum()
    assert_close(torch.tensor(loss, dtype=torch.float64), kl - log_lik)
    prior = model_mvn(problem.prior_loc, problem.prior_cov)
    monte_carlo_kl = (q.log_prob(mu) - prior.log_prob(mu)).detach()
    assert (monte_carlo_kl - kl).abs() > 1e-3


@pytest.mark.parametrize(
    "matrix_name,constraint",
    [
        ("scale_tril", constraints.lower_cholesky),
        ("covariance_matrix", constraints.positive_definite),
        ("precision_matrix", constraints.positive_definite),
    ],
)
def test_constrained_matrix_params_train(matrix_name, constraint, assert_close):
    """A constrained matrix param in the param store: same loss, same gradient, and a step keeps it valid."""
    problem = ConjugateGaussian(d=D)
    init = matrix_for(matrix_name, 0.3 * torch.eye(D, dtype=torch.float64))
    results = []
    for mvn in (JacobianMVN, dist.MultivariateNormal):
        pyro.clear_param_store()

        def guide(data, mvn=mvn):
            loc = pyro.param("guide_loc", lambda: torch.zeros(D, dtype=torch.float64))
            matrix = pyro.param("guide_matrix", lambda: init.clone(), constraint=constraint)
            pyro.sample("mu", mvn(loc, **{matrix_name: matrix}))

        svi = SVI(problem.model(mvn), guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO(max_plate_nesting=1))
        pyro.set_rng_seed(0)
        losses = torch.tensor([svi.step(problem.data) for _ in range(5)])
        results.append((losses, pyro.param("guide_matrix").detach()))
    (losses, matrix), (ref_losses, ref_matrix) = results
    assert_close(losses, ref_losses)
    assert_close(matrix, ref_matrix)
    assert constraint.check(matrix).all() and not torch.equal(matrix, init)


@pytest.mark.filterwarnings(JIT_DEPRECATION)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_jit_traces_raise_no_tracer_warnings(parametrization, assert_close):
    """Under torch.jit.trace (JitTrace_ELBO with AutoJacobianMVN, NUTS with jit_compile=True) JacobianMVN's
    shape-dependent Python raises no TracerWarning (an error here: warnings are errors in this suite), as Pyro's
    MVN raises none, and the traced programs give Pyro's numbers."""
    from pyro.infer import MCMC, NUTS
    from pyro.infer.autoguide import AutoMultivariateNormal

    from torch_mvn_ext import AutoJacobianMVN

    cov = random_spd((), D)
    data = torch.randn(5, D, dtype=torch.float64)
    prior = matrix_for(parametrization, cov)

    def model_for(mvn):
        def model(data):
            mu = pyro.sample("mu", mvn(torch.zeros(D, dtype=torch.float64), **{parametrization: prior}))
            pyro.sample("obs", mvn(mu, covariance_matrix=cov).expand(data.shape[:1]).to_event(1), obs=data)

        return model

    losses, chains = [], []
    for mvn, autoguide in ((JacobianMVN, AutoJacobianMVN), (dist.MultivariateNormal, AutoMultivariateNormal)):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        svi = SVI(model_for(mvn), autoguide(model_for(mvn)), pyro.optim.Adam({"lr": 0.05}), JitTrace_ELBO())
        losses.append(torch.tensor([svi.step(data) for _ in range(3)], dtype=torch.float64))
        pyro.set_rng_seed(0)
        mcmc = MCMC(NUTS(model_for(mvn), jit_compile=True), num_samples=5, warmup_steps=5, disable_progbar=True)
        mcmc.run(data)
        chains.append(mcmc.get_samples()["mu"])
    # Traced, torch's MultivariateNormal.log_prob keeps its d * log(2 pi) in float32 (see above).
    assert_close(*losses, rtol=1e-7, atol=0)
    assert_close(*chains, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings(JIT_DEPRECATION)
def test_jit_trace_still_warns_where_it_keeps_data():
    """The TracerWarnings stay where a trace keeps a value read from data: dims given as a tensor. The value checks of
    validate_args run (and raise) while tracing, as torch's do, and say nothing from the library's own code."""
    d = JacobianMVN(torch.arange(3.0), covariance_matrix=torch.diag(torch.tensor([1.0, 2.0, 3.0])))
    with pytest.warns(torch.jit.TracerWarning):
        torch.jit.trace(lambda dims: d.marginal(dims).mean, (torch.tensor([0, 1]),))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(lambda x: JacobianMVN(x, torch.eye(3), validate_args=True).log_prob(x), (torch.zeros(3),))
    ours = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning) and "torch_mvn_ext" in w.filename]
    assert not ours, [str(w.message) for w in ours]
    with pytest.raises(ValueError, match="NaN or infinite"):
        torch.jit.trace(
            lambda x: JacobianMVN(torch.zeros(3), torch.eye(3), validate_args=True).log_prob(x),
            (torch.tensor([0.0, float("nan"), 0.0]),),
        )
