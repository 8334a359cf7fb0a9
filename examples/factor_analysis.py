"""Factor analysis by maximum likelihood, with the closed-form gradients of a low-rank Gaussian's log-density.

The model is x ~ N(mu, W W^T + diag(psi)) with W of shape (d, k): the covariance of d observed variables explained by
k latent factors plus independent noise. Data are drawn from a known model of this form, and (mu, W, log psi) are
fitted by L-BFGS, whose gradients come from ``JacobianLowRankMVN.log_prob_and_grads(x, reduction="sum")`` — one pass,
O(N d k), no autograd graph and no d x d matrix. The fit is checked against what is known exactly about the maximum:

- its log-likelihood is at least that of the true parameters (which the maximum must beat);
- the fitted mean is the sample mean, and the fitted variances are the sample variances, diag(W W^T + psi) =
  diag(S), two properties of the exact maximum-likelihood factor model;
- the fitted covariance is the true one within Monte Carlo error (in units of the sample covariance's standard error,
  next to the sample covariance's own error);
- the per-sample scores d log p(x_i) / d mu (``jacobian(x, "loc")``) give standard errors of the mean, from their
  outer products, equal to the exact ones, sqrt(diag(Sigma) / N).

Run: python examples/factor_analysis.py [--dim 20] [--factors 3] [--num-data 10000]
"""

import argparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=20, help="observed variables d")
    parser.add_argument("--factors", type=int, default=3, help="latent factors k, the rank of W")
    parser.add_argument("--num-data", type=int, default=10000, help="observations N")
    parser.add_argument("--max-iter", type=int, default=500, help="L-BFGS iterations at most")
    parser.add_argument("--seed", type=int, default=0, help="seed of the true model, the data and the start")
    return parser.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()  # before torch loads, so that --help answers at once

import math

import torch

from torch_mvn_ext import JacobianLowRankMVN


def fit(x, k, max_iter):
    """Maximum-likelihood (mu, W, psi) by L-BFGS on (mu, W, log psi), gradients in closed form."""
    n, d = x.shape
    mu = torch.zeros(d, dtype=x.dtype)
    w = 0.1 * torch.randn(d, k, dtype=x.dtype)
    log_psi = torch.zeros(d, dtype=x.dtype)
    params = [mu, w, log_psi]
    optimizer = torch.optim.LBFGS(
        params, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure():
        psi = log_psi.exp()
        lp, grads = JacobianLowRankMVN(mu, w, psi).log_prob_and_grads(
            x, ("loc", "cov_factor", "cov_diag"), reduction="sum"
        )
        # Minimize the mean negative log-likelihood; d/d log psi = psi * d/d psi.
        mu.grad = -grads["loc"] / n
        w.grad = -grads["cov_factor"] / n
        log_psi.grad = -grads["cov_diag"] * psi / n
        return -lp.mean()

    optimizer.step(closure)
    return mu, w, log_psi.exp(), optimizer.state[optimizer._params[0]]["n_iter"]


def main(args):
    torch.manual_seed(args.seed)
    d, k, n = args.dim, args.factors, args.num_data
    true_mu = torch.randn(d, dtype=torch.float64)
    true_w = torch.randn(d, k, dtype=torch.float64)
    true_psi = 0.2 + 0.8 * torch.rand(d, dtype=torch.float64)
    truth = JacobianLowRankMVN(true_mu, true_w, true_psi)
    x = truth.sample((n,))
    print(f"Factor analysis: d = {d} variables, k = {k} factors, N = {n} observations drawn from a known model")

    mu, w, psi, iterations = fit(x, k, args.max_iter)
    fitted = JacobianLowRankMVN(mu, w, psi)
    gain = (fitted.log_prob(x).mean() - truth.log_prob(x).mean()).item()
    print(f"L-BFGS: {iterations} iterations")
    print(f"fitted minus true log-likelihood per point {gain:+.5f}  (>= 0: the maximum beats the true parameters)")

    sample_mean, sample_cov = x.mean(0), torch.cov(x.T, correction=0)
    cov = fitted.covariance_matrix
    sd = sample_cov.diagonal().sqrt()
    mean_err = ((mu - sample_mean).abs() / sd).max().item()
    diag_err = ((cov.diagonal() - sample_cov.diagonal()).abs() / sample_cov.diagonal()).max().item()
    print(f"fitted mean vs sample mean, largest error in sd {mean_err:.1e}  (0 at the exact maximum)")
    print(f"fitted variances vs sample variances, largest relative error {diag_err:.1e}  (0 at the exact maximum)")

    true_cov = truth.covariance_matrix
    variance = true_cov.diagonal()
    se = ((true_cov**2 + variance[:, None] * variance[None, :]) / n).sqrt()  # of each sample covariance entry
    cov_z = ((cov - true_cov).abs() / se).max().item()
    sample_z = ((sample_cov - true_cov).abs() / se).max().item()
    print(
        f"covariance vs truth, largest error in Monte Carlo standard errors: fitted {cov_z:.2f}, "
        f"sample covariance {sample_z:.2f}  (about 2-4 over {d * (d + 1) // 2} entries)"
    )

    scores = fitted.jacobian(x, "loc")  # (N, d): d log p(x_i) / d mu, one row per observation
    information = scores.T @ scores / n  # outer products of the scores: the Fisher information per point
    se_scores = (torch.linalg.inv(information).diagonal() / n).sqrt()
    se_exact = (cov.diagonal() / n).sqrt()
    ratio = se_scores / se_exact
    print(
        f"standard errors of the mean from the per-sample scores / exact sqrt(diag(Sigma) / N) "
        f"{ratio.min().item():.3f} to {ratio.max().item():.3f}  (1 within {2 * math.sqrt(2 / n):.3f} or so)"
    )
    return {"mu": mu, "cov_factor": w, "cov_diag": psi}


if __name__ == "__main__":
    main(ARGS)
