"""Drop-in where real code meets it: Pyro's consumers of its MVN class, conversion from an existing MVN, in-place
edits around ``backward()``, tracing, aliasing of results, unsymmetric matrices, infinities, half precision,
memory of the Fisher information, validation messages, host syncs and ``out=``.

Every number is checked against torch's or Pyro's ``MultivariateNormal`` run through the same code, autograd,
``torch.func`` or a dense float64 formula.
"""

import math
import resource
import time
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import PARAMETRIZATIONS, WRT, matrix_for, random_spd
from pyro.contrib.forecast import Forecaster, ForecastingModel
from pyro.distributions.hmm import GammaGaussianHMM, GaussianHMM, LinearHMM
from pyro.ops.gaussian import mvn_to_gaussian
from timing import peak_bytes  # benchmarks/timing.py: peak memory as the benchmark measures it
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN

D = 3
MATRIX_WRT = PARAMETRIZATIONS


def _vech_size(d):
    return d * (d + 1) // 2


# --------------------------------------------------------------------------------------------------
# 1. Pyro's class and the code that dispatches on it.


def test_is_pyro_multivariate_normal():
    d = JacobianMVN(torch.zeros(D), covariance_matrix=torch.eye(D))
    assert isinstance(d, dist.MultivariateNormal)
    assert isinstance(d, MultivariateNormal)


def _hmm_parts(cls, parametrization, hidden_dim=2, obs_dim=3, duration=5):
    """The arguments of a GaussianHMM, each noise distribution of class ``cls``; the same numbers for any ``cls``
    (the random state is reset first)."""
    torch.manual_seed(3)
    initial = cls(torch.randn(hidden_dim), **{parametrization: matrix_for(parametrization, random_spd((), hidden_dim,
                                                                                                      torch.float32))})
    trans_matrix = 0.5 * torch.randn(duration, hidden_dim, hidden_dim)
    trans = cls(torch.randn(duration, hidden_dim),
                **{parametrization: matrix_for(parametrization, random_spd((duration,), hidden_dim, torch.float32))})
    obs_matrix = torch.randn(hidden_dim, obs_dim)
    obs = cls(torch.randn(obs_dim), **{parametrization: matrix_for(parametrization, random_spd((), obs_dim,
                                                                                                torch.float32))})
    data = torch.randn(duration, obs_dim)
    return (initial, trans_matrix, trans, obs_matrix, obs), data


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_gaussian_hmm_log_prob_matches_pyro(parametrization):
    ours, data = _hmm_parts(JacobianMVN, parametrization)
    theirs, _ = _hmm_parts(dist.MultivariateNormal, parametrization)
    expected = GaussianHMM(*theirs).log_prob(data)
    torch.testing.assert_close(GaussianHMM(*ours).log_prob(data), expected)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_gamma_gaussian_hmm_log_prob_matches_pyro(parametrization):
    scale = dist.Gamma(torch.tensor(2.0), torch.tensor(3.0))
    ours, data = _hmm_parts(JacobianMVN, parametrization)
    theirs, _ = _hmm_parts(dist.MultivariateNormal, parametrization)
    expected = GammaGaussianHMM(scale, *theirs).log_prob(data)
    torch.testing.assert_close(GammaGaussianHMM(scale, *ours).log_prob(data), expected)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_linear_hmm_rsample_matches_pyro(parametrization):
    ours, _ = _hmm_parts(JacobianMVN, parametrization)
    theirs, _ = _hmm_parts(dist.MultivariateNormal, parametrization)
    torch.manual_seed(7)
    expected = LinearHMM(*theirs).rsample((4,))
    torch.manual_seed(7)
    actual = LinearHMM(*ours).rsample((4,))
    assert actual.shape == expected.shape == (4, 5, 3)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_mvn_to_gaussian_matches_pyro(parametrization):
    loc = torch.randn(4, D, dtype=torch.float64)
    m = matrix_for(parametrization, random_spd((4,), D))
    ours = mvn_to_gaussian(JacobianMVN(loc, **{parametrization: m}))
    theirs = mvn_to_gaussian(dist.MultivariateNormal(loc, **{parametrization: m}))
    for name in ("log_normalizer", "info_vec", "precision"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-10, atol=1e-10, msg=name)


class _NoiseModel(ForecastingModel):
    """A bias and a learned correlated noise, its distribution of class ``noise_cls``."""

    def __init__(self, noise_cls):
        super().__init__()
        self.noise_cls = noise_cls

    def model(self, zero_data, covariates):
        obs_dim = zero_data.size(-1)
        bias = pyro.sample("bias", dist.Normal(0.0, 10.0).expand([obs_dim]).to_event(1))
        scale_tril = pyro.param(
            "noise_scale_tril", lambda: torch.eye(obs_dim), constraint=dist.constraints.lower_cholesky
        )
        noise = self.noise_cls(zero_data.new_zeros(obs_dim), scale_tril=scale_tril)
        self.predict(noise, bias.expand(zero_data.shape))


