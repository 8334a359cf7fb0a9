r"""Speed and memory of ``torch_mvn_ext`` against what a user would otherwise write.

Every case times this library ("ours") and one or more baselines on the same inputs, in one process, in
interleaved rounds (the order alternates each round), and reports the ratio of medians
``baseline / ours`` (> 1 means this library is faster). Each timed callable includes building the
distribution, as user code does at every step. Before timing, each baseline's result is compared with ours.

The speed cases also time **the floor**: the plain closed form a careful user writes by hand in a few lines,
with no validation — ``torch.linalg.cholesky`` of the matrix (part of the work at every call, as the
library factorizes at every call), two ``solve_triangular`` on the transposed row-major residuals
(``solve_triangular(L, R.mT)``), a few reductions, ``cholesky_inverse`` and one ``addmm``/``addcmul`` for
matrix derivatives. With :math:`r = x - \mu`, :math:`\Sigma = L L^T`, :math:`z = L^{-1} r`,
:math:`\alpha = \Sigma^{-1} r`: :math:`\log p = -\tfrac12 |z|^2 - \sum_i \log L_{ii} - \tfrac d2 \log 2\pi`,
:math:`\partial_x = -\alpha`, :math:`\partial_\mu = \alpha`,
:math:`\partial_\Sigma = \tfrac12 (\alpha\alpha^T - \Sigma^{-1})`,
:math:`\partial_L = \operatorname{tril}(\alpha z^T) - \operatorname{diag}(1 / L_{ii})`; for a precision
:math:`P = T^T T` (``T`` lower, from the Cholesky factor of the flipped ``P``), :math:`z = T r`. The floor is
timed in the same rounds, checked against ours before timing, and reported as ``library / floor`` (a time
ratio: > 1 means the library is slower than the hand-written floor).

Cases (``--cases``):

* ``lpg``: ``JacobianMVN(loc, covariance_matrix=C).log_prob_and_grads(x, reduction="sum")`` vs torch's
  ``MultivariateNormal(...).log_prob(x)`` + ``torch.autograd.grad`` w.r.t. ``x``, ``loc`` and ``C``, with default
  ``validate_args`` (as users run it) and with ``validate_args=False`` on both sides;
* ``jac_loc``, ``jac_scale_tril``, ``jac_cov``: per-sample ``jacobian(x, wrt)`` vs ``torch.func.vmap(grad)``
  through torch's MVN and, for small ``N``, ``torch.autograd.functional.jacobian`` (loc only);
* ``precision``: precision-parametrized ``log_prob`` vs torch's MVN built from ``precision_matrix``;
* ``autograd``, ``autograd_tril``: forward + backward through ``log_prob`` w.r.t. ``loc`` and the matrix
  (``covariance_matrix``, resp. ``scale_tril``) vs the same through torch's MVN (their floor: the hand-written
  gradients w.r.t. ``loc`` and the matrix, and ``log_prob``);
* ``compiled``: ``torch.compile(dynamic=False, fullgraph=True)`` of construction +
  ``log_prob_and_grads(x, reduction="sum")`` vs torch's MVN compiled the same way, its gradients taken by
  ``torch.func.grad`` inside the compiled function (this compiles to one graph; autograd of a compiled forward
  would compile a second, backward graph), and vs the eager library; all with ``validate_args=False``; its floor
  is ``lpg``'s, eager. Run at ``--compiled-sizes`` only (compiling takes seconds per size), dynamo reset before each;
* ``out_buffer``: a loop over batches of ``--out-batch`` points calling
  ``d.jacobian(x_batch, "covariance_matrix", out=buf)`` into one preallocated buffer, vs the same loop with a
  fresh output each call (skipped, with a note, by a library whose ``jacobian`` has no ``out`` parameter);
* ``svi``: one ``pyro.infer.SVI`` step (``Trace_ELBO``, Adam) of a model with an MVN latent and ``N`` MVN
  observations, and ``nuts``: a short NUTS run on the same model, each with ``JacobianMVN`` vs Pyro's
  ``dist.MultivariateNormal``;
* ``memory``: peak memory of ``jacobian(x, "scale_tril")`` and ``jacobian(x, "covariance_matrix")`` and of
  ``vmap(grad)`` for the same, as a multiple of the size of the ``N x d x d`` output.

Everything runs on ``--device`` (inputs are drawn on the CPU, from a seeded generator, and moved there); on a GPU
the device is synchronized before each timed sample and after each timed call. ``svi``, ``nuts`` and
``memory`` run on the CPU only and are skipped, with a note, on another device.

Memory is measured with the torch profiler's allocation trace (``profile_memory=True``): every allocation and
free made through torch's CPU allocator, in order, during one call; the peak of their running sum is the peak
number of bytes of tensors the call held at once above what existed before it (inputs not counted, output
counted). It sees every tensor torch allocates, also inside ``vmap`` and LAPACK workspaces that torch
allocates as tensors; it does not see Python objects or memory that BLAS/LAPACK allocate themselves (small).

Usage::

    python benchmarks/run.py                 # full grid, float32 and float64: tens of minutes
    python benchmarks/run.py --quick         # a few sizes, float32: about a minute (43-77 s on 2 shared cores)
    python benchmarks/run.py --device cuda   # the same on a GPU (CPU-only cases skipped)
    python benchmarks/run.py --cases lpg memory --d 8 --n 1 16 --dtypes float32 --rounds 3 --min-time 0.001
    python benchmarks/run.py --docs          # the full grid, and the reference's copy of the report (see below)

Results go to ``benchmarks/results/``, or to ``--out``: ``results.json``, ``results.md``, ``results.rst`` and, if
matplotlib is installed, ``plots/<family>.png``, one picture per family of cases (``lpg``; the ``jac_*`` cases;
``precision``; ``autograd`` and ``autograd_tril``; ``compiled``; ``out_buffer``; ``svi`` and ``nuts``) with a panel
per case and baseline (the speedup) and per case with a floor (``library / floor``), against ``N``.
``--docs`` also writes the report into the reference: ``docs/benchmark_results.rst``, which ``docs/performance.rst``
includes, with the pictures in ``docs/benchmark_plots/``; it is how that page is regenerated.
"""

