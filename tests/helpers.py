"""Shared builders for the tests: the registry of covariance structures, random SPD matrices and the shape grid.

Each :class:`Structure` names our class and torch's class for one covariance structure (for the dense one, one
entry per parametrization), draws random parameters for it and computes the one independent reference for
per-sample derivatives, :meth:`Structure.per_sample_grad`. The generic tests loop over :data:`STRUCTURES`, so that a
structure added there is checked by all of them.
"""

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal
from torch.func import grad, vmap

from torch_mvn_ext import JacobianLowRankMVN, JacobianMVN

PARAMETRIZATIONS = ("covariance_matrix", "precision_matrix", "scale_tril")
WRT = ("value", "loc") + PARAMETRIZATIONS

# Per dtype, for torch.testing.assert_close (the conftest fixture ``assert_close`` applies them).
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
}

# (loc batch, matrix batch, value batch): unbatched, batched, loc-only, matrix-only, broadcasting pairs,
# and values with extra sample dimensions.
SHAPE_GRID = [
    ((), (), ()),
    ((), (), (7,)),
    ((4,), (4,), (4,)),
    ((4,), (), (5, 4)),
    ((), (3,), (2, 3)),
    ((2, 1), (3,), (2, 3)),
    ((8, 1), (6,), (8, 6)),
    ((2, 3), (2, 3), (5, 1, 1)),
]
SHAPE_IDS = [f"loc{a}-mat{b}-x{c}" for a, b, c in SHAPE_GRID]


def random_spd(batch_shape, d, dtype=torch.float64, device=None, condition=10.0):
    """Random SPD matrices with eigenvalues spread log-uniformly over ``[1, condition]``."""
    q, _ = torch.linalg.qr(torch.randn(*batch_shape, d, d, dtype=dtype, device=device))
    eig = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), d, dtype=dtype, device=device)
    eig = eig[torch.randperm(d)]
    m = (q * eig) @ q.mT
    return (m + m.mT) / 2


def matrix_for(parametrization, cov):
    """The argument that parametrizes the distribution with covariance ``cov``."""
    if parametrization == "covariance_matrix":
        return cov
    if parametrization == "precision_matrix":
        p = torch.cholesky_inverse(torch.linalg.cholesky(cov))
        return (p + p.mT) / 2
    return torch.linalg.cholesky(cov)


def vech_of_full(full, wrt):
    """The ``layout="vech"`` form of a full-layout derivative w.r.t. ``wrt`` of the dense structure: the lower
    triangle (``torch.tril_indices`` order), its off-diagonal entries doubled for a symmetric matrix (each stands for
    ``(i, j)`` and ``(j, i)``); a derivative w.r.t. a vector as it is."""
    if wrt in ("value", "loc"):
        return full
    d = full.shape[-1]
    rows, cols = torch.tril_indices(d, d, device=full.device)
    out = full[..., rows, cols]
    if wrt == "scale_tril":
        return out
    return out * torch.where(rows == cols, 1.0, 2.0).to(out.dtype)


def _as_given(params, wrt):
    return params


def _full(full, wrt):
    return full