def _fit_forecaster(noise_cls, data, covariates):
    pyro.clear_param_store()
    pyro.set_rng_seed(11)
    forecaster = Forecaster(_NoiseModel(noise_cls), data, covariates, num_steps=4, learning_rate=0.05)
    params = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    return forecaster.losses, params


def test_forecaster_with_jacobian_mvn_noise_matches_pyro():
    torch.manual_seed(5)
    data = torch.randn(12, 2)
    covariates = torch.zeros(12, 0)
    try:
        expected_losses, expected_params = _fit_forecaster(dist.MultivariateNormal, data, covariates)
        losses, params = _fit_forecaster(JacobianMVN, data, covariates)
    finally:
        pyro.clear_param_store()
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    assert params.keys() == expected_params.keys()
    for name in expected_params:
        torch.testing.assert_close(params[name], expected_params[name], msg=name)


# --------------------------------------------------------------------------------------------------
# 2. JacobianMVN.from_distribution


SOURCES = {"torch": MultivariateNormal, "pyro": dist.MultivariateNormal}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_from_distribution_matches_source(source, parametrization, assert_close):
    loc = torch.randn(2, 1, D, dtype=torch.float64, requires_grad=True)
    m = matrix_for(parametrization, random_spd((3,), D)).requires_grad_()
    mvn = SOURCES[source](loc, **{parametrization: m})
    ours = JacobianMVN.from_distribution(mvn)
    assert type(ours) is JacobianMVN
    assert ours.parametrization == parametrization
    assert ours.batch_shape == mvn.batch_shape == (2, 3)
    assert ours.event_shape == mvn.event_shape
    x = torch.randn(4, 2, 3, D, dtype=torch.float64)
    assert_close(ours.log_prob(x), mvn.log_prob(x))
    torch.manual_seed(2)
    expected = mvn.rsample((5,))
    torch.manual_seed(2)
    assert_close(ours.rsample((5,)), expected)
    # Gradients flow to the source's own parameters, through the factor both share (so the source's graph is kept
    # for the second backward, as it would be for two backwards through the source itself).
    expected_grads = torch.autograd.grad(mvn.log_prob(x).sum(), (loc, m), retain_graph=True)
    grads = torch.autograd.grad(ours.log_prob(x).sum(), (loc, m))
    for g, e in zip(grads, expected_grads):
        assert_close(g, e)
    # Per-sample jacobian against torch.func through torch's MVN, w.r.t. the source's matrix.
    loc_d, m_d = loc.detach(), m.detach()[0]
    x1 = x[:, 0, 0]

    def lp(mat, xi):
        # Unvalidated: torch's own checks run under vmap only from torch 2.7 on.
        return MultivariateNormal(loc_d[0, 0], **{parametrization: mat}, validate_args=False).log_prob(xi)

    expected_jac = torch.func.vmap(torch.func.grad(lp), in_dims=(None, 0))(m_d, x1)
    single = JacobianMVN.from_distribution(SOURCES[source](loc_d[0, 0], **{parametrization: m_d}))
    assert_close(single.jacobian(x1, parametrization), expected_jac)


@pytest.mark.parametrize("parametrization", ["covariance_matrix", "scale_tril"])
def test_from_distribution_reuses_the_factor(parametrization):
    mvn = MultivariateNormal(torch.zeros(D, dtype=torch.float64),
                             **{parametrization: matrix_for(parametrization, random_spd((2,), D))})
    source_factor = mvn._unbroadcasted_scale_tril
    ours = JacobianMVN.from_distribution(mvn)
    # No new Cholesky factorization: the factor is the source's tensor, not an equal copy.
    assert ours.scale_tril.data_ptr() == source_factor.data_ptr()


def test_from_distribution_reuses_the_precision_factor():
    p = matrix_for("precision_matrix", random_spd((2,), D))
    mvn = MultivariateNormal(torch.zeros(D, dtype=torch.float64), precision_matrix=p)
    ours = JacobianMVN.from_distribution(mvn)
    assert ours.precision_matrix.data_ptr() == p.data_ptr()
    assert ours.scale_tril.data_ptr() == mvn._unbroadcasted_scale_tril.data_ptr()


@pytest.mark.parametrize("other", [
    torch.distributions.Normal(torch.zeros(D), 1.0),
    torch.distributions.LowRankMultivariateNormal(torch.zeros(D), torch.ones(D, 1), torch.ones(D)),
    dist.Normal(torch.zeros(D), 1.0).to_event(1),
])
def test_from_distribution_rejects_other_distributions(other):
    with pytest.raises((ValueError, TypeError), match=type(other).__name__):
        JacobianMVN.from_distribution(other)


# --------------------------------------------------------------------------------------------------
# 3. In-place changes of value or loc between log_prob and backward.


