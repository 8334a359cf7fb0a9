"""AutoJacobianMVN behaves as Pyro's AutoMultivariateNormal, with a JacobianMVN posterior, and AutoJacobianLowRankMVN
as Pyro's AutoLowRankMultivariateNormal, with a JacobianLowRankMVN posterior."""

import functools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, JitTrace_ELBO, Predictive, Trace_ELBO, TraceGraph_ELBO
from pyro.infer.autoguide import (
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    init_to_median,
    init_to_sample,
    init_to_value,
)
from pyro.optim import ClippedAdam
from pyro_models import ConjugateGaussian

from torch_mvn_ext import AutoJacobianLowRankMVN, AutoJacobianMVN, JacobianLowRankMVN, JacobianMVN

D = 2
SVI_STEPS = 500


@pytest.fixture(autouse=True)
def param_store():
    """Pyro's param store is global: every test starts and ends with an empty one."""
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def hierarchical_model(data=None, n=6):
    """A JacobianMVN latent, a positive and a bounded latent (so the guide transforms them), and a plate."""
    loc = torch.zeros(D, dtype=torch.float64)
    mu = pyro.sample("mu", JacobianMVN(loc, precision_matrix=torch.eye(D, dtype=torch.float64)))
    tau = pyro.sample("tau", dist.LogNormal(torch.tensor(0.0, dtype=torch.float64), 0.5))
    rho = pyro.sample("rho", dist.Beta(torch.tensor(2.0, dtype=torch.float64), 2.0))
    cov = tau * ((1 - rho) * torch.eye(D, dtype=torch.float64) + rho)
    with pyro.plate("data", n if data is None else data.shape[0]):
        return pyro.sample("obs", JacobianMVN(mu, covariance_matrix=cov), obs=data)


def make_guides(init_loc_fn=init_to_median, init_scale=0.1):
    """The same model under AutoJacobianMVN and AutoMultivariateNormal, each with its own param store state."""
    guides = []
    for cls in (AutoJacobianMVN, AutoMultivariateNormal):
        pyro.set_rng_seed(0)
        guide = cls(hierarchical_model, init_loc_fn=init_loc_fn, init_scale=init_scale)
        guide(DATA)  # runs _setup_prototype with the same random state
        guides.append(guide)
    return guides


DATA = torch.tensor([[0.5, 1.0], [1.5, 0.2], [0.9, 0.8], [1.2, 1.4], [0.1, 0.7], [1.1, 0.3]], dtype=torch.float64)


def make_lowrank_guides(init_loc_fn=init_to_median, init_scale=0.1, rank=None):
    """The same model under AutoJacobianLowRankMVN and AutoLowRankMultivariateNormal, set up from the same random
    state (which draws the initial cov_factor)."""
    guides = []
    for cls in (AutoJacobianLowRankMVN, AutoLowRankMultivariateNormal):
        pyro.set_rng_seed(0)
        guide = cls(hierarchical_model, init_loc_fn=init_loc_fn, init_scale=init_scale, rank=rank)
        guide(DATA)
        guides.append(guide)
    return guides


# Each of the library's autoguides and Pyro's counterpart, built alike (the low-rank ones with rank 3).
GUIDE_PAIRS = [
    pytest.param(make_guides, id="full_rank"),
    pytest.param(functools.partial(make_lowrank_guides, rank=3), id="low_rank"),
]


def test_posterior_is_a_jacobian_mvn_equal_to_pyros(assert_close):
    ours, theirs = make_guides()
    q, ref = ours.get_posterior(), theirs.get_posterior()
    assert type(q) is JacobianMVN and q.parametrization == "scale_tril"
    assert q.batch_shape == ref.batch_shape == () and q.event_shape == ref.event_shape == (ours.latent_dim,)
    assert ours.latent_dim == D + 2
    for name in ("loc", "scale_tril", "covariance_matrix"):
        assert_close(getattr(q, name), getattr(ref, name))
    assert_close(q.scale_tril, 0.1 * torch.eye(D + 2, dtype=torch.float64))
    assert dict(ours.named_parameters()).keys() == dict(theirs.named_parameters()).keys()


