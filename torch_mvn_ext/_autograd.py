r"""``log_prob`` as a :class:`torch.autograd.Function` whose backward is the closed form.

With :math:`r = x - \mu`, :math:`z = L^{-1} r`, :math:`\alpha = \Sigma^{-1} r` and upstream weights :math:`g_s`:

.. math::

    \bar x = -g\,\alpha, \qquad \bar\mu = g\,\alpha, \qquad
    \bar L = \operatorname{tril}\Big(\sum_s g_s \alpha_s z_s^\top\Big) - \Big(\sum_s g_s\Big)\operatorname{diag}(1/L_{ii}),

and for a precision factor :math:`T = L^{-1}` (:math:`P = T^\top T`),
:math:`\bar T = -\operatorname{tril}\big(\sum_s g_s z_s r_s^\top\big) + \big(\sum_s g_s\big)\operatorname{diag}(1/T_{ii})`.
For the covariance parametrization the gradient goes to :math:`\Sigma` itself,
:math:`\bar\Sigma = \frac12\big(\sum_s g_s \alpha_s \alpha_s^\top - (\sum_s g_s)\,\Sigma^{-1}\big)` (symmetric, as torch's
autograd through the Cholesky factorization gives it), and skips the backward of the Cholesky factorization.
The sums over samples sharing a factor are one GEMM each (:class:`~torch_mvn_ext._linalg.Grouping`).
The backward is written with differentiable operations, so double backward works; ``jvp`` and the generated
vmap rule make ``torch.func`` transforms work.
"""

import torch

from ._linalg import Residual, sigma_inverse_from_factor


def _residual(value, loc, factor, precision, from_covariance, r=None, z=None):
    r"""The shared intermediates; for the covariance parametrization (``from_covariance``), :math:`\alpha` may come
    from a GEMM with :math:`\Sigma^{-1}` (see :attr:`Residual.alpha`), which the covariance gradient needs too."""
    sigma_inverse = (lambda: sigma_inverse_from_factor(factor, precision)) if from_covariance else None
    return Residual(value, loc, factor, precision, r=r, z=z, sigma_inverse=sigma_inverse)


def _factor_gradient(res, weights, weighted_alpha):
    """The closed-form gradient w.r.t. the factor, summed over the samples of each factor member
    (``weighted_alpha``: ``weights * res.alpha``, used unless the factor is a precision factor)."""
    if res.precision:
        grad = torch.tril((weights * res.z).mT @ res.r).neg()
    else:
        grad = torch.tril(weighted_alpha.mT @ res.z)
    diag = weights.sum((-2, -1)).unsqueeze(-1) * res.flat_factor.diagonal(dim1=-2, dim2=-1).reciprocal()
    grad = grad + torch.diag_embed(diag if res.precision else diag.neg())
    return res.grouping.unflat_matrix(grad)


def _covariance_gradient(res, weights, weighted_alpha):
    r""":math:`\frac12\big(\sum_s g_s \alpha_s \alpha_s^\top - (\sum_s g_s)\Sigma^{-1}\big)` for each factor member,
    symmetrized (the GEMM's two triangles round differently)."""
    outer = weighted_alpha.mT @ res.alpha
    total = weights.sum((-2, -1)).unsqueeze(-1).unsqueeze(-1)
    grad = 0.25 * (outer + outer.mT) - 0.5 * total * res.grouping.flat_matrix(res.sigma_inverse)
    return res.grouping.unflat_matrix(grad)