@dataclass(frozen=True)
class Structure:
    """One covariance structure of a Gaussian: our class, torch's class (the reference), and how to draw and
    compare them.

    ``params`` are the constructor's arguments after ``loc``; a parameter dict (what :attr:`random_params` returns,
    what :meth:`pair` and :meth:`per_sample_grad` take) holds ``loc`` and those, by keyword. ``wrt`` are the names
    ``jacobian`` accepts; ``event_dims`` gives, for each of them but ``value`` and ``loc`` (vectors), how many
    trailing dimensions one batch member's tensor has.
    """

    name: str
    ours: type
    reference: type
    params: tuple
    wrt: tuple
    event_dims: dict
    # random_params(batch_shape, d, dtype=torch.float64, loc_batch_shape=None) -> parameter dict: random
    # parameters of event size d whose batch shape is batch_shape (loc's is loc_batch_shape, if given).
    random_params: Callable
    # reparametrize(params, wrt) -> the same distribution's parameter dict with wrt among its keys, for a wrt the
    # constructor does not take (another parametrization of the same matrix); built with torch alone.
    reparametrize: Callable = _as_given
    # layout name -> function(full, wrt) giving that layout of a full-layout derivative w.r.t. wrt.
    layouts: dict = field(default_factory=lambda: {"full": _full})

    def layout_kwargs(self, layout):
        """The keyword arguments that ask ``jacobian`` for ``layout``: none where the class has only the full one
        (and no ``layout`` argument)."""
        return {} if list(self.layouts) == ["full"] else {"layout": layout}

    def pair(self, params, **kwargs):
        """The same distribution as ours and as torch's."""
        return self.ours(**params, **kwargs), self.reference(**params, **kwargs)

    def _dims(self, name):
        return 1 if name in ("value", "loc") else self.event_dims[name]

    def event_shape(self, params, wrt):
        """One batch member's shape of ``wrt`` (the trailing shape of its per-sample derivatives, full layout)."""
        name = "loc" if wrt == "value" else wrt
        t = self.reparametrize(params, wrt)[name]
        return t.shape[t.dim() - self._dims(name) :]

    def per_sample_grad(self, value, params, wrt):
        """The reference for per-sample derivatives: for every ``s`` of ``S = broadcast_shapes(value.shape[:-1],
        batch_shape)``, the gradient of ``log_prob(value)[s]`` w.r.t. ``wrt`` of batch member ``s``, by
        ``torch.func.vmap(torch.func.grad(...))`` through torch's class (unvalidated) built from
        ``reparametrize(params, wrt)``, every argument expanded to ``S`` and one sample per call; shape ``S +``
        :meth:`event_shape`. Differentiable w.r.t. ``value`` and ``params``."""
        params = self.reparametrize(params, wrt)
        names = tuple(params)
        args = (value,) + tuple(params.values())
        events = [a.shape[a.dim() - self._dims(n) :] for n, a in zip(("value",) + names, args)]
        S = torch.broadcast_shapes(*(a.shape[: a.dim() - len(e)] for a, e in zip(args, events)))
        flat = [a.expand(S + e).reshape((-1,) + e) for a, e in zip(args, events)]
        argnum = 0 if wrt == "value" else 1 + names.index(wrt)
        if S.numel() == 0:
            return flat[argnum].new_zeros(S + events[argnum])

        def log_prob(x, *members):
            return self.reference(**dict(zip(names, members)), validate_args=False).log_prob(x)

        return vmap(grad(log_prob, argnums=argnum))(*flat).reshape(S + events[argnum])


def _dense_random_params(parametrization):
    def random_params(batch_shape, d, dtype=torch.float64, loc_batch_shape=None):
        loc_batch = batch_shape if loc_batch_shape is None else loc_batch_shape
        loc = torch.randn(*loc_batch, d, dtype=dtype)
        return {"loc": loc, parametrization: matrix_for(parametrization, random_spd(batch_shape, d, dtype))}

    return random_params


def _dense_reparametrize(params, wrt):
    """The same Gaussian's ``loc`` and ``wrt``'s matrix, derived from the given matrix (symmetrized covariance)."""
    (given,) = (name for name in PARAMETRIZATIONS if name in params)
    if wrt in ("value", "loc") or wrt == given:
        return params
    m = params[given]
    if given == "covariance_matrix":
        cov = m
    elif given == "scale_tril":
        cov = m @ m.mT
    else:
        cov = torch.cholesky_inverse(torch.linalg.cholesky(m))
    return {"loc": params["loc"], wrt: matrix_for(wrt, (cov + cov.mT) / 2)}


