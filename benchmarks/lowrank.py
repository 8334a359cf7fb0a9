r"""Builders of the low-rank cases: ``JacobianLowRankMVN(loc, cov_factor, cov_diag)`` against torch's
``LowRankMultivariateNormal``; ``cases.py`` describes and registers them.

The covariance is :math:`\Sigma = W W^\top + D`: ``cov_factor`` :math:`W` of shape ``(d, k)``, ``cov_diag``
:math:`D` of shape ``(d,)``; ``N`` points ``x`` of shape ``(N, d)``. Sizes are ``dxkxN`` (``--lowrank-sizes``).
Both cases are skipped, with a note, by a library without ``JacobianLowRankMVN``; neither has a floor yet.
"""

import math

import torch
from calls import leaf, vmap_grad
from torch.distributions import LowRankMultivariateNormal

import torch_mvn_ext

SIZES = [f"{d}x{k}x256" for d in (64, 1024, 4096) for k in (4, 16, 64)]
QUICK_SIZES = ["1024x16x256"]
GRADS = ("value", "loc", "cov_factor", "cov_diag")


def has_class():
    return hasattr(torch_mvn_ext, "JacobianLowRankMVN")


def make_inputs(d, k, n, dtype, device="cpu", seed=0):
    """A low-rank factor (entries of variance ``1 / k``), a diagonal in ``[0.5, 1.5)``, a mean and ``n`` points drawn
    from the distribution.

    Drawn in float64 from a seeded CPU generator, whatever the device, so every device sees the same numbers.
    """
    g = torch.Generator().manual_seed(seed + 1000 * d + 100 * k + n)
    factor = torch.randn(d, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    diag = 0.5 + torch.rand(d, generator=g, dtype=torch.float64)
    loc = torch.randn(d, generator=g, dtype=torch.float64)
    x = loc + torch.randn(n, k, generator=g, dtype=torch.float64) @ factor.mT
    x = x + torch.randn(n, d, generator=g, dtype=torch.float64) * diag.sqrt()
    inputs = dict(loc=loc, cov_factor=factor, cov_diag=diag, x=x)
    return {name: t.to(device=device, dtype=dtype) for name, t in inputs.items()}


def _params(inp):
    return {name: inp[name] for name in ("loc", "cov_factor", "cov_diag")}


def lpg(inp, args):
    """``log_prob_and_grads(x, reduction="sum")``, which is to return ``(log_prob, {name: gradient})`` for the names
    of ``GRADS``, vs torch's ``log_prob`` + ``torch.autograd.grad`` w.r.t. ``x`` and the three parameters."""
    params, x = _params(inp), inp["x"]

    def ours(validate):
        return lambda: torch_mvn_ext.JacobianLowRankMVN(**params, validate_args=validate).log_prob_and_grads(
            x, reduction="sum"
        )

    def torch_fwd_bwd(validate):
        def run():
            leaves = {name: leaf(t) for name, t in params.items()}
            xs = leaf(x)
            lp = LowRankMultivariateNormal(**leaves, validate_args=validate).log_prob(xs)
            grads = torch.autograd.grad(lp.sum(), (xs, *leaves.values()))
            return lp, dict(zip(GRADS, grads))

        return run

    return {
        "ours": ours(None),
        "torch": torch_fwd_bwd(None),
        "ours_noval": ours(False),
        "torch_noval": torch_fwd_bwd(False),
    }, {"torch": "ours", "torch_noval": "ours_noval"}


def jacobian(inp, args):
    """The per-sample ``jacobian(x, "cov_factor")`` (``N x d x k``) vs ``vmap(grad)`` and, where cheap,
    ``torch.autograd.functional.jacobian``."""
    params, x = _params(inp), inp["x"]

    def ours(validate):
        return lambda: torch_mvn_ext.JacobianLowRankMVN(**params, validate_args=validate).jacobian(x, "cov_factor")

    fns = {
        "ours": ours(None),
        "ours_noval": ours(False),
        "vmap_grad": lambda: vmap_grad(LowRankMultivariateNormal, params, "cov_factor", x),
    }
    n, d = x.shape
    if n * d * params["cov_factor"].shape[-1] <= args.lowrank_autograd_max:
        from torch.autograd.functional import jacobian

        loc, diag = params["loc"], params["cov_diag"]

        def functional():
            return jacobian(lambda w: LowRankMultivariateNormal(loc, w, diag).log_prob(x), params["cov_factor"])

        fns["functional_jacobian"] = functional
    # Like for like, as for jac_loc: vmap_grad unvalidated, autograd.functional with torch's default validation.
    return fns, {"vmap_grad": "ours_noval", **({"functional_jacobian": "ours"} if "functional_jacobian" in fns else {})}
