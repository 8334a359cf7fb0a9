r"""Information geometry of the Gaussian: Fisher information matrices and natural gradients, in closed form.

The Fisher matrices in the ``vech`` coordinates of a matrix parameter have :math:`k^2` entries,
:math:`k = d(d+1)/2`, which outgrow memory fast (:math:`d = 96` gives 165 MiB in float64, :math:`d = 250` 7.9 GiB):
each is written into its output in row chunks, so that the temporaries stay a fraction of it, after a check that the
output fits in the device's memory at all.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ._checks import check_allocation, check_choice, check_event_tensor, differentiated
from ._shapes import vech_indices, vech_weights


class Geometry(Protocol):
    """What this module asks of a structure: its Fisher blocks and natural gradients by coordinate."""

    loc: Tensor
    coordinates: tuple[str, ...]

    @property
    def size(self) -> int: ...

    @property
    def precision_matrix(self) -> Tensor: ...

    def fisher(self, name: str) -> Tensor: ...

    def natural_gradient(self, name: str, grad: Tensor, shape: torch.Size) -> Tensor: ...


# Fisher matrices are gathered in this many chunks of rows.
_CHUNKS = 16


def symmetrize(matrix: Tensor) -> Tensor:
    return 0.5 * (matrix + matrix.mT)


def symmetric_fisher_vech(m: Tensor) -> Tensor:
    r"""Fisher information in the vech coordinates of a symmetric matrix parameter, shape ``m.shape[:-2] + (k, k)``.

    For :math:`\Sigma` pass ``m`` :math:`= P`, for :math:`P` pass ``m`` :math:`= \Sigma`: in both cases the score
    w.r.t. the unique element :math:`(i, j)` is :math:`\frac{w_{ij}}2 (\pm u_i u_j - \text{const})` with
    :math:`u \sim N(0, M)` (:math:`u = \alpha` or :math:`u = r`) and :math:`w_{ij}` = 1 on the diagonal, 2 off it,
    so Isserlis' theorem gives

    .. math:: F_{(ij),(kl)} = \frac{w_{ij} w_{kl}}{4} (M_{ik} M_{jl} + M_{il} M_{jk}),

    which is :math:`\frac12 D^\top (M \otimes M) D` with the duplication matrix :math:`D` (Magnus & Neudecker,
    *Matrix Differential Calculus*, ch. 18), gathered entry by entry instead of through the :math:`d^2 \times d^2`
    Kronecker product, pairs in ``torch.tril_indices`` order. Peak memory: the output and a sixteenth of it per
    temporary.
    """
    d = m.shape[-1]
    rows, cols = vech_indices(d, m.device)
    k = rows.numel()
    shape = m.shape[:-2] + (k, k)
    check_allocation(shape, m, "fisher_information")
    w = 0.5 * vech_weights(d, m.dtype, m.device)
    kk, ll = rows[None, :], cols[None, :]
    if differentiated(m):  # in-place writes would cut the graph (or refuse forward-mode AD): one expression
        i, j = rows[:, None], cols[:, None]
        return (m[..., i, kk] * m[..., j, ll] + m[..., i, ll] * m[..., j, kk]) * (w[:, None] * w[None, :])
    out = torch.empty(shape, dtype=m.dtype, device=m.device)
    step = max(1, k // _CHUNKS)
    for s in range(0, k, step):
        i, j, block = rows[s : s + step, None], cols[s : s + step, None], out[..., s : s + step, :]
        torch.mul(m[..., i, kk], m[..., j, ll], out=block)
        block.addcmul_(m[..., i, ll], m[..., j, kk])
        block.mul_(w[s : s + step, None] * w[None, :])
    return out


def tril_fisher_vech(precision: Tensor, inv_diag: Tensor) -> Tensor:
    r"""Fisher information in the coordinates of the lower triangle of :math:`L` (:math:`\Sigma = L L^\top`).

    The score w.r.t. :math:`L_{ij}`, :math:`i \ge j`, is :math:`\alpha_i z_j - \delta_{ij} / L_{ii}` with
    :math:`z \sim N(0, I)` and :math:`\alpha = L^{-\top} z`. Isserlis' theorem gives
    :math:`\operatorname{Cov} = P_{ik}\delta_{jl} + (L^{-1})_{li} (L^{-1})_{jk}`, and the second term vanishes unless
    :math:`i = j = k = l` because :math:`L^{-1}` is lower-triangular:

    .. math:: F_{(ij),(kl)} = P_{ik}\,\delta_{jl} + \delta_{ik}\delta_{jl}\delta_{ij} / L_{ii}^2,

    one block :math:`P_{j:, j:}` per column :math:`j` (the pairs :math:`(i, j)` sit at ``i (i + 1) / 2 + j`` in
    ``torch.tril_indices`` order), plus :math:`1 / L_{jj}^2` at the diagonal entries: written block by block into a
    zero output, with no temporary of its size. ``inv_diag`` is :math:`1 / L_{ii}`, shape ``B + (d,)``; the result
    has shape ``B + (k, k)``.
    """
    d = precision.shape[-1]
    k = d * (d + 1) // 2
    shape = precision.shape[:-2] + (k, k)
    check_allocation(shape, precision, "fisher_information")
    out = precision.new_zeros(shape)
    if not d:  # an empty event: nothing to write
        return out
    at, ak, ai, ab = [], [], [], []
    for j in range(d):
        i = torch.arange(j, d, device=precision.device)
        p = i * (i + 1) // 2 + j
        n = d - j
        at.append(p.repeat_interleave(n))
        ak.append(p.repeat(n))
        ai.append(i.repeat_interleave(n))
        ab.append(i.repeat(n))
    out_rows, out_cols, p_rows, p_cols = (torch.cat(x) for x in (at, ak, ai, ab))
    out[..., out_rows, out_cols] = precision[..., p_rows, p_cols]
    diagonal = torch.arange(d, device=precision.device)
    diagonal = diagonal * (diagonal + 1) // 2 + diagonal
    out[..., diagonal, diagonal] = out[..., diagonal, diagonal] + inv_diag.pow(2)
    return out


def tril_natural_gradient(scale_tril: Tensor, grad: Tensor) -> Tensor:
    r""":math:`L\,\Phi(L^\top G)` with :math:`\Phi(X) = \operatorname{tril}(X, -1) + \frac12 \operatorname{diag}(X)`.

    With :math:`A = L^{-1} dL` (lower-triangular), :math:`d\Sigma = dL\,L^\top + L\,dL^\top` turns the Fisher metric
    :math:`\frac12 \operatorname{tr}(P\,d\Sigma\,P\,d\Sigma)` into :math:`\frac12 \|A + A^\top\|_F^2`. The natural
    gradient :math:`\Delta = L A_\Delta` satisfies :math:`\langle A_\Delta + A_\Delta^\top, A\rangle =
    \langle G, L A\rangle = \langle L^\top G, A\rangle` for every lower-triangular :math:`A`, whence
    :math:`A_\Delta = \Phi(L^\top G)`: it solves the :func:`tril_fisher_vech` system in O(d^3). Only the lower
    triangle of ``grad`` matters.
    """
    x = scale_tril.mT @ grad.tril()
    x = x.tril(-1) + 0.5 * torch.diag_embed(x.diagonal(dim1=-2, dim2=-1))
    return scale_tril @ x


def symmetric_natural_gradient(m: Tensor, grad: Tensor) -> Tensor:
    r""":math:`2 M G M` for the symmetric part of ``grad``: :math:`M = \Sigma` for the covariance's coordinates,
    :math:`M = P` for the precision's (the inverse of the :func:`symmetric_fisher_vech` metric)."""
    return 2.0 * symmetrize(m @ symmetrize(grad) @ m)