import argparse
import inspect
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import time
import warnings

import torch
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN
from torch_mvn_ext._factor import cpuinfo

# This file's sibling modules, also where it is imported by its path (tests/test_dropin.py).
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
import many_small  # noqa: E402
from calls import leaf as _leaf  # noqa: E402
from calls import lpg_callables  # noqa: E402
from solve_routes import ROUTES, set_solve_route  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(os.path.dirname(HERE), "docs")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
CASES = (
    "lpg",
    "jac_loc",
    "jac_scale_tril",
    "jac_cov",
    "precision",
    "autograd",
    "autograd_tril",
    "compiled",
    "out_buffer",
    "svi",
    "nuts",
    "memory",
    *many_small.CASES,
)

# (case, baseline, d, N, minimum speedup) in float32, torch with default validation; memory: (case, ours, d, N, max
# peak / output).
TARGETS = [
    ("lpg", "torch", 8, 1, 5.0),
    ("lpg", "torch", 64, 1024, 2.5),
    ("lpg", "torch", 256, 4096, 1.5),
    ("jac_loc", "vmap_grad", 64, 1024, 50.0),
    ("jac_scale_tril", "vmap_grad", 64, 1024, 10.0),
    ("precision", "torch", 64, 1024, 3.0),
    ("autograd", "torch", 64, 1024, 1.5),
    ("autograd_tril", "torch", 64, 1024, 1.5),
    *many_small.TARGETS,
]
# (case, ours, d, N, maximum library / floor time ratio) in float32: the floor validates nothing, so it is compared
# with the library without validation ("ours_noval"); the validated library's cost is in the torch comparisons.
FLOOR_VARIANTS = ("ours_noval", "ours_compiled")
FLOOR_TARGETS = [
    ("lpg", "ours_noval", 8, 1, 1.3),
    ("lpg", "ours_noval", 64, 1024, 1.3),
    ("jac_cov", "ours_noval", 64, 1024, 1.3),
    *many_small.FLOOR_TARGETS,
]
MEMORY_TARGETS = [
    ("memory", "ours_scale_tril", 64, 1024, 1.5),
    ("memory", "ours_cov", 64, 1024, 1.5),
    ("memory", "ours_cov_vech", 64, 1024, 1.5),
    ("memory", "ours_scale_tril_vech", 64, 1024, 1.5),
]


# --------------------------------------------------------------------------------------------------
# Inputs


def make_inputs(d, n, dtype, device="cpu", seed=0):
    """A well-conditioned covariance, its factors and ``n`` points drawn from the distribution.

    Drawn in float64 from a seeded CPU generator, whatever the device, so every device sees the same numbers.
    """
    g = torch.Generator().manual_seed(seed + 1000 * d + n)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.mT / d + torch.eye(d, dtype=torch.float64)
    tril = torch.linalg.cholesky(cov)
    prec = torch.cholesky_inverse(tril)
    prec = 0.5 * (prec + prec.mT)
    loc = torch.randn(d, generator=g, dtype=torch.float64)
    x = loc + torch.randn(n, d, generator=g, dtype=torch.float64) @ tril.mT
    return {k: v.to(device=device, dtype=dtype) for k, v in dict(loc=loc, cov=cov, tril=tril, prec=prec, x=x).items()}


# --------------------------------------------------------------------------------------------------
# The floor: each case's result written by hand, without validation, from the same inputs at every call.
# ``r`` is N x d (row-major), so the solves run on ``r.mT`` (column-major, what LAPACK takes without a copy) and
# return ``z^T`` and ``alpha^T`` as d x N.

LOG_2PI = math.log(2 * math.pi)


def _floor_solves(loc, tril, x):
    """``z^T = L^{-1} r^T`` and ``alpha^T = L^{-T} z^T``, both d x N."""
    zt = torch.linalg.solve_triangular(tril, (x - loc).mT, upper=False)
    at = torch.linalg.solve_triangular(tril.mT, zt, upper=True)
    return zt, at


def _floor_log_prob(zt, tril):
    return -0.5 * zt.square().sum(0) - tril.diagonal().log().sum() - 0.5 * tril.shape[-1] * LOG_2PI


def _floor_grad_cov(at, tril):
    """``sum_i 0.5 (alpha_i alpha_i^T - Sigma^{-1})`` over the N points."""
    return torch.addmm(torch.cholesky_inverse(tril), at, at.mT, beta=-0.5 * at.shape[-1], alpha=0.5)


