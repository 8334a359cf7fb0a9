"""JacobianLowRankMVN against torch's LowRankMultivariateNormal, the reference for every number it shares with it.

The closed-form derivatives are checked against per-sample ``torch.func.vmap(grad)`` and per-sample
``torch.autograd.grad`` loops through torch's class, against the dense formulas of the contract, and against
``torch.autograd.grad`` of the summed log-density; ``log_prob`` against ``gradcheck``/``gradgradcheck`` and
``torch.func`` through torch's class; the memory of the derivatives against the size of a d x d matrix.
"""

import inspect
import itertools
import math

import pyro.distributions as pyro_dist
import pytest
import torch
from helpers import LOWRANK_GRID, LOWRANK_IDS, LOWRANK_WRT, TOLERANCES, lowrank_params
from timing import peak_bytes  # benchmarks/timing.py: peak memory as the benchmark measures it
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal, Normal
from torch.func import grad, hessian, jacfwd, jacrev, vmap

import torch_mvn_ext
from torch_mvn_ext import JacobianLowRankMVN

D = 4
RANK = 2
ARGNUM = {name: i for i, name in enumerate(LOWRANK_WRT)}  # positions in log_prob(x, loc, cov_factor, cov_diag)
ATTRIBUTES = (
    "loc",
    "cov_factor",
    "cov_diag",
    "covariance_matrix",
    "precision_matrix",
    "scale_tril",
    "mean",
    "mode",
    "variance",
    "stddev",
)


def grid_case(shapes, d=D, rank=RANK, dtype=torch.float64):
    """``(params, x, ours, torch's)`` for one entry of the grid; ``params`` is ``(loc, cov_factor, cov_diag)``."""
    loc, factor, diag, x = lowrank_params(shapes, d, rank, dtype)
    return (loc, factor, diag), x, JacobianLowRankMVN(loc, factor, diag), LowRankMultivariateNormal(loc, factor, diag)


def result_shape(name, sample_shape, d, rank):
    return sample_shape + ((d, rank) if name == "cov_factor" else (d,))


def _torch_log_prob(x, loc, factor, diag):
    # Unvalidated: torch's own checks do not run under vmap on every supported torch.
    return LowRankMultivariateNormal(loc, factor, diag, validate_args=False).log_prob(x)


def per_sample_reference(params, x, wrt):
    """d log p(x[s]) / d (the parameter of member s), by ``vmap(grad)`` through torch's class: every tensor expanded
    to the broadcast shape ``S``, flattened, and each sample given its own copy of every parameter."""
    loc, factor, diag = params
    S = torch.broadcast_shapes(x.shape[:-1], loc.shape[:-1], factor.shape[:-2], diag.shape[:-1])
    d, rank = factor.shape[-2:]
    args = [
        t.detach().expand(S + t.shape[-n:]).reshape((-1,) + t.shape[-n:])
        for t, n in zip((x, loc, factor, diag), (1, 1, 2, 1))
    ]
    out = vmap(grad(_torch_log_prob, argnums=ARGNUM[wrt]))(*args)
    return out.reshape(result_shape(wrt, S, d, rank))


def dense_formula(params, x, wrt):
    """The contract's formulas with a dense covariance: -alpha, alpha, alpha (alpha^T W) - Sigma^{-1} W and
    (alpha^2 - diag(Sigma^{-1})) / 2, alpha = Sigma^{-1} (x - loc)."""
    loc, factor, diag = params
    sigma = factor @ factor.mT + torch.diag_embed(diag)
    precision = torch.linalg.inv(sigma)
    alpha = (precision @ (x - loc).unsqueeze(-1)).squeeze(-1)
    if wrt == "value":
        return -alpha
    if wrt == "loc":
        return alpha
    if wrt == "cov_factor":
        return alpha.unsqueeze(-1) * (alpha.unsqueeze(-2) @ factor) - precision @ factor
    return 0.5 * (alpha**2 - precision.diagonal(dim1=-2, dim2=-1))


# --------------------------------------------------------------------------------------------------
# 1. The package, the class and the signatures of the contract.


def test_exported():
    assert "JacobianLowRankMVN" in torch_mvn_ext.__all__ and "AutoJacobianLowRankMVN" in torch_mvn_ext.__all__
    assert JacobianLowRankMVN.__module__ == "torch_mvn_ext.jacobian_lowrank_mvn"
    assert issubclass(JacobianLowRankMVN, pyro_dist.LowRankMultivariateNormal)


