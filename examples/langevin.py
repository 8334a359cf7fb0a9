"""Langevin sampling of a correlated Gaussian, with the closed-form score d log p / dx as the drift.

Unadjusted Langevin (ULA) moves every chain by x <- x + eps * score(x) + sqrt(2 eps) * noise; MALA adds a
Metropolis correction using log p and the score, both from one ``log_prob_and_grads`` pass. Many chains run as
one batch. The sample mean and covariance are compared with the truth (ULA is biased by O(eps); MALA is exact).

Run: python examples/langevin.py [--dim 4] [--chains 2000] [--steps 500] [--step-size 0.05]
"""

import argparse

import torch

from torch_mvn_ext import JacobianMVN


def ula(target, x, steps, eps):
    for _ in range(steps):
        x = x + eps * target.jacobian(x, "value") + (2 * eps) ** 0.5 * torch.randn_like(x)
    return x


def mala(target, x, steps, eps):
    lp, grads = target.log_prob_and_grads(x, ("value",))
    score = grads["value"]
    accepted = 0.0
    for _ in range(steps):
        mean_fwd = x + eps * score
        y = mean_fwd + (2 * eps) ** 0.5 * torch.randn_like(x)
        lp_y, grads_y = target.log_prob_and_grads(y, ("value",))
        score_y = grads_y["value"]
        mean_bwd = y + eps * score_y
        log_q_fwd = -((y - mean_fwd) ** 2).sum(-1) / (4 * eps)
        log_q_bwd = -((x - mean_bwd) ** 2).sum(-1) / (4 * eps)
        accept = torch.rand_like(lp).log() < lp_y - lp + log_q_bwd - log_q_fwd
        x = torch.where(accept.unsqueeze(-1), y, x)
        lp = torch.where(accept, lp_y, lp)
        score = torch.where(accept.unsqueeze(-1), score_y, score)
        accepted += accept.double().mean().item()
    return x, accepted / steps


def report(name, x, target):
    mean_err = (x.mean(0) - target.loc).abs().max().item()
    cov_err = (torch.cov(x.T) - target.covariance_matrix).abs().max().item()
    sigma = target.covariance_matrix
    # Monte Carlo standard errors of the estimates from len(x) independent chains.
    se_mean = (sigma.diagonal().max() / len(x)).sqrt().item()
    se_cov = ((sigma**2 + sigma.diagonal()[:, None] * sigma.diagonal()[None, :]) / len(x)).sqrt().max().item()
    print(f"{name:5s} max |mean - mu| = {mean_err:.3f} (MC s.e. {se_mean:.3f})   "
          f"max |cov - Sigma| = {cov_err:.3f} (MC s.e. {se_cov:.3f})")
    return mean_err, cov_err


def main(args):
    torch.manual_seed(args.seed)
    d = args.dim
    a = torch.randn(d, d, dtype=torch.float64)
    cov = a @ a.T / d + 0.5 * torch.eye(d, dtype=torch.float64)  # strongly correlated
    target = JacobianMVN(torch.linspace(-1.0, 1.0, d, dtype=torch.float64), covariance_matrix=cov)
    x0 = torch.randn(args.chains, d, dtype=torch.float64) * 3.0
    print(f"Target: {d}-dimensional Gaussian, condition number {torch.linalg.cond(cov).item():.1f}; "
          f"{args.chains} chains x {args.steps} steps, step size {args.step_size}")
    results = {"ula": report("ULA", ula(target, x0, args.steps, args.step_size), target)}
    x_mala, rate = mala(target, x0, args.steps, args.step_size)
    results["mala"] = report("MALA", x_mala, target)
    print(f"MALA acceptance rate {rate:.2f}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4)
    parser.add_argument("--chains", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--step-size", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    main(parser.parse_args())
