"""JacobianMVN is Pyro's MultivariateNormal: Pyro's code that dispatches on that class (the Gaussian HMMs,
``mvn_to_gaussian``, the forecaster) gives with it the numbers it gives with Pyro's own."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import PARAMETRIZATIONS, matrix_for, random_spd
from pyro.contrib.forecast import Forecaster, ForecastingModel
from pyro.distributions.hmm import GammaGaussianHMM, GaussianHMM, LinearHMM
from pyro.ops.gaussian import mvn_to_gaussian
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN

D = 3


def test_is_pyro_multivariate_normal():
    d = JacobianMVN(torch.zeros(D), covariance_matrix=torch.eye(D))
    assert isinstance(d, dist.MultivariateNormal)
    assert isinstance(d, MultivariateNormal)


def _hmm_parts(cls, parametrization, hidden_dim=2, obs_dim=3, duration=5):
    """The arguments of a GaussianHMM, each noise distribution of class ``cls``; the same numbers for any ``cls``
    (the random state is reset first)."""
    torch.manual_seed(3)
    initial = cls(
        torch.randn(hidden_dim),
        **{parametrization: matrix_for(parametrization, random_spd((), hidden_dim, torch.float32))},
    )
    trans_matrix = 0.5 * torch.randn(duration, hidden_dim, hidden_dim)
    trans = cls(
        torch.randn(duration, hidden_dim),
        **{parametrization: matrix_for(parametrization, random_spd((duration,), hidden_dim, torch.float32))},
    )
    obs_matrix = torch.randn(hidden_dim, obs_dim)
    obs = cls(
        torch.randn(obs_dim), **{parametrization: matrix_for(parametrization, random_spd((), obs_dim, torch.float32))}
    )
    data = torch.randn(duration, obs_dim)
    return (initial, trans_matrix, trans, obs_matrix, obs), data


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_gaussian_hmm_log_prob_matches_pyro(parametrization):
    ours, data = _hmm_parts(JacobianMVN, parametrization)
    theirs, _ = _hmm_parts(dist.MultivariateNormal, parametrization)
    expected = GaussianHMM(*theirs).log_prob(data)
    torch.testing.assert_close(GaussianHMM(*ours).log_prob(data), expected)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_gamma_gaussian_hmm_log_prob_matches_pyro(parametrization):
    scale = dist.Gamma(torch.tensor(2.0), torch.tensor(3.0))
    ours, data = _hmm_parts(JacobianMVN, parametrization)
    theirs, _ = _hmm_parts(dist.MultivariateNormal, parametrization)
    expected = GammaGaussianHMM(scale, *theirs).log_prob(data)
    torch.testing.assert_close(GammaGaussianHMM(scale, *ours).log_prob(data), expected)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_linear_hmm_rsample_matches_pyro(parametrization):
    ours, _ = _hmm_parts(JacobianMVN, parametrization)
    theirs, _ = _hmm_parts(dist.MultivariateNormal, parametrization)
    torch.manual_seed(7)
    expected = LinearHMM(*theirs).rsample((4,))
    torch.manual_seed(7)
    actual = LinearHMM(*ours).rsample((4,))
    assert actual.shape == expected.shape == (4, 5, 3)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_mvn_to_gaussian_matches_pyro(parametrization):
    loc = torch.randn(4, D, dtype=torch.float64)
    m = matrix_for(parametrization, random_spd((4,), D))
    ours = mvn_to_gaussian(JacobianMVN(loc, **{parametrization: m}))
    theirs = mvn_to_gaussian(dist.MultivariateNormal(loc, **{parametrization: m}))
    for name in ("log_normalizer", "info_vec", "precision"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-10, atol=1e-10, msg=name)


class _NoiseModel(ForecastingModel):
    """A bias and a learned correlated noise, its distribution of class ``noise_cls``."""

    def __init__(self, noise_cls):
        super().__init__()
        self.noise_cls = noise_cls

    def model(self, zero_data, covariates):
        obs_dim = zero_data.size(-1)
        bias = pyro.sample("bias", dist.Normal(0.0, 10.0).expand([obs_dim]).to_event(1))
        scale_tril = pyro.param(
            "noise_scale_tril", lambda: torch.eye(obs_dim), constraint=dist.constraints.lower_cholesky
        )
        noise = self.noise_cls(zero_data.new_zeros(obs_dim), scale_tril=scale_tril)
        self.predict(noise, bias.expand(zero_data.shape))


def _fit_forecaster(noise_cls, data, covariates):
    pyro.clear_param_store()
    pyro.set_rng_seed(11)
    forecaster = Forecaster(_NoiseModel(noise_cls), data, covariates, num_steps=4, learning_rate=0.05)
    params = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    return forecaster.losses, params


def test_forecaster_with_jacobian_mvn_noise_matches_pyro():
    torch.manual_seed(5)
    data = torch.randn(12, 2)
    covariates = torch.zeros(12, 0)
    try:
        expected_losses, expected_params = _fit_forecaster(dist.MultivariateNormal, data, covariates)
        losses, params = _fit_forecaster(JacobianMVN, data, covariates)
    finally:
        pyro.clear_param_store()
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    assert params.keys() == expected_params.keys()
    for name in expected_params:
        torch.testing.assert_close(params[name], expected_params[name], msg=name)
