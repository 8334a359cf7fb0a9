"""Autograd through log_prob: the closed-form backward against torch's, to second order, under torch.func
and torch.compile."""

import pytest
import torch
from helpers import PARAMETRIZATIONS, matrix_for, random_spd
from torch.distributions import MultivariateNormal
from torch.func import grad, hessian, jacfwd, jacrev, vmap

from torch_mvn_ext import JacobianMVN, _factor, _sums

D = 3
PROJECT = {
    # gradcheck perturbs every entry; these keep the argument on its manifold, as users' parameters are.
    "covariance_matrix": lambda m: (m + m.mT) / 2,
    "precision_matrix": lambda m: (m + m.mT) / 2,
    "scale_tril": torch.tril,
}


def inputs(parametrization, loc_shape=(2, 1, D), mat_batch=(3,), x_shape=(4, 2, 3, D)):
    loc = torch.randn(loc_shape, dtype=torch.float64, requires_grad=True)
    m = matrix_for(parametrization, random_spd(mat_batch, D)).requires_grad_()
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    return x, loc, m


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_backward_matches_torch(parametrization, assert_close):
    x, loc, m = inputs(parametrization)
    w = torch.randn(4, 2, 3, dtype=torch.float64)  # non-uniform upstream gradient
    lp = JacobianMVN(loc, **{parametrization: m}).log_prob(x)
    assert "LogProb" in type(lp.grad_fn).__name__  # the closed-form backward, not a traced graph
    ours = torch.autograd.grad((lp * w).sum(), (x, loc, m))
    ref = MultivariateNormal(loc, **{parametrization: m}).log_prob(x)
    expected = torch.autograd.grad((ref * w).sum(), (x, loc, m))
    assert_close(lp, ref)
    for a, b in zip(ours, expected):
        assert a.shape == b.shape
        assert_close(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_gradcheck_and_gradgradcheck(parametrization):
    x, loc, m = inputs(parametrization, x_shape=(2, 1, 3, D))
    project = PROJECT[parametrization]

    def f(x, loc, m):
        return JacobianMVN(loc, **{parametrization: project(m)}).log_prob(x)

    assert torch.autograd.gradcheck(f, (x, loc, m))
    assert torch.autograd.gradgradcheck(f, (x, loc, m))


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_second_order_matches_torch(parametrization, assert_close):
    """Hessian-vector products through the closed-form backward equal torch's."""
    x, loc, m = inputs(parametrization)
    results = []
    for cls in (JacobianMVN, MultivariateNormal):
        lp = cls(loc, **{parametrization: m}).log_prob(x).sum()
        g = torch.autograd.grad(lp, (x, loc, m), create_graph=True)
        v = sum((gi * torch.ones_like(gi).cumsum(-1)).sum() for gi in g)
        results.append(torch.autograd.grad(v, (x, loc, m)))
    for a, b in zip(*results):
        assert_close(a, b)


def _single(cls, parametrization):
    def log_prob(x, loc, m):
        return cls(loc, **{parametrization: m}, validate_args=False).log_prob(x)

    return log_prob


# Raised inside torch by every custom autograd.Function traced by torch.compile (torch 2.13); not ours to fix.
TORCH_COMPILE_FUNCTION_WARNING = "ignore:.*should not be instantiated:DeprecationWarning"

TRANSFORMS = {
    "grad": lambda f: grad(f, argnums=(0, 1, 2)),
    "jacrev": lambda f: jacrev(f, argnums=(0, 1, 2)),
    "jacfwd": lambda f: jacfwd(f, argnums=(0, 1, 2)),
    "hessian_value": lambda f: hessian(f, argnums=0),
    "hessian_matrix": lambda f: hessian(f, argnums=2),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_torch_func_transforms_match_torch(parametrization, transform, assert_close):
    x, loc, m = (t.detach() for t in inputs(parametrization, (D,), (), (D,)))
    ours = TRANSFORMS[transform](_single(JacobianMVN, parametrization))(x, loc, m)
    expected = TRANSFORMS[transform](_single(MultivariateNormal, parametrization))(x, loc, m)
    for a, b in zip(torch.utils._pytree.tree_leaves(ours), torch.utils._pytree.tree_leaves(expected)):
        assert_close(a, b)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_vmap_of_grad_matches_per_sample_loop(parametrization, assert_close):
    x, loc, m = (t.detach() for t in inputs(parametrization, (D,), (), (5, D)))
    f = grad(_single(JacobianMVN, parametrization), argnums=(1, 2))
    batched = vmap(f, in_dims=(0, None, None))(x, loc, m)
    for i in range(5):
        single = f(x[i], loc, m)
        assert_close(batched[0][i], single[0])
        assert_close(batched[1][i], single[1])
    # ... and it is the closed-form jacobian.
    d = JacobianMVN(loc, **{parametrization: m})
    assert_close(batched[0], d.jacobian(x, "loc"))
    assert_close(batched[1], d.jacobian(x, parametrization))


VALIDATED_TRANSFORMS = {
    # (transform of f(x, loc, m), in_dims): vmap over the value, the mean or the matrix, and vmap of grad.
    "vmap_value": (lambda f: vmap(f, in_dims=(0, None, None)), 0),
    "vmap_loc": (lambda f: vmap(f, in_dims=(None, 0, None)), 1),
    "vmap_matrix": (lambda f: vmap(f, in_dims=(None, None, 0)), 2),
    "vmap_grad_value": (lambda f: vmap(grad(f), in_dims=(0, None, None)), 0),
    "vmap_grad_loc": (lambda f: vmap(grad(f, argnums=1), in_dims=(None, 0, None)), 1),
}


@pytest.mark.parametrize("transform", list(VALIDATED_TRANSFORMS))
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_vmap_with_validation(parametrization, transform, assert_close):
    """torch.func.vmap works with argument validation on (torch's default), over the value, the mean or the matrix
    (torch's MVN over the first two and scale_tril): the checks hold for every batch member at once."""
    x, loc, m = (t.detach() for t in inputs(parametrization, (D,), (), (D,)))
    batched = (x + torch.randn(4, D, dtype=x.dtype), loc + torch.randn(4, D, dtype=x.dtype),
               matrix_for(parametrization, random_spd((4,), D)))
    make, index = VALIDATED_TRANSFORMS[transform]
    args = [x, loc, m]
    args[index] = batched[index]

    def log_prob(x, loc, m):
        return JacobianMVN(loc, **{parametrization: m}, validate_args=True).log_prob(x)

    ours = make(log_prob)(*args)
    expected = []  # per batch member, torch's MVN and plain autograd
    for i in range(4):
        member = [a[i].clone().requires_grad_() if j == index else a for j, a in enumerate(args)]
        lp = MultivariateNormal(member[1], **{parametrization: member[2]}).log_prob(member[0])
        expected.append(torch.autograd.grad(lp, member[index])[0] if "grad" in transform else lp)
    assert_close(ours, torch.stack(expected))


# torch's symmetric constraint (checked when a matrix is not exactly symmetric) has no vmap batching rule for isclose.
@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_validation_under_vmap_still_rejects_bad_members(parametrization):
    x, loc, m = (t.detach() for t in inputs(parametrization, (D,), (), (D,)))
    values = torch.randn(4, D, dtype=x.dtype)
    values[2, 1] = float("nan")
    d = JacobianMVN(loc, **{parametrization: m}, validate_args=True)
    with pytest.raises(ValueError, match="NaN or infinite"):
        vmap(d.log_prob)(values)
    locs = torch.randn(4, D, dtype=x.dtype)
    locs[1, 0] = float("nan")
    with pytest.raises(ValueError, match="loc"):
        vmap(lambda lc: JacobianMVN(lc, **{parametrization: m}, validate_args=True).log_prob(x))(locs)
    bad = matrix_for(parametrization, random_spd((4,), D))
    # Not lower-triangular, or not symmetric: the validation's own checks, under vmap.
    bad[3] = bad[3].mT.clone() if parametrization == "scale_tril" else bad[3] + torch.eye(D).roll(1, 0)
    with pytest.raises(ValueError, match=f"Expected parameter {parametrization}"):
        vmap(lambda mm: JacobianMVN(loc, **{parametrization: mm}, validate_args=True).log_prob(x))(bad)


@pytest.mark.slow
@pytest.mark.filterwarnings(TORCH_COMPILE_FUNCTION_WARNING)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_torch_compile_fullgraph(parametrization, assert_close):
    x, loc, m = inputs(parametrization)

    def loss(x, loc, m):
        return JacobianMVN(loc, **{parametrization: m}, validate_args=False).log_prob(x).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(x, loc, m)
    ours = torch.autograd.grad(value, (x, loc, m))
    ref = MultivariateNormal(loc, **{parametrization: m}).log_prob(x).sum()
    expected = torch.autograd.grad(ref, (x, loc, m))
    assert_close(value, ref)
    for a, b in zip(ours, expected):
        assert_close(a, b)


@pytest.mark.filterwarnings(TORCH_COMPILE_FUNCTION_WARNING)
@pytest.mark.parametrize("right_solve", [False, True], ids=["left-solve", "right-solve"])
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_float32_solve_routes_under_transforms(monkeypatch, parametrization, right_solve, assert_close):
    """float32 solves run from the right on some CPUs (``_factor._solve_rows``); both routes compile with
    ``fullgraph=True`` and work under ``vmap(grad)`` and ``hessian``, whichever CPU runs the tests."""
    monkeypatch.setattr(_factor, "_RIGHT_SOLVE_IS_FASTER", right_solve)
    torch._dynamo.reset()  # the route is a global that compiled code guards on; start from a cold cache
    x, loc, m = (t.detach().float() for t in inputs(parametrization))

    def ours(x, loc, m):
        return JacobianMVN(loc, **{parametrization: m}, validate_args=False).log_prob(x)

    def torchs(x, loc, m):  # unvalidated: torch's own checks run under vmap only from torch 2.7 on
        return MultivariateNormal(loc, **{parametrization: m}, validate_args=False).log_prob(x)

    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, loc, m), torchs(x, loc, m))
    point = x[0, 0, 0]
    per_sample = vmap(grad(lambda xi: ours(xi, loc[0, 0], m[0]).sum()))(x[:, 0, 0])
    expected = vmap(grad(lambda xi: torchs(xi, loc[0, 0], m[0]).sum()))(x[:, 0, 0])
    assert_close(per_sample, expected)
    assert_close(
        hessian(lambda lc: ours(point, lc, m[0]))(loc[0, 0]),
        hessian(lambda lc: torchs(point, lc, m[0]))(loc[0, 0]),
    )


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_distribution_built_without_grad_matches_torch(parametrization, assert_close):
    """Built under torch.no_grad(), the distribution's factor records no graph: as for torch's MVN, log_prob then
    sends gradients to the value only, and none to the parameters (for scale_tril, the factor is the parameter)."""
    x, loc, m = inputs(parametrization)
    results = {}
    for cls in (JacobianMVN, MultivariateNormal):
        with torch.no_grad():
            d = cls(loc, **{parametrization: m})
        lp = d.log_prob(x)
        leaves = [t for t in (x, loc, m) if t.requires_grad] if lp.requires_grad else []
        grads = torch.autograd.grad(lp.sum(), leaves, allow_unused=True) if leaves else ()
        results[cls] = (lp, [g is None for g in grads], grads)
    (lp, unused, grads), (ref, ref_unused, ref_grads) = results.values()
    assert_close(lp, ref)
    assert unused == ref_unused
    for a, b in zip(grads, ref_grads):
        if b is not None:
            assert_close(a, b)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_parameter_changed_in_place_before_backward_matches_torch(parametrization, assert_close):
    """An optimizer step between log_prob and backward (a retained loss): where torch's MVN allows it (the covariance
    and precision parametrizations, which save only the factor), so does JacobianMVN, with the same gradients of the
    log-density as it was evaluated; where torch refuses (scale_tril, saved itself), both refuse."""
    outcomes = []
    for cls in (JacobianMVN, MultivariateNormal):
        torch.manual_seed(0)
        x, loc, m = inputs(parametrization)
        lp = cls(loc, **{parametrization: m}).log_prob(x).sum()
        with torch.no_grad():
            m.mul_(1.5)
        try:
            outcomes.append(torch.autograd.grad(lp, (x, loc, m)))
        except RuntimeError as e:
            assert "modified by an inplace operation" in str(e)
            outcomes.append(None)
    ours, torchs = outcomes
    assert (ours is None) == (torchs is None)
    if torchs is not None:
        for a, b in zip(ours, torchs):
            assert_close(a, b)


