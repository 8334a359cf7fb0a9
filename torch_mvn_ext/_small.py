r"""Many small Gaussians: the factors of a large batch of small matrices, computed elementwise over the batch.

Batched LAPACK calls (``cholesky``, ``solve_triangular``) and batched GEMMs on ``2 x 2`` to ``8 x 8`` matrices spend
their time in a loop over the members, not in arithmetic: torch's ``MultivariateNormal`` takes 18 ms for the
log-density of 100,000 bivariate members with their own covariances. Here the same algorithms are written out entry
by entry, each step one elementwise operation over the whole batch: the Cholesky factorization column by column
(the same operations in the same order as LAPACK's unblocked ``potf2``, so the same rounding), forward and back
substitution row by row, products with the factor, and sums of outer products. The factors computed here are
assembled in "structure of arrays" order (entry ``(i, j)`` of every member contiguous), behind a view of the usual
shape ``B + (d, d)``, so that each step reads one contiguous vector; rows are returned column by column for the same
reason (interleaving ``d`` columns into row-major order is the slowest copy there is).

:func:`factor_of` chooses: the elementwise factors for ``d <= MAX_D`` and at least ``MIN_MEMBERS`` members, the
general ones (:mod:`torch_mvn_ext._factor`) otherwise; the thresholds are measured by the benchmark's ``many_small``
case. Both give the same numbers, the same errors and the same gradients; only the four primitives of
:class:`~torch_mvn_ext._factor.TriangularFactor` (products, solves, sums of outer products) and the inverse differ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import _transforms_active, differentiated
from ._factor import KINDS, CholeskyFactor, PrecisionFactor, ScaleTril, TriangularFactor, cholesky

# The elementwise factors serve event sizes up to MAX_D and batches of at least MIN_MEMBERS matrices.
MAX_D = 6
MIN_MEMBERS = 256
# With more rows than this per member (points sharing one matrix), products, solves and sums of outer products take
# the general route: one BLAS call per member then does enough arithmetic to pay for itself.
_MAX_ROWS = 16


def use_elementwise(matrix: Tensor) -> bool:
    """Whether a ``B + (d, d)`` matrix takes the elementwise factors. Not under ``torch.compile`` or ``torch.func``
    transforms, where the general factors' single calls trace and batch as they are (and the check of the pivots
    would read data)."""
    d = matrix.shape[-1]
    if not 1 <= d <= MAX_D or matrix.dim() < 3:
        return False
    members = matrix.numel() // (d * d)
    return members >= MIN_MEMBERS and not torch.compiler.is_compiling() and not _transforms_active()


def structure_of_arrays(matrix: Tensor) -> Tensor:
    """``matrix`` (shape ``B + (d, d)``) as a view of the same shape whose entry ``(i, j)`` is contiguous over ``B``."""
    return matrix.movedim((-2, -1), (0, 1)).contiguous().movedim((0, 1), (-2, -1))


def elementwise_cholesky(matrix: Tensor, name: str) -> Tensor:
    r"""The lower Cholesky factor of each member (reading the lower triangle, as ``torch.linalg.cholesky``), column by
    column: :math:`L_{jj} = \sqrt{A_{jj} - \sum_{k<j} L_{jk}^2}`, :math:`L_{ij} = (A_{ij} - \sum_{k<j} L_{ik} L_{jk})
    / L_{jj}`. Where a pivot is not positive, ``torch.linalg.cholesky`` factorizes again, so that the error (naming
    the argument, the member and the order of the minor) or the result (for NaN entries) is torch's."""
    d = matrix.shape[-1]
    if differentiated(matrix):
        # The lower triangle's values with torch's symmetric gradient (a gradient that reads one triangle would put
        # all of it there): the symmetric part, shifted by a constant to the mirrored lower triangle (zero for a
        # symmetric matrix).
        symmetric = 0.5 * (matrix + matrix.mT)
        matrix = symmetric + (matrix.tril() + matrix.tril(-1).mT - symmetric).detach()
    entries: dict[tuple[int, int], Tensor] = {}
    pivots = []
    for j in range(d):
        pivot = matrix[..., j, j]
        for k in range(j):
            pivot = torch.addcmul(pivot, entries[j, k], entries[j, k], value=-1)
        pivots.append(pivot)
        diagonal = entries[j, j] = pivot.sqrt()
        for i in range(j + 1, d):
            below = matrix[..., i, j]
            for k in range(j):
                below = torch.addcmul(below, entries[i, k], entries[j, k], value=-1)
            entries[i, j] = below / diagonal
    # One reduction and one read. A NaN pivot fails the test too, and torch's factorization then decides.
    if not pivots[0].numel() or not bool(torch.stack(pivots).amin() > 0):
        return cholesky(matrix, name)
    zero = matrix.new_zeros(()).expand(matrix.shape[:-2])
    full = torch.stack([entries.get((i, j), zero) for i in range(d) for j in range(d)])  # (d * d) + B
    return full.unflatten(0, (d, d)).movedim((0, 1), (-2, -1))


def _columns(columns: list[Tensor]) -> Tensor:
    """The columns ``(..., c)`` as rows ``(..., c, d)`` laid out column by column: a plain concatenation, where
    interleaving them into row-major order is a strided copy several times slower (callers that hand results to users
    make them contiguous, as after a right solve)."""
    return torch.stack(columns, 0).movedim(0, -1)


def _entry(m: Tensor, i: int, k: int) -> Tensor:
    """Entry ``(i, k)`` of every member, shaped to broadcast against the rows' ``(..., c)``."""
    return m[..., i, k].unsqueeze(-1)


