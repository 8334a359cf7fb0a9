r"""The ``many_small`` cases (``cases.py`` registers them): B Gaussians, each with its own small matrix, one value each.

Per-observation noise covariances, many Kalman tracks, mixtures with per-point covariances: ``loc`` of shape
``(B, d)``, ``covariance_matrix`` ``(B, d, d)`` and ``x`` ``(B, d)``, small ``d``. B is the benchmark's ``N``. Three
calls, each its own case (a case has one floor), each built from the tensors at every call as user code does, and
each against torch's ``MultivariateNormal``:

* ``many_small_log_prob``: ``JacobianMVN(loc, covariance_matrix=cov).log_prob(x)``;
* ``many_small_rsample``: ``JacobianMVN(loc, covariance_matrix=cov).rsample()`` (every callable seeds the global
  generator first, so all of them draw the same noise and their samples can be compared);
* ``many_small_lpg``: ``log_prob_and_grads(x, reduction="sum")`` (w.r.t. ``value``, ``loc`` and
  ``covariance_matrix``) vs torch's ``log_prob`` + ``torch.autograd.grad`` w.r.t. ``(x, loc, cov)``.

Their floor is the closed form written elementwise over the batch: batched LAPACK calls on 2 x 2 or 3 x 3 matrices
are loop- and dispatch-bound, elementwise operations over B are not. Each member's Cholesky factor is unrolled into
elementwise tensor operations on the ``(B,)`` slices ``cov[..., i, j]`` (Cholesky-Banachiewicz, row by row), forward
and back substitution the same way, the log-determinant from the diagonal. With :math:`r = x - \mu`,
:math:`z = L^{-1} r`, :math:`\alpha = L^{-\top} z = \Sigma^{-1} r`: :math:`\log p = -\tfrac12 |z|^2 - \sum_i \log
L_{ii} - \tfrac d2 \log 2\pi`, :math:`\partial_x = -\alpha`, :math:`\partial_\mu = \alpha`,
:math:`\partial_\Sigma = \tfrac12 (\alpha\alpha^\top - \Sigma^{-1})` with :math:`\Sigma^{-1} = T^\top T`,
:math:`T = L^{-1}` (also unrolled); a sample is :math:`\mu + L \varepsilon`. It is general in ``d`` (Python loops
over the entries build the operations), so it launches of the order of :math:`d^3` kernels: at d = 2 or 3 and
B = 1e5 it is 11-25x faster than torch's MVN (3-5x for ``rsample``, whose time is mostly drawing the noise), at d = 8
and B = 1e6 only 1.4x for ``log_prob`` (float32, one thread, on a 2-core AMD EPYC).

Sizes are ``dxB`` (``--many-small-sizes``); a B x d x d covariance over ``--max-matrix-bytes`` is skipped (float64 at
d = 6 and 8 with B = 1e6, by default). At B = 1e6 each size takes a minute or more (torch's autograd through 1e6
Cholesky factorizations takes seconds per call, and about 5 GB at d = 8).
"""

import math

import torch
from calls import lpg_callables
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN

LOG_2PI = math.log(2 * math.pi)
SIZES = [f"{d}x{b}" for b in (1000, 100_000, 1_000_000) for d in (1, 2, 3, 4, 6, 8)]
QUICK_SIZES = ["2x100000", "3x100000"]
RSAMPLE_SEED = 0


def make_inputs(d, b, dtype, device="cpu", seed=0):
    """``B`` well-conditioned covariances (each ``A A^T / d + I``), their means and one value drawn from each.

    Drawn in float64 from a seeded CPU generator, whatever the device, so every device sees the same numbers.
    """
    g = torch.Generator().manual_seed(seed + 1000 * d + b)
    a = torch.randn(b, d, d, generator=g, dtype=torch.float64)
    cov = a @ a.mT / d + torch.eye(d, dtype=torch.float64)
    loc = torch.randn(b, d, generator=g, dtype=torch.float64)
    eps = torch.randn(b, d, 1, generator=g, dtype=torch.float64)
    x = loc + (torch.linalg.cholesky(cov) @ eps).squeeze(-1)
    return [t.to(device=device, dtype=dtype) for t in (loc, cov, x)]


# --------------------------------------------------------------------------------------------------
# The floor. Lower-triangular matrices are lists of rows of (B,) tensors: ``L[i][j]`` for ``j <= i``.


def cholesky(cov):
    r""":math:`L_{ij} = (\Sigma_{ij} - \sum_{k<j} L_{ik} L_{jk}) / L_{jj}`, :math:`L_{ii} = (\Sigma_{ii} - \sum_{k<i}
    L_{ik}^2)^{1/2}`.

    On the strided slices themselves: copying ``cov`` to ``(d, d, B)`` first made ``log_prob`` 2.3x slower at d = 2
    and B = 1e5 (the copy costs more than it saves) and about 10% faster at d = 6 and 8.
    """
    d = cov.shape[-1]
    rows = []
    for i in range(d):
        row = []
        for j in range(i + 1):
            other = row if j == i else rows[j]
            s = cov[..., i, j]
            for k in range(j):
                s = torch.addcmul(s, row[k], other[k], value=-1)
            row.append(s.sqrt() if i == j else s / other[j])
        rows.append(row)
    return rows


