"""Gaussian variational inference for Bayesian logistic regression: natural-gradient steps against Adam.

The variational posterior q(w) = N(mu, Sigma) maximizes the ELBO

    E_q[sum_n log sigmoid(y_n x_n^T w)] + E_q[log N(w; 0, prior_scale^2 I)] + H[q],

where each expectation over the 1-d projection x_n^T w ~ N(x_n^T mu, x_n^T Sigma x_n) is computed by Gauss-Hermite
quadrature, so the ELBO is a deterministic, differentiable function of (mu, Sigma) and both optimizers climb the
same objective:

* natural gradient: q is precision-parametrized, autograd gives the Euclidean gradients w.r.t. loc and
  precision_matrix, and ``JacobianMVN.natural_gradient`` turns them into 2 P G P (added to P) and then Sigma g
  with the updated Sigma (added to mu). Together these are the natural-gradient step in the natural parameters
  (P mu, -P/2); at step size 1, P <- prior precision - 2 dE_q[log lik]/dSigma, a Newton-like fixed point;
* Adam on (mu, the Cholesky factor with a log-diagonal), the usual black-box choice.

Run: python examples/natural_gradient_vi.py [--num-data 200] [--dim 5] [--adam-steps 200] [--lr 0.2] [--plot]
"""

import argparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--num-data", type=int, default=200, help="data points")
    parser.add_argument("--dim", type=int, default=5, help="weights, the intercept included")
    parser.add_argument("--prior-scale", type=float, default=2.0, help="prior standard deviation of each weight")
    parser.add_argument("--num-nodes", type=int, default=32, help="Gauss-Hermite nodes")
    parser.add_argument("--ng-steps", type=int, default=10, help="natural-gradient steps")
    parser.add_argument("--step-size", type=float, default=1.0, help="natural-gradient step size")
    parser.add_argument("--adam-steps", type=int, default=200, help="Adam steps")
    parser.add_argument("--lr", type=float, default=0.2, help="Adam learning rate")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="ELBO gap counted as converged")
    parser.add_argument("--print-every", type=int, default=25, help="print Adam's ELBO every this many steps")
    parser.add_argument("--plot", action="store_true", help="save the ELBO curves with matplotlib")
    parser.add_argument("--output", default="natural_gradient_vi.png", help="file the plot is saved to")
    parser.add_argument("--num-threads", type=int, default=1, help="torch threads; one suits this tiny problem")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data")
    return parser.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()  # before torch loads, so that --help answers at once

import numpy as np
import torch

from torch_mvn_ext import JacobianMVN


def make_data(num_data, dim, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.ones(num_data, 1), torch.randn(num_data, dim - 1, generator=g)], -1).double()
    w_true = 1.5 * torch.randn(dim, generator=g).double()
    y = torch.where(torch.rand(num_data, generator=g).double() < torch.sigmoid(x @ w_true), 1.0, -1.0)
    return x, y.double(), w_true


class ELBO:
    """The ELBO of q = N(mu, Sigma) for logistic regression, with Gauss-Hermite quadrature over x_n^T w."""

    def __init__(self, x, y, prior_scale, num_nodes):
        nodes, weights = np.polynomial.hermite.hermgauss(num_nodes)
        self.nodes = torch.as_tensor(nodes * np.sqrt(2.0), dtype=x.dtype)
        self.weights = torch.as_tensor(weights / np.sqrt(np.pi), dtype=x.dtype)
        self.x, self.y, self.prior_scale = x, y, prior_scale

    def __call__(self, q):
        mean = self.x @ q.loc
        std = (self.x @ q.scale_tril).pow(2).sum(-1).sqrt()
        a = mean.unsqueeze(-1) + std.unsqueeze(-1) * self.nodes
        expected_log_lik = (torch.nn.functional.logsigmoid(self.y.unsqueeze(-1) * a) @ self.weights).sum()
        dim, s2 = q.loc.shape[-1], self.prior_scale**2
        second_moment = q.loc.pow(2).sum() + q.scale_tril.pow(2).sum()
        expected_log_prior = -0.5 * dim * np.log(2 * np.pi * s2) - 0.5 * second_moment / s2
        return expected_log_lik + expected_log_prior + q.entropy()


