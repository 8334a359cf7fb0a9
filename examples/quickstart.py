"""A tour of JacobianMVN: a drop-in MultivariateNormal with closed-form per-sample derivatives.

Run: python examples/quickstart.py [--dim 4] [--num-samples 1000]
"""

import argparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=4, help="event size d of the Gaussian")
    parser.add_argument("--num-samples", type=int, default=1000, help="points drawn and differentiated at")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters and the samples")
    return parser.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()  # before torch loads, so that --help answers at once

import torch
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN


def main(args):
    torch.manual_seed(args.seed)
    d = args.dim
    a = torch.randn(d, d, dtype=torch.float64)
    cov = a @ a.T + d * torch.eye(d, dtype=torch.float64)
    loc = torch.randn(d, dtype=torch.float64)

    mvn = JacobianMVN(loc, covariance_matrix=cov)
    ref = MultivariateNormal(loc, covariance_matrix=cov)
    x = mvn.sample((args.num_samples,))
    print(f"log_prob matches torch's MultivariateNormal: max |diff| = "
          f"{(mvn.log_prob(x) - ref.log_prob(x)).abs().max():.2e}")

    score = mvn.jacobian(x, "value")
    print(f"score d log p / dx: shape {tuple(score.shape)}; "
          f"max |score + Sigma^-1 (x - loc)| = "
          f"{(score + torch.linalg.solve(cov, (x - loc).T).T).abs().max():.2e}")

    grads = mvn.jacobian(x, ("loc", "covariance_matrix", "scale_tril"), layout="vech")
    for name, g in grads.items():
        print(f"per-sample d log p / d {name:<18} shape {tuple(g.shape)}")

    lp, summed = mvn.log_prob_and_grads(x, reduction="sum")
    cov_leaf = cov.clone().requires_grad_()
    ref_grad = torch.autograd.grad(MultivariateNormal(loc, cov_leaf).log_prob(x).sum(), cov_leaf)[0]
    print(f"log_prob_and_grads(reduction='sum') vs autograd, covariance: max |diff| = "
          f"{(summed['covariance_matrix'] - ref_grad).abs().max():.2e}")

    prec = torch.cholesky_inverse(torch.linalg.cholesky(cov))
    by_precision = JacobianMVN(loc, precision_matrix=prec)
    print(f"precision parametrization, same log_prob (never inverts P): max |diff| = "
          f"{(by_precision.log_prob(x) - lp).abs().max():.2e}")

    # KL divergences are registered with torch on import: closed form for any pair of parametrizations.
    q_tril = torch.linalg.cholesky(torch.eye(d, dtype=torch.float64) + 0.5 * torch.ones(d, d, dtype=torch.float64))
    q = JacobianMVN(torch.zeros(d, dtype=torch.float64), scale_tril=q_tril)
    kl = torch.distributions.kl_divergence(by_precision, q)
    kl_ref = torch.distributions.kl_divergence(ref, MultivariateNormal(q.loc, scale_tril=q_tril))
    print(f"KL(precision-parametrized || scale_tril-parametrized) = {kl:.4f}; "
          f"vs torch's MultivariateNormal KL: |diff| = {(kl - kl_ref).abs():.2e}")
    return mvn


if __name__ == "__main__":
    main(ARGS)
