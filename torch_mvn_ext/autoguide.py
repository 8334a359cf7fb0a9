r"""Pyro autoguides whose joint posterior over all latent variables is a :class:`~torch_mvn_ext.JacobianMVN` or a
:class:`~torch_mvn_ext.JacobianLowRankMVN`."""

from typing import Any

from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoMultivariateNormal

from .jacobian_lowrank_mvn import JacobianLowRankMVN
from .jacobian_mvn import JacobianMVN

__all__ = ["AutoJacobianLowRankMVN", "AutoJacobianMVN"]


class AutoJacobianMVN(AutoMultivariateNormal):
    r""":class:`pyro.infer.autoguide.AutoMultivariateNormal` with a :class:`~torch_mvn_ext.JacobianMVN` posterior.

    The guide concatenates every continuous latent site of the model, each mapped to an unconstrained space,
    into one vector of size ``latent_dim`` and fits a full-covariance Gaussian over it with
    :math:`\Sigma = L L^\top`, :math:`L = \operatorname{diag}(s)\,U`: ``loc`` is an ``nn.Parameter``, ``scale``
    (:math:`s`, shape ``(latent_dim,)``) is constrained positive and ``scale_tril`` (:math:`U`, shape
    ``(latent_dim, latent_dim)``) unit lower-triangular — the parameters, initialization, latent site and
    methods (``median``, ``quantiles``, ``get_transform``, ``get_base_dist``, use with
    :class:`~pyro.infer.Predictive`) are those of :class:`~pyro.infer.autoguide.AutoMultivariateNormal`.
    The only difference is the posterior's class: :meth:`get_posterior` returns a
    :class:`~torch_mvn_ext.JacobianMVN`, so the guide's ``log_prob`` backpropagates through the closed form
    and the posterior offers :meth:`~torch_mvn_ext.JacobianMVN.jacobian`,
    :meth:`~torch_mvn_ext.JacobianMVN.log_prob_and_grads` and the rest. For the same parameters and the same
    random state it draws the same samples and gives the same ELBO as
    :class:`~pyro.infer.autoguide.AutoMultivariateNormal`.

    Example::

        >>> guide = AutoJacobianMVN(model)
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())

    Args:
        model (callable): a Pyro model.
        init_loc_fn (callable): a per-site initialization function, as for Pyro's autoguides
            (default :func:`~pyro.infer.autoguide.initialization.init_to_median`).
        init_scale (float): initial standard deviation of each unconstrained latent variable; must be > 0.
    """

    def get_posterior(self, *args: Any, **kwargs: Any) -> JacobianMVN:
        r"""The guide's posterior over the unconstrained latent vector.

        Returns:
            JacobianMVN: with ``loc`` of shape ``(latent_dim,)`` and ``scale_tril``
            :math:`\operatorname{diag}(s)\,U` of shape ``(latent_dim, latent_dim)``; batch shape ``()``.
        """
        scale_tril = self.scale[..., None] * self.scale_tril
        return JacobianMVN(self.loc, scale_tril=scale_tril)


class AutoJacobianLowRankMVN(AutoLowRankMultivariateNormal):
    r""":class:`pyro.infer.autoguide.AutoLowRankMultivariateNormal` with a :class:`~torch_mvn_ext.JacobianLowRankMVN`
    posterior.

    The guide concatenates every continuous latent site of the model, each mapped to an unconstrained space,
    into one vector of size ``latent_dim`` and fits a Gaussian over it whose covariance is low-rank plus diagonal,
    :math:`\Sigma = \operatorname{diag}(s)\,(U U^\top + I)\,\operatorname{diag}(s)`: ``loc`` and ``cov_factor``
    (:math:`U`, shape ``(latent_dim, rank)``) are ``nn.Parameter``\ s and ``scale`` (:math:`s`, shape
    ``(latent_dim,)``) is constrained positive — the parameters, initialization, latent site and methods
    (``median``, ``quantiles``, ``get_transform``, ``get_base_dist``, use with :class:`~pyro.infer.Predictive`) are
    those of :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal`. The only difference is the posterior's
    class: :meth:`get_posterior` returns a :class:`~torch_mvn_ext.JacobianLowRankMVN`, so the guide's ``log_prob``
    backpropagates through the closed form and the posterior offers
    :meth:`~torch_mvn_ext.JacobianLowRankMVN.jacobian`, :meth:`~torch_mvn_ext.JacobianLowRankMVN.log_prob_and_grads`
    and the rest, at a cost linear in ``latent_dim`` (no ``latent_dim`` x ``latent_dim`` matrix is formed). For the
    same parameters and the same random state it draws the same samples and gives the same ELBO as
    :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal`.

    Example::

        >>> guide = AutoJacobianLowRankMVN(model, rank=1)
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())

    Args:
        model (callable): a Pyro model.
        init_loc_fn (callable): a per-site initialization function, as for Pyro's autoguides
            (default :func:`~pyro.infer.autoguide.initialization.init_to_median`).
        init_scale (float): approximate initial standard deviation of each unconstrained latent variable;
            must be > 0.
        rank (int or None): the rank of the low-rank part of the covariance; must be > 0. Defaults to
            ``round(sqrt(latent_dim))``, as Pyro's.
    """

    def get_posterior(self, *args: Any, **kwargs: Any) -> JacobianLowRankMVN:
        r"""The guide's posterior over the unconstrained latent vector.

        Returns:
            JacobianLowRankMVN: with ``loc`` of shape ``(latent_dim,)``, ``cov_factor``
            :math:`\operatorname{diag}(s)\,U` of shape ``(latent_dim, rank)`` and ``cov_diag`` :math:`s^2` of shape
            ``(latent_dim,)``; batch shape ``()``.
        """
        # The numbers of Pyro 1.9's AutoLowRankMultivariateNormal.get_posterior, operation for operation.
        scale = self.scale
        cov_factor = self.cov_factor * scale.unsqueeze(-1)
        cov_diag = scale * scale
        return JacobianLowRankMVN(self.loc, cov_factor, cov_diag)
