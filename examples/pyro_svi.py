"""Bayesian linear regression in Pyro with a full-covariance Gaussian posterior fitted by AutoJacobianMVN.

The model is conjugate, so the exact posterior of the weights is known and the fitted one is checked against it.

Run: python examples/pyro_svi.py [--num-features 3] [--num-data 100] [--num-steps 400]
"""

import argparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--num-features", type=int, default=3, help="regression weights")
    parser.add_argument("--num-data", type=int, default=100, help="observations")
    parser.add_argument("--num-steps", type=int, default=400, help="SVI steps")
    parser.add_argument("--num-particles", type=int, default=16, help="ELBO particles per step")
    parser.add_argument("--noise", type=float, default=0.5, help="observation noise standard deviation")
    parser.add_argument("--lr", type=float, default=0.1, help="ClippedAdam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the fit")
    return parser.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()  # before torch loads, so that --help answers at once

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import ClippedAdam

from torch_mvn_ext import AutoJacobianMVN, JacobianMVN


def model(X, y=None, prior_cov=None, noise=1.0):
    """``w ~ N(0, prior_cov)``, ``y_i ~ N(x_i . w, noise^2)``."""
    w = pyro.sample("w", JacobianMVN(torch.zeros_like(X[0]), covariance_matrix=prior_cov))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Normal((X * w).sum(-1), noise), obs=y)


def exact_posterior(X, y, prior_cov, noise):
    r"""Mean and covariance of :math:`w \mid y`: :math:`\Sigma_n^{-1} = \Sigma_0^{-1} + X^\top X / s^2`."""
    precision = torch.linalg.inv(prior_cov) + X.T @ X / noise**2
    cov = torch.linalg.inv(precision)
    return cov @ (X.T @ y) / noise**2, cov


def main(args):
    pyro.set_rng_seed(args.seed)
    d, n = args.num_features, args.num_data
    # Features sharing a common component make the posterior of the weights correlated.
    X = torch.randn(n, 1, dtype=torch.float64) + 0.5 * torch.randn(n, d, dtype=torch.float64)
    w_true = torch.randn(d, dtype=torch.float64)
    y = X @ w_true + args.noise * torch.randn(n, dtype=torch.float64)
    prior_cov = 4.0 * torch.eye(d, dtype=torch.float64)

    guide = AutoJacobianMVN(model)
    optim = ClippedAdam({"lr": args.lr, "lrd": 0.01 ** (1 / args.num_steps)})
    elbo = Trace_ELBO(num_particles=args.num_particles, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, optim, elbo)
    for step in range(args.num_steps):
        loss = svi.step(X, y, prior_cov, args.noise)
        if step % max(1, args.num_steps // 4) == 0:
            print(f"step {step:5d}  loss {loss:10.3f}")

    posterior = guide.get_posterior()  # a JacobianMVN over the (unconstrained) weights
    mean, cov = posterior.loc.detach(), posterior.covariance_matrix.detach()
    exact_mean, exact_cov = exact_posterior(X, y, prior_cov, args.noise)
    sd = exact_cov.diagonal().sqrt()
    corr = (exact_cov / sd.outer(sd))[tuple(torch.tril_indices(d, d, -1))]
    print(f"posterior is a {type(posterior).__name__}; the exact posterior correlations range over "
          f"{corr.min():.2f} .. {corr.max():.2f}")
    print("fitted mean:", [round(v, 4) for v in mean.tolist()])
    print("exact mean: ", [round(v, 4) for v in exact_mean.tolist()])
    mean_err = ((mean - exact_mean) / sd).abs().max().item()
    cov_err = ((cov - exact_cov) / sd.outer(sd)).abs().max().item()
    print(f"max |mean error| / posterior sd = {mean_err:.3f}; max |cov error| / (sd_i sd_j) = {cov_err:.3f}")
    return mean_err, cov_err


if __name__ == "__main__":
    main(ARGS)