def test_signatures():
    def described(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    P, K, empty = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.empty
    assert described(JacobianLowRankMVN.__init__) == [
        ("self", P, empty),
        ("loc", P, empty),
        ("cov_factor", P, empty),
        ("cov_diag", P, empty),
        ("validate_args", P, None),
    ]
    assert described(JacobianLowRankMVN.jacobian) == [
        ("self", P, empty),
        ("value", P, empty),
        ("wrt", P, "value"),
        ("out", K, None),
    ]
    assert described(JacobianLowRankMVN.log_prob_and_grads) == [
        ("self", P, empty),
        ("value", P, empty),
        ("wrt", P, None),
        ("reduction", K, "none"),
        ("out", K, None),
    ]
    assert isinstance(inspect.getattr_static(JacobianLowRankMVN, "from_distribution"), classmethod)


# --------------------------------------------------------------------------------------------------
# 2. Drop-in: every attribute and method gives torch's numbers, with torch's broadcasting.


@pytest.mark.parametrize("shapes", LOWRANK_GRID, ids=LOWRANK_IDS)
def test_attributes_and_methods_match_torch(shapes, assert_close):
    _, x, ours, ref = grid_case(shapes)
    assert type(ours) is JacobianLowRankMVN
    assert isinstance(ours, LowRankMultivariateNormal) and isinstance(ours, pyro_dist.LowRankMultivariateNormal)
    assert ours.batch_shape == ref.batch_shape and ours.event_shape == ref.event_shape == (D,)
    for name in ATTRIBUTES:
        a, e = getattr(ours, name), getattr(ref, name)
        assert a.shape == e.shape, name
        assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}")
    assert_close(ours.log_prob(x), ref.log_prob(x))
    assert_close(ours.entropy(), ref.entropy())
    assert_close(ours.perplexity(), ref.perplexity())
    assert ours.arg_constraints.keys() == ref.arg_constraints.keys()
    assert ours.support is ref.support and ours.has_rsample
    for method in ("rsample", "sample"):
        torch.manual_seed(5)
        expected = getattr(ref, method)((3, 2))
        torch.manual_seed(5)
        actual = getattr(ours, method)((3, 2))
        assert actual.shape == expected.shape == (3, 2) + ours.batch_shape + (D,)
        assert_close(actual, expected)


@pytest.mark.parametrize("shapes", LOWRANK_GRID[2::2], ids=LOWRANK_IDS[2::2])
def test_expand_keeps_the_class_and_the_numbers(shapes, assert_close):
    _, _, ours, ref = grid_case(shapes)
    batch_shape = (5,) + ours.batch_shape
    x = torch.randn((2,) + batch_shape + (D,), dtype=torch.float64)
    expanded, expected = ours.expand(batch_shape), ref.expand(batch_shape)
    assert type(expanded) is JacobianLowRankMVN and expanded.batch_shape == batch_shape
    for name in ATTRIBUTES:
        assert_close(getattr(expanded, name), getattr(expected, name))
    assert_close(expanded.log_prob(x), expected.log_prob(x))
    assert_close(expanded.entropy(), expected.entropy())
    torch.manual_seed(1)
    e = expected.rsample((2,))
    torch.manual_seed(1)
    assert_close(expanded.rsample((2,)), e)
    # The derivatives of an expanded member are those of the member it repeats.
    for wrt in LOWRANK_WRT:
        assert_close(expanded.jacobian(x, wrt), ours.jacobian(x, wrt))
    # Pyro's expand_by goes through expand.
    assert type(ours.expand_by((3,))) is JacobianLowRankMVN


@pytest.mark.parametrize("rank", [1, D + 2], ids=["rank1", "rank-above-d"])
def test_any_rank_matches_torch(rank, assert_close):
    params, x, ours, ref = grid_case(((3,), (), (3,), (5, 3)), rank=rank)
    assert_close(ours.log_prob(x), ref.log_prob(x))
    assert_close(ours.entropy(), ref.entropy())
    assert_close(ours.scale_tril, ref.scale_tril)
    for wrt in LOWRANK_WRT:
        jac = ours.jacobian(x, wrt)
        assert jac.shape == result_shape(wrt, (5, 3), D, rank)
        assert_close(jac, per_sample_reference(params, x, wrt))


def test_validation_of_the_value_matches_torch():
    loc, factor, diag = torch.zeros(D), torch.ones(D, 1), torch.ones(D)
    bad = torch.zeros(2, D)
    bad[1, 2] = math.nan
    with pytest.raises(ValueError):
        LowRankMultivariateNormal(loc, factor, diag, validate_args=True).log_prob(bad)
    with pytest.raises(ValueError):
        JacobianLowRankMVN(loc, factor, diag, validate_args=True).log_prob(bad)
    with pytest.raises(ValueError):
        JacobianLowRankMVN(loc, factor, diag, validate_args=True).jacobian(bad, "cov_factor")


def test_pyro_sample_site_gives_pyros_numbers(assert_close):
    """A sample site with the class in a plate: the trace's log-density equals the one with Pyro's class."""
    import pyro

    loc, factor, diag = (
        torch.randn(D, dtype=torch.float64),
        torch.randn(D, RANK, dtype=torch.float64),
        torch.rand(D, dtype=torch.float64) + 0.5,
    )
    data = torch.randn(6, D, dtype=torch.float64)

    def model(cls):
        with pyro.plate("data", 6):
            pyro.sample("x", cls(loc, factor, diag), obs=data)

    totals = [
        pyro.poutine.trace(model).get_trace(cls).log_prob_sum()
        for cls in (JacobianLowRankMVN, pyro_dist.LowRankMultivariateNormal)
    ]
    assert_close(totals[0], totals[1])


# --------------------------------------------------------------------------------------------------
# 3. jacobian: per-sample derivatives against torch.func, a per-sample autograd loop and the dense formulas.


@pytest.mark.parametrize("shapes", LOWRANK_GRID, ids=LOWRANK_IDS)
@pytest.mark.parametrize("wrt", LOWRANK_WRT)
def test_jacobian_matches_vmap_grad_through_torch(wrt, shapes, assert_close):
    params, x, ours, ref = grid_case(shapes)
    jac = ours.jacobian(x, wrt)
    S = ref.log_prob(x).shape
    assert jac.shape == result_shape(wrt, S, D, RANK)
    assert_close(jac, per_sample_reference(params, x, wrt))


