r"""The derivatives front door: per-sample Jacobians and summed gradients of :math:`\log p`, for any structure.

With :math:`r = x - \mu` and :math:`\alpha = \Sigma^{-1} r`, the derivative w.r.t. ``value`` is :math:`-\alpha`, w.r.t.
``loc`` :math:`\alpha`, and w.r.t. each coordinate of a structure a :class:`~torch_mvn_ext._gaussian.Term`:
``scale`` :math:`(u v^\top - K)` in one of four forms (symmetric, lower-triangular, general, diagonal), which the
structure gives (:meth:`~torch_mvn_ext._gaussian.GaussianState.term`) and this module writes out without knowing the
structure. :func:`jacobian` and :func:`log_prob_and_grads` lay the rows out once (:meth:`GaussianState.rows`) and
share them between every name asked for; per-sample results are written in one pass over their output, sums over
samples are GEMMs per member, centered by the constant term (:func:`~torch_mvn_ext._sums.centered_outer_sum`).
"""

from __future__ import annotations

import math
from typing import Any, Union

import torch
from torch import Tensor

from ._checks import check_allocation, check_out, differentiated
from ._gaussian import DIAGONAL, GENERAL, LOWER, SYMMETRIC, GaussianState, Rows, Term
from ._shapes import Grouping, broadcast_shapes, sum_to, vech, vech_indices, vech_weights
from ._sums import centered_outer_sum

Outputs = Union[Tensor, dict[str, Tensor]]

# Above this many output elements, vech results are gathered in chunks, so that the temporaries stay a fraction of
# the output.
_VECH_CHUNK_ELEMENTS = 2**18


def jacobian(
    state: GaussianState, value: Tensor, r: Tensor, wrt: object, names: tuple[str, ...], layout: str, out: object
) -> Outputs:
    """The per-sample derivatives of the log-density at ``value`` (residuals ``r``) w.r.t. ``names`` (a dict for
    several ``wrt``), into ``out`` when given."""
    rows = state.rows(r)
    outs = check_outs(out, wrt, names, state, rows, layout, value)
    if isinstance(wrt, str):
        return per_sample(state, rows, wrt, layout, outs.get(wrt))
    return {name: per_sample(state, rows, name, layout, outs.get(name)) for name in names}


