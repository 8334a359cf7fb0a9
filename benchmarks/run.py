r"""Speed and memory of ``torch_mvn_ext`` against what a user would otherwise write.

Every case times this library ("ours") and one or more baselines on the same inputs, in one process, in
interleaved rounds (the order alternates each round), and reports the ratio of medians
``baseline / ours`` (> 1 means this library is faster). Each timed callable includes building the
distribution, as user code does at every step. Before timing, each baseline's result is compared with ours.

Cases (``--cases``):

* ``lpg``: ``JacobianMVN(loc, covariance_matrix=C).log_prob_and_grads(x, reduction="sum")`` vs torch's
  ``MultivariateNormal(...).log_prob(x)`` + ``torch.autograd.grad`` w.r.t. ``x``, ``loc`` and ``C``, with default
  ``validate_args`` (as users run it) and with ``validate_args=False`` on both sides;
* ``jac_loc``, ``jac_scale_tril``, ``jac_cov``: per-sample ``jacobian(x, wrt)`` vs ``torch.func.vmap(grad)``
  through torch's MVN and, for small ``N``, ``torch.autograd.functional.jacobian`` (loc only);
* ``precision``: precision-parametrized ``log_prob`` vs torch's MVN built from ``precision_matrix``;
* ``autograd``, ``autograd_tril``: forward + backward through ``log_prob`` w.r.t. ``loc`` and the matrix
  (``covariance_matrix``, resp. ``scale_tril``) vs the same through torch's MVN;
* ``svi``: one ``pyro.infer.SVI`` step (``Trace_ELBO``, Adam) of a model with an MVN latent and ``N`` MVN
  observations, and ``nuts``: a short NUTS run on the same model, each with ``JacobianMVN`` vs Pyro's
  ``dist.MultivariateNormal``;
* ``memory``: peak memory of ``jacobian(x, "scale_tril")`` and ``jacobian(x, "covariance_matrix")`` and of
  ``vmap(grad)`` for the same, as a multiple of the size of the ``N x d x d`` output.

Memory is measured with the torch profiler's allocation trace (``profile_memory=True``): every allocation and
free made through torch's CPU allocator, in order, during one call; the peak of their running sum is the peak
number of bytes of tensors the call held at once above what existed before it (inputs not counted, output
counted). It sees every tensor torch allocates, also inside ``vmap`` and LAPACK workspaces that torch
allocates as tensors; it does not see Python objects or memory that BLAS/LAPACK allocate themselves (small).

Usage::

    python benchmarks/run.py                 # full grid, several minutes
    python benchmarks/run.py --quick         # about a minute
    python benchmarks/run.py --cases lpg memory --d 8 --n 1 16 --dtypes float32 --rounds 3 --min-time 0.001

Results go to ``benchmarks/results/`` (``results.json``, ``results.md``, ``speedups.png`` if matplotlib is
installed), or to ``--out``.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings

import torch
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN
from torch_mvn_ext._factor import cpuinfo

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"float32": torch.float32, "float64": torch.float64}
CASES = (
    "lpg",
    "jac_loc",
    "jac_scale_tril",
    "jac_cov",
    "precision",
    "autograd",
    "autograd_tril",
    "svi",
    "nuts",
    "memory",
)

# (case, baseline, d, N, minimum speedup) in float32, torch with default validation; memory: (case, ours, d, N, max
# peak / output).
TARGETS = [
    ("lpg", "torch", 8, 1, 6.0),
    ("lpg", "torch", 64, 1024, 3.0),
    ("lpg", "torch", 256, 4096, 1.5),
    ("jac_loc", "vmap_grad", 64, 1024, 50.0),
    ("jac_scale_tril", "vmap_grad", 64, 1024, 10.0),
    ("precision", "torch", 64, 1024, 3.0),
    ("autograd", "torch", 64, 1024, 1.5),
    ("autograd_tril", "torch", 64, 1024, 1.5),
]
MEMORY_TARGETS = [
    ("memory", "ours_scale_tril", 64, 1024, 1.5),
    ("memory", "ours_cov", 64, 1024, 1.5),
]


# --------------------------------------------------------------------------------------------------
# Inputs


def make_inputs(d, n, dtype, seed=0):
    """A well-conditioned covariance, its factors and ``n`` points drawn from the distribution."""
    g = torch.Generator().manual_seed(seed + 1000 * d + n)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.mT / d + torch.eye(d, dtype=torch.float64)
    tril = torch.linalg.cholesky(cov)
    prec = torch.cholesky_inverse(tril)
    prec = 0.5 * (prec + prec.mT)
    loc = torch.randn(d, generator=g, dtype=torch.float64)
    x = loc + torch.randn(n, d, generator=g, dtype=torch.float64) @ tril.mT
    return {k: v.to(dtype) for k, v in dict(loc=loc, cov=cov, tril=tril, prec=prec, x=x).items()}


def _leaf(t):
    return t.detach().requires_grad_()


# --------------------------------------------------------------------------------------------------
# Cases: each returns {name: callable}; "ours" (or names starting with "ours") are this library.
# A case returns None when the size is out of its range (see skip conditions in ``build``).


def case_lpg(inp, args):
    loc, cov, x = inp["loc"], inp["cov"], inp["x"]

    def ours(validate):
        return lambda: JacobianMVN(loc, covariance_matrix=cov, validate_args=validate).log_prob_and_grads(
            x, reduction="sum"
        )

    def torch_fwd_bwd(validate):
        def run():
            xs, ls, cs = _leaf(x), _leaf(loc), _leaf(cov)
            lp = MultivariateNormal(ls, covariance_matrix=cs, validate_args=validate).log_prob(xs)
            gx, gl, gc = torch.autograd.grad(lp.sum(), (xs, ls, cs))
            return lp, {"value": gx, "loc": gl, "covariance_matrix": gc}

        return run

    # ``validate_args=None`` is the default: torch validates unless told not to.
    return {
        "ours": ours(None),
        "torch": torch_fwd_bwd(None),
        "ours_noval": ours(False),
        "torch_noval": torch_fwd_bwd(False),
    }, {"torch": "ours", "torch_noval": "ours_noval"}


def _vmap_grad(inp, wrt):
    from torch.func import grad, vmap

    loc, tril, cov, x = inp["loc"], inp["tril"], inp["cov"], inp["x"]
    # The baseline in its fastest form, without validation (ours runs with torch's default validation).
    if wrt == "loc":

        def f(m, v):
            return MultivariateNormal(m, scale_tril=tril, validate_args=False).log_prob(v)

        return lambda: vmap(grad(f), in_dims=(None, 0))(loc, x)
    if wrt == "scale_tril":

        def f(m, v):
            return MultivariateNormal(loc, scale_tril=m, validate_args=False).log_prob(v)

        return lambda: vmap(grad(f), in_dims=(None, 0))(tril, x)

    def f(m, v):
        return MultivariateNormal(loc, covariance_matrix=m, validate_args=False).log_prob(v)

    return lambda: vmap(grad(f), in_dims=(None, 0))(cov, x)


def _jacobian_case(wrt, param):
    def case(inp, args):
        loc, x, matrix = inp["loc"], inp["x"], inp["cov" if param == "covariance_matrix" else "tril"]
        fns = {
            "ours": lambda: JacobianMVN(loc, **{param: matrix}).jacobian(x, wrt),
            "vmap_grad": _vmap_grad(inp, wrt),
        }
        n, d = x.shape
        if wrt == "loc" and n * d <= args.functional_max:
            from torch.autograd.functional import jacobian

            tril = inp["tril"]

            def functional():
                return jacobian(lambda m: MultivariateNormal(m, scale_tril=tril).log_prob(x), loc)

            fns["functional_jacobian"] = functional
        return fns, {k: "ours" for k in fns if k != "ours"}

    return case


def case_precision(inp, args):
    loc, prec, x = inp["loc"], inp["prec"], inp["x"]
    return {
        "ours": lambda: JacobianMVN(loc, precision_matrix=prec).log_prob(x),
        "torch": lambda: MultivariateNormal(loc, precision_matrix=prec).log_prob(x),
    }, {"torch": "ours"}


def _autograd_case(param):
    key = "cov" if param == "covariance_matrix" else "tril"

    def case(inp, args):
        loc, matrix, x = inp["loc"], inp[key], inp["x"]

        def make(cls):
            def run():
                ls, ms = _leaf(loc), _leaf(matrix)
                lp = cls(ls, **{param: ms}).log_prob(x)
                lp.sum().backward()
                return lp, {"loc": ls.grad, param: ms.grad}

            return run

        return {"ours": make(JacobianMVN), "torch": make(MultivariateNormal)}, {"torch": "ours"}

    return case


def _pyro_model(dist_cls, inp):
    import pyro
    from torch.distributions import constraints

    d = inp["loc"].shape[-1]
    dtype = inp["loc"].dtype
    prior_tril = torch.eye(d, dtype=dtype)
    obs_tril = inp["tril"]
    tag = dist_cls.__name__

    def model(data):
        z = pyro.sample("z", dist_cls(torch.zeros(d, dtype=dtype), scale_tril=prior_tril))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("obs", dist_cls(z, scale_tril=obs_tril), obs=data)

    def guide(data):
        q_loc = pyro.param(f"{tag}_q_loc", lambda: torch.zeros(d, dtype=dtype))
        q_tril = pyro.param(
            f"{tag}_q_tril", lambda: 0.1 * torch.eye(d, dtype=dtype), constraint=constraints.lower_cholesky
        )
        pyro.sample("z", dist_cls(q_loc, scale_tril=q_tril))

    return model, guide


def case_svi(inp, args):
    import pyro
    import pyro.distributions as pdist
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import Adam

    pyro.clear_param_store()
    data = inp["x"]

    def make(dist_cls):
        model, guide = _pyro_model(dist_cls, inp)
        svi = SVI(model, guide, Adam({"lr": 1e-3}), Trace_ELBO())
        return lambda: svi.step(data)

    return {"ours": make(JacobianMVN), "pyro": make(pdist.MultivariateNormal)}, {"pyro": "ours"}


def case_nuts(inp, args):
    import pyro
    import pyro.distributions as pdist
    from pyro.infer import MCMC, NUTS

    data = inp["x"]

    def make(dist_cls):
        model, _ = _pyro_model(dist_cls, inp)

        def run():
            pyro.set_rng_seed(0)  # the same trajectories for both: same model, same random stream
            kernel = NUTS(model, step_size=0.1, adapt_step_size=False, max_tree_depth=3)
            mcmc = MCMC(kernel, num_samples=args.nuts_samples, warmup_steps=0, disable_progbar=True)
            mcmc.run(data)
            return mcmc.get_samples()["z"]

        return run

    return {"ours": make(JacobianMVN), "pyro": make(pdist.MultivariateNormal)}, {"pyro": "ours"}


CASE_FUNCTIONS = {
    "lpg": case_lpg,
    "jac_loc": _jacobian_case("loc", "scale_tril"),
    "jac_scale_tril": _jacobian_case("scale_tril", "scale_tril"),
    "jac_cov": _jacobian_case("covariance_matrix", "covariance_matrix"),
    "precision": case_precision,
    "autograd": _autograd_case("covariance_matrix"),
    "autograd_tril": _autograd_case("scale_tril"),
    "svi": case_svi,
    "nuts": case_nuts,
}


# --------------------------------------------------------------------------------------------------
# Timing and checking


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return [torch.as_tensor(out)]


def max_rel_error(ours, ref):
    """Largest difference between two results relative to the reference's largest entry, over all tensors."""
    worst = 0.0
    for a, b in zip(_flatten(ours), _flatten(ref)):
        a, b = a.detach().double(), b.detach().double()
        scale = b.abs().max().clamp_min(1e-30)
        worst = max(worst, float((a - b).abs().max() / scale))
    return worst