@pytest.mark.parametrize("wrt", LOWRANK_WRT)
def test_jacobian_matches_an_autograd_loop_and_the_dense_formula(wrt, assert_close):
    """A python loop of ``torch.autograd.grad`` per sample, each through torch's class built from its own batch
    member's parameters (fresh leaves), and the contract's dense formula."""
    params, x, ours, _ = grid_case(((2, 1), (3,), (1,), (2, 2, 3)))
    jac = ours.jacobian(x, wrt)
    S = jac.shape[:3]
    assert S == (2, 2, 3)
    expanded = [t.expand(S + t.shape[-n:]) for t, n in zip((x, *params), (1, 1, 2, 1))]
    for s in itertools.product(*map(range, S)):
        leaves = [t[s].clone().requires_grad_() for t in expanded]
        lp = LowRankMultivariateNormal(*leaves[1:]).log_prob(leaves[0])
        (expected,) = torch.autograd.grad(lp, leaves[ARGNUM[wrt]])
        assert_close(jac[s], expected, msg=lambda m, s=s: f"sample {s}: {m}")
    assert_close(jac, dense_formula([t.expand(S + t.shape[-n:]) for t, n in zip(params, (1, 2, 1))], x, wrt))


@pytest.mark.parametrize("container", [tuple, list])
def test_several_wrt_give_a_dict(container, assert_close):
    _, x, ours, _ = grid_case(LOWRANK_GRID[6])
    names = container(reversed(LOWRANK_WRT))
    result = ours.jacobian(x, names)
    assert isinstance(result, dict) and list(result) == list(names)
    for name in names:
        assert_close(result[name], ours.jacobian(x, name))
    assert list(ours.jacobian(x, ("cov_diag",))) == ["cov_diag"]


@pytest.mark.parametrize("wrt", LOWRANK_WRT)
def test_jacobian_of_parameters_that_require_grad_is_differentiable(wrt, assert_close):
    """With parameters that require grad (an nn.Parameter in a training loop) the result is the same, and the
    gradient of a function of it equals autograd's through per-sample gradients of torch's class (each sample
    given its own copy of every parameter, so that one backward pass gives all the per-sample gradients)."""
    params, x, _, _ = grid_case(LOWRANK_GRID[6])
    leaves = [t.clone().requires_grad_() for t in params]
    jac = JacobianLowRankMVN(*leaves).jacobian(x, wrt)
    with torch.no_grad():
        plain = JacobianLowRankMVN(*params).jacobian(x, wrt)
    assert_close(jac, plain)
    assert jac.requires_grad
    S = torch.broadcast_shapes(x.shape[:-1], *(t.shape[: t.dim() - n] for t, n in zip(params, (1, 2, 1))))
    copies = [t.expand(S + t.shape[-n:]).clone() for t, n in zip([x, *leaves], (1, 1, 2, 1))]
    if wrt == "value":
        copies[0].requires_grad_()
    lp = LowRankMultivariateNormal(*copies[1:]).log_prob(copies[0]).sum()
    (expected,) = torch.autograd.grad(lp, copies[ARGNUM[wrt]], create_graph=True)
    assert_close(jac, expected)
    weights = torch.randn(jac.shape, dtype=torch.float64)
    for a, e in zip(
        torch.autograd.grad((jac * weights).sum(), leaves), torch.autograd.grad((expected * weights).sum(), leaves)
    ):
        assert_close(a, e)


def test_jacobian_under_vmap(assert_close):
    """vmap over the points, and over a batch of factors (each built into its own distribution inside vmap)."""
    (loc, factor, diag), x, ours, _ = grid_case(((), (), (), (6,)))
    for wrt in LOWRANK_WRT:
        assert_close(vmap(lambda xi, wrt=wrt: ours.jacobian(xi, wrt))(x), ours.jacobian(x, wrt))
    factors = torch.stack([factor * s for s in (0.5, 1.0, 2.0)])
    for wrt in LOWRANK_WRT:
        batched = vmap(lambda w, wrt=wrt: JacobianLowRankMVN(loc, w, diag, validate_args=False).jacobian(x, wrt))
        assert_close(
            batched(factors), torch.stack([JacobianLowRankMVN(loc, w, diag).jacobian(x, wrt) for w in factors])
        )


# --------------------------------------------------------------------------------------------------
# 4. log_prob_and_grads.


@pytest.mark.parametrize("shapes", LOWRANK_GRID, ids=LOWRANK_IDS)
def test_log_prob_and_grads_none_is_jacobian(shapes, assert_close):
    _, x, ours, ref = grid_case(shapes)
    lp, grads = ours.log_prob_and_grads(x)
    assert_close(lp, ref.log_prob(x))
    assert list(grads) == list(LOWRANK_WRT)
    for name in LOWRANK_WRT:
        assert_close(grads[name], ours.jacobian(x, name))
    assert not lp.requires_grad and not any(g.requires_grad for g in grads.values())  # no graph recorded
    _, some = ours.log_prob_and_grads(x, ("cov_diag", "value"), reduction="none")
    assert list(some) == ["cov_diag", "value"]


