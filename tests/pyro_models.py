r"""Gaussian Pyro programs whose posterior is known in closed form, written once for any MVN class.

``mvn`` below is either :class:`torch_mvn_ext.JacobianMVN` or Pyro's ``dist.MultivariateNormal``, so that the
same program can be run with both and compared number for number.
"""

import pyro
import torch
from helpers import matrix_for, random_spd
from torch.distributions import MultivariateNormal, constraints


class ConjugateGaussian:
    r"""The conjugate model :math:`\mu \sim N(m_0, \Sigma_0)`, :math:`x_i \mid \mu \sim N(\mu, \Sigma)`, i.i.d.

    The exact posterior is :math:`N(m_n, \Sigma_n)` with :math:`\Sigma_n^{-1} = \Sigma_0^{-1} + n\Sigma^{-1}` and
    :math:`m_n = \Sigma_n(\Sigma_0^{-1} m_0 + \Sigma^{-1}\sum_i x_i)`. The prior is given by its covariance and
    the likelihood by ``likelihood`` (any of the three parametrizations).
    """

    def __init__(self, d=2, n=10, likelihood="precision_matrix", dtype=torch.float64):
        self.d = d
        self.prior_loc = torch.randn(d, dtype=dtype)
        self.prior_cov = 4.0 * random_spd((), d, dtype=dtype, condition=3.0)
        self.noise_cov = random_spd((), d, dtype=dtype, condition=5.0)
        self.likelihood = likelihood
        self.noise_matrix = matrix_for(likelihood, self.noise_cov)
        true_mu = MultivariateNormal(self.prior_loc, self.prior_cov).sample()
        self.data = MultivariateNormal(true_mu, self.noise_cov).sample((n,))

    def model(self, mvn):
        """The model as a Pyro program ``model(data=None, n=None)`` built from the MVN class ``mvn``."""

        def model(data=None, n=None):
            mu = pyro.sample("mu", mvn(self.prior_loc, covariance_matrix=self.prior_cov))
            with pyro.plate("data", n if data is None else data.shape[0]):
                pyro.sample("obs", mvn(mu, **{self.likelihood: self.noise_matrix}), obs=data)

        return model

    def posterior(self):
        """The exact posterior mean and covariance of ``mu`` given ``self.data``, dense float64 algebra."""
        n = self.data.shape[0]
        prior_prec = torch.linalg.inv(self.prior_cov)
        noise_prec = torch.linalg.inv(self.noise_cov)
        cov = torch.linalg.inv(prior_prec + n * noise_prec)
        mean = cov @ (prior_prec @ self.prior_loc + noise_prec @ self.data.sum(0))
        return mean, (cov + cov.mT) / 2


def full_rank_guide(mvn, d, dtype=torch.float64, site="mu", scale=0.5):
    """A guide ``guide(data)`` with a full-covariance ``mvn`` over ``site``, its Cholesky factor a Pyro param."""

    def guide(data=None, n=None):
        loc = pyro.param("guide_loc", lambda: torch.zeros(d, dtype=dtype))
        scale_tril = pyro.param(
            "guide_scale_tril", lambda: scale * torch.eye(d, dtype=dtype), constraint=constraints.lower_cholesky
        )
        pyro.sample(site, mvn(loc, scale_tril=scale_tril))

    return guide