class LogProb(torch.autograd.Function):
    """``log_prob`` of ``value`` under ``loc`` and the triangular ``factor``.

    ``covariance``: for the covariance parametrization, the matrix ``factor`` was computed from. A first-order
    backward returns its gradient directly and none for ``factor`` (whose dependence on it the formula accounts for),
    which skips the Cholesky backward (measured: forward + backward 1.03-1.1x faster at d = 64, 1.2x at d = 8 with
    one point). A backward that will itself be differentiated (``create_graph=True``, ``torch.func``) returns the
    ``factor`` gradient instead, so that higher derivatives go through torch's Cholesky rules exactly as for torch's
    :class:`~torch.distributions.MultivariateNormal`, whose forward-mode rule also treats tangents that are not
    symmetric its own way. Forward-mode AD always goes through ``factor``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(value, loc, factor, covariance, precision):
        res = Residual(value, loc, factor, precision)
        return res.log_prob, res.r, res.z

    @staticmethod
    def setup_context(ctx, inputs, output):
        value, loc, factor, covariance, precision = inputs
        _, r, z = output
        ctx.precision = precision
        # Whether the covariance is an input, not the tensor itself: the backward needs only the factor, so that,
        # as with torch's MVN, the covariance may change in place (an optimizer step) before the backward runs.
        ctx.from_covariance = covariance is not None
        ctx.mark_non_differentiable(r, z)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(value, loc, factor, r, z)

    @staticmethod
    def backward(ctx, grad, _grad_r, _grad_z):
        if grad is None:
            return None, None, None, None, None
        value, loc, factor, r, z = ctx.saved_tensors
        differentiable = torch.is_grad_enabled()
        if differentiable:  # create_graph=True (double backward): rebuild r and z differentiably
            res = _residual(value, loc, factor, ctx.precision, ctx.from_covariance)
        else:
            res = _residual(value, loc, factor, ctx.precision, ctx.from_covariance, r=r, z=z)
        g = res.grouping
        weights = g.group(grad.unsqueeze(-1))
        grad_value = grad_loc = grad_factor = grad_covariance = None
        needs_matrix = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        weighted_alpha = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or (needs_matrix and not res.precision):
            weighted_alpha = weights * res.alpha
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            weighted = g.ungroup(weighted_alpha)
            if ctx.needs_input_grad[0]:
                grad_value = (-weighted).sum_to_size(value.shape)
            if ctx.needs_input_grad[1]:
                grad_loc = weighted.sum_to_size(loc.shape)
        if ctx.from_covariance and not (differentiable or torch._C._are_functorch_transforms_active()):
            if ctx.needs_input_grad[3]:
                grad_covariance = _covariance_gradient(res, weights, weighted_alpha)
        elif ctx.needs_input_grad[2]:
            # Through the factor and torch's Cholesky backward: a first-order gradient that torch.func and double
            # backward differentiate again exactly as they differentiate torch's MultivariateNormal.
            grad_factor = _factor_gradient(res, weights, weighted_alpha)
        return grad_value, grad_loc, grad_factor, grad_covariance, None

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
    def jvp(ctx, t_value, t_loc, t_factor, _t_covariance, _precision):
        value, loc, factor, r, z = ctx.saved_tensors
        res = _residual(value, loc, factor, ctx.precision, ctx.from_covariance, r=r, z=z)
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


def log_prob(value, loc, factor, precision, covariance=None):
    r"""``log_prob`` with the closed-form backward when a gradient can be asked for, plain otherwise.

    ``covariance``: the covariance matrix ``factor`` is the Cholesky factor of, for the covariance parametrization.
    The backward then returns its gradient directly, and may form :math:`\alpha` with :math:`\Sigma^{-1}`, which is
    as accurate as two triangular solves with a computed factor. A ``scale_tril`` given exactly is solved with, which
    is more accurate in float32 (``benchmarks/accuracy.py``). It receives a gradient only where ``factor`` was
    computed from it with autograd recording, as torch's MVN gives it one (not after a ``torch.no_grad()`` build).
    """
    if covariance is not None and covariance.requires_grad and not factor.requires_grad:
        covariance = covariance.detach()
    if torch.is_grad_enabled() and (value.requires_grad or loc.requires_grad or factor.requires_grad):
        function = LogProb if torch.compiler.is_compiling() else LogProbWithJvp
        return function.apply(value, loc, factor, covariance, precision)[0]
    return Residual(value, loc, factor, precision).log_prob