# The dense Gaussian, one entry per parametrization.
DENSE = {
    p: Structure(
        name=f"dense-{p}",
        ours=JacobianMVN,
        reference=MultivariateNormal,
        params=(p,),
        wrt=WRT,
        event_dims=dict.fromkeys(PARAMETRIZATIONS, 2),
        random_params=_dense_random_params(p),
        reparametrize=_dense_reparametrize,
        layouts={"full": _full, "vech": vech_of_full},
    )
    for p in PARAMETRIZATIONS
}



def _low_rank_random_params(batch_shape, d, dtype=torch.float64, loc_batch_shape=None, rank=2):
    loc = torch.randn(*(batch_shape if loc_batch_shape is None else loc_batch_shape), d, dtype=dtype)
    cov_factor = torch.randn(*batch_shape, d, rank, dtype=dtype) / rank**0.5
    cov_diag = torch.rand(*batch_shape, d, dtype=dtype) + 0.5
    return {"loc": loc, "cov_factor": cov_factor, "cov_diag": cov_diag}


# The low-rank Gaussian, W W^T + diag(D).
LOW_RANK = Structure(
    name="low_rank",
    ours=JacobianLowRankMVN,
    reference=LowRankMultivariateNormal,
    params=("cov_factor", "cov_diag"),
    wrt=("value", "loc", "cov_factor", "cov_diag"),
    event_dims={"cov_factor": 2, "cov_diag": 1},
    random_params=_low_rank_random_params,
)

STRUCTURES = [*DENSE.values(), LOW_RANK]

# Parameter lists for the generic tests, with readable ids ("dense-covariance_matrix", "dense-scale_tril-loc",
# "dense-precision_matrix-vech").
STRUCTURE_PARAMS = [pytest.param(s, id=s.name) for s in STRUCTURES]
STRUCTURE_WRT = [pytest.param(s, w, id=f"{s.name}-{w}") for s in STRUCTURES for w in s.wrt]
STRUCTURE_LAYOUTS = [pytest.param(s, layout, id=f"{s.name}-{layout}") for s in STRUCTURES for layout in s.layouts]


def grid_case(structure, shapes, d):
    """``(params, x)`` in float64 for one entry of :data:`SHAPE_GRID` (its matrix batch is the parameters')."""
    loc_batch, mat_batch, x_batch = shapes
    params = structure.random_params(mat_batch, d, loc_batch_shape=loc_batch)
    return params, torch.randn(*x_batch, d, dtype=torch.float64)


# The low-rank Gaussian: (loc batch, cov_factor batch, cov_diag batch, value batch), each parameter with its own
# batch shape, broadcasting against the others (size-1 dimensions included), and values with extra sample dimensions.
LOWRANK_WRT = ("value", "loc", "cov_factor", "cov_diag")
LOWRANK_GRID = [
    ((), (), (), ()),
    ((), (), (), (7,)),
    ((4,), (), (4,), (4,)),
    ((4,), (4,), (), (5, 4)),
    ((), (3,), (), (2, 3)),
    ((), (), (3,), (3,)),
    ((2, 1), (3,), (1,), (2, 3)),
    ((8, 1), (), (6,), (8, 6)),
    ((2, 3), (3,), (2, 1), (5, 1, 1)),
]
LOWRANK_IDS = [f"loc{a}-factor{b}-diag{c}-x{x}" for a, b, c, x in LOWRANK_GRID]


def lowrank_params(shapes, d, rank, dtype=torch.float64):
    """``(loc, cov_factor, cov_diag, x)`` for one entry of :data:`LOWRANK_GRID`; ``cov_diag`` in ``[0.5, 1.5)``."""
    loc_batch, factor_batch, diag_batch, x_batch = shapes
    return (
        torch.randn(*loc_batch, d, dtype=dtype),
        torch.randn(*factor_batch, d, rank, dtype=dtype),
        torch.rand(*diag_batch, d, dtype=dtype) + 0.5,
        torch.randn(*x_batch, d, dtype=dtype),
    )
