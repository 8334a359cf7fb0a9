r"""Inference with JacobianMVN models recovers the exact posterior of a conjugate Gaussian model.

SVI fits a full-covariance Gaussian guide, which contains the exact posterior, so its optimum is exact; NUTS
draws from it. Every number is checked against the closed-form posterior of :class:`ConjugateGaussian`.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import HMC, MCMC, NUTS, SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.ops.stats import effective_sample_size, hpdi, quantile, split_gelman_rubin
from pyro.optim import ClippedAdam
from pyro_models import ConjugateGaussian, full_rank_guide

from torch_mvn_ext import JacobianMVN

# Each runs a full SVI optimization or MCMC chain (10-30 s each on a 2-core machine).
pytestmark = pytest.mark.slow

D = 2
JIT_DEPRECATION = "ignore:`torch.jit.trace` is deprecated:DeprecationWarning"
SVI_STEPS = 500
NUM_SAMPLES, WARMUP = 200, 100


@pytest.fixture(autouse=True)
def param_store():
    """Pyro's param store is global: every test starts and ends with an empty one."""
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def standardized_errors(mean, cov, exact_mean, exact_cov):
    r"""Max :math:`|m - m^*|_i / \sigma_i` and max :math:`|C - C^*|_{ij} / (\sigma_i \sigma_j)` (posterior sd)."""
    sd = exact_cov.diagonal().sqrt()
    return ((mean - exact_mean) / sd).abs().max(), ((cov - exact_cov) / sd.outer(sd)).abs().max()


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
def test_svi_recovers_the_exact_posterior(elbo):
    problem = ConjugateGaussian(d=D)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    # 16 vectorized particles and a learning rate decayed 100-fold leave a stochastic-optimization error of
    # ~0.01 posterior sd in the mean and ~0.02 in the covariance; the tolerances are 5 times that.
    optim = ClippedAdam({"lr": 0.1, "lrd": 0.01 ** (1 / SVI_STEPS)})
    loss = elbo(num_particles=16, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(problem.model(JacobianMVN), full_rank_guide(JacobianMVN, D), optim, loss)
    for _ in range(SVI_STEPS):
        svi.step(problem.data)
    L = pyro.param("guide_scale_tril").detach()
    mean_err, cov_err = standardized_errors(pyro.param("guide_loc").detach(), L @ L.mT, *problem.posterior())
    assert mean_err < 0.05 and cov_err < 0.1, (mean_err, cov_err)


def run_mcmc(kernel_cls, model, data, num_samples, warmup, **kwargs):
    pyro.set_rng_seed(0)
    mcmc = MCMC(kernel_cls(model, **kwargs), num_samples=num_samples, warmup_steps=warmup, disable_progbar=True)
    mcmc.run(data)
    return mcmc.get_samples()["mu"]


def test_nuts_recovers_the_exact_posterior(assert_close):
    problem = ConjugateGaussian(d=D)
    exact_mean, exact_cov = problem.posterior()
    samples = run_mcmc(NUTS, problem.model(JacobianMVN), problem.data, NUM_SAMPLES, WARMUP)
    chain = samples.unsqueeze(0)
    ess = effective_sample_size(chain)
    assert (ess > NUM_SAMPLES / 4).all(), ess
    assert (split_gelman_rubin(chain) < 1.1).all()
    # Monte Carlo error of the mean is sd / sqrt(ESS): 4.5 standard errors (the max of D entries) rarely fails.
    sd = exact_cov.diagonal().sqrt()
    assert ((samples.mean(0) - exact_mean).abs() < 4.5 * sd / ess.sqrt()).all()
    # A variance estimated from ESS draws has relative sd ~ sqrt(2 / ESS); the covariance test is as loose.
    mean_err, cov_err = standardized_errors(samples.mean(0), samples.T.cov(), exact_mean, exact_cov)
    assert cov_err < 4.5 * (2 / ess.min()).sqrt(), cov_err
    # pyro.ops.stats works on the samples as on any tensor: compare with the exact Gaussian marginals.
    lo, hi = hpdi(samples, 0.9)
    normal = torch.distributions.Normal(exact_mean, sd)
    assert_close(quantile(samples, [0.5]).squeeze(0), samples.median(0).values, rtol=0.05, atol=0.2 * sd.max())
    assert ((normal.cdf(hi) - normal.cdf(lo)) - 0.9).abs().max() < 0.1


@pytest.mark.filterwarnings(JIT_DEPRECATION)
@pytest.mark.parametrize("kernel_cls", [NUTS, HMC])
def test_chains_match_pyro_and_jit_compiled_kernels(kernel_cls, assert_close):
    """The same seed gives the same chain as Pyro's own MultivariateNormal, with and without ``jit_compile``."""
    problem = ConjugateGaussian(d=D)
    model = problem.model(JacobianMVN)
    kwargs = dict(step_size=0.1, num_steps=5, adapt_step_size=False) if kernel_cls is HMC else {}
    plain = run_mcmc(kernel_cls, model, problem.data, 30, 30, **kwargs)
    jitted = run_mcmc(kernel_cls, model, problem.data, 30, 30, jit_compile=True, ignore_jit_warnings=True, **kwargs)
    ref = run_mcmc(kernel_cls, problem.model(dist.MultivariateNormal), problem.data, 30, 30, **kwargs)
    # The potentials and gradients agree to rounding; a long chain amplifies rounding, a short one barely.
    assert_close(jitted, plain, rtol=1e-8, atol=1e-8)
    assert_close(plain, ref, rtol=1e-8, atol=1e-8)
