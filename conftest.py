"""Names the docstring examples of ``torch_mvn_ext`` use, for ``pytest --doctest-modules``.

The examples are written as a user would type them after the usual imports; this provides those imports, a fixed
random state, and a tiny Pyro ``model`` for the autoguide's example.
"""

import pytest

# Not test code: docs/conf.py imports Sphinx, which the test extra does not install; build/ holds copies.
collect_ignore = ["docs", "build", "dist"]


def _model(data=None):
    """A two-latent-site Pyro model: a Gaussian mean and a positive scale."""
    import pyro
    import pyro.distributions as dist
    import torch

    data = torch.tensor([0.3, -0.1, 0.5]) if data is None else data
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(mu, sigma), obs=data)


@pytest.fixture(autouse=True)
def _doctest_names(request):
    """Fills ``doctest_namespace`` for doctest items only (other tests do not ask for it)."""
    if not isinstance(request.node, pytest.DoctestItem):
        yield
        return
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import SVI, Predictive, Trace_ELBO
    from torch.distributions import MultivariateNormal, kl_divergence

    import torch_mvn_ext
    from torch_mvn_ext import AutoJacobianLowRankMVN, AutoJacobianMVN, JacobianLowRankMVN, JacobianMVN

    namespace = request.getfixturevalue("doctest_namespace")
    namespace.update(
        torch=torch,
        pyro=pyro,
        dist=dist,
        SVI=SVI,
        Trace_ELBO=Trace_ELBO,
        Predictive=Predictive,
        MultivariateNormal=MultivariateNormal,
        kl_divergence=kl_divergence,
        torch_mvn_ext=torch_mvn_ext,
        JacobianMVN=JacobianMVN,
        AutoJacobianMVN=AutoJacobianMVN,
        JacobianLowRankMVN=JacobianLowRankMVN,
        AutoJacobianLowRankMVN=AutoJacobianLowRankMVN,
        model=_model,
    )
    torch.manual_seed(0)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
