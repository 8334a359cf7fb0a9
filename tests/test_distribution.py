"""JacobianMVN against torch.distributions.MultivariateNormal: every attribute, shape, sample and copy (the
attributes and log_prob for every structure of ``helpers.STRUCTURES``)."""

import copy
import io
import pickle

import pytest
import torch
from helpers import DENSE, PARAMETRIZATIONS, SHAPE_GRID, SHAPE_IDS, STRUCTURE_PARAMS, grid_case, matrix_for, random_spd
from pyro.distributions.torch_distribution import TorchDistributionMixin
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN, _factor

D = 3
TENSOR_ATTRIBUTES = (
    "loc",
    "scale_tril",
    "covariance_matrix",
    "precision_matrix",
    "mean",
    "mode",
    "variance",
    "stddev",
)


@pytest.mark.parametrize("shapes", SHAPE_GRID, ids=SHAPE_IDS)
@pytest.mark.parametrize("structure", STRUCTURE_PARAMS)
def test_matches_torch(structure, shapes, assert_close):
    params, x = grid_case(structure, shapes, D)
    ours, theirs = structure.pair(params)
    assert ours.batch_shape == theirs.batch_shape
    assert ours.event_shape == theirs.event_shape
    for name in dict.fromkeys(structure.params + TENSOR_ATTRIBUTES):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.shape == b.shape, name
        assert_close(a, b)
    for name in ("entropy", "perplexity"):
        assert_close(getattr(ours, name)(), getattr(theirs, name)())
    assert_close(ours.log_prob(x), theirs.log_prob(x))
    assert ours.support is theirs.support
    assert ours.arg_constraints == theirs.arg_constraints
    assert ours.has_rsample and ours.has_enumerate_support == theirs.has_enumerate_support


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_samples_match_torch_for_the_same_seed(parametrization, assert_close):
    ours, theirs = DENSE[parametrization].pair(DENSE[parametrization].random_params((3,), D, loc_batch_shape=(2, 1)))
    for method in ("sample", "rsample"):
        torch.manual_seed(1)
        a = getattr(ours, method)((5,))
        torch.manual_seed(1)
        b = getattr(theirs, method)((5,))
        assert a.shape == b.shape == (5, 2, 3, D)
        assert_close(a, b)


def test_isinstance_and_pyro_mixin():
    d = JacobianMVN(torch.zeros(2), torch.eye(2))
    assert isinstance(d, MultivariateNormal)
    assert isinstance(d, TorchDistributionMixin)
    assert type(d).__mro__.index(MultivariateNormal) < type(d).__mro__.index(TorchDistributionMixin)
    assert d().shape == (2,)  # Pyro calls the distribution to sample


def test_loc_broadcasts_against_matrix_batch():
    d = JacobianMVN(torch.zeros(2, 1, D, dtype=torch.float64), covariance_matrix=random_spd((3,), D))
    assert d.batch_shape == (2, 3)
    assert d.loc.shape == (2, 3, D)
    assert d.covariance_matrix.shape == (2, 3, D, D)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_batched_equals_looped(parametrization, assert_close):
    loc = torch.randn(4, D, dtype=torch.float64)
    cov = random_spd((4,), D)
    x = torch.randn(6, 4, D, dtype=torch.float64)
    batched = JacobianMVN(loc, **{parametrization: matrix_for(parametrization, cov)})
    for i in range(4):
        single = JacobianMVN(loc[i], **{parametrization: matrix_for(parametrization, cov[i])})
        assert_close(batched.log_prob(x)[:, i], single.log_prob(x[:, i]))
        assert_close(batched.entropy()[i], single.entropy())
        assert_close(batched.scale_tril[i], single.scale_tril)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_expand_keeps_type_and_values(parametrization, assert_close):
    ours, theirs = DENSE[parametrization].pair(DENSE[parametrization].random_params((), D, loc_batch_shape=(3,)))
    assert ours.parametrization == parametrization
    big = ours.expand((5, 3))
    assert type(big) is JacobianMVN
    assert big.batch_shape == (5, 3)
    assert big.parametrization == parametrization
    x = torch.randn(5, 3, D, dtype=torch.float64)
    assert_close(big.log_prob(x), theirs.expand((5, 3)).log_prob(x))
    assert_close(big.log_prob(x), ours.log_prob(x))
    for name in ("loc", "scale_tril", "covariance_matrix", "precision_matrix", "variance"):
        assert getattr(big, name).shape == getattr(theirs.expand((5, 3)), name).shape
    assert big.rsample((2,)).shape == (2, 5, 3, D)