def _inplace_run(cls, parametrization, change, create_graph):
    """Gradients of ``log_prob(...).sum()`` w.r.t. (value leaf, loc, matrix) after ``change`` modified ``value`` or
    ``loc`` in place; with ``create_graph``, also the gradients of a function of those gradients."""
    torch.manual_seed(4)
    loc = torch.randn(D, dtype=torch.float64, requires_grad=True)
    m = matrix_for(parametrization, random_spd((), D)).requires_grad_()
    x_leaf = torch.randn(4, D, dtype=torch.float64, requires_grad=True)
    x = x_leaf * 1.0  # a buffer derived from a leaf, which may be modified in place
    lp = cls(loc, **{parametrization: m}).log_prob(x).sum()
    if change == "value":
        x.add_(1.0)
    else:  # an optimizer step on loc
        with torch.no_grad():
            loc.add_(0.5)
    inputs = (x_leaf, loc, m)
    grads = torch.autograd.grad(lp, inputs, create_graph=create_graph)
    if not create_graph:
        return grads
    weights = [torch.linspace(0.5, 1.5, g.numel(), dtype=g.dtype).reshape(g.shape) for g in grads]
    second = torch.autograd.grad(sum((w * g).sum() for w, g in zip(weights, grads)), inputs, allow_unused=True)
    return grads + tuple(torch.zeros_like(i) if s is None else s for i, s in zip(inputs, second))


@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "double-backward"])
@pytest.mark.parametrize("change", ["value", "loc"])
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_inplace_change_before_backward_matches_torch(parametrization, change, create_graph, assert_close):
    expected = _inplace_run(MultivariateNormal, parametrization, change, create_graph)
    actual = _inplace_run(JacobianMVN, parametrization, change, create_graph)
    names = ["value", "loc", parametrization] * 2
    for name, a, e in zip(names, actual, expected):
        assert_close(a, e, msg=lambda m, name=name: f"gradient w.r.t. {name}: {m}")


# --------------------------------------------------------------------------------------------------
# 4. torch.jit.trace: no TracerWarning from the library, traced results equal eager ones.


def _build(parametrization, validate_args):
    def build(loc, m):
        return JacobianMVN(loc, **{parametrization: m}, validate_args=validate_args)

    return build


TRACED = {
    "log_prob": lambda d, x: d.log_prob(x),
    "jacobian": lambda d, x: d.jacobian(x, ("value", "loc", d.parametrization))[d.parametrization],
    "log_prob_and_grads": lambda d, x: d.log_prob_and_grads(x)[1]["loc"],
    "entropy": lambda d, x: d.entropy(),
    "rsample": lambda d, x: d.rsample((2,)),
}