def _floor_grad_tril(at, zt, tril):
    """``sum_i tril(alpha_i z_i^T) - N diag(1 / L_ii)`` over the N points."""
    grad = (at @ zt.mT).tril_()
    grad.diagonal().sub_(tril.diagonal().reciprocal(), alpha=at.shape[-1])
    return grad


def floor_lpg(loc, cov, x):
    tril = torch.linalg.cholesky(cov)
    zt, at = _floor_solves(loc, tril, x)
    grads = {"value": -at.mT, "loc": at.sum(-1), "covariance_matrix": _floor_grad_cov(at, tril)}
    return _floor_log_prob(zt, tril), grads


def floor_jac_loc(loc, tril, x):
    return _floor_solves(loc, tril, x)[1].mT


def floor_jac_scale_tril(loc, tril, x):
    zt, at = _floor_solves(loc, tril, x)
    jac = (at.mT.unsqueeze(-1) * zt.mT.unsqueeze(-2)).tril_()
    jac.diagonal(dim1=-2, dim2=-1).sub_(tril.diagonal().reciprocal())
    return jac


def floor_jac_cov(loc, cov, x):
    tril = torch.linalg.cholesky(cov)
    alpha = _floor_solves(loc, tril, x)[1].mT
    sigma_inv = torch.cholesky_inverse(tril)
    return torch.addcmul(sigma_inv.mul(-0.5), alpha.unsqueeze(-1), alpha.unsqueeze(-2), value=0.5)


def floor_precision(loc, prec, x):
    # P = T^T T with T lower: the Cholesky factor of P with rows and columns reversed, reversed back and transposed.
    t = torch.linalg.cholesky(prec.flip(-2, -1)).flip(-2, -1).mT
    z = (x - loc) @ t.mT
    return -0.5 * z.square().sum(-1) + t.diagonal().log().sum() - 0.5 * t.shape[-1] * LOG_2PI


def floor_autograd(loc, cov, x):
    tril = torch.linalg.cholesky(cov)
    zt, at = _floor_solves(loc, tril, x)
    return _floor_log_prob(zt, tril), {"loc": at.sum(-1), "covariance_matrix": _floor_grad_cov(at, tril)}


def floor_autograd_tril(loc, tril, x):
    zt, at = _floor_solves(loc, tril, x)
    return _floor_log_prob(zt, tril), {"loc": at.sum(-1), "scale_tril": _floor_grad_tril(at, zt, tril)}


# --------------------------------------------------------------------------------------------------
# Cases: each returns ({name: callable}, {baseline: ours}); names starting with "ours" are this library, "floor"
# is the hand-written floor (compared with every "ours" of the case). Sizes out of a case's range are skipped
# before it is built (``skip_reason``).


def case_lpg(inp, args):
    loc, cov, x = inp["loc"], inp["cov"], inp["x"]
    return lpg_callables(loc, cov, x, lambda: floor_lpg(loc, cov, x))


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


def _jacobian_case(wrt, param, floor):
    def case(inp, args):
        loc, x, matrix = inp["loc"], inp["x"], inp["cov" if param == "covariance_matrix" else "tril"]
        fns = {
            "ours": lambda: JacobianMVN(loc, **{param: matrix}).jacobian(x, wrt),
            "ours_noval": lambda: JacobianMVN(loc, **{param: matrix}, validate_args=False).jacobian(x, wrt),
            "vmap_grad": _vmap_grad(inp, wrt),
            "floor": lambda: floor(loc, matrix, x),
        }
        n, d = x.shape
        if wrt == "loc" and n * d <= args.functional_max:
            from torch.autograd.functional import jacobian

            tril = inp["tril"]

            def functional():
                return jacobian(lambda m: MultivariateNormal(m, scale_tril=tril).log_prob(x), loc)

            fns["functional_jacobian"] = functional
        # Like for like: vmap_grad runs unvalidated, autograd.functional with torch's default validation.
        baselines = [k for k in fns if not k.startswith(("ours", "floor"))]
        return fns, {k: "ours" if k == "functional_jacobian" else "ours_noval" for k in baselines}

    return case


def case_precision(inp, args):
    loc, prec, x = inp["loc"], inp["prec"], inp["x"]
    return {
        "ours": lambda: JacobianMVN(loc, precision_matrix=prec).log_prob(x),
        "torch": lambda: MultivariateNormal(loc, precision_matrix=prec).log_prob(x),
        "ours_noval": lambda: JacobianMVN(loc, precision_matrix=prec, validate_args=False).log_prob(x),
        "torch_noval": lambda: MultivariateNormal(loc, precision_matrix=prec, validate_args=False).log_prob(x),
        "floor": lambda: floor_precision(loc, prec, x),
    }, {"torch": "ours", "torch_noval": "ours_noval"}


def _autograd_case(param, floor):
    key = "cov" if param == "covariance_matrix" else "tril"

    def case(inp, args):
        loc, matrix, x = inp["loc"], inp[key], inp["x"]

        def make(cls, validate=None):
            def run():
                ls, ms = _leaf(loc), _leaf(matrix)
                lp = cls(ls, **{param: ms}, validate_args=validate).log_prob(x)
                lp.sum().backward()
                return lp, {"loc": ls.grad, param: ms.grad}

            return run

        fns = {
            "ours": make(JacobianMVN),
            "torch": make(MultivariateNormal),
            "ours_noval": make(JacobianMVN, False),
            "torch_noval": make(MultivariateNormal, False),
            "floor": lambda: floor(loc, matrix, x),
        }
        return fns, {"torch": "ours", "torch_noval": "ours_noval"}

    return case


