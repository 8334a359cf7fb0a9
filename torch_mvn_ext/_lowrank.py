r"""The low-rank Gaussian: covariance :math:`\Sigma = W W^\top + \operatorname{diag}(D)`, never formed.

:class:`LowRankGaussian` is the structure of :class:`~torch_mvn_ext.JacobianLowRankMVN`: ``loc``, the factor
:math:`W` (``cov_factor``, ``B + (d, k)``), the diagonal :math:`D` (``cov_diag``, ``B + (d,)``) and the Cholesky
factor :math:`C` of the capacitance :math:`I_k + W^\top D^{-1} W`, as torch's ``LowRankMultivariateNormal`` holds
them. With :math:`r = x - \mu`, :math:`y = D^{-1} r`, :math:`t = W^\top y`, :math:`K = (C C^\top)^{-1}` (a
:math:`k \times k` matrix from the factor, :math:`\|K\| \le 1` as :math:`C C^\top \succeq I`; its condition
number is that of :math:`C C^\top`, up to :math:`1 + \|W\|^2 / \min D`) and :math:`s = K t`,
Woodbury's identity gives

.. math::

    \alpha = \Sigma^{-1} r = y - D^{-1} W s, \qquad r^\top \Sigma^{-1} r = r^\top y - t^\top s,
    \qquad W^\top \alpha = s,

(the last from :math:`W^\top D^{-1} W = C C^\top - I`), so that the rows cost three GEMMs with :math:`W` or
:math:`K`, :math:`O(dk)` a point, and a batch member :math:`O(dk^2)`; a triangular solve with many right-hand sides
is several times slower than a GEMM of the same size on CPUs, so none is taken per point. The derivatives, each a
:class:`~torch_mvn_ext._gaussian.Term`:

* ``"cov_factor"``: :math:`\alpha (\alpha^\top W) - \Sigma^{-1} W = \alpha s^\top - D^{-1} W K`;
* ``"cov_diag"``: :math:`\frac12 (\alpha \odot \alpha - \operatorname{diag}\Sigma^{-1})`, with
  :math:`\operatorname{diag}\Sigma^{-1} = D^{-1} - \operatorname{rowsums}\big((D^{-1} W K) \odot (D^{-1} W)\big)`.

:class:`LogProb` is the log-density as a :class:`torch.autograd.Function` whose backward is this closed form
(differentiable again, for double backward and ``torch.func``).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor

from ._checks import _transforms_active
from ._factor import CholeskyFactor
from ._gaussian import DIAGONAL, GENERAL, GaussianState, Rows, Term, cached
from ._shapes import broadcast_shapes, sum_to
from ._sums import centered_outer_sum

_LOG_2PI = math.log(2 * math.pi)


def capacitance_tril(cov_factor: Tensor, cov_diag: Tensor) -> Tensor:
    r"""The Cholesky factor of :math:`I + W^\top D^{-1} W` (torch's ``_batch_capacitance_tril``, out of place)."""
    k = cov_factor.shape[-1]
    gram = (cov_factor.mT / cov_diag.unsqueeze(-2)) @ cov_factor
    return torch.linalg.cholesky(gram + torch.eye(k, dtype=gram.dtype, device=gram.device))


def inverse_capacitance(capacitance: Tensor) -> Tensor:
    r""":math:`K = (C C^\top)^{-1}` from the capacitance's Cholesky factor (by the routes of
    :meth:`~torch_mvn_ext._factor.CholeskyFactor.precision_matrix`, whose derivative rules hold in both modes)."""
    return CholeskyFactor(capacitance).precision_matrix()


class LowRankRows(Rows):
    """Residuals laid out against the structure's batch, with ``y``, ``t``, ``s`` and ``alpha`` computed once, ``s``
    and ``alpha`` on first use. Built from differentiable operations only."""

    def __init__(
        self,
        r: Tensor,
        cov_factor: Tensor,
        cov_diag: Tensor,
        capacitance: Tensor,
        inverse: Tensor | None = None,
        s: Tensor | None = None,
    ) -> None:
        self.batch_shape = broadcast_shapes(cov_factor.shape[:-2], cov_diag.shape[:-1])  # the structure's
        super().__init__(r, self.batch_shape)
        self.cov_factor = self.flat(cov_factor)
        self.cov_diag = self.flat(cov_diag, 1)
        self.capacitance = self.flat(capacitance)
        self.inverse = self.flat(inverse_capacitance(capacitance) if inverse is None else inverse)
        self.y = self.r / self.cov_diag.unsqueeze(-2)
        self._t: Tensor | None = None
        self._s = s
        self._alpha: Tensor | None = None

    @property
    def t(self) -> Tensor:
        r""":math:`t = W^\top D^{-1} r`."""
        if self._t is None:
            self._t = self.y @ self.cov_factor
        return self._t

    @property
    def s(self) -> Tensor:
        r""":math:`s = K t = W^\top \alpha` (``K`` symmetric: its row-major view, whichever layout it has)."""
        if self._s is None:
            inverse = self.inverse
            self._s = self.t @ (inverse.mT if inverse.mT.is_contiguous() else inverse)
        return self._s

    @property
    def alpha(self) -> Tensor:
        if self._alpha is None:
            self._alpha = torch.addcdiv(self.y, self.s @ self.cov_factor.mT, self.cov_diag.unsqueeze(-2), value=-1)
        return self._alpha

    @property
    def log_prob(self) -> Tensor:
        maha = torch.linalg.vecdot(self.r, self.y) - torch.linalg.vecdot(self.t, self.s)
        half_log_det = _half_log_det(self.capacitance, self.cov_diag)
        if self.grouping is not None:
            half_log_det = half_log_det.unsqueeze(-1)
        return self.full_scalar(torch.add(-half_log_det - 0.5 * self.r.shape[-1] * _LOG_2PI, maha, alpha=-0.5))


def _half_log_det(capacitance: Tensor, cov_diag: Tensor) -> Tensor:
    r""":math:`\frac12 \log\det\Sigma` by the matrix determinant lemma: :math:`\log\det C C^\top + \log\det D`."""
    return CholeskyFactor(capacitance).half_log_det() + 0.5 * cov_diag.log().sum(-1)


def _precision_times_factor(cov_factor: Tensor, cov_diag: Tensor, inverse: Tensor) -> Tensor:
    r""":math:`\Sigma^{-1} W = D^{-1} W K`, shape ``B + (d, k)``: one GEMM, :math:`O(dk^2)`."""
    return (cov_factor / cov_diag.unsqueeze(-1)) @ inverse


def _precision_diagonal(cov_factor: Tensor, cov_diag: Tensor, inverse: Tensor) -> Tensor:
    r""":math:`\operatorname{diag}\Sigma^{-1} = D^{-1} - \operatorname{rowsums}((D^{-1} W K) \odot (D^{-1} W))`."""
    scaled = cov_factor / cov_diag.unsqueeze(-1)
    return cov_diag.reciprocal() - ((scaled @ inverse) * scaled).sum(-1)


class LowRankGaussian(GaussianState):
    r"""``loc``, ``cov_factor`` :math:`W`, ``cov_diag`` :math:`D` (unbroadcast, as the user passed them) and the
    capacitance's Cholesky factor, of their broadcast batch shape."""

    coordinates: tuple[str, ...] = ("cov_factor", "cov_diag")

    def __init__(self, loc: Tensor, cov_factor: Tensor, cov_diag: Tensor, capacitance: Tensor) -> None:
        self.loc = loc
        self.cov_factor = cov_factor
        self.cov_diag = cov_diag
        self.capacitance = capacitance
        self._versions = (cov_factor._version, cov_diag._version)

    @classmethod
    def of_distribution(cls, lowrank: Any) -> LowRankGaussian:
        """The structure of a torch or Pyro ``LowRankMultivariateNormal``, its capacitance factor reused."""
        state = getattr(lowrank, "_state", None)
        if isinstance(state, LowRankGaussian):
            return state
        return cls(
            lowrank.loc, lowrank._unbroadcasted_cov_factor, lowrank._unbroadcasted_cov_diag, lowrank._capacitance_tril
        )

    @property
    def batch_shape(self) -> torch.Size:
        return self.capacitance.shape[:-2]

    def inputs(self) -> dict[str, Tensor]:
        return {"loc": self.loc, "cov_factor": self.cov_factor, "cov_diag": self.cov_diag}

    # Each computed once, with its graph even when first asked for under torch.no_grad() (see cached).

    @cached
    def inverse(self) -> Tensor:
        r""":math:`K = (C C^\top)^{-1}`."""
        return inverse_capacitance(self.capacitance)

    @cached
    def sigma_inverse_factor(self) -> Tensor:
        r""":math:`\Sigma^{-1} W`."""
        return _precision_times_factor(self.cov_factor, self.cov_diag, self.inverse)

    @cached
    def sigma_inverse_diagonal(self) -> Tensor:
        r"""The diagonal of :math:`\Sigma^{-1}`."""
        return _precision_diagonal(self.cov_factor, self.cov_diag, self.inverse)

    def check_unchanged(self) -> None:
        """A ``ValueError`` where ``cov_factor`` or ``cov_diag`` changed in place since construction: the capacitance
        computed then would no longer match them (torch's class fails at the backward, or silently without one)."""
        if torch.compiler.is_compiling() or _transforms_active():
            return
        if (self.cov_factor._version, self.cov_diag._version) != self._versions:
            raise ValueError(
                "cov_factor or cov_diag was modified in place after the JacobianLowRankMVN was built, so its "
                "capacitance factor no longer matches them: build a new distribution after each update"
            )

    def rows(self, r: Tensor) -> LowRankRows:
        self.check_unchanged()
        return LowRankRows(r, self.cov_factor, self.cov_diag, self.capacitance, self.inverse)

    def log_prob(self, r: Tensor) -> Tensor:
        self.check_unchanged()
        if (
            torch.is_grad_enabled()
            and (r.requires_grad or self.cov_factor.requires_grad or self.cov_diag.requires_grad)
            and not torch.compiler.is_compiling()
        ):
            return LogProb.apply(r, self.cov_factor, self.cov_diag, self.capacitance.detach())[0]
        # Under torch.compile, plain differentiable operations (a compiled Function's backward records no graph).
        return self.rows(r).log_prob

    def term(self, rows: Rows, name: str) -> Term:
        rows = cast(LowRankRows, rows)  # the rows of this structure
        if name == "cov_factor":
            return Term(rows.alpha, rows.s, self.sigma_inverse_factor, 1.0, GENERAL)
        return Term(rows.alpha, rows.alpha, self.sigma_inverse_diagonal, 0.5, DIAGONAL)

    def term_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.cov_factor.shape[-2:]) if name == "cov_factor" else (self.size,)

    def summed_shape(self, name: str, batch_shape: torch.Size) -> torch.Size:
        return self.cov_factor.shape[:-2] if name == "cov_factor" else self.cov_diag.shape[:-1]

    # KL divergences (kl.py): Sigma = R^T R + diag(v) with R = W^T, v = D.

    def half_log_det(self) -> Tensor:
        return _half_log_det(self.capacitance, self.cov_diag)

    def quad(self, x: Tensor) -> Tensor:
        r"""Woodbury: :math:`\sum_i x_i^\top y_i - t_i^\top K t_i` with :math:`y_i = D^{-1} x_i`,
        :math:`t_i = W^\top y_i`."""
        y = x / self.cov_diag.unsqueeze(-2)
        t = y @ self.cov_factor
        return (x * y).sum((-2, -1)) - (t * (t @ self.inverse)).sum((-2, -1))

    def kl_rows(self) -> Tensor:
        return self.cov_factor.mT

    def kl_diagonal(self) -> Tensor:
        return self.cov_diag

    def precision_diagonal(self) -> Tensor:
        return self.sigma_inverse_diagonal


