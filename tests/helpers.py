"""Shared builders for the tests: random SPD matrices, the shape grid, and paired distributions."""

import torch
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN

PARAMETRIZATIONS = ("covariance_matrix", "precision_matrix", "scale_tril")
MATRICES = PARAMETRIZATIONS
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


def make_pair(parametrization, loc, cov, **kwargs):
    """The same distribution as a JacobianMVN and as torch's MultivariateNormal."""
    m = matrix_for(parametrization, cov)
    return (
        JacobianMVN(loc, **{parametrization: m}, **kwargs),
        MultivariateNormal(loc, **{parametrization: m}, **kwargs),
    )


def grid_case(parametrization, shapes, d):
    """``(loc, cov, x, dist)`` in float64 for one entry of :data:`SHAPE_GRID`."""
    loc_batch, mat_batch, x_batch = shapes
    loc = torch.randn(*loc_batch, d, dtype=torch.float64)
    cov = random_spd(mat_batch, d)
    x = torch.randn(*x_batch, d, dtype=torch.float64)
    return loc, cov, x, JacobianMVN(loc, **{parametrization: matrix_for(parametrization, cov)})


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
