r"""Sums over samples of the per-sample terms of a summed gradient, accurately where they nearly cancel.

Every gradient of a summed log-density w.r.t. a matrix is :math:`\sum_s (g_s K - u_s v_s^\top)`, whose two terms
nearly cancel near the optimum; :func:`centered_outer_sum` forms it in centered chunks (see there).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Sums of outer products over more than _CHUNKED_FROM samples run in chunks of _SUM_CHUNK (see centered_outer_sum):
# below, one GEMM's error was within torch's (benchmarks/accuracy.py) and the chunks' few extra operations (~20 us on
# a 2-core machine) would cost more than a tenth of the call.
_SUM_CHUNK = 256
_CHUNKED_FROM = 4096


def centered_outer_sum(
    u: Tensor,
    v: Tensor,
    constant: Tensor,
    weights: Tensor | None = None,
    scale: float = 1.0,
    reciprocal: bool = False,
    outer_sum: Callable[..., Tensor] | None = None,
) -> Tensor:
    r"""``scale`` times :math:`\sum_s (g_s K - u_s v_s^\top)` over the rows of ``u`` and ``v`` (shape ``(c, d)``, or
    ``(b, c, d)`` with one :math:`K` per member), shape ``(d, d)`` or ``(b, d, d)``. :math:`K` is ``constant`` (shape
    ``(d, d)`` or ``(b, d, d)``), or with ``reciprocal`` :math:`\operatorname{diag}(1 / D)` for ``constant`` = ``D``
    (shape ``(d,)`` or ``(b, d)``), its multiples formed as ``count / D`` (one rounding); :math:`g_s` are ``weights``
    (shape ``(..., c, 1)``, already applied to ``u``), 1 where ``None``.

    Every gradient of a summed log-density w.r.t. a matrix has this form, with :math:`E[u v^\top] = K` under the
    distribution (:math:`K = \Sigma` for the precision, :math:`P` for the covariance; below the diagonal,
    :math:`\operatorname{diag}(1 / L_{ii})` for a factor). Near the optimum the result, of order :math:`\sqrt c`, is a
    small difference of two sums of order :math:`c`. One GEMM over all rows, then the subtraction, carries the error
    of accumulating the large sum, which small-``d`` BLAS kernels do in long serial runs: at ``c`` = 1e6 in float32
    that left 14-33% relative error at ``d`` = 2-8, 13-55 times torch's (``benchmarks/accuracy.py``, second table).

    So beyond ``_CHUNKED_FROM`` rows they are summed in chunks of ``m = max(_SUM_CHUNK, 4 d)`` rows (long enough for
    the GEMM to run at full speed, and the ``(k, d, d)`` chunk sums under a quarter of ``u``), by one batched GEMM that
    centers each chunk by its share of :math:`(\sum_s g_s) K` in its epilogue; the rows left over after the last chunk
    count with the chunks and are subtracted at the end, and the small chunk results are added by torch's cascade
    summation. The error falls to that of the inputs (the float32 factorization of the matrix); the extra operations
    cost 5-15% of a whole ``log_prob_and_grads`` or backward at 5e3-1e4 points and ``d <= 8`` (2-core machine),
    within noise from 1e5 points. Up to ``_CHUNKED_FROM`` rows it is one GEMM, with the constant term in its epilogue
    up to ``_SUM_CHUNK`` rows (one point, as in HMC, pays nothing) and subtracted after it beyond. Differentiable, for
    double backward.
    """
    c, d = u.shape[-2:]
    m = max(_SUM_CHUNK, 4 * d)  # each chunk's GEMM long enough to run at full speed; (k, d, d) under a quarter of u
    if c <= max(_CHUNKED_FROM, 2 * m):
        count: Tensor | float = c if weights is None else weights.sum(-2)
        if c > _SUM_CHUNK:
            # One GEMM, the multiple of K subtracted after it: MKL's small-d kernels accumulate a long sum onto the
            # epilogue's starting value less accurately than from zero (float32, d = 2, 1e3-4e3 points: 1.2x
            # torch's error that way, 1.0x this way).
            outer = u.mT @ v
            if weights is None and not reciprocal:
                return torch.add(constant * (scale * c), outer, alpha=-scale)
            base = _times(count, constant, reciprocal)
            return torch.add(base if scale == 1 else scale * base, outer, alpha=-scale)
        # One chunk: one GEMM and its epilogue, or the factor's own sum of outer products (``outer_sum``, with the
        # signature of TriangularFactor.outer_sum: the elementwise one for many small matrices).
        if outer_sum is None:
            gemm = torch.addmm if u.dim() == 2 else torch.baddbmm
            if weights is None and not reciprocal:
                return gemm(constant, u.mT, v, beta=scale * c, alpha=-scale)
            return gemm(_times(count, constant, reciprocal), u.mT, v, beta=scale, alpha=-scale)
        if weights is None and not reciprocal:
            return outer_sum(u, v, constant, beta=scale * c, alpha=-scale)
        return outer_sum(u, v, _times(count, constant, reciprocal), beta=scale, alpha=-scale)
    k, rest = divmod(c, m)
    n = c - rest
    # Each chunk is centered by its share of the count; the rest's share goes to the chunks, its rows at the end.
    if u.dim() == 2:  # one matrix for all rows, the common case: one batched GEMM and its epilogue
        if weights is None and not reciprocal:
            base, beta = constant, scale * (m + rest / k)
        else:
            share = m + rest / k if weights is None else weights[:n].reshape(k, m, 1).sum(1) + weights[n:].sum() / k
            base, beta = _times(share, constant, reciprocal), scale
        parts = torch.baddbmm(base, u[:n].unflatten(0, (k, m)).mT, v[:n].unflatten(0, (k, m)), beta=beta, alpha=-scale)
        total = parts.sum(0)
        return torch.addmm(total, u[n:].mT, v[n:], alpha=-scale) if rest else total
    shares: Tensor | float = m + rest / k
    if weights is not None:
        shares = weights[:, :n].reshape(-1, k, m, 1).sum(2) + weights[:, n:].sum(-2, keepdim=True) / k
    outer = u[:, :n].unflatten(1, (k, m)).mT @ v[:, :n].unflatten(1, (k, m))
    base = _times(shares, constant.unsqueeze(-2 if reciprocal else -3), reciprocal)
    total = (scale * (base - outer)).sum(1)
    return torch.baddbmm(total, u[:, n:].mT, v[:, n:], alpha=-scale) if rest else total


def _times(count: Tensor | float, constant: Tensor, reciprocal: bool) -> Tensor:
    r"""``count`` (a number, or a tensor of shape ``(..., 1)`` that broadcasts with ``constant``'s batch) times
    :math:`K`: ``constant``, or :math:`\operatorname{diag}(1 / D)` for ``constant`` = ``D`` with ``reciprocal``."""
    if reciprocal:
        return torch.diag_embed(count / constant)
    return count * constant if isinstance(count, (int, float)) else count[..., None] * constant