def case_compiled(inp, args):
    """``log_prob_and_grads(x, reduction="sum")`` compiled, vs torch's MVN + ``torch.func.grad`` compiled."""
    import torch._dynamo

    torch._dynamo.reset()  # a fresh cache for each size and dtype: no recompilation limit, no stale guards
    loc, cov, x = inp["loc"], inp["cov"], inp["x"]

    def ours(loc, cov, x):
        return JacobianMVN(loc, covariance_matrix=cov, validate_args=False).log_prob_and_grads(x, reduction="sum")

    def log_prob_sum(x, loc, cov):
        lp = MultivariateNormal(loc, covariance_matrix=cov, validate_args=False).log_prob(x)
        return lp.sum(), lp

    def torch_grads(loc, cov, x):
        (gx, gl, gc), lp = torch.func.grad(log_prob_sum, argnums=(0, 1, 2), has_aux=True)(x, loc, cov)
        return lp, {"value": gx, "loc": gl, "covariance_matrix": gc}

    compiled_ours = torch.compile(ours, dynamic=False, fullgraph=True, backend=args.compile_backend)
    compiled_torch = torch.compile(torch_grads, dynamic=False, fullgraph=True, backend=args.compile_backend)
    return {
        "ours_compiled": lambda: compiled_ours(loc, cov, x),
        "torch_compiled": lambda: compiled_torch(loc, cov, x),
        "ours_eager": lambda: ours(loc, cov, x),
        "floor": lambda: floor_lpg(loc, cov, x),
    }, {"torch_compiled": "ours_compiled", "ours_eager": "ours_compiled"}


def case_out_buffer(inp, args):
    """A loop of ``jacobian(x_batch, "covariance_matrix")`` over batches, into one buffer (``out=``) or fresh."""
    loc, cov, x = inp["loc"], inp["cov"], inp["x"]
    n, d = x.shape
    batches = x.split(min(args.out_batch, n))
    buf = x.new_empty(batches[0].shape + (d,))

    def into_buffer():
        dist = JacobianMVN(loc, covariance_matrix=cov)
        for xb in batches:
            dist.jacobian(xb, "covariance_matrix", out=buf)
        return buf

    def fresh():
        dist = JacobianMVN(loc, covariance_matrix=cov)
        for xb in batches:
            jac = dist.jacobian(xb, "covariance_matrix")
        return jac

    # Both return the last batch's Jacobian (the buffer holds it after the loop).
    return {"ours_out": into_buffer, "ours_fresh": fresh}, {"ours_fresh": "ours_out"}


def _has_out_parameter():
    return "out" in inspect.signature(JacobianMVN.jacobian).parameters


def _pyro_model(dist_cls, inp):
    import pyro
    from torch.distributions import constraints

    d = inp["loc"].shape[-1]
    dtype, device = inp["loc"].dtype, inp["loc"].device
    prior_tril = torch.eye(d, dtype=dtype, device=device)
    obs_tril = inp["tril"]
    tag = dist_cls.__name__

    def model(data):
        z = pyro.sample("z", dist_cls(torch.zeros(d, dtype=dtype, device=device), scale_tril=prior_tril))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("obs", dist_cls(z, scale_tril=obs_tril), obs=data)

    def guide(data):
        q_loc = pyro.param(f"{tag}_q_loc", lambda: torch.zeros(d, dtype=dtype, device=device))
        q_tril = pyro.param(
            f"{tag}_q_tril",
            lambda: 0.1 * torch.eye(d, dtype=dtype, device=device),
            constraint=constraints.lower_cholesky,
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
    "jac_loc": _jacobian_case("loc", "scale_tril", floor_jac_loc),
    "jac_scale_tril": _jacobian_case("scale_tril", "scale_tril", floor_jac_scale_tril),
    "jac_cov": _jacobian_case("covariance_matrix", "covariance_matrix", floor_jac_cov),
    "precision": case_precision,
    "autograd": _autograd_case("covariance_matrix", floor_autograd),
    "autograd_tril": _autograd_case("scale_tril", floor_autograd_tril),
    "compiled": case_compiled,
    "out_buffer": case_out_buffer,
    "svi": case_svi,
    "nuts": case_nuts,
    **many_small.CASE_FUNCTIONS,
}
# Cases run at their own sizes (the name of their option), not at --d x --n.
CASE_SIZES = {"compiled": "compiled_sizes", **{case: "many_small_sizes" for case in many_small.CASES}}


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


