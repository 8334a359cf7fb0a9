r"""Closed-form KL divergences between :class:`JacobianMVN` and the Gaussians it meets, registered with torch.

Importing :mod:`torch_mvn_ext` registers :func:`torch.distributions.kl_divergence` for every pair with one side a
:class:`JacobianMVN` or a :class:`JacobianLowRankMVN` and the other either of them, a
:class:`~torch.distributions.MultivariateNormal`, a :class:`~torch.distributions.LowRankMultivariateNormal` or an
``Independent(Normal, 1)`` (Pyro's subclasses included), in both directions. With :math:`\delta = \mu_p - \mu_q`
and event size :math:`d`
(Ref: https://en.wikipedia.org/wiki/Multivariate_normal_distribution#Kullback%E2%80%93Leibler_divergence):

.. math::

    \mathrm{KL}(p \,\|\, q) = \tfrac12 \log\det\Sigma_q - \tfrac12 \log\det\Sigma_p
        + \tfrac12 \left[\operatorname{tr}(\Sigma_q^{-1}\Sigma_p) + \delta^\top \Sigma_q^{-1} \delta - d\right].

Each side is read through its structure (:class:`~torch_mvn_ext._gaussian.GaussianState`: a triangular factor, a
low-rank factor with its capacitance Cholesky factor, or a vector of scales), so nothing is factorized twice and no
d x d matrix is inverted (a low-rank side inverts its k x k capacitance); the formula is written once over them.
``p`` writes its covariance as :math:`\Sigma_p = R^\top R + \operatorname{diag}(v)` (``R``: rows of a square
root, ``v``: a diagonal part; either may be absent), so that

.. math::

    \operatorname{tr}(\Sigma_q^{-1}\Sigma_p) + \delta^\top \Sigma_q^{-1} \delta
        = \sum_{x \in \text{rows of } [R;\, \delta^\top]} x^\top \Sigma_q^{-1} x
        + v^\top \operatorname{diag}(\Sigma_q^{-1}),

one quadratic form of ``q`` evaluated on ``R`` and :math:`\delta` stacked: a single batched triangular solve (or
matmul; for a low-rank ``q``, Woodbury's GEMMs) per member of ``q``'s batch gives the trace and the Mahalanobis terms
together.

Every rule is differentiable, broadcasts ``p``'s batch shape against ``q``'s, and traces into one graph under
``torch.compile(fullgraph=True)``. (torch's ``kl_divergence`` resolves a new pair of types with a dispatcher that
dynamo cannot trace, for any registration; once a pair has been called eagerly the lookup is memoized.)
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    register_kl,
)

from ._checks import quiet_under_jit_trace
from ._dense import DenseGaussian
from ._factor import ScaleTril
from ._gaussian import GaussianState
from ._lowrank import LowRankGaussian
from ._shapes import format_shape
from .jacobian_lowrank_mvn import JacobianLowRankMVN
from .jacobian_mvn import JacobianMVN

try:  # Pyro's private rule for (Independent, MultivariateNormal), which the pair below shadows
    from pyro.distributions.kl import _kl_independent_mvn
except ImportError:  # another Pyro layout: what the rule gives for bases it does not know

    def _kl_independent_mvn(p: Independent, q: MultivariateNormal) -> Tensor:
        raise NotImplementedError(f"kl_divergence(Independent({type(p.base_dist).__name__}), {type(q).__name__})")


__all__ = []


class _DiagonalView(GaussianState):
    r""":math:`\Sigma = \operatorname{diag}(\sigma^2)`, from ``Independent(Normal(loc, scale), 1)``: the quantities of a
    structure that a KL divergence reads."""

    def __init__(self, dist: Independent) -> None:
        self.loc = dist.base_dist.loc
        self.scale = dist.base_dist.scale

    def half_log_det(self) -> Tensor:
        return self.scale.log().sum(-1)

    def kl_rows(self) -> None:
        return None

    def kl_diagonal(self) -> Tensor:
        return self.scale.pow(2)

    def quad(self, x: Tensor) -> Tensor:
        return (x / self.scale.unsqueeze(-2)).pow(2).sum((-2, -1))

    def precision_diagonal(self) -> Tensor:
        return self.scale.pow(-2)


def _view(dist: Distribution) -> GaussianState:
    """The structure of ``dist``: its own where it holds one, else a view of what it holds."""
    state = getattr(dist, "_state", None)
    if isinstance(state, GaussianState):
        return state
    if isinstance(dist, MultivariateNormal):
        scale_tril = dist._unbroadcasted_scale_tril
        return DenseGaussian(dist.loc, "scale_tril", scale_tril, ScaleTril(scale_tril))
    if isinstance(dist, LowRankMultivariateNormal):
        return LowRankGaussian.of_distribution(dist)
    return _DiagonalView(cast(Independent, dist))  # Independent(Normal, 1): the rules below dispatch only those


def _is_diagonal_normal(dist: Independent) -> bool:
    return isinstance(dist.base_dist, Normal) and dist.reinterpreted_batch_ndims == 1


def _check_shapes(p: Distribution, q: Distribution) -> None:
    if p.event_shape != q.event_shape:
        raise ValueError(
            f"kl_divergence(p, q) needs equal event shapes, but p ({type(p).__name__}) has event_shape "
            f"{format_shape(p.event_shape)} and q ({type(q).__name__}) has event_shape {format_shape(q.event_shape)}"
        )
    try:
        torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    except RuntimeError:
        raise ValueError(
            f"kl_divergence(p, q) needs broadcastable batch shapes, but p ({type(p).__name__}) has batch_shape "
            f"{format_shape(p.batch_shape)} and q ({type(q).__name__}) has batch_shape {format_shape(q.batch_shape)}"
        ) from None


@quiet_under_jit_trace
def _kl(p: Distribution, q: Distribution) -> Tensor:
    _check_shapes(p, q)
    vp, vq = _view(p), _view(q)
    d = p.event_shape[0]
    x = (p.mean - q.mean).unsqueeze(-2)  # broadcast to each batch shape, which the quadratic forms group against
    rows = vp.kl_rows()
    if rows is not None:
        batch_shape = torch.broadcast_shapes(rows.shape[:-2], x.shape[:-2])
        x = torch.cat([rows.expand(batch_shape + rows.shape[-2:]), x.expand(batch_shape + (1, d))], dim=-2)
    quad = vq.quad(x)
    diagonal = vp.kl_diagonal()
    if diagonal is not None:
        quad = quad + (diagonal * vq.precision_diagonal()).sum(-1)
    return vq.half_log_det() - vp.half_log_det() + 0.5 * (quad - d)


# Each of this library's classes against every Gaussian it meets, both ways (each pair registered exactly, so that
# torch's dispatcher never has to choose between two rules that match equally well).
_OURS = (JacobianMVN, JacobianLowRankMVN)
_THEIRS = (MultivariateNormal, LowRankMultivariateNormal)


def _kl_gaussian_gaussian(p: Distribution, q: Distribution) -> Tensor:
    return _kl(p, q)


def _kl_ours_independent(p: Distribution, q: Independent) -> Tensor:
    if not _is_diagonal_normal(q):
        raise NotImplementedError(
            f"kl_divergence({type(p).__name__}, Independent) is implemented for Independent(Normal, 1); got "
            f"Independent({type(q.base_dist).__name__}, {q.reinterpreted_batch_ndims})"
        )
    return _kl(p, q)


def _kl_independent_ours(p: Independent, q: Distribution) -> Tensor:
    if not _is_diagonal_normal(p):
        if isinstance(q, MultivariateNormal):
            # Pyro's rule for (Independent, MultivariateNormal), which this pair shadows: a Delta base, or
            # NotImplementedError.
            return _kl_independent_mvn(p, q)
        raise NotImplementedError(
            f"kl_divergence(Independent, {type(q).__name__}) is implemented for Independent(Normal, 1); got "
            f"Independent({type(p.base_dist).__name__}, {p.reinterpreted_batch_ndims})"
        )
    return _kl(p, q)


for _p in _OURS:
    for _q in _OURS + _THEIRS:
        register_kl(_p, _q)(_kl_gaussian_gaussian)
        register_kl(_q, _p)(_kl_gaussian_gaussian)
    register_kl(_p, Independent)(_kl_ours_independent)
    register_kl(Independent, _p)(_kl_independent_ours)