@pytest.mark.parametrize("make", GUIDE_PAIRS)
def test_same_samples_median_quantiles_and_predictive(make, assert_close):
    ours, theirs = make(init_loc_fn=init_to_sample, init_scale=0.3)
    for method in (lambda g: g.median(), lambda g: g.quantiles([0.1, 0.5, 0.9])):
        a, b = method(ours), method(theirs)
        assert a.keys() == b.keys() == {"mu", "tau", "rho"}
        for site in a:
            assert_close(a[site], b[site])
    for guide_call in (lambda g: g(), lambda g: poutine.trace(g).get_trace().nodes):
        pyro.set_rng_seed(1)
        a = guide_call(ours)
        pyro.set_rng_seed(1)
        b = guide_call(theirs)
        for site in ("mu", "tau", "rho"):
            va, vb = (x[site]["value"] if isinstance(x[site], dict) else x[site] for x in (a, b))
            assert_close(va, vb)
    predictions = []
    for guide in (ours, theirs):
        pyro.set_rng_seed(2)
        predictions.append(Predictive(hierarchical_model, guide=guide, num_samples=5)(n=3))
    assert predictions[0].keys() == predictions[1].keys() == {"mu", "tau", "rho", "obs"}
    for site in predictions[0]:
        assert_close(predictions[0][site], predictions[1][site])
    assert predictions[0]["obs"].shape == (5, 3, D)


def test_init_loc_fn_and_init_scale():
    values = {"mu": torch.tensor([0.3, -0.2], dtype=torch.float64), "tau": torch.tensor(2.0, dtype=torch.float64)}
    guide = AutoJacobianMVN(hierarchical_model, init_loc_fn=init_to_value(values=values), init_scale=0.25)
    guide(DATA)
    median = guide.median()
    torch.testing.assert_close(median["mu"], values["mu"])
    torch.testing.assert_close(median["tau"], values["tau"])
    torch.testing.assert_close(guide.get_posterior().stddev, torch.full((D + 2,), 0.25, dtype=torch.float64))
    for bad in (0.0, -1.0, 1):
        with pytest.raises(ValueError, match="init_scale"):
            AutoJacobianMVN(hierarchical_model, init_scale=bad)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceGraph_ELBO, JitTrace_ELBO])
@pytest.mark.parametrize("make", GUIDE_PAIRS)
def test_svi_trajectory_matches_pyros(make, elbo, assert_close):
    """Same ELBO, same gradients, same parameters after several Adam steps."""
    trajectories = []
    for guide in make():
        loss = elbo(ignore_jit_warnings=True) if elbo is JitTrace_ELBO else elbo()
        svi = SVI(hierarchical_model, guide, pyro.optim.Adam({"lr": 0.05}), loss)
        pyro.set_rng_seed(3)
        losses = torch.tensor([svi.step(DATA) for _ in range(10)], dtype=torch.float64)
        trajectories.append((losses, {k: v.detach().clone() for k, v in guide.named_parameters()}))
    (losses, params), (ref_losses, ref_params) = trajectories
    # Traced by torch.jit, torch's MultivariateNormal.log_prob keeps its d * log(2 pi) in float32 (see test_pyro).
    assert_close(losses, ref_losses, **(dict(rtol=1e-7, atol=0) if elbo is JitTrace_ELBO else {}))
    for name in params:
        assert_close(params[name], ref_params[name])


@pytest.mark.slow
def test_recovers_the_exact_posterior():
    problem = ConjugateGaussian(d=D)
    exact_mean, exact_cov = problem.posterior()
    pyro.set_rng_seed(0)
    model = problem.model(JacobianMVN)
    guide = AutoJacobianMVN(model)
    # As in test_pyro_inference: the stochastic-optimization error after SVI_STEPS decayed steps is ~0.01
    # posterior sd in the mean and ~0.03 in the covariance; the tolerances are ~4 times that.
    optim = ClippedAdam({"lr": 0.1, "lrd": 0.01 ** (1 / SVI_STEPS)})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1))
    for _ in range(SVI_STEPS):
        svi.step(problem.data)
    q = guide.get_posterior()
    sd = exact_cov.diagonal().sqrt()
    mean_err = ((q.loc.detach() - exact_mean) / sd).abs().max()
    cov_err = ((q.covariance_matrix.detach() - exact_cov) / sd.outer(sd)).abs().max()
    assert mean_err < 0.05 and cov_err < 0.1, (mean_err, cov_err)
    quantiles = guide.quantiles([0.5])["mu"].squeeze(0)
    assert ((quantiles - exact_mean) / sd).abs().max() < 0.05