@pytest.mark.parametrize("validate_args", [False, True], ids=["unvalidated", "validated"])
@pytest.mark.parametrize("method", TRACED)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_jit_trace_without_library_warnings(parametrization, method, validate_args, assert_close):
    build = _build(parametrization, validate_args)

    def fn(loc, m, x):
        return TRACED[method](build(loc, m), x)

    def args(seed):
        torch.manual_seed(seed)
        return (torch.randn(4, D, dtype=torch.float64), matrix_for(parametrization, random_spd((4,), D)),
                torch.randn(5, 4, D, dtype=torch.float64))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        traced = torch.jit.trace(fn, args(1), check_trace=False)
    ours = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning) and "torch_mvn_ext" in w.filename]
    assert not ours, f"TracerWarning at {sorted({f'{w.filename}:{w.lineno}' for w in ours})}: {ours[0].message}"
    new = args(2)
    torch.manual_seed(9)
    eager = fn(*new)
    torch.manual_seed(9)
    # A trace records Python float constants (log 2 pi) in single precision: torch's MVN traced differs from its
    # eager log_prob by ~1e-7 too.
    assert_close(traced(*new), eager, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# 5. Results of the derivative and information methods do not alias the distribution or the caller's tensors.


def _edit(t):
    """``t.diagonal().add_(1)`` (or ``add_(1)`` for a vector), unless ``t`` is a view that cannot be written, which
    protects it as well."""
    try:
        with torch.no_grad():
            (t.diagonal(dim1=-2, dim2=-1) if t.dim() >= 2 and t.shape[-1] == t.shape[-2] else t).add_(1.0)
    except RuntimeError as e:
        assert "single memory location" in str(e), str(e)


def _results(d, x):
    out = {f"jacobian[{w}]": d.jacobian(x, w) for w in WRT}
    out.update({f"hessian[{w}]": d.hessian(x, w) for w in ("value", "loc")})
    out.update({f"fisher_information[{w}]": d.fisher_information(w) for w in WRT[1:]})
    out["log_prob"] = d.log_prob(x)
    return out


RESULT_METHODS = {
    "jacobian": lambda d, x, grads: d.jacobian(x, d.parametrization),
    "jacobian_value": lambda d, x, grads: d.jacobian(x, "value"),
    "hessian": lambda d, x, grads: d.hessian(x, "value"),
    "fisher_loc": lambda d, x, grads: d.fisher_information("loc"),
    "fisher_matrix": lambda d, x, grads: d.fisher_information(d.parametrization),
    "natural_gradient_loc": lambda d, x, grads: d.natural_gradient({"loc": grads["loc"]})["loc"],
    "natural_gradient_matrix": lambda d, x, grads: d.natural_gradient({"precision_matrix": grads["matrix"]})[
        "precision_matrix"],
    "log_prob_and_grads": lambda d, x, grads: d.log_prob_and_grads(x, ("loc", d.parametrization))[1][
        d.parametrization],
}


@pytest.mark.parametrize("method", RESULT_METHODS)
@pytest.mark.parametrize("x_batch", [(), (6,)], ids=["one-point", "six-points"])
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_editing_a_result_changes_nothing_else(parametrization, x_batch, method, assert_close):
    loc = torch.randn(D, dtype=torch.float64)
    m = matrix_for(parametrization, random_spd((), D))
    x = torch.randn(*x_batch, D, dtype=torch.float64)
    grads = {"loc": torch.randn(D, dtype=torch.float64), "matrix": random_spd((), D)}
    inputs = {"loc": loc, "matrix": m, "x": x, "grad_loc": grads["loc"], "grad_matrix": grads["matrix"]}
    saved = {k: v.clone() for k, v in inputs.items()}
    d = JacobianMVN(loc, **{parametrization: m})
    _edit(RESULT_METHODS[method](d, x, grads))
    for k, v in inputs.items():
        assert torch.equal(v, saved[k]), f"{method} returned a view of the caller's {k}, which the edit changed"
    fresh = JacobianMVN(saved["loc"], **{parametrization: saved["matrix"]})
    expected, actual = _results(fresh, saved["x"]), _results(d, saved["x"])
    for k in expected:
        assert_close(actual[k], expected[k], msg=lambda msg, k=k: f"{k} after editing {method}'s result: {msg}")


# --------------------------------------------------------------------------------------------------
# 6. Unvalidated, unsymmetric matrices: every method reads the triangle log_prob reads.


def _unsymmetric(parametrization):
    """An unsymmetric matrix and the symmetric one that torch's MVN reads from it: ``torch.linalg.cholesky`` reads the
    lower triangle of a covariance; a precision goes through the Cholesky factor of the flipped matrix, which reads
    the upper triangle."""
    sym = matrix_for(parametrization, random_spd((2,), D))
    noise = torch.randn(2, D, D, dtype=torch.float64)
    if parametrization == "covariance_matrix":
        m = sym + noise.triu(1)
        read = m.tril() + m.tril(-1).mT
    else:
        m = sym + noise.tril(-1)
        read = m.triu() + m.triu(1).mT
    assert torch.equal(read, sym)
    return m, sym


SYMMETRIZED_METHODS = {
    "marginal": lambda d, x, g: d.marginal([2, 0]).log_prob(x[..., [2, 0]]),
    "marginal_leading": lambda d, x, g: d.marginal([0, 1]).log_prob(x[..., :2]),
    "condition": lambda d, x, g: d.condition([1], x[..., 1:2]).log_prob(x[..., [0, 2]]),
    "condition_leading": lambda d, x, g: d.condition([0], x[..., :1]).log_prob(x[..., 1:]),
    "hessian": lambda d, x, g: d.hessian(x),
    "natural_gradient_loc": lambda d, x, g: d.natural_gradient({"loc": g[0]})["loc"],
    "natural_gradient_covariance": lambda d, x, g: d.natural_gradient({"covariance_matrix": g[1]})[
        "covariance_matrix"],
    "natural_gradient_precision": lambda d, x, g: d.natural_gradient({"precision_matrix": g[1]})["precision_matrix"],
    "natural_gradient_scale_tril": lambda d, x, g: d.natural_gradient({"scale_tril": g[1]})["scale_tril"],
    **{f"fisher_information_{w}": (lambda d, x, g, w=w: d.fisher_information(w)) for w in WRT[1:]},
    **{f"jacobian_{w}": (lambda d, x, g, w=w: d.jacobian(x, w)) for w in WRT},
    **{f"log_prob_and_grads_{w}": (lambda d, x, g, w=w: d.log_prob_and_grads(x, (w,), reduction="sum")[1][w])
       for w in MATRIX_WRT},
    "scale_tril": lambda d, x, g: d.scale_tril,
    "covariance_matrix": lambda d, x, g: d.covariance_matrix,
    "precision_matrix": lambda d, x, g: d.precision_matrix,
    "variance": lambda d, x, g: d.variance,
    "entropy": lambda d, x, g: d.entropy(),
    "rsample": lambda d, x, g: d.rsample((3,)),
}


@pytest.mark.parametrize("parametrization", ["covariance_matrix", "precision_matrix"])
def test_unsymmetric_log_prob_reads_what_torch_reads(parametrization, assert_close):
    m, sym = _unsymmetric(parametrization)
    loc = torch.randn(D, dtype=torch.float64)
    x = torch.randn(5, 2, D, dtype=torch.float64)
    expected = MultivariateNormal(loc, **{parametrization: m}, validate_args=False).log_prob(x)
    assert_close(MultivariateNormal(loc, **{parametrization: sym}).log_prob(x), expected)
    assert_close(JacobianMVN(loc, **{parametrization: m}, validate_args=False).log_prob(x), expected)


# The given matrix itself is returned as given, as torch's MVN returns it; every derived one is compared.
@pytest.mark.parametrize(("parametrization", "method"), [
    (p, method) for p in ("covariance_matrix", "precision_matrix") for method in SYMMETRIZED_METHODS if method != p
])
def test_unsymmetric_matrix_methods_agree_with_log_prob(parametrization, method, assert_close):
    m, sym = _unsymmetric(parametrization)
    loc = torch.randn(D, dtype=torch.float64)
    x = torch.randn(5, 2, D, dtype=torch.float64)
    g = (torch.randn(D, dtype=torch.float64), torch.randn(D, D, dtype=torch.float64))
    fn = SYMMETRIZED_METHODS[method]
    torch.manual_seed(3)
    actual = fn(JacobianMVN(loc, **{parametrization: m}, validate_args=False), x, g)
    torch.manual_seed(3)
    expected = fn(JacobianMVN(loc, **{parametrization: sym}, validate_args=False), x, g)
    assert_close(actual, expected)


# --------------------------------------------------------------------------------------------------
# 7. Precision parametrization, unvalidated: infinite entries give -inf where torch's MVN does.


@pytest.mark.parametrize("where", ["value", "loc"])
def test_precision_infinite_entry_gives_minus_inf(where):
    loc = torch.randn(D, dtype=torch.float64)
    p = matrix_for("precision_matrix", random_spd((), D))
    checked = []
    for i in range(D):
        for sign in (1.0, -1.0):
            bad = torch.zeros(D, dtype=torch.float64)
            bad[i] = sign * math.inf
            x, mean = (loc + bad, loc) if where == "value" else (loc, loc + bad)
            expected = MultivariateNormal(mean, precision_matrix=p, validate_args=False).log_prob(x)
            if expected.item() != -math.inf:
                continue  # torch gives NaN for this pattern: nothing to match
            actual = JacobianMVN(mean, precision_matrix=p, validate_args=False).log_prob(x)
            assert actual.item() == -math.inf, f"entry {i} = {sign * math.inf}: got {actual.item()}"
            checked.append((i, sign))
    assert checked, "torch gives -inf for no pattern: the test checks nothing"


# --------------------------------------------------------------------------------------------------
# 8. Half precision on CPU: a clear ValueError naming the dtype, or a distribution that works.


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_half_precision_raises_clearly_or_works(parametrization, half):
    loc = torch.randn(2, D)
    m = matrix_for(parametrization, random_spd((2,), D, torch.float32))
    x = torch.randn(4, 2, D)
    try:
        d = JacobianMVN(loc.to(half), **{parametrization: m.to(half)})
    except ValueError as e:
        assert str(half) in str(e) or str(half).removeprefix("torch.") in str(e), str(e)
        return
    reference = MultivariateNormal(loc.to(half).float(), **{parametrization: m.to(half).float()})
    lp = d.log_prob(x.to(half))
    assert lp.shape == (4, 2)
    torch.testing.assert_close(lp.float(), reference.log_prob(x.to(half).float()), rtol=0.05, atol=0.1)


# --------------------------------------------------------------------------------------------------
# 9. Fisher information of a matrix: values, peak memory, and a clear error before an impossible allocation.


def _duplication(d):
    """The duplication matrix: ``vec(S) = D vech(S)`` for symmetric ``S``, vech in ``torch.tril_indices`` order."""
    rows, cols = torch.tril_indices(d, d)
    dup = torch.zeros(d * d, len(rows), dtype=torch.float64)
    for k, (i, j) in enumerate(zip(rows.tolist(), cols.tolist())):
        dup[i * d + j, k] = 1.0
        dup[j * d + i, k] = 1.0
    return dup


def _fisher_reference(wrt, cov):
    r"""Dense float64 Fisher information in vech coordinates: :math:`\frac12 D^\top (M \otimes M) D` for the
    symmetric matrices (:math:`M = P` for the covariance, :math:`\Sigma` for the precision), and for the scale_tril
    the covariance's pulled back through the Jacobian of :math:`\mathrm{vech}(L) \mapsto \mathrm{vech}(L L^\top)`."""
    d = cov.shape[-1]
    prec = torch.linalg.inv(cov)
    dup = _duplication(d)

    def sym(m):
        return 0.5 * dup.mT @ torch.kron(m, m) @ dup

    if wrt == "covariance_matrix":
        return sym(prec)
    if wrt == "precision_matrix":
        return sym(cov)
    rows, cols = torch.tril_indices(d, d)
    L = torch.linalg.cholesky(cov)

    def vech_sigma(v):
        tril = torch.zeros(d, d, dtype=v.dtype).index_put((rows, cols), v)
        s = tril @ tril.mT
        return s[rows, cols]

    jac = torch.func.jacrev(vech_sigma)(L[rows, cols])
    return jac.mT @ sym(prec) @ jac


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("wrt", MATRIX_WRT)
def test_fisher_information_matches_dense_reference(wrt, parametrization, assert_close):
    cov = random_spd((2,), 4)
    d = JacobianMVN(torch.zeros(2, 4, dtype=torch.float64), **{parametrization: matrix_for(parametrization, cov)})
    f = d.fisher_information(wrt)
    assert f.shape == (2, 10, 10)
    for i in range(2):
        assert_close(f[i], _fisher_reference(wrt, cov[i]), rtol=1e-9, atol=1e-9)


# torch 2.11's profiler says, on a second profile in one process, that each profile keeps only its own events.
@pytest.mark.filterwarnings("ignore:Warning. Profiler clears events:UserWarning")
@pytest.mark.parametrize("wrt", MATRIX_WRT)
def test_fisher_information_peak_memory(wrt):
    d = JacobianMVN(torch.zeros(24, dtype=torch.float64), scale_tril=torch.linalg.cholesky(random_spd((), 24)))
    d.fisher_information(wrt)  # warm up: lazy factors and one-off allocations are not counted
    peak, f = peak_bytes(lambda: d.fisher_information(wrt))
    result = f.numel() * f.element_size()
    assert f.shape == (300, 300)
    assert peak <= 1.5 * result, f"peak {peak} bytes is {peak / result:.2f}x the {result}-byte result"


@pytest.mark.parametrize("wrt", MATRIX_WRT)
def test_fisher_information_too_large_raises_before_allocating(wrt):
    n = 1000  # k = 500500: the (k, k) float64 result would take 2 TB
    d = JacobianMVN(torch.zeros(n, dtype=torch.float64), scale_tril=torch.eye(n, dtype=torch.float64))
    _ = d.precision_matrix, d.covariance_matrix  # the (d, d) matrices (8 MB each) are fine; only the (k, k) one is not
    k = _vech_size(n)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"(?i)(memory|bytes|[KMGT]i?B\b|size)") as info:
        with _limited_address_space():
            d.fisher_information(wrt)
    assert time.perf_counter() - start < 5.0
    assert str(k) in str(info.value) or f"{k:,}" in str(info.value), str(info.value)


