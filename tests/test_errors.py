"""Clear errors for user mistakes: each case raises the stated exception with a message naming what went wrong."""

import math
import re

import pytest
import torch
from helpers import random_spd
from torch.distributions import MultivariateNormal, kl_divergence

import torch_mvn_ext
from torch_mvn_ext import JacobianMVN

D = 3
NOT_PD = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64))
NOT_SYMMETRIC = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)


def loc(*batch, **kwargs):
    kwargs.setdefault("dtype", torch.float64)
    return torch.zeros(*batch, D, **kwargs)


def eye(*batch, d=D, **kwargs):
    kwargs.setdefault("dtype", torch.float64)
    return torch.eye(d, **kwargs).expand(*batch, d, d)


def dist(validate_args=True, **kwargs):
    return JacobianMVN(loc(), **(kwargs or {"covariance_matrix": eye()}), validate_args=validate_args)


def x(*shape):
    return torch.zeros(shape, dtype=torch.float64)


def with_second_entry(value):
    out = x(D)
    out[1] = value
    return out


# (id, callable, exception type, regular expression the message must match)
CASES = [
    # The constructor's structural checks: always on.
    (
        "no-matrix",
        lambda: JacobianMVN(loc()),
        ValueError,
        r"Exactly one of covariance_matrix, precision_matrix or scale_tril must be given; got none",
    ),
    (
        "two-matrices",
        lambda: JacobianMVN(loc(), eye(), precision_matrix=eye()),
        ValueError,
        r"Exactly one of .*; got covariance_matrix and precision_matrix",
    ),
    (
        "three-matrices",
        lambda: JacobianMVN(loc(), eye(), eye(), eye()),
        ValueError,
        r"got covariance_matrix and precision_matrix and scale_tril",
    ),
    (
        "loc-0d",
        lambda: JacobianMVN(torch.tensor(0.0), torch.eye(1)),
        ValueError,
        r"loc must be at least one-dimensional.*0-d",
    ),
    (
        "loc-not-tensor",
        lambda: JacobianMVN([0.0, 0.0, 0.0], eye()),
        ValueError,
        r"loc must be a torch.Tensor, got list",
    ),
    (
        "matrix-not-tensor",
        lambda: JacobianMVN(loc(), scale_tril=[[1.0]]),
        ValueError,
        r"scale_tril must be a torch.Tensor, got list",
    ),
    (
        "event-size-covariance",
        lambda: JacobianMVN(loc(), eye(d=4)),
        ValueError,
        r"loc has shape \(3,\) but covariance_matrix has shape \(4, 4\).*3 and 4 differ",
    ),
    (
        "event-size-precision",
        lambda: JacobianMVN(loc(2), precision_matrix=eye(d=2)),
        ValueError,
        r"loc has shape \(2, 3\) but precision_matrix has shape \(2, 2\)",
    ),
    (
        "event-size-scale-tril",
        lambda: JacobianMVN(loc(), scale_tril=eye(5, d=4)),
        ValueError,
        r"loc has shape \(3,\) but scale_tril has shape \(5, 4, 4\)",
    ),
    (
        "non-square",
        lambda: JacobianMVN(loc(), torch.ones(3, 4, dtype=torch.float64)),
        ValueError,
        r"covariance_matrix must be a square matrix.*shape \(3, 4\)",
    ),
    (
        "matrix-1d",
        lambda: JacobianMVN(loc(), scale_tril=torch.ones(3, dtype=torch.float64)),
        ValueError,
        r"scale_tril must be a square matrix.*shape \(3,\)",
    ),
    (
        "batch-not-broadcastable",
        lambda: JacobianMVN(loc(2), eye(4)),
        ValueError,
        r"loc has shape \(2, 3\) and covariance_matrix has shape \(4, 3, 3\): their batch shapes \(2,\) and \(4,\) "
        r"do not broadcast",
    ),
    (
        "integer-loc",
        lambda: JacobianMVN(torch.zeros(D, dtype=torch.int64), eye()),
        ValueError,
        r"loc has dtype torch.int64, but JacobianMVN needs floating-point tensors",
    ),
    (
        "integer-matrix",
        lambda: JacobianMVN(loc(), precision_matrix=torch.eye(D, dtype=torch.int32)),
        ValueError,
        r"precision_matrix has dtype torch.int32, but JacobianMVN needs floating-point tensors",
    ),
    (
        "mixed-dtypes",
        lambda: JacobianMVN(loc(), scale_tril=eye(dtype=torch.float32)),
        ValueError,
        r"loc has dtype torch.float64 but scale_tril has dtype torch.float32",
    ),
    (
        "mixed-devices",
        lambda: JacobianMVN(loc(), eye(device="meta")),
        ValueError,
        r"loc is on device cpu but covariance_matrix is on device meta",
    ),
    # Checks of the matrix's values: under validate_args.
    (
        "validate-covariance-not-symmetric",
        lambda: dist(covariance_matrix=NOT_SYMMETRIC),
        ValueError,
        r"Expected parameter covariance_matrix \(Tensor of shape \(3, 3\)\).*Symmetric",
    ),
    (
        "validate-precision-not-symmetric",
        lambda: dist(precision_matrix=NOT_SYMMETRIC),
        ValueError,
        r"Expected parameter precision_matrix \(Tensor of shape \(3, 3\)\).*Symmetric",
    ),
    (
        "validate-covariance-not-positive-definite",
        lambda: dist(covariance_matrix=NOT_PD),
        ValueError,
        r"covariance_matrix is not positive definite",
    ),
    (
        "validate-precision-not-positive-definite",
        lambda: dist(precision_matrix=NOT_PD),
        ValueError,
        r"precision_matrix is not positive definite",
    ),
    (
        "validate-scale-tril-not-lower",
        lambda: dist(scale_tril=NOT_SYMMETRIC),
        ValueError,
        r"Expected parameter scale_tril \(Tensor of shape \(3, 3\)\).*LowerCholesky",
    ),
    (
        "validate-scale-tril-negative-diagonal",
        lambda: dist(scale_tril=NOT_PD),
        ValueError,
        r"Expected parameter scale_tril .*LowerCholesky",
    ),
    (
        "validate-scale-tril-zero-diagonal",
        lambda: dist(scale_tril=NOT_PD.clamp(min=0)),
        ValueError,
        r"Expected parameter scale_tril .*LowerCholesky",
    ),
    (
        "validate-loc-nan",
        lambda: JacobianMVN(with_second_entry(float("nan")), eye(), validate_args=True),
        ValueError,
        r"Expected parameter loc \(Tensor of shape \(3,\)\)",
    ),
    # Without validation a matrix that is not positive definite still fails at its factorization, by name.
    (
        "covariance-not-positive-definite",
        lambda: dist(False, covariance_matrix=NOT_PD),
        ValueError,
        r"covariance_matrix is not positive definite \(its Cholesky factorization failed",
    ),
    (
        "precision-not-positive-definite",
        lambda: dist(False, precision_matrix=NOT_PD),
        ValueError,
        r"precision_matrix is not positive definite \(its Cholesky factorization failed",
    ),
    (
        "covariance-nan",
        lambda: dist(False, covariance_matrix=eye() * float("nan")),
        ValueError,
        r"covariance_matrix is not positive definite",
    ),
    # Values.
    (
        "validate-value-nan",
        lambda: dist().log_prob(with_second_entry(float("nan"))),
        ValueError,
        r"value contains NaN or infinite entries",
    ),
    (
        "validate-value-inf",
        lambda: dist().log_prob(with_second_entry(float("inf"))),
        ValueError,
        r"value contains NaN or infinite entries",
    ),
    (
        "validate-jacobian-value-inf",
        lambda: dist().jacobian(with_second_entry(-float("inf"))),
        ValueError,
        r"value contains NaN or infinite entries",
    ),
    (
        "value-not-tensor",
        lambda: dist().log_prob([0.0, 0.0, 0.0]),
        ValueError,
        r"value must be a torch.Tensor, got list",
    ),
    (
        "value-device",
        lambda: dist(False).log_prob(x(D).to("meta")),
        ValueError,
        r"value is on device meta but the distribution is on device cpu",
    ),
    (
        "jacobian-value-device",
        lambda: dist(False).jacobian(x(D).to("meta"), "loc"),
        ValueError,
        r"value is on device meta but the distribution is on device cpu",
    ),
]
WRONG_EVENT = (
    r"value has shape \(2, 4\) but the distribution's event shape is \(3,\): the last dimension of value "
    r"must be 3"
)
for validate in (True, False):
    tag = "validate-" if validate else ""
    CASES += [
        (f"{tag}log_prob-event-size", lambda v=validate: dist(v).log_prob(x(2, 4)), ValueError, WRONG_EVENT),
        (
            f"{tag}jacobian-event-size",
            lambda v=validate: dist(v).jacobian(x(2, 4), "scale_tril"),
            ValueError,
            WRONG_EVENT,
        ),
        (
            f"{tag}log_prob_and_grads-event-size",
            lambda v=validate: dist(v).log_prob_and_grads(x(2, 4)),
            ValueError,
            WRONG_EVENT,
        ),
        (
            f"{tag}log_prob_and_grads-sum-event-size",
            lambda v=validate: dist(v).log_prob_and_grads(x(2, 4), reduction="sum"),
            ValueError,
            WRONG_EVENT,
        ),
    ]