@pytest.mark.parametrize("shapes", LOWRANK_GRID, ids=LOWRANK_IDS)
def test_log_prob_and_grads_sum_matches_autograd_in_the_shapes_passed(shapes, assert_close):
    params, x, ours, ref = grid_case(shapes)
    leaves = [t.clone().requires_grad_() for t in (x, *params)]
    expected = torch.autograd.grad(LowRankMultivariateNormal(*leaves[1:]).log_prob(leaves[0]).sum(), leaves)
    lp, grads = ours.log_prob_and_grads(x, reduction="sum")
    assert_close(lp, ref.log_prob(x))
    assert list(grads) == list(LOWRANK_WRT)
    for name, tensor, e in zip(LOWRANK_WRT, (x, *params), expected):
        assert grads[name].shape == tensor.shape, name
        assert_close(grads[name], e, msg=lambda m, name=name: f"{name}: {m}")
        assert not grads[name].requires_grad


def test_log_prob_and_grads_of_inputs_that_require_grad_are_differentiable(assert_close):
    """Second order: the gradient of a function of the summed gradients equals autograd's double backward
    through torch's class."""
    params, x, _, _ = grid_case(LOWRANK_GRID[6])
    leaves = [t.clone().requires_grad_() for t in (x, *params)]
    lp, grads = JacobianLowRankMVN(*leaves[1:]).log_prob_and_grads(leaves[0], reduction="sum")
    expected = torch.autograd.grad(
        LowRankMultivariateNormal(*leaves[1:]).log_prob(leaves[0]).sum(), leaves, create_graph=True
    )
    weights = [torch.linspace(0.5, 1.5, g.numel(), dtype=g.dtype).reshape(g.shape) for g in expected]
    second = torch.autograd.grad(sum((w * grads[n]).sum() for w, n in zip(weights, LOWRANK_WRT)) + lp.sum(), leaves)
    second_expected = torch.autograd.grad(
        sum((w * g).sum() for w, g in zip(weights, expected))
        + LowRankMultivariateNormal(*leaves[1:]).log_prob(leaves[0]).sum(),
        leaves,
    )
    for a, e in zip(second, second_expected):
        assert_close(a, e)


# --------------------------------------------------------------------------------------------------
# 5. out=, as for JacobianMVN: written in place and returned, a dict for several wrt, a ValueError naming the
# expected shape otherwise, and no graph recorded.


def _out_case():
    _, x, ours, _ = grid_case(((4,), (), (4,), (5, 4)))
    return ours, x


@pytest.mark.parametrize("wrt", LOWRANK_WRT)
def test_jacobian_out_is_written_and_returned(wrt, assert_close):
    ours, x = _out_case()
    expected = ours.jacobian(x, wrt)
    buf = torch.full_like(expected, math.nan)
    result = ours.jacobian(x, wrt, out=buf)
    assert result.data_ptr() == buf.data_ptr()
    assert_close(buf, expected)


def test_jacobian_out_dict_for_several_wrt(assert_close):
    ours, x = _out_case()
    expected = ours.jacobian(x, LOWRANK_WRT)
    bufs = {k: torch.full_like(v, math.nan) for k, v in expected.items()}
    result = ours.jacobian(x, LOWRANK_WRT, out=bufs)
    for k in LOWRANK_WRT:
        assert result[k].data_ptr() == bufs[k].data_ptr(), k
        assert_close(bufs[k], expected[k])


def test_log_prob_and_grads_out(assert_close):
    ours, x = _out_case()
    lp, expected = ours.log_prob_and_grads(x)
    bufs = {k: torch.full_like(v, math.nan) for k, v in expected.items()}
    lp_out, result = ours.log_prob_and_grads(x, reduction="none", out=bufs)
    assert_close(lp_out, lp)
    for k in LOWRANK_WRT:
        assert result[k].data_ptr() == bufs[k].data_ptr(), k
        assert_close(bufs[k], expected[k])


@pytest.mark.parametrize("wrong", ["shape", "dtype"])
@pytest.mark.parametrize("method", ["jacobian", "log_prob_and_grads"])
def test_out_of_wrong_shape_or_dtype_raises(method, wrong):
    ours, x = _out_case()
    expected_shape = (5, 4, D, RANK)
    buf = torch.empty(5, 4, D, RANK + 1, dtype=torch.float64) if wrong == "shape" else torch.empty(expected_shape)
    with pytest.raises(ValueError, match=rf"\(5, 4, {D}, {RANK}\)"):
        if method == "jacobian":
            ours.jacobian(x, "cov_factor", out=buf)
        else:
            ours.log_prob_and_grads(x, ("cov_factor",), out={"cov_factor": buf})


@pytest.mark.parametrize("tracked", LOWRANK_WRT)
def test_out_is_refused_for_inputs_that_require_grad(tracked, assert_close):
    """As JacobianMVN's out=: with grad mode on, an input that requires grad raises a ValueError naming it and
    nothing is written; under torch.no_grad() the same call fills the buffer with torch's per-sample derivatives."""
    params, x, _, _ = grid_case(((4,), (), (4,), (5, 4)))
    tensors = [t.clone().requires_grad_(name == tracked) for name, t in zip(LOWRANK_WRT, (x, *params))]
    ours = JacobianLowRankMVN(*tensors[1:])
    buf = torch.full((5, 4, D, RANK), math.nan, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"(?s)requires grad.*{tracked}|{tracked}.*requires grad"):
        ours.jacobian(tensors[0], "cov_factor", out=buf)
    assert buf.isnan().all()
    with torch.no_grad():
        result = ours.jacobian(tensors[0], "cov_factor", out=buf)
    assert result.data_ptr() == buf.data_ptr() and not result.requires_grad
    assert_close(buf, per_sample_reference(params, x, "cov_factor"))


