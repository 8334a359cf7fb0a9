r"""The triangular factor every method of :class:`~torch_mvn_ext.JacobianMVN` computes with.

A Gaussian is held through one lower-triangular matrix, of one of two kinds with one interface:

* :class:`CholeskyFactor` ``L`` with :math:`\Sigma = L L^\top` (``covariance_matrix`` and ``scale_tril``
  parametrizations);
* :class:`PrecisionFactor` ``T = L^{-1}`` with :math:`P = T^\top T`, found from a Cholesky factorization of the
  precision with its rows and columns reversed, so that no inverse is ever formed.

Both whiten to the same :math:`z = L^{-1} r`, so every formula elsewhere is written once in terms of :math:`z` and
:math:`\alpha = \Sigma^{-1} r = L^{-\top} z`; only the operations below know which matrix is held. Each takes
row vectors ``x`` of shape ``(..., c, d)`` whose batch broadcasts with the factor's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import _transforms_active, differentiated
from ._shapes import Grouping
from ._sums import centered_outer_sum

_LOG_2PI = math.log(2 * math.pi)


class NotPositiveDefiniteError(torch.linalg.LinAlgError, ValueError):
    """A ``covariance_matrix`` or ``precision_matrix`` is not positive definite: its Cholesky factorization failed.

    Raised by the :class:`JacobianMVN` constructor, with or without ``validate_args`` (and by
    :meth:`~JacobianMVN.marginal` and :meth:`~JacobianMVN.condition`, which factorize blocks of the matrix, where
    rounding leaves a block of a barely positive-definite matrix without a factorization); the message names the
    argument. It is a ``ValueError``, as every bad argument is, and the ``torch.linalg.LinAlgError`` that torch's
    ``MultivariateNormal`` raises unvalidated, so code that retries a factorization with jitter on
    ``except torch.linalg.LinAlgError`` catches it as before.
    """

    __module__ = "torch_mvn_ext"  # exported there (tracebacks and the reference show the public name)


def cholesky(matrix: Tensor, name: str) -> Tensor:
    r"""Lower Cholesky factor of ``matrix``, with an error that names the argument if it is not positive definite."""
    try:
        return torch.linalg.cholesky(matrix)
    except RuntimeError as e:  # torch.linalg.LinAlgError is a RuntimeError
        if "positive-definite" not in str(e):
            raise
        raise NotPositiveDefiniteError(
            f"{name} is not positive definite (its Cholesky factorization failed: {e}). "
            f"Check that it is symmetric with strictly positive eigenvalues."
        ) from e


class TriangularFactor:
    """A lower-triangular ``tensor`` of shape ``B + (d, d)`` and the operations with it (see the module docstring)."""

    is_precision = False
    kind = ""  # its key in KINDS

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor

    @property
    def batch_shape(self) -> torch.Size:
        return self.tensor.shape[:-2]

    @property
    def requires_grad(self) -> bool:
        return self.tensor.requires_grad

    @property
    def size(self) -> int:
        """The event size ``d``."""
        return self.tensor.shape[-1]

    def like(self, tensor: Tensor) -> TriangularFactor:
        """A factor of the same kind holding ``tensor``."""
        return KINDS[self.kind](tensor)

    def flat(self, grouping: Grouping) -> TriangularFactor:
        """The same factor laid out as ``(b, d, d)`` for ``grouping`` (see :class:`~torch_mvn_ext._shapes.Grouping`)."""
        return self.like(grouping.flat_matrix(self.tensor))

    def diagonal(self) -> Tensor:
        return self.tensor.diagonal(dim1=-2, dim2=-1)

    def log_norm(self) -> Tensor:
        r""":math:`-\frac d2 \log 2\pi - \frac12\log\det\Sigma`, the log-density at the mean."""
        return torch.rsub(self.half_log_det(), -0.5 * self.size * _LOG_2PI)  # torch.rsub: no Python __rsub__

    def entropy(self) -> Tensor:
        return 0.5 * self.size * (1.0 + _LOG_2PI) + self.half_log_det()

    def half_log_det(self) -> Tensor:
        r""":math:`\frac12 \log\det\Sigma`, shape ``B``."""
        raise NotImplementedError

    def whiten(self, x: Tensor) -> Tensor:
        r""":math:`z = L^{-1} x`."""
        raise NotImplementedError

    def alpha(self, z: Tensor, r: Tensor | None = None) -> Tensor:
        r""":math:`L^{-\top} z`, so :math:`\alpha = \Sigma^{-1} r` from :math:`z = L^{-1} r` (``r``, where given, for
        the infinite entries it may have)."""
        raise NotImplementedError

    def color(self, eps: Tensor) -> Tensor:
        r""":math:`L \epsilon`: white noise to a sample offset."""
        raise NotImplementedError

    def sigma_matvec(self, x: Tensor) -> Tensor:
        r""":math:`\Sigma x`."""
        raise NotImplementedError

    def inv_scale_diag(self) -> Tensor:
        r"""The diagonal of :math:`L^{-1}`, i.e. :math:`1 / L_{ii}`, shape ``B + (d,)``."""
        raise NotImplementedError

    def scale_tril(self) -> Tensor:
        r""":math:`L`."""
        raise NotImplementedError

    def precision_matrix(self) -> Tensor:
        r""":math:`\Sigma^{-1}`."""
        raise NotImplementedError

    def covariance_matrix(self) -> Tensor:
        r""":math:`\Sigma = L L^\top`."""
        L = self.scale_tril()
        return L @ L.mT

    def variance(self) -> Tensor:
        r"""The diagonal of :math:`\Sigma`: the squared row norms of :math:`L`, shape ``B + (d,)``."""
        return self.scale_tril().pow(2).sum(-1)

    def precision_diagonal(self) -> Tensor:
        r"""The diagonal of :math:`\Sigma^{-1}`, shape ``B + (d,)``."""
        raise NotImplementedError

    def gradient(self, u: Tensor, v: Tensor, weights: Tensor) -> Tensor:
        r"""The gradient of :math:`\sum_s g_s \log p(x_s)` w.r.t. ``tensor``, from the per-sample rows ``(u, v)`` of
        :meth:`gradient_terms` and the weights :math:`g_s` (shape ``(..., c, 1)``, in the layout of ``u``), summed by
        :func:`~torch_mvn_ext._sums.centered_outer_sum` with
        :math:`K = \operatorname{diag}(1 / \text{the diagonal of tensor})`: below the diagonal, where the gradient
        lives, that is the mean of the outer products :math:`u v^\top` under the distribution
        (:math:`E[\alpha z^\top] = L^{-\top}` and :math:`E[z r^\top] = T^{-\top}`, upper-triangular)."""
        raise NotImplementedError

    def gradient_terms(
        self, weights: Tensor, weighted_alpha: Tensor | None, z: Tensor, r: Tensor
    ) -> tuple[Tensor, Tensor]:
        r"""The per-sample row vectors ``(u, v)`` whose outer products :meth:`gradient` sums, ``u`` weighted by
        :math:`g_s` (``weighted_alpha`` is :math:`g_s \alpha_s`, for a :class:`CholeskyFactor`)."""
        raise NotImplementedError

    def jvp(self, tangent: Tensor, alpha: Tensor, z: Tensor, r: Tensor) -> Tensor:
        r"""The directional derivative of :math:`\log p` along ``tangent`` of ``tensor``, one per sample."""
        raise NotImplementedError

    def _trace_over_diagonal(self, tangent: Tensor) -> Tensor:
        return (tangent.diagonal(dim1=-2, dim2=-1) / self.diagonal()).sum(-1).unsqueeze(-1)

    # The primitives every operation above is written with; the elementwise factors of small event sizes
    # (:mod:`torch_mvn_ext._small`) replace them, and nothing else.

    def mul_t(self, x: Tensor) -> Tensor:
        r"""The rows :math:`M x_i` for the held matrix :math:`M`: ``x @ M^T``."""
        return x @ self.tensor.mT

    def mul(self, x: Tensor) -> Tensor:
        r"""The rows :math:`M^\top x_i`: ``x @ M``."""
        return x @ self.tensor

    def solve(self, x: Tensor, transpose: bool) -> Tensor:
        r"""The rows :math:`M^{-1} x_i` (:math:`M^{-\top} x_i` with ``transpose``)."""
        return _solve_rows(self.tensor, x, transpose)

    def outer_sum(
        self, u: Tensor, v: Tensor, base: Tensor | None = None, beta: float = 1.0, alpha: float = 1.0
    ) -> Tensor:
        r"""``alpha`` :math:`\sum_s u_s v_s^\top` over the rows of ``(..., c, d)`` operands, one GEMM per member,
        plus ``beta * base`` where given (``base`` of the members' batch, or one matrix for all), in the GEMM's
        epilogue."""
        if base is None:
            return u.mT @ v if alpha == 1.0 else torch.mul(u.mT @ v, alpha)
        if u.dim() == 2:
            return torch.addmm(base, u.mT, v, beta=beta, alpha=alpha)
        return torch.baddbmm(base.expand(u.shape[:-2] + base.shape[-2:]), u.mT, v, beta=beta, alpha=alpha)

    def inverse(self) -> Tensor:
        r""":math:`M^{-1}`, lower-triangular (see :func:`tril_inverse`)."""
        return tril_inverse(self.tensor)


class CholeskyFactor(TriangularFactor):
    r"""``L`` with :math:`\Sigma = L L^\top`."""

    kind = "cholesky"

    def half_log_det(self) -> Tensor:
        # A Cholesky factorization's diagonal is positive.
        return self.diagonal().log().sum(-1)

    def whiten(self, x: Tensor) -> Tensor:
        return self.solve(x, transpose=False)

    def alpha(self, z: Tensor, r: Tensor | None = None) -> Tensor:
        return self.solve(z, transpose=True)

    def color(self, eps: Tensor) -> Tensor:
        return self.mul_t(eps)

    def sigma_matvec(self, x: Tensor) -> Tensor:
        return self.mul_t(self.mul(x))

    def inv_scale_diag(self) -> Tensor:
        return self.diagonal().reciprocal()

    def scale_tril(self) -> Tensor:
        return self.tensor

    def precision_matrix(self) -> Tensor:
        tensor = self.tensor
        if tensor.is_cpu and _CHOLESKY_INVERSE_ON_CPU and not differentiated(tensor):
            return torch.cholesky_inverse(tensor)
        # Elsewhere cholesky_inverse reads its error codes back to the host; a triangular solve and a product do not.
        # And wherever the result may be differentiated: torch's forward-mode rule for cholesky_inverse is wrong
        # (torch 2.13: its JVP differs from finite differences by 0.05 on a 3 x 3 factor), which would make
        # torch.func.hessian and jacfwd wrong; solve_triangular's and matmul's rules are right in both modes.
        inverse = self.inverse()
        return self.like(inverse).outer_sum(inverse, inverse)

    def precision_diagonal(self) -> Tensor:
        # diag(L^{-T} L^{-1})_i: the squared column norms of L^{-1}.
        return self.inverse().pow(2).sum(-2)

    def gradient(self, u: Tensor, v: Tensor, weights: Tensor) -> Tensor:
        # d log p / dL = tril(alpha z^T) - diag(1 / L_ii)
        centered = centered_outer_sum(u, v, self.diagonal(), weights, reciprocal=True, outer_sum=self.outer_sum)
        return -torch.tril(centered)

    def gradient_terms(
        self, weights: Tensor, weighted_alpha: Tensor | None, z: Tensor, r: Tensor
    ) -> tuple[Tensor, Tensor]:
        assert weighted_alpha is not None, "formed for every Cholesky factor"
        return weighted_alpha, z

    def jvp(self, tangent: Tensor, alpha: Tensor, z: Tensor, r: Tensor) -> Tensor:
        return ((z @ tangent.mT) * alpha).sum(-1) - self._trace_over_diagonal(tangent)


class ScaleTril(CholeskyFactor):
    r"""A ``scale_tril`` given by the user: with validation off its diagonal may have negative entries, and it still
    factors :math:`\Sigma = L L^\top` (``rsample`` draws from it), so :math:`\frac12 \log\det\Sigma = \sum_i
    \log|L_{ii}|`, finite rather than NaN; its derivative :math:`1 / L_{ii}` is what the gradients use."""

    kind = "scale_tril"

    def half_log_det(self) -> Tensor:
        return self.diagonal().abs().log().sum(-1)


class PrecisionFactor(TriangularFactor):
    r"""``T = L^{-1}`` with :math:`P = T^\top T`."""

    is_precision = True
    kind = "precision"

    @classmethod
    def of(cls, precision_matrix: Tensor) -> PrecisionFactor:
        r"""The factor of ``precision_matrix``: reversing rows and columns turns the lower Cholesky factor of the
        reversed matrix into an upper factor of :math:`P` (the trick torch's ``_precision_to_scale_tril`` uses),
        without inverting."""
        flipped = cholesky(precision_matrix.flip((-2, -1)), "precision_matrix")
        return cls(flipped.flip((-2, -1)).mT)

    def half_log_det(self) -> Tensor:
        # Positive, from a Cholesky factorization (or the inverse of one).
        return -self.diagonal().log().sum(-1)

    def whiten(self, x: Tensor) -> Tensor:
        # A product with T would add 0 * inf above T's diagonal where x is infinite (NaN where a solve, and torch's
        # MVN, gives an infinite z and a log-density of -inf); clamped to the largest finite value, x gives the same
        # infinities without a NaN, and every finite x is unchanged. One elementwise pass.
        big = torch.finfo(x.dtype).max
        return self.mul_t(x.clamp(-big, big))

    def alpha(self, z: Tensor, r: Tensor | None = None) -> Tensor:
        if r is None:
            return self.mul(z)
        # An infinite entry of r makes alpha = P r infinite along P's columns, but whiten's clamp leaves z finite
        # (or overflowing into a 0 * inf NaN above T's diagonal here): alpha is then formed from r's finite part and,
        # apart, from the signs of its infinities, whose image under P is scaled to +-inf where it is not zero; the
        # limit of alpha as those entries grow, which triangular solves (torch's MVN) give too. On the CPU it is
        # taken only when r has an infinite entry (one read of r); elsewhere, and under torch.compile and torch.func,
        # always, so that nothing is read back to the host and no graph breaks.
        if r.is_cpu and not torch.compiler.is_compiling() and not _transforms_active():
            if not bool(r.isinf().any()):
                return self.mul(z)
        infinite = r.isinf()
        finite = torch.where(infinite, 0.0, r)
        direction = self.mul(self.mul_t(torch.where(infinite, r.sign(), 0.0)))
        alpha = self.mul(self.mul_t(finite))
        # sign: no gradient flows from the infinite branch (where's backward would meet 0 * inf in it)
        return alpha + torch.where(direction == 0, 0.0, direction.sign() * math.inf)

    def color(self, eps: Tensor) -> Tensor:
        return self.solve(eps, transpose=False)

    def sigma_matvec(self, x: Tensor) -> Tensor:
        # Two triangular solves: Sigma = T^{-1} T^{-T} is never formed.
        return self.solve(self.solve(x, transpose=True), transpose=False)

    def inv_scale_diag(self) -> Tensor:
        return self.diagonal()

    def scale_tril(self) -> Tensor:
        return self.inverse()

    def precision_matrix(self) -> Tensor:
        return self.outer_sum(self.tensor, self.tensor)

    def precision_diagonal(self) -> Tensor:
        # diag(T^T T): the squared column norms of T.
        return self.tensor.pow(2).sum(-2)

    def gradient(self, u: Tensor, v: Tensor, weights: Tensor) -> Tensor:
        # d log p / dT = -tril(z r^T) + diag(1 / T_ii)
        centered = centered_outer_sum(u, v, self.diagonal(), weights, reciprocal=True, outer_sum=self.outer_sum)
        return torch.tril(centered)

    def gradient_terms(
        self, weights: Tensor, weighted_alpha: Tensor | None, z: Tensor, r: Tensor
    ) -> tuple[Tensor, Tensor]:
        return weights * z, r

    def jvp(self, tangent: Tensor, alpha: Tensor, z: Tensor, r: Tensor) -> Tensor:
        return self._trace_over_diagonal(tangent) - ((r @ tangent.mT) * z).sum(-1)


# Each kind by its name: autograd functions and compiled code carry the name (a constant) and build the factor from
# this module-level table, which torch.compile traces on every torch version it supports.
KINDS: dict[str, type[TriangularFactor]] = {
    "cholesky": CholeskyFactor,
    "scale_tril": ScaleTril,
    "precision": PrecisionFactor,
}


def tril_inverse(tril: Tensor) -> Tensor:
    r"""The inverse of a lower-triangular matrix (lower-triangular too): one triangular solve against the identity,
    :math:`O(d^3/3)`: :math:`L^{-1} = T` for a Cholesky factor, :math:`T^{-1} = L` for a precision factor."""
    eye = torch.eye(tril.shape[-1], dtype=tril.dtype, device=tril.device)
    return torch.linalg.solve_triangular(tril, eye.expand_as(tril), upper=False)


def _solve_rows(tril: Tensor, x: Tensor, transpose: bool) -> Tensor:
    r"""The rows :math:`L^{-1} x_i` (:math:`L^{-\top} x_i` with ``transpose``) for row-major ``x`` of shape
    ``(..., c, d)``: row-major again, except on the right-solve route below, whose result is column-major (callers that
    return it to users make it contiguous).

    ``solve_triangular(L, x^T)`` hands LAPACK ``x^T``, which is column-major when ``x`` is row-major: its one
    copy into the output is a plain memory copy, and the result's transpose is row-major. Measured with torch
    2.13's CPU build (MKL, 1 thread) on an Intel CPU: the right solve ``X L^T = x`` on row-major ``x`` costs a
    transposing copy in and (to return row-major) another out, which made two solves 1.3x (d = 64, c = 1024) to
    2.7x (d = 64, c = 16384) slower than this in float32 and float64 alike. On an AMD EPYC CPU, where MKL takes
    other kernels, the same right solve is instead 1.7-2.3x faster than this in float32 (about even in float64),
    so float32 on such CPUs takes it (``benchmarks/solves.py`` measures both on the machine at hand) up to
    ``d = 128``, where its errors stay within 0.8-1.5x of the left solve's; beyond, they grow with ``d`` (1.5x at
    256, 2.2x at 512, 2.8x at 1024, ``benchmarks/accuracy.py``), so larger factors keep the left solve.
    """
    if _RIGHT_SOLVE_IS_FASTER and x.dtype is torch.float32 and x.is_cpu and x.shape[-1] <= _RIGHT_SOLVE_MAX_D:
        # X L^T = x, resp. X L = x
        if transpose:
            return torch.linalg.solve_triangular(tril, x, upper=False, left=False)
        return torch.linalg.solve_triangular(tril.mT, x, upper=True, left=False)
    if transpose:
        return torch.linalg.solve_triangular(tril.mT, x.mT, upper=True).mT
    return torch.linalg.solve_triangular(tril, x.mT, upper=False).mT


def cpuinfo(field: str) -> str:
    """The first ``field`` of ``/proc/cpuinfo`` (e.g. ``vendor_id``: ``GenuineIntel``, ``AuthenticAMD``; ``model
    name``), or ``""`` where the OS does not tell it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


_RIGHT_SOLVE_MAX_D = 128
# On CPU, Sigma^{-1} = cholesky_inverse(L) (one LAPACK call); elsewhere a triangular inverse and a product, which read
# nothing back to the host. A module constant, so that tests can run the second route on CPU.
_CHOLESKY_INVERSE_ON_CPU = True
# Whether the CPU's BLAS runs row-major float32 triangular solves faster from the right: MKL on AMD CPUs. Read once
# at import, a constant to torch.compile.
_RIGHT_SOLVE_IS_FASTER = torch.backends.mkl.is_available() and cpuinfo("vendor_id") == "AuthenticAMD"
