"""Data-parallel SVI with torch.distributed: each process holds a shard of the data, gradients are all-reduced.

The model is the conjugate Gaussian ``mu ~ N(0, 4 I)``, ``y_i ~ N(mu, Sigma)`` with a JacobianMVN likelihood (given
by its precision matrix) and an AutoJacobianMVN guide. Every process seeds the same random state, so all of them
draw the same guide sample at each step; each scores its own shard in a ``pyro.plate`` subsample (which scales the
shard's log-likelihood by ``N / n_shard``), the gradients are weighted by ``n_shard / N`` and summed across
processes, and every process takes the same optimizer step. The summed gradient is exactly the single-process
gradient, so the run reaches the same parameters as ``python examples/distributed_svi.py`` alone.

Run:
    torchrun --nproc_per_node=2 examples/distributed_svi.py      # two processes, gloo backend
    python examples/distributed_svi.py                           # one process, no torch.distributed
"""

import argparse
import os


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=3, help="dimension of mu")
    parser.add_argument("--num-data", type=int, default=64, help="rows of data, split across the processes")
    parser.add_argument("--num-steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--num-particles", type=int, default=8, help="ELBO particles per step")
    parser.add_argument("--lr", type=float, default=0.1, help="initial Adam learning rate (decays 100-fold)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the guide samples")
    parser.add_argument("--output", default=None, help="save the final guide parameters here (rank 0); none if unset")
    return parser.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()  # before torch loads, so that --help answers at once

import pyro
import torch
import torch.distributed as dist
from pyro.infer import Trace_ELBO

from torch_mvn_ext import AutoJacobianMVN, JacobianMVN


def model(shard, index, num_data, precision):
    """``shard`` holds the rows ``index`` of the full ``(num_data, d)`` data set."""
    d = shard.shape[-1]
    prior_cov = 4.0 * torch.eye(d, dtype=shard.dtype)
    mu = pyro.sample("mu", JacobianMVN(torch.zeros(d, dtype=shard.dtype), covariance_matrix=prior_cov))
    with pyro.plate("data", num_data, subsample=index):
        pyro.sample("obs", JacobianMVN(mu, precision_matrix=precision), obs=shard)


def make_data(num_data, d, seed):
    """The same full data set on every process (in practice each would read only its own shard)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    sigma = a @ a.T / d + 0.5 * torch.eye(d, dtype=torch.float64)
    mu = 2.0 * torch.randn(d, generator=g, dtype=torch.float64)
    data = mu + torch.randn(num_data, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(sigma).T
    return data, torch.linalg.inv(sigma)


def main(args):
    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    if distributed:
        # Imported before the group exists: the functions of torch.distributed.nn take ``group.WORLD`` as a default
        # argument, so importing it afterwards (torch.optim's optimizers do, through torch._dynamo) would keep the
        # group alive past destroy_process_group, and its gloo threads would be torn down during interpreter exit,
        # which can abort the process ("terminate called without an active exception").
        from torch.distributed import nn  # noqa: F401

        dist.init_process_group("gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    data, precision = make_data(args.num_data, args.dim, args.seed)
    index = torch.arange(rank, args.num_data, world_size)  # this process's shard
    shard = data[index]
    weight = len(index) / args.num_data

    pyro.set_rng_seed(args.seed)  # the same on every process: the same guide samples
    guide = AutoJacobianMVN(model)
    guide(shard, index, args.num_data, precision)  # creates the parameters
    params = list(guide.parameters())
    if distributed:
        for p in params:
            dist.broadcast(p.data, src=0)
    optimizer = torch.optim.Adam(params, lr=args.lr)
    # The learning rate decays 100-fold over the run, so the final iterate settles near the optimum.
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.01 ** (1 / args.num_steps))
    elbo = Trace_ELBO(num_particles=args.num_particles, vectorize_particles=True, max_plate_nesting=1)

    for step in range(args.num_steps):
        optimizer.zero_grad()
        loss = elbo.differentiable_loss(model, guide, shard, index, args.num_data, precision) * weight
        loss.backward()
        loss = loss.detach()
        if distributed:
            for p in params:
                p.grad.mul_(weight)
                dist.all_reduce(p.grad)
            dist.all_reduce(loss)
        else:
            for p in params:
                p.grad.mul_(weight)
        optimizer.step()
        scheduler.step()
        if rank == 0 and step % max(1, args.num_steps // 4) == 0:
            print(f"step {step:4d}  loss {loss.item():10.4f}")

    if rank == 0:
        n = args.num_data
        post_cov = torch.linalg.inv(torch.eye(args.dim, dtype=torch.float64) / 4.0 + n * precision)
        post_mean = post_cov @ precision @ data.sum(0)
        q = guide.get_posterior()
        sd = post_cov.diagonal().sqrt()
        print(f"{world_size} process(es), shards of {len(index)} of {n} rows; posterior is a {type(q).__name__}")
        print(f"max |mean error| / posterior sd = {((q.loc.detach() - post_mean) / sd).abs().max():.3f}")
        if args.output:
            state = {k: v.detach().clone() for k, v in guide.named_parameters()}
            torch.save({"world_size": world_size, "params": state}, args.output)
    if distributed:
        # Every rank waits for rank 0's report before the group and its gloo threads go.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(ARGS)
