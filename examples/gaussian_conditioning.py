"""Impute missing coordinates of Gaussian data with JacobianMVN.condition, and check against the exact answer.

Rows are drawn from a known joint Gaussian and a random subset of each row's coordinates is hidden. For every
pattern of observed coordinates, ``condition(observed, values)`` gives the conditional distribution of the hidden
ones for all rows with that pattern at once (a batch); its mean is the imputation and its covariance the
uncertainty. The exact answer is the textbook formula mu_h + Sigma_ho Sigma_oo^{-1} (x_o - mu_o), solved densely.
The same is done from the precision parametrization, which conditions with a sub-block of P and no inverse.

Run: python examples/gaussian_conditioning.py [--dim 6] [--num-rows 500] [--missing 0.3]
"""

import argparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=6, help="event size d of the joint Gaussian")
    parser.add_argument("--num-rows", type=int, default=500, help="rows of data to impute")
    parser.add_argument("--missing", type=float, default=0.3, help="probability that a coordinate is hidden")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Gaussian, the data and the hidden cells")
    return parser.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()  # before torch loads, so that --help answers at once

import torch

from torch_mvn_ext import JacobianMVN


def exact_conditional_mean(loc, cov, observed, hidden, values):
    s_ho = cov[hidden][:, observed]
    s_oo = cov[observed][:, observed]
    return loc[hidden] + torch.linalg.solve(s_oo, (values - loc[observed]).T).T @ s_ho.T


def main(args):
    torch.manual_seed(args.seed)
    d = args.dim
    factors = torch.randn(d, 2, dtype=torch.float64)  # two latent factors: strongly correlated coordinates
    cov = factors @ factors.T + 0.2 * torch.eye(d, dtype=torch.float64)
    loc = torch.randn(d, dtype=torch.float64)
    joint = JacobianMVN(loc, covariance_matrix=cov)
    by_precision = JacobianMVN(loc, precision_matrix=joint.precision_matrix)

    data = joint.sample((args.num_rows,))
    hide = torch.rand(args.num_rows, d) < args.missing
    hide[hide.all(-1), 0] = False  # keep at least one observed coordinate per row
    keep = hide.any(-1)  # rows with something to impute
    data, hide = data[keep], hide[keep]

    imputed = data.clone()
    std = torch.zeros_like(data)
    max_diff = max_diff_precision = 0.0
    patterns = torch.unique(hide, dim=0)
    for pattern in patterns:
        rows = (hide == pattern).all(-1)
        observed = (~pattern).nonzero().squeeze(-1).tolist()
        hidden = pattern.nonzero().squeeze(-1).tolist()
        values = data[rows][:, observed]
        conditional = joint.condition(observed, values)  # batch shape (rows,), event shape (len(hidden),)
        exact = exact_conditional_mean(loc, cov, observed, hidden, values)
        max_diff = max(max_diff, (conditional.mean - exact).abs().max().item())
        other = by_precision.condition(observed, values)
        max_diff_precision = max(max_diff_precision, (other.mean - exact).abs().max().item())
        imputed[rows.nonzero(), torch.tensor(hidden)] = conditional.mean
        std[rows.nonzero(), torch.tensor(hidden)] = conditional.stddev

    truth, guess, sd = data[hide], imputed[hide], std[hide]
    mean_fill = loc.expand_as(data)[hide]
    rmse = (guess - truth).pow(2).mean().sqrt().item()
    rmse_mean = (mean_fill - truth).pow(2).mean().sqrt().item()
    coverage = ((guess - truth).abs() <= 1.96 * sd).double().mean().item()
    print(f"{len(data)} rows of a {d}-dimensional Gaussian, {int(hide.sum())} hidden values, "
          f"{len(patterns)} missingness patterns (one batched condition() call each)")
    print(f"max |conditional mean - exact formula|: {max_diff:.2e} (covariance parametrization), "
          f"{max_diff_precision:.2e} (precision parametrization)")
    print(f"imputation RMSE: conditional mean {rmse:.4f}, unconditional mean {rmse_mean:.4f}")
    print(f"hidden values inside the 95% conditional interval: {coverage:.1%}")
    first = hide[0].nonzero().squeeze(-1).tolist()
    print(f"row 0, hidden coordinates {first}: true {data[0, first].numpy().round(3)}, "
          f"imputed {imputed[0, first].numpy().round(3)} +- {std[0, first].numpy().round(3)}")
    return max_diff, max_diff_precision


if __name__ == "__main__":
    main(ARGS)
