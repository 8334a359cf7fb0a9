r"""The distribution: :class:`JacobianMVN`, torch's ``MultivariateNormal`` with closed-form derivatives.

The class reads like torch's ``MultivariateNormal``; the derivative methods at its end delegate to the module that
holds their math: :mod:`._factor` (the triangular factor), :mod:`._derivatives` (Jacobians and summed gradients),
:mod:`._autograd` (``log_prob``'s backward), :mod:`._information` (Fisher information, natural gradients) and
:mod:`._conditioning` (marginals and conditionals); :mod:`._checks` holds the argument checks.
"""

from __future__ import annotations

from typing import Any, Union

import pyro.distributions
import torch
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.utils import _standard_normal, lazy_property

from . import _autograd, _conditioning, _information
from ._checks import (
    LAYOUTS,
    PARAMETRIZATIONS,
    REDUCTIONS,
    WRT,
    all_equal,
    all_true,
    check_allocation,
    check_choice,
    check_device,
    check_event_tensor,
    check_out,
    check_parameters,
    check_wrt,
    is_finite,
    quiet_under_jit_trace,
)
from ._derivatives import Residual, per_sample_matrix, summed_matrix
from ._factor import CholeskyFactor, PrecisionFactor, ScaleTril, TriangularFactor, cholesky
from ._shapes import broadcast_shapes, event_dims, format_shape

__all__ = ["JacobianMVN"]

Outputs = Union[Tensor, dict[str, Tensor]]


class _cached:
    """A private cache on the instance, computed on first use: torch's ``lazy_property`` (results with their graph
    even when first asked for under ``torch.no_grad()``), without entering ``enable_grad`` where grad is enabled."""

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
        instance.__dict__[self.name] = value
        return value