WRT_LIST = re.escape("'value', 'loc', 'covariance_matrix', 'precision_matrix', 'scale_tril'")
CASES += [
    (
        "log_prob-value-0d",
        lambda: dist().log_prob(x()),
        ValueError,
        r"value has shape \(\) but the distribution's event shape is \(3,\)",
    ),
    (
        "log_prob-value-batch",
        lambda: JacobianMVN(loc(2), eye()).log_prob(x(4, D)),
        ValueError,
        r"value has shape \(4, 3\), which does not broadcast with the distribution's batch_shape \+ event_shape "
        r"\(2, 3\)",
    ),
    (
        "jacobian-value-batch",
        lambda: JacobianMVN(loc(2), eye()).jacobian(x(4, D)),
        ValueError,
        r"value has shape \(4, 3\), which does not broadcast",
    ),
    # Choices, with the allowed ones listed.
    (
        "jacobian-unknown-wrt",
        lambda: dist().jacobian(x(D), "scale"),
        ValueError,
        rf"wrt must be one of {WRT_LIST}; got 'scale'",
    ),
    (
        "jacobian-unknown-wrt-in-tuple",
        lambda: dist().jacobian(x(D), ("loc", "mean")),
        ValueError,
        rf"wrt must be one of {WRT_LIST}; got 'mean'",
    ),
    (
        "jacobian-empty-wrt",
        lambda: dist().jacobian(x(D), ()),
        ValueError,
        rf"wrt must be one of {WRT_LIST} or a tuple/list of them; got \(\)",
    ),
    (
        "jacobian-unknown-layout",
        lambda: dist().jacobian(x(D), "covariance_matrix", layout="tril"),
        ValueError,
        r"layout must be one of 'full', 'vech'; got 'tril'",
    ),
    (
        "log_prob_and_grads-unknown-wrt",
        lambda: dist().log_prob_and_grads(x(D), ["value", 3]),
        ValueError,
        rf"wrt must be one of {WRT_LIST}; got 3",
    ),
    (
        "log_prob_and_grads-unknown-layout",
        lambda: dist().log_prob_and_grads(x(D), layout="upper"),
        ValueError,
        r"layout must be one of 'full', 'vech'; got 'upper'",
    ),
    (
        "log_prob_and_grads-unknown-reduction",
        lambda: dist().log_prob_and_grads(x(D), reduction="mean"),
        ValueError,
        r"reduction must be one of 'none', 'sum'; got 'mean'",
    ),
]
CASES += [
    (
        "kl-event-size",
        lambda: kl_divergence(dist(), JacobianMVN(torch.zeros(4), torch.eye(4))),
        ValueError,
        r"kl_divergence\(p, q\) needs equal event shapes, but p \(JacobianMVN\) has event_shape \(3,\) and q "
        r"\(JacobianMVN\) has event_shape \(4,\)",
    ),
    (
        "kl-batch-shape",
        lambda: kl_divergence(JacobianMVN(loc(2), eye()), MultivariateNormal(loc(4), eye())),
        ValueError,
        r"needs broadcastable batch shapes, but p \(JacobianMVN\) has batch_shape \(2,\) and q "
        r"\(MultivariateNormal\) has batch_shape \(4,\)",
    ),
]
# The Gaussian-algebra methods.
CASES += [
    (
        "hessian-unknown-wrt",
        lambda: dist().hessian(x(D), "covariance_matrix"),
        ValueError,
        r"wrt must be one of 'value', 'loc'; got 'covariance_matrix'",
    ),
    ("hessian-event-size", lambda: dist().hessian(x(2, 4)), ValueError, WRONG_EVENT),
    (
        "fisher_information-unknown-wrt",
        lambda: dist().fisher_information("value"),
        ValueError,
        r"wrt must be one of 'loc', 'covariance_matrix', 'precision_matrix', 'scale_tril'; got 'value'",
    ),
    (
        "fisher_information-full-layout",
        lambda: dist().fisher_information("covariance_matrix", layout="full"),
        ValueError,
        r"layout='vech'.*singular",
    ),
    (
        "natural_gradient-unknown-key",
        lambda: dist().natural_gradient({"value": x(D)}),
        ValueError,
        r"'loc'.*'covariance_matrix'.*got 'value'",
    ),
    (
        "natural_gradient-event-size",
        lambda: dist().natural_gradient({"loc": x(4)}),
        ValueError,
        r"grads\['loc'\] has shape \(4,\)",
    ),
    ("marginal-out-of-range", lambda: dist().marginal([0, 3]), ValueError, r"dims contains 3, out of range"),
    ("condition-value-size", lambda: dist().condition([0], x(2)), ValueError, r"value has shape \(2,\)"),
    (
        "validate-condition-value-nan",
        lambda: dist().condition([0, 1], with_second_entry(float("nan"))[:2]),
        ValueError,
        r"value contains NaN or infinite entries",
    ),
    (
        "validate-condition-value-inf",
        lambda: dist().condition([1], with_second_entry(float("inf"))[1:2]),
        ValueError,
        r"value contains NaN or infinite entries",
    ),
    (
        "condition-value-device",
        lambda: dist().condition([1], x(1).to("meta")),
        ValueError,
        r"value is on device meta but the distribution is on device cpu",
    ),
    (
        "natural_gradient-device",
        lambda: dist().natural_gradient({"loc": x(D).to("meta")}),
        ValueError,
        r"grads\['loc'\] is on device meta but the distribution is on device cpu",
    ),
    # natural_gradient called the way fisher_information is: it takes the one dict, whose keys say the coordinates.
    (
        "natural_gradient-tensor-and-wrt",
        lambda: dist().natural_gradient(x(D), "loc"),
        ValueError,
        r"natural_gradient takes one argument, grads: a non-empty dict of gradients keyed by 'loc' and/or one of "
        r"'covariance_matrix', 'precision_matrix', 'scale_tril', such as natural_gradient\(\{'loc': g\}\); "
        r"got \(a tensor of shape \(3,\), 'loc'\)",
    ),
    (
        "natural_gradient-dict-and-wrt",
        lambda: dist().natural_gradient({"loc": x(D)}, "loc"),
        ValueError,
        r"natural_gradient takes one argument, grads: .*; got \(a dict, 'loc'\)",
    ),
    (
        "natural_gradient-wrt-keyword",
        lambda: dist().natural_gradient({"loc": x(D)}, wrt="loc"),
        ValueError,
        r"natural_gradient takes one argument, grads: .*; got \(a dict, wrt='loc'\)",
    ),
    (
        "natural_gradient-tensor",
        lambda: dist().natural_gradient(x(D)),
        ValueError,
        r"natural_gradient takes one argument, grads: a non-empty dict .*; got \(a tensor of shape \(3,\)\)",
    ),
    (
        "marginal-dims-float-tensor-entry",
        lambda: dist().marginal([torch.tensor(1.0)]),
        ValueError,
        r"dims must contain ints; got tensor\(1\.\)",
    ),
    (
        "marginal-dims-bool-tensor-entry",
        lambda: dist().marginal([torch.tensor(True)]),
        ValueError,
        r"dims must contain ints; got tensor\(True\)",
    ),
    (
        "marginal-dims-1d-tensor-entry",
        lambda: dist().marginal([torch.tensor([0, 1])]),
        ValueError,
        r"dims must contain ints; got tensor\(\[0, 1\]\)",
    ),
]


