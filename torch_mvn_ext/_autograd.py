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

from ._linalg import Grouping, Residual


def _factor_gradient(res, weights, alpha, z):
    """The closed-form gradient w.r.t. the factor, summed over the samples of each factor member."""
    wsum = weights.sum((-2, -1)).unsqueeze(-1)
    diag = torch.diag_embed(wsum * res.flat_factor.diagonal(dim1=-2, dim2=-1).reciprocal())
    if res.precision:
        grad = diag - torch.tril((weights * z).mT @ res.r)
    else:
        grad = torch.tril((weights * alpha).mT @ z) - diag
    return res.grouping.unflat_matrix(grad)


class LogProb(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(value, loc, factor, precision):
        res = Residual(value, loc, factor, precision)
        return res.log_prob, res.z, res.alpha

    @staticmethod
    def setup_context(ctx, inputs, output):
        value, loc, factor, precision = inputs
        _, z, alpha = output
        ctx.precision = precision
        ctx.mark_non_differentiable(z, alpha)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(value, loc, factor, z, alpha)
        ctx.save_for_forward(value, loc, factor, z, alpha)

    @staticmethod
    def backward(ctx, grad, _grad_z, _grad_alpha):
        if grad is None:
            return None, None, None, None
        value, loc, factor, z, alpha = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: use the rebuilt, differentiable intermediates.
            res = Residual(value, loc, factor, ctx.precision)
            z, alpha = res.z, res.alpha
        else:
            # The saved z and alpha: no second solve.
            res = Residual(value, loc, factor, ctx.precision, z=z, alpha=alpha)
        g = res.grouping
        weights = g.group(grad.unsqueeze(-1))
        grad_value = grad_loc = grad_factor = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            weighted = g.ungroup(weights * alpha)
            if ctx.needs_input_grad[0]:
                grad_value = (-weighted).sum_to_size(value.shape)
            if ctx.needs_input_grad[1]:
                grad_loc = weighted.sum_to_size(loc.shape)
        if ctx.needs_input_grad[2]:
            grad_factor = _factor_gradient(res, weights, alpha, z)
        return grad_value, grad_loc, grad_factor, None


class LogProbWithJvp(LogProb):
    """:class:`LogProb` with forward-mode AD, for ``torch.func.jvp``/``jacfwd``/``hessian``.

    Kept apart because ``torch.compile`` does not trace a ``torch.autograd.Function`` that defines ``jvp``.
    """

    @staticmethod
    def jvp(ctx, t_value, t_loc, t_factor, _):
        value, loc, factor, z, alpha = ctx.saved_tensors
        shape = torch.broadcast_shapes(value.shape[:-1], loc.shape[:-1])
        g = Grouping(shape, factor.shape[:-2])
        out = torch.zeros(g.b, g.c, dtype=z.dtype, device=z.device)
        if t_value is not None:
            out = out - (alpha * g.group(t_value)).sum(-1)
        if t_loc is not None:
            out = out + (alpha * g.group(t_loc)).sum(-1)
        if t_factor is not None:
            flat = g.flat_matrix(factor)
            t_flat = torch.tril(g.flat_matrix(t_factor))
            trace = (t_flat.diagonal(dim1=-2, dim2=-1) / flat.diagonal(dim1=-2, dim2=-1)).sum(-1)
            if ctx.precision:
                r = g.group(value - loc)
                out = out - ((r @ t_flat.mT) * z).sum(-1) + trace.unsqueeze(-1)
            else:
                out = out + ((z @ t_flat.mT) * alpha).sum(-1) - trace.unsqueeze(-1)
        return g.ungroup(out.unsqueeze(-1)).squeeze(-1), None, None


def log_prob(value, loc, factor, precision):
    """``log_prob`` with the closed-form backward when a gradient can be asked for, plain otherwise."""
    if torch.is_grad_enabled() and (value.requires_grad or loc.requires_grad or factor.requires_grad):
        function = LogProb if torch.compiler.is_compiling() else LogProbWithJvp
        return function.apply(value, loc, factor, precision)[0]
    return Residual(value, loc, factor, precision).log_prob