# --------------------------------------------------------------------------------------------------
# 6. Autograd through log_prob: torch's gradients, gradcheck, gradgradcheck and torch.func.


@pytest.mark.parametrize("shapes", LOWRANK_GRID, ids=LOWRANK_IDS)
def test_backward_matches_torch(shapes, assert_close):
    params, x, _, _ = grid_case(shapes)
    leaves = [t.clone().requires_grad_() for t in (x, *params)]
    results = []
    for cls in (JacobianLowRankMVN, LowRankMultivariateNormal):
        lp = cls(*leaves[1:]).log_prob(leaves[0])
        weights = torch.linspace(-1.0, 2.0, lp.numel(), dtype=lp.dtype).reshape(lp.shape)
        results.append(torch.autograd.grad((lp * weights).sum(), leaves))
    for name, a, e in zip(LOWRANK_WRT, *results):
        assert a.shape == e.shape
        assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}")


def test_second_order_matches_torch(assert_close):
    params, x, _, _ = grid_case(LOWRANK_GRID[8])
    leaves = [t.clone().requires_grad_() for t in (x, *params)]
    results = []
    for cls in (JacobianLowRankMVN, LowRankMultivariateNormal):
        g = torch.autograd.grad(cls(*leaves[1:]).log_prob(leaves[0]).sum(), leaves, create_graph=True)
        v = sum((gi * torch.ones_like(gi).cumsum(-1)).sum() for gi in g)
        results.append(torch.autograd.grad(v, leaves))
    for a, e in zip(*results):
        assert_close(a, e)


def test_gradcheck_and_gradgradcheck():
    params, x, _, _ = grid_case(((2, 1), (3,), (1,), (2, 1, 3)), d=3)
    inputs = [t.clone().requires_grad_() for t in (x, *params)]

    def f(x, loc, factor, diag):
        return JacobianLowRankMVN(loc, factor, diag).log_prob(x)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def _ours_log_prob(x, loc, factor, diag):
    return JacobianLowRankMVN(loc, factor, diag, validate_args=False).log_prob(x)


TRANSFORMS = {
    "grad": lambda f: grad(f, argnums=(0, 1, 2, 3)),
    "jacrev": lambda f: jacrev(f, argnums=(0, 1, 2, 3)),
    "jacfwd": lambda f: jacfwd(f, argnums=(0, 1, 2, 3)),
    "hessian_value": lambda f: hessian(f, argnums=0),
    "hessian_cov_factor": lambda f: hessian(f, argnums=2),
    "hessian_cov_diag": lambda f: hessian(f, argnums=3),
    "vmap_value": lambda f: vmap(f, in_dims=(0, None, None, None)),
    "vmap_cov_factor": lambda f: vmap(f, in_dims=(None, None, 0, None)),
    "vmap_grad_value": lambda f: vmap(grad(f, argnums=(1, 2, 3)), in_dims=(0, None, None, None)),
    "vmap_grad_cov_diag": lambda f: vmap(grad(f, argnums=(0, 2)), in_dims=(None, None, None, 0)),
}


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_torch_func_transforms_match_torch(transform, assert_close):
    (loc, factor, diag), x, _, _ = grid_case(((), (), (), ()))
    batched = {"vmap_value": 0, "vmap_grad_value": 0, "vmap_cov_factor": 2, "vmap_grad_cov_diag": 3}
    args = [x, loc, factor, diag]
    if transform in batched:
        i = batched[transform]
        args[i] = torch.stack([args[i] * s for s in (0.8, 1.0, 1.3)])
    ours = TRANSFORMS[transform](_ours_log_prob)(*args)
    expected = TRANSFORMS[transform](_torch_log_prob)(*args)
    ours, expected = torch.utils._pytree.tree_leaves(ours), torch.utils._pytree.tree_leaves(expected)
    assert len(ours) == len(expected)
    for a, e in zip(ours, expected):
        assert a.shape == e.shape
        assert_close(a, e)


# --------------------------------------------------------------------------------------------------
# 7. from_distribution.


SOURCES = {"torch": LowRankMultivariateNormal, "pyro": pyro_dist.LowRankMultivariateNormal}


@pytest.mark.parametrize("expanded", [False, True], ids=["as-built", "expanded"])
@pytest.mark.parametrize("source", SOURCES)
def test_from_distribution_matches_source(source, expanded, assert_close):
    params, x, _, _ = grid_case(((2, 1), (3,), (), (4, 2, 3)))
    leaves = [t.clone().requires_grad_() for t in params]
    src = SOURCES[source](*leaves)
    if expanded:
        src = src.expand((5, 2, 3))
        x = x.unsqueeze(1).expand(4, 5, 2, 3, D)
    ours = JacobianLowRankMVN.from_distribution(src)
    assert type(ours) is JacobianLowRankMVN
    assert ours.batch_shape == src.batch_shape and ours.event_shape == src.event_shape
    for name in ATTRIBUTES:
        assert_close(getattr(ours, name), getattr(src, name))
    assert_close(ours.log_prob(x), src.log_prob(x))
    assert_close(ours.entropy(), src.entropy())
    torch.manual_seed(2)
    expected = src.rsample((3,))
    torch.manual_seed(2)
    assert_close(ours.rsample((3,)), expected)
    # Gradients reach the source's own parameters.
    expected_grads = torch.autograd.grad(src.log_prob(x).sum(), leaves, retain_graph=True)
    for a, e in zip(torch.autograd.grad(ours.log_prob(x).sum(), leaves), expected_grads):
        assert_close(a, e)
    for wrt in LOWRANK_WRT:
        assert_close(ours.jacobian(x, wrt).detach(), per_sample_reference(params, x, wrt))