def time_interleaved(fns, rounds, min_time):
    """Median seconds per call of each callable, timed in interleaved rounds (order alternating)."""
    loops = {}
    for name, fn in fns.items():
        fn()  # warm up (lazy imports, allocator, first-call dispatch)
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        loops[name] = max(1, math.ceil(min_time / max(elapsed, 1e-7)))
    times = {name: [] for name in fns}
    names = list(fns)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            fn, k = fns[name], loops[name]
            start = time.perf_counter()
            for _ in range(k):
                fn()
            times[name].append((time.perf_counter() - start) / k)
    return {name: statistics.median(t) for name, t in times.items()}, loops


def peak_bytes(fn):
    """Peak bytes of torch tensors held at once during one call of ``fn``, above what existed before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak, out


def run_memory(inp, args):
    """Peak memory of the matrix Jacobians, ours and vmap(grad), as multiples of the output's size."""
    loc, tril, cov, x = inp["loc"], inp["tril"], inp["cov"], inp["x"]
    fns = {
        "ours_scale_tril": lambda: JacobianMVN(loc, scale_tril=tril).jacobian(x, "scale_tril"),
        "vmap_grad_scale_tril": _vmap_grad(inp, "scale_tril"),
        "ours_cov": lambda: JacobianMVN(loc, covariance_matrix=cov).jacobian(x, "covariance_matrix"),
        "vmap_grad_cov": _vmap_grad(inp, "covariance_matrix"),
    }
    rows = []
    for name, fn in fns.items():
        fn()  # warm up, so one-off allocations are not counted
        peak, out = peak_bytes(fn)
        out_bytes = out.numel() * out.element_size()
        rows.append({"impl": name, "peak_bytes": peak, "output_bytes": out_bytes, "peak_over_output": peak / out_bytes})
    return rows


