r"""The information geometry of a Gaussian as methods: Hessians, Fisher information and natural gradients.

:class:`InformationGeometry` gives :class:`~torch_mvn_ext.JacobianMVN` these methods, written over its structure
(``self._state``, which answers its Fisher blocks and natural gradients by coordinate, see
:mod:`~torch_mvn_ext._information`).
"""

from __future__ import annotations

from typing import NoReturn

import torch
from torch import Tensor

from . import _information
from ._checks import LAYOUTS, check_choice, check_value, quiet_under_jit_trace
from ._dense import DenseGaussian
from ._shapes import broadcast_shapes


class InformationGeometry:
    """The methods of a distribution with a dense structure ``_state``, a batch shape and an event shape."""

    _state: DenseGaussian
    _batch_shape: torch.Size
    _event_shape: torch.Size

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
        value = check_value(self, value)  # type: ignore[arg-type]
        shape = broadcast_shapes(value.shape[:-1], self._batch_shape) + self._event_shape + self._event_shape
        return (-self._state.precision_matrix).expand(shape)

    @quiet_under_jit_trace
    def fisher_information(self, wrt: str = "loc", *, layout: str = "vech") -> Tensor:
        r"""The Fisher information matrix of each batch member, in closed form, in the coordinates of ``wrt``.

        It is the covariance of the per-sample score ``jacobian(x, wrt, layout="vech")`` under ``x ~ self`` and
        minus the expected Hessian of ``log_prob`` in those coordinates. For the matrices the coordinates are the
        entries :math:`(i, j)`, :math:`i \ge j`, in ``torch.tril_indices`` order, and Isserlis' theorem (the fourth
        moments of a Gaussian) gives, per batch member:

        * ``"loc"``: :math:`P`;
        * ``"covariance_matrix"`` and ``"precision_matrix"``: with :math:`M = P`, respectively :math:`M = \Sigma`,
          and :math:`w_{ij} = 1` on the diagonal, 2 off it (the vech coordinate :math:`(i, j)` stands for both
          :math:`(i, j)` and :math:`(j, i)`),
          :math:`F_{(ij),(kl)} = \frac{w_{ij} w_{kl}}{4} (M_{ik} M_{jl} + M_{il} M_{jk})`, which is
          :math:`\frac12 D^\top (M \otimes M) D` with the duplication matrix :math:`D`;
        * ``"scale_tril"``: :math:`F_{(ij),(kl)} = P_{ik}\,\delta_{jl} + \delta_{ik}\delta_{jl}\delta_{ij} / L_{ii}^2`:
          one block :math:`P_{j:,\,j:}` per column :math:`j` of :math:`L`, plus :math:`1 / L_{jj}^2` on the entries
          of its diagonal.

        The entries are gathered one by one (never through a :math:`d^2 \times d^2` Kronecker product) into the
        output in chunks, after a check that it fits in the device's memory (``ValueError`` otherwise).

        Args:
            wrt (str): ``"loc"``, ``"covariance_matrix"``, ``"precision_matrix"`` or ``"scale_tril"``.
            layout (str): ``"vech"``, the only layout for the matrices (in the full layout the
                :math:`d^2 \times d^2` Fisher matrix is singular); ignored for ``"loc"``.

        Returns:
            Tensor: shape ``batch_shape + (d, d)`` for ``"loc"`` and ``batch_shape + (k, k)``,
            ``k = d*(d+1)//2``, for a matrix (an expanded view of one matrix per member of the parameters' batch,
            never one the distribution holds: editing it in place changes nothing else).
        """
        check_choice("wrt", wrt, ("loc",) + self._state.coordinates)
        check_choice("layout", layout, LAYOUTS)
        info = _information.fisher_information(self._state, wrt, layout)
        return info.expand(self._batch_shape + info.shape[-2:])

    @quiet_under_jit_trace
    def natural_gradient(self, grads: dict[str, Tensor], *args: NoReturn, **kwargs: NoReturn) -> dict[str, Tensor]:
        r"""natural_gradient(grads)

        Natural gradients :math:`F^{-1} g` from Euclidean ones, in :math:`O(d^3)` per member, never forming
        :math:`F`: :math:`\Sigma g` for ``"loc"`` (two triangular solves with a precision factor),
        :math:`2 \Sigma G \Sigma` for ``"covariance_matrix"``, :math:`2 P G P` for ``"precision_matrix"`` and
        :math:`L\,\Phi(L^\top G)`, :math:`\Phi(X) = \operatorname{tril}(X, -1) + \frac12 \operatorname{diag}(X)`, for
        ``"scale_tril"``.

        ``G`` is the gradient in full ``(d, d)`` form, as :meth:`jacobian` or autograd returns it; only its symmetric
        part (for ``"scale_tril"`` its lower triangle) is a gradient in the free coordinates, so that is what counts.
        The vech of each result solves ``fisher_information(name) @ vech_result = vech_gradient`` (``jacobian``'s
        ``layout="vech"`` convention). The Fisher information is block-diagonal in ``(loc, matrix)``, so each key is
        transformed on its own.

        Args:
            grads (dict): ``"loc"`` → tensor broadcastable with ``batch_shape + (d,)``, and/or one of
                ``"covariance_matrix"``, ``"precision_matrix"``, ``"scale_tril"`` → tensor broadcastable with
                ``batch_shape + (d, d)``.

        Returns:
            dict: the same keys; shape ``broadcast_shapes(g.shape[:-1], batch_shape) + (d,)`` for ``"loc"`` and
            ``broadcast_shapes(G.shape[:-2], batch_shape) + (d, d)`` for the matrix.

        Raises:
            ValueError: for anything but that one dict (such as ``natural_gradient(g, "loc")``, the way
                :meth:`fisher_information` takes its ``wrt``: here the keys say which coordinates), for unknown
                keys, gradients w.r.t. two matrices, and shapes that do not fit.
        """
        given: tuple[object, ...] = args  # arguments it does not take, for the error message
        extra: dict[str, object] = {str(i): arg for i, arg in enumerate(given, 1)}
        extra.update(kwargs)
        return _information.natural_gradient(self._state, grads, extra, self._batch_shape)
