r"""The distribution: :class:`JacobianMVN`, torch's ``MultivariateNormal`` with closed-form derivatives.

The class reads like torch's ``MultivariateNormal``. It holds one :class:`~torch_mvn_ext._dense.DenseGaussian`, the
structure that owns ``loc``, the matrix argument, its triangular factor and every matrix derived from it, and
delegates to it: ``_derivatives`` writes the Jacobians and summed gradients from the structure's terms,
``_information`` and ``_conditioning`` the information geometry and Gaussian algebra; ``_checks`` holds the argument
checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union, overload

import pyro.distributions
import torch
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.utils import lazy_property

from . import _derivatives
from ._checks import (
    LAYOUTS,
    PARAMETRIZATIONS,
    REDUCTIONS,
    all_equal,
    check_choice,
    check_event_tensor,
    check_finite,
    check_parameters,
    check_value,
    check_wrt,
    quiet_under_jit_trace,
    validate_parameter,
)
from ._dense import DenseGaussian
from ._derivatives import Outputs
from ._geometry import InformationGeometry
from ._shapes import broadcast_shapes, event_dims, format_shape
from ._small import factor_of

try:  # torch's private sampler of its MVN: torch.randn, or normal_ on a fresh tensor under torch.jit.trace
    from torch.distributions.utils import _standard_normal
except ImportError:  # another torch layout: the public equivalent

    def _standard_normal(shape: Any, dtype: Any, device: Any) -> Tensor:  # type: ignore[misc]
        return torch.randn(shape, dtype=dtype, device=device)


__all__ = ["JacobianMVN"]

_size = Union[torch.Size, list[int], tuple[int, ...]]


class JacobianMVN(InformationGeometry, pyro.distributions.MultivariateNormal):
    r"""A multivariate normal distribution with closed-form per-sample derivatives of its log-density.

    A drop-in for :class:`torch.distributions.MultivariateNormal` (it is one) and for Pyro's
    ``dist.MultivariateNormal``, parametrized by exactly one of a covariance matrix :math:`\Sigma`, a precision
    matrix :math:`P = \Sigma^{-1}` or a lower-triangular :math:`L` with :math:`\Sigma = L L^\top`.

    All methods share one triangular factor, computed once in ``__init__``: the
    Cholesky factor :math:`L` of :math:`\Sigma`, or for the precision parametrization :math:`T = L^{-1}` with
    :math:`P = T^\top T`, so that nothing there forms :math:`\Sigma` or inverts :math:`P` unless asked for
    ``scale_tril``, ``covariance_matrix`` (lazy, as are the other derived matrices) or a derivative that needs it.
    Beyond :class:`~torch.distributions.MultivariateNormal` it offers :meth:`jacobian`, :meth:`log_prob_and_grads`
    and the information geometry of the Gaussian, and its ``log_prob`` backpropagates through the closed form.

    Example::

        >>> d = JacobianMVN(torch.zeros(3), covariance_matrix=torch.eye(3))
        >>> x = d.sample((5,))
        >>> d.jacobian(x, "value").shape
        torch.Size([5, 3])

    Args:
        loc (Tensor): mean, shape ``batch_shape + (d,)`` (broadcast against the matrix's batch shape).
        covariance_matrix (Tensor): positive-definite :math:`\Sigma`, shape ``batch_shape + (d, d)``.
        precision_matrix (Tensor): positive-definite :math:`P`, shape ``batch_shape + (d, d)``.
        scale_tril (Tensor): lower-triangular :math:`L` with positive diagonal, shape ``batch_shape + (d, d)``.
        validate_args (bool, optional): check the arguments' constraints, as torch does.
    """

    arg_constraints = {
        "loc": constraints.real_vector,
        "covariance_matrix": constraints.positive_definite,
        "precision_matrix": constraints.positive_definite,
        "scale_tril": constraints.lower_cholesky,
    }
    support = constraints.real_vector
    has_rsample = True

    @quiet_under_jit_trace
    def __init__(
        self,
        loc: Tensor,
        covariance_matrix: Tensor | None = None,
        precision_matrix: Tensor | None = None,
        scale_tril: Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        name, matrix, batch_shape = check_parameters(loc, covariance_matrix, precision_matrix, scale_tril)
        if validate_args is None:
            validate_args = type(self)._validate_args
        if validate_args:
            # torch's own check factorizes the matrix a second time; the factorization below is the check.
            validate_parameter("loc", loc, constraints.real_vector)
            if name == "scale_tril":
                validate_parameter(name, matrix, constraints.lower_cholesky)
            elif not all_equal(matrix, matrix.mT):  # exactly symmetric, the usual case: no tolerance check
                validate_parameter(name, matrix, constraints.symmetric)
        self._setup(DenseGaussian(loc, name, matrix, factor_of(name, matrix)), bool(validate_args), batch_shape)

    def _setup(self, state: DenseGaussian, validate_args: bool, batch_shape: Any) -> None:
        """What every constructor leaves: the structure, and torch's attributes (``loc`` and the given matrix as
        views of the batch shape)."""
        loc, matrix = state.loc, state.matrix
        event_shape = loc.shape[-1:]
        # What torch's Distribution.__init__ sets, with its checks done above: the rest of its MRO sets nothing.
        self._batch_shape, self._event_shape, self._validate_args = batch_shape, event_shape, validate_args
        self.loc = loc if loc.shape[:-1] == batch_shape else loc.expand(batch_shape + event_shape)
        full = matrix if matrix.shape[:-2] == batch_shape else matrix.expand(batch_shape + matrix.shape[-2:])
        setattr(self, state.parametrization, full)  # lazy_property has no setter: the instance's own, as torch sets
        self._state = state

    @classmethod
    def from_distribution(cls, mvn: torch.distributions.MultivariateNormal) -> JacobianMVN:
        r"""The :class:`JacobianMVN` of a torch or Pyro :class:`~torch.distributions.MultivariateNormal`.

        It keeps the parametrization the source was built with (the matrix argument its constructor stored first),
        its ``validate_args`` and its tensors, and reuses its Cholesky factor: nothing is factorized again (a
        precision-parametrized source costs one triangular inversion of its factor, :math:`T = L^{-1}`). Gradients
        flow to the source's parameters. torch's MVN keeps ``loc`` and a covariance or precision matrix only as views
        expanded to its ``batch_shape``, so ``log_prob_and_grads(reduction="sum")`` gives their gradients in that
        shape (summed to the user's own shapes, they equal autograd's); a ``scale_tril`` is kept as given.

        Example::

            >>> mvn = torch.distributions.MultivariateNormal(torch.zeros(2), covariance_matrix=torch.eye(2))
            >>> JacobianMVN.from_distribution(mvn).jacobian(torch.ones(2), "covariance_matrix")
            tensor([[0.0000, 0.5000],
                    [0.5000, 0.0000]])

        Args:
            mvn (torch.distributions.MultivariateNormal): the source (any subclass, Pyro's included).

        Returns:
            JacobianMVN: with the source's ``batch_shape``, ``event_shape``, parametrization and numbers.
        """
        state = DenseGaussian.of_distribution(mvn)
        new = cls.__new__(cls)
        new._setup(state, bool(mvn._validate_args), broadcast_shapes(state.loc.shape[:-1], state.matrix.shape[:-2]))
        return new if new.batch_shape == mvn.batch_shape else new.expand(mvn.batch_shape)

    @quiet_under_jit_trace
    def expand(self, batch_shape: _size, _instance: JacobianMVN | None = None) -> JacobianMVN:
        r"""This distribution with a larger batch shape, as torch's ``expand``: ``loc`` and the matrix argument become
        expanded views (nothing is copied), and the factor and every derived matrix computed so far are shared, not
        recomputed. The result is of the same class, with the same parametrization and ``validate_args``.

        Example::

            >>> d = JacobianMVN(torch.zeros(3), covariance_matrix=torch.eye(3))
            >>> d.expand((4,)).batch_shape
            torch.Size([4])

        Args:
            batch_shape (torch.Size or sequence of int): the new batch shape, to which the current one broadcasts.
            _instance: an instance for a subclass's own ``expand`` to fill in (torch's convention); leave it out.

        Returns:
            JacobianMVN: batch shape ``batch_shape``, the same event shape.
        """
        new = self._get_checked_instance(JacobianMVN, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        for name in PARAMETRIZATIONS:
            if name in self.__dict__:
                setattr(new, name, self.__dict__[name].expand(batch_shape + self.event_shape + self.event_shape))
        new._state = self._state
        new._batch_shape, new._event_shape, new._validate_args = batch_shape, self._event_shape, self._validate_args
        return new

    @property
    def parametrization(self) -> str:
        """The matrix argument the distribution was built with: ``"covariance_matrix"``,
        ``"precision_matrix"`` or ``"scale_tril"``."""
        return self._state.parametrization

    # Every derived matrix comes from the structure (see DenseGaussian): an in-place change to the caller's matrix
    # afterwards changes none of the methods' answers (only the caller's own tensor, which torch's MVN also keeps as
    # its attribute).

    @property  # torch's MVN holds it as an attribute, which code that dispatches on the class reads
    def _unbroadcasted_scale_tril(self) -> Tensor:  # type: ignore[override]
        return self._state.scale_tril

    @lazy_property
    def scale_tril(self) -> Tensor:
        return self._state.scale_tril.expand(self._batch_shape + self._event_shape + self._event_shape)

    @lazy_property
    def covariance_matrix(self) -> Tensor:
        return self._state.covariance_matrix.expand(self._batch_shape + self._event_shape + self._event_shape)

    @lazy_property
    def precision_matrix(self) -> Tensor:
        return self._state.precision_matrix.expand(self._batch_shape + self._event_shape + self._event_shape)

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def mode(self) -> Tensor:
        return self.loc

    @property
    def variance(self) -> Tensor:
        return self._state.variance().expand(self._batch_shape + self._event_shape)

    @quiet_under_jit_trace
    def rsample(self, sample_shape: _size = torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        eps = _standard_normal(shape, dtype=self.loc.dtype, device=self.loc.device)
        return (self.loc + self._state.color(eps)).contiguous()

    @quiet_under_jit_trace
    def log_prob(self, value: Tensor) -> Tensor:
        r"""The log-density of ``value``, shape ``broadcast_shapes(value.shape[:-1], batch_shape)``.

        :math:`\log p(x) = -\frac12 \|z\|^2 - \frac12\log\det\Sigma - \frac d2 \log 2\pi` with
        :math:`z = L^{-1}(x - \mu)`: one triangular solve with the factor (a matrix product with a precision
        factor). Its autograd backward is the closed form (see :meth:`jacobian`), to first and second order, and it
        works under ``torch.func`` transforms and ``torch.compile``.

        ``value`` must be a tensor on the distribution's device whose last dimension is the event size and whose
        batch broadcasts with ``batch_shape``, else ``ValueError``. With ``validate_args`` it must also be finite:
        the error carries torch's "Expected value argument ... to be within the support" wording. A ``value`` of
        another floating dtype is converted to the distribution's.
        """
        return self._state.log_prob(check_value(self, value) - self.loc)

    @quiet_under_jit_trace
    def entropy(self) -> Tensor:
        return self._state.entropy().expand(self._batch_shape)

    # ----------------------------------------------------------------------------------------------
    # Derivatives, information geometry and Gaussian algebra.

    @overload
    def jacobian(self, value: Tensor, wrt: str = ..., *, layout: str = ..., out: Tensor | None = ...) -> Tensor: ...

    @overload
    def jacobian(
        self,
        value: Tensor,
        wrt: tuple[str, ...] | list[str],
        *,
        layout: str = ...,
        out: dict[str, Tensor] | None = ...,
    ) -> dict[str, Tensor]: ...

    @quiet_under_jit_trace
    def jacobian(
        self,
        value: Tensor,
        wrt: str | tuple[str, ...] | list[str] = "value",
        *,
        layout: str = "full",
        out: Outputs | None = None,
    ) -> Outputs:
        r"""Per-sample derivatives of ``log_prob(value)``, in closed form from the one factorization.

        With :math:`r = x - \mu`, :math:`z = L^{-1} r`, :math:`\alpha = \Sigma^{-1} r`:

        * ``"value"``: :math:`-\alpha`; ``"loc"``: :math:`\alpha`;
        * ``"covariance_matrix"``: :math:`\frac12(\alpha\alpha^\top - \Sigma^{-1})`;
        * ``"precision_matrix"``: :math:`\frac12(\Sigma - r r^\top)`;
        * ``"scale_tril"``: :math:`\operatorname{tril}(\alpha z^\top) - \operatorname{diag}(1/L_{ii})`.

        These equal what torch autograd gives through :class:`torch.distributions.MultivariateNormal`. Any
        ``wrt`` works whatever the parametrization: the matrices are coordinates of the same distribution.

        Args:
            value (Tensor): points, shape broadcastable with ``batch_shape + (d,)``.
            wrt (str or sequence of str): ``"value"``, ``"loc"``, ``"covariance_matrix"``,
                ``"precision_matrix"`` or ``"scale_tril"``; a tuple or list of them returns a dict.
            layout (str): ``"full"`` for ``(d, d)`` matrices; ``"vech"`` for the lower triangle in
                ``torch.tril_indices`` order (the derivative w.r.t. the unique elements of the symmetric
                matrices, so their off-diagonal entries are doubled; ``scale_tril``'s lower triangle as is).
            out (Tensor or dict of Tensor, optional): as torch's ``out=``: a tensor of exactly the result's shape,
                dtype and device (a dict of them by name for several ``wrt``) that the result is written into and
                returned as; anything else raises ``ValueError`` naming the expected shape. It saves the fresh pages
                of large matrix results in loops over batches. As torch's own ``out=`` functions, it records no
                autograd graph: with grad mode on, a ``value``, ``loc`` or matrix argument that requires grad
                raises ``ValueError`` (call without ``out=`` for a differentiable result, or under
                ``torch.no_grad()``).

        Returns:
            Tensor (or dict of them): shape ``S + (d,)`` for ``"value"`` and ``"loc"``, ``S + (d, d)`` for a
            matrix with ``layout="full"``, ``S + (d*(d+1)//2,)`` with ``layout="vech"``, where
            ``S = broadcast_shapes(value.shape[:-1], batch_shape)``. Element ``[s]`` is the derivative of
            ``log_prob(value)[s]`` w.r.t. the parameter of its own batch member.
        """
        names = check_wrt(wrt)
        check_choice("layout", layout, LAYOUTS)
        r = check_value(self, value) - self.loc
        return _derivatives.jacobian(self._state, value, r, wrt, names, layout, out)

    @quiet_under_jit_trace
    def log_prob_and_grads(
        self,
        value: Tensor,
        wrt: tuple[str, ...] | list[str] | None = None,
        *,
        reduction: str = "none",
        layout: str = "full",
        out: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        r"""``log_prob(value)`` and its derivatives in one pass: one factorization, shared intermediates, no
        autograd pass (the outputs are differentiable where an input requires grad, as any torch result is).

        Args:
            value (Tensor): points, shape broadcastable with ``batch_shape + (d,)``.
            wrt (sequence of str, optional): names as in :meth:`jacobian`; default
                ``("value", "loc", self.parametrization)``.
            reduction (str): ``"none"``: ``grads[k]`` is ``self.jacobian(value, k, layout=layout)``.
                ``"sum"``: ``grads[k]`` is the gradient of ``log_prob(value).sum()`` w.r.t. the tensor passed
                for ``k`` (``value``, ``loc`` or the matrix argument), with that tensor's shape, as
                :func:`torch.autograd.grad` would return it. For a matrix other than the parametrization the
                shape is ``batch_shape + (d, d)`` (``batch_shape + (d*(d+1)//2,)`` for ``layout="vech"``).
            layout (str): ``"full"`` or ``"vech"``, as in :meth:`jacobian`.
            out (dict of Tensor, optional): for ``reduction="none"``, buffers by name as in :meth:`jacobian`, and
                like it refused (``ValueError``) for inputs that require grad while grad mode is on.

        Returns:
            tuple: ``(log_prob, grads)``, ``log_prob`` of shape ``S`` and ``grads`` a dict keyed by ``wrt``.
        """
        names = check_wrt(("value", "loc", self._state.parametrization) if wrt is None else wrt)
        check_choice("layout", layout, LAYOUTS)
        check_choice("reduction", reduction, REDUCTIONS)
        r = check_value(self, value) - self.loc
        return _derivatives.log_prob_and_grads(self._state, r, value, names, reduction, layout, out, self._batch_shape)

    def marginal(self, dims: Sequence[int] | Tensor) -> JacobianMVN:
        r"""The distribution of ``x[..., dims]``: mean ``loc[..., dims]``, covariance :math:`\Sigma_{aa}` with
        :math:`a` = ``dims``, built the cheapest way the factor allows and without any inverse:

        * ``dims`` the leading indices ``0, ..., m-1``: the leading :math:`m \times m` block of the factor is the
          marginal's factor (its ``scale_tril`` :math:`L_{aa}`; from a precision factor :math:`T`, with
          :math:`P = T^\top T`, the marginal precision :math:`T_{aa}^\top T_{aa}`);
        * otherwise, precision-parametrized: the precision :math:`P_{aa} - P_{ab} P_{bb}^{-1} P_{ba}` (:math:`b` the
          other indices), through the Cholesky factor of :math:`P_{bb}`, without forming :math:`\Sigma`;
        * otherwise: the covariance :math:`\Sigma_{aa}`, a sub-block of the covariance matrix (or
          :math:`L_{a:} L_{a:}^\top` from rows of ``scale_tril``).

        Args:
            dims (sequence of int or Tensor): the event indices to keep, in the order wanted, no repeats: a list,
                tuple or range of ints or a 1-d integer tensor; negative indices count from the end as in Python
                indexing.

        Returns:
            JacobianMVN: batch shape ``batch_shape``, event shape ``(len(dims),)``; differentiable w.r.t. ``loc``
            and the matrix.
        """
        a = event_dims(dims, self._event_shape[0])
        if not a:
            raise ValueError("marginal(dims) needs at least one event index; dims is empty")
        loc, name, matrix = self._state.marginal(a)
        out = JacobianMVN(loc, **{name: matrix}, validate_args=self._validate_args)
        return out if out.batch_shape == self._batch_shape else out.expand(self._batch_shape)

    def condition(self, dims: Sequence[int] | Tensor, value: Tensor) -> JacobianMVN:
        r"""The distribution of the remaining coordinates (in their original order) given ``x[..., dims] = value``.

        With :math:`b` = ``dims``, :math:`a` the rest and :math:`r_b = x_b - \mu_b`, the conditional is
        :math:`N(\mu_a + \Sigma_{ab}\Sigma_{bb}^{-1} r_b,\ \Sigma_{aa} - \Sigma_{ab}\Sigma_{bb}^{-1}\Sigma_{ba})
        = N(\mu_a - P_{aa}^{-1} P_{ab} r_b,\ P_{aa}^{-1})`, computed without any inverse:

        * ``dims`` the leading indices ``0, ..., m-1`` (in any order): the conditional's factor is the trailing
          block of the distribution's own, and its mean takes one triangular solve with a block of it;
        * otherwise, precision-parametrized: the precision :math:`P_{aa}` (a sub-block; :math:`\Sigma` is never
          formed), the mean through a Cholesky solve with it;
        * otherwise: with :math:`C` the Cholesky factor of :math:`\Sigma_{bb}` and :math:`W = C^{-1} \Sigma_{ba}`,
          the covariance :math:`\Sigma_{aa} - W^\top W` and the mean :math:`\mu_a + W^\top C^{-1} r_b`.

        Args:
            dims (sequence of int or Tensor): the observed event indices, no repeats: a list, tuple or range of ints
                or a 1-d integer tensor; negative indices count from the end as in Python indexing. An empty
                ``dims`` conditions on nothing; all ``d`` indices leave nothing and raise ``ValueError``.
            value (Tensor): the observed values, shape ``B + (len(dims),)`` with ``B`` broadcastable with
                ``batch_shape``; ``value[..., i]`` is the value of coordinate ``dims[i]``.

        Returns:
            JacobianMVN: batch shape ``broadcast_shapes(B, batch_shape)``, event shape ``(d - len(dims),)``;
            differentiable w.r.t. ``loc``, the matrix and ``value``.
        """
        d = self._event_shape[0]
        b = event_dims(dims, d)
        if len(b) == d:
            raise ValueError(
                f"condition(dims={list(dims)}) observes all {d} coordinates, which leaves no coordinate to condition"
            )
        m = len(b)
        shape = check_event_tensor(
            "value", value, torch.Size([m]), self._batch_shape, self.loc.device, what=f"len(dims) = {m}"
        )
        if self._validate_args:
            check_finite("value", value)
        if not m:
            return self.expand(shape)
        loc, name, matrix = self._state.condition(b, value.to(self.loc.dtype), shape)
        return JacobianMVN(loc, **{name: matrix}, validate_args=self._validate_args)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(loc: {format_shape(self.loc.shape)}, "
            f"{self._state.parametrization}: {format_shape(self.loc.shape + self._event_shape)})"
        )
