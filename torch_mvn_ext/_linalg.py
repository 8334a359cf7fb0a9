r"""Private linear-algebra and shape helpers shared by the distribution, its autograd rule and KL.

Every Gaussian here is held through one lower-triangular factor ``F`` and a flag:

* ``precision=False``: ``F = L`` with :math:`\Sigma = L L^\top` (``covariance_matrix`` and ``scale_tril``
  parametrizations);
* ``precision=True``: ``F = T = L^{-1}`` with :math:`P = T^\top T`, found from a Cholesky factorization of
  the precision with its rows and columns reversed, so that no inverse is ever formed.

In both cases :math:`z = L^{-1} r` is the same whitened residual, so every formula is written once in
terms of ``z`` and :math:`\alpha = \Sigma^{-1} r = L^{-\top} z`.
"""

import functools
import math
import operator
import warnings

import torch

_LOG_2PI = math.log(2 * math.pi)


def quiet_under_jit_trace(method):
    """Runs ``method`` (of a distribution, or a function of distributions) with ``torch.jit.TracerWarning`` silenced
    while ``torch.jit.trace`` records it for a distribution that does not validate its arguments, as Pyro traces
    (``JitTrace_ELBO``, ``HMC``/``NUTS`` with ``jit_compile=True`` turn validation off).

    Under a trace, sizes are tensors, and each Python comparison of them (broadcasting, grouping samples, argument
    shapes) warns that the trace keeps its outcome as a constant. Without validation that is what is meant: those
    branches depend on shapes only, which a trace fixes anyway, as torch's own ``MultivariateNormal`` assumes
    without warning. Validation reads the data, and a trace keeps what it read: then the warnings stay, as they do
    for torch's. (While ``__init__`` runs, ``_validate_args`` is still torch's default.) Methods that read indices
    from data (``marginal``, ``condition``) are not wrapped.
    """

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        if not torch.jit.is_tracing() or args[0]._validate_args:
            return method(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return method(*args, **kwargs)

    return wrapper


def check_device(name, t, device):
    if t.device != device:
        raise ValueError(f"{name} is on device {t.device} but the distribution is on device {device}")


def format_shape(shape):
    return str(tuple(shape))


def broadcast_shapes(*shapes):
    r"""``torch.broadcast_shapes`` (same result, same ``RuntimeError``) without its ~10 µs of Python per call,
    which counts on every ``log_prob`` of a single point."""
    if torch.compiler.is_compiling():
        return torch.broadcast_shapes(*shapes)
    n = max(len(s) for s in shapes)
    out = [1] * n
    for s in shapes:
        for i, k in enumerate(s, n - len(s)):
            if k != 1:
                if out[i] != 1 and out[i] != k:
                    raise RuntimeError(f"Shape mismatch: objects cannot be broadcast to a single shape: {shapes}")
                out[i] = k
    return torch.Size(out)


def all_true(condition):
    """``bool(condition.all())`` for a boolean tensor, also inside ``torch.func`` transforms: under ``vmap`` it holds
    when it holds for every batch member (the batching rule of ``torch._is_all_true``, which torch's own argument
    checks use)."""
    if torch._C._are_functorch_transforms_active():
        return bool(torch._is_all_true(condition))
    return bool(condition) if condition.dim() == 0 else bool(condition.all())


def all_equal(a, b):
    """``torch.equal(a, b)`` for two tensors of one shape (one fused comparison), also inside ``torch.func``
    transforms, which have no batching rule for it."""
    if torch._C._are_functorch_transforms_active():
        return all_true(a == b)
    return torch.equal(a, b)


class NotPositiveDefiniteError(torch.linalg.LinAlgError, ValueError):
    """A matrix argument is not positive definite: a ``ValueError`` naming the argument, as for every bad argument,
    and the ``torch.linalg.LinAlgError`` that torch's ``MultivariateNormal`` raises unvalidated, so code that retries a
    factorization with jitter catches it as before."""


def cholesky(matrix, name):
    r"""Lower Cholesky factor of ``matrix``, with an error that names the argument if it is not positive definite."""
    try:
        return torch.linalg.cholesky(matrix)
    except RuntimeError as e:  # torch.linalg.LinAlgError is a RuntimeError
        if "positive-definite" not in str(e):
            raise
        raise NotPositiveDefiniteError(
            f"{name} is not positive definite (its Cholesky factorization failed: {e}). "
            f"Check that it is symmetric with strictly positive eigenvalues."
        ) from e


def precision_factor(precision_matrix):
    r"""The lower-triangular ``T`` with :math:`P = T^\top T`, so that :math:`T = L^{-1}` for :math:`\Sigma = L L^\top`.

    Reversing rows and columns turns the lower Cholesky factor of the reversed matrix into an upper
    factor of :math:`P` (Ref: fehiepsi, "precision to scale_tril", the trick torch uses), without inverting.
    """
    flipped = cholesky(precision_matrix.flip((-2, -1)), "precision_matrix")
    return flipped.flip((-2, -1)).mT


def half_log_det(factor, precision):
    r""":math:`\frac12 \log\det\Sigma`, shape ``factor.shape[:-2]``.

    :math:`\sum_i \log|F_{ii}|`: an unvalidated ``scale_tril`` with a negative diagonal entry still factors
    :math:`\Sigma = L L^\top` (and ``rsample`` draws from it), so its log-density is finite, not NaN; the
    derivative :math:`1/F_{ii}` of :math:`\log|F_{ii}|` is what the closed-form gradients already use.
    """
    s = factor.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
    return -s if precision else s


def inv_scale_diag(factor, precision):
    r"""The diagonal of :math:`L^{-1}`, i.e. :math:`1 / L_{ii}`."""
    diag = factor.diagonal(dim1=-2, dim2=-1)
    return diag if precision else diag.reciprocal()


def whiten(factor, precision, x):
    r""":math:`z = L^{-1} x` for grouped ``x`` of shape ``(b, c, d)`` and ``factor`` of shape ``(b, d, d)``."""
    if precision:
        return x @ factor.mT
    return _left_solve(factor, x, upper=False)


def unwhiten_t(factor, precision, z):
    r""":math:`L^{-\top} z` (so :math:`\alpha = \Sigma^{-1} r` from :math:`z = L^{-1} r`), grouped."""
    if precision:
        return z @ factor
    return _left_solve(factor.mT, z, upper=True)


def _left_solve(a, x, upper):
    r""":math:`(A^{-1} x^\top)^\top` for row-major ``x`` of shape ``(..., c, d)``: row-major again, except on the
    right-solve route below, whose result is column-major (callers that return it to users make it contiguous).

    ``solve_triangular(A, x^T)`` hands LAPACK ``x^T``, which is column-major when ``x`` is row-major: its one
    copy into the output is a plain memory copy, and the result's transpose is row-major. Measured with torch
    2.13's CPU build (MKL, 1 thread) on an Intel CPU: the right solve ``X A^T = x`` on row-major ``x`` costs a
    transposing copy in and (to return row-major) another out, which made two solves 1.3x (d = 64, c = 1024) to
    2.7x (d = 64, c = 16384) slower than this in float32 and float64 alike. On an AMD EPYC CPU, where MKL takes
    other kernels, the same right solve is instead 1.7-2.3x faster than this in float32 (about even in float64),
    so float32 on such CPUs takes it (``benchmarks/solves.py`` measures both on the machine at hand) up to
    ``d = 128``, where its errors stay within 0.8-1.5x of the left solve's; beyond, they grow with ``d`` (1.5x at
    256, 2.2x at 512, 2.8x at 1024, ``benchmarks/accuracy.py``), so larger factors keep the left solve.
    """
    if (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.shape[-1] <= _RIGHT_SOLVE_MAX_D
        and _RIGHT_SOLVE_IS_FASTER
    ):
        return torch.linalg.solve_triangular(a.mT, x, upper=not upper, left=False)
    return torch.linalg.solve_triangular(a, x.mT, upper=upper).mT


def cpuinfo(field):
    """The first ``field`` of ``/proc/cpuinfo`` (e.g. ``vendor_id``: ``GenuineIntel``, ``AuthenticAMD``; ``model
    name``), or ``""`` where the OS does not tell it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


_RIGHT_SOLVE_MAX_D = 128
# Whether the CPU's BLAS runs row-major float32 triangular solves faster from the right: MKL on AMD CPUs. Read once
# at import, a constant to torch.compile.
_RIGHT_SOLVE_IS_FASTER = torch.backends.mkl.is_available() and cpuinfo("vendor_id") == "AuthenticAMD"


def color(factor, precision, eps):
    r""":math:`L \epsilon` for grouped ``eps`` (turns white noise into a sample offset)."""
    if precision:
        return _left_solve(factor, eps, upper=False)
    return eps @ factor.mT


def scale_tril_from_factor(factor, precision):
    r""":math:`L` itself; for a precision factor :math:`L = T^{-1}`, one triangular solve."""
    if not precision:
        return factor
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    return torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=False)


def sigma_inverse_from_factor(factor, precision):
    r""":math:`\Sigma^{-1}`: :math:`T^\top T` for a precision factor, else ``cholesky_inverse(L)``."""
    if precision:
        return factor.mT @ factor
    # tril: cholesky_inverse reads only the lower triangle but its backward fills the upper one too.
    return torch.cholesky_inverse(factor.tril())


class Grouping:
    r"""Lays out a tensor of shape ``S + (k,)`` as ``(b, c, k)``.

    ``b`` runs over the members of a batch shape ``B`` that broadcasts to ``S`` and ``c`` over the elements of
    ``S`` that share one member. A factor of shape ``B + (d, d)`` reshaped to ``(b, d, d)`` then meets all of its
    samples in one batched BLAS-3 call, and sums over samples become one GEMM per member.
    """

    def __init__(self, shape, batch_shape):
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

    def group(self, x):
        k = x.shape[-1]
        if x.shape[:-1] != self.shape:
            x = x.expand(self.shape + (k,))
        if not self.identity:
            x = x.permute(self.perm + [len(self.shape)])
        return x.reshape(self.b, self.c, k)

    def ungroup(self, x):
        k = x.shape[-1]
        if self.identity:
            return x.reshape(self.shape + (k,))
        return x.reshape(self.permuted_shape + [k]).permute(self.inv_perm + [len(self.shape)])

    def ungroup_scalar(self, x):
        """A grouped ``(b, c)`` tensor (one number per element) back in ``S``."""
        if self.identity:
            return x.reshape(self.shape)
        return x.reshape(self.permuted_shape).permute(self.inv_perm)

    def flat_matrix(self, m):
        """A ``B + (d, d)`` (or broadcastable) matrix as ``(b, d, d)``; an unbatched one stays ``(d, d)``, which
        every batched operation here broadcasts."""
        if m.dim() == 2 and self.b == 1:
            return m
        if m.shape[:-2] != self.batch_shape:
            m = m.expand(self.batch_shape + m.shape[-2:])
        return m.reshape(self.b, *m.shape[-2:])

    def unflat_matrix(self, m):
        return m.reshape(self.batch_shape + m.shape[-2:])


def vech_indices(d, device):
    """Row and column indices of the lower triangle in ``torch.tril_indices`` order."""
    rows, cols = torch.tril_indices(d, d, device=device)
    return rows, cols


def vech(matrix, symmetric):
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


def vech_weights(d, dtype, device):
    """1 on the diagonal, 2 off it, in ``torch.tril_indices`` order."""
    rows, cols = vech_indices(d, device)
    return torch.where(rows == cols, 1.0, 2.0).to(dtype)


def gaussian_log_norm(d, half_log_det_sigma):
    r""":math:`-\frac d2 \log 2\pi - \frac12\log\det\Sigma`."""
    return -0.5 * d * _LOG_2PI - half_log_det_sigma


def entropy_from_half_log_det(d, half_log_det_sigma):
    return 0.5 * d * (1.0 + _LOG_2PI) + half_log_det_sigma


class Residual:
    r"""The intermediates that ``log_prob`` and every derivative share, for one ``value``.

    ``S = broadcast_shapes(value.shape[:-1], loc.shape[:-1])``. The grouped tensors ``r`` and, on first use,
    ``z`` and ``alpha`` have shape ``(b, c, d)`` (see :class:`Grouping`); :meth:`full` gives ``S + (d,)``.
    Built from differentiable operations only, so it also serves double backward.
    """

    def __init__(self, value, loc, factor, precision, r=None, z=None, alpha=None, sigma_inverse=None):
        self.precision = precision
        self.factor = factor
        self.shape = broadcast_shapes(value.shape[:-1], loc.shape[:-1])
        self.grouping = Grouping(self.shape, factor.shape[:-2])
        self.flat_factor = self.grouping.flat_matrix(factor)
        self.r = self.grouping.group(value - loc) if r is None else r
        self._z = z
        self._alpha = alpha
        self._sigma_inverse_fn = sigma_inverse
        self._sigma_inverse = None

    @property
    def z(self):
        r""":math:`z = L^{-1} r`, on first use (the Jacobians w.r.t. ``value`` and ``loc`` need only :math:`\alpha`)."""
        if self._z is None:
            self._z = whiten(self.flat_factor, self.precision, self.r)
        return self._z

    @property
    def alpha(self):
        r""":math:`\alpha = \Sigma^{-1} r`. When ``32 <= d < 128`` and at least ``d`` samples share each factor
        member, one GEMM with :math:`\Sigma^{-1}` (``sigma_inverse()``, a cached ``cholesky_inverse`` that the
        covariance gradient needs anyway) replaces the second triangular solve, as accurately
        (``benchmarks/accuracy.py``). Measured with torch 2.13's CPU build (MKL, 1 thread), GEMM against the
        solve: 2x faster at d = 32, 1.0-1.5x at d = 64, even at d = 128, and 1.1x (float32) to 1.5x (float64)
        slower at d = 256, where the solve's half of the GEMM's flops tells. Below d = 32 one solve costs less
        than the inverse."""
        if self._alpha is None:
            d = self.factor.shape[-1]
            if self._sigma_inverse_fn is not None and not self.precision and 32 <= d < 128 and self.grouping.c >= d:
                self._alpha = self.r @ self.grouping.flat_matrix(self.sigma_inverse)
            else:
                self._alpha = unwhiten_t(self.flat_factor, self.precision, self.z)
        return self._alpha

    @property
    def sigma_inverse(self):
        r""":math:`\Sigma^{-1}` of shape ``factor_batch + (d, d)``, from ``sigma_inverse()``, computed once."""
        if self._sigma_inverse is None:
            self._sigma_inverse = self._sigma_inverse_fn()
        return self._sigma_inverse

    def full(self, x):
        """A grouped ``(b, c, k)`` tensor back in ``S + (k,)``."""
        return self.grouping.ungroup(x)

    @property
    def log_prob(self):
        d = self.factor.shape[-1]
        log_norm = gaussian_log_norm(d, half_log_det(self.flat_factor, self.precision))
        lp = torch.add(log_norm.unsqueeze(-1), torch.linalg.vecdot(self.z, self.z), alpha=-0.5)
        return self.grouping.ungroup_scalar(lp)


# --------------------------------------------------------------------------------------------------
# Information geometry and Gaussian algebra: Fisher information, natural gradients, marginals, conditionals.


def symmetric_fisher_vech(m):
    r"""Fisher information in the vech coordinates of a symmetric matrix parameter, shape ``m.shape[:-2] + (k, k)``.

    For :math:`\Sigma` pass ``m`` :math:`= P`, for :math:`P` pass ``m`` :math:`= \Sigma`: in both cases the score
    w.r.t. the unique element :math:`(i, j)` is :math:`\frac{w_{ij}}2 (\pm u_i u_j - \text{const})` with
    :math:`u \sim N(0, M)` (:math:`u = \alpha` or :math:`u = r`) and :math:`w_{ij}` = 1 on the diagonal, 2 off it,
    so Isserlis' theorem gives

    .. math:: F_{(ij),(kl)} = \frac{w_{ij} w_{kl}}{4} (M_{ik} M_{jl} + M_{il} M_{jk}),

    which is :math:`\frac12 D^\top (M \otimes M) D` with the duplication matrix :math:`D` (Magnus & Neudecker,
    *Matrix Differential Calculus*, ch. 18), gathered entry by entry instead of through the :math:`d^2 \times d^2`
    Kronecker product. ``k = d(d+1)/2``, pairs in ``torch.tril_indices`` order.
    """
    d = m.shape[-1]
    rows, cols = vech_indices(d, m.device)
    i, j, k, l = rows[:, None], cols[:, None], rows[None, :], cols[None, :]
    f = m[..., i, k] * m[..., j, l] + m[..., i, l] * m[..., j, k]
    w = 0.5 * vech_weights(d, m.dtype, m.device)
    return f * (w[:, None] * w[None, :])


def tril_fisher_vech(precision, inv_diag):
    r"""Fisher information in the coordinates of the lower triangle of :math:`L` (:math:`\Sigma = L L^\top`).

    The score w.r.t. :math:`L_{ij}`, :math:`i \ge j`, is :math:`\alpha_i z_j - \delta_{ij} / L_{ii}` with
    :math:`z \sim N(0, I)` and :math:`\alpha = L^{-\top} z`. Isserlis' theorem gives
    :math:`\operatorname{Cov} = P_{ik}\delta_{jl} + (L^{-1})_{li} (L^{-1})_{jk}`, and the second term vanishes unless
    :math:`i = j = k = l` because :math:`L^{-1}` is lower-triangular:

    .. math:: F_{(ij),(kl)} = P_{ik}\,\delta_{jl} + \delta_{ik}\delta_{jl}\delta_{ij} / L_{ii}^2,

    one block :math:`P_{j:, j:}` per column :math:`j`, plus :math:`1 / L_{jj}^2` at the diagonal entries.
    ``inv_diag`` is :math:`1 / L_{ii}`, shape ``B + (d,)``; the result has shape ``B + (k, k)``.
    """
    d = precision.shape[-1]
    rows, cols = vech_indices(d, precision.device)
    f = precision[..., rows[:, None], rows[None, :]] * (cols[:, None] == cols[None, :])
    on_diagonal = inv_diag[..., rows].pow(2) * (rows == cols)
    return f + torch.diag_embed(on_diagonal)


def sigma_matvec(factor, precision, x):
    r""":math:`\Sigma x = L L^\top x` for grouped ``x`` of shape ``(b, c, d)``; two triangular solves for a
    precision factor (:math:`L = T^{-1}`), so :math:`\Sigma` is never formed."""
    if precision:
        y = torch.linalg.solve_triangular(factor.mT, x.mT, upper=True)
        return torch.linalg.solve_triangular(factor, y, upper=False).mT
    return (x @ factor) @ factor.mT


def tril_natural_gradient(scale_tril, grad):
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


def symmetrize(matrix):
    return 0.5 * (matrix + matrix.mT)


def _is_integer_tensor(t, dim):
    """Whether ``t`` is a ``dim``-dimensional tensor of an integer dtype (not bool, which indexes as a mask)."""
    return t.dim() == dim and not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def event_dims(dims, d):
    r"""``dims`` as a list of event indices in ``[0, d)``; negative ones count from the end, as in Python indexing.

    Accepts a list, tuple or range of integers or a 1-d integer tensor; ``ValueError`` for anything else, for an
    index out of range and for repeated indices.
    """
    if isinstance(dims, torch.Tensor):
        if not _is_integer_tensor(dims, 1):
            raise ValueError(
                f"dims must be a sequence of ints; got a tensor of dtype {dims.dtype} and shape "
                f"{format_shape(dims.shape)}"
            )
        dims = dims.tolist()
    if not isinstance(dims, (list, tuple, range)):
        raise ValueError(f"dims must be a sequence (list, tuple or range) of event indices; got {dims!r}")
    out = []
    for i in dims:
        if isinstance(i, bool) or not hasattr(i, "__index__") or (
            isinstance(i, torch.Tensor) and not _is_integer_tensor(i, 0)
        ):
            raise ValueError(f"dims must contain ints; got {i!r} in {list(dims)}")
        i = operator.index(i)
        if not -d <= i < d:
            raise ValueError(f"dims contains {i}, out of range for event size {d} (allowed: {-d} to {d - 1})")
        out.append(i % d)
    repeated = sorted({i for i in out if out.count(i) > 1})
    if repeated:
        raise ValueError(f"dims {list(dims)} repeats the event index(es) {repeated}")
    return out


def sub_block(matrix, rows, cols):
    """``matrix[..., rows, :][..., :, cols]`` for lists of indices, in one gather."""
    r = torch.tensor(rows, dtype=torch.long, device=matrix.device)
    c = torch.tensor(cols, dtype=torch.long, device=matrix.device)
    return matrix[..., r[:, None], c[None, :]]


def check_event_tensor(name, t, event_shape, batch_shape, device, what="the distribution's event shape"):
    """Checks that ``t`` is a tensor on ``device`` (the distribution's) ending in ``event_shape`` (``what``) whose
    batch broadcasts with ``batch_shape``; returns the broadcast batch shape."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_device(name, t, device)
    n = len(event_shape)
    if t.dim() < n or t.shape[t.dim() - n :] != event_shape:
        raise ValueError(
            f"{name} has shape {format_shape(t.shape)} but must end in {format_shape(event_shape)} "
            f"({what})"
        )
    try:
        return torch.broadcast_shapes(t.shape[: t.dim() - n], batch_shape)
    except RuntimeError:
        raise ValueError(
            f"{name} has shape {format_shape(t.shape)}, whose batch shape {format_shape(t.shape[: t.dim() - n])} "
            f"does not broadcast with the distribution's batch_shape {format_shape(batch_shape)}"
        ) from None