def test_expand_of_a_subclass_keeps_the_subclass():
    class Sub(JacobianMVN):
        pass

    d = Sub(torch.zeros(2), scale_tril=torch.eye(2)).expand((4,))
    assert type(d) is Sub


def test_infer_shapes_like_pyro():
    assert JacobianMVN.infer_shapes(loc=(2, 1, 3), covariance_matrix=(4, 3, 3)) == ((2, 4), (3,))
    assert JacobianMVN.infer_shapes(loc=(3,), scale_tril=(3, 3)) == ((), (3,))


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_sample_moments(parametrization):
    """Seeded moment check: the sample mean and covariance are within a few standard errors."""
    loc = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    cov = random_spd((), D)
    d = JacobianMVN(loc, **{parametrization: matrix_for(parametrization, cov)})
    n = 200_000
    x = d.sample((n,))
    mean_err = (x.mean(0) - loc) / (cov.diagonal() / n).sqrt()
    assert mean_err.abs().max() < 5
    emp = torch.cov(x.T)
    # Var of an empirical covariance entry: (S_ij^2 + S_ii S_jj) / n.
    se = ((cov**2 + cov.diagonal()[:, None] * cov.diagonal()[None, :]) / n).sqrt()
    assert ((emp - cov) / se).abs().max() < 5


def test_rsample_is_reparametrized():
    loc = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    scale_tril = torch.linalg.cholesky(random_spd((), D)).requires_grad_()
    x = JacobianMVN(loc, scale_tril=scale_tril).rsample((4,))
    x.sum().backward()
    torch.testing.assert_close(loc.grad, torch.full((D,), 4.0, dtype=torch.float64))
    assert scale_tril.grad is not None


def test_precision_path_never_inverts(monkeypatch):
    """log_prob, entropy and the jacobians w.r.t. value, loc and covariance work from the factor of P."""
    cov = random_spd((2,), D)
    prec = matrix_for("precision_matrix", cov)
    x = torch.randn(5, 2, D, dtype=torch.float64)
    reference = MultivariateNormal(torch.zeros(D, dtype=torch.float64), cov)

    def forbidden(*args, **kwargs):
        raise AssertionError("the precision path must not invert")

    for name in ("inv", "inv_ex", "pinv", "solve", "solve_triangular"):
        monkeypatch.setattr(torch.linalg, name, forbidden)
    for name in ("inverse", "cholesky_inverse", "cholesky_solve"):
        monkeypatch.setattr(torch, name, forbidden)
    d = JacobianMVN(torch.zeros(D, dtype=torch.float64), precision_matrix=prec)
    lp = d.log_prob(x)
    h = d.entropy()
    jac = d.jacobian(x, ("value", "loc", "covariance_matrix"))
    assert "covariance_matrix" not in d.__dict__ and "scale_tril" not in d.__dict__
    monkeypatch.undo()
    torch.testing.assert_close(lp, reference.log_prob(x))
    torch.testing.assert_close(h, reference.entropy())
    torch.testing.assert_close(jac["value"], -torch.linalg.solve(cov, x.unsqueeze(-1)).squeeze(-1))


