r"""Gaussian algebra: the parameters of a marginal and of a conditional, the cheapest way the factor allows.

Each function returns ``(loc, name, matrix)``: the mean and one matrix argument (``name``) of the result, which the
distribution builds. Nothing here inverts a matrix; blocks are taken from the factor where its triangular structure
allows, and from one Cholesky factorization of a sub-block otherwise.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ._factor import TriangularFactor, cholesky
from ._information import symmetrize
from ._shapes import Grouping, sub_block


class Dense(Protocol):
    """What conditioning reads of a dense Gaussian (:class:`~torch_mvn_ext._dense.DenseGaussian`)."""

    loc: Tensor
    factor: TriangularFactor
    parametrization: str

    @property
    def size(self) -> int: ...

    @property
    def covariance_matrix(self) -> Tensor: ...

    @property
    def precision_matrix(self) -> Tensor: ...


def marginal(state: Dense, a: list[int]) -> tuple[Tensor, str, Tensor]:
    r"""The parameters of the distribution of ``x[..., a]`` (see :meth:`~torch_mvn_ext.JacobianMVN.marginal`):

    * ``a`` = ``[0, 1, ..., m-1]``: the leading block of the factor is the factor of the marginal (the
      ``scale_tril`` :math:`L_{aa}`; for a precision factor the marginal precision :math:`T_{aa}^\top T_{aa}`);
    * otherwise, precision-parametrized: the Schur complement
      :math:`P_{aa} - P_{ab} P_{bb}^{-1} P_{ba}` through the Cholesky factor of :math:`P_{bb}` (no inverse,
      :math:`\Sigma` never formed), returned precision-parametrized;
    * otherwise: ``covariance_matrix`` :math:`\Sigma_{aa}` (a sub-block of the given covariance, or
      :math:`L_{a:} L_{a:}^\top`).
    """
    d, m = state.size, len(a)
    loc = state.loc[..., a]
    factor = state.factor
    if a == list(range(m)):
        block = factor.tensor[..., :m, :m]
        if factor.is_precision:
            return loc, "precision_matrix", block.mT @ block
        return loc, "scale_tril", block
    if factor.is_precision:
        precision = state.precision_matrix
        b = [i for i in range(d) if i not in set(a)]
        matrix = sub_block(precision, a, a)
        if b:
            c = cholesky(sub_block(precision, b, b), "precision_matrix")
            w = torch.linalg.solve_triangular(c, sub_block(precision, b, a), upper=False)
            matrix = symmetrize(matrix - w.mT @ w)
        return loc, "precision_matrix", matrix
    if state.parametrization == "covariance_matrix":
        return loc, "covariance_matrix", sub_block(state.covariance_matrix, a, a)
    rows = factor.tensor[..., a, :]
    return loc, "covariance_matrix", rows @ rows.mT


def condition(state: Dense, b: list[int], value: Tensor, shape: torch.Size) -> tuple[Tensor, str, Tensor]:
    r"""The parameters of the distribution of the coordinates not in ``b`` given ``x[..., b] = value`` (see
    :meth:`~torch_mvn_ext.JacobianMVN.condition`); ``shape`` is the broadcast of ``value``'s batch shape and the
    distribution's.

    * ``b`` are the leading coordinates (in any order): with the factor split in blocks, the conditional's
      factor is the trailing block of the distribution's own. ``scale_tril`` :math:`L_{aa}` and mean
      :math:`\mu_a + L_{ab} L_{bb}^{-1} r_b`; for a precision factor the precision :math:`P_{aa} =
      T_{aa}^\top T_{aa}` and mean :math:`\mu_a - T_{aa}^{-1} T_{ab} r_b`. No new factorization for the mean.
    * otherwise, precision-parametrized: precision :math:`P_{aa}` (a sub-block) and the mean through a
      Cholesky solve with :math:`P_{aa}`; :math:`\Sigma` is never formed.
    * otherwise: the Schur complement through the Cholesky factor :math:`C` of :math:`\Sigma_{bb}`:
      :math:`W = C^{-1}\Sigma_{ba}`, covariance :math:`\Sigma_{aa} - W^\top W` and mean
      :math:`\mu_a + W^\top C^{-1} r_b` — the same arithmetic as a blocked Cholesky factorization of
      :math:`\Sigma` permuted to :math:`(b, a)` order, at the cost of one :math:`O(d^3/3)` factorization.
    """
    d, m = state.size, len(b)
    a = [i for i in range(d) if i not in set(b)]
    loc, factor = state.loc, state.factor
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
            name, matrix = "precision_matrix", state.precision_matrix[..., m:, m:]
        else:
            leading = g.flat_matrix(tensor[..., :m, :m])
            shift = torch.linalg.solve_triangular(leading, r.mT, upper=False).mT @ cross.mT
            name, matrix = "scale_tril", trailing
    else:
        r = g.group(value - loc[..., b])
        if factor.is_precision:
            p = state.precision_matrix
            name, matrix = "precision_matrix", sub_block(p, a, a)
            c = g.flat_matrix(cholesky(matrix, "precision_matrix"))
            shift = -torch.cholesky_solve((r @ g.flat_matrix(sub_block(p, a, b)).mT).mT, c).mT
        else:
            sigma = state.covariance_matrix
            c = cholesky(sub_block(sigma, b, b), "covariance_matrix")
            w = torch.linalg.solve_triangular(c, sub_block(sigma, b, a), upper=False)
            name, matrix = "covariance_matrix", symmetrize(sub_block(sigma, a, a) - w.mT @ w)
            shift = torch.linalg.solve_triangular(g.flat_matrix(c), r.mT, upper=False).mT @ g.flat_matrix(w)
    mean = (loc[..., a] + g.ungroup(shift)).contiguous()
    return mean, name, matrix