# --------------------------------------------------------------------------------------------------------------------
# AutoJacobianLowRankMVN behaves as Pyro's AutoLowRankMultivariateNormal, with a JacobianLowRankMVN posterior.


LOWRANK_ATTRIBUTES = ("loc", "cov_factor", "cov_diag", "covariance_matrix", "scale_tril", "variance")


def test_lowrank_posterior_is_a_jacobian_lowrank_mvn_equal_to_pyros(assert_close):
    ours, theirs = make_lowrank_guides()
    q, ref = ours.get_posterior(), theirs.get_posterior()
    assert type(q) is JacobianLowRankMVN
    assert q.batch_shape == ref.batch_shape == () and q.event_shape == ref.event_shape == (D + 2,)
    assert ours.rank == theirs.rank == 2  # round(sqrt(latent_dim)), latent_dim = 4
    assert q.cov_factor.shape == (D + 2, 2)
    for name in LOWRANK_ATTRIBUTES:
        assert_close(getattr(q, name), getattr(ref, name), msg=lambda m, name=name: f"{name}: {m}")
    assert dict(ours.named_parameters()).keys() == dict(theirs.named_parameters()).keys()
    # Gradients of the posterior's log-density reach the guide's parameters as through Pyro's.
    x = ref.sample((3,))
    names, params = zip(*ours.named_parameters())
    ref_params = dict(theirs.named_parameters())
    grads = torch.autograd.grad(q.log_prob(x).sum(), params)
    expected = torch.autograd.grad(ref.log_prob(x).sum(), [ref_params[n] for n in names])
    for name, a, e in zip(names, grads, expected):
        assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}")


def test_lowrank_same_elbo(assert_close):
    ours, theirs = make_lowrank_guides(init_scale=0.5)
    for seed in range(3):
        losses = []
        for guide in (ours, theirs):
            pyro.set_rng_seed(seed)
            losses.append(Trace_ELBO(num_particles=3).loss(hierarchical_model, guide, DATA))
        assert losses[0] == pytest.approx(losses[1], rel=1e-12, abs=1e-12)


def test_lowrank_init_loc_fn_init_scale_and_rank():
    values = {"mu": torch.tensor([0.3, -0.2], dtype=torch.float64), "tau": torch.tensor(2.0, dtype=torch.float64)}
    guide = AutoJacobianLowRankMVN(hierarchical_model, init_loc_fn=init_to_value(values=values), init_scale=0.25)
    guide(DATA)
    median = guide.median()
    torch.testing.assert_close(median["mu"], values["mu"])
    torch.testing.assert_close(median["tau"], values["tau"])
    torch.testing.assert_close(guide.get_posterior().cov_diag, torch.full((D + 2,), 0.5 * 0.25**2, dtype=torch.float64))
    for rank in (1, 3, 6):
        pyro.clear_param_store()
        guide = AutoJacobianLowRankMVN(hierarchical_model, rank=rank)
        guide(DATA)
        assert guide.get_posterior().cov_factor.shape == (D + 2, rank)
    for bad in (0.0, -1.0, 1):
        with pytest.raises(ValueError, match="init_scale"):
            AutoJacobianLowRankMVN(hierarchical_model, init_scale=bad)
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="rank"):
            AutoJacobianLowRankMVN(hierarchical_model, rank=bad)


@pytest.mark.slow
def test_lowrank_recovers_the_exact_posterior():
    """With latent_dim 2 the default rank is 1, and diag(s) (u u^T + I) diag(s) still reaches every 2 x 2
    covariance: the fit must find the exact conjugate posterior."""
    problem = ConjugateGaussian(d=D)
    exact_mean, exact_cov = problem.posterior()
    pyro.set_rng_seed(0)
    model = problem.model(JacobianMVN)
    guide = AutoJacobianLowRankMVN(model)
    optim = ClippedAdam({"lr": 0.1, "lrd": 0.01 ** (1 / SVI_STEPS)})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1))
    for _ in range(SVI_STEPS):
        svi.step(problem.data)
    q = guide.get_posterior()
    assert guide.rank == 1
    sd = exact_cov.diagonal().sqrt()
    mean_err = ((q.loc.detach() - exact_mean) / sd).abs().max()
    cov_err = ((q.covariance_matrix.detach() - exact_cov) / sd.outer(sd)).abs().max()
    assert mean_err < 0.05 and cov_err < 0.1, (mean_err, cov_err)
