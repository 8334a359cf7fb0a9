"""The three classic questions about the multivariate-normal log-density, answered in closed form.

What is d log N(x | mu, Sigma) / dx, / d mu and / d Sigma? With r = x - mu and alpha = Sigma^{-1} r:

    d/dx = -alpha,   d/dmu = alpha,   d/dSigma = 0.5 (alpha alpha^T - Sigma^{-1}).

Sigma is symmetric, so "the" derivative w.r.t. Sigma comes in two conventions, both shown here:
* the full symmetric gradient G (what torch autograd returns through MultivariateNormal), and
* the derivative w.r.t. the d(d+1)/2 unique elements, in which each off-diagonal entry counts twice
  (2 G_ij for i != j, G_ii on the diagonal): ``layout="vech"``.
Each answer is checked against autograd, then the per-sample case (one gradient per data point), which autograd
alone computes with one backward pass per point, is timed.

Run: python examples/jacobians.py [--dim 5] [--num-points 2000]
"""

import argparse
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=5, help="event size d")
    parser.add_argument("--num-points", type=int, default=2000, help="points for the per-sample Jacobians")
    parser.add_argument("--loop-points", type=int, default=50, help="points timed in the autograd loop")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters and the points")
    return parser.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()  # before torch loads, so that --help answers at once

import torch
from torch.distributions import MultivariateNormal
from torch.func import grad, vmap

from torch_mvn_ext import JacobianMVN


def max_diff(a, b):
    return f"{(a - b).abs().max().item():.1e}"


def main(args):
    torch.manual_seed(args.seed)
    d = args.dim
    a = torch.randn(d, d, dtype=torch.float64)
    cov = a @ a.T + d * torch.eye(d, dtype=torch.float64)
    loc = torch.randn(d, dtype=torch.float64)
    x = torch.randn(d, dtype=torch.float64)
    mvn = JacobianMVN(loc, covariance_matrix=cov)

    # Autograd through torch's own MultivariateNormal, the reference.
    x_, loc_, cov_ = (t.clone().requires_grad_() for t in (x, loc, cov))
    gx, gloc, gcov = torch.autograd.grad(MultivariateNormal(loc_, cov_).log_prob(x_), (x_, loc_, cov_))

    print("1. d log p / dx    = -Sigma^{-1}(x - mu):  vs autograd", max_diff(mvn.jacobian(x, "value"), gx))
    print("2. d log p / dmu   =  Sigma^{-1}(x - mu):  vs autograd", max_diff(mvn.jacobian(x, "loc"), gloc))
    full = mvn.jacobian(x, "covariance_matrix")
    print("3. d log p / dSigma, full symmetric 0.5 (alpha alpha^T - Sigma^{-1}): vs autograd", max_diff(full, gcov))

    # The unique-element convention: differentiate through Sigma built from its lower triangle.
    rows, cols = torch.tril_indices(d, d)
    unique = cov[rows, cols].clone().requires_grad_()
    sym = torch.zeros(d, d, dtype=torch.float64).index_put((rows, cols), unique).index_put((cols, rows), unique)
    (g_unique,) = torch.autograd.grad(MultivariateNormal(loc, sym).log_prob(x), unique)
    vech = mvn.jacobian(x, "covariance_matrix", layout="vech")
    print("   d log p / d(unique elements of Sigma), off-diagonals doubled: vs autograd", max_diff(vech, g_unique))

    # Per-sample: one gradient per data point.
    n = args.num_points
    xs = mvn.sample((n,))
    start = time.perf_counter()
    per_sample = mvn.jacobian(xs, "covariance_matrix")
    t_closed = time.perf_counter() - start

    def log_prob(x, cov):
        return MultivariateNormal(loc, cov, validate_args=False).log_prob(x)

    start = time.perf_counter()
    by_vmap = vmap(grad(log_prob, argnums=1), in_dims=(0, None))(xs, cov)
    t_vmap = time.perf_counter() - start

    m = min(n, args.loop_points)
    start = time.perf_counter()
    by_loop = torch.stack([torch.autograd.grad(log_prob(xs[i], cov_), cov_)[0] for i in range(m)])
    t_loop = (time.perf_counter() - start) * n / m

    print(f"\nPer-sample d log p / dSigma for {n} points, d = {d}: shape {tuple(per_sample.shape)}")
    print(f"   closed form          {t_closed * 1e3:9.2f} ms")
    print(f"   torch.func vmap/grad {t_vmap * 1e3:9.2f} ms   (max diff {max_diff(per_sample, by_vmap)})")
    print(f"   autograd loop        {t_loop * 1e3:9.2f} ms   (extrapolated from {m} points; "
          f"max diff {max_diff(per_sample[:m], by_loop)})")


if __name__ == "__main__":
    main(ARGS)