class JacobianMVN(pyro.distributions.MultivariateNormal):
    r"""A multivariate normal distribution with closed-form per-sample derivatives of its log-density.

    A drop-in for :class:`torch.distributions.MultivariateNormal` (it is one) and for Pyro's
    ``dist.MultivariateNormal``, parametrized by exactly one of a covariance matrix :math:`\Sigma`, a precision
    matrix :math:`P = \Sigma^{-1}` or a lower-triangular :math:`L` with :math:`\Sigma = L L^\top`.

    All methods share one triangular factor, computed once in ``__init__`` (also when ``validate_args`` is on):
    the Cholesky factor :math:`L` of :math:`\Sigma`, or, for the precision parametrization, the lower-triangular
    :math:`T = L^{-1}` with :math:`P = T^\top T`, so that ``log_prob``, ``entropy`` and the derivatives w.r.t.
    ``value``, ``loc`` and ``precision_matrix``'s own terms never form :math:`\Sigma` or invert :math:`P`.
    ``scale_tril``, ``covariance_matrix`` and ``precision_matrix`` are derived lazily, when first asked for.

    Beyond :class:`~torch.distributions.MultivariateNormal` it offers :meth:`jacobian` and
    :meth:`log_prob_and_grads`, and its ``log_prob`` backpropagates through the same closed form.

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
            _validate_parameter("loc", loc, constraints.real_vector)
            if name == "scale_tril":
                _validate_parameter(name, matrix, constraints.lower_cholesky)
            elif not all_equal(matrix, matrix.mT):  # exactly symmetric, the usual case: no tolerance check
                _validate_parameter(name, matrix, constraints.symmetric)
        if name == "covariance_matrix":
            factor: TriangularFactor = CholeskyFactor(cholesky(matrix, name))
        elif name == "scale_tril":
            factor = ScaleTril(matrix)
        else:
            factor = PrecisionFactor.of(matrix)
        self._setup(loc, name, matrix, factor, bool(validate_args), batch_shape)

    def _setup(
        self, loc: Tensor, name: str, matrix: Tensor, factor: TriangularFactor, validate_args: bool, batch_shape: Any
    ) -> None:
        """The state every constructor leaves: torch's attributes (``loc`` and the given matrix as views of the
        batch shape) and the unbroadcast tensors the methods compute with."""
        event_shape = loc.shape[-1:]
        # What torch's Distribution.__init__ sets, with its checks done above: the rest of its MRO sets nothing.
        self._batch_shape, self._event_shape, self._validate_args = batch_shape, event_shape, validate_args
        self.loc = loc if loc.shape[:-1] == batch_shape else loc.expand(batch_shape + event_shape)
        self.__dict__[name] = matrix if matrix.shape[:-2] == batch_shape else matrix.expand(batch_shape + matrix.shape[-2:])
        self._parametrization = name
        self._unbroadcasted_loc = loc
        self._unbroadcasted_matrix = matrix
        self._factor = factor

    @classmethod
    def from_distribution(cls, mvn: torch.distributions.MultivariateNormal) -> JacobianMVN:
        r"""The :class:`JacobianMVN` of a torch or Pyro :class:`~torch.distributions.MultivariateNormal`.

        It keeps the parametrization the source was built with (the matrix argument its constructor stored first),
        its ``validate_args`` and its tensors, and reuses its Cholesky factor: nothing is factorized again (a
        precision-parametrized source costs one triangular inversion of its factor, :math:`T = L^{-1}`). Gradients
        flow to the source's parameters.

        Example::

            >>> mvn = torch.distributions.MultivariateNormal(torch.zeros(2), covariance_matrix=torch.eye(2))
            >>> JacobianMVN.from_distribution(mvn).jacobian(torch.ones(2), "covariance_matrix")
            tensor([[ 0.0000,  0.5000],
                    [ 0.5000,  0.0000]])

        Args:
            mvn (torch.distributions.MultivariateNormal): the source (any subclass, Pyro's included).

        Returns:
            JacobianMVN: with the source's ``batch_shape``, ``event_shape``, parametrization and numbers.
        """
        if not isinstance(mvn, torch.distributions.MultivariateNormal):
            raise ValueError(
                "from_distribution needs a torch.distributions.MultivariateNormal (or Pyro's); "
                f"got {type(mvn).__name__}"
            )
        if isinstance(mvn, JacobianMVN):
            name, matrix, factor = mvn._parametrization, mvn._unbroadcasted_matrix, mvn._factor
            loc = mvn._unbroadcasted_loc
        else:
            name = next(key for key in mvn.__dict__ if key in PARAMETRIZATIONS)
            matrix, loc = mvn.__dict__[name], mvn.loc
            scale_tril = mvn._unbroadcasted_scale_tril
            factor = ScaleTril(scale_tril) if name == "scale_tril" else CholeskyFactor(scale_tril)
            if name == "precision_matrix":
                factor = PrecisionFactor(CholeskyFactor(scale_tril).whiten(_eye_like(scale_tril)).mT)
        new = cls.__new__(cls)
        new._setup(loc, name, matrix, factor, bool(mvn._validate_args), broadcast_shapes(loc.shape[:-1], matrix.shape[:-2]))
        if name == "precision_matrix" and not isinstance(mvn, JacobianMVN):
            new.__dict__["_unbroadcasted_scale_tril"] = mvn._unbroadcasted_scale_tril
        return new if new.batch_shape == mvn.batch_shape else new.expand(mvn.batch_shape)

    @quiet_under_jit_trace
    def expand(self, batch_shape: torch.Size, _instance: Any = None) -> JacobianMVN:
        new = self._get_checked_instance(JacobianMVN, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        for name in PARAMETRIZATIONS:
            if name in self.__dict__:
                setattr(new, name, self.__dict__[name].expand(batch_shape + self.event_shape + self.event_shape))
        for name in _CACHED:
            if name in self.__dict__:
                new.__dict__[name] = self.__dict__[name]
        new._parametrization = self._parametrization
        new._unbroadcasted_loc = self._unbroadcasted_loc
        new._unbroadcasted_matrix = self._unbroadcasted_matrix
        new._factor = self._factor
        new._batch_shape, new._event_shape, new._validate_args = batch_shape, self._event_shape, self._validate_args
        return new

    @property
    def parametrization(self) -> str:
        """The matrix argument the distribution was built with: ``"covariance_matrix"``,
        ``"precision_matrix"`` or ``"scale_tril"``."""
        return self._parametrization

    @_cached
    def _symmetric_matrix(self) -> Tensor:
        """The given covariance or precision matrix as the factorization read it: the covariance's lower triangle or
        the precision's upper one (its factor comes from the flipped matrix), mirrored; the matrix itself when it is
        symmetric, as validation checks to a tolerance. Every method that reads the
        matrix reads this, so that an unvalidated matrix that is not symmetric means one distribution throughout."""
        m = self._unbroadcasted_matrix
        if self._parametrization == "precision_matrix":  # factorized flipped: its upper triangle is what was read
            return m.triu() + m.triu(1).mT
        return m.tril() + m.tril(-1).mT

    @_cached
    def _unbroadcasted_scale_tril(self) -> Tensor:
        return self._factor.scale_tril()

    @_cached
    def _unbroadcasted_sigma(self) -> Tensor:
        if self._parametrization == "covariance_matrix":
            return self._symmetric_matrix
        L = self._unbroadcasted_scale_tril
        return L @ L.mT

    @_cached
    def _unbroadcasted_sigma_inverse(self) -> Tensor:
        if self._parametrization == "precision_matrix":
            return self._symmetric_matrix
        return self._factor.precision_matrix()

    @lazy_property
    def scale_tril(self) -> Tensor:
        return self._unbroadcasted_scale_tril.expand(self._batch_shape + self._event_shape + self._event_shape)

    @lazy_property
    def covariance_matrix(self) -> Tensor:
        return self._unbroadcasted_sigma.expand(self._batch_shape + self._event_shape + self._event_shape)

    @lazy_property
    def precision_matrix(self) -> Tensor:
        return self._unbroadcasted_sigma_inverse.expand(self._batch_shape + self._event_shape + self._event_shape)

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def mode(self) -> Tensor:
        return self.loc

    @property
    def variance(self) -> Tensor:
        if self._parametrization == "covariance_matrix":
            var = self._unbroadcasted_matrix.diagonal(dim1=-2, dim2=-1)
        else:
            var = self._unbroadcasted_scale_tril.pow(2).sum(-1)
        return var.expand(self._batch_shape + self._event_shape)

    @quiet_under_jit_trace
    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        eps = _standard_normal(shape, dtype=self.loc.dtype, device=self.loc.device)
        noise = Residual(eps, self._factor)
        # contiguous: a float32 triangular solve from the right (_factor._solve_rows) leaves its result column-major
        return (self.loc + noise.full(noise.factor.color(noise.r))).contiguous()

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
        value = self._check_value(value)
        covariance = self._unbroadcasted_matrix if self._parametrization == "covariance_matrix" else None
        return _autograd.log_prob(value - self.loc, self._factor, covariance)

    @quiet_under_jit_trace
    def entropy(self) -> Tensor:
        return self._factor.entropy().expand(self._batch_shape)

    # ----------------------------------------------------------------------------------------------
    # Derivatives, information geometry and Gaussian algebra.

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

        Returns:
            Tensor (or dict of them): shape ``S + (d,)`` for ``"value"`` and ``"loc"``, ``S + (d, d)`` for a
            matrix with ``layout="full"``, ``S + (d*(d+1)//2,)`` with ``layout="vech"``, where
            ``S = broadcast_shapes(value.shape[:-1], batch_shape)``. Element ``[s]`` is the derivative of
            ``log_prob(value)[s]`` w.r.t. the parameter of its own batch member.
        """
        names = check_wrt(wrt)
        check_choice("layout", layout, LAYOUTS)
        res = self._residual(value)
        outs = self._check_out(out, wrt, names, res, layout)
        result = {name: self._per_sample(res, name, layout, outs.get(name)) for name in names}
        return result if not isinstance(wrt, str) else result[wrt]

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
        autograd graph.

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

        Returns:
            tuple: ``(log_prob, grads)``, ``log_prob`` of shape ``S`` and ``grads`` a dict keyed by ``wrt``.
        """
        if wrt is None:
            wrt = ("value", "loc", self._parametrization)
        names = check_wrt(wrt)
        check_choice("layout", layout, LAYOUTS)
        check_choice("reduction", reduction, REDUCTIONS)
        res = self._residual(value)
        if reduction == "none":
            outs = self._check_out(out, tuple(names), names, res, layout)
            grads = {name: self._per_sample(res, name, layout, outs.get(name)) for name in names}
        else:
            if out is not None:
                raise ValueError("out= is for reduction='none'; the summed gradients have the inputs' own shapes")
            grads = {}
            for name in names:
                if name == "value":
                    grads[name] = self._summed_value(res, value)
                elif name == "loc":
                    alpha = res.full_alpha()
                    shape = self._unbroadcasted_loc.shape
                    grads[name] = alpha if alpha.shape == shape else alpha.sum_to_size(shape)
                else:
                    grads[name] = self._summed_matrix(res, name, layout)
        return res.log_prob, grads

    @quiet_under_jit_trace
    def hessian(self, value: Tensor, wrt: str = "value") -> Tensor:
        r"""Per-sample Hessian of ``log_prob(value)`` w.r.t. ``value`` or ``loc``, without autograd.

        :math:`\log p` is quadratic in :math:`r = x - \mu`, so both Hessians are :math:`-P` for every point.

        Args:
            value (Tensor): points, shape broadcastable with ``batch_shape + (d,)`` (checked as in
                :meth:`log_prob`; only its shape enters the result).
            wrt (str): ``"value"`` or ``"loc"``.

        Returns:
            Tensor: :math:`-P` as an expanded view of shape ``S + (d, d)``, where
            ``S = broadcast_shapes(value.shape[:-1], batch_shape)``.
        """
        check_choice("wrt", wrt, ("value", "loc"))
        value = self._check_value(value)
        shape = broadcast_shapes(value.shape[:-1], self._batch_shape) + self._event_shape + self._event_shape
        return (-self._unbroadcasted_sigma_inverse).expand(shape)

    @quiet_under_jit_trace
    def fisher_information(self, wrt: str = "loc", *, layout: str = "vech") -> Tensor:
        r"""The Fisher information matrix of each batch member, in closed form, in the coordinates of ``wrt``.

        It is the covariance of the per-sample score ``jacobian(x, wrt, layout="vech")`` under ``x ~ self`` and
        minus the expected Hessian of ``log_prob`` in those coordinates. With index pairs :math:`(i, j)`,
        :math:`(k, l)` of the lower triangle (``torch.tril_indices`` order) and :math:`w_{ij}` = 1 on the
        diagonal, 2 off it:

        * ``"loc"``: :math:`P`;
        * ``"covariance_matrix"``: :math:`\frac{w_{ij} w_{kl}}{4}(P_{ik}P_{jl} + P_{il}P_{jk})`, that is
          :math:`\frac12 D^\top (P \otimes P) D` with the duplication matrix :math:`D`;
        * ``"precision_matrix"``: the same with :math:`\Sigma` in place of :math:`P`;
        * ``"scale_tril"``: :math:`P_{ik}\delta_{jl} + \delta_{ik}\delta_{jl}\delta_{ij} / L_{ii}^2`.

        The matrices are gathered entry by entry (:math:`O(k^2)` per member), never through a
        :math:`d^2 \times d^2` Kronecker product.

        Args:
            wrt (str): ``"loc"``, ``"covariance_matrix"``, ``"precision_matrix"`` or ``"scale_tril"``.
            layout (str): ``"vech"``, the only layout for the matrices (in the full layout the
                :math:`d^2 \times d^2` Fisher matrix is singular); ignored for ``"loc"``.

        Returns:
            Tensor: shape ``batch_shape + (d, d)`` for ``"loc"`` and ``batch_shape + (k, k)``,
            ``k = d*(d+1)//2``, for a matrix (an expanded view of one matrix per member of the parameters' batch).
        """
        check_choice("wrt", wrt, WRT[1:])
        check_choice("layout", layout, LAYOUTS)
        if wrt == "loc":
            info = self._unbroadcasted_sigma_inverse.clone()  # a copy: the caller may damp it in place
        elif layout == "full":
            raise ValueError(
                f"fisher_information(wrt={wrt!r}) needs layout='vech': in the full (d, d) layout the d^2 x d^2 "
                f"Fisher matrix is singular (the matrix has only d*(d+1)/2 free entries)"
            )
        elif wrt == "covariance_matrix":
            info = _information.symmetric_fisher_vech(self._unbroadcasted_sigma_inverse)
        elif wrt == "precision_matrix":
            info = _information.symmetric_fisher_vech(self._unbroadcasted_sigma)
        else:
            info = _information.tril_fisher_vech(self._unbroadcasted_sigma_inverse, self._factor.inv_scale_diag())
        return info.expand(self._batch_shape + info.shape[-2:])

    @quiet_under_jit_trace
    def natural_gradient(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        r"""Natural gradients :math:`F^{-1} g` from Euclidean ones, in :math:`O(d^3)` per member, never forming
        :math:`F`.

        * ``"loc"``: :math:`\Sigma g` (two triangular solves for a precision-parametrized distribution);
        * ``"covariance_matrix"``: :math:`2 \Sigma G \Sigma`;
        * ``"precision_matrix"``: :math:`2 P G P`;
        * ``"scale_tril"``: :math:`L\,\Phi(L^\top G)`, :math:`\Phi(X) = \operatorname{tril}(X, -1) +
          \frac12 \operatorname{diag}(X)`.

        ``G`` is the gradient in full ``(d, d)`` form, as :meth:`jacobian` or autograd returns it. Only its
        symmetric part is a gradient in the :math:`d(d+1)/2` free coordinates of a symmetric matrix, so it is
        symmetrized first; for ``"scale_tril"`` only its lower triangle counts. The vech of each result solves
        ``fisher_information(name) @ vech_result = vech_gradient``, where ``vech_gradient`` is the gradient in the
        vech coordinates (``jacobian``'s ``layout="vech"`` convention: off-diagonals of the symmetric matrices
        doubled). The Fisher information of a Gaussian is block-diagonal in ``(loc, matrix)``, so each key is
        transformed on its own.

        Args:
            grads (dict): ``"loc"`` → tensor broadcastable with ``batch_shape + (d,)``, and/or one of
                ``"covariance_matrix"``, ``"precision_matrix"``, ``"scale_tril"`` → tensor broadcastable with
                ``batch_shape + (d, d)``.

        Returns:
            dict: the same keys; shape ``broadcast_shapes(g.shape[:-1], batch_shape) + (d,)`` for ``"loc"`` and
            ``broadcast_shapes(G.shape[:-2], batch_shape) + (d, d)`` for the matrix.
        """
        allowed = WRT[1:]
        if not isinstance(grads, dict) or not grads:
            raise ValueError(
                f"grads must be a non-empty dict keyed by 'loc' and/or one of {', '.join(map(repr, allowed[1:]))}; "
                f"got {type(grads).__name__}{' (empty)' if isinstance(grads, dict) else ''}"
            )
        for name in grads:
            check_choice("each key of grads", name, allowed)
        matrices = [name for name in grads if name != "loc"]
        if len(matrices) > 1:
            raise ValueError(
                f"grads has gradients w.r.t. {' and '.join(matrices)}: they are coordinates of the same distribution, "
                f"so pass the gradient w.r.t. one of them"
            )
        event, dtype = self._event_shape, self.loc.dtype
        out = {}
        for name, g in grads.items():
            key = f"grads[{name!r}]"
            if name == "loc":
                check_event_tensor(key, g, event, self._batch_shape, self.loc.device)
                shape = broadcast_shapes(g.shape[:-1], self._batch_shape)
                x = Residual(g.to(dtype).expand(shape + event), self._factor)
                out[name] = x.full(x.factor.sigma_matvec(x.r))
                continue
            shape = check_event_tensor(key, g, event + event, self._batch_shape, self.loc.device)
            g = g.to(dtype)
            if name == "scale_tril":
                nat = _information.tril_natural_gradient(self._unbroadcasted_scale_tril, g)
            else:
                m = self._unbroadcasted_sigma if name == "covariance_matrix" else self._unbroadcasted_sigma_inverse
                nat = _information.symmetric_natural_gradient(m, g)
            out[name] = nat.expand(shape + event + event)
        return out

    def marginal(self, dims: Any) -> JacobianMVN:
        r"""The distribution of ``x[..., dims]``.

        Its mean is ``loc[..., dims]`` and its covariance :math:`\Sigma_{aa}` with :math:`a` = ``dims``. The result
        is built the cheapest way the factor allows:

        * ``dims`` = ``[0, 1, ..., m-1]``: the leading block of the factor is the factor of the marginal (the
          ``scale_tril`` :math:`L_{aa}`; for a precision factor the marginal precision :math:`T_{aa}^\top T_{aa}`);
        * otherwise, precision-parametrized: the Schur complement
          :math:`P_{aa} - P_{ab} P_{bb}^{-1} P_{ba}` through the Cholesky factor of :math:`P_{bb}` (no inverse,
          :math:`\Sigma` never formed), returned precision-parametrized;
        * otherwise: ``covariance_matrix`` :math:`\Sigma_{aa}` (a sub-block of the given covariance, or
          :math:`L_{a:} L_{a:}^\top`).

        Args:
            dims (sequence of int): the event indices to keep, in the order wanted, no repeats; negative indices
                count from the end as in Python indexing.

        Returns:
            JacobianMVN: batch shape ``batch_shape``, event shape ``(len(dims),)``; differentiable w.r.t. ``loc``
            and the matrix.
        """
        a = event_dims(dims, self._event_shape[0])
        if not a:
            raise ValueError("marginal(dims) needs at least one event index; dims is empty")
        loc, name, matrix = _conditioning.marginal(self, a)
        out = JacobianMVN(loc, **{name: matrix}, validate_args=self._validate_args)
        return out if out.batch_shape == self._batch_shape else out.expand(self._batch_shape)

    def condition(self, dims: Any, value: Tensor) -> JacobianMVN:
        r"""The distribution of the remaining coordinates (in their original order) given ``x[..., dims] = value``.

        With :math:`b` = ``dims``, :math:`a` the rest and :math:`r_b = x_b - \mu_b`, the conditional is
        :math:`N(\mu_a + \Sigma_{ab}\Sigma_{bb}^{-1} r_b,\ \Sigma_{aa} - \Sigma_{ab}\Sigma_{bb}^{-1}\Sigma_{ba})
        = N(\mu_a - P_{aa}^{-1} P_{ab} r_b,\ P_{aa}^{-1})`. Computed without any inverse:

        * ``dims`` are the leading coordinates (in any order): with the factor split in blocks, the conditional's
          factor is the trailing block of the distribution's own. ``scale_tril`` :math:`L_{aa}` and mean
          :math:`\mu_a + L_{ab} L_{bb}^{-1} r_b`; for a precision factor the precision :math:`P_{aa} =
          T_{aa}^\top T_{aa}` and mean :math:`\mu_a - T_{aa}^{-1} T_{ab} r_b`. No new factorization for the mean.
        * otherwise, precision-parametrized: precision :math:`P_{aa}` (a sub-block) and the mean through a
          Cholesky solve with :math:`P_{aa}`; :math:`\Sigma` is never formed.
        * otherwise: the Schur complement through the Cholesky factor :math:`C` of :math:`\Sigma_{bb}`:
          :math:`W = C^{-1}\Sigma_{ba}`, covariance :math:`\Sigma_{aa} - W^\top W` and mean
          :math:`\mu_a + W^\top C^{-1} r_b` — the same arithmetic as a blocked Cholesky factorization of
          :math:`\Sigma` permuted to :math:`(b, a)` order, at the cost of one :math:`O(d^3/3)` factorization.

        Args:
            dims (sequence of int): the observed event indices, no repeats; negative indices count from the end as
                in Python indexing. An empty ``dims`` conditions on nothing; all ``d`` indices leave nothing and
                raise ``ValueError``.
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
        if self._validate_args and not is_finite(value):
            raise ValueError(f"value contains NaN or infinite entries:\n{value}")
        if not m:
            return self.expand(shape)
        loc, name, matrix = _conditioning.condition(self, b, value.to(self.loc.dtype), shape)
        return JacobianMVN(loc, **{name: matrix}, validate_args=self._validate_args)

    # ----------------------------------------------------------------------------------------------
    # Private helpers.

    def _check_value(self, value: Tensor) -> Tensor:
        loc = self.loc
        if not isinstance(value, Tensor):
            raise ValueError(f"value must be a torch.Tensor, got {type(value).__name__}")
        shape, batch_shape = value.shape, self._batch_shape
        if not shape or shape[-1] != self._event_shape[0]:
            raise ValueError(
                f"value has shape {format_shape(shape)} but the distribution's event shape is "
                f"{format_shape(self._event_shape)}: the last dimension of value must be {self._event_shape[0]}"
            )
        if batch_shape and shape[:-1] != batch_shape:
            try:
                broadcast_shapes(shape[:-1], batch_shape)
            except RuntimeError:
                raise ValueError(
                    f"value has shape {format_shape(shape)}, which does not broadcast with the distribution's "
                    f"batch_shape + event_shape {format_shape(batch_shape + self._event_shape)}"
                ) from None
        if value.device != loc.device:
            check_device("value", value, loc.device)
        if self._validate_args and not is_finite(value):
            # The shape checks above and finiteness cover torch's _validate_sample (support real_vector: no NaN).
            raise ValueError(
                f"Expected value argument (Tensor of shape {tuple(shape)}) to be within the support "
                f"({self.support!r}) of the distribution {self!r}, but found invalid values: value contains NaN or "
                f"infinite entries:\n{value}"
            )
        return value if value.dtype is loc.dtype else value.to(loc.dtype)

    def _residual(self, value: Tensor) -> Residual:
        # Sigma^{-1} for alpha only where the factor was itself computed (see _autograd.log_prob).
        sigma_inverse = self._sigma_inverse_fn if self._parametrization == "covariance_matrix" else None
        return Residual(self._check_value(value) - self.loc, self._factor, sigma_inverse)

    def _sigma_inverse_fn(self) -> Tensor:
        return self._unbroadcasted_sigma_inverse

    def _constant_term(self, name: str) -> Tensor:
        """The sample-independent term of the derivative w.r.t. the matrix ``name``, in the factor's batch shape."""
        if name == "covariance_matrix":
            return self._unbroadcasted_sigma_inverse
        if name == "precision_matrix":
            return self._unbroadcasted_sigma
        return self._factor.inv_scale_diag()

    def _result_shape(self, res: Residual, name: str, layout: str) -> torch.Size:
        d = self._event_shape[0]
        if name in ("value", "loc"):
            return res.shape + (d,)
        return res.shape + ((d * (d + 1) // 2,) if layout == "vech" else (d, d))

    def _check_out(self, out: Any, wrt: Any, names: tuple[str, ...], res: Residual, layout: str) -> dict[str, Tensor]:
        if out is None:
            return {}
        if isinstance(wrt, str):
            outs = {wrt: out}
        elif isinstance(out, dict):
            unknown = [key for key in out if key not in names]
            if unknown:
                raise ValueError(f"out has keys {unknown} that are not in wrt {list(names)}")
            outs = dict(out)
        else:
            raise ValueError(f"out for several wrt must be a dict keyed by their names; got {type(out).__name__}")
        for name, t in outs.items():
            shape = self._result_shape(res, name, layout)
            check_allocation(shape, res.r, f"the Jacobian w.r.t. {name}")
            check_out(t, shape, res.r, f"the Jacobian w.r.t. {name}")
        return outs

    def _per_sample(self, res: Residual, name: str, layout: str, out: Tensor | None) -> Tensor:
        if name in ("value", "loc"):
            alpha = res.full(res.alpha)
            if out is not None:
                return torch.neg(alpha, out=out) if name == "value" else out.copy_(alpha)
            return (-alpha).contiguous() if name == "value" else alpha.contiguous()
        return per_sample_matrix(res, name, layout, self._constant_term(name), out)

    def _summed_value(self, res: Residual, value: Tensor) -> Tensor:
        # In the value's own dtype, as torch.autograd.grad returns it (the distribution computes in its own).
        grad = -res.full_alpha()
        if grad.shape != value.shape:
            grad = grad.sum_to_size(value.shape)
        return grad if value.dtype is grad.dtype or not value.dtype.is_floating_point else grad.to(value.dtype)

    def _summed_matrix(self, res: Residual, name: str, layout: str) -> Tensor:
        # The gradient w.r.t. the tensor the user passed: the parametrization's own batch shape, else batch_shape.
        batch_shape = self._unbroadcasted_matrix.shape[:-2] if name == self._parametrization else self._batch_shape
        return summed_matrix(res, name, layout, self._constant_term(name), batch_shape)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(loc: {format_shape(self.loc.shape)}, "
            f"{self._parametrization}: {format_shape(self.loc.shape + self._event_shape)})"
        )


_CACHED = ("_unbroadcasted_scale_tril", "_unbroadcasted_sigma", "_unbroadcasted_sigma_inverse", "_symmetric_matrix")


def _eye_like(matrix: Tensor) -> Tensor:
    return torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device).expand_as(matrix)


def _validate_parameter(name: str, value: Tensor, constraint: constraints.Constraint) -> None:
    if not _satisfies(constraint, value):
        raise ValueError(
            f"Expected parameter {name} (Tensor of shape {format_shape(value.shape)}) of distribution "
            f"JacobianMVN to satisfy the constraint {constraint!r}, but found invalid values:\n{value}"
        )


def _satisfies(constraint: constraints.Constraint, value: Tensor) -> bool:
    """``constraint.check(value).all()``, with the same verdict (NaN fails) in 2-3x fewer operations for the
    constraints checked at every construction."""
    if constraint is constraints.lower_cholesky:
        return all_true(value.diagonal(dim1=-2, dim2=-1).gt(0)) and all_equal(value.tril(), value)
    if constraint is constraints.real_vector:
        return all_true(value == value)
    return all_true(constraint.check(value))
