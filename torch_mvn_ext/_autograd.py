r"""The triangular factor's rows and ``log_prob`` as a :class:`torch.autograd.Function` whose backward is the
closed form.

The function takes the residual :math:`r = x - \mu` (formed by ordinary autograd, so that ``value`` and ``loc``
may change in place before the backward, as with torch's MVN, which saves the same) and the triangular factor.
With :math:`z = L^{-1} r`, :math:`\alpha = \Sigma^{-1} r` and upstream weights :math:`g_s`:

.. math::

    \bar r = -g\,\alpha, \qquad
    \bar L = \operatorname{tril}\Big(\sum_s g_s \alpha_s z_s^\top\Big) - \Big(\sum_s g_s\Big)\operatorname{diag}(1/L_{ii}),

and for a precision factor :math:`T = L^{-1}` (:math:`P = T^\top T`),
:math:`\bar T = -\operatorname{tril}\big(\sum_s g_s z_s r_s^\top\big) + \big(\sum_s g_s\big)\operatorname{diag}(1/T_{ii})`
(:meth:`~torch_mvn_ext._factor.TriangularFactor.gradient`). For the covariance parametrization the gradient goes to
:math:`\Sigma` itself, :math:`\bar\Sigma = \frac12\big(\sum_s g_s \alpha_s \alpha_s^\top - (\sum_s g_s)\,\Sigma^{-1}\big)`
(symmetric, as torch's autograd through the Cholesky factorization gives it), and skips the backward of the
Cholesky factorization. The sums over samples sharing a factor are GEMMs, centered by the constant term
(:func:`~torch_mvn_ext._sums.centered_outer_sum`). The backward is written with
differentiable operations, so double backward works; ``jvp`` and the generated vmap rule make ``torch.func``
transforms work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._checks import _transforms_active
from ._factor import KINDS, TriangularFactor
from ._gaussian import Rows
from ._sums import centered_outer_sum


class TriangularRows(Rows):
    r"""Residuals laid out against a triangular factor (:class:`~torch_mvn_ext._gaussian.Rows`), with ``z`` and
    ``alpha`` computed once and shared. Built from differentiable operations only, so it also serves double backward.

    ``sigma_inverse``: for a computed Cholesky factor (the covariance parametrization), a function giving
    :math:`\Sigma^{-1}` (cached by the caller), which :attr:`alpha` may use instead of the second solve.
    """

    def __init__(
        self,
        r: Tensor,
        factor: TriangularFactor,
        sigma_inverse: Callable[[], Tensor] | None = None,
        z: Tensor | None = None,
    ) -> None:
        super().__init__(r, factor.batch_shape)
        self.factor = factor if self.grouping is None else factor.flat(self.grouping)
        self._z = z
        self._alpha: Tensor | None = None
        self._gemm_alpha = sigma_inverse is not None
        self._sigma_inverse_fn = sigma_inverse if sigma_inverse is not None else factor.precision_matrix
        self._sigma_inverse: Tensor | None = None

    @property
    def z(self) -> Tensor:
        r""":math:`z = L^{-1} r`, on first use (the Jacobians w.r.t. ``value`` and ``loc`` need only :math:`\alpha`)."""
        if self._z is None:
            self._z = self.factor.whiten(self.r)
        return self._z

    @property
    def alpha(self) -> Tensor:
        r""":math:`\alpha = \Sigma^{-1} r`. For a computed Cholesky factor (``sigma_inverse`` given) with
        ``32 <= d < 128`` and at least ``d`` samples per factor member, one GEMM with :math:`\Sigma^{-1}` (which the
        covariance gradient needs anyway) replaces the second triangular solve, as accurately
        (``benchmarks/accuracy.py``): measured with torch 2.13's CPU build (MKL, 1 thread), 2x faster at d = 32,
        1.0-1.5x at d = 64, even at d = 128, and 1.1-1.5x slower at d = 256. Below d = 32 one solve costs less than
        the inverse."""
        if self._alpha is None:
            d = self.r.shape[-1]
            if self._gemm_alpha and 32 <= d < 128 and self.c >= d:
                self._alpha = self.r @ self.flat(self.sigma_inverse())
            else:
                self._alpha = self.factor.alpha(self.z, self.r)
        return self._alpha

    def sigma_inverse(self) -> Tensor:
        r""":math:`\Sigma^{-1}` in the factor's batch shape, computed once (by ``sigma_inverse`` where given)."""
        if self._sigma_inverse is None:
            self._sigma_inverse = self._sigma_inverse_fn()
        return self._sigma_inverse

    @property
    def log_prob(self) -> Tensor:
        z = self.z
        log_norm = self.factor.log_norm()
        if self.grouping is not None:
            log_norm = log_norm.unsqueeze(-1)
        lp = torch.add(log_norm, torch.linalg.vecdot(z, z), alpha=-0.5)
        return self.full_scalar(lp)