@pytest.mark.parametrize(
    "other",
    [
        MultivariateNormal(torch.zeros(D), torch.eye(D)),
        Normal(torch.zeros(D), 1.0),
        pyro_dist.Normal(torch.zeros(D), 1.0).to_event(1),
    ],
    ids=["MultivariateNormal", "Normal", "Independent"],
)
def test_from_distribution_rejects_other_distributions(other):
    with pytest.raises((ValueError, TypeError), match=type(other).__name__):
        JacobianLowRankMVN.from_distribution(other)


# --------------------------------------------------------------------------------------------------
# 8. Errors: ValueError where torch's class raises one, and for the new arguments.


def _t(*shape):
    return torch.ones(shape, dtype=torch.float64)


CONSTRUCTOR_CASES = {
    "loc-0d": lambda cls: cls(torch.tensor(0.0, dtype=torch.float64), _t(1, 1), _t(1)),
    "cov_factor-1d": lambda cls: cls(_t(3), _t(3), _t(3)),
    "cov_factor-rows": lambda cls: cls(_t(3), _t(4, 2), _t(3)),
    "cov_diag-size": lambda cls: cls(_t(3), _t(3, 2), _t(4)),
    "cov_diag-0d": lambda cls: cls(_t(3), _t(3, 2), torch.tensor(1.0, dtype=torch.float64)),
    "batch-cov_factor": lambda cls: cls(_t(2, 3), _t(4, 3, 2), _t(3)),
    "batch-cov_diag": lambda cls: cls(_t(2, 3), _t(3, 2), _t(5, 3)),
}


@pytest.mark.parametrize("case", CONSTRUCTOR_CASES)
def test_constructor_raises_value_error_where_torch_does(case):
    with pytest.raises(ValueError):
        CONSTRUCTOR_CASES[case](LowRankMultivariateNormal)
    with pytest.raises(ValueError):
        CONSTRUCTOR_CASES[case](JacobianLowRankMVN)


# Mistakes torch's class reports from deep inside (IndexError, AttributeError, RuntimeError): a ValueError naming them.
STRUCTURAL_CASES = {
    "rank-0": (lambda: JacobianLowRankMVN(_t(3), _t(3, 0), _t(3)), r"cov_factor has shape \(3, 0\).*rank k >= 1"),
    "list-loc": (lambda: JacobianLowRankMVN([0.0] * 3, _t(3, 2), _t(3)), r"loc must be a torch.Tensor, got list"),
    "integer-loc": (
        lambda: JacobianLowRankMVN(torch.zeros(3, dtype=torch.int64), _t(3, 2), _t(3)),
        r"loc has dtype torch.int64",
    ),
    "mixed-dtypes": (
        lambda: JacobianLowRankMVN(_t(3).float(), _t(3, 2), _t(3)),
        r"loc has dtype torch.float32 but cov_factor has dtype torch.float64",
    ),
    "mixed-devices": (
        lambda: JacobianLowRankMVN(_t(3), _t(3, 2), _t(3).to("meta")),
        r"loc is on device cpu but cov_diag is on device meta",
    ),
}


@pytest.mark.parametrize("case", STRUCTURAL_CASES)
def test_structural_mistakes_raise_value_errors_naming_them(case):
    build, pattern = STRUCTURAL_CASES[case]
    with pytest.raises(ValueError, match=pattern):
        build()


def test_non_positive_cov_diag_is_refused_under_validation():
    with pytest.raises((ValueError, torch.linalg.LinAlgError)):
        LowRankMultivariateNormal(_t(3), _t(3, 2), -_t(3), validate_args=True)
    with pytest.raises((ValueError, torch.linalg.LinAlgError)):
        JacobianLowRankMVN(_t(3), _t(3, 2), -_t(3), validate_args=True)


def _names_all(*names):
    """A pattern that matches a message naming each of ``names``, in any order."""
    return "(?s)" + "".join(rf"(?=.*\b{n}\b)" for n in names)


ALLOWED = _names_all(*LOWRANK_WRT)
WRONG_EVENT = r"\(2, 5\)|\[2, 5\]"  # the value's shape, however it is written
# (id, validate_args, call, pattern the ValueError's message must match)
CALL_CASES = [
    ("jacobian-unknown-wrt", True, lambda d, x: d.jacobian(x, "scale"), _names_all(*LOWRANK_WRT, "scale")),
    ("jacobian-matrix-wrt", True, lambda d, x: d.jacobian(x, "covariance_matrix"), ALLOWED),
    ("jacobian-unknown-in-tuple", True, lambda d, x: d.jacobian(x, ("loc", "mean")), _names_all(*LOWRANK_WRT, "mean")),
    ("jacobian-empty-wrt", True, lambda d, x: d.jacobian(x, ()), ALLOWED),
    (
        "log_prob_and_grads-unknown-wrt",
        True,
        lambda d, x: d.log_prob_and_grads(x, ["value", "precision_matrix"]),
        ALLOWED,
    ),
    (
        "log_prob_and_grads-unknown-reduction",
        True,
        lambda d, x: d.log_prob_and_grads(x, reduction="mean"),
        _names_all("reduction", "none", "sum", "mean"),
    ),
    ("log_prob-event-size", True, lambda d, x: d.log_prob(x.new_zeros(2, D + 1)), WRONG_EVENT),
    ("jacobian-value-batch", True, lambda d, x: d.jacobian(x.new_zeros(3, D), "loc"), r"\(3, 4\)|\[3, 4\]"),
    ("jacobian-value-not-tensor", True, lambda d, x: d.jacobian([0.0] * D, "loc"), "value"),
]
for _validate in (True, False):
    _tag = "validated" if _validate else "unvalidated"
    CALL_CASES += [
        (
            f"jacobian-event-size-{_tag}",
            _validate,
            lambda d, x: d.jacobian(x.new_zeros(2, D + 1), "cov_diag"),
            WRONG_EVENT,
        ),
        (
            f"log_prob_and_grads-event-size-{_tag}",
            _validate,
            lambda d, x: d.log_prob_and_grads(x.new_zeros(2, D + 1)),
            WRONG_EVENT,
        ),
        (
            f"log_prob_and_grads-sum-event-size-{_tag}",
            _validate,
            lambda d, x: d.log_prob_and_grads(x.new_zeros(2, D + 1), reduction="sum"),
            WRONG_EVENT,
        ),
    ]