def run_natural_gradient(elbo, dim, steps, step_size):
    loc = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    precision = torch.eye(dim, dtype=torch.float64, requires_grad=True)
    trace = []
    for _ in range(steps + 1):
        q = JacobianMVN(loc, precision_matrix=precision)
        value = elbo(q)
        trace.append(value.item())
        if len(trace) == steps + 1:
            break
        g_loc, g_prec = torch.autograd.grad(value, (loc, precision))
        with torch.no_grad():
            precision += step_size * q.natural_gradient({"precision_matrix": g_prec})["precision_matrix"]
            # The mean moves with the updated precision: together the two steps are the natural-gradient step in
            # the natural parameters (P mu, -P/2) (Khan & Lin, 2017), which stays stable at step size 1.
            updated = JacobianMVN(loc, precision_matrix=precision)
            loc += step_size * updated.natural_gradient({"loc": g_loc})["loc"]
    return trace, JacobianMVN(loc.detach(), precision_matrix=precision.detach())


def run_adam(elbo, dim, steps, lr):
    loc = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    raw = torch.zeros(dim, dim, dtype=torch.float64, requires_grad=True)  # L = I at the start, like the NG run
    optimizer = torch.optim.Adam([loc, raw], lr=lr)

    def posterior():
        return JacobianMVN(loc, scale_tril=raw.tril(-1) + torch.diag_embed(raw.diagonal().exp()))

    trace = []
    for _ in range(steps + 1):
        value = elbo(posterior())
        trace.append(value.item())
        if len(trace) == steps + 1:
            break
        optimizer.zero_grad()
        (-value).backward()
        optimizer.step()
    with torch.no_grad():
        return trace, posterior()


def first_step_reaching(trace, target):
    return next((i for i, v in enumerate(trace) if v >= target), None)


def report_steps(name, trace, target, what):
    step = first_step_reaching(trace, target)
    found = f"after {step} steps" if step is not None else f"not within its {len(trace) - 1} steps"
    print(f"{name} reaches {what} {found}")
    return step


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or an exit that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "--plot needs matplotlib, which is not installed: pip install matplotlib "
            '(or, in a clone of torch_mvn_ext, its plot extra: pip install -e ".[plot]")'
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def main(args):
    plt = pyplot() if args.plot else None  # before the optimization, so a missing matplotlib fails at once
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    x, y, w_true = make_data(args.num_data, args.dim, args.seed)
    elbo = ELBO(x, y, args.prior_scale, args.num_nodes)
    ng_trace, ng_q = run_natural_gradient(elbo, args.dim, args.ng_steps, args.step_size)
    adam_trace, adam_q = run_adam(elbo, args.dim, args.adam_steps, args.lr)

    print(f"Bayesian logistic regression, {args.num_data} points, {args.dim} weights; ELBO per step")
    print("natural gradient:")
    for i, v in enumerate(ng_trace):
        print(f"  step {i:4d}  ELBO {v:.6f}")
    print(f"Adam (lr {args.lr}), every {args.print_every} steps:")
    for i in list(range(0, args.adam_steps, args.print_every)) + [args.adam_steps]:
        print(f"  step {i:4d}  ELBO {adam_trace[i]:.6f}")

    # "Reaching" a value means coming within 1e-6 of it, so that rounding does not decide.
    target, best = adam_trace[-1], max(max(ng_trace), max(adam_trace))
    print(f"Adam's final ELBO after {args.adam_steps} steps: {target:.6f}; best ELBO seen: {best:.6f}")
    report_steps("natural gradient", ng_trace, target - 1e-6, "Adam's final ELBO")
    for name, trace in (("natural gradient", ng_trace), ("Adam", adam_trace)):
        report_steps(name, trace, best - args.tolerance, f"within {args.tolerance:g} of the best ELBO")
    print(f"posterior mean, natural gradient: {ng_q.loc.numpy().round(3)}")
    print(f"posterior mean, Adam:             {adam_q.loc.detach().numpy().round(3)}")
    print(f"true weights:                     {w_true.numpy().round(3)}")
    print(f"max |Sigma_NG - Sigma_Adam| = {(ng_q.covariance_matrix - adam_q.covariance_matrix).abs().max():.2e}")

    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(range(len(adam_trace)), adam_trace, label=f"Adam (lr {args.lr})")
        ax.plot(range(len(ng_trace)), ng_trace, "o-", label=f"natural gradient (step {args.step_size})")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_ylim(best - 20, best + 1)
        ax.set_xlabel("step")
        ax.set_ylabel("ELBO")
        ax.set_title("Gaussian VI for Bayesian logistic regression")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(args.output, dpi=120)
        print(f"saved {args.output}")
    return ng_trace, adam_trace


if __name__ == "__main__":
    main(ARGS)