def synchronizer(device):
    """What waits for the device's queued work: ``torch.cuda.synchronize`` on CUDA, nothing on the CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return lambda: None
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return torch.accelerator.synchronize


def time_interleaved(fns, rounds, min_time, sync=lambda: None):
    """Median seconds per call of each callable, timed in interleaved rounds (order alternating).

    ``sync`` runs before each timed sample and after each call, so a call's time includes its queued device work.
    """
    loops = {}
    for name, fn in fns.items():
        fn()  # warm up (lazy imports, allocator, first-call dispatch)
        sync()
        start = time.perf_counter()
        fn()
        sync()
        elapsed = time.perf_counter() - start
        loops[name] = max(1, math.ceil(min_time / max(elapsed, 1e-7)))
    times = {name: [] for name in fns}
    names = list(fns)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            fn, k = fns[name], loops[name]
            sync()
            start = time.perf_counter()
            for _ in range(k):
                fn()
                sync()
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
        "ours_cov_vech": lambda: JacobianMVN(loc, covariance_matrix=cov).jacobian(
            x, "covariance_matrix", layout="vech"
        ),
        "ours_scale_tril_vech": lambda: JacobianMVN(loc, scale_tril=tril).jacobian(x, "scale_tril", layout="vech"),
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


def parse_sizes(texts):
    """``["8x1", "64x1024"]`` -> ``[(8, 1), (64, 1024)]``."""
    return [tuple(int(v) for v in t.lower().split("x")) for t in texts]


def sizes_from(args):
    sizes = [(d, n) for d in args.d for n in args.n]
    for size in parse_sizes(args.extra_sizes):
        if size not in sizes:
            sizes.append(size)
    return sizes


def skip_reason(case, d, n, dtype, args):
    itemsize = torch.finfo(dtype).bits // 8
    if case in ("svi", "nuts", "memory") and torch.device(args.device).type != "cpu":
        return "CPU only"
    if case == "out_buffer" and not _has_out_parameter():
        return "JacobianMVN.jacobian has no out= parameter in this version of the library"
    # vmap(grad) materializes N x d x d tensors (per-sample copies of the matrix) for every Jacobian, loc included.
    if case.startswith("jac") or case == "memory":
        if n * d * d * itemsize > args.max_matrix_bytes:
            return "N x d x d tensors over --max-matrix-bytes"
    if case == "out_buffer" and min(n, args.out_batch) * d * d * itemsize > args.max_matrix_bytes:
        return "batch x d x d tensors over --max-matrix-bytes"
    if case == "out_buffer" and n % min(n, args.out_batch):
        return "N not a multiple of --out-batch"
    if case in ("svi", "nuts") and (n > args.pyro_max_n or d > args.pyro_max_d):
        return "over --pyro-max-n/--pyro-max-d"
    if case == "memory" and n < args.memory_min_n:
        return "under --memory-min-n"
    if case in many_small.CASES:
        return many_small.skip_reason(case, d, n, dtype, args)
    return None


def _ratio(num, den):
    return None if num is None or den is None else num / den


def run(args):
    """Every case at every size and dtype; returns the result rows and the skips, ``{"case: reason": [sizes]}``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    skipped = {}
    sync = synchronizer(args.device)
    sizes = sizes_from(args)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for case in args.cases:
            for d, n in parse_sizes(getattr(args, CASE_SIZES[case])) if case in CASE_SIZES else sizes:
                reason = skip_reason(case, d, n, dtype, args)
                if reason:
                    key = f"{case}: {reason}"
                    if key not in skipped:
                        print(f"{case:15s} skipped: {reason}", flush=True)
                    skipped.setdefault(key, []).append(f"{dtype_name} d={d} N={n}")
                    continue
                inp = make_inputs(d, n, dtype, args.device)
                base = {"case": case, "dtype": dtype_name, "device": str(args.device), "d": d, "N": n}
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
                # SVI steps draw different samples and update different parameters: nothing to compare.
                errors = {
                    (other, ours): None if case == "svi" else max_rel_error(outputs[ours], outputs[other])
                    for other, ours in list(pairs.items()) + [("floor", o) for o in FLOOR_VARIANTS if o in fns]
                    if other in fns
                }
                medians, loops = time_interleaved(fns, args.rounds, args.min_time, sync)
                floor_s = medians.get("floor")
                for baseline, ours in pairs.items():
                    # The floor validates nothing: its ratio is given on the rows of the unvalidated library.
                    row_floor_s = floor_s if ours in FLOOR_VARIANTS else None
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
                        "max_rel_error": errors[baseline, ours],
                        # The hand-written floor, where the case has one: time ratio library / floor (> 1: slower).
                        "floor_s": row_floor_s,
                        "library_over_floor": _ratio(medians[ours], row_floor_s),
                        "floor_max_rel_error": errors.get(("floor", ours)),
                    }
                    results.append(row)
                    floor_text = ""
                    if row_floor_s is not None:
                        floor_text = (
                            f"  library/floor {row['library_over_floor']:5.2f} "
                            f"(floor {row_floor_s * 1e6:.1f} us, max rel. diff {row['floor_max_rel_error']:.1e})"
                        )
                    print(
                        f"{case:15s} {dtype_name} d={d:<4d} N={n:<6d} {baseline:20s} "
                        f"{ours:13s} {medians[ours] * 1e6:10.1f} us  baseline {medians[baseline] * 1e6:10.1f} us  "
                        f"speedup {row['speedup']:7.2f}x  (max rel. diff {row['max_rel_error'] or 0:.1e})" + floor_text,
                        flush=True,
                    )
    return results, skipped