# --------------------------------------------------------------------------------------------------
# Driver


def sizes_from(args):
    sizes = [(d, n) for d in args.d for n in args.n]
    for s in args.extra_sizes:
        d, n = (int(v) for v in s.lower().split("x"))
        if (d, n) not in sizes:
            sizes.append((d, n))
    return sizes


def skip_reason(case, d, n, dtype, args):
    itemsize = torch.finfo(dtype).bits // 8
    # vmap(grad) materializes N x d x d tensors (per-sample copies of the matrix) for every Jacobian, loc included.
    if case.startswith("jac") or case == "memory":
        if n * d * d * itemsize > args.max_matrix_bytes:
            return "N x d x d tensors over --max-matrix-bytes"
    if case in ("svi", "nuts") and (n > args.pyro_max_n or d > args.pyro_max_d):
        return "over --pyro-max-n/--pyro-max-d"
    if case == "memory" and n < args.memory_min_n:
        return "under --memory-min-n"
    return None


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    sizes = sizes_from(args)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for case in args.cases:
            for d, n in sizes:
                reason = skip_reason(case, d, n, dtype, args)
                if reason:
                    continue
                inp = make_inputs(d, n, dtype)
                base = {"case": case, "dtype": dtype_name, "d": d, "N": n}
                if case == "memory":
                    for row in run_memory(inp, args):
                        results.append({**base, "kind": "memory", **row})
                        print(
                            f"{case:15s} {dtype_name} d={d:<4d} N={n:<6d} {row['impl']:22s} "
                            f"peak/output = {row['peak_over_output']:.2f}",
                            flush=True,
                        )
                    continue
                fns, pairs = CASE_FUNCTIONS[case](inp, args)
                outputs = {name: fn() for name, fn in fns.items()}
                medians, loops = time_interleaved(fns, args.rounds, args.min_time)
                for baseline, ours in pairs.items():
                    row = {
                        **base,
                        "kind": "speed",
                        "baseline": baseline,
                        "ours": ours,
                        "ours_s": medians[ours],
                        "baseline_s": medians[baseline],
                        "speedup": medians[baseline] / medians[ours],
                        "loops": [loops[ours], loops[baseline]],
                        "rounds": args.rounds,
                        # SVI steps draw different samples and update different parameters: nothing to compare.
                        "max_rel_error": None if case == "svi" else max_rel_error(outputs[ours], outputs[baseline]),
                    }
                    results.append(row)
                    print(
                        f"{case:15s} {dtype_name} d={d:<4d} N={n:<6d} {baseline:20s} "
                        f"ours {medians[ours] * 1e6:10.1f} us  baseline {medians[baseline] * 1e6:10.1f} us  "
                        f"speedup {row['speedup']:7.2f}x  (max rel. diff {row['max_rel_error'] or 0:.1e})",
                        flush=True,
                    )
    return results


