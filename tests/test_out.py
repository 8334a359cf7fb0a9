"""``out=`` for ``jacobian`` and ``log_prob_and_grads``: written and returned, checked for shape and dtype, and
refused (with nothing written) for inputs that require grad."""

import math

import pytest
import torch
from helpers import DENSE, WRT, matrix_for, random_spd

from torch_mvn_ext import JacobianMVN

D = 3


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
    params = {"loc": loc.detach(), "covariance_matrix": cov.detach()}
    assert_close(buf, DENSE["covariance_matrix"].per_sample_grad(x.detach(), params, wrt))
