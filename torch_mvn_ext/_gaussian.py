r"""What every covariance structure answers: the interface the derivatives, the KL divergences and the distributions
are written against.

A structure (:class:`~torch_mvn_ext._dense.DenseGaussian` for a full matrix held through its triangular factor,
:class:`~torch_mvn_ext._lowrank.LowRankGaussian` for :math:`W W^\top + \operatorname{diag}(D)`) is one object that
holds the unbroadcast ``loc`` and the structure's tensors, and answers, for residuals :math:`r = x - \mu`:

* :meth:`GaussianState.rows`: the residuals laid out against the structure's batch (:class:`Rows`), with
  :math:`\alpha = \Sigma^{-1} r` and the log-density computed once and shared;
* :meth:`GaussianState.term`: the derivative of :math:`\log p` w.r.t. one of its coordinates (its ``wrt`` names other
  than ``"value"`` and ``"loc"``) as a :class:`Term`, a per-sample outer product and a constant, from which
  :mod:`~torch_mvn_ext._derivatives` writes per-sample Jacobians and summed gradients without knowing the structure;
* :meth:`GaussianState.log_prob`: the log-density with the closed-form backward;
* the quantities a KL divergence reads (:meth:`~GaussianState.half_log_det`, :meth:`~GaussianState.quad`,
  :meth:`~GaussianState.kl_rows`, :meth:`~GaussianState.kl_diagonal`, :meth:`~GaussianState.precision_diagonal`).

Nothing here imports a structure or a distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._shapes import Grouping

# The forms of a Term: how its outer products and constant make the derivative (see Term).
SYMMETRIC, LOWER, GENERAL, DIAGONAL = "symmetric", "lower", "general", "diagonal"


class cached:
    """A cache on the instance, computed on first use: torch's ``lazy_property`` (results with their graph even when
    first asked for under ``torch.no_grad()``), without entering ``enable_grad`` where grad is enabled."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.name = fn.__name__

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self
        if torch.is_grad_enabled():
            value = self.fn(instance)
        else:
            with torch.enable_grad():
                value = self.fn(instance)
        setattr(instance, self.name, value)  # shadows this (non-data) descriptor from now on
        return value


class Term(NamedTuple):
    r"""The derivative of :math:`\log p(x_s)` w.r.t. one coordinate: ``scale`` :math:`(u_s v_s^\top - K)`.

    ``u`` and ``v`` are rows in the layout of :class:`Rows` (``(..., c, d)`` and ``(..., c, m)``), ``constant``
    :math:`K` is the sample-independent term (its mean under the distribution, since a score has mean zero) in the
    structure's batch shape. ``form`` says how they combine:

    * ``"symmetric"``: a symmetric ``(d, d)`` matrix argument (``vech`` doubles its off-diagonal entries);
    * ``"lower"``: a lower-triangular ``(d, d)`` argument, :math:`\operatorname{tril}(u v^\top)`, with ``constant``
      the diagonal of :math:`K` (shape ``B + (d,)``);
    * ``"general"``: a ``(d, m)`` argument, :math:`u v^\top` as it is;
    * ``"diagonal"``: a ``(d,)`` argument, the elementwise :math:`u \odot v`, ``constant`` of shape ``B + (d,)``.

    ``outer_sum``: the structure's own sum of outer products over rows (the signature of
    :meth:`~torch_mvn_ext._factor.TriangularFactor.outer_sum`), where it has one; a GEMM otherwise.
    """

    u: Tensor
    v: Tensor
    constant: Tensor
    scale: float
    form: str
    outer_sum: Callable[..., Tensor] | None = None


