r"""Accuracy of the elementwise factors of many small Gaussians (``torch_mvn_ext/_small.py``) against torch's MVN.

B members, each with its own ill-conditioned ``d x d`` covariance (``d`` = 2 or 3; eigenvalues spread log-uniformly
up to the condition number, random rotations), one value each. ``log_prob``, the ``value`` Jacobian and the
per-sample ``covariance_matrix`` Jacobian of ``JacobianMVN`` (which takes the elementwise factors there) and of
torch's ``MultivariateNormal`` (autograd; ``vmap(grad)`` for the matrix) are compared with a reference computed from
the same float32 or float64 inputs in higher precision (float64, resp. ``numpy.longdouble``), member by member. Each
cell is the worst member's relative error, ours / torch's, for several seeds; ``benchmarks/accuracy.py --many-small``
prints the table.
"""

import math

import numpy as np
import torch
from torch.distributions import MultivariateNormal
from torch.func import grad, vmap

from torch_mvn_ext import JacobianMVN

REFERENCE = {torch.float32: np.float64, torch.float64: np.longdouble}
CONDITIONS = {torch.float32: (1e1, 1e3, 1e5), torch.float64: (1e1, 1e5, 1e10)}
QUANTITIES = ("log_prob", "value", "covariance_matrix")


def _cholesky(a):
    """Lower Cholesky factors of a ``(B, d, d)`` array, in its dtype."""
    d = a.shape[-1]
    lower = np.zeros_like(a)
    for j in range(d):
        lower[:, j, j] = np.sqrt(a[:, j, j] - (lower[:, j, :j] ** 2).sum(-1))
        for i in range(j + 1, d):
            lower[:, i, j] = (a[:, i, j] - (lower[:, i, :j] * lower[:, j, :j]).sum(-1)) / lower[:, j, j]
    return lower


def _forward(lower, b):
    z = np.zeros_like(b)
    for i in range(lower.shape[-1]):
        z[:, i] = (b[:, i] - (lower[:, i, :i] * z[:, :i]).sum(-1)) / lower[:, i, i]
    return z


def _backward(lower, z):
    a = np.zeros_like(z)
    for i in reversed(range(lower.shape[-1])):
        a[:, i] = (z[:, i] - (lower[:, i + 1 :, i] * a[:, i + 1 :]).sum(-1)) / lower[:, i, i]
    return a


def reference(cov, loc, x, dtype):
    """``log_prob``, the ``value`` Jacobian and the covariance Jacobian of each member, in ``dtype``."""
    c, m, v = (t.double().numpy().astype(dtype) for t in (cov, loc, x))
    d = c.shape[-1]
    lower = _cholesky(c)
    z = _forward(lower, v - m)
    alpha = _backward(lower, z)
    log_det = np.log(np.diagonal(lower, axis1=1, axis2=2)).sum(-1)
    lp = -0.5 * (z * z).sum(-1) - log_det - 0.5 * d * np.log(dtype(2) * np.pi)
    eye = np.broadcast_to(np.eye(d, dtype=dtype), c.shape)
    inverse = np.stack([_forward(lower, eye[:, :, k]) for k in range(d)], -1)
    precision = np.einsum("bki,bkj->bij", inverse, inverse)
    return {
        "log_prob": lp,
        "value": -alpha,
        "covariance_matrix": 0.5 * (alpha[:, :, None] * alpha[:, None, :] - precision),
    }


def make_case(b, d, condition, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(b, d, d, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, math.log10(condition), d, dtype=torch.float64)
    cov = (q * eig) @ q.mT
    cov = ((cov + cov.mT) / 2).to(dtype)
    loc = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype)
    noise = torch.linalg.cholesky(cov.double()) @ torch.randn(b, d, 1, generator=g, dtype=torch.float64)
    return cov, loc, (loc.double() + noise.squeeze(-1)).to(dtype)


def worst_relative_error(actual, expected):
    a = actual.double().numpy().astype(expected.dtype)
    axes = tuple(range(1, expected.ndim))
    if not axes:
        return float((np.abs(a - expected) / np.abs(expected)).max())
    return float((np.sqrt(((a - expected) ** 2).sum(axes)) / np.sqrt((expected**2).sum(axes))).max())


def measure(b, d, condition, dtype, seed):
    """``{quantity: (ours, torch's)}``: the worst member's relative errors."""
    cov, loc, x = make_case(b, d, condition, dtype, seed)
    expected = reference(cov, loc, x, REFERENCE[dtype])
    ours = JacobianMVN(loc, cov, validate_args=False)
    if not ours._state.factor.kind.startswith("elementwise"):
        raise RuntimeError(f"B = {b}, d = {d} does not take the elementwise factors; use more members")
    theirs = MultivariateNormal(loc, cov, validate_args=False)
    xs = x.clone().requires_grad_()
    (torch_value,) = torch.autograd.grad(theirs.log_prob(xs).sum(), xs)

    def torch_log_prob(c, mean, value):
        return MultivariateNormal(mean, c, validate_args=False).log_prob(value)

    results = {
        "log_prob": (ours.log_prob(x), theirs.log_prob(x)),
        "value": (ours.jacobian(x, "value"), torch_value),
        "covariance_matrix": (ours.jacobian(x, "covariance_matrix"), vmap(grad(torch_log_prob))(cov, loc, x)),
    }
    return {k: tuple(worst_relative_error(r, expected[k]) for r in pair) for k, pair in results.items()}


def table(b=20_000, seeds=5):
    """Markdown: a row per dtype, d and condition number; each cell the median over seeds of ours / torch's (worst
    member's relative error), with the range over seeds."""
    lines = [
        f"Many small Gaussians: B = {b} members, one value each; worst member's relative error, ours / torch's, "
        f"median (min-max) over {seeds} seeds.",
        "",
        "| dtype | d | condition | " + " | ".join(QUANTITIES) + " |",
        "|" + " --- |" * (3 + len(QUANTITIES)),
    ]
    for dtype in (torch.float32, torch.float64):
        for d in (2, 3):
            for condition in CONDITIONS[dtype]:
                ratios = {k: [] for k in QUANTITIES}
                for seed in range(seeds):
                    for k, (ours, theirs) in measure(b, d, condition, dtype, seed).items():
                        ratios[k].append(ours / theirs)
                cells = [
                    f"{np.median(r):.2f} ({min(r):.2f}-{max(r):.2f})" for r in (ratios[k] for k in QUANTITIES)
                ]
                name = str(dtype).removeprefix("torch.")
                lines.append(f"| {name} | {d} | {condition:.0e} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