def _covariance_gradient(res: TriangularRows, weights: Tensor, weighted_alpha: Tensor) -> Tensor:
    r""":math:`\frac12\sum_s g_s (\alpha_s \alpha_s^\top - \Sigma^{-1})` for each factor member, summed by
    :func:`~torch_mvn_ext._sums.centered_outer_sum` (near the optimum the two terms nearly cancel), symmetrized (the
    GEMM's two triangles round differently)."""
    sigma_inverse = res.flat(res.sigma_inverse())
    centered = centered_outer_sum(
        weighted_alpha, res.alpha, sigma_inverse, weights, scale=-0.25, outer_sum=res.factor.outer_sum
    )
    return res.unflat(centered + centered.mT)


def _residual(r: Tensor, factor: TriangularFactor, from_covariance: bool, z: Tensor | None = None) -> TriangularRows:
    r"""For the covariance parametrization (``from_covariance``), :math:`\alpha` may come from a GEMM with
    :math:`\Sigma^{-1}` (see :attr:`TriangularRows.alpha`), which the covariance gradient needs too."""
    return TriangularRows(r, factor, sigma_inverse=factor.precision_matrix if from_covariance else None, z=z)


class LogProb(torch.autograd.Function):
    """``log_prob`` of the residual ``r`` under the triangular factor ``tensor`` of kind ``kind`` (a key of
    :data:`~torch_mvn_ext._factor.KINDS`).

    ``covariance``: for the covariance parametrization, the matrix ``tensor`` was computed from. A first-order
    backward returns its gradient directly and none for ``tensor`` (whose dependence on it the formula accounts for),
    which skips the Cholesky backward (measured: forward + backward 1.03-1.1x faster at d = 64, 1.2x at d = 8 with
    one point). A backward that will itself be differentiated (``create_graph=True``, ``torch.func``) returns the
    ``tensor`` gradient instead, so that higher derivatives go through torch's Cholesky rules exactly as for torch's
    :class:`~torch.distributions.MultivariateNormal`, whose forward-mode rule also treats tangents that are not
    symmetric its own way. Forward-mode AD always goes through ``tensor``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(r: Tensor, tensor: Tensor, covariance: Tensor | None, kind: str) -> Any:
        res = TriangularRows(r, KINDS[kind](tensor))
        return res.log_prob, res.z

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        r, tensor, covariance, kind = inputs
        ctx.kind = kind
        # Whether the covariance is an input, not the tensor itself: the backward needs only the factor, so that,
        # as with torch's MVN, the covariance may change in place (an optimizer step) before the backward runs.
        ctx.from_covariance = covariance is not None
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(r, tensor, output[1])
        ctx.save_for_forward(r, tensor, output[1])

    @staticmethod
    def jvp(ctx: Any, t_r: Tensor | None, t_tensor: Tensor | None, _t_covariance: Any, _kind: Any) -> Any:
        r, tensor, z = ctx.saved_tensors
        res = _residual(r, KINDS[ctx.kind](tensor), ctx.from_covariance, z=z)
        out = torch.zeros(res.r.shape[:-1], dtype=z.dtype, device=z.device)
        if t_r is not None:
            out = out - (res.alpha * res.group(t_r)).sum(-1)
        if t_tensor is not None:
            out = out + res.factor.jvp(torch.tril(res.flat(t_tensor)), res.alpha, res.z, res.r)
        return res.full_scalar(out), None

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, _grad_z: Tensor | None) -> Any:
        if grad is None:
            return None, None, None, None
        r, tensor, z = ctx.saved_tensors
        differentiable = torch.is_grad_enabled()
        # create_graph=True (double backward): z is rebuilt differentiably from r.
        res = _residual(r, KINDS[ctx.kind](tensor), ctx.from_covariance, z=None if differentiable else z)
        weights = res.group(grad.unsqueeze(-1))
        needs_r, needs_tensor, needs_covariance = ctx.needs_input_grad[:3]
        grad_r = grad_tensor = grad_covariance = None
        # A precision factor's own gradient needs no alpha: it is formed only where something reads it.
        weighted_alpha = weights * res.alpha if needs_r or not res.factor.is_precision else None
        if needs_r and weighted_alpha is not None:
            grad_r = res.full(weighted_alpha).neg()
        if ctx.from_covariance and not (differentiable or _transforms_active()):
            if needs_covariance and weighted_alpha is not None:
                grad_covariance = _covariance_gradient(res, weights, weighted_alpha)
        elif needs_tensor:
            # Through the factor and torch's Cholesky backward: a first-order gradient that torch.func and double
            # backward differentiate again exactly as they differentiate torch's MultivariateNormal.
            factor = res.factor
            u, v = factor.gradient_terms(weights, weighted_alpha, res.z, res.r)
            grad_tensor = res.unflat(factor.gradient(u, v, weights))
        return grad_r, grad_tensor, grad_covariance, None

    @classmethod
    def apply(cls, *args: Any) -> Any:
        # Function.apply first binds the arguments to forward's signature with inspect (tens of microseconds a
        # call, which count when log_prob scores a few points in every HMC step); forward's arguments are all
        # positional without defaults, so that binding is the identity, and the eager path goes straight to the
        # C++ apply, as Function.apply itself does after binding. Calls under torch.func transforms keep
        # Function.apply (compiled code never gets here: log_prob is plain operations there).
        if _transforms_active() or _unwrap_dead_wrappers is None:
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*_unwrap_dead_wrappers(args))  # type: ignore[misc]


try:  # private (torch >= 2.0): what Function.apply runs on its arguments before the C++ apply
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers
except ImportError:  # another torch layout: keep Function.apply
    _unwrap_dead_wrappers = None  # type: ignore[assignment]


def log_prob(r: Tensor, factor: TriangularFactor, covariance: Tensor | None = None) -> Tensor:
    r"""``log_prob`` of the residual ``r`` with the closed-form backward when a gradient can be asked for, plain
    otherwise and under ``torch.compile``.

    ``covariance``: the covariance matrix ``factor`` is the Cholesky factor of, for the covariance parametrization.
    The backward then returns its gradient directly, and may form :math:`\alpha` with :math:`\Sigma^{-1}`, which is
    as accurate as two triangular solves with a computed factor. A ``scale_tril`` given exactly is solved with, which
    is more accurate in float32 (``benchmarks/accuracy.py``). It receives a gradient only where ``factor`` was
    computed from it with autograd recording, as torch's MVN gives it one (not after a ``torch.no_grad()`` build),
    and gets none directly when its batch shape is not the factor's.
    """
    if torch.is_grad_enabled() and (r.requires_grad or factor.requires_grad) and not torch.compiler.is_compiling():
        tensor = factor.tensor
        if covariance is not None and (covariance.shape != tensor.shape or not tensor.requires_grad):
            # A covariance broadcast beyond its factor (from_distribution) takes its gradient through the factor.
            covariance = None
        return LogProb.apply(r, tensor, covariance, factor.kind)[0]
    # Under torch.compile, plain differentiable operations: compiled, the function's backward would come back without
    # a graph under create_graph=True (torch 2.13, every backend), so a second derivative would silently be zero.
    return TriangularRows(r, factor).log_prob