def check_targets(results):
    f32 = [r for r in results if r["dtype"] == "float32"]
    speed = {(r["case"], r["baseline"], r["d"], r["N"]): r["speedup"] for r in f32 if r["kind"] == "speed"}
    floor = {(r["case"], r["ours"], r["d"], r["N"]): r["library_over_floor"] for r in f32 if r["kind"] == "speed"}
    memory = {(r["case"], r["impl"], r["d"], r["N"]): r["peak_over_output"] for r in f32 if r["kind"] == "memory"}
    # (label, required, measured, whether it is met); a target whose size was not run is "n/a".
    checks = [
        (f"{case} vs {other}, d={d}, N={n}", f">= {bound:g}x", speed.get((case, other, d, n)), bound, False)
        for case, other, d, n, bound in TARGETS
    ]
    checks += [
        (f"{case}, {ours} / floor, d={d}, N={n}", f"<= {bound:g}x", floor.get((case, ours, d, n)), bound, True)
        for case, ours, d, n, bound in FLOOR_TARGETS
    ]
    checks += [
        (f"peak memory of {impl}, d={d}, N={n}", f"<= {bound:g}x output", memory.get((case, impl, d, n)), bound, True)
        for case, impl, d, n, bound in MEMORY_TARGETS
    ]
    return [
        {
            "target": target,
            "required": required,
            "measured": None if value is None else round(value, 3 if target.startswith("peak") else 2),
            "met": None if value is None else (value <= bound if at_most else value >= bound),
        }
        for target, required, value, bound, at_most in checks
    ]


def _fmt(v, digits=1):
    return "—" if v is None else f"{v:.{digits}f}"


# The report's sections: each family of cases gets one picture and its tables (title, cases, file name of the picture).
FAMILIES = [
    ("`log_prob_and_grads(x, reduction=\"sum\")` against torch's MVN + autograd (`lpg`)", ("lpg",), "lpg"),
    ("Per-sample Jacobians against `vmap(grad)` (`jac_loc`, `jac_scale_tril`, `jac_cov`)",
     ("jac_loc", "jac_scale_tril", "jac_cov"), "jacobians"),
    ("`log_prob` from a precision matrix (`precision`)", ("precision",), "precision"),
    ("Autograd through `log_prob` (`autograd`, `autograd_tril`)", ("autograd", "autograd_tril"), "autograd"),
    ("`torch.compile` (`compiled`)", ("compiled",), "compiled"),
    ("A reused output buffer, `out=` (`out_buffer`)", ("out_buffer",), "out_buffer"),
    ("Pyro: an SVI step and a NUTS run (`svi`, `nuts`)", ("svi", "nuts"), "pyro"),
    ("Many small Gaussians, one matrix per member, B members (`many_small_*`; N is B)", many_small.CASES, "many_small"),
]


def _table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + [
        "| " + " | ".join(row) + " |" for row in rows
    ] + [""]


def family_tables(rows, cases):
    """Markdown tables of one family's speed rows, per dtype: the speedups (a row per case, baseline and d) and, where
    the case has a floor, library / floor (a row per case and d); a column per N measured, so that each table stays
    narrow enough for the page."""
    lines = []
    several = len({r["case"] for r in rows}) > 1
    for dtype in sorted({r["dtype"] for r in rows}):
        mine = [r for r in rows if r["dtype"] == dtype]
        baselines = list(dict.fromkeys(r["baseline"] for r in mine))
        keys = sorted(
            {(r["case"], r["baseline"], r["d"]) for r in mine},
            key=lambda k: (cases.index(k[0]), baselines.index(k[1]), k[2]),
        )
        ns = sorted({r["N"] for r in mine})
        cells = {(r["case"], r["baseline"], r["d"], r["N"]): r["speedup"] for r in mine}
        head = (["case"] if several else []) + ["baseline", "d"]
        body = [
            ([case] if several else []) + [baseline, str(d)]
            + [_fmt(cells.get((case, baseline, d, n))) + ("x" if (case, baseline, d, n) in cells else "") for n in ns]
            for case, baseline, d in keys
        ]
        lines += [f"### Speedup, {dtype}", ""] + _table(head + [f"N={n}" for n in ns], body)
        floors = {
            (r["case"], r["d"], r["N"]): r["library_over_floor"] for r in mine if r["library_over_floor"] is not None
        }
        if floors:
            fkeys = sorted({(c, d) for c, d, _ in floors}, key=lambda k: (cases.index(k[0]), k[1]))
            fns = sorted({n for _, _, n in floors})
            body = [
                ([case] if several else []) + [str(d)] + [_fmt(floors.get((case, d, n)), 2) for n in fns]
                for case, d in fkeys
            ]
            head = (["case"] if several else []) + ["d"]
            lines += [f"### library / floor, {dtype}", ""] + _table(head + [f"N={n}" for n in fns], body)
    return lines


