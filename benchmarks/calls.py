"""Callables that several benchmark cases time or check against.

* ``lpg_callables``: ``log_prob_and_grads(x, reduction="sum")`` of the library against torch's ``log_prob`` +
  ``torch.autograd.grad``, validated and not (the ``lpg`` and ``many_small_lpg`` cases, which differ in their inputs
  and floors);
* ``vmap_grad``: the per-sample gradient of ``log_prob`` w.r.t. a parameter through a torch distribution class, by
  ``torch.func.vmap(grad)``: the oracle that the per-sample Jacobians are timed against (``jac_*``, ``memory``,
  ``lowrank_jac``) and checked against (``accuracy.py``, ``accuracy_small.py``).
"""

import torch
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN


def leaf(t):
    return t.detach().requires_grad_()


def vmap_grad(cls, params, wrt, value, batched=False):
    """``d cls(**params).log_prob(value[i]) / d params[wrt]`` for every sample ``i``, by ``torch.func.vmap(grad)``.

    The way to per-sample derivatives w.r.t. a parameter that torch offers, in its fastest form: without validation
    (``validate_args=False``). ``cls`` is a torch distribution class taking ``params`` as keywords
    (``MultivariateNormal``: ``loc`` and one matrix; ``LowRankMultivariateNormal``: ``loc``, ``cov_factor`` and
    ``cov_diag``). The parameters are shared by all samples, or, with ``batched=True``, have a leading dimension of
    one member per sample, like ``value``.

    Returns:
        A tensor of shape ``value.shape[:1] + params[wrt].shape`` (``batched``: ``params[wrt].shape``).
    """
    from torch.func import grad, vmap

    others = {k: v for k, v in params.items() if k != wrt}

    def log_prob(p, v, rest):
        return cls(**rest, **{wrt: p}, validate_args=False).log_prob(v)

    shared = 0 if batched else None
    return vmap(grad(log_prob), in_dims=(shared, 0, shared))(params[wrt], value, others)


def lpg_callables(loc, cov, x, floor):
    """``({name: callable}, {baseline: ours})`` with ``floor`` as the case's floor."""

    def ours(validate):
        return lambda: JacobianMVN(loc, covariance_matrix=cov, validate_args=validate).log_prob_and_grads(
            x, reduction="sum"
        )

    def torch_fwd_bwd(validate):
        def run():
            xs, ls, cs = leaf(x), leaf(loc), leaf(cov)
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
        "floor": floor,
    }, {"torch": "ours", "torch_noval": "ours_noval"}