def check_targets(results):
    rows = []
    f32 = [r for r in results if r["dtype"] == "float32"]
    speed = {(r["case"], r["baseline"], r["d"], r["N"]): r["speedup"] for r in f32 if r["kind"] == "speed"}
    memory = {(r["case"], r["impl"], r["d"], r["N"]): r["peak_over_output"] for r in f32 if r["kind"] == "memory"}
    for case, baseline, d, n, minimum in TARGETS:
        value = speed.get((case, baseline, d, n))
        rows.append(
            {
                "target": f"{case} vs {baseline}, d={d}, N={n}",
                "required": f">= {minimum:g}x",
                "measured": None if value is None else round(value, 2),
                "met": None if value is None else value >= minimum,
            }
        )
    for case, impl, d, n, maximum in MEMORY_TARGETS:
        value = memory.get((case, impl, d, n))
        rows.append(
            {
                "target": f"peak memory of {impl}, d={d}, N={n}",
                "required": f"<= {maximum:g}x output",
                "measured": None if value is None else round(value, 3),
                "met": None if value is None else value <= maximum,
            }
        )
    return rows


def _fmt(v, digits=1):
    return "—" if v is None else f"{v:.{digits}f}"


def markdown(results, targets, meta):
    lines = [
        "Speedup = median time of the baseline / median time of torch_mvn_ext (> 1: torch_mvn_ext is faster).",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} threads; "
        f"{meta['rounds']} interleaved rounds. Command: `{meta['command']}`",
        "",
    ]
    speed = [r for r in results if r["kind"] == "speed"]
    ns = sorted({r["N"] for r in speed})
    for dtype in sorted({r["dtype"] for r in speed}):
        lines += [f"### Speedups, {dtype}", ""]
        lines.append("| case | vs | d | " + " | ".join(f"N={n}" for n in ns) + " |")
        lines.append("| --- | --- | --- | " + " | ".join("---" for _ in ns) + " |")
        keys = []
        for r in speed:
            if r["dtype"] == dtype and (r["case"], r["baseline"], r["d"]) not in keys:
                keys.append((r["case"], r["baseline"], r["d"]))
        cells = {(r["case"], r["baseline"], r["d"], r["N"]): r["speedup"] for r in speed if r["dtype"] == dtype}
        for case, baseline, d in keys:
            vals = [cells.get((case, baseline, d, n)) for n in ns]
            cells_text = " | ".join("—" if v is None else f"{v:.1f}x" for v in vals)
            lines.append(f"| {case} | {baseline} | {d} | {cells_text} |")
        lines.append("")
    memory = [r for r in results if r["kind"] == "memory"]
    if memory:
        lines += ["### Peak memory of the matrix Jacobians (multiple of the N x d x d output)", ""]
        lines.append("| dtype | d | N | implementation | peak / output | peak (MiB) |")
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for r in memory:
            lines.append(
                f"| {r['dtype']} | {r['d']} | {r['N']} | {r['impl']} | {r['peak_over_output']:.2f} | "
                f"{r['peak_bytes'] / 2**20:.1f} |"
            )
        lines.append("")
    if targets:
        lines += ["### Targets (float32, torch with default validation)", ""]
        lines.append("| target | required | measured | met |")
        lines.append("| --- | --- | --- | --- |")
        for t in targets:
            met = "n/a" if t["met"] is None else ("yes" if t["met"] else "no")
            lines.append(f"| {t['target']} | {t['required']} | {_fmt(t['measured'], 2)} | {met} |")
        lines.append("")
    return "\n".join(lines)