def fisher_information(state: Geometry, wrt: str, layout: str) -> Tensor:
    """The Fisher information of each member of the structure's batch (see
    :meth:`~torch_mvn_ext.JacobianMVN.fisher_information`)."""
    if wrt == "loc":
        return state.precision_matrix.clone()  # a copy: the caller may damp it in place
    if layout == "full":
        raise ValueError(
            f"fisher_information(wrt={wrt!r}) needs layout='vech': in the full (d, d) layout the d^2 x d^2 "
            f"Fisher matrix is singular (the matrix has only d*(d+1)/2 free entries)"
        )
    return state.fisher(wrt)


def natural_gradient(
    state: Geometry, grads: object, extra: dict[str, object], batch_shape: torch.Size
) -> dict[str, Tensor]:
    """The natural gradients of the Euclidean ``grads`` (see :meth:`~torch_mvn_ext.JacobianMVN.natural_gradient`);
    ``extra``: any further arguments it was called with, by position (``"1"``, ...) or keyword, which it does not
    take."""
    allowed = ("loc",) + state.coordinates
    if extra or not isinstance(grads, dict) or not grads:
        got = [_describe(grads)] + [_describe(v) if k.isdigit() else f"{k}={_describe(v)}" for k, v in extra.items()]
        raise ValueError(
            f"natural_gradient takes one argument, grads: a non-empty dict of gradients keyed by 'loc' and/or one of "
            f"{', '.join(map(repr, allowed[1:]))}, such as natural_gradient({{'loc': g}}); got ({', '.join(got)})"
        )
    for name in grads:
        check_choice("each key of grads", name, allowed)
    matrices = [name for name in grads if name != "loc"]
    if len(matrices) > 1:
        raise ValueError(
            f"grads has gradients w.r.t. {' and '.join(matrices)}: they are coordinates of the same distribution, "
            f"so pass the gradient w.r.t. one of them"
        )
    event = torch.Size([state.size])
    out = {}
    for name, g in grads.items():
        trailing = event if name == "loc" else event + event
        shape = check_event_tensor(f"grads[{name!r}]", g, trailing, batch_shape, state.loc.device)
        out[name] = state.natural_gradient(name, g.to(state.loc.dtype), shape)
    return out


def _describe(arg: object) -> str:
    """A short description of an argument for an error message."""
    if isinstance(arg, Tensor):
        return f"a tensor of shape {tuple(arg.shape)}"
    if isinstance(arg, dict) and not arg:
        return "an empty dict"
    if isinstance(arg, (str, int, float, bool)) or arg is None:
        return repr(arg)
    return f"a {type(arg).__name__}"
