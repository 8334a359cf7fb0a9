"""NUTS on a correlated Gaussian target whose likelihood is a JacobianMVN, checked against the exact posterior.

Observations ``y_i ~ N(x, Sigma)`` with a strongly correlated ``Sigma`` (given by its precision matrix) and a broad
prior on ``x``: the posterior of ``x`` is a correlated Gaussian, known in closed form.

Run: python examples/pyro_nuts.py [--dim 3] [--rho 0.9] [--num-samples 200] [--jit]
"""

import argparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=3, help="dimension of the latent x")
    parser.add_argument("--rho", type=float, default=0.9, help="correlation of every pair of coordinates in Sigma")
    parser.add_argument("--num-data", type=int, default=20, help="observations y_i")
    parser.add_argument("--num-samples", type=int, default=200, help="NUTS samples kept")
    parser.add_argument("--warmup-steps", type=int, default=150, help="NUTS warm-up (adaptation) steps")
    parser.add_argument("--jit", action="store_true", help="compile the potential with torch.jit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the sampler")
    return parser.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()  # before torch loads, so that --help answers at once

import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

from torch_mvn_ext import JacobianMVN


def model(data, precision, prior_scale=10.0):
    d = precision.shape[-1]
    prior_prec = torch.eye(d, dtype=precision.dtype) / prior_scale**2
    x = pyro.sample("x", JacobianMVN(torch.zeros(d, dtype=precision.dtype), precision_matrix=prior_prec))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("y", JacobianMVN(x, precision_matrix=precision), obs=data)


def main(args):
    pyro.set_rng_seed(args.seed)
    d = args.dim
    sigma = (1 - args.rho) * torch.eye(d, dtype=torch.float64) + args.rho  # unit variances, correlation rho
    precision = torch.linalg.inv(sigma)
    x_true = torch.randn(d, dtype=torch.float64)
    data = JacobianMVN(x_true, covariance_matrix=sigma).sample((args.num_data,))

    # A dense mass matrix, adapted during warmup, undoes the correlation: short trajectories, high ESS.
    kernel = NUTS(model, full_mass=True, jit_compile=args.jit, ignore_jit_warnings=True)
    mcmc = MCMC(kernel, num_samples=args.num_samples, warmup_steps=args.warmup_steps, disable_progbar=True)
    mcmc.run(data, precision)
    samples = mcmc.get_samples()["x"]

    # Exact posterior: precision I / s^2 + n P, mean = cov @ (P sum_i y_i).
    post_cov = torch.linalg.inv(torch.eye(d, dtype=torch.float64) / 10.0**2 + args.num_data * precision)
    post_mean = post_cov @ precision @ data.sum(0)
    sd = post_cov.diagonal().sqrt()
    ess = effective_sample_size(samples.unsqueeze(0))
    print(f"{args.num_samples} NUTS samples; ESS {ess.min():.0f}..{ess.max():.0f}; "
          f"split R-hat max {split_gelman_rubin(samples.unsqueeze(0)).max():.3f}")
    print("sample mean:", [round(v, 4) for v in samples.mean(0).tolist()])
    print("exact mean: ", [round(v, 4) for v in post_mean.tolist()])
    z = ((samples.mean(0) - post_mean) / (sd / ess.sqrt())).abs().max().item()
    corr = torch.corrcoef(samples.T)[0, 1].item()
    exact_corr = (post_cov[0, 1] / (sd[0] * sd[1])).item()
    print(f"max |mean error| in Monte Carlo standard errors: {z:.2f}")
    print(f"posterior correlation of x0, x1: sampled {corr:.3f}, exact {exact_corr:.3f}")
    return samples


if __name__ == "__main__":
    main(ARGS)
