r"""Relative error of ``log_prob``, every ``jacobian`` and KL of JacobianMVN and of torch's MultivariateNormal.

Both are run on the same float32 or float64 inputs and compared with a reference computed from those exact inputs
in higher precision: float64 for float32 inputs, ``numpy.longdouble`` (a 64-bit mantissa on x86-64, ~1e-19) for
float64 inputs. The matrices are built exactly:
:math:`\Sigma = \frac1d S H \operatorname{diag}(e) H^\top S^\top` with ``H`` a Sylvester Hadamard matrix, ``S`` a random
signed permutation and ``e`` powers of two, so every entry is a dyadic rational that float64 stores without rounding
and the condition number is known exactly. float32 inputs are that matrix rounded to float32; the reference is then
computed from the rounded matrix.

Error measure: the worst sample's relative error, :math:`\max_s |y_s - y^*_s| / |y^*_s|` for ``log_prob`` and
:math:`\max_s \|J_s - J^*_s\|_F / \|J^*_s\|_F` for a Jacobian. torch's Jacobians come from autograd through
:class:`torch.distributions.MultivariateNormal` parametrized by the same matrix (``value``: the gradient of the
summed ``log_prob``; the matrix: per sample, by ``torch.func.vmap(grad)``); torch has no derivative w.r.t. a
matrix it was not given, so those cells show only ours. The ``"loc"`` Jacobian is minus the ``"value"`` one and
is not listed. KL is :math:`\mathrm{KL}(p \| q)` between the case's distribution and a second one drawn the same way
(same size, condition number and scale), both from the same parametrization, by
:func:`torch.distributions.kl_divergence` (torch's MVN-MVN rule for torch, ours for JacobianMVN).

A second table measures the gradient of the *summed* ``log_prob`` w.r.t. the matrix the distribution was built
with, at points drawn from the distribution itself: near the optimum, where the gradient (of order
:math:`\sqrt N`) is a small difference of two sums of order :math:`N`, e.g. :math:`\frac12 (N\Sigma - \sum_s r_s
r_s^\top)` for the precision. Ours by ``log_prob_and_grads(reduction="sum")`` and by autograd through ``log_prob``,
torch's by autograd, against the same reference (the relative Frobenius error of the one matrix), over several
seeds: the median of each error and the median and largest ratio ours / torch's.

Usage::

    python benchmarks/accuracy.py            # both tables (d up to 1024, 1e5 points; 1e6 summed): several minutes
    python benchmarks/accuracy.py --quick    # small sizes only
    python benchmarks/accuracy.py --summed   # the summed-gradient table only
"""

import argparse
import math
import os
import statistics
import sys

import numpy as np
import scipy.linalg
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from torch_mvn_ext import JacobianMVN

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # the sibling module, also when imported by path
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
import accuracy_small  # noqa: E402
from calls import vmap_grad  # noqa: E402

PARAMETRIZATIONS = ("covariance_matrix", "precision_matrix", "scale_tril")
QUANTITIES = ("log_prob", "value") + PARAMETRIZATIONS + ("KL",)
LD = np.longdouble
# float32 results are measured against float64 (error <= cond * 1e-16, far below float32's), float64 results
# against numpy.longdouble.
REFERENCE = {torch.float32: np.float64, torch.float64: LD}
EXTENDED_PRECISION = np.finfo(LD).eps < 1e-18


# ------------------------------------------------------------------------------------------------
# Exactly representable test problems.