class Rows:
    r"""Residuals :math:`r` of shape ``S + (d,)`` laid out against a batch shape ``B`` that broadcasts to ``S``.

    With an unbatched structure (one matrix shared by every point: the common case) the rows are ``(c, d)`` and each
    operation is one call on the structure's unbatched tensors; otherwise ``(b, c, d)`` by
    :class:`~torch_mvn_ext._shapes.Grouping`, one member of ``B`` per ``b``. :meth:`full` gives ``S + (k,)`` back.
    A structure's subclass adds :attr:`alpha` and :attr:`log_prob` (and what it shares between them).
    """

    def __init__(self, r: Tensor, batch_shape: torch.Size) -> None:
        self.shape = r.shape[:-1]
        if not batch_shape:
            self.grouping: Grouping | None = None
            self.c = math.prod(self.shape)
            self.r = r if r.dim() == 2 else r.reshape(self.c, r.shape[-1])
        else:
            g = Grouping(self.shape, batch_shape)
            self.grouping = g
            self.c = g.c
            self.r = g.group(r)
        self._full_alpha: Tensor | None = None

    @property
    def alpha(self) -> Tensor:
        r""":math:`\alpha = \Sigma^{-1} r` in the layout of ``r``."""
        raise NotImplementedError

    @property
    def log_prob(self) -> Tensor:
        """The log-density of each row, shape ``S``."""
        raise NotImplementedError

    def flat(self, x: Tensor, event_dims: int = 2) -> Tensor:
        """A tensor of the structure's batch shape (``event_dims`` trailing dimensions) laid out as the rows are."""
        if self.grouping is None:
            return x
        if event_dims == 2:
            return self.grouping.flat_matrix(x)
        return self.grouping.flat_matrix(x.unsqueeze(-1))[..., 0]

    def unflat(self, x: Tensor) -> Tensor:
        """A matrix in the rows' layout back in the structure's batch shape."""
        return x if self.grouping is None else self.grouping.unflat_matrix(x)

    def group(self, x: Tensor) -> Tensor:
        """A tensor of shape ``S + (k,)`` in the layout of ``r``."""
        if self.grouping is None:
            return x.reshape(self.c, x.shape[-1])
        return self.grouping.group(x)

    def full(self, x: Tensor) -> Tensor:
        """Rows in the layout of ``r`` back in ``S + (k,)``."""
        if self.grouping is None:
            return x if x.dim() == 2 and len(self.shape) == 1 else x.reshape(self.shape + x.shape[-1:])
        return self.grouping.ungroup(x)

    def full_scalar(self, x: Tensor) -> Tensor:
        """One number per row back in ``S``."""
        if self.grouping is None:
            return x if len(self.shape) == 1 else x.reshape(self.shape)
        return self.grouping.ungroup_scalar(x)

    def full_alpha(self) -> Tensor:
        r""":math:`\alpha` in ``S + (d,)``, row-major as returned to users (a float32 triangular solve from the right
        leaves it column-major); computed once."""
        if self._full_alpha is None:
            self._full_alpha = self.full(self.alpha).contiguous()
        return self._full_alpha


class GaussianState:
    r"""One covariance structure with its tensors: the interface (see the module docstring).

    ``loc`` is the unbroadcast mean; :attr:`batch_shape` the batch of the structure's own tensors (not ``loc``'s),
    against which :class:`Rows` groups; :attr:`coordinates` the ``wrt`` names beyond ``"value"`` and ``"loc"``.
    """

    coordinates: tuple[str, ...] = ()

    loc: Tensor

    @property
    def batch_shape(self) -> torch.Size:
        raise NotImplementedError

    @property
    def size(self) -> int:
        """The event size ``d``."""
        return self.loc.shape[-1]

    def inputs(self) -> dict[str, Tensor]:
        """The tensors the user passed, by coordinate name (those the derivatives depend on besides the value)."""
        raise NotImplementedError

    def rows(self, r: Tensor) -> Rows:
        """The residuals ``r`` (shape ``S + (d,)``) laid out against :attr:`batch_shape`."""
        raise NotImplementedError

    def log_prob(self, r: Tensor) -> Tensor:
        """The log-density of the residuals ``r``, shape ``S``, whose autograd backward is the closed form."""
        raise NotImplementedError

    def term(self, rows: Rows, name: str) -> Term:
        """The derivative of :math:`\\log p` w.r.t. the coordinate ``name`` at ``rows``."""
        raise NotImplementedError

    def term_shape(self, name: str) -> tuple[int, ...]:
        """The trailing shape of a per-sample derivative w.r.t. ``name`` in the full layout: ``(d, d)``, ``(d, k)``,
        ``(d,)``."""
        raise NotImplementedError

    def summed_shape(self, name: str, batch_shape: torch.Size) -> torch.Size:
        """The batch shape the gradient of a summed log-density w.r.t. ``name`` has: that of the tensor the user
        passed (``batch_shape``, the distribution's, for a coordinate that was not passed)."""
        raise NotImplementedError

    # What a KL divergence reads: Sigma = R^T R + diag(v).

    def half_log_det(self) -> Tensor:
        r""":math:`\frac12 \log\det\Sigma`, shape :attr:`batch_shape`."""
        raise NotImplementedError

    def quad(self, x: Tensor) -> Tensor:
        r""":math:`\sum_i x_i^\top \Sigma^{-1} x_i` over the rows of ``x`` (shape ``B' + (m, d)``, ``B'`` broadcasting
        with :attr:`batch_shape`), shape ``broadcast(B', batch_shape)``."""
        raise NotImplementedError

    def kl_rows(self) -> Tensor | None:
        r"""``R`` in :math:`\Sigma = R^\top R + \operatorname{diag}(v)`, or ``None``."""
        raise NotImplementedError

    def kl_diagonal(self) -> Tensor | None:
        r"""``v`` in :math:`\Sigma = R^\top R + \operatorname{diag}(v)`, or ``None``."""
        return None

    def precision_diagonal(self) -> Tensor:
        r"""The diagonal of :math:`\Sigma^{-1}`, shape ``batch_shape + (d,)``."""
        raise NotImplementedError
