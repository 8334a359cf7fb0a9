r"""Many small Gaussians: the factors of a large batch of small matrices, computed elementwise over the batch.

Batched LAPACK calls (``cholesky``, ``solve_triangular``) and batched GEMMs on ``2 x 2`` to ``8 x 8`` matrices spend
their time in a loop over the members, not in arithmetic: torch's ``MultivariateNormal`` takes 18 ms for the
log-density of 100,000 bivariate members with their own covariances. Here the same algorithms are written out entry
by entry, each step one elementwise operation over the whole batch: the Cholesky factorization column by column
(the arithmetic of LAPACK's unblocked ``potf2``, with a division where it multiplies by a reciprocal;
``benchmarks/accuracy.py`` compares the errors with torch's), forward and back substitution row by row, products with
the factor, and sums of outer products. A factor computed here is held as its entries, each contiguous over the
batch, and assembled into a ``B + (d, d)`` tensor ("structure of arrays": entry ``(i, j)`` of every member
contiguous) only if something asks for it; rows are returned column by column for the same reason (interleaving ``d``
columns into row-major order is the slowest copy there is).

:func:`factor_of` chooses: the elementwise factors for ``d <= MAX_D`` and at least ``MIN_MEMBERS_PER_D * d``
members, the general ones (:mod:`torch_mvn_ext._factor`) otherwise; the thresholds are measured (see below). Both give
the same numbers, the same errors and the same gradients; only the primitives of
:class:`~torch_mvn_ext._factor.TriangularFactor` (products, solves, sums of outer products) and the inverse differ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import _transforms_active, differentiated
from ._factor import KINDS, CholeskyFactor, PrecisionFactor, ScaleTril, TriangularFactor, cholesky
from ._shapes import Grouping

# The elementwise factors serve event sizes up to MAX_D and batches of at least MIN_MEMBERS_PER_D * d members: where
# they became faster than the general factors (log_prob, rsample and the covariance Jacobian, float32 and float64, one
# thread, benchmarks/many_small.py on a 2-core AMD EPYC): about 400 members at d = 2, 1000 at d = 4, 2000-3000 at
# d = 6 and 8. At 1e5 members they are 5-14x faster at d = 2, 1.2-1.5x at d = 8.
MAX_D = 8
MIN_MEMBERS_PER_D = 512
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
    return members >= MIN_MEMBERS_PER_D * d and not torch.compiler.is_compiling() and not _transforms_active()


def elementwise_cholesky(matrix: Tensor, name: str) -> dict[tuple[int, int], Tensor] | Tensor:
    r"""The lower Cholesky factor of each member (reading the lower triangle, as ``torch.linalg.cholesky``), column by
    column: :math:`L_{jj} = \sqrt{A_{jj} - \sum_{k<j} L_{jk}^2}`, :math:`L_{ij} = (A_{ij} - \sum_{k<j} L_{ik} L_{jk})
    / L_{jj}`, as its lower entries ``(i, j)``, each of the batch's shape. Where a pivot is not positive,
    ``torch.linalg.cholesky`` factorizes again, so that the error (naming the argument, the member and the order of
    the minor) or the result (a tensor, for NaN entries) is torch's."""
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
    return entries


def _columns(columns: list[Tensor]) -> Tensor:
    """The columns ``(..., c)`` as rows ``(..., c, d)`` laid out column by column: a plain concatenation, where
    interleaving them into row-major order is a strided copy several times slower (callers that hand results to users
    make them contiguous, as after a right solve)."""
    return torch.stack(columns, 0).movedim(0, -1)


def _matrix(entries: dict[tuple[int, int], Tensor], d: int, symmetric: bool = False, row_major: bool = False) -> Tensor:
    """The ``B + (d, d)`` matrix of ``entries`` (``(i, j)`` -> a tensor of shape ``B``): an entry not given is its
    mirror where ``symmetric``, else zero. One concatenation, structure-of-arrays (entry ``(i, j)`` contiguous over the
    batch), or ``row_major`` for results that go to users."""
    zero = entries[0, 0].new_zeros(()).expand_as(entries[0, 0])
    full = [entries.get((i, j), entries[j, i] if symmetric and j > i else zero) for i in range(d) for j in range(d)]
    if row_major:
        return torch.stack(full, -1).unflatten(-1, (d, d))
    return torch.stack(full).unflatten(0, (d, d)).movedim((0, 1), (-2, -1))


def _lower(m: Tensor) -> dict[tuple[int, int], Tensor]:
    """The lower-triangular entries of ``m``, each of shape ``B + (1,)`` (to broadcast against rows' ``(..., c)``)."""
    d = m.shape[-1]
    return {(i, k): m[..., i, k].unsqueeze(-1) for i in range(d) for k in range(i + 1)}