def plot(results, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install torch_mvn_ext[plot]): no plot", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [r for r in results if r["kind"] == "speed"]
    panels = []
    for r in speed:
        if (r["case"], r["baseline"]) not in panels:
            panels.append((r["case"], r["baseline"]))
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    colors = {d: f"C{i}" for i, d in enumerate(sorted({r["d"] for r in speed}))}
    for ax, (case, baseline) in zip(axes.flat, panels):
        for dtype, style in (("float32", "-"), ("float64", "--")):
            for d, color in colors.items():
                pts = sorted(
                    (r["N"], r["speedup"])
                    for r in speed
                    if (r["case"], r["baseline"], r["dtype"], r["d"]) == (case, baseline, dtype, d)
                )
                if pts:
                    ax.plot(*zip(*pts), style, color=color, marker="o", label=f"d={d} {dtype}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{case} vs {baseline}", fontsize=9)
        ax.set_xlabel("N")
        ax.set_ylabel("speedup")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if panels:
        axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer sizes and rounds: about a minute")
    p.add_argument("--cases", nargs="+", choices=CASES, default=None, help="cases to run (default: all)")
    p.add_argument("--d", nargs="+", type=int, default=None, help="event sizes (default 8 64 256)")
    p.add_argument("--n", nargs="+", type=int, default=None, help="numbers of points (default 1 1024 16384)")
    p.add_argument("--extra-sizes", nargs="*", default=None, help="extra dxN points (default 256x4096)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per size (default 7; quick 5)")
    p.add_argument("--min-time", type=float, default=None, help="seconds per timed sample (default 0.05)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: stable ratios on a machine shared with other jobs; 0: torch's default)",
    )
    p.add_argument("--max-matrix-bytes", type=float, default=2**28, help="skip larger N x d x d outputs (bytes)")
    p.add_argument("--functional-max", type=int, default=64 * 64, help="largest N*d for autograd.functional.jacobian")
    p.add_argument("--pyro-max-n", type=int, default=1024)
    p.add_argument("--pyro-max-d", type=int, default=64)
    p.add_argument("--nuts-samples", type=int, default=10)
    p.add_argument("--memory-min-n", type=int, default=1024, help="smallest N for the memory case")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    quick = args.quick
    if args.extra_sizes is None:  # the d=256, N=4096 target point, unless sizes are given
        args.extra_sizes = ["256x4096"] if args.d is None and args.n is None and not quick else []
    if args.cases is None:
        args.cases = list(CASES)
    if args.d is None:
        args.d = [8, 64] if quick else [8, 64, 256]
    if args.n is None:
        args.n = [1, 1024] if quick else [1, 1024, 16384]
    if args.dtypes is None:
        args.dtypes = ["float32"] if quick else ["float32", "float64"]
    if args.rounds is None:
        args.rounds = 5 if quick else 7
    if args.min_time is None:
        args.min_time = 0.02 if quick else 0.05
    return args


def cpu_model():
    """The CPU's model name where the OS tells it (``/proc/cpuinfo`` on Linux), else ``platform.processor()``.

    It matters here: MKL's triangular solve runs several times slower on some CPUs than on others, relative to its GEMM.
    """
    return cpuinfo("model name") or platform.processor() or platform.system()


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*profiler.*")
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()}-core CPU ({cpu_model()})",
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "python": platform.python_version(),
        "rounds": args.rounds,
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    start = time.perf_counter()
    results = run(args)
    targets = check_targets(results)
    meta["seconds"] = round(time.perf_counter() - start, 1)
    os.makedirs(args.out, exist_ok=True)
    text = markdown(results, targets, meta)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "targets": targets}, f, indent=1)
    print()
    print(text)
    if not args.no_plot and plot(results, os.path.join(args.out, "speedups.png")):
        print(f"plot: {os.path.join(args.out, 'speedups.png')}")
    print(f"results: {args.out} ({meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
