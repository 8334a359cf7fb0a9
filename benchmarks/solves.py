r"""How fast this machine's BLAS forms :math:`\alpha = \Sigma^{-1} r` for row-major residuals ``r`` of shape ``(N, d)``.

``log_prob``, its gradients and the ``loc`` Jacobian all need :math:`\alpha`; given the Cholesky factor ``L`` there
are three ways to form it, and which is fastest depends on the CPU and its BLAS, not only on ``d`` and ``N``:

* ``left``: two triangular solves from the left on ``r^T`` (``solve_triangular(L, r.mT)``, then with ``L^T``),
  the route ``torch_mvn_ext`` takes (``_factor._solve_rows``);
* ``right``: the same two solves from the right on ``r`` itself (``left=False``);
* ``gemm``: ``r @ cholesky_inverse(L)``, forming :math:`\Sigma^{-1}` (timed with it) and one matrix product
  (taken by the library only for ``32 <= d < 128``: it is less accurate when ``L`` is exact, see
  ``benchmarks/accuracy.py``).

Each time is the median over interleaved rounds; ``GFLOP/s`` counts :math:`2 d^2 N` flops for the two solves and for
the product alike. Before timing, the three results are checked to agree.

Usage::

    python benchmarks/solves.py                     # float32 and float64, d in (8, 64, 256), ~1 minute
    python benchmarks/solves.py --d 64 --n 16384 --dtypes float32
"""

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import cpu_model  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def routes(factor):
    def left(r):
        z = torch.linalg.solve_triangular(factor, r.mT, upper=False)
        return torch.linalg.solve_triangular(factor.mT, z, upper=True).mT

    def right(r):
        z = torch.linalg.solve_triangular(factor.mT, r, upper=True, left=False)
        return torch.linalg.solve_triangular(factor, z, upper=False, left=False)

    def gemm(r):
        return r @ torch.cholesky_inverse(factor)

    return {"left": left, "right": right, "gemm": gemm}


def per_call(fn, r, min_time):
    """Seconds per call, from as many calls as fill ``min_time`` (at least one)."""
    reps, start = 0, time.perf_counter()
    while True:
        fn(r)
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / reps


def measure(d, n, dtype, rounds, min_time, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    factor = torch.linalg.cholesky(a @ a.T / d + torch.eye(d, dtype=torch.float64)).to(dtype)
    r = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    fns = routes(factor)
    exact = routes(factor.double())["left"](r.double())
    tol = 1e-3 if dtype == torch.float32 else 1e-10
    for name, fn in fns.items():
        err = ((fn(r).double() - exact).abs().max() / exact.abs().max()).item()
        if not err < tol:
            raise AssertionError(f"{name} disagrees with the float64 solve: relative error {err:.1e}")
    times = {name: [] for name in fns}
    for i in range(rounds):  # interleaved, the order alternating, so drift hits every route alike
        for name in list(fns)[:: 1 if i % 2 == 0 else -1]:
            times[name].append(per_call(fns[name], r, min_time))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "float64"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.02)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{platform.machine()} {os.cpu_count()}-core CPU ({cpu_model()}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'dtype':8} {'d':>4} {'N':>6} {'left us':>10} {'right us':>10} {'gemm us':>10} "
          f"{'left GF/s':>9} {'gemm GF/s':>9} {'left/right':>10} {'left/gemm':>9}")
    for dtype in args.dtypes:
        for d in args.d:
            for n in args.n:
                t = measure(d, n, DTYPES[dtype], args.rounds, args.min_time)
                flops = 2.0 * d * d * n
                print(f"{dtype:8} {d:4d} {n:6d} {t['left'] * 1e6:10.1f} {t['right'] * 1e6:10.1f} "
                      f"{t['gemm'] * 1e6:10.1f} {flops / t['left'] / 1e9:9.1f} {flops / t['gemm'] / 1e9:9.1f} "
                      f"{t['left'] / t['right']:10.2f} {t['left'] / t['gemm']:9.2f}", flush=True)


if __name__ == "__main__":
    main()