def test_no_gradient_needed_builds_no_graph():
    d = JacobianMVN(torch.zeros(D), covariance_matrix=torch.eye(D))
    assert d.log_prob(torch.randn(4, D)).grad_fn is None


@pytest.mark.parametrize("mat_batch, loc_shape", [((3,), (2, 1, D)), ((), (4, D)), ((2, 3), (D,))])
def test_covariance_gradient_skips_the_cholesky_backward(mat_batch, loc_shape, assert_close):
    """A first-order backward gives the covariance its closed-form gradient directly: torch's Cholesky backward gets
    no gradient (so computes nothing), and the gradient (with the covariance's own shape) equals torch's."""
    x_shape = (5,) + torch.broadcast_shapes(loc_shape, mat_batch + (D,))
    x, loc, m = inputs("covariance_matrix", loc_shape, mat_batch, x_shape)
    d = JacobianMVN(loc, covariance_matrix=m)
    calls = []
    d._state.factor.tensor.grad_fn.register_prehook(lambda grads: calls.extend(g for g in grads if g is not None))
    lp = d.log_prob(x)
    w = torch.randn(lp.shape, dtype=torch.float64)
    ours = torch.autograd.grad((lp * w).sum(), (x, loc, m))
    assert not calls
    ref = MultivariateNormal(loc, covariance_matrix=m).log_prob(x)
    expected = torch.autograd.grad((ref * w).sum(), (x, loc, m))
    for a, b in zip(ours, expected):
        assert a.shape == b.shape
        assert_close(a, b)
    assert_close(ours[2], ours[2].mT, rtol=0, atol=0)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_torch_compile_keeps_the_second_derivative(parametrization, assert_close):
    """Compiled with dynamo alone (``backend="eager"``), log_prob's first gradient under create_graph=True is itself
    differentiable (a gradient penalty), and its gradient equals torch's MVN's, compiled the same way. (Through
    AOTAutograd, ``aot_eager`` and inductor, torch 2.13 gives torch's own MVN no second derivative either.)"""
    backend = "eager"
    torch._dynamo.reset()  # each case compiles new functions: stay under dynamo's recompile limit
    x, loc, m = inputs(parametrization)

    def penalty(cls):
        def loss(x, loc, m):
            return cls(loc, **{parametrization: m}, validate_args=False).log_prob(x).sum()

        compiled = torch.compile(loss, fullgraph=True, backend=backend)
        g_loc, g_m = torch.autograd.grad(compiled(x, loc, m), (loc, m), create_graph=True)
        assert g_loc.requires_grad and g_m.requires_grad, "the first gradient lost its graph"
        return torch.autograd.grad(g_loc.pow(2).sum() + g_m.pow(2).sum(), (x, loc, m))

    for a, b in zip(penalty(JacobianMVN), penalty(MultivariateNormal)):
        assert_close(a, b)


