r"""The low-rank distribution: :class:`JacobianLowRankMVN`, torch's ``LowRankMultivariateNormal`` with closed-form
derivatives.

It holds one :class:`~torch_mvn_ext._lowrank.LowRankGaussian` and delegates to it, as
:class:`~torch_mvn_ext.JacobianMVN` does to its dense structure; every other attribute is torch's own.
"""

from __future__ import annotations

from typing import Union, cast, overload

import pyro.distributions
import torch
from torch import Tensor

from . import _derivatives
from ._checks import (
    REDUCTIONS,
    all_true,
    check_choice,
    check_value,
    check_wrt,
    quiet_under_jit_trace,
)
from ._derivatives import Outputs
from ._lowrank import LowRankGaussian
from ._shapes import format_shape

__all__ = ["JacobianLowRankMVN"]

WRT = ("value", "loc", "cov_factor", "cov_diag")
_size = Union[torch.Size, list[int], tuple[int, ...]]


def _check_parameters(loc: object, cov_factor: object, cov_diag: object) -> None:
    """The structural requirements of ``JacobianLowRankMVN``'s arguments, each failure a ``ValueError`` that names
    it (torch's class raises deep ``IndexError``, ``AttributeError`` or ``RuntimeError`` for several of them); the
    shape checks torch's constructor makes follow, with its messages."""
    args = {"loc": loc, "cov_factor": cov_factor, "cov_diag": cov_diag}
    for name, t in args.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name} has dtype {t.dtype}, but JacobianLowRankMVN works in float32 or float64")
    tensors = cast(dict[str, Tensor], args)
    for name, t in tensors.items():
        if t.dtype != tensors["loc"].dtype:
            raise ValueError(f"loc has dtype {tensors['loc'].dtype} but {name} has dtype {t.dtype}; pass one dtype")
        if t.device != tensors["loc"].device:
            raise ValueError(f"loc is on device {tensors['loc'].device} but {name} is on device {t.device}")
    factor = tensors["cov_factor"]
    if factor.dim() >= 2 and factor.shape[-1] == 0:
        raise ValueError(
            f"cov_factor has shape {format_shape(factor.shape)}: it needs at least one column (rank k >= 1)"
        )