def log_prob_and_grads(
    state: GaussianState,
    r: Tensor,
    value: Tensor,
    names: tuple[str, ...],
    reduction: str,
    layout: str,
    out: object,
    batch_shape: torch.Size,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The log-density at ``value`` (residuals ``r``) and its derivatives w.r.t. ``names``, per sample or summed over
    samples into the shapes of the tensors the user passed (``batch_shape``: the distribution's)."""
    rows = state.rows(r)
    if reduction == "none":
        outs = check_outs(out, tuple(names), names, state, rows, layout, value)
        return rows.log_prob, {name: per_sample(state, rows, name, layout, outs.get(name)) for name in names}
    if out is not None:
        raise ValueError("out= is for reduction='none'; the summed gradients have the inputs' own shapes")
    grads = {}
    for name in names:
        grads[name] = summed(state, rows, name, layout, value, batch_shape)
    return rows.log_prob, grads


def result_shape(state: GaussianState, rows: Rows, name: str, layout: str) -> torch.Size:
    """The shape of the per-sample derivative w.r.t. ``name``: ``S + (d,)``, ``S + (d, d)``, ``S + (k,)``, ..."""
    d = state.size
    if name in ("value", "loc"):
        return rows.shape + (d,)
    shape = state.term_shape(name)
    if layout == "vech" and len(shape) == 2 and shape[0] == shape[1]:
        return rows.shape + (d * (d + 1) // 2,)
    return rows.shape + shape


def check_outs(
    out: object, wrt: object, names: tuple[str, ...], state: GaussianState, rows: Rows, layout: str, value: Tensor
) -> dict[str, Tensor]:
    """``out=`` of ``jacobian``/``log_prob_and_grads`` as a dict by name, each checked against its result.

    As torch's own ``out=`` functions refuse autograd, ``out=`` is refused, with a ``ValueError`` naming them, where
    grad mode is on and any input (``value``, ``loc``, the structure's tensors) requires grad: the results would need a
    graph that a write into ``out`` cannot carry.
    """
    if out is None:
        return {}
    if torch.is_grad_enabled():
        inputs = {"value": value, **state.inputs()}
        tracked = [name for name, t in inputs.items() if t.requires_grad]
        if tracked:
            raise ValueError(
                f"out= is for inputs that do not require grad, as with torch's own out= arguments, but "
                f"{' and '.join(tracked)} {'requires' if len(tracked) == 1 else 'require'} grad: call without out= "
                f"for a differentiable result, or under torch.no_grad() to write into out"
            )
    if isinstance(wrt, str):
        outs: dict[str, Any] = {wrt: out}
    elif isinstance(out, dict):
        unknown = [key for key in out if key not in names]
        if unknown:
            raise ValueError(f"out has keys {unknown} that are not in wrt {list(names)}")
        outs = dict(out)
    else:
        raise ValueError(f"out for several wrt must be a dict keyed by their names; got {type(out).__name__}")
    for name, t in outs.items():
        shape = result_shape(state, rows, name, layout)
        check_allocation(shape, rows.r, f"the Jacobian w.r.t. {name}")
        check_out(t, shape, rows.r, f"the Jacobian w.r.t. {name}")
    return outs


def per_sample(state: GaussianState, rows: Rows, name: str, layout: str, out: Tensor | None) -> Tensor:
    """The per-sample derivative w.r.t. ``name``, into ``out`` when given."""
    if name in ("value", "loc"):
        if out is not None:
            alpha = rows.full(rows.alpha)
            return torch.neg(alpha, out=out) if name == "value" else out.copy_(alpha)
        return -rows.full_alpha() if name == "value" else rows.full_alpha()
    return per_sample_term(rows, state.term(rows, name), layout, out)


def per_sample_term(rows: Rows, term: Term, layout: str, out: Tensor | None) -> Tensor:
    r"""A :class:`~torch_mvn_ext._gaussian.Term` per sample: shape ``S + (d, m)`` (``S + (k,)`` for ``"vech"``,
    ``S + (d,)`` for the diagonal form), written into ``out`` when given."""
    # Row-major operands whatever layout the solve route left (a right solve leaves z and alpha column-major): a
    # broadcast product of column-major operands falls off the vectorized path (measured on an AMD EPYC, float32,
    # d = 64, N = 1024: 20x slower), and the copies cost a d-th of the output's writes.
    u, v = rows.full(term.u).contiguous(), rows.full(term.v).contiguous()
    constant, scale, form = term.constant, term.scale, term.form
    if form == DIAGONAL:  # one pass: scale u v - scale K
        return torch.addcmul(constant * -scale, u, v, value=scale, out=out)
    vech_form = layout == "vech" and form in (SYMMETRIC, LOWER)
    if out is None and (differentiated(u) or differentiated(v) or differentiated(constant)):
        # Differentiable (by autograd, forward-mode AD or a torch.func transform) or batched by torch.func:
        # out-of-place, as they need; the in-place passes below are for plain tensors.
        outer = u.unsqueeze(-1) * v.unsqueeze(-2)
        if form == LOWER:
            full = outer.tril() - torch.diag_embed(constant)
        else:
            full = outer - constant
        full = full if scale == 1 else scale * full
        return vech(full, symmetric=form == SYMMETRIC) if vech_form else full
    if vech_form:
        return _per_sample_vech(u, v, term, out)
    if out is None:
        out = torch.empty(u.shape + v.shape[-1:], dtype=u.dtype, device=u.device)
    if form == LOWER:
        torch.mul(u.unsqueeze(-1), v.unsqueeze(-2), out=out)
        out.tril_()
        out.diagonal(dim1=-2, dim2=-1).sub_(constant)
        return out if scale == 1 else out.mul_(scale)
    # One pass over the output: scale (u v^T - K) with the row-major view of a symmetric K (cholesky_inverse returns it
    # column-major, and a broadcast column-major operand falls off the vectorized path).
    if form == SYMMETRIC and not constant.is_contiguous() and constant.mT.is_contiguous():
        constant = constant.mT
    return torch.addcmul(constant * -scale, u.unsqueeze(-1), v.unsqueeze(-2), value=scale, out=out)


def _per_sample_vech(u: Tensor, v: Tensor, term: Term, out: Tensor | None) -> Tensor:
    """The vech layout, gathered straight into the output in chunks of samples, so that the temporaries stay under a
    quarter of the output (the gather of ``u`` writes into the output; only ``v``'s is a temporary)."""
    d = u.shape[-1]
    rows, cols = vech_indices(d, u.device)
    k = rows.numel()
    shape = u.shape[:-1] + (k,)
    result = torch.empty(shape, dtype=u.dtype, device=u.device) if out is None or not out.is_contiguous() else out
    m = math.prod(u.shape[:-1])  # not -1 in the reshapes: with d = 0 there is nothing to infer it from
    flat_u, flat_v, flat = u.reshape(m, d), v.reshape(m, d), result.view(m, k)
    step = max(1, m if flat.numel() <= _VECH_CHUNK_ELEMENTS else m // 4)
    for s in range(0, m, step):
        torch.index_select(flat_u[s : s + step], 1, rows, out=flat[s : s + step])
        flat[s : s + step].mul_(flat_v[s : s + step].index_select(1, cols))
    constant, scale = term.constant, term.scale
    if term.form == LOWER:
        result.sub_(constant[..., rows] * (rows == cols))
        if scale != 1:
            result.mul_(scale)
    else:
        # scale (u v^T - K) w in one pass: w = 1 on the diagonal, 2 off it, the unique-element convention.
        w = scale * vech_weights(d, u.dtype, u.device)
        torch.addcmul(constant[..., rows, cols] * -w, result, w, out=result)
    if out is not None and result is not out:
        out.copy_(result)
        return out
    return result


def summed(state: GaussianState, rows: Rows, name: str, layout: str, value: Tensor, batch_shape: torch.Size) -> Tensor:
    """The gradient of the summed log-density w.r.t. ``name``, in the shape of the tensor the user passed for it (the
    value's own dtype for ``"value"``, as ``torch.autograd.grad`` returns it: the distribution computes in its
    own)."""
    if name == "value":
        grad = -rows.full_alpha()
        if grad.shape != value.shape:
            grad = sum_to(grad, value.shape)
        return grad if value.dtype is grad.dtype or not value.dtype.is_floating_point else grad.to(value.dtype)
    if name == "loc":
        return sum_to(rows.full_alpha(), state.loc.shape)
    return summed_term(rows, state.term(rows, name), layout, state.batch_shape, state.summed_shape(name, batch_shape))


def summed_term(rows: Rows, term: Term, layout: str, own: torch.Size, target: torch.Size) -> Tensor:
    r"""A :class:`~torch_mvn_ext._gaussian.Term` summed over the samples that share a member of ``target`` (the
    batch shape of the tensor the gradient is for; ``own``: the structure's, which the term's constant has): GEMMs
    over chunks of samples, each centered by its share of the constant term, which the sum of outer products nearly
    cancels near the optimum (:func:`~torch_mvn_ext._sums.centered_outer_sum`)."""
    u, v, constant, scale, form = term.u, term.v, term.constant, term.scale, term.form
    event_dims = 1 if form in (LOWER, DIAGONAL) else 2
    g = rows.grouping
    if target != own and broadcast_shapes(target, own) == own:
        # A tensor broadcast within the structure: summed per member of the structure, then over the members.
        result = summed_term(rows, term, layout, own, own)
        return sum_to(result, target + result.shape[len(own) :])
    if g is None and not target:
        flat = constant
    elif g is not None and target == g.batch_shape:
        flat = rows.flat(constant, event_dims)
    else:
        g = Grouping(rows.shape, target)
        u, v = g.group(rows.full(u)), g.group(rows.full(v))
        flat = g.flat_matrix(constant if event_dims == 2 else constant.unsqueeze(-1))
        flat = flat if event_dims == 2 else flat[..., 0]
    if form == DIAGONAL:  # each sample centered, one temporary
        out = torch.addcmul(flat.unsqueeze(-2) * -scale, u, v, value=scale).sum(-2)
    elif form == LOWER:
        out = centered_outer_sum(u, v, torch.diag_embed(flat), scale=-scale, outer_sum=term.outer_sum).tril()
    elif form == GENERAL and v.shape[-1] < u.shape[-1]:
        # The transposed product, its short side first: sum_s v_s u_s^T is a (k, c) x (c, d) GEMM, which MKL runs
        # 1.4-10x faster than (d, c) x (c, k) (AMD EPYC, float32, d = 1024, c = 256, k = 64 to 4).
        out = centered_outer_sum(v, u, flat.mT, scale=-scale, outer_sum=term.outer_sum).mT
    else:
        out = centered_outer_sum(u, v, flat, scale=-scale, outer_sum=term.outer_sum)
    if g is not None:
        out = out.reshape(g.batch_shape + out.shape[-1:]) if form == DIAGONAL else g.unflat_matrix(out)
    # row-major for users (the elementwise factors of small matrices compute structure-of-arrays)
    return vech(out, symmetric=form == SYMMETRIC) if layout == "vech" and form != DIAGONAL else out.contiguous()
