r"""Gaussian algebra: the parameters of a marginal and of a conditional, the cheapest way the factor allows.

Each function returns ``(loc, name, matrix)``: the mean and one matrix argument (``name``) of the result, which the
distribution builds. Nothing here inverts a matrix; blocks are taken from the factor where its triangular structure
allows, and from one Cholesky factorization of a sub-block otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._factor import cholesky
from ._information import symmetrize
from ._shapes import Grouping, sub_block

if TYPE_CHECKING:
    from .jacobian_mvn import JacobianMVN


def marginal(dist: JacobianMVN, a: list[int]) -> tuple[Tensor, str, Tensor]:
    """The parameters of the distribution of ``x[..., a]`` (see :meth:`JacobianMVN.marginal`)."""
    d, m = dist.event_shape[0], len(a)
    loc = dist._unbroadcasted_loc[..., a]
    factor = dist._factor
    if a == list(range(m)):
        block = factor.tensor[..., :m, :m]
        if factor.is_precision:
            return loc, "precision_matrix", block.mT @ block
        return loc, "scale_tril", block
    if factor.is_precision:
        precision = dist._symmetric_matrix
        b = [i for i in range(d) if i not in set(a)]
        matrix = sub_block(precision, a, a)
        if b:
            c = cholesky(sub_block(precision, b, b), "precision_matrix")
            w = torch.linalg.solve_triangular(c, sub_block(precision, b, a), upper=False)
            matrix = symmetrize(matrix - w.mT @ w)
        return loc, "precision_matrix", matrix
    if dist.parametrization == "covariance_matrix":
        return loc, "covariance_matrix", sub_block(dist._symmetric_matrix, a, a)
    rows = factor.tensor[..., a, :]
    return loc, "covariance_matrix", rows @ rows.mT


def condition(dist: JacobianMVN, b: list[int], value: Tensor, shape: torch.Size) -> tuple[Tensor, str, Tensor]:
    """The parameters of the distribution of the coordinates not in ``b`` given ``x[..., b] = value`` (see
    :meth:`JacobianMVN.condition`); ``shape`` is the broadcast of ``value``'s batch shape and the distribution's."""
    d, m = dist.event_shape[0], len(b)
    a = [i for i in range(d) if i not in set(b)]
    loc, factor = dist._unbroadcasted_loc, dist._factor
    tensor = factor.tensor
    g = Grouping(shape, tensor.shape[:-2])
    if sorted(b) == list(range(m)):
        if b != sorted(b):
            value = value[..., sorted(range(m), key=b.__getitem__)]  # now in coordinate order 0, ..., m-1
        r = g.group(value - loc[..., :m])
        cross, trailing = g.flat_matrix(tensor[..., m:, :m]), tensor[..., m:, m:]
        if factor.is_precision:
            # -T_aa^{-1} T_ab r_b: one product and one triangular solve.
            shift = -torch.linalg.solve_triangular(g.flat_matrix(trailing), (r @ cross.mT).mT, upper=False).mT
            name, matrix = "precision_matrix", dist._symmetric_matrix[..., m:, m:]
        else:
            leading = g.flat_matrix(tensor[..., :m, :m])
            shift = torch.linalg.solve_triangular(leading, r.mT, upper=False).mT @ cross.mT
            name, matrix = "scale_tril", trailing
    else:
        r = g.group(value - loc[..., b])
        if factor.is_precision:
            p = dist._symmetric_matrix
            name, matrix = "precision_matrix", sub_block(p, a, a)
            c = g.flat_matrix(cholesky(matrix, "precision_matrix"))
            shift = -torch.cholesky_solve((r @ g.flat_matrix(sub_block(p, a, b)).mT).mT, c).mT
        else:
            sigma = dist._unbroadcasted_sigma
            c = cholesky(sub_block(sigma, b, b), "covariance_matrix")
            w = torch.linalg.solve_triangular(c, sub_block(sigma, b, a), upper=False)
            name, matrix = "covariance_matrix", symmetrize(sub_block(sigma, a, a) - w.mT @ w)
            shift = torch.linalg.solve_triangular(g.flat_matrix(c), r.mT, upper=False).mT @ g.flat_matrix(w)
    mean = (loc[..., a] + g.ungroup(shift)).contiguous()
    return mean, name, matrix
