r"""The dense Gaussian: a full covariance held through one triangular factor.

:class:`DenseGaussian` is the structure of :class:`~torch_mvn_ext.JacobianMVN`: ``loc`` and the matrix argument the
user passed (``covariance_matrix``, ``precision_matrix`` or ``scale_tril``, its :attr:`~DenseGaussian.parametrization`),
the triangular factor computed from it once (:mod:`~torch_mvn_ext._factor`, or for many small matrices
:mod:`~torch_mvn_ext._small`), and every matrix derived from the factor on first use. Its coordinates are the three
matrices, whatever the parametrization; the derivative w.r.t. each is a :class:`~torch_mvn_ext._gaussian.Term`:

* ``"covariance_matrix"``: :math:`\frac12(\alpha\alpha^\top - \Sigma^{-1})`;
* ``"precision_matrix"``: :math:`-\frac12(r r^\top - \Sigma)`;
* ``"scale_tril"``: :math:`\operatorname{tril}(\alpha z^\top) - \operatorname{diag}(1/L_{ii})`

(torch autograd through :class:`torch.distributions.MultivariateNormal` gives the same).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from . import _autograd, _conditioning
from ._autograd import TriangularRows
from ._checks import PARAMETRIZATIONS
from ._factor import CholeskyFactor, PrecisionFactor, ScaleTril, TriangularFactor, tril_inverse
from ._gaussian import LOWER, SYMMETRIC, GaussianState, Rows, Term, cached
from ._information import symmetric_fisher_vech, symmetric_natural_gradient, tril_fisher_vech, tril_natural_gradient
from ._shapes import Grouping
from ._small import adopt


class DenseGaussian(GaussianState):
    r"""``loc``, the matrix argument ``matrix`` named ``parametrization`` and its triangular ``factor``.

    Every derived matrix comes from the factor, as torch's MVN derives its own from its ``scale_tril``: an in-place
    change to the caller's matrix afterwards changes no answer, and an unvalidated matrix that is not symmetric means,
    throughout, the matrix its factorization read.
    """

    coordinates: tuple[str, ...] = PARAMETRIZATIONS

    def __init__(self, loc: Tensor, parametrization: str, matrix: Tensor, factor: TriangularFactor) -> None:
        self.loc = loc
        self.parametrization = parametrization
        self.matrix = matrix
        self.factor = factor

    @classmethod
    def of_distribution(cls, mvn: object) -> DenseGaussian:
        """The state of a torch or Pyro ``MultivariateNormal``, its factor reused: the matrix argument its constructor
        stored (the first of them it holds in its ``__dict__``; later ones are derived on demand) and its Cholesky
        factor (for a precision, the inverse of it, one triangular solve)."""
        if not isinstance(mvn, torch.distributions.MultivariateNormal):
            raise ValueError(
                "from_distribution needs a torch.distributions.MultivariateNormal (or Pyro's); got "
                f"{type(mvn).__name__}"
            )
        state = getattr(mvn, "_state", None)
        if isinstance(state, DenseGaussian):  # a JacobianMVN
            return state
        name = next(key for key in mvn.__dict__ if key in PARAMETRIZATIONS)
        scale_tril = mvn._unbroadcasted_scale_tril
        factor: TriangularFactor
        if name == "scale_tril":
            factor = ScaleTril(scale_tril)
        elif name == "covariance_matrix":
            factor = CholeskyFactor(scale_tril)
        else:
            factor = PrecisionFactor(tril_inverse(scale_tril))
        # torch keeps the user's scale_tril itself; of loc and the other matrices it keeps views expanded to its batch.
        matrix = scale_tril if name == "scale_tril" else mvn.__dict__[name]
        new = cls(mvn.loc, name, matrix, adopt(factor))
        if name == "precision_matrix":
            # The cache, filled with what the source computed.
            new.scale_tril = scale_tril
        return new

    @property
    def batch_shape(self) -> torch.Size:
        return self.factor.batch_shape

    def inputs(self) -> dict[str, Tensor]:
        # The factor requires grad only where the matrix it was computed from does.
        return {"loc": self.loc, self.parametrization: self.matrix}

    @cached
    def scale_tril(self) -> Tensor:
        return self.factor.scale_tril()

    @cached
    def covariance_matrix(self) -> Tensor:
        return self.factor.covariance_matrix()

    @cached
    def precision_matrix(self) -> Tensor:
        return self.factor.precision_matrix()

    def variance(self) -> Tensor:
        return self.factor.variance()

    def entropy(self) -> Tensor:
        return self.factor.entropy()

    def color(self, eps: Tensor) -> Tensor:
        r""":math:`L \epsilon` for white noise ``eps`` of shape ``S + (d,)``, in whatever layout the factor leaves it
        (a float32 triangular solve from the right leaves it column-major, an elementwise factor column by column):
        the caller's next operation writes it row-major."""
        rows = TriangularRows(eps, self.factor)
        return rows.full(rows.factor.color(rows.r))

    def _sigma_inverse(self) -> Tensor:
        return self.precision_matrix

    def rows(self, r: Tensor) -> TriangularRows:
        # Sigma^{-1} for alpha only where the factor was itself computed (see _autograd.log_prob).
        from_covariance = self.parametrization == "covariance_matrix"
        return TriangularRows(r, self.factor, self._sigma_inverse if from_covariance else None)

    def log_prob(self, r: Tensor) -> Tensor:
        covariance = self.matrix if self.parametrization == "covariance_matrix" else None
        return _autograd.log_prob(r, self.factor, covariance)

    def term(self, rows: Rows, name: str) -> Term:
        rows = cast(TriangularRows, rows)  # the rows of this structure
        outer_sum = rows.factor.outer_sum
        if name == "covariance_matrix":
            return Term(rows.alpha, rows.alpha, self.precision_matrix, 0.5, SYMMETRIC, outer_sum)
        if name == "precision_matrix":
            return Term(rows.r, rows.r, self.covariance_matrix, -0.5, SYMMETRIC, outer_sum)
        return Term(rows.alpha, rows.z, self.factor.inv_scale_diag(), 1.0, LOWER, outer_sum)

    def term_shape(self, name: str) -> tuple[int, ...]:
        return (self.size, self.size)

    def summed_shape(self, name: str, batch_shape: torch.Size) -> torch.Size:
        return self.matrix.shape[:-2] if name == self.parametrization else batch_shape

    # KL divergences (kl.py): Sigma = R^T R with R = L^T.

    def half_log_det(self) -> Tensor:
        return self.factor.half_log_det()

    def quad(self, x: Tensor) -> Tensor:
        r""":math:`\sum_i \|L^{-1} x_i\|^2`: a triangular solve with ``L`` or a matmul with ``T``, grouped so that each
        factor member meets all of its rows in one batched BLAS-3 call."""
        factor = self.factor
        g = Grouping(x.shape[:-1], factor.batch_shape + (1,))
        z = factor.like(g.flat_matrix(factor.tensor.unsqueeze(-3))).whiten(g.group(x))
        return g.ungroup(z.pow(2).sum(-1, keepdim=True)).sum((-2, -1))

    def kl_rows(self) -> Tensor:
        return self.scale_tril.mT

    def precision_diagonal(self) -> Tensor:
        return self.factor.precision_diagonal()

    # Information geometry and Gaussian algebra (_information, _conditioning).

    def fisher(self, name: str) -> Tensor:
        if name == "covariance_matrix":
            return symmetric_fisher_vech(self.precision_matrix)
        if name == "precision_matrix":
            return symmetric_fisher_vech(self.covariance_matrix)
        return tril_fisher_vech(self.precision_matrix, self.factor.inv_scale_diag())

    def natural_gradient(self, name: str, grad: Tensor, shape: torch.Size) -> Tensor:
        event = torch.Size([self.size])
        if name == "loc":
            rows = TriangularRows(grad.expand(shape + event), self.factor)
            return rows.full(rows.factor.sigma_matvec(rows.r)).contiguous()  # row-major on either solve route
        if name == "scale_tril":
            nat = tril_natural_gradient(self.scale_tril, grad)
        else:
            m = self.covariance_matrix if name == "covariance_matrix" else self.precision_matrix
            nat = symmetric_natural_gradient(m, grad)
        return nat.expand(shape + event + event)

    def marginal(self, a: list[int]) -> tuple[Tensor, str, Tensor]:
        return _conditioning.marginal(self, a)

    def condition(self, b: list[int], value: Tensor, shape: torch.Size) -> tuple[Tensor, str, Tensor]:
        return _conditioning.condition(self, b, value, shape)