def forward_substitution(tril, r):
    r""":math:`z_i = (r_i - \sum_{k<i} L_{ik} z_k) / L_{ii}`, the entries of :math:`z = L^{-1} r` for ``r`` of shape
    ``(B, d)``."""
    z = []
    for i, row in enumerate(tril):
        s = r[..., i]
        for k in range(i):
            s = torch.addcmul(s, row[k], z[k], value=-1)
        z.append(s / row[i])
    return z


def back_substitution(tril, z):
    r""":math:`\alpha_i = (z_i - \sum_{k>i} L_{ki} \alpha_k) / L_{ii}`, the entries of :math:`L^{-\top} z`."""
    d = len(tril)
    alpha = [None] * d
    for i in reversed(range(d)):
        s = z[i]
        for k in range(i + 1, d):
            s = torch.addcmul(s, tril[k][i], alpha[k], value=-1)
        alpha[i] = s / tril[i][i]
    return alpha


def precision(tril):
    r""":math:`\Sigma^{-1} = T^\top T` with :math:`T = L^{-1}` (:math:`T_{ii} = 1 / L_{ii}`, :math:`T_{ij} =
    -\sum_{j \le k < i} L_{ik} T_{kj} / L_{ii}`); returns its lower triangle as rows."""
    d = len(tril)
    inv = []
    for i, row in enumerate(tril):
        inv_row = []
        for j in range(i):
            s = row[j] * inv[j][j]
            for k in range(j + 1, i):
                s = torch.addcmul(s, row[k], inv[k][j])
            inv_row.append(-s / row[i])
        inv_row.append(row[i].reciprocal())
        inv.append(inv_row)
    prec = []
    for i in range(d):
        prec_row = []
        for j in range(i + 1):
            s = inv[i][i] * inv[i][j]
            for k in range(i + 1, d):
                s = torch.addcmul(s, inv[k][i], inv[k][j])
            prec_row.append(s)
        prec.append(prec_row)
    return prec


def _log_prob(tril, z):
    quad = z[0].square()
    for zi in z[1:]:
        quad = torch.addcmul(quad, zi, zi)
    log_det = tril[0][0].log()
    for i in range(1, len(tril)):
        log_det = log_det + tril[i][i].log()
    return -0.5 * quad - log_det - 0.5 * len(tril) * LOG_2PI


def _symmetric(lower):
    """The ``(B, d, d)`` tensor whose lower triangle is ``lower`` (rows of ``(B,)`` tensors), mirrored."""
    d = len(lower)
    entries = [lower[max(i, j)][min(i, j)] for i in range(d) for j in range(d)]
    return torch.stack(entries, dim=-1).unflatten(-1, (d, d))


def floor_log_prob(loc, cov, x):
    tril = cholesky(cov)
    return _log_prob(tril, forward_substitution(tril, x - loc))


def floor_rsample(loc, cov):
    torch.manual_seed(RSAMPLE_SEED)
    eps = torch.empty_like(loc).normal_()  # what torch's _standard_normal draws
    tril = cholesky(cov)
    sample = []
    for i, row in enumerate(tril):
        s = loc[..., i]
        for k in range(i + 1):
            s = torch.addcmul(s, row[k], eps[..., k])
        sample.append(s)
    return torch.stack(sample, dim=-1)


def floor_lpg(loc, cov, x):
    tril = cholesky(cov)
    z = forward_substitution(tril, x - loc)
    alpha = back_substitution(tril, z)
    prec = precision(tril)
    half = [
        [torch.addcmul(-0.5 * prec[i][j], alpha[i], alpha[j], value=0.5) for j in range(i + 1)]
        for i in range(len(tril))
    ]
    alpha = torch.stack(alpha, dim=-1)
    return _log_prob(tril, z), {"value": -alpha, "loc": alpha, "covariance_matrix": _symmetric(half)}


# --------------------------------------------------------------------------------------------------
# Builders, as ``registry.py`` describes them: each takes the batch that ``make_inputs`` draws for (d, B).


def log_prob(inputs, args):
    loc, cov, x = inputs

    def make(cls, validate):
        return lambda: cls(loc, covariance_matrix=cov, validate_args=validate).log_prob(x)

    return {
        "ours": make(JacobianMVN, None),
        "torch": make(MultivariateNormal, None),
        "ours_noval": make(JacobianMVN, False),
        "torch_noval": make(MultivariateNormal, False),
        "floor": lambda: floor_log_prob(loc, cov, x),
    }, {"torch": "ours", "torch_noval": "ours_noval"}


def rsample(inputs, args):
    loc, cov, _ = inputs

    def make(cls, validate):
        def run():
            torch.manual_seed(RSAMPLE_SEED)
            return cls(loc, covariance_matrix=cov, validate_args=validate).rsample()

        return run

    return {
        "ours": make(JacobianMVN, None),
        "torch": make(MultivariateNormal, None),
        "ours_noval": make(JacobianMVN, False),
        "torch_noval": make(MultivariateNormal, False),
        "floor": lambda: floor_rsample(loc, cov),
    }, {"torch": "ours", "torch_noval": "ours_noval"}


def lpg(inputs, args):
    loc, cov, x = inputs
    return lpg_callables(loc, cov, x, lambda: floor_lpg(loc, cov, x))