class JacobianLowRankMVN(pyro.distributions.LowRankMultivariateNormal):
    r"""A multivariate normal with covariance :math:`\Sigma = W W^\top + \operatorname{diag}(D)` and closed-form
    per-sample derivatives of its log-density.

    A drop-in for :class:`torch.distributions.LowRankMultivariateNormal` and Pyro's
    ``dist.LowRankMultivariateNormal`` (it is both): the Gaussian of factor analysis and probabilistic PCA, of sparse
    Gaussian processes and of Pyro's ``AutoLowRankMultivariateNormal``. Every attribute torch's class has gives
    torch's numbers; beyond them it offers :meth:`jacobian` and :meth:`log_prob_and_grads`, and its ``log_prob``
    backpropagates through the closed form. Nothing forms a :math:`d \times d` matrix (unless asked for
    ``covariance_matrix``, ``precision_matrix`` or ``scale_tril``): with the capacitance
    :math:`C C^\top = I_k + W^\top D^{-1} W` (Woodbury), a point costs :math:`O(dk)` and a batch member
    :math:`O(dk^2)`.

    Example::

        >>> d = JacobianLowRankMVN(torch.zeros(5), torch.ones(5, 2), torch.ones(5))
        >>> d.jacobian(torch.ones(3, 5), "cov_factor").shape
        torch.Size([3, 5, 2])

    Args:
        loc (Tensor): mean, shape ``batch_shape + (d,)``.
        cov_factor (Tensor): :math:`W`, shape ``batch_shape + (d, k)``.
        cov_diag (Tensor): :math:`D`, positive, shape ``batch_shape + (d,)``.
        validate_args (bool, optional): check the arguments' constraints, as torch does.

    The three batch shapes broadcast, as in torch's class.
    """

    def __init__(self, loc: Tensor, cov_factor: Tensor, cov_diag: Tensor, validate_args: bool | None = None) -> None:
        _check_parameters(loc, cov_factor, cov_diag)
        validate = type(self)._validate_args if validate_args is None else validate_args
        if validate:  # before torch's constructor, whose Cholesky factorization would fail first on a bad cov_diag
            for name, value in (("loc", loc), ("cov_factor", cov_factor), ("cov_diag", cov_diag)):
                constraint = self.arg_constraints[name]
                if not all_true(constraint.check(value)):
                    raise ValueError(
                        f"Expected parameter {name} (Tensor of shape {format_shape(value.shape)}) of distribution "
                        f"{type(self).__name__} to satisfy the constraint {constraint!r}, but found invalid "
                        f"values:\n{value}"
                    )
        super().__init__(loc, cov_factor, cov_diag, validate_args=validate_args)
        self._state = LowRankGaussian(loc, cov_factor, cov_diag, self._capacitance_tril)

    @classmethod
    def from_distribution(cls, lowrank: torch.distributions.LowRankMultivariateNormal) -> JacobianLowRankMVN:
        r"""The :class:`JacobianLowRankMVN` of a torch or Pyro :class:`~torch.distributions.LowRankMultivariateNormal`:
        its tensors, capacitance factor and ``validate_args``, nothing computed again. Gradients flow to the source's
        parameters (to ``loc`` through the view expanded to the source's batch shape, which torch keeps).

        Args:
            lowrank (torch.distributions.LowRankMultivariateNormal): the source (any subclass, Pyro's included).

        Returns:
            JacobianLowRankMVN: with the source's shapes and numbers.
        """
        if not isinstance(lowrank, torch.distributions.LowRankMultivariateNormal):
            raise ValueError(
                "from_distribution needs a torch.distributions.LowRankMultivariateNormal (or Pyro's); got "
                f"{type(lowrank).__name__}"
            )
        new = cls.__new__(cls)
        for name in ("loc", "cov_factor", "cov_diag", "_unbroadcasted_cov_factor", "_unbroadcasted_cov_diag"):
            setattr(new, name, getattr(lowrank, name))
        new._capacitance_tril = lowrank._capacitance_tril
        new._batch_shape, new._event_shape = lowrank.batch_shape, lowrank.event_shape
        new._validate_args = lowrank._validate_args
        new._state = LowRankGaussian.of_distribution(lowrank)
        return new

    @quiet_under_jit_trace
    def expand(self, batch_shape: _size, _instance: JacobianLowRankMVN | None = None) -> JacobianLowRankMVN:
        """torch's ``expand`` (views, nothing copied), keeping the class and sharing the structure."""
        new = self._get_checked_instance(JacobianLowRankMVN, _instance)
        super().expand(batch_shape, _instance=new)
        new._state = self._state
        return new

    @quiet_under_jit_trace
    def log_prob(self, value: Tensor) -> Tensor:
        r"""The log-density of ``value``, shape ``broadcast_shapes(value.shape[:-1], batch_shape)``: torch's numbers,
        with :math:`O(dk)` per point, and an autograd backward that is the closed form (see :meth:`jacobian`), to
        first and second order and under ``torch.func``. ``value`` is checked as :class:`JacobianMVN` checks it."""
        return self._state.log_prob(check_value(self, value) - self.loc)

    @overload
    def jacobian(self, value: Tensor, wrt: str = ..., *, out: Tensor | None = ...) -> Tensor: ...

    @overload
    def jacobian(
        self, value: Tensor, wrt: tuple[str, ...] | list[str], *, out: dict[str, Tensor] | None = ...
    ) -> dict[str, Tensor]: ...

    @quiet_under_jit_trace
    def jacobian(
        self, value: Tensor, wrt: str | tuple[str, ...] | list[str] = "value", *, out: Outputs | None = None
    ) -> Outputs:
        r"""Per-sample derivatives of ``log_prob(value)``, in closed form, never forming a :math:`d \times d` matrix.

        With :math:`r = x - \mu` and :math:`\alpha = \Sigma^{-1} r` (Woodbury):

        * ``"value"``: :math:`-\alpha`; ``"loc"``: :math:`\alpha`;
        * ``"cov_factor"``: :math:`\alpha (\alpha^\top W) - \Sigma^{-1} W`;
        * ``"cov_diag"``: :math:`\frac12 (\alpha \odot \alpha - \operatorname{diag}\Sigma^{-1})`.

        They equal torch autograd through :class:`torch.distributions.LowRankMultivariateNormal`, per sample:
        :math:`O(dk)` per point and :math:`O(dk^2)` per batch member.

        Args:
            value (Tensor): points, shape broadcastable with ``batch_shape + (d,)``.
            wrt (str or sequence of str): ``"value"``, ``"loc"``, ``"cov_factor"`` or ``"cov_diag"``; a tuple or
                list of them returns a dict.
            out (Tensor or dict of Tensor, optional): as :meth:`JacobianMVN.jacobian`'s ``out``.

        Returns:
            Tensor (or dict of them): shape ``S + (d,)`` for ``"value"``, ``"loc"`` and ``"cov_diag"``,
            ``S + (d, k)`` for ``"cov_factor"``, where ``S = broadcast_shapes(value.shape[:-1], batch_shape)``.
        """
        names = check_wrt(wrt, WRT)
        r = check_value(self, value) - self.loc
        return _derivatives.jacobian(self._state, value, r, wrt, names, "full", out)

    @quiet_under_jit_trace
    def log_prob_and_grads(
        self,
        value: Tensor,
        wrt: tuple[str, ...] | list[str] | None = None,
        *,
        reduction: str = "none",
        out: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        r"""``log_prob(value)`` and its derivatives in one pass, no autograd pass (the outputs are differentiable
        where an input requires grad, as any torch result is).

        Args:
            value (Tensor): points, shape broadcastable with ``batch_shape + (d,)``.
            wrt (sequence of str, optional): names as in :meth:`jacobian`; default all four.
            reduction (str): ``"none"``: ``grads[k]`` is ``self.jacobian(value, k)``; ``"sum"``: the gradient of
                ``log_prob(value).sum()`` w.r.t. the tensor passed for ``k``, with that tensor's shape, as
                :func:`torch.autograd.grad` returns it.
            out (dict of Tensor, optional): for ``reduction="none"``, as in :meth:`jacobian`.

        Returns:
            tuple: ``(log_prob, grads)``, ``log_prob`` of shape ``S`` and ``grads`` a dict keyed by ``wrt``.
        """
        names = check_wrt(WRT if wrt is None else wrt, WRT)
        check_choice("reduction", reduction, REDUCTIONS)
        r = check_value(self, value) - self.loc
        return _derivatives.log_prob_and_grads(self._state, r, value, names, reduction, "full", out, self._batch_shape)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(loc: {format_shape(self.loc.shape)}, "
            f"cov_factor: {format_shape(self.cov_factor.shape)}, cov_diag: {format_shape(self.cov_diag.shape)})"
        )