@pytest.mark.parametrize("validate_args, call, pattern", [c[1:] for c in CALL_CASES], ids=[c[0] for c in CALL_CASES])
def test_call_errors_are_value_errors_naming_the_mistake(validate_args, call, pattern):
    ours = JacobianLowRankMVN(torch.zeros(2, D, dtype=torch.float64), _t(D, RANK), _t(D), validate_args=validate_args)
    with pytest.raises(ValueError, match=pattern):
        call(ours, torch.zeros(2, D, dtype=torch.float64))


def test_layout_is_not_an_argument():
    ours = JacobianLowRankMVN(torch.zeros(D), torch.ones(D, RANK), torch.ones(D))
    with pytest.raises(TypeError):
        ours.jacobian(torch.zeros(D), "cov_factor", layout="full")


# --------------------------------------------------------------------------------------------------
# 9. No d x d matrix: the derivatives stay O(dk) per sample in memory.


BIG_D, BIG_RANK, BIG_N = 2048, 4, 8
MEMORY_CALLS = {
    **{f"jacobian-{w}": (lambda d, x, w=w: d.jacobian(x, w)) for w in LOWRANK_WRT},
    "jacobian-all": lambda d, x: d.jacobian(x, LOWRANK_WRT),
    "log_prob_and_grads-none": lambda d, x: d.log_prob_and_grads(x),
    "log_prob_and_grads-sum": lambda d, x: d.log_prob_and_grads(x, reduction="sum"),
    "log_prob": lambda d, x: d.log_prob(x),
    "entropy": lambda d, x: d.entropy(),
}


# torch 2.11's profiler says, on a second profile in one process, that each profile keeps only its own events.
@pytest.mark.filterwarnings("ignore:Warning. Profiler clears events:UserWarning")
@pytest.mark.parametrize("call", MEMORY_CALLS)
def test_no_d_by_d_matrix(call):
    """Building the distribution and calling the method, from scratch, holds far less than one d x d matrix
    (33.5 MB at d = 2048): O(N d k) for the results and intermediates (the cov_factor result is 0.5 MB)."""
    loc = torch.randn(BIG_D, dtype=torch.float64)
    factor = torch.randn(BIG_D, BIG_RANK, dtype=torch.float64)
    diag = torch.rand(BIG_D, dtype=torch.float64) + 0.5
    x = torch.randn(BIG_N, BIG_D, dtype=torch.float64)

    def run():
        return MEMORY_CALLS[call](JacobianLowRankMVN(loc, factor, diag, validate_args=False), x)

    run()  # warm up: one-off allocations are not counted
    peak, _ = peak_bytes(run)
    dense = BIG_D * BIG_D * 8
    assert peak < dense / 4, f"peak {peak} bytes is {peak / dense:.2f} of a d x d float64 matrix ({dense} bytes)"


@pytest.mark.filterwarnings("ignore:Warning. Profiler clears events:UserWarning")
def test_no_d_by_d_matrix_in_log_prob_backward():
    """torch's class backpropagates through log_prob without a d x d matrix; so does the closed form."""
    loc = torch.randn(BIG_D, dtype=torch.float64, requires_grad=True)
    factor = torch.randn(BIG_D, BIG_RANK, dtype=torch.float64, requires_grad=True)
    diag = (torch.rand(BIG_D, dtype=torch.float64) + 0.5).requires_grad_()
    x = torch.randn(BIG_N, BIG_D, dtype=torch.float64)

    def run():
        lp = JacobianLowRankMVN(loc, factor, diag, validate_args=False).log_prob(x).sum()
        return torch.autograd.grad(lp, (loc, factor, diag))

    run()
    peak, _ = peak_bytes(run)
    assert peak < BIG_D * BIG_D * 8 / 4, peak


# --------------------------------------------------------------------------------------------------
# 10. float32.