def markdown(results, targets, meta, skipped, pictures=None):
    """The report in markdown; ``pictures`` maps a family's file name to the path of its picture, as the report
    should link it (no pictures without it)."""
    pictures = pictures or {}
    lines = [
        "Speedup = median time of the baseline / median time of torch_mvn_ext (> 1: torch_mvn_ext is faster). "
        "library / floor = median time of torch_mvn_ext without validation (on the rows of the unvalidated or "
        "compiled library) / median time of the hand-written "
        "closed form (> 1: torch_mvn_ext is slower than the floor).",
        "",
        f"Machine: {meta['machine']}, device {meta['device']}; torch {meta['torch']}, {meta['threads']} threads; "
        f"{meta['rounds']} interleaved rounds. Command: `{meta['command']}`",
        "",
    ]
    if meta.get("load_average"):
        start, end = meta["load_average"]
        lines += [
            f"Load average of the machine (1 minute): {start:.1f} at the start, {end:.1f} at the end; other processes "
            f"running alongside take time from the timed calls and make the ratios noisier.",
            "",
        ]
    speed = [r for r in results if r["kind"] == "speed"]
    for title, cases, name in FAMILIES:
        rows = [r for r in speed if r["case"] in cases]
        if not rows:
            continue
        lines += [f"## {title}", ""]
        if name in pictures:
            lines += [f"![speedups and library / floor, {name}]({pictures[name]})", ""]
        lines += family_tables(rows, cases)
    memory = [r for r in results if r["kind"] == "memory"]
    if memory:
        lines += ["## Peak memory of the matrix Jacobians (multiple of the N x d x d output)", ""]
        body = [
            [r["dtype"], str(r["d"]), str(r["N"]), r["impl"], f"{r['peak_over_output']:.2f}",
             f"{r['peak_bytes'] / 2**20:.1f}"]
            for r in memory
        ]
        lines += _table(["dtype", "d", "N", "implementation", "peak / output", "peak (MiB)"], body)
    if targets:
        lines += ["## Targets (float32; torch and the library with default validation)", ""]
        body = [
            [t["target"], t["required"], _fmt(t["measured"], 2),
             "n/a" if t["met"] is None else ("yes" if t["met"] else "no")]
            for t in targets
        ]
        lines += _table(["target", "required", "measured", "met"], body)
    if skipped:
        lines += ["## Skipped", ""]
        for reason, where in skipped.items():
            lines.append(f"- {reason} ({', '.join(where)})")
        lines.append("")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_family(plt, rows, cases, title, path):
    """One picture of a family: a panel per case and baseline (the speedup) and per case with a floor (library /
    floor), each against N, a line per d (colour) and dtype (line style); the grey line is parity."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator

    panels = {}
    for r in sorted(rows, key=lambda r: cases.index(r["case"])):
        key = (f"{r['case']} vs {r['baseline']}", "speedup")
        panels.setdefault(key, {}).setdefault((r["dtype"], r["d"]), {})[r["N"]] = r["speedup"]
    for r in rows:
        if r["library_over_floor"] is not None:
            key = (f"{r['case']}: library / floor", "library / floor")
            panels.setdefault(key, {}).setdefault((r["dtype"], r["d"]), {})[r["N"]] = r["library_over_floor"]
    ds = sorted({r["d"] for r in rows})
    dtypes = sorted({r["dtype"] for r in rows})
    colors = {d: f"C{i}" for i, d in enumerate(ds)}
    styles = dict(zip(["float32", "float64"], ["-", "--"]))
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.7 * nrows + 0.5), squeeze=False)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax, ((label, ylabel), series) in zip(axes.flat, panels.items()):
        values = [v for points in series.values() for v in points.values()]
        for (dtype, d), points in sorted(series.items()):
            ns = sorted(points)
            ax.plot(ns, [points[n] for n in ns], styles.get(dtype, ":"), color=colors[d], marker="o", ms=3)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ns = sorted({n for points in series.values() for n in points})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        if max(values) / min(values) > 3:  # a log axis for ratios over a wide range
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("N", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles = [Line2D([], [], color=colors[d], marker="o", ms=3, label=f"d={d}") for d in ds]
    handles += [Line2D([], [], color="black", ls=styles.get(t, ":"), label=t) for t in dtypes]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title.replace("`", ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.3 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def clear_pictures(folder):
    """Makes ``folder`` and removes the families' pictures of an earlier run from it (nothing else)."""
    os.makedirs(folder, exist_ok=True)
    for _, _, name in FAMILIES:
        if os.path.exists(os.path.join(folder, f"{name}.png")):
            os.remove(os.path.join(folder, f"{name}.png"))


