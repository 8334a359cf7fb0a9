r"""One SVI step and one short NUTS run with ``JacobianMVN`` against the same program with Pyro's MVN.

The program is the conjugate model ``mu ~ N(m0, S0)``, ``x_i ~ N(mu, S)`` for ``i < N`` (``mu`` of size ``d``):

* ``svi``: one ``SVI.step`` with ``Trace_ELBO`` and Adam, the guide a full-covariance MVN over ``mu`` whose
  ``scale_tril`` is a ``constraints.lower_cholesky`` param; the likelihood's matrix given as ``--likelihood``;
* ``nuts``: ``MCMC(NUTS(model))`` with ``--nuts-samples`` samples after as many warmup steps, from the same seed,
  so both sides follow the same chain and evaluate the same number of gradients.

Both sides run in one process, in interleaved rounds whose order alternates; each reports the median over
rounds and the ratio ``pyro / ours`` of the medians (> 1 means ``JacobianMVN`` is faster). Before timing, the
two sides' ELBO losses and NUTS chains are checked to agree.

Usage::

    python benchmarks/pyro_speed.py                          # d in (4, 32), N = 256, ~1 minute
    python benchmarks/pyro_speed.py --d 8 --n 1000 --rounds 31 --threads 1
"""

import argparse
import platform
import statistics
import time
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from torch.distributions import constraints

from torch_mvn_ext import JacobianMVN

IMPLS = {"ours": JacobianMVN, "pyro": dist.MultivariateNormal}


def make_problem(d, n, likelihood, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    noise_cov = a @ a.T / d + 0.5 * torch.eye(d, dtype=torch.float64)
    matrix = {
        "covariance_matrix": noise_cov,
        "precision_matrix": torch.linalg.inv(noise_cov),
        "scale_tril": torch.linalg.cholesky(noise_cov),
    }[likelihood]
    data = torch.randn(n, d, generator=g, dtype=torch.float64) + 1.0
    prior_loc, prior_cov = torch.zeros(d, dtype=torch.float64), 4.0 * torch.eye(d, dtype=torch.float64)

    def model_for(mvn):
        def model(data):
            mu = pyro.sample("mu", mvn(prior_loc, covariance_matrix=prior_cov))
            with pyro.plate("data", data.shape[0]):
                pyro.sample("obs", mvn(mu, **{likelihood: matrix}), obs=data)

        return model

    def guide_for(mvn, prefix):
        def guide(data):
            loc = pyro.param(f"{prefix}_loc", lambda: torch.zeros(d, dtype=torch.float64))
            scale_tril = pyro.param(f"{prefix}_scale_tril", lambda: 0.1 * torch.eye(d, dtype=torch.float64),
                                    constraint=constraints.lower_cholesky)
            pyro.sample("mu", mvn(loc, scale_tril=scale_tril))

        return guide

    return data, model_for, guide_for


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def bench_svi(d, n, likelihood, rounds):
    data, model_for, guide_for = make_problem(d, n, likelihood)
    pyro.clear_param_store()
    svis = {}
    for name, mvn in IMPLS.items():
        optim = pyro.optim.Adam({"lr": 1e-3})
        svis[name] = SVI(model_for(mvn), guide_for(mvn, name), optim, Trace_ELBO(max_plate_nesting=1))
    losses = {}
    for name, svi in svis.items():  # warm up, and check that both sides compute the same loss
        pyro.set_rng_seed(0)
        losses[name] = svi.step(data)
    if abs(losses["ours"] - losses["pyro"]) > 1e-8 * max(1.0, abs(losses["pyro"])):
        raise RuntimeError(f"SVI losses differ: {losses}")
    times = {name: [] for name in IMPLS}
    for r in range(rounds):
        for name in list(IMPLS)[:: 1 if r % 2 == 0 else -1]:
            times[name].append(timed(svis[name].step, data)[0])
    return {name: statistics.median(t) for name, t in times.items()}


def bench_nuts(d, n, likelihood, rounds, num_samples):
    data, model_for, _ = make_problem(d, n, likelihood)

    def run(name):
        pyro.set_rng_seed(0)
        mcmc = MCMC(NUTS(model_for(IMPLS[name])), num_samples=num_samples, warmup_steps=num_samples,
                    disable_progbar=True)
        mcmc.run(data)
        return mcmc.get_samples()["mu"]

    chains = {name: run(name) for name in IMPLS}
    if not torch.allclose(chains["ours"], chains["pyro"], rtol=1e-6, atol=1e-6):
        raise RuntimeError("the NUTS chains differ")
    times = {name: [] for name in IMPLS}
    for r in range(rounds):
        for name in list(IMPLS)[:: 1 if r % 2 == 0 else -1]:
            times[name].append(timed(run, name)[0])
    return {name: statistics.median(t) for name, t in times.items()}


def main(args):
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), float64, likelihood given by {args.likelihood}, N = {args.n}")
    print(f"{'case':<6}{'d':>5}{'ours (ms)':>12}{'pyro (ms)':>12}{'pyro / ours':>13}")
    results = []
    for d in args.d:
        svi = bench_svi(d, args.n, args.likelihood, args.rounds)
        nuts = bench_nuts(d, args.n, args.likelihood, max(3, args.rounds // 4), args.nuts_samples)
        for case, t in (("svi", svi), ("nuts", nuts)):
            ratio = t["pyro"] / t["ours"]
            results.append((case, d, t["ours"], t["pyro"], ratio))
            print(f"{case:<6}{d:>5}{1e3 * t['ours']:>12.3f}{1e3 * t['pyro']:>12.3f}{ratio:>13.2f}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--likelihood", default="covariance_matrix",
                        choices=["covariance_matrix", "precision_matrix", "scale_tril"])
    parser.add_argument("--rounds", type=int, default=21, help="SVI rounds; NUTS runs a quarter as many (>= 3)")
    parser.add_argument("--nuts-samples", type=int, default=20, help="NUTS samples (and as many warmup steps)")
    parser.add_argument("--threads", type=int, default=1)
    main(parser.parse_args())
