r"""The floor of the one-matrix cases: each case's result written by hand, without validation.

The speed cases also time **the floor**: the plain closed form a careful user writes by hand in a few lines,
with no validation — ``torch.linalg.cholesky`` of the matrix (part of the work at every call, as the
library factorizes at every call), two ``solve_triangular`` on the transposed row-major residuals
(``solve_triangular(L, R.mT)``), a few reductions, ``cholesky_inverse`` and one ``addmm``/``addcmul`` for
matrix derivatives. With :math:`r = x - \mu`, :math:`\Sigma = L L^T`, :math:`z = L^{-1} r`,
:math:`\alpha = \Sigma^{-1} r`: :math:`\log p = -\tfrac12 |z|^2 - \sum_i \log L_{ii} - \tfrac d2 \log 2\pi`,
:math:`\partial_x = -\alpha`, :math:`\partial_\mu = \alpha`,
:math:`\partial_\Sigma = \tfrac12 (\alpha\alpha^T - \Sigma^{-1})`,
:math:`\partial_L = \operatorname{tril}(\alpha z^T) - \operatorname{diag}(1 / L_{ii})`; for a precision
:math:`P = T^T T` (``T`` lower, from the Cholesky factor of the flipped ``P``), :math:`z = T r`. The floor is
timed in the same rounds, checked against ours before timing, and reported as ``library / floor`` (a time
ratio: > 1 means the library is slower than the hand-written floor).

Each floor computes its result from the same inputs at every call. ``r`` is N x d (row-major), so the solves run on
``r.mT`` (column-major, what LAPACK takes without a copy) and return ``z^T`` and ``alpha^T`` as d x N.
"""

import math

import torch

LOG_2PI = math.log(2 * math.pi)


def _solves(loc, tril, x):
    """``z^T = L^{-1} r^T`` and ``alpha^T = L^{-T} z^T``, both d x N."""
    zt = torch.linalg.solve_triangular(tril, (x - loc).mT, upper=False)
    at = torch.linalg.solve_triangular(tril.mT, zt, upper=True)
    return zt, at


def _log_prob(zt, tril):
    return -0.5 * zt.square().sum(0) - tril.diagonal().log().sum() - 0.5 * tril.shape[-1] * LOG_2PI


def _grad_cov(at, tril):
    """``sum_i 0.5 (alpha_i alpha_i^T - Sigma^{-1})`` over the N points."""
    return torch.addmm(torch.cholesky_inverse(tril), at, at.mT, beta=-0.5 * at.shape[-1], alpha=0.5)


def _grad_tril(at, zt, tril):
    """``sum_i tril(alpha_i z_i^T) - N diag(1 / L_ii)`` over the N points."""
    grad = (at @ zt.mT).tril_()
    grad.diagonal().sub_(tril.diagonal().reciprocal(), alpha=at.shape[-1])
    return grad


def lpg(loc, cov, x):
    tril = torch.linalg.cholesky(cov)
    zt, at = _solves(loc, tril, x)
    grads = {"value": -at.mT, "loc": at.sum(-1), "covariance_matrix": _grad_cov(at, tril)}
    return _log_prob(zt, tril), grads


def jac_loc(loc, tril, x):
    return _solves(loc, tril, x)[1].mT


def jac_scale_tril(loc, tril, x):
    zt, at = _solves(loc, tril, x)
    jac = (at.mT.unsqueeze(-1) * zt.mT.unsqueeze(-2)).tril_()
    jac.diagonal(dim1=-2, dim2=-1).sub_(tril.diagonal().reciprocal())
    return jac


def jac_cov(loc, cov, x):
    tril = torch.linalg.cholesky(cov)
    alpha = _solves(loc, tril, x)[1].mT
    sigma_inv = torch.cholesky_inverse(tril)
    return torch.addcmul(sigma_inv.mul(-0.5), alpha.unsqueeze(-1), alpha.unsqueeze(-2), value=0.5)


def precision(loc, prec, x):
    # P = T^T T with T lower: the Cholesky factor of P with rows and columns reversed, reversed back and transposed.
    t = torch.linalg.cholesky(prec.flip(-2, -1)).flip(-2, -1).mT
    z = (x - loc) @ t.mT
    return -0.5 * z.square().sum(-1) + t.diagonal().log().sum() - 0.5 * t.shape[-1] * LOG_2PI


def autograd(loc, cov, x):
    tril = torch.linalg.cholesky(cov)
    zt, at = _solves(loc, tril, x)
    return _log_prob(zt, tril), {"loc": at.sum(-1), "covariance_matrix": _grad_cov(at, tril)}


def autograd_tril(loc, tril, x):
    zt, at = _solves(loc, tril, x)
    return _log_prob(zt, tril), {"loc": at.sum(-1), "scale_tril": _grad_tril(at, zt, tril)}
