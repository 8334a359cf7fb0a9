r"""Shapes: broadcasting, grouping samples by factor member, the ``vech`` layout and event indices."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor


def format_shape(shape: Sequence[int]) -> str:
    return str(tuple(shape))


def broadcast_shapes(*shapes: Sequence[int]) -> torch.Size:
    r"""``torch.broadcast_shapes`` (same result, same ``RuntimeError``) without its ~10 µs of Python per call,
    which counts on every ``log_prob`` of a single point."""
    if torch.compiler.is_compiling():
        return torch.broadcast_shapes(*shapes)
    if len(shapes) == 2 and shapes[0] == shapes[1]:
        return torch.Size(shapes[0])
    n = max(len(s) for s in shapes)
    out = [1] * n
    for s in shapes:
        for i, k in enumerate(s, n - len(s)):
            if k != 1:
                if out[i] != 1 and out[i] != k:
                    raise RuntimeError(f"Shape mismatch: objects cannot be broadcast to a single shape: {shapes}")
                out[i] = k
    return torch.Size(out)


def sum_to(x: Tensor, shape: Sequence[int]) -> Tensor:
    """``x.sum_to_size(shape)`` (``shape`` broadcasts to ``x.shape``), as one ``sum`` over the leading dimensions where
    that is all it takes: ``sum_to_size`` costs about 10 µs of overhead a call, which counts at one point."""
    if x.shape == shape:
        return x
    lead = x.dim() - len(shape)
    if lead > 0 and x.shape[lead:] == shape:
        return x.sum(tuple(range(lead)))
    return x.sum_to_size(shape)


class Grouping:
    r"""Lays out a tensor of shape ``S + (k,)`` as ``(b, c, k)``.

    ``b`` runs over the members of a batch shape ``B`` that broadcasts to ``S`` and ``c`` over the elements of
    ``S`` that share one member. A factor of shape ``B + (d, d)`` reshaped to ``(b, d, d)`` then meets all of its
    samples in one batched BLAS-3 call, and sums over samples become one GEMM per member.
    """

    def __init__(self, shape: Sequence[int], batch_shape: Sequence[int]) -> None:
        shape = tuple(shape)
        n = len(shape)
        padded = (1,) * (n - len(batch_shape)) + tuple(batch_shape)
        kept = [i for i in range(n) if padded[i] != 1 or shape[i] == 1]
        summed = [i for i in range(n) if padded[i] == 1 and shape[i] != 1]
        self.shape = torch.Size(shape)
        self.batch_shape = torch.Size(batch_shape)
        self.perm = kept + summed
        self.identity = self.perm == list(range(n))
        self.inv_perm = [self.perm.index(i) for i in range(n)]
        self.b = math.prod([shape[i] for i in kept])
        self.c = math.prod([shape[i] for i in summed])
        self.permuted_shape = [shape[i] for i in self.perm]

    def group(self, x: Tensor) -> Tensor:
        k = x.shape[-1]
        if x.shape[:-1] != self.shape:
            x = x.expand(self.shape + (k,))
        if not self.identity:
            x = x.permute(self.perm + [len(self.shape)])
        return x.reshape(self.b, self.c, k)

    def ungroup(self, x: Tensor) -> Tensor:
        k = x.shape[-1]
        if self.identity:
            return x.reshape(self.shape + (k,))
        return x.reshape(self.permuted_shape + [k]).permute(self.inv_perm + [len(self.shape)])

    def ungroup_scalar(self, x: Tensor) -> Tensor:
        """A grouped ``(b, c)`` tensor (one number per element) back in ``S``."""
        if self.identity:
            return x.reshape(self.shape)
        return x.reshape(self.permuted_shape).permute(self.inv_perm)

    def flat_matrix(self, m: Tensor) -> Tensor:
        """A ``B + (d, d)`` (or broadcastable) matrix as ``(b, d, d)``; an unbatched one stays ``(d, d)``, which
        every batched operation here broadcasts."""
        if m.dim() == 2 and self.b == 1:
            return m
        if m.shape[:-2] != self.batch_shape:
            m = m.expand(self.batch_shape + m.shape[-2:])
        return m.reshape(self.b, *m.shape[-2:])

    def unflat_matrix(self, m: Tensor) -> Tensor:
        return m.reshape(self.batch_shape + m.shape[-2:])


def vech_indices(d: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Row and column indices of the lower triangle in ``torch.tril_indices`` order."""
    rows, cols = torch.tril_indices(d, d, device=device)
    return rows, cols


def vech_weights(d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """1 on the diagonal, 2 off it, in ``torch.tril_indices`` order."""
    rows, cols = vech_indices(d, device)
    return torch.where(rows == cols, 1.0, 2.0).to(dtype)


def vech(matrix: Tensor, symmetric: bool) -> Tensor:
    r"""The lower triangle of ``matrix`` as a vector; off-diagonals doubled when ``symmetric``.

    For a symmetric matrix argument the derivative w.r.t. its :math:`d(d+1)/2` unique elements counts each
    off-diagonal element twice (it appears at ``(i, j)`` and ``(j, i)``).
    """
    d = matrix.shape[-1]
    rows, cols = vech_indices(d, matrix.device)
    out = matrix[..., rows, cols]
    if symmetric:
        out = out * vech_weights(d, matrix.dtype, matrix.device)
    return out


def is_integer_tensor(t: Tensor, dim: int) -> bool:
    """Whether ``t`` is a ``dim``-dimensional tensor of an integer dtype (not bool, which indexes as a mask)."""
    return t.dim() == dim and not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def event_dims(dims: object, d: int) -> list[int]:
    r"""``dims`` as a list of event indices in ``[0, d)``; negative ones count from the end, as in Python indexing.

    Accepts a list, tuple or range of integers or a 1-d integer tensor; ``ValueError`` for anything else, for an
    index out of range and for repeated indices.
    """
    if isinstance(dims, Tensor):
        if not is_integer_tensor(dims, 1):
            raise ValueError(
                f"dims must be a sequence of ints; got a tensor of dtype {dims.dtype} and shape "
                f"{format_shape(dims.shape)}"
            )
        dims = dims.tolist()
    if not isinstance(dims, (list, tuple, range)):
        raise ValueError(f"dims must be a sequence (list, tuple or range) of event indices; got {dims!r}")
    out = []
    for i in dims:
        tensor_not_int = isinstance(i, Tensor) and not is_integer_tensor(i, 0)
        if isinstance(i, bool) or not hasattr(i, "__index__") or tensor_not_int:
            raise ValueError(f"dims must contain ints; got {i!r} in {list(dims)}")
        i = operator.index(i)
        if not -d <= i < d:
            raise ValueError(f"dims contains {i}, out of range for event size {d} (allowed: {-d} to {d - 1})")
        out.append(i % d)
    repeated = sorted({i for i in out if out.count(i) > 1})
    if repeated:
        raise ValueError(f"dims {list(dims)} repeats the event index(es) {repeated}")
    return out


def sub_block(matrix: Tensor, rows: Sequence[int], cols: Sequence[int]) -> Tensor:
    """``matrix[..., rows, :][..., :, cols]`` for lists of indices, in one gather."""
    r = torch.tensor(rows, dtype=torch.long, device=matrix.device)
    c = torch.tensor(cols, dtype=torch.long, device=matrix.device)
    return matrix[..., r[:, None], c[None, :]]