def _tril_inverse(m: dict[tuple[int, int], Tensor], d: int) -> dict[tuple[int, int], Tensor]:
    r"""The entries of :math:`M^{-1}` (lower-triangular): :math:`T_{ii} = 1 / M_{ii}`,
    :math:`T_{ij} = -\big(\sum_{j \le k < i} M_{ik} T_{kj}\big) / M_{ii}`."""
    t: dict[tuple[int, int], Tensor] = {}
    for i in range(d):
        t[i, i] = m[i, i].reciprocal()
        for j in range(i):
            acc = m[i, j] * t[j, j]
            for k in range(j + 1, i):
                acc = torch.addcmul(acc, m[i, k], t[k, j])
            t[i, j] = -acc * t[i, i]
    return t


def _gram(t: dict[tuple[int, int], Tensor], d: int) -> dict[tuple[int, int], Tensor]:
    r"""The lower entries of :math:`T^\top T` for lower-triangular :math:`T`: :math:`\sum_{k \ge i} T_{ki} T_{kj}`,
    ``j <= i`` (the rest by symmetry)."""
    out = {}
    for i in range(d):
        for j in range(i + 1):
            acc = t[i, i] * t[i, j]
            for k in range(i + 1, d):
                acc = torch.addcmul(acc, t[k, i], t[k, j])
            out[i, j] = acc
    return out


class _Elementwise(TriangularFactor):
    """The primitives of :class:`~torch_mvn_ext._factor.TriangularFactor`, entry by entry over the batch, for a
    lower-triangular ``tensor`` of shape ``B + (d, d)`` and rows ``x`` of shape ``(..., c, d)``. Matrix results are
    structure-of-arrays views (see :func:`_matrix`)."""

    def __init__(self, tensor: Tensor | dict[tuple[int, int], Tensor]) -> None:
        # A tensor, or the lower entries of one (each of the batch's shape): then the tensor is assembled only if
        # something asks for it (log_prob and the derivatives without autograd never do).
        if isinstance(tensor, Tensor):
            self._tensor: Tensor | None = tensor
            self._raw: dict[tuple[int, int], Tensor] | None = None
            self._shape = tensor.shape
        else:
            self._tensor, self._raw = None, tensor
            d = int(math.isqrt(2 * len(tensor)))
            self._shape = tensor[0, 0].shape + (d, d)
        self._entries: dict[tuple[int, int], Tensor] | None = None

    @property
    def tensor(self) -> Tensor:
        if self._tensor is not None:
            return self._tensor
        assert self._raw is not None
        tensor = _matrix(self._raw, self.size)
        # Kept only with its graph: assembled under torch.no_grad() (a marginal, a KL) it would cut every later
        # gradient off from the entries, which still carry it.
        if torch.is_grad_enabled() or not self._raw[0, 0].requires_grad:
            self._tensor = tensor
        return tensor

    @tensor.setter
    def tensor(self, value: Tensor) -> None:
        self._tensor, self._raw, self._shape, self._entries = value, None, value.shape, None

    @property
    def batch_shape(self) -> torch.Size:
        return self._shape[:-2]

    @property
    def size(self) -> int:
        return self._shape[-1]

    @property
    def requires_grad(self) -> bool:
        return self._raw[0, 0].requires_grad if self._raw is not None else self.tensor.requires_grad

    @property
    def entries(self) -> dict[tuple[int, int], Tensor]:
        """The lower entries, each shaped ``B + (1,)`` to broadcast against the rows' ``(..., c)``."""
        if self._entries is None:
            if self._raw is not None:
                self._entries = {k: v.unsqueeze(-1) for k, v in self._raw.items()}
            else:
                self._entries = _lower(self.tensor)
        return self._entries

    def diagonal(self) -> Tensor:
        if self._raw is None:
            return super().diagonal()
        return torch.stack([self._raw[i, i] for i in range(self._shape[-1])]).movedim(0, -1)

    def flat(self, grouping: Grouping) -> TriangularFactor:
        if self._raw is None:
            return super().flat(grouping)
        g = grouping
        return type(self)({k: v.expand(g.batch_shape).reshape(g.b) for k, v in self._raw.items()})

    def mul_t(self, x: Tensor) -> Tensor:
        if x.shape[-2] > _MAX_ROWS:
            return super().mul_t(x)
        m, d = self.entries, x.shape[-1]
        rows = []
        for i in range(d):  # (M x)_i = sum_{k <= i} M_ik x_k
            acc = m[i, 0] * x[..., 0]
            for k in range(1, i + 1):
                acc = torch.addcmul(acc, m[i, k], x[..., k])
            rows.append(acc)
        return _columns(rows)

    def mul(self, x: Tensor) -> Tensor:
        if x.shape[-2] > _MAX_ROWS:
            return super().mul(x)
        m, d = self.entries, x.shape[-1]
        rows = []
        for i in range(d):  # (M^T x)_i = sum_{k >= i} M_ki x_k
            acc = m[i, i] * x[..., i]
            for k in range(i + 1, d):
                acc = torch.addcmul(acc, m[k, i], x[..., k])
            rows.append(acc)
        return _columns(rows)

    def solve(self, x: Tensor, transpose: bool) -> Tensor:
        if x.shape[-2] > _MAX_ROWS:
            return super().solve(x, transpose)
        m, d = self.entries, x.shape[-1]
        y: list[Tensor] = [x[..., 0]] * d
        # forward substitution, M y = x; with transpose, back substitution, M^T y = x
        order = range(d - 1, -1, -1) if transpose else range(d)
        for i in order:
            acc = x[..., i]
            for k in range(i + 1, d) if transpose else range(i):
                acc = torch.addcmul(acc, m[k, i] if transpose else m[i, k], y[k], value=-1)
            y[i] = acc / m[i, i]
        return _columns(y)

    def outer_sum(
        self, u: Tensor, v: Tensor, base: Tensor | None = None, beta: float = 1.0, alpha: float = 1.0
    ) -> Tensor:
        c, d = u.shape[-2], u.shape[-1]
        if c > _MAX_ROWS or c == 0:
            return super().outer_sum(u, v, base, beta, alpha)
        symmetric = u is v  # the lower triangle, mirrored
        entries = {}
        for i in range(d):
            for j in range(i + 1 if symmetric else d):
                acc = u[..., 0, i] * v[..., 0, j]
                for s in range(1, c):
                    acc = torch.addcmul(acc, u[..., s, i], v[..., s, j])
                entries[i, j] = acc
        out = _matrix(entries, d, symmetric)
        if alpha != 1.0:
            out = out * alpha
        return out if base is None else torch.add(out, base, alpha=beta)

    def inverse(self) -> Tensor:
        return self._assemble(_tril_inverse(self.entries, self.size))

    def _gram_of_inverse(self) -> Tensor:
        return self._assemble(_gram(_tril_inverse(self.entries, self.size), self.size), symmetric=True)

    def _assemble(self, entries: dict[tuple[int, int], Tensor], symmetric: bool = False) -> Tensor:
        """:func:`_matrix` of entries computed from :attr:`entries` (shaped ``B + (1,)``)."""
        return _matrix({k: v.squeeze(-1) for k, v in entries.items()}, self.size, symmetric)