def hadamard(d):
    """The Sylvester Hadamard matrix of order ``d`` (a power of two), entries +-1, ``H H^T = d I``."""
    if d & (d - 1):
        raise ValueError(f"d must be a power of two, got {d}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def make_case(d, n, condition, scale=1.0, tail=1.0, generator=None):
    r"""``(loc, covariance, precision, points)`` in float64, with exactly known spectrum.

    The eigenvalues are :math:`s^2 2^{k}` for integers ``k`` spread over ``[0, log2(condition)]`` (so the
    condition number is ``2**round(log2(condition))``), ``s = 2**round(log2(scale))``; precision is the exact
    inverse. The points are ``loc + tail * Sigma^{1/2} g`` for standard normal ``g``, rounded to float64.
    """
    g = generator
    s = 2.0 ** round(math.log2(scale))
    k = torch.linspace(0, round(math.log2(condition)), d, dtype=torch.float64).round()
    eig = (s * s) * 2.0**k[torch.randperm(d, generator=g)]
    perm = torch.randperm(d, generator=g)
    signs = torch.randint(0, 2, (d,), generator=g).to(torch.float64) * 2 - 1
    q = (signs.unsqueeze(-1) * hadamard(d))[perm]  # S H, with (S H)(S H)^T = d I
    cov = (q * eig) @ q.mT / d
    prec = (q / eig) @ q.mT / d
    loc = s * torch.randn(d, dtype=torch.float64, generator=g)
    white = torch.randn(n, d, dtype=torch.float64, generator=g)
    points = loc + tail * (white * eig.sqrt()) @ q.mT / math.sqrt(d)
    return loc, cov, prec, points


# ------------------------------------------------------------------------------------------------
# Extended-precision reference.


def _to_numpy(t, dtype):
    return t.detach().cpu().double().numpy().astype(dtype)


def _cholesky(a):
    if a.dtype == np.float64:
        return np.linalg.cholesky(a)
    a = a.copy()
    n = a.shape[0]
    out = np.zeros_like(a)
    for k in range(n):
        pivot = np.sqrt(a[k, k])
        out[k, k] = pivot
        col = a[k + 1 :, k] / pivot
        out[k + 1 :, k] = col
        a[k + 1 :, k + 1 :] -= np.outer(col, col)
    return out


def _tril_inverse(lower):
    """``lower^{-1}`` by forward substitution."""
    if lower.dtype == np.float64:
        return scipy.linalg.solve_triangular(lower, np.eye(lower.shape[0]), lower=True)
    x = np.zeros_like(lower)
    for i in range(lower.shape[0]):
        x[i, : i + 1] = -(lower[i, :i] @ x[:i, : i + 1]) / lower[i, i]
        x[i, i] += 1 / lower[i, i]
    return x


def _gaussian(parametrization, matrix, precision):
    """``(sigma, prec, L, L_inv)`` of the given float32/float64 matrix argument, computed in ``precision``."""
    m = _to_numpy(matrix, precision)
    if parametrization == "covariance_matrix":
        sigma, L = m, _cholesky(m)
        L_inv = _tril_inverse(L)
        prec = L_inv.T @ L_inv
    elif parametrization == "precision_matrix":
        # P = T^T T with T = L^{-1} lower-triangular: the Cholesky factor of P with rows and columns reversed.
        prec, L_inv = m, _cholesky(m[::-1, ::-1].copy())[::-1, ::-1].T.copy()
        L = _tril_inverse(L_inv)
        sigma = L @ L.T
    else:
        L = m
        sigma = L @ L.T
        L_inv = _tril_inverse(L)
        prec = L_inv.T @ L_inv
    return sigma, prec, L, L_inv


def reference(gaussian, loc, points):
    """log_prob and every per-sample jacobian (full layout) in extended precision, as float64 numpy arrays."""
    sigma, prec, L, L_inv = gaussian
    r = _to_numpy(points, sigma.dtype) - _to_numpy(loc, sigma.dtype)
    d = r.shape[-1]
    z = r @ L_inv.T
    alpha = r @ prec
    diag = np.diagonal(L)
    log_prob = -0.5 * d * np.log(2 * r.dtype.type(math.pi)) - np.log(diag).sum() - 0.5 * (z * z).sum(-1)
    out = {
        "log_prob": log_prob,
        "value": -alpha,
        "covariance_matrix": 0.5 * (alpha[:, :, None] * alpha[:, None, :] - prec),
        "precision_matrix": 0.5 * (sigma - r[:, :, None] * r[:, None, :]),
        "scale_tril": np.tril(alpha[:, :, None] * z[:, None, :]) - np.diag(1 / diag),
    }
    return {k: v.astype(np.float64) for k, v in out.items()}


def reference_kl(p, p_loc, q, q_loc):
    r"""KL(p || q) in extended precision, for ``p``, ``q`` as returned by :func:`_gaussian`."""
    sigma_p, _, L_p, _ = p
    _, prec_q, L_q, _ = q
    delta = _to_numpy(p_loc, sigma_p.dtype) - _to_numpy(q_loc, sigma_p.dtype)
    d = delta.shape[-1]
    half_log_det = np.log(np.diagonal(L_q)).sum() - np.log(np.diagonal(L_p)).sum()
    kl = half_log_det + 0.5 * ((prec_q * sigma_p).sum() + delta @ prec_q @ delta - d)
    return np.array([kl], dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# Measurements.


def relative_error(actual, expected):
    """The worst sample's relative error, in float64."""
    actual = torch.as_tensor(actual).double().reshape(expected.shape[0], -1)
    expected = torch.as_tensor(expected).reshape(expected.shape[0], -1)
    err = (actual - expected).norm(dim=-1) / expected.norm(dim=-1)
    return err.max().item()


def torch_results(parametrization, matrix, loc, points):
    """log_prob and per-sample jacobians w.r.t. value and the given matrix, through torch's MVN."""

    def log_prob(x, m):
        return MultivariateNormal(loc, **{parametrization: m}, validate_args=False).log_prob(x)

    x = points.detach().requires_grad_()
    lp = log_prob(x, matrix)
    # d log_prob / d value of every sample at once, as a torch user gets it; the matrix needs vmap.
    (value,) = torch.autograd.grad(lp.sum(), x)
    per_sample = vmap_grad(MultivariateNormal, {"loc": loc, parametrization: matrix}, parametrization, points)
    return {"log_prob": lp.detach(), "value": value, parametrization: per_sample}


def our_results(parametrization, matrix, loc, points):
    d = JacobianMVN(loc, **{parametrization: matrix}, validate_args=False)
    out = {"log_prob": d.log_prob(points)}
    out.update(d.jacobian(points, ("value",) + PARAMETRIZATIONS))
    return out


def measure(dtype, parametrization, p_case, q_case):
    """``{quantity: (ours, torch or None)}`` relative errors for one case and parametrization.

    ``p_case`` and ``q_case`` are ``(loc, covariance, precision, points)`` from :func:`make_case`; the jacobians are
    those of ``p`` at ``p_case``'s points, and KL is ``KL(p || q)`` with both built from the same parametrization.
    """
    dists, gaussians = [], []
    for loc, cov, prec, _ in (p_case, q_case):
        matrix = {"covariance_matrix": cov, "precision_matrix": prec}.get(parametrization)
        if matrix is None:
            matrix = torch.from_numpy(_cholesky(_to_numpy(cov, LD)).astype(np.float64))
        matrix, loc = matrix.to(dtype), loc.to(dtype)
        dists.append((loc, matrix))
        gaussians.append(_gaussian(parametrization, matrix, REFERENCE[dtype]))
    (loc, matrix), (q_loc, q_matrix) = dists
    points = p_case[3].to(dtype)
    ref = reference(gaussians[0], loc, points)
    ref["KL"] = reference_kl(gaussians[0], loc, gaussians[1], q_loc)
    ours = our_results(parametrization, matrix, loc, points)
    theirs = torch_results(parametrization, matrix, loc, points)
    pairs = [
        (cls(loc, **{parametrization: matrix}, validate_args=False),
         cls(q_loc, **{parametrization: q_matrix}, validate_args=False))
        for cls in (JacobianMVN, MultivariateNormal)
    ]
    ours["KL"], theirs["KL"] = (kl_divergence(p, q).reshape(1) for p, q in pairs)
    return {
        q: (relative_error(ours[q], ref[q]), relative_error(theirs[q], ref[q]) if q in theirs else None)
        for q in QUANTITIES
    }


# ------------------------------------------------------------------------------------------------
# Summed gradients near the optimum.


def reference_summed(gaussian, parametrization, loc, points):
    r"""The gradient of the summed log-density w.r.t. the matrix ``parametrization``, in the precision of
    ``gaussian`` (from :func:`_gaussian`), as a float64 array."""
    sigma, prec, L, L_inv = gaussian
    r = _to_numpy(points, sigma.dtype) - _to_numpy(loc, sigma.dtype)
    n = sigma.dtype.type(r.shape[0])
    if parametrization == "precision_matrix":  # 1/2 (N Sigma - sum_s r r^T)
        out = 0.5 * (n * sigma - r.T @ r)
    elif parametrization == "covariance_matrix":  # 1/2 (sum_s alpha alpha^T - N Sigma^{-1})
        alpha = r @ prec
        out = 0.5 * (alpha.T @ alpha - n * prec)
    else:  # tril(sum_s alpha z^T) - N diag(1 / L_ii)
        alpha, z = r @ prec, r @ L_inv.T
        out = np.tril(alpha.T @ z) - n * np.diag(1 / np.diagonal(L))
    return out.astype(np.float64)


def summed_results(parametrization, matrix, loc, points):
    """``{path: gradient}`` of the summed ``log_prob`` w.r.t. ``matrix``: ours in closed form and by autograd,
    torch's by autograd."""
    kwargs = dict(validate_args=False)
    _, grads = JacobianMVN(loc, **{parametrization: matrix}, **kwargs).log_prob_and_grads(
        points, (parametrization,), reduction="sum"
    )
    out = {"closed form": grads[parametrization]}
    for name, cls in (("autograd", JacobianMVN), ("torch", MultivariateNormal)):
        m = matrix.detach().clone().requires_grad_()
        (out[name],) = torch.autograd.grad(cls(loc, **{parametrization: m}, **kwargs).log_prob(points).sum(), m)
    return out


def measure_summed(dtype, parametrization, case):
    """``{path: (ours, torch)}`` relative errors of the summed gradient for one case from :func:`make_case` (points
    drawn from the distribution: near the optimum), ``path`` ``"closed form"`` or ``"autograd"``."""
    loc, cov, prec, points = case
    matrix = {"covariance_matrix": cov, "precision_matrix": prec}.get(parametrization)
    if matrix is None:
        matrix = torch.from_numpy(_cholesky(_to_numpy(cov, LD)).astype(np.float64))
    matrix, loc, points = matrix.to(dtype), loc.to(dtype), points.to(dtype)
    ref = reference_summed(_gaussian(parametrization, matrix, REFERENCE[dtype]), parametrization, loc, points)
    results = summed_results(parametrization, matrix, loc, points)
    ref = torch.from_numpy(ref)
    errors = {k: ((v.double() - ref).norm() / ref.norm()).item() for k, v in results.items()}
    return {path: (errors[path], errors["torch"]) for path in ("closed form", "autograd")}


# (d, number of points) per dtype, condition number 1e2; float64's extended-precision reference is a slow loop, so
# its sizes are smaller.
SUMMED_CASES = {
    torch.float32: [(d, n) for d in (2, 8, 32) for n in (1_000, 100_000, 1_000_000)],
    torch.float64: [(d, n) for d in (2, 8) for n in (1_000, 100_000)],
}
SUMMED_SEEDS = 4


def summed_table(quick=False, seeds=SUMMED_SEEDS):
    """Prints the summed-gradient table; returns the ratios ours / torch's of every seed, by path."""
    header = ["dtype", "d", "points", "parametrization", "path", "ours", "torch", "ratio (median / max)"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    ratios = {"closed form": [], "autograd": []}
    for dtype, cases in SUMMED_CASES.items():
        for d, n in cases:
            if quick and n > 100_000:
                continue
            per_seed = []
            for seed in range(seeds):
                case = make_case(d, n, 1e2, generator=torch.Generator().manual_seed(seed))
                per_seed.append({pm: measure_summed(dtype, pm, case) for pm in PARAMETRIZATIONS})
            for pm in PARAMETRIZATIONS:
                for path in ratios:
                    ours = [e[pm][path][0] for e in per_seed]
                    theirs = [e[pm][path][1] for e in per_seed]
                    r = [o / t for o, t in zip(ours, theirs)]
                    ratios[path] += r
                    row = [str(dtype).replace("torch.", ""), str(d), str(n), pm, path,
                           f"{statistics.median(ours):.1e}", f"{statistics.median(theirs):.1e}",
                           f"{statistics.median(r):.2f} / {max(r):.2f}"]
                    print("| " + " | ".join(row) + " |", flush=True)
    for path, r in ratios.items():
        print(f"\n{path}: ratio ours / torch's over all rows and seeds: median {statistics.median(r):.2f}, "
              f"max {max(r):.2f} (torch's / ours: max {max(1 / x for x in r):.2f})")
    return ratios


# (label, d, number of points, condition number, scale, tail factor)
CASES = {
    torch.float32: [
        ("cond 1e4", 64, 256, 1e4, 1.0, 1.0),
        ("cond 1e6", 64, 256, 1e6, 1.0, 1.0),
        ("d 512", 512, 16, 1e2, 1.0, 1.0),
        ("d 1024", 1024, 8, 1e2, 1.0, 1.0),
        ("1e5 points", 8, 100_000, 1e2, 1.0, 1.0),
        ("scale 1e-6", 16, 256, 1e2, 1e-6, 1.0),
        ("scale 1e6", 16, 256, 1e2, 1e6, 1.0),
        ("tails (1e3 sd)", 16, 256, 1e2, 1.0, 1e3),
    ],
    torch.float64: [
        ("cond 1e10", 64, 256, 1e10, 1.0, 1.0),
        ("cond 1e12", 64, 256, 1e12, 1.0, 1.0),
        ("d 512", 512, 16, 1e6, 1.0, 1.0),
        ("d 1024", 1024, 8, 1e6, 1.0, 1.0),
        ("1e5 points", 8, 100_000, 1e6, 1.0, 1.0),
        ("scale 1e-6", 16, 256, 1e6, 1e-6, 1.0),
        ("scale 1e6", 16, 256, 1e6, 1e6, 1.0),
        ("tails (1e3 sd)", 16, 256, 1e6, 1.0, 1e3),
    ],
}
QUICK = {"d 512", "d 1024", "1e5 points"}


def _cell(ours, theirs):
    if theirs is None:
        return f"{ours:.1e} / —"
    return f"{ours:.1e} / {theirs:.1e}"


def main(args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="skip d = 512, 1024, 1e5 points and, summed, 1e6 points"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the first table's cases (default: 0)")
    parser.add_argument("--summed", action="store_true", help="only the summed-gradient table")
    parser.add_argument(
        "--many-small", action="store_true",
        help="only the table of many small Gaussians (accuracy_small.py: ill-conditioned 2x2 and 3x3 members)",
    )
    parser.add_argument(
        "--summed-seeds", type=int, default=SUMMED_SEEDS,
        help=f"seeds per case of the summed-gradient table (default: {SUMMED_SEEDS})",
    )
    args = parser.parse_args(args)
    if not EXTENDED_PRECISION:
        raise SystemExit("numpy.longdouble is not an extended-precision type on this platform; no reference")
    if args.summed:
        summed_table(args.quick, args.summed_seeds)
        return
    if args.many_small:
        print(accuracy_small.table())
        return
    header = ["dtype", "case", "d", "points", "parametrization"] + [f"{q} (ours / torch)" for q in QUANTITIES]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    worse = []
    for dtype, cases in CASES.items():
        for label, d, n, condition, scale, tail in cases:
            if args.quick and label in QUICK:
                continue
            g = torch.Generator().manual_seed(args.seed)
            p_case = make_case(d, n, condition, scale, tail, generator=g)
            q_case = make_case(d, 1, condition, scale, tail, generator=g)
            for parametrization in PARAMETRIZATIONS:
                errors = measure(dtype, parametrization, p_case, q_case)
                cells = [_cell(*errors[q]) for q in QUANTITIES]
                row = [str(dtype).replace("torch.", ""), label, str(d), str(n), parametrization] + cells
                print("| " + " | ".join(row) + " |", flush=True)
                floor = 16 * torch.finfo(dtype).eps
                worse += [
                    (str(dtype).replace("torch.", ""), label, parametrization, q)
                    for q, (o, t) in errors.items()
                    if t is not None and o > max(2 * t, floor)
                ]
    print(f"\nCells where ours is above both twice torch's error and 16 ulps: {worse or 'none'}")
    print("\nSummed gradients w.r.t. the matrix at points drawn from the distribution (near the optimum), relative "
          "errors, medians over seeds:\n")
    summed_table(args.quick, args.summed_seeds)
    print()
    print(accuracy_small.table())


if __name__ == "__main__":
    main()
