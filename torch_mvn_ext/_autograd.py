r"""``log_prob`` as a :class:`torch.autograd.Function` whose backward is the closed form.

With :math:`r = x - \mu`, :math:`z = L^{-1} r`, :math:`\alpha = \Sigma^{-1} r` and upstream weights :math:`g_s`:

.. math::

    \bar x = -g\,\alpha, \qquad \bar\mu = g\,\alpha, \qquad
    \bar L = \operatorname{tril}\Big(\sum_s g_s \alpha_s z_s^\top\Big) - \Big(\sum_s g_s\Big)\operatorname{diag}(1/L_{ii}),

and for a precision factor :math:`T = L^{-1}` (:math:`P = T^\top T`),
:math:`\bar T = -\operatorname{tril}\big(\sum_s g_s z_s r_s^\top\big) + \big(\sum_s g_s\big)\operatorname{diag}(1/T_{ii})`.
The sums over samples sharing a factor are one GEMM each (:class:`~torch_mvn_ext._linalg.Grouping`).
The backward is written with differentiable operations, so double backward works; ``jvp`` and the generated
vmap rule make ``torch.func`` transforms work.
"""

import torch

from ._linalg import Residual, sigma_inverse_from_factor


def _residual(value, loc, factor, precision, inverse_ok, r=None, z=None):
    r"""The shared intermediates; with ``inverse_ok``, :math:`\alpha` may come from a GEMM with :math:`\Sigma^{-1}`
    (see :attr:`Residual.alpha`)."""
    sigma_inverse = (lambda: sigma_inverse_from_factor(factor, precision)) if inverse_ok else None
    return Residual(value, loc, factor, precision, r=r, z=z, sigma_inverse=sigma_inverse)


def _factor_gradient(res, weights):
    """The closed-form gradient w.r.t. the factor, summed over the samples of each factor member."""
    if res.precision:
        grad = torch.tril((weights * res.z).mT @ res.r).neg()
    else:
        grad = torch.tril((weights * res.alpha).mT @ res.z)
    diag = weights.sum((-2, -1)).unsqueeze(-1) * res.flat_factor.diagonal(dim1=-2, dim2=-1).reciprocal()
    grad = grad + torch.diag_embed(diag if res.precision else diag.neg())
    return res.grouping.unflat_matrix(grad)


class LogProb(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(value, loc, factor, precision, inverse_ok):
        res = Residual(value, loc, factor, precision)
        return res.log_prob, res.r, res.z

    @staticmethod
    def setup_context(ctx, inputs, output):
        value, loc, factor, precision, inverse_ok = inputs
        _, r, z = output
        ctx.precision = precision
        ctx.inverse_ok = inverse_ok
        ctx.mark_non_differentiable(r, z)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(value, loc, factor, r, z)

    @staticmethod
    def backward(ctx, grad, _grad_r, _grad_z):
        if grad is None:
            return None, None, None, None, None
        value, loc, factor, r, z = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True (double backward): rebuild r and z differentiably
            res = _residual(value, loc, factor, ctx.precision, ctx.inverse_ok)
        else:
            res = _residual(value, loc, factor, ctx.precision, ctx.inverse_ok, r=r, z=z)
        g = res.grouping
        weights = g.group(grad.unsqueeze(-1))
        grad_value = grad_loc = grad_factor = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            weighted = g.ungroup(weights * res.alpha)
            if ctx.needs_input_grad[0]:
                grad_value = (-weighted).sum_to_size(value.shape)
            if ctx.needs_input_grad[1]:
                grad_loc = weighted.sum_to_size(loc.shape)
        if ctx.needs_input_grad[2]:
            grad_factor = _factor_gradient(res, weights)
        return grad_value, grad_loc, grad_factor, None, None

    @classmethod
    def apply(cls, *args):
        # Function.apply first binds the arguments to forward's signature with inspect (tens of microseconds a
        # call, which count when log_prob scores a few points in every HMC step); forward's arguments are all
        # positional without defaults, so that binding is the identity, and the eager path goes straight to the
        # C++ apply, as Function.apply itself does after binding. Traced and transformed calls keep Function.apply.
        traced = torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
        if traced or _unwrap_dead_wrappers is None:
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*_unwrap_dead_wrappers(args))


try:
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers
except ImportError:  # another torch layout: keep Function.apply
    _unwrap_dead_wrappers = None


class LogProbWithJvp(LogProb):
    """:class:`LogProb` with forward-mode AD, for ``torch.func.jvp``/``jacfwd``/``hessian``.

    Kept apart because ``torch.compile`` does not trace a ``torch.autograd.Function`` that defines ``jvp``.
    """

    @staticmethod
    def setup_context(ctx, inputs, output):
        LogProb.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:3], *output[1:])

    @staticmethod
    def jvp(ctx, t_value, t_loc, t_factor, _precision, _inverse_ok):
        value, loc, factor, r, z = ctx.saved_tensors
        res = _residual(value, loc, factor, ctx.precision, ctx.inverse_ok, r=r, z=z)
        g = res.grouping
        out = torch.zeros(g.b, g.c, dtype=z.dtype, device=z.device)
        if t_value is not None:
            out = out - (res.alpha * g.group(t_value)).sum(-1)
        if t_loc is not None:
            out = out + (res.alpha * g.group(t_loc)).sum(-1)
        if t_factor is not None:
            t_flat = torch.tril(g.flat_matrix(t_factor))
            trace = (t_flat.diagonal(dim1=-2, dim2=-1) / res.flat_factor.diagonal(dim1=-2, dim2=-1)).sum(-1)
            if ctx.precision:
                out = out - ((res.r @ t_flat.mT) * z).sum(-1) + trace.unsqueeze(-1)
            else:
                out = out + ((z @ t_flat.mT) * res.alpha).sum(-1) - trace.unsqueeze(-1)
        return g.ungroup_scalar(out), None, None


def log_prob(value, loc, factor, precision, inverse_ok=False):
    r"""``log_prob`` with the closed-form backward when a gradient can be asked for, plain otherwise.

    ``inverse_ok``: the factor was itself computed (a Cholesky factor of a covariance), so :math:`\Sigma^{-1}` is as
    accurate as two triangular solves with it, and the backward may use it. A ``scale_tril`` given exactly is
    solved with, which is more accurate in float32 (``benchmarks/accuracy.py``).
    """
    if torch.is_grad_enabled() and (value.requires_grad or loc.requires_grad or factor.requires_grad):
        function = LogProb if torch.compiler.is_compiling() else LogProbWithJvp
        return function.apply(value, loc, factor, precision, inverse_ok)[0]
    return Residual(value, loc, factor, precision).log_prob
