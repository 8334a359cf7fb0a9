r"""The shared intermediates of ``log_prob`` and the closed-form derivatives built from them.

With :math:`r = x - \mu`, :math:`z = L^{-1} r` and :math:`\alpha = \Sigma^{-1} r`, the derivative of :math:`\log p(x)`
w.r.t. each coordinate is a sample-dependent outer product :math:`u v^\top` and a constant term ``K``:

* ``"covariance_matrix"``: :math:`(u, v) = (\alpha, \alpha)`, full form
  :math:`\frac12(\alpha\alpha^\top - \Sigma^{-1})`;
* ``"precision_matrix"``: :math:`(r, -r)`, full form :math:`\frac12(\Sigma - r r^\top)`;
* ``"scale_tril"``: :math:`(\alpha, z)`, full form
  :math:`\operatorname{tril}(\alpha z^\top) - \operatorname{diag}(1/L_{ii})`

(torch autograd through :class:`torch.distributions.MultivariateNormal` gives the same.) Per-sample results are
written in one pass over their ``S + (d, d)`` output; sums over samples are GEMMs per factor member, centered by
the constant term (:func:`~torch_mvn_ext._sums.centered_outer_sum`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._checks import check_allocation, check_out, differentiated
from ._factor import TriangularFactor
from ._shapes import Grouping, sum_to, vech, vech_indices, vech_weights
from ._sums import centered_outer_sum

# Above this many output elements, vech results are gathered in chunks, so that the temporaries stay a fraction of
# the output.
_VECH_CHUNK_ELEMENTS = 2**18


class Residual:
    r"""``r``, ``z`` and ``alpha`` for one value, computed once and shared.

    ``r`` has shape ``S + (d,)`` with ``S`` = its batch shape, which broadcasts to the factor's batch. With one
    factor shared by every point (an unbatched matrix: the common case) the rows are laid out as ``(c, d)`` and each
    operation is one call on the ``(d, d)`` factor; otherwise as ``(b, c, d)`` by
    :class:`~torch_mvn_ext._shapes.Grouping`, one factor member per ``b``. :meth:`full` gives ``S + (d,)`` back.
    Built from differentiable operations only, so it also serves double backward.
    """

    def __init__(
        self,
        r: Tensor,
        factor: TriangularFactor,
        sigma_inverse: Callable[[], Tensor] | None = None,
        z: Tensor | None = None,
    ) -> None:
        self.shape = r.shape[:-1]
        if not factor.batch_shape:
            self.grouping: Grouping | None = None
            self.factor = factor
            self.c = math.prod(self.shape)
            self.r = r if r.dim() == 2 else r.reshape(self.c, r.shape[-1])
        else:
            g = Grouping(self.shape, factor.batch_shape)
            self.grouping = g
            self.factor = factor.flat(g)
            self.c = g.c
            self.r = g.group(r)
        self._z = z
        self._alpha: Tensor | None = None
        self._gemm_alpha = sigma_inverse is not None
        self._sigma_inverse_fn = sigma_inverse if sigma_inverse is not None else factor.precision_matrix
        self._sigma_inverse: Tensor | None = None
        self._full_alpha: Tensor | None = None

    @property
    def z(self) -> Tensor:
        r""":math:`z = L^{-1} r`, on first use (the Jacobians w.r.t. ``value`` and ``loc`` need only :math:`\alpha`)."""
        if self._z is None:
            self._z = self.factor.whiten(self.r)
        return self._z

    @property
    def alpha(self) -> Tensor:
        r""":math:`\alpha = \Sigma^{-1} r`. For a computed Cholesky factor (``sigma_inverse`` given) with
        ``32 <= d < 128`` and at least ``d`` samples per factor member, one GEMM with :math:`\Sigma^{-1}` (which the
        covariance gradient needs anyway) replaces the second triangular solve, as accurately
        (``benchmarks/accuracy.py``). Measured with torch 2.13's CPU build (MKL, 1 thread), GEMM against the
        solve: 2x faster at d = 32, 1.0-1.5x at d = 64, even at d = 128, and 1.1x (float32) to 1.5x (float64)
        slower at d = 256, where the solve's half of the GEMM's flops tells. Below d = 32 one solve costs less
        than the inverse."""
        if self._alpha is None:
            d = self.r.shape[-1]
            if self._gemm_alpha and 32 <= d < 128 and self.c >= d:
                self._alpha = self.r @ self.flat(self.sigma_inverse())
            else:
                self._alpha = self.factor.alpha(self.z, self.r)
        return self._alpha

    def sigma_inverse(self) -> Tensor:
        r""":math:`\Sigma^{-1}` in the factor's batch shape, computed once (by ``sigma_inverse`` where given)."""
        if self._sigma_inverse is None:
            self._sigma_inverse = self._sigma_inverse_fn()
        return self._sigma_inverse

    @property
    def log_prob(self) -> Tensor:
        z = self.z
        log_norm = self.factor.log_norm()
        if self.grouping is not None:
            log_norm = log_norm.unsqueeze(-1)
        lp = torch.add(log_norm, torch.linalg.vecdot(z, z), alpha=-0.5)
        return self.full_scalar(lp)

    def flat(self, matrix: Tensor) -> Tensor:
        """A matrix of the factor's batch shape laid out as the factor is."""
        return matrix if self.grouping is None else self.grouping.flat_matrix(matrix)

    def group(self, x: Tensor) -> Tensor:
        """A tensor of shape ``S + (k,)`` in the layout of ``r``."""
        if self.grouping is None:
            return x.reshape(self.c, x.shape[-1])
        return self.grouping.group(x)

    def unflat(self, matrix: Tensor) -> Tensor:
        """A matrix in the factor's layout back in the factor's batch shape."""
        return matrix if self.grouping is None else self.grouping.unflat_matrix(matrix)

    def full(self, x: Tensor) -> Tensor:
        """Rows in the layout of ``r`` back in ``S + (k,)``."""
        if self.grouping is None:
            return x if x.dim() == 2 and len(self.shape) == 1 else x.reshape(self.shape + x.shape[-1:])
        return self.grouping.ungroup(x)

    def full_scalar(self, x: Tensor) -> Tensor:
        """One number per row back in ``S``."""
        if self.grouping is None:
            return x if len(self.shape) == 1 else x.reshape(self.shape)
        return self.grouping.ungroup_scalar(x)

    def full_alpha(self) -> Tensor:
        r""":math:`\alpha` in ``S + (d,)``, row-major as returned to users (a float32 triangular solve from the right,
        see ``_factor._solve_rows``, leaves it column-major); computed once."""
        if self._full_alpha is None:
            self._full_alpha = self.full(self.alpha).contiguous()
        return self._full_alpha

    def outer_factors(self, name: str) -> tuple[Tensor, Tensor]:
        """``(u, v)`` in the layout of ``r``: the sample-dependent term ``u v^T`` of the derivative w.r.t. ``name``."""
        if name == "covariance_matrix":
            return self.alpha, self.alpha
        if name == "precision_matrix":
            return self.r, -self.r
        return self.alpha, self.z