class _Elementwise(TriangularFactor):
    """The primitives of :class:`~torch_mvn_ext._factor.TriangularFactor`, entry by entry over the batch, for a
    lower-triangular ``tensor`` of shape ``B + (d, d)`` and rows ``x`` of shape ``(..., c, d)``."""

    def mul_t(self, x: Tensor) -> Tensor:
        if x.shape[-2] > _MAX_ROWS:
            return super().mul_t(x)
        m, d = self.tensor, x.shape[-1]
        rows = []
        for i in range(d):  # (M x)_i = sum_{k <= i} M_ik x_k
            acc = _entry(m, i, 0) * x[..., 0]
            for k in range(1, i + 1):
                acc = torch.addcmul(acc, _entry(m, i, k), x[..., k])
            rows.append(acc)
        return _columns(rows)

    def mul(self, x: Tensor) -> Tensor:
        if x.shape[-2] > _MAX_ROWS:
            return super().mul(x)
        m, d = self.tensor, x.shape[-1]
        rows = []
        for i in range(d):  # (M^T x)_i = sum_{k >= i} M_ki x_k
            acc = _entry(m, i, i) * x[..., i]
            for k in range(i + 1, d):
                acc = torch.addcmul(acc, _entry(m, k, i), x[..., k])
            rows.append(acc)
        return _columns(rows)

    def solve(self, x: Tensor, transpose: bool) -> Tensor:
        if x.shape[-2] > _MAX_ROWS:
            return super().solve(x, transpose)
        m, d = self.tensor, x.shape[-1]
        y: list[Tensor] = [x[..., 0]] * d
        # forward substitution, M y = x; with transpose, back substitution, M^T y = x
        order = range(d - 1, -1, -1) if transpose else range(d)
        for i in order:
            acc = x[..., i]
            for k in range(i + 1, d) if transpose else range(i):
                acc = torch.addcmul(acc, _entry(m, k, i) if transpose else _entry(m, i, k), y[k], value=-1)
            y[i] = acc / _entry(m, i, i)
        return _columns(y)

    def outer_sum(
        self, u: Tensor, v: Tensor, base: Tensor | None = None, beta: float = 1.0, alpha: float = 1.0
    ) -> Tensor:
        c, d = u.shape[-2], u.shape[-1]
        if c > _MAX_ROWS or c == 0:
            return super().outer_sum(u, v, base, beta, alpha)
        entries = []
        for i in range(d):
            for j in range(d):
                acc = u[..., 0, i] * v[..., 0, j]
                for s in range(1, c):
                    acc = torch.addcmul(acc, u[..., s, i], v[..., s, j])
                entries.append(acc)
        out = torch.stack(entries, -1).unflatten(-1, (d, d))  # row-major: these go to users
        if alpha != 1.0:
            out = out * alpha
        return out if base is None else torch.add(out, base, alpha=beta)

    def inverse(self) -> Tensor:
        # The rows L^{-1} e_i are the columns of L^{-1}.
        eye = torch.eye(self.tensor.shape[-1], dtype=self.tensor.dtype, device=self.tensor.device)
        return self.solve(eye.expand(self.tensor.shape), transpose=False).mT


class ElementwiseCholesky(_Elementwise, CholeskyFactor):
    kind = "elementwise_cholesky"

    def scale_tril(self) -> Tensor:
        return self.tensor.contiguous()  # held structure-of-arrays; row-major for users, as torch's

    def precision_matrix(self) -> Tensor:
        inverse = self.inverse()
        return self.outer_sum(inverse, inverse)


class ElementwiseScaleTril(_Elementwise, ScaleTril):
    kind = "elementwise_scale_tril"

    def precision_matrix(self) -> Tensor:
        inverse = self.inverse()
        return self.outer_sum(inverse, inverse)


class ElementwisePrecision(_Elementwise, PrecisionFactor):
    kind = "elementwise_precision"

    def scale_tril(self) -> Tensor:
        return self.inverse().contiguous()


KINDS.update(
    {
        ElementwiseCholesky.kind: ElementwiseCholesky,
        ElementwiseScaleTril.kind: ElementwiseScaleTril,
        ElementwisePrecision.kind: ElementwisePrecision,
    }
)


def factor_of(name: str, matrix: Tensor) -> TriangularFactor:
    """The factor of the matrix argument ``name`` (``matrix`` itself for ``scale_tril``): elementwise for a large
    batch of small matrices (:func:`use_elementwise`), the general kind otherwise."""
    if not use_elementwise(matrix):
        if name == "covariance_matrix":
            return CholeskyFactor(cholesky(matrix, name))
        if name == "scale_tril":
            return ScaleTril(matrix)
        return PrecisionFactor.of(matrix)
    if name == "covariance_matrix":
        return ElementwiseCholesky(elementwise_cholesky(matrix, name))
    if name == "scale_tril":
        return ElementwiseScaleTril(matrix)
    # P = T^T T with T lower: the Cholesky factor of P with rows and columns reversed (PrecisionFactor.of).
    flipped = elementwise_cholesky(matrix.flip((-2, -1)), name)
    return ElementwisePrecision(structure_of_arrays(flipped.flip((-2, -1)).mT))


_ELEMENTWISE: dict[str, type[TriangularFactor]] = {
    CholeskyFactor.kind: ElementwiseCholesky,
    ScaleTril.kind: ElementwiseScaleTril,
    PrecisionFactor.kind: ElementwisePrecision,
}


def adopt(factor: TriangularFactor) -> TriangularFactor:
    """``factor`` as the elementwise kind of itself where :func:`use_elementwise` holds (a factor taken over from
    another distribution, ``from_distribution``), the same tensor."""
    kind = _ELEMENTWISE.get(factor.kind)
    return kind(factor.tensor) if kind is not None and use_elementwise(factor.tensor) else factor