SUMMED_SHAPES = {
    # (loc shape, matrix batch, value shape): one matrix for all points, and one per member of a batch (3 members of
    # 26 points each, or of 4). With the one-GEMM epilogue up to 3 points and chunks of 4 * D = 12 points beyond 24,
    # the first two take chunks and leave a tail of points after the last one, the last two are one GEMM each.
    "unbatched-chunks": ((D,), (), (29, D)),
    "batched-chunks": ((2, 1, D), (3,), (13, 2, 3, D)),
    "unbatched-one-gemm": ((D,), (), (5, D)),
    "batched-one-gemm": ((2, 1, D), (3,), (2, 2, 3, D)),
}


@pytest.mark.parametrize("shapes", list(SUMMED_SHAPES.values()), ids=list(SUMMED_SHAPES))
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_sums_over_many_samples_match_torch(monkeypatch, parametrization, shapes, assert_close):
    """Sums over many samples run as one GEMM and then in centered chunks (``_sums.centered_outer_sum``); forced
    here at a few points: first- and second-order autograd with a non-uniform upstream gradient, and the
    closed-form summed gradients, equal torch's."""
    monkeypatch.setattr(_sums, "_SUM_CHUNK", 3)
    monkeypatch.setattr(_sums, "_CHUNKED_FROM", 6)
    loc_shape, mat_batch, x_shape = shapes
    x, loc, m = inputs(parametrization, loc_shape, mat_batch, x_shape)
    w = torch.randn(torch.broadcast_shapes(x_shape[:-1], loc_shape[:-1], mat_batch), dtype=torch.float64)
    results = []
    for cls in (JacobianMVN, MultivariateNormal):
        lp = (cls(loc, **{parametrization: m}).log_prob(x) * w).sum()
        first = torch.autograd.grad(lp, (x, loc, m), create_graph=True)
        v = sum((g * torch.ones_like(g).cumsum(-1)).sum() for g in first)
        results.append(first + torch.autograd.grad(v, (x, loc, m)))
    for a, b in zip(*results):
        assert_close(a, b)
    d = JacobianMVN(loc.detach(), **{parametrization: m.detach()})
    _, grads = d.log_prob_and_grads(x.detach(), tuple(PROJECT), reduction="sum")
    for name in PROJECT:
        matrix = getattr(MultivariateNormal(loc.detach(), **{parametrization: m.detach()}), name)
        matrix = (matrix if name != parametrization else m).detach().clone().requires_grad_()
        ref = MultivariateNormal(loc.detach(), **{name: matrix}).log_prob(x.detach()).sum()
        assert_close(grads[name], torch.autograd.grad(ref, matrix)[0], msg=name)