def result_shape(res: Residual, name: str, layout: str) -> torch.Size:
    """The shape of the per-sample derivative w.r.t. ``name``: ``S + (d,)``, ``S + (d, d)`` or ``S + (k,)``."""
    d = res.r.shape[-1]
    if name in ("value", "loc"):
        return res.shape + (d,)
    return res.shape + ((d * (d + 1) // 2,) if layout == "vech" else (d, d))


def check_outs(
    out: object, wrt: object, names: tuple[str, ...], res: Residual, layout: str, inputs: dict[str, Tensor]
) -> dict[str, Tensor]:
    """``out=`` of ``jacobian``/``log_prob_and_grads`` as a dict by name, each checked against its result.

    ``inputs``: the tensors the results depend on, by name (``value``, ``loc``, the matrix argument). As torch's own
    ``out=`` functions refuse autograd, ``out=`` is refused, with a ``ValueError`` naming them, where grad mode is on
    and any of them requires grad: the results would need a graph that a write into ``out`` cannot carry.
    """
    if out is None:
        return {}
    if torch.is_grad_enabled():
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
        shape = result_shape(res, name, layout)
        check_allocation(shape, res.r, f"the Jacobian w.r.t. {name}")
        check_out(t, shape, res.r, f"the Jacobian w.r.t. {name}")
    return outs


def per_sample(
    res: Residual, name: str, layout: str, constant: Callable[[str], Tensor], out: Tensor | None
) -> Tensor:
    """The per-sample derivative w.r.t. ``name`` (``constant(name)``: its sample-independent term), into ``out``
    when given."""
    if name in ("value", "loc"):
        if out is not None:
            alpha = res.full(res.alpha)
            return torch.neg(alpha, out=out) if name == "value" else out.copy_(alpha)
        return -res.full_alpha() if name == "value" else res.full_alpha()
    return per_sample_matrix(res, name, layout, constant(name), out)


def summed_value(res: Residual, value: Tensor) -> Tensor:
    """The gradient of the summed log-density w.r.t. ``value``, in the value's own dtype and shape, as
    ``torch.autograd.grad`` returns it (the distribution computes in its own dtype)."""
    grad = -res.full_alpha()
    if grad.shape != value.shape:
        grad = sum_to(grad, value.shape)
    return grad if value.dtype is grad.dtype or not value.dtype.is_floating_point else grad.to(value.dtype)


def per_sample_matrix(res: Residual, name: str, layout: str, constant: Tensor, out: Tensor | None) -> Tensor:
    r"""The per-sample derivative w.r.t. the matrix ``name``, shape ``S + (d, d)`` (``S + (k,)`` for ``"vech"``).

    ``constant``: :math:`\Sigma^{-1}`, :math:`\Sigma` or :math:`1 / L_{ii}` (the factor's batch shape) for
    ``"covariance_matrix"``, ``"precision_matrix"`` and ``"scale_tril"``. Written into ``out`` when given.
    """
    u, v = res.outer_factors(name)
    # Row-major operands whatever layout the solve route left (a right solve leaves z and alpha column-major): a
    # broadcast product of column-major operands falls off the vectorized path (measured on an AMD EPYC, float32,
    # d = 64, N = 1024: 20x slower), and the copies cost a d-th of the output's writes.
    u, v = res.full(u).contiguous(), res.full(v).contiguous()
    if out is None and (differentiated(u) or differentiated(v) or differentiated(constant)):
        # Differentiable (by autograd, forward-mode AD or a torch.func transform) or batched by torch.func:
        # out-of-place, as they need; the in-place passes below are for plain tensors.
        outer = u.unsqueeze(-1) * v.unsqueeze(-2)
        if name == "scale_tril":
            full = outer.tril() - torch.diag_embed(constant)
        else:
            full = 0.5 * (outer - constant if name == "covariance_matrix" else outer + constant)
        return vech(full, symmetric=name != "scale_tril") if layout == "vech" else full
    if layout == "vech":
        return _per_sample_vech(u, v, name, constant, out)
    if out is None:
        out = torch.empty(u.shape + u.shape[-1:], dtype=u.dtype, device=u.device)
    if name == "scale_tril":
        torch.mul(u.unsqueeze(-1), v.unsqueeze(-2), out=out)
        out.tril_()
        out.diagonal(dim1=-2, dim2=-1).sub_(constant)
        return out
    # One pass over the output: (u v^T -/+ K) / 2 with the row-major view of the symmetric K (cholesky_inverse
    # returns it column-major, and a broadcast column-major operand falls off the vectorized path).
    if not constant.is_contiguous() and constant.mT.is_contiguous():
        constant = constant.mT
    base = constant * (-0.5 if name == "covariance_matrix" else 0.5)
    return torch.addcmul(base, u.unsqueeze(-1), v.unsqueeze(-2), value=0.5, out=out)


def _per_sample_vech(u: Tensor, v: Tensor, name: str, constant: Tensor, out: Tensor | None) -> Tensor:
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
    if name == "scale_tril":
        result.sub_(constant[..., rows] * (rows == cols))
    else:
        # (u v^T -/+ K) w / 2 in one pass: w = 1 on the diagonal, 2 off it, the unique-element convention.
        w = 0.5 * vech_weights(d, u.dtype, u.device)
        sign = 1.0 if name == "covariance_matrix" else -1.0
        torch.addcmul(constant[..., rows, cols] * (w * -sign), result, w, out=result)
    if out is not None and result is not out:
        out.copy_(result)
        return out
    return result


def summed_matrix(res: Residual, name: str, layout: str, constant: Tensor, batch_shape: torch.Size) -> Tensor:
    r"""The gradient of :math:`\sum_s \log p(x_s)` w.r.t. the matrix ``name`` of batch shape ``batch_shape``: the
    per-sample derivatives summed over the samples that share one of its members, by
    :func:`~torch_mvn_ext._sums.centered_outer_sum` (GEMMs over chunks of samples, each centered by its share of
    the constant term, which the sum of outer products nearly cancels near the optimum)."""
    if name == "covariance_matrix":  # 1/2 sum_s (alpha alpha^T - Sigma^{-1})
        u, v, scale = res.alpha, res.alpha, -0.5
    elif name == "precision_matrix":  # 1/2 sum_s (Sigma - r r^T)
        u, v, scale = res.r, res.r, 0.5
    else:  # tril(sum_s alpha z^T) - N diag(1 / L_ii)
        u, v, scale = res.alpha, res.z, -1.0
    g = res.grouping
    if g is None and not batch_shape:
        flat_constant = constant
    elif g is not None and batch_shape == g.batch_shape:
        flat_constant = constant.reshape(g.b, constant.shape[-1]) if name == "scale_tril" else g.flat_matrix(constant)
    else:
        g = Grouping(res.shape, batch_shape)
        u, v = g.group(res.full(u)), g.group(res.full(v))
        if name == "scale_tril":
            flat_constant = g.flat_matrix(constant.unsqueeze(-1))[..., 0]
        else:
            flat_constant = g.flat_matrix(constant)
    outer_sum = res.factor.outer_sum
    if name == "scale_tril":
        out = centered_outer_sum(u, v, torch.diag_embed(flat_constant), scale=scale, outer_sum=outer_sum).tril()
    else:
        out = centered_outer_sum(u, v, flat_constant, scale=scale, outer_sum=outer_sum)
    if g is not None:
        out = g.unflat_matrix(out)
    # row-major for users (the elementwise factors of small matrices compute structure-of-arrays)
    return vech(out, symmetric=name != "scale_tril") if layout == "vech" else out.contiguous()
