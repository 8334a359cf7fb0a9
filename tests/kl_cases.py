"""The distribution kinds that meet a JacobianMVN or a JacobianLowRankMVN in a KL divergence, and a dense float64
reference for them.

Each kind is built from a dict of leaf tensors (``random_params``), so the same leaves feed our KL, the dense
closed form (``dense``) and torch's own KL (``torch_equivalent``), and autograd can compare their gradients.
"""

import itertools

import pyro.distributions as pyro_dist
import torch
from helpers import PARAMETRIZATIONS, matrix_for, random_spd
from torch.distributions import Independent, LowRankMultivariateNormal, MultivariateNormal, Normal

from torch_mvn_ext import JacobianLowRankMVN, JacobianMVN

RANK = 2
JACOBIAN_KINDS = tuple(f"JacobianMVN-{name}" for name in PARAMETRIZATIONS)
LOWRANK_KIND = "JacobianLowRankMVN"
OTHER_KINDS = (
    "MultivariateNormal",
    "pyro.MultivariateNormal",
    "LowRankMultivariateNormal",
    "pyro.LowRankMultivariateNormal",
    "Independent(Normal)",
    "pyro.Independent(pyro.Normal)",
)
KINDS = JACOBIAN_KINDS + (LOWRANK_KIND,) + OTHER_KINDS
DIAGONAL_KINDS = OTHER_KINDS[-2:]
OURS = JACOBIAN_KINDS + (LOWRANK_KIND,)
# Every ordered pair with at least one side of this package's classes.
PAIRS = [(p, q) for p, q in itertools.product(KINDS, KINDS) if p in OURS or q in OURS]
PAIR_IDS = [f"{p}||{q}" for p, q in PAIRS]
# The pyro MultivariateNormal is built from a precision matrix, torch's from a covariance matrix.
_MVN_PARAMETRIZATION = {"MultivariateNormal": "covariance_matrix", "pyro.MultivariateNormal": "precision_matrix"}
_VECTOR_PARAMETERS = ("loc", "cov_diag", "scale")


def random_params(kind, batch_shape, d, dtype=torch.float64):
    """Leaf tensors (``requires_grad``) for a random distribution of ``kind`` with ``batch_shape``."""
    loc = torch.randn(*batch_shape, d, dtype=dtype)
    if "LowRank" in kind:
        params = dict(
            loc=loc,
            cov_factor=torch.randn(*batch_shape, d, RANK, dtype=dtype),
            cov_diag=torch.rand(*batch_shape, d, dtype=dtype) + 0.5,
        )
    elif kind in DIAGONAL_KINDS:
        params = dict(loc=loc, scale=torch.rand(*batch_shape, d, dtype=dtype) + 0.5)
    else:
        name = _parametrization(kind)
        params = {"loc": loc, name: matrix_for(name, random_spd(batch_shape, d, dtype=dtype))}
    return {k: v.requires_grad_() for k, v in params.items()}


def build(kind, params, validate_args=None):
    """The distribution of ``kind`` with parameters ``params``."""
    kw = dict(validate_args=validate_args)
    if kind.startswith("JacobianMVN"):
        return JacobianMVN(**params, **kw)
    if kind == LOWRANK_KIND:
        return JacobianLowRankMVN(**params, **kw)
    if kind == "MultivariateNormal":
        return MultivariateNormal(**params, **kw)
    if kind == "pyro.MultivariateNormal":
        return pyro_dist.MultivariateNormal(**params, **kw)
    if kind == "LowRankMultivariateNormal":
        return LowRankMultivariateNormal(**params, **kw)
    if kind == "pyro.LowRankMultivariateNormal":
        return pyro_dist.LowRankMultivariateNormal(**params, **kw)
    if kind == "Independent(Normal)":
        return Independent(Normal(params["loc"], params["scale"], **kw), 1, **kw)
    return pyro_dist.Normal(params["loc"], params["scale"], **kw).to_event(1)


def torch_equivalent(kind, params):
    """The same distribution with none of this package's classes in it, for torch's (or Pyro's) own KL."""
    if kind.startswith("JacobianMVN"):
        return MultivariateNormal(**params)
    if kind == LOWRANK_KIND:
        return LowRankMultivariateNormal(**params)
    return build(kind, params)


def dense(kind, params):
    """``(loc, covariance)`` from the parameters by plain dense algebra, independent of the package."""
    if "LowRank" in kind:
        w = params["cov_factor"]
        cov = w @ w.mT + torch.diag_embed(params["cov_diag"])
    elif kind in DIAGONAL_KINDS:
        cov = torch.diag_embed(params["scale"].pow(2))
    else:
        name = _parametrization(kind)
        m = params[name]
        if name == "precision_matrix":
            cov = torch.linalg.inv(m)
        elif name == "scale_tril":
            cov = m @ m.mT
        else:
            cov = m
    return params["loc"], cov


def dense_kl(p_loc, p_cov, q_loc, q_cov):
    r""":math:`\frac12[\operatorname{tr}(\Sigma_q^{-1}\Sigma_p) + \delta^\top\Sigma_q^{-1}\delta - d
    + \log\det\Sigma_q - \log\det\Sigma_p]` with dense solves and log-determinants."""
    d = p_loc.shape[-1]
    delta = (q_loc - p_loc).unsqueeze(-1)
    trace = torch.linalg.solve(q_cov, p_cov).diagonal(dim1=-2, dim2=-1).sum(-1)
    mahalanobis = (delta.mT @ torch.linalg.solve(q_cov, delta))[..., 0, 0]
    return 0.5 * (trace + mahalanobis - d + torch.logdet(q_cov) - torch.logdet(p_cov))


def reference_kl(p_kind, p_params, q_kind, q_params):
    return dense_kl(*dense(p_kind, p_params), *dense(q_kind, q_params))


def params_from_dense(kind, loc, cov):
    """Parameters of ``kind`` for the distribution ``N(loc, cov)`` (for the Jacobian and MVN kinds)."""
    name = _parametrization(kind)
    return {"loc": loc, name: matrix_for(name, cov)}


def index_params(params, batch_shape, index):
    """The parameters of batch member ``index`` of a distribution broadcast to ``batch_shape``."""
    out = {}
    for k, v in params.items():
        event_shape = v.shape[-1:] if k in _VECTOR_PARAMETERS else v.shape[-2:]
        out[k] = v.expand(batch_shape + event_shape)[index]
    return out


def _parametrization(kind):
    return _MVN_PARAMETRIZATION.get(kind) or kind.split("-", 1)[1]