@pytest.mark.parametrize("shapes", LOWRANK_GRID[2:7:2], ids=LOWRANK_IDS[2:7:2])
def test_float32(shapes, assert_close):
    params, x, _, _ = grid_case(shapes, dtype=torch.float32)
    ours, ref = JacobianLowRankMVN(*params), LowRankMultivariateNormal(*params)
    tol = TOLERANCES[torch.float32]
    assert ours.log_prob(x).dtype == torch.float32
    assert_close(ours.log_prob(x), ref.log_prob(x))
    assert_close(ours.entropy(), ref.entropy())
    params64 = [t.double() for t in params]
    lp, sums = ours.log_prob_and_grads(x, reduction="sum")
    leaves = [t.clone().requires_grad_() for t in (x.double(), *params64)]
    expected = torch.autograd.grad(LowRankMultivariateNormal(*leaves[1:]).log_prob(leaves[0]).sum(), leaves)
    for name, e in zip(LOWRANK_WRT, expected):
        jac = ours.jacobian(x, name)
        assert jac.dtype == sums[name].dtype == torch.float32
        torch.testing.assert_close(jac.double(), per_sample_reference(params64, x.double(), name), **tol)
        torch.testing.assert_close(sums[name].double(), e, **tol)


# --------------------------------------------------------------------------------------------------------------------
# State: caches filled under no_grad keep their graph; vmap then grad; in-place updates; validation before factoring.


def _leaves():
    torch.manual_seed(11)
    loc = torch.randn(D, dtype=torch.float64)
    w = torch.randn(D, RANK, dtype=torch.float64, requires_grad=True)
    diag = (torch.rand(D, dtype=torch.float64) + 0.5).requires_grad_()
    return loc, w, diag, torch.randn(5, D, dtype=torch.float64)


def test_structure_caches_first_filled_under_no_grad_keep_gradients(assert_close):
    """The capacitance inverse and Sigma^{-1} W are cached on first use; filled under no_grad, later differentiable
    uses must still depend on W and D (a KL and a summed gradient, against torch's class)."""
    loc, w, diag, x = _leaves()
    q = LowRankMultivariateNormal(loc + 1, w.detach() * 2, diag.detach())
    ours = JacobianLowRankMVN(loc, w, diag)
    with torch.no_grad():
        torch.distributions.kl_divergence(q, ours)
        ours.log_prob_and_grads(x, reduction="sum")
    expected = torch.autograd.grad(
        torch.distributions.kl_divergence(q, LowRankMultivariateNormal(loc, w, diag)), [w, diag]
    )
    # retain_graph: the capacitance's graph (recorded at construction, as torch's class records it) serves both
    kl = torch.distributions.kl_divergence(q, ours)
    for a, e in zip(torch.autograd.grad(kl, [w, diag], retain_graph=True), expected):
        assert_close(a, e)
    ref_grad = torch.autograd.grad(LowRankMultivariateNormal(loc, w, diag).log_prob(x).sum(), w, create_graph=True)[0]
    expected = torch.autograd.grad(ref_grad.pow(2).sum(), [w, diag])
    summed = ours.log_prob_and_grads(x, ("cov_factor",), reduction="sum")[1]["cov_factor"]
    for a, e in zip(torch.autograd.grad(summed.pow(2).sum(), [w, diag]), expected):
        assert_close(a, e)


def test_gradient_of_a_vmapped_log_prob_matches_torch(assert_close):
    loc, w, diag, _ = _leaves()
    xs = torch.randn(7, 3, D, dtype=torch.float64)
    ours = vmap(JacobianLowRankMVN(loc, w, diag).log_prob)(xs)
    theirs = vmap(LowRankMultivariateNormal(loc, w, diag).log_prob)(xs)
    for a, e in zip(torch.autograd.grad(ours.sum(), [w, diag]), torch.autograd.grad(theirs.sum(), [w, diag])):
        assert_close(a, e)
    f = lambda m, cls: vmap(cls(loc, m, diag.detach()).log_prob)(xs).sum()  # noqa: E731
    assert_close(grad(f)(w.detach(), JacobianLowRankMVN), grad(f)(w.detach(), LowRankMultivariateNormal))


@pytest.mark.parametrize("name", ["cov_factor", "cov_diag"])
def test_in_place_update_after_construction_raises(name):
    """The capacitance factor is computed at construction; a parameter changed in place afterwards would be mixed
    with it (torch's class gives the mixed value, and a wrong or failing backward): a ValueError says so."""
    loc, w, diag, x = _leaves()
    d = JacobianLowRankMVN(loc, w, diag)
    with torch.no_grad():
        (w if name == "cov_factor" else diag).mul_(1.5)
    for call in (lambda: d.log_prob(x), lambda: d.jacobian(x, "cov_factor"), lambda: d.log_prob_and_grads(x)):
        with pytest.raises(ValueError, match="modified in place"):
            call()
    torch.testing.assert_close(
        JacobianLowRankMVN(loc, w, diag).log_prob(x), LowRankMultivariateNormal(loc, w, diag).log_prob(x)
    )


@pytest.mark.parametrize("bad", ["cov_diag-negative", "cov_diag-nan", "cov_factor-nan", "loc-nan"], ids=lambda s: s)
def test_validation_names_the_parameter_before_factorizing(bad):
    """torch's class factorizes the capacitance before it checks the constraints (a LinAlgError for a negative
    cov_diag); validated, ours raises torch's constraint message first."""
    name, kind = bad.split("-")
    loc, w, diag = torch.zeros(D), torch.ones(D, RANK), torch.ones(D)
    args = {"loc": loc, "cov_factor": w, "cov_diag": diag}
    args[name] = args[name].clone()
    args[name].view(-1)[0] = -1.0 if kind == "negative" else float("nan")
    with pytest.raises(ValueError, match=rf"Expected parameter {name} .* to satisfy the constraint"):
        JacobianLowRankMVN(**args, validate_args=True)