class ElementwiseCholesky(_Elementwise, CholeskyFactor):
    kind = "elementwise_cholesky"

    def scale_tril(self) -> Tensor:
        if self._raw is not None:  # row-major for users, as torch's, in one interleaving copy
            return _matrix(self._raw, self.size, row_major=True)
        return self.tensor  # a factor given as a tensor (from_distribution) is the caller's

    def precision_matrix(self) -> Tensor:
        return self._gram_of_inverse()


class ElementwiseScaleTril(_Elementwise, ScaleTril):
    kind = "elementwise_scale_tril"

    def precision_matrix(self) -> Tensor:
        return self._gram_of_inverse()


class ElementwisePrecision(_Elementwise, PrecisionFactor):
    kind = "elementwise_precision"

    def scale_tril(self) -> Tensor:
        return self.inverse().contiguous()

    def precision_matrix(self) -> Tensor:
        return self._assemble(_gram(self.entries, self.size), symmetric=True)


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
        return ElementwiseCholesky(elementwise_cholesky(matrix, name))  # entries, or torch's result (NaN entries)
    if name == "scale_tril":
        return ElementwiseScaleTril(matrix)
    # P = T^T T with T lower: the Cholesky factor of P with rows and columns reversed (PrecisionFactor.of).
    flipped = elementwise_cholesky(matrix.flip((-2, -1)), name)
    if isinstance(flipped, Tensor):  # torch's result (NaN entries)
        return ElementwisePrecision(flipped.flip((-2, -1)).mT)
    # T = J L' ^T J with J the reversal: T_ij = L'_{d-1-j, d-1-i}, no copy
    d = matrix.shape[-1]
    reverse = list(range(d))[::-1]  # Python ints (under torch.jit.trace shapes are tensors)
    return ElementwisePrecision({(i, j): flipped[reverse[j], reverse[i]] for i in range(d) for j in range(i + 1)})


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