def write_pictures(plt, results, folder):
    """A PNG per family with results into ``folder`` (see :func:`clear_pictures`); returns ``{family: file name}``."""
    clear_pictures(folder)
    speed = [r for r in results if r["kind"] == "speed"]
    written = {}
    for title, cases, name in FAMILIES:
        rows = [r for r in speed if r["case"] in cases]
        if rows:
            plot_family(plt, rows, cases, title, os.path.join(folder, f"{name}.png"))
            written[name] = f"{name}.png"
    return written


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="float32, d in (8, 64), N in (1, 1024), fewer rounds: about a minute"
    )
    p.add_argument("--cases", nargs="+", choices=CASES, default=None, help="cases to run (default: all)")
    p.add_argument("--d", nargs="+", type=int, default=None, help="event sizes (default 2 8 64 256)")
    p.add_argument("--n", nargs="+", type=int, default=None, help="numbers of points (default 1 1024 16384)")
    p.add_argument("--extra-sizes", nargs="*", default=None, help="extra dxN points (default 256x4096)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None, help="default float32 float64")
    p.add_argument("--device", default="cpu", help="where inputs are made and every case runs (default cpu)")
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
    p.add_argument(
        "--compiled-sizes", nargs="+", default=None, help="dxN points of the compiled case (default 8x1 64x1024)"
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled case")
    p.add_argument("--out-batch", type=int, default=4096, help="points per batch in the out_buffer case")
    p.add_argument(
        "--many-small-sizes",
        nargs="+",
        default=None,
        help="dxB points of the many_small cases (default d in 1 2 3 4 6 8, B in 1e3 1e5 1e6; quick 2x1e5 3x1e5)",
    )
    p.add_argument(
        "--solve-route",
        choices=ROUTES,
        default="auto",
        help="route of the library's float32 solves (_factor._RIGHT_SOLVE_IS_FASTER; default auto: the machine's)",
    )
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder")
    p.add_argument("--no-plot", action="store_true", help="no pictures (they need matplotlib)")
    p.add_argument(
        "--docs",
        nargs="?",
        const=DOCS,
        default=None,
        metavar="DIR",
        help="also write the report for the reference: DIR/benchmark_results.rst, which docs/performance.rst\n"
        "includes, and its pictures in DIR/benchmark_plots/ (DIR: the repository's docs/ if not given;\n"
        "needs matplotlib)",
    )
    args = p.parse_args(argv)
    if args.docs is not None and (args.no_plot or pyplot() is None):
        p.error("--docs needs the pictures: matplotlib installed (pip install matplotlib) and no --no-plot")
    quick = args.quick
    if args.extra_sizes is None:  # the d=256, N=4096 target point, unless sizes are given
        args.extra_sizes = ["256x4096"] if args.d is None and args.n is None and not quick else []
    if args.cases is None:
        args.cases = list(CASES)
    if args.d is None:
        args.d = [8, 64] if quick else [2, 8, 64, 256]
    if args.n is None:
        args.n = [1, 1024] if quick else [1, 1024, 16384]
    if args.dtypes is None:
        args.dtypes = ["float32"] if quick else ["float32", "float64"]
    if args.compiled_sizes is None:
        args.compiled_sizes = ["8x1", "64x1024"]
    if args.many_small_sizes is None:
        args.many_small_sizes = many_small.QUICK_SIZES if quick else many_small.SIZES
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
    device = torch.device(args.device)
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()}-core CPU ({cpu_model()})",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "python": platform.python_version(),
        "rounds": args.rounds,
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "solve_route": set_solve_route(args.solve_route),  # forces the route for the whole run
    }
    start = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results, skipped = run(args)
    targets = check_targets(results)
    meta["seconds"] = round(time.perf_counter() - start, 1)
    if load_start is not None:
        meta["load_average"] = [load_start, os.getloadavg()[0]]
    os.makedirs(args.out, exist_ok=True)
    plt = None if args.no_plot else pyplot()
    if plt is None and not args.no_plot:
        print("matplotlib is not installed (pip install matplotlib): no pictures", file=sys.stderr)
    plots = os.path.join(args.out, "plots")
    pictures = write_pictures(plt, results, plots) if plt is not None else {}
    text = markdown(results, targets, meta, skipped, {k: f"plots/{v}" for k, v in pictures.items()})
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.rst"), "w") as f:
        f.write(markdown_to_rst(text))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "targets": targets, "skipped": skipped}, f, indent=1)
    print()
    print(text)
    if args.docs is not None:
        # The reference's copy: the same report, its pictures next to it in benchmark_plots/.
        docs_plots = os.path.join(args.docs, "benchmark_plots")
        clear_pictures(docs_plots)
        for name in pictures.values():
            shutil.copyfile(os.path.join(plots, name), os.path.join(docs_plots, name))
        docs_text = markdown(results, targets, meta, skipped, {k: f"benchmark_plots/{v}" for k, v in pictures.items()})
        with open(os.path.join(args.docs, "benchmark_results.rst"), "w") as f:
            f.write(markdown_to_rst(docs_text))
        print(f"reference: {os.path.join(args.docs, 'benchmark_results.rst')} and {docs_plots}")
    print(f"results: {args.out} ({meta['seconds']} s)")
    return 0


def markdown_to_rst(text):
    """The report in reStructuredText, for the reference (``docs/performance.rst`` includes it under its "Results"
    section): ``##`` headings become subsections (``~``), ``###`` rubrics, pipe tables list-tables, ``![alt](path)``
    images; other lines stay as they are."""
    out, table = [], []

    def flush():
        if not table:
            return
        rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table]
        rows = [r for r in rows if not all(set(c) <= set("-: ") for c in r)]  # the separator row
        out.extend(["", ".. list-table::", "   :header-rows: 1", ""])
        empty = "\\"  # an empty cell
        for row in rows:
            cells = [cell.replace("`", "``") or empty for cell in row]
            out.extend(f"   {'*' if i == 0 else ' '} - {cell}" for i, cell in enumerate(cells))
        out.append("")
        table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        image = re.fullmatch(r"!\[(.*)\]\((.*)\)", line)
        if image:
            out.extend(["", f".. image:: {image[2]}", f"   :alt: {image[1]}", ""])
        elif line.startswith("## "):
            title = line[3:].strip().replace("`", "``")
            out.extend(["", title, "~" * len(title), ""])
        elif line.startswith("#"):
            out.extend(["", f".. rubric:: {line.lstrip('#').strip().replace('`', '``')}", ""])
        else:
            out.append(line.replace("`", "``").replace("````", "``"))
    flush()
    return "\n".join(out).strip() + "\n"


if __name__ == "__main__":
    sys.exit(main())
