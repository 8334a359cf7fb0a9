r"""Closed-form KL divergences between :class:`JacobianMVN` and the Gaussians it meets, registered with torch.

Importing :mod:`torch_mvn_ext` registers :func:`torch.distributions.kl_divergence` for every pair with one side a
:class:`JacobianMVN` and the other a :class:`JacobianMVN`, a :class:`~torch.distributions.MultivariateNormal`, a
:class:`~torch.distributions.LowRankMultivariateNormal` or an ``Independent(Normal, 1)`` (Pyro's subclasses
included), in both directions. With :math:`\delta = \mu_p - \mu_q` and event size :math:`d`
(Ref: https://en.wikipedia.org/wiki/Multivariate_normal_distribution#Kullback%E2%80%93Leibler_divergence):

.. math::

    \mathrm{KL}(p \,\|\, q) = \tfrac12 \log\det\Sigma_q - \tfrac12 \log\det\Sigma_p
        + \tfrac12 \left[\operatorname{tr}(\Sigma_q^{-1}\Sigma_p) + \delta^\top \Sigma_q^{-1} \delta - d\right].

Each side is read through a small view of what it already holds (a triangular factor, a low-rank factor with its
capacitance Cholesky factor, or a vector of scales), so nothing is factorized twice and nothing is inverted.
``p`` writes its covariance as :math:`\Sigma_p = R^\top R + \operatorname{diag}(v)` (``R``: rows of a square
root, ``v``: a diagonal part; either may be absent), so that

.. math::

    \operatorname{tr}(\Sigma_q^{-1}\Sigma_p) + \delta^\top \Sigma_q^{-1} \delta
        = \sum_{x \in \text{rows of } [R;\, \delta^\top]} x^\top \Sigma_q^{-1} x
        + v^\top \operatorname{diag}(\Sigma_q^{-1}),

one quadratic form of ``q`` evaluated on ``R`` and :math:`\delta` stacked: a single batched triangular solve (or
matmul) per member of ``q``'s factor batch gives the trace and the Mahalanobis terms together.

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
from ._factor import CholeskyFactor, ScaleTril, TriangularFactor
from ._shapes import Grouping, format_shape
from .jacobian_mvn import JacobianMVN

try:  # Pyro's private rule for (Independent, MultivariateNormal), which the pair below shadows
    from pyro.distributions.kl import _kl_independent_mvn
except ImportError:  # another Pyro layout: what the rule gives for bases it does not know

    def _kl_independent_mvn(p: Independent, q: MultivariateNormal) -> Tensor:
        raise NotImplementedError(f"kl_divergence(Independent({type(p.base_dist).__name__}), {type(q).__name__})")

__all__ = []


class _TrilView:
    r"""A Gaussian held through its triangular factor (:mod:`torch_mvn_ext._factor`): ``L`` with
    :math:`\Sigma = L L^\top` or, for a precision-factored :class:`JacobianMVN`, ``T = L^{-1}`` with
    :math:`P = T^\top T`."""

    def __init__(self, dist: MultivariateNormal, factor: TriangularFactor) -> None:
        self.dist = dist
        self.loc = dist.loc
        self.factor = factor
        self.diagonal = None

    @property
    def half_log_det(self) -> Tensor:
        return self.factor.half_log_det()

    @property
    def rows(self) -> Tensor:
        # Sigma = L L^T = R^T R with R = L^T; a precision factor gives L = T^{-1}, one triangular solve per
        # factor member, cached on the distribution.
        if self.factor.is_precision:
            return self.dist._unbroadcasted_scale_tril.mT
        return self.factor.tensor.mT

    def quad(self, x: Tensor) -> Tensor:
        r""":math:`\sum_i x_i^\top \Sigma^{-1} x_i = \sum_i \|L^{-1} x_i\|^2`: a triangular solve with ``L`` or a
        matmul with ``T``."""
        return _whitened_sq_norm(self.factor, x)

    def precision_diagonal(self) -> Tensor:
        return self.factor.precision_diagonal()


class _LowRankView:
    r""":math:`\Sigma = W W^\top + \operatorname{diag}(D)` with the Cholesky factor ``C`` of the capacitance
    :math:`I + W^\top D^{-1} W` that :class:`~torch.distributions.LowRankMultivariateNormal` holds."""

    def __init__(self, dist: LowRankMultivariateNormal) -> None:
        self.loc = dist.loc
        self.cov_factor = dist._unbroadcasted_cov_factor
        self.diagonal = dist._unbroadcasted_cov_diag
        self.capacitance = CholeskyFactor(dist._capacitance_tril)

    @property
    def half_log_det(self) -> Tensor:
        # Matrix determinant lemma: log det Sigma = log det C C^T + log det D.
        return self.capacitance.half_log_det() + 0.5 * self.diagonal.log().sum(-1)

    @property
    def rows(self) -> Tensor:
        return self.cov_factor.mT

    def quad(self, x: Tensor) -> Tensor:
        r"""Woodbury: :math:`\Sigma^{-1} = D^{-1} - D^{-1} W (C C^\top)^{-1} W^\top D^{-1}`, so the quadratic form is
        :math:`\sum_i \|D^{-1/2} x_i\|^2 - \|C^{-1} W^\top D^{-1} x_i\|^2`."""
        y = x / self.diagonal.unsqueeze(-2)
        return (x * y).sum((-2, -1)) - _whitened_sq_norm(self.capacitance, y @ self.cov_factor)

    def precision_diagonal(self) -> Tensor:
        a = self.capacitance.whiten(self.cov_factor / self.diagonal.unsqueeze(-1))
        return self.diagonal.reciprocal() - a.pow(2).sum(-1)


class _DiagonalView:
    r""":math:`\Sigma = \operatorname{diag}(\sigma^2)`, from ``Independent(Normal(loc, scale), 1)``."""

    def __init__(self, dist: Independent) -> None:
        self.loc = dist.base_dist.loc
        self.scale = dist.base_dist.scale
        self.rows = None

    @property
    def half_log_det(self) -> Tensor:
        return self.scale.log().sum(-1)

    @property
    def diagonal(self) -> Tensor:
        return self.scale.pow(2)

    def quad(self, x: Tensor) -> Tensor:
        return (x / self.scale.unsqueeze(-2)).pow(2).sum((-2, -1))

    def precision_diagonal(self) -> Tensor:
        return self.scale.pow(-2)


def _whitened_sq_norm(factor: TriangularFactor, x: Tensor) -> Tensor:
    r""":math:`\sum_i \|L^{-1} x_i\|^2` over the rows :math:`x_i` of ``x``.

    ``x`` has shape ``B + (m, d)`` and the factor batch shape ``F`` broadcasting to ``B``; the result has shape
    ``B``. Grouped so that each factor member meets all of its rows in one batched BLAS-3 call.
    """
    g = Grouping(x.shape[:-1], factor.batch_shape + (1,))
    z = factor.like(g.flat_matrix(factor.tensor.unsqueeze(-3))).whiten(g.group(x))
    return g.ungroup(z.pow(2).sum(-1, keepdim=True)).sum((-2, -1))


def _view(dist: Distribution) -> _TrilView | _LowRankView | _DiagonalView:
    if isinstance(dist, JacobianMVN):
        return _TrilView(dist, dist._factor)
    if isinstance(dist, MultivariateNormal):
        return _TrilView(dist, ScaleTril(dist._unbroadcasted_scale_tril))
    if isinstance(dist, LowRankMultivariateNormal):
        return _LowRankView(dist)
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
    x = (vp.loc - vq.loc).unsqueeze(-2)
    rows = vp.rows
    if rows is not None:
        batch_shape = torch.broadcast_shapes(rows.shape[:-2], x.shape[:-2])
        x = torch.cat([rows.expand(batch_shape + rows.shape[-2:]), x.expand(batch_shape + (1, d))], dim=-2)
    quad = vq.quad(x)
    if vp.diagonal is not None:
        quad = quad + (vp.diagonal * vq.precision_diagonal()).sum(-1)
    return vq.half_log_det - vp.half_log_det + 0.5 * (quad - d)


@register_kl(JacobianMVN, JacobianMVN)
@register_kl(JacobianMVN, MultivariateNormal)
@register_kl(MultivariateNormal, JacobianMVN)
@register_kl(JacobianMVN, LowRankMultivariateNormal)
@register_kl(LowRankMultivariateNormal, JacobianMVN)
def _kl_gaussian_gaussian(p: Distribution, q: Distribution) -> Tensor:
    return _kl(p, q)


@register_kl(JacobianMVN, Independent)
def _kl_jacobianmvn_independent(p: JacobianMVN, q: Independent) -> Tensor:
    if not _is_diagonal_normal(q):
        raise NotImplementedError(
            f"kl_divergence(JacobianMVN, Independent) is implemented for Independent(Normal, 1); got "
            f"Independent({type(q.base_dist).__name__}, {q.reinterpreted_batch_ndims})"
        )
    return _kl(p, q)


@register_kl(Independent, JacobianMVN)
def _kl_independent_jacobianmvn(p: Independent, q: JacobianMVN) -> Tensor:
    if not _is_diagonal_normal(p):
        # Pyro's rule for (Independent, MultivariateNormal), which this pair shadows: a Delta base, or
        # NotImplementedError.
        return _kl_independent_mvn(p, q)
    return _kl(p, q)