@pytest.mark.parametrize("call, exception, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error(call, exception, message):
    with pytest.raises(exception, match=message):
        call()


def test_case_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("validate_args", [True, False], ids=["validate", "no-validate"])
def test_valid_arguments_raise_nothing(validate_args):
    """The cases above fail for their mistake alone: the same calls with correct arguments go through."""
    d = JacobianMVN(loc(2), random_spd((2,), D), validate_args=validate_args)
    value = torch.randn(4, 2, D, dtype=torch.float64)
    assert d.log_prob(value).shape == (4, 2)
    assert d.jacobian(value, ("loc", "scale_tril"), layout="vech")["scale_tril"].shape == (4, 2, 6)
    assert d.log_prob_and_grads(value, reduction="sum")[1]["covariance_matrix"].shape == (2, D, D)


@pytest.mark.parametrize("validate_args", [False, True])
@pytest.mark.parametrize("parametrization", ["covariance_matrix", "precision_matrix"])
def test_not_positive_definite_is_also_torchs_linalg_error(parametrization, validate_args):
    """The error names the argument (a ValueError) and is still the torch.linalg.LinAlgError that torch's MVN raises
    without validation, so that code retrying a factorization with jitter catches it as before."""
    with pytest.raises(torch.linalg.LinAlgError, match=f"{parametrization} is not positive definite"):
        dist(validate_args, **{parametrization: NOT_PD})
    with pytest.raises(torch.linalg.LinAlgError):
        MultivariateNormal(loc(), **{parametrization: NOT_PD}, validate_args=False)


@pytest.mark.parametrize("parametrization", ["covariance_matrix", "precision_matrix"])
def test_not_positive_definite_error_is_public(parametrization):
    """What is raised is the exported ``torch_mvn_ext.NotPositiveDefiniteError``, under its public name, and it can
    be caught as a ValueError or as torch's LinAlgError."""
    assert "NotPositiveDefiniteError" in torch_mvn_ext.__all__
    error = torch_mvn_ext.NotPositiveDefiniteError
    assert issubclass(error, ValueError) and issubclass(error, torch.linalg.LinAlgError)
    with pytest.raises(error) as raised:
        dist(False, **{parametrization: NOT_PD})
    assert type(raised.value) is error
    assert f"{error.__module__}.{error.__qualname__}" == "torch_mvn_ext.NotPositiveDefiniteError"


def test_unvalidated_scale_tril_with_negative_diagonal_is_the_distribution_it_samples():
    """Without validation a negative diagonal entry is a sign flip of a column of L: Sigma = L L^T is unchanged,
    and so are log_prob, entropy and the scale_tril gradient (d log|L_ii| / d L_ii = 1 / L_ii), never NaN."""
    scale_tril = torch.linalg.cholesky(random_spd((), D)) * torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    cov = scale_tril @ scale_tril.mT
    d = JacobianMVN(loc(), scale_tril=scale_tril, validate_args=False)
    reference = MultivariateNormal(loc(), covariance_matrix=cov)
    value = torch.randn(5, D, dtype=torch.float64)
    torch.testing.assert_close(d.log_prob(value), reference.log_prob(value))
    torch.testing.assert_close(d.entropy(), reference.entropy())
    expected = torch.autograd.functional.jacobian(
        lambda m: MultivariateNormal(loc(), covariance_matrix=m @ m.mT).log_prob(value), scale_tril
    ).tril()
    torch.testing.assert_close(d.jacobian(value, "scale_tril"), expected)


def _with(matrix, index, value):
    out = matrix.clone()
    out[index] = value
    return out


_TRIL = torch.linalg.cholesky(random_spd((), D))
_INF, _NAN = float("inf"), float("nan")
PARAMETER_CASES = [
    ("tril-valid", "scale_tril", _TRIL),
    ("tril-upper-entry", "scale_tril", _with(_TRIL, (0, 2), 1e-300)),
    ("tril-zero-diagonal", "scale_tril", _with(_TRIL, (1, 1), 0.0)),
    ("tril-negative-diagonal", "scale_tril", _with(_TRIL, (2, 2), -1.0)),
    ("tril-nan-lower", "scale_tril", _with(_TRIL, (2, 0), _NAN)),
    ("tril-nan-upper", "scale_tril", _with(_TRIL, (0, 1), _NAN)),
    ("tril-nan-diagonal", "scale_tril", _with(_TRIL, (0, 0), _NAN)),
    ("tril-inf-lower", "scale_tril", _with(_TRIL, (1, 0), _INF)),
    ("tril-inf-diagonal", "scale_tril", _with(_TRIL, (1, 1), _INF)),
    ("tril-batch-one-bad", "scale_tril", torch.stack([_TRIL, _with(_TRIL, (1, 2), 1.0)])),
    ("loc-valid", "loc", torch.randn(2, D, dtype=torch.float64)),
    ("loc-nan", "loc", _with(torch.randn(2, D, dtype=torch.float64), (1, 2), _NAN)),
    ("loc-inf", "loc", _with(torch.randn(2, D, dtype=torch.float64), (0, 0), -_INF)),
]


@pytest.mark.parametrize("name, value", [c[1:] for c in PARAMETER_CASES], ids=[c[0] for c in PARAMETER_CASES])
def test_parameter_validation_agrees_with_torch(name, value):
    """The constructor's checks of loc and scale_tril accept exactly what torch's constraints accept."""
    constraint = MultivariateNormal.arg_constraints[name]
    accepted = bool(constraint.check(value).all())
    kwargs = {"loc": value, "scale_tril": _TRIL} if name == "loc" else {"loc": loc(), "scale_tril": value}
    if accepted:
        JacobianMVN(**kwargs, validate_args=True)
    else:
        with pytest.raises(ValueError, match=f"Expected parameter {name} .* to satisfy the constraint"):
            JacobianMVN(**kwargs, validate_args=True)


# A value with NaN or infinite entries: the validation message keeps the detail and torch's wording.


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