class _limited_address_space:
    """Caps this process's address space 4 GiB above its current size, so that an allocation that cannot succeed
    fails at once instead of swapping; restored on exit."""

    def __enter__(self):
        with open("/proc/self/status") as f:
            vm_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        self.saved = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm_size + 4 * 2**30, self.saved[1]))

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_AS, self.saved)


# --------------------------------------------------------------------------------------------------
# 10. Validation message for a value with NaN or infinite entries.


def _torch_support_message(value):
    """The key phrases of torch's ``_validate_sample`` message for ``value``."""
    mvn = MultivariateNormal(torch.zeros(D), torch.eye(D))
    with pytest.raises(ValueError) as info:
        mvn.log_prob(torch.full_like(value, math.nan))  # torch's support check catches NaN, not inf
    text = str(info.value)
    assert text.startswith("Expected value argument")
    return text[: text.index("to be within the support") + len("to be within the support")]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_validation_message_keeps_detail_and_torch_wording(bad):
    value = torch.zeros(2, D)
    value[1, 0] = bad
    with pytest.raises(ValueError) as info:
        JacobianMVN(torch.zeros(D), torch.eye(D), validate_args=True).log_prob(value)
    message = str(info.value)
    assert "value contains NaN or infinite entries" in message
    assert _torch_support_message(value) in message
    assert repr(torch.distributions.constraints.real_vector) in message


