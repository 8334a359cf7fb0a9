"""Callables that several benchmark cases time: ``log_prob_and_grads(x, reduction="sum")`` of the library against
torch's ``log_prob`` + ``torch.autograd.grad``, validated and not (``run.py``'s ``lpg`` and ``many_small.py``'s
``many_small_lpg``, which differ in their inputs and floors)."""

import torch
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN


def leaf(t):
    return t.detach().requires_grad_()


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