class LogProb(torch.autograd.Function):
    r"""The log-density of the residuals ``r`` under :math:`W W^\top + \operatorname{diag}(D)`, with the closed-form
    backward: for upstream weights :math:`g_s`,

    .. math::

        \bar r = -g\,\alpha, \qquad \bar W = \sum_s g_s \alpha_s s_s^\top - \Big(\sum_s g_s\Big) \Sigma^{-1} W,
        \qquad \bar D = \tfrac12 \sum_s g_s \big(\alpha_s^{\odot 2} - \operatorname{diag}\Sigma^{-1}\big),

    summed into the shapes of ``W`` and ``D`` as given. ``capacitance`` (detached) serves the first-order backward;
    a backward that will itself be differentiated recomputes it from ``W`` and ``D``, and forward-mode AD takes the
    inverse :math:`K` by a triangular inverse (see :func:`inverse_capacitance`).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(r: Tensor, cov_factor: Tensor, cov_diag: Tensor, capacitance: Tensor) -> Any:
        rows = LowRankRows(r, cov_factor, cov_diag, capacitance)
        return rows.log_prob, rows.s

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs, output[1])
        ctx.save_for_forward(*inputs, output[1])  # as for backward: the generated vmap rule keeps one list of both

    @staticmethod
    def jvp(ctx: Any, t_r: Tensor | None, t_factor: Tensor | None, t_diag: Tensor | None, _t_c: Any) -> Any:
        r, cov_factor, cov_diag, capacitance, _s = ctx.saved_tensors
        inverse = inverse_capacitance(capacitance)
        rows = LowRankRows(r, cov_factor, cov_diag, capacitance, inverse)
        out = torch.zeros(rows.r.shape[:-1], dtype=r.dtype, device=r.device)
        if t_r is not None:
            out = out - (rows.alpha * rows.group(t_r)).sum(-1)
        if t_factor is not None:
            tangent = rows.flat(t_factor.expand(rows.batch_shape + cov_factor.shape[-2:]))
            constant = rows.flat(_precision_times_factor(cov_factor, cov_diag, inverse))
            out = out + (rows.alpha * (rows.s @ tangent.mT)).sum(-1) - (constant * tangent).sum((-2, -1)).unsqueeze(-1)
        if t_diag is not None:
            tangent = rows.flat(t_diag.expand(rows.batch_shape + cov_diag.shape[-1:]), 1)
            diagonal = rows.flat(_precision_diagonal(cov_factor, cov_diag, inverse), 1)
            out = out + 0.5 * ((rows.alpha.pow(2) * tangent.unsqueeze(-2)).sum(-1) - (diagonal * tangent).sum(-1, True))
        return rows.full_scalar(out), None

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, _grad_s: Tensor | None) -> Any:
        if grad is None:
            return None, None, None, None
        r, cov_factor, cov_diag, capacitance, s = ctx.saved_tensors
        if torch.is_grad_enabled() or _transforms_active():
            # Differentiable, for double backward: the capacitance and s again from W and D.
            capacitance, s = capacitance_tril(cov_factor, cov_diag), None
        inverse = inverse_capacitance(capacitance)
        rows = LowRankRows(r, cov_factor, cov_diag, capacitance, inverse, s)
        weights = rows.group(grad.unsqueeze(-1))
        weighted_alpha = weights * rows.alpha
        needs_r, needs_factor, needs_diag = ctx.needs_input_grad[:3]
        grad_r = rows.full(weighted_alpha).neg() if needs_r else None
        grad_factor = grad_diag = None
        if needs_factor:
            constant = rows.flat(_precision_times_factor(cov_factor, cov_diag, inverse))
            # transposed, its short side first (see _derivatives.summed_term)
            summed = centered_outer_sum(rows.s, weighted_alpha, constant.mT, weights, scale=-1.0).mT
            grad_factor = sum_to(rows.unflat(summed), cov_factor.shape)
        if needs_diag:
            diagonal = rows.flat(_precision_diagonal(cov_factor, cov_diag, inverse), 1)
            summed = 0.5 * torch.addcmul(weighted_alpha * rows.alpha, weights, diagonal.unsqueeze(-2), value=-1).sum(-2)
            if rows.grouping is not None:
                summed = summed.reshape(rows.grouping.batch_shape + summed.shape[-1:])
            grad_diag = sum_to(summed, cov_diag.shape)
        return grad_r, grad_factor, grad_diag, None