# --------------------------------------------------------------------------------------------------
# 11. No host synchronization in the hot methods on CUDA.


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_no_host_sync_unvalidated(parametrization):
    loc = torch.randn(4, D, device="cuda")
    m = matrix_for(parametrization, random_spd((4,), D, torch.float32, device="cuda"))
    x = torch.randn(5, 4, D, device="cuda")
    d = JacobianMVN(loc, **{parametrization: m}, validate_args=False)
    d.log_prob(x), d.jacobian(x, WRT), d.log_prob_and_grads(x)  # lazy factors first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        d.log_prob(x)
        d.jacobian(x, WRT)
        d.log_prob_and_grads(x)
        d.log_prob_and_grads(x, reduction="sum")
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------------------------------
# 12. out= for jacobian and log_prob_and_grads.


def _out_case(parametrization):
    loc = torch.randn(4, D, dtype=torch.float64)
    d = JacobianMVN(loc, **{parametrization: matrix_for(parametrization, random_spd((4,), D))})
    return d, torch.randn(5, 4, D, dtype=torch.float64)


@pytest.mark.parametrize("layout", ["full", "vech"])
@pytest.mark.parametrize("wrt", WRT)
def test_jacobian_out_is_written_and_returned(wrt, layout, assert_close):
    d, x = _out_case("covariance_matrix")
    expected = d.jacobian(x, wrt, layout=layout)
    buf = torch.full_like(expected, math.nan)
    result = d.jacobian(x, wrt, layout=layout, out=buf)
    assert result is buf or result.data_ptr() == buf.data_ptr()
    assert_close(buf, expected)