@pytest.mark.parametrize("parametrization", ("covariance_matrix", "precision_matrix"))
def test_one_factorization_with_validation(parametrization, monkeypatch):
    """torch factorizes twice when validating; JacobianMVN once."""
    m = matrix_for(parametrization, random_spd((), D))
    calls = []
    for name in ("cholesky", "cholesky_ex"):
        original = getattr(torch.linalg, name)

        def counted(*args, _original=original, **kwargs):
            calls.append(1)
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, counted)
    d = JacobianMVN(torch.zeros(D, dtype=torch.float64), **{parametrization: m}, validate_args=True)
    d.log_prob(torch.zeros(D, dtype=torch.float64))
    d.entropy()
    assert len(calls) == 1


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_pickle_deepcopy_and_torch_save(parametrization, assert_close):
    loc = torch.randn(2, D, dtype=torch.float64)
    d = JacobianMVN(loc, **{parametrization: matrix_for(parametrization, random_spd((2,), D))})
    assert d.scale_tril.shape == (2, D, D)  # a cached lazy attribute travels too
    x = torch.randn(4, 2, D, dtype=torch.float64)
    buffer = io.BytesIO()
    torch.save(d, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(d)), copy.deepcopy(d), torch.load(buffer, weights_only=False)]
    for c in copies:
        assert type(c) is JacobianMVN and c.parametrization == parametrization
        assert_close(c.log_prob(x), d.log_prob(x))
        assert_close(c.jacobian(x, "scale_tril"), d.jacobian(x, "scale_tril"))


def test_float32_follows_inputs():
    d = JacobianMVN(torch.zeros(D), covariance_matrix=torch.eye(D))
    x = torch.randn(4, D)
    assert d.log_prob(x).dtype == torch.float32
    assert d.rsample((2,)).dtype == torch.float32
    assert d.jacobian(x, "scale_tril").dtype == torch.float32
    ref = MultivariateNormal(torch.zeros(D), torch.eye(D))
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x))


def test_integer_value_is_scored_in_the_distribution_dtype():
    d = JacobianMVN(torch.zeros(2, dtype=torch.float64), covariance_matrix=torch.eye(2, dtype=torch.float64))
    lp = d.log_prob(torch.tensor([1, 2]))
    assert lp.dtype == torch.float64
    torch.testing.assert_close(lp, d.log_prob(torch.tensor([1.0, 2.0], dtype=torch.float64)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_cuda_matches_cpu(parametrization):
    loc = torch.randn(3, D, dtype=torch.float64)
    m = matrix_for(parametrization, random_spd((3,), D))
    x = torch.randn(5, 3, D, dtype=torch.float64)
    cpu = JacobianMVN(loc, **{parametrization: m})
    gpu = JacobianMVN(loc.cuda(), **{parametrization: m.cuda()})
    torch.testing.assert_close(gpu.log_prob(x.cuda()).cpu(), cpu.log_prob(x))
    torch.testing.assert_close(gpu.jacobian(x.cuda(), "scale_tril").cpu(), cpu.jacobian(x, "scale_tril"))
    assert gpu.rsample((2,)).device.type == "cuda"


@pytest.mark.parametrize("parametrization", ["covariance_matrix", "scale_tril"])
def test_precision_route_off_the_cpu(monkeypatch, parametrization):
    """Off the CPU, Sigma^{-1} is formed as L^{-T} L^{-1} from a triangular inverse (cholesky_inverse reads its error
    codes back to the host there); forced on the CPU, it equals torch's precision and the covariance Jacobian."""
    monkeypatch.setattr(_factor, "_CHOLESKY_INVERSE_ON_CPU", False)
    cov = random_spd((2,), 4)
    matrix = cov if parametrization == "covariance_matrix" else torch.linalg.cholesky(cov)
    ours = JacobianMVN(torch.zeros(4, dtype=torch.float64), **{parametrization: matrix})
    reference = MultivariateNormal(torch.zeros(4, dtype=torch.float64), covariance_matrix=cov)
    torch.testing.assert_close(ours.precision_matrix, reference.precision_matrix, rtol=1e-10, atol=1e-10)
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    alpha = torch.linalg.solve(cov, x.unsqueeze(-1)).squeeze(-1)
    expected = 0.5 * (alpha.unsqueeze(-1) * alpha.unsqueeze(-2) - torch.linalg.inv(cov))
    torch.testing.assert_close(ours.jacobian(x, "covariance_matrix"), expected, rtol=1e-9, atol=1e-9)
