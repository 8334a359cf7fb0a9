"""Builders of the one-matrix cases (``JacobianMVN`` against torch's ``MultivariateNormal`` and Pyro's), their
inputs, and the skip rules and options only they read; ``cases.py`` describes each case and registers it.

A builder takes the inputs of one size (``make_inputs``) and the command line's ``args``, and returns
``({name: callable}, {baseline: ours})`` (see ``registry.py``); the memory case's returns ``{implementation:
callable}``.
"""

import inspect

import floors
import torch
from calls import leaf, lpg_callables, vmap_grad
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN


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


def lpg(inp, args):
    loc, cov, x = inp["loc"], inp["cov"], inp["x"]
    return lpg_callables(loc, cov, x, lambda: floors.lpg(loc, cov, x))


def _vmap_grad(inp, wrt):
    """The oracle (``calls.vmap_grad``) through torch's MVN, parametrized by ``scale_tril`` unless ``wrt`` is the
    covariance."""
    param = "covariance_matrix" if wrt == "covariance_matrix" else "scale_tril"
    params = {"loc": inp["loc"], param: inp["cov" if param == "covariance_matrix" else "tril"]}
    return lambda: vmap_grad(MultivariateNormal, params, wrt, inp["x"])


def jacobian(wrt, param, floor):
    """The builder of ``jacobian(x, wrt)`` of the distribution made from ``param``, with ``floor`` as its floor."""

    def build(inp, args):
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

    return build


def precision(inp, args):
    loc, prec, x = inp["loc"], inp["prec"], inp["x"]
    return {
        "ours": lambda: JacobianMVN(loc, precision_matrix=prec).log_prob(x),
        "torch": lambda: MultivariateNormal(loc, precision_matrix=prec).log_prob(x),
        "ours_noval": lambda: JacobianMVN(loc, precision_matrix=prec, validate_args=False).log_prob(x),
        "torch_noval": lambda: MultivariateNormal(loc, precision_matrix=prec, validate_args=False).log_prob(x),
        "floor": lambda: floors.precision(loc, prec, x),
    }, {"torch": "ours", "torch_noval": "ours_noval"}


def autograd(param, floor):
    """The builder of forward + backward through ``log_prob`` w.r.t. ``loc`` and the matrix ``param``."""
    key = "cov" if param == "covariance_matrix" else "tril"

    def build(inp, args):
        loc, matrix, x = inp["loc"], inp[key], inp["x"]

        def make(cls, validate=None):
            def run():
                ls, ms = leaf(loc), leaf(matrix)
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

    return build


def compiled(inp, args):
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
        "floor": lambda: floors.lpg(loc, cov, x),
    }, {"torch_compiled": "ours_compiled", "ours_eager": "ours_compiled"}


def out_buffer(inp, args):
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


def has_out_parameter():
    return "out" in inspect.signature(JacobianMVN.jacobian).parameters


def out_buffer_size(size, dtype, args):
    """Why ``out_buffer`` skips a size: its batches' Jacobians too large, or ``N`` not made of whole batches."""
    d, n = size
    if min(n, args.out_batch) * d * d * (torch.finfo(dtype).bits // 8) > args.max_matrix_bytes:
        return "batch x d x d tensors over --max-matrix-bytes"
    if n % min(n, args.out_batch):
        return "N not a multiple of --out-batch"
    return None


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


def svi(inp, args):
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


def nuts(inp, args):
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


def pyro_size(size, dtype, args):
    d, n = size
    return "over --pyro-max-n/--pyro-max-d" if n > args.pyro_max_n or d > args.pyro_max_d else None


def memory(inp, args):
    """The matrix Jacobians, ours (full and ``vech`` layouts) and ``vmap(grad)``: ``{implementation: callable}``."""
    loc, tril, cov, x = inp["loc"], inp["tril"], inp["cov"], inp["x"]
    return {
        "ours_scale_tril": lambda: JacobianMVN(loc, scale_tril=tril).jacobian(x, "scale_tril"),
        "vmap_grad_scale_tril": _vmap_grad(inp, "scale_tril"),
        "ours_cov": lambda: JacobianMVN(loc, covariance_matrix=cov).jacobian(x, "covariance_matrix"),
        "vmap_grad_cov": _vmap_grad(inp, "covariance_matrix"),
        "ours_cov_vech": lambda: JacobianMVN(loc, covariance_matrix=cov).jacobian(
            x, "covariance_matrix", layout="vech"
        ),
        "ours_scale_tril_vech": lambda: JacobianMVN(loc, scale_tril=tril).jacobian(x, "scale_tril", layout="vech"),
    }


def memory_size(size, dtype, args):
    return "under --memory-min-n" if size[1] < args.memory_min_n else None