def test_jacobian_out_dict_for_several_wrt(assert_close):
    d, x = _out_case("precision_matrix")
    expected = d.jacobian(x, WRT, layout="vech")
    bufs = {k: torch.full_like(v, math.nan) for k, v in expected.items()}
    result = d.jacobian(x, WRT, layout="vech", out=bufs)
    for k in WRT:
        assert result[k].data_ptr() == bufs[k].data_ptr(), k
        assert_close(bufs[k], expected[k])


def test_log_prob_and_grads_out(assert_close):
    d, x = _out_case("scale_tril")
    lp, expected = d.log_prob_and_grads(x, WRT)
    bufs = {k: torch.full_like(v, math.nan) for k, v in expected.items()}
    lp_out, result = d.log_prob_and_grads(x, WRT, reduction="none", out=bufs)
    assert_close(lp_out, lp)
    for k in WRT:
        assert result[k].data_ptr() == bufs[k].data_ptr(), k
        assert_close(bufs[k], expected[k])


@pytest.mark.parametrize("wrong", ["shape", "dtype"])
@pytest.mark.parametrize("method", ["jacobian", "log_prob_and_grads"])
def test_out_of_wrong_shape_or_dtype_raises(method, wrong):
    d, x = _out_case("covariance_matrix")
    expected_shape = (5, 4, D, D)
    buf = torch.empty(5, 4, D, D + 1, dtype=torch.float64) if wrong == "shape" else torch.empty(expected_shape)
    shape_text = rf"\(5, 4, {D}, {D}\)"
    with pytest.raises(ValueError, match=shape_text):
        if method == "jacobian":
            d.jacobian(x, "covariance_matrix", out=buf)
        else:
            d.log_prob_and_grads(x, ("covariance_matrix",), out={"covariance_matrix": buf})


def _torch_per_sample(loc, cov, x, wrt):
    """Per-sample derivatives of log_prob w.r.t. ``wrt`` by ``torch.func.vmap(grad)`` through torch's MVN (built
    from ``wrt``'s matrix for a matrix ``wrt``), full layout; ``loc``, ``cov`` and ``x`` share one batch shape."""
    name = wrt if wrt in MATRIX_WRT else "covariance_matrix"

    def log_prob(value, mean, matrix):
        return MultivariateNormal(mean, **{name: matrix}, validate_args=False).log_prob(value)

    argnum = {"value": 0, "loc": 1}.get(wrt, 2)
    shape = x.shape[:-1]
    args = (x.reshape(-1, D), loc.expand(shape + (D,)).reshape(-1, D),
            matrix_for(name, cov).expand(shape + (D, D)).reshape(-1, D, D))
    out = torch.func.vmap(torch.func.grad(log_prob, argnums=argnum))(*(a.detach() for a in args))
    return out.reshape(shape + out.shape[1:])


@pytest.mark.parametrize("method", ["jacobian", "log_prob_and_grads"])
@pytest.mark.parametrize("wrt", WRT)
@pytest.mark.parametrize("tracked", ["value", "loc", "covariance_matrix"])
def test_out_is_refused_for_inputs_that_require_grad(tracked, wrt, method, assert_close):
    """out= records no graph, as torch's own out= functions: with grad mode on, an input that requires grad raises a
    ValueError naming it (never torch's raw "functions with out=... don't support automatic differentiation", nor a
    silent copy with a graph); under torch.no_grad() the same call writes torch's per-sample derivatives into out."""
    loc = torch.randn(4, D, dtype=torch.float64).requires_grad_(tracked == "loc")
    cov = random_spd((4,), D).requires_grad_(tracked == "covariance_matrix")
    x = torch.randn(5, 4, D, dtype=torch.float64).requires_grad_(tracked == "value")
    d = JacobianMVN(loc, covariance_matrix=cov)
    buf = torch.full((5, 4, D) if wrt in ("value", "loc") else (5, 4, D, D), math.nan, dtype=torch.float64)

    def call():
        if method == "jacobian":
            return d.jacobian(x, wrt, out=buf)
        return d.log_prob_and_grads(x, (wrt,), out={wrt: buf})[1][wrt]

    with pytest.raises(ValueError, match=rf"out= is for inputs that do not require grad.* but {tracked} requires grad"):
        call()
    assert buf.isnan().all()  # nothing was written
    with torch.no_grad():
        result = call()
    assert result.data_ptr() == buf.data_ptr() and not result.requires_grad
    assert_close(buf, _torch_per_sample(loc, cov.expand(4, D, D), x.expand(5, 4, D), wrt))


# --------------------------------------------------------------------------------------------------------------------
# Per-sample matrix Jacobians of parameters that require grad (an nn.Parameter in a training loop), and under vmap.


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("wrt", MATRIX_WRT)
@pytest.mark.parametrize("layout", ["full", "vech"])
def test_matrix_jacobian_of_parameters_that_require_grad(parametrization, wrt, layout, assert_close):
    """The result equals the one without grad and is differentiable: the gradient of a function of it w.r.t. ``loc``
    and the matrix equals autograd's through per-sample ``torch.func`` Jacobians of torch's MVN."""
    loc = torch.randn(D, dtype=torch.float64, requires_grad=True)
    m = matrix_for(parametrization, random_spd((), D)).requires_grad_()
    x = torch.randn(5, D, dtype=torch.float64)
    ours = JacobianMVN(loc, **{parametrization: m}).jacobian(x, wrt, layout=layout)
    with torch.no_grad():
        plain = JacobianMVN(loc, **{parametrization: m}).jacobian(x, wrt, layout=layout)
    assert_close(ours, plain)

    def reference(loc, m):  # d log p / d wrt per sample, through torch's MVN parametrized by wrt, full layout
        def lp(matrix, xi):
            return MultivariateNormal(loc, **{wrt: matrix}, validate_args=False).log_prob(xi)

        at = getattr(JacobianMVN(loc, **{parametrization: m}, validate_args=False), wrt)
        return torch.func.vmap(torch.func.grad(lp), in_dims=(None, 0))(at, x)

    full = ours if layout == "full" else None
    if full is not None:
        assert_close(full, reference(loc, m).detach())
    weights = torch.randn(ours.shape, dtype=torch.float64)
    grads = torch.autograd.grad((ours * weights).sum(), (loc, m))
    if layout == "full":
        expected = torch.autograd.grad((reference(loc, m) * weights).sum(), (loc, m))
        assert_close(grads[0], expected[0])
        # Gradients w.r.t. the matrix agree on the perturbations it admits: symmetric ones (the two routes split an
        # off-diagonal pair between (i, j) and (j, i) differently) or, for scale_tril, lower-triangular ones.
        if parametrization == "scale_tril":
            assert_close(grads[1].tril(), expected[1].tril())
        else:
            assert_close(grads[1] + grads[1].mT, expected[1] + expected[1].mT)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("wrt", MATRIX_WRT)
@pytest.mark.parametrize("layout", ["full", "vech"])
def test_matrix_jacobian_under_vmap(parametrization, wrt, layout, assert_close):
    m = matrix_for(parametrization, random_spd((), D))
    dist_ = JacobianMVN(torch.randn(D, dtype=torch.float64), **{parametrization: m})
    x = torch.randn(6, D, dtype=torch.float64)
    batched = torch.func.vmap(lambda xi: dist_.jacobian(xi, wrt, layout=layout))(x)
    assert_close(batched, dist_.jacobian(x, wrt, layout=layout))


def test_variance_is_not_a_view_of_the_callers_matrix():
    cov = random_spd((), D)
    original = cov.clone()
    d = JacobianMVN(torch.zeros(D, dtype=torch.float64), covariance_matrix=cov)
    d.variance.mul_(10.0)
    torch.testing.assert_close(cov, original, rtol=0, atol=0)
    # from the factor, as torch's MVN computes it: the diagonal to rounding
    torch.testing.assert_close(d.variance, original.diagonal())


def test_from_distribution_scale_tril_gradient_has_the_users_shape(assert_close):
    """torch keeps a given scale_tril as is: the summed gradient w.r.t. it has its shape and autograd's value."""
    tril = torch.linalg.cholesky(random_spd((), D)).requires_grad_()
    mvn = MultivariateNormal(torch.zeros(2, D, dtype=torch.float64), scale_tril=tril)
    x = torch.randn(4, 2, D, dtype=torch.float64)
    _, grads = JacobianMVN.from_distribution(mvn).log_prob_and_grads(x, ("scale_tril",), reduction="sum")
    (expected,) = torch.autograd.grad(mvn.log_prob(x).sum(), (tril,))
    assert grads["scale_tril"].shape == tril.shape
    assert_close(grads["scale_tril"], expected)
