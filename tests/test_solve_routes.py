"""float32 triangular solves run from the left or, on CPUs where MKL does them faster so, from the right
(``_factor._solve_rows``). Whichever CPU runs the tests, both routes are forced here and every public method must
give the same numbers (to float32 rounding) in a tensor of the same shape and strides, over the shape grid and all three
parametrizations, and agree with the same methods in float64 (samples: with each other only, as float32 and float64
draw different noise).
"""

import pytest
import torch
from helpers import PARAMETRIZATIONS, SHAPE_GRID, SHAPE_IDS, WRT, matrix_for, random_spd
from torch.distributions import kl_divergence

from torch_mvn_ext import JacobianMVN, _factor

D = 4


def everything(parametrization, loc, m, x):
    """The outputs of every public method that solves with the factor, as a flat dict of tensors."""
    dist = JacobianMVN(loc, **{parametrization: m})
    out = {"log_prob": dist.log_prob(x), "entropy": dist.entropy()}
    torch.manual_seed(1)
    out["rsample"] = dist.rsample((3,))
    for layout in ("full", "vech"):
        for name, jac in dist.jacobian(x, WRT, layout=layout).items():
            out[f"jacobian-{name}-{layout}"] = jac
    lp, grads = dist.log_prob_and_grads(x, reduction="sum")
    out["lpg-log_prob"] = lp
    out.update({f"lpg-{k}": v for k, v in grads.items()})
    out["natural_gradient-loc"] = dist.natural_gradient({"loc": grads["loc"]})["loc"]
    cond = dist.condition([0], x[..., :1])
    out["condition-log_prob"] = cond.log_prob(x[..., 1:])
    out["condition-loc"] = cond.loc
    out["marginal-log_prob"] = dist.marginal([1, 3]).log_prob(x[..., [1, 3]])
    other = JacobianMVN(torch.zeros(D, dtype=x.dtype), covariance_matrix=2 * torch.eye(D, dtype=x.dtype))
    out["kl"] = kl_divergence(dist, other)
    out["kl-reverse"] = kl_divergence(other, dist)
    return out


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("loc_batch, mat_batch, x_batch", SHAPE_GRID, ids=SHAPE_IDS)
def test_both_routes_agree_with_each_other_and_float64(monkeypatch, parametrization, loc_batch, mat_batch, x_batch):
    loc = torch.randn(*loc_batch, D, dtype=torch.float64)
    m = matrix_for(parametrization, random_spd(mat_batch, D))
    x = torch.randn(*x_batch, D, dtype=torch.float64)
    exact = everything(parametrization, loc, m, x)
    results = {}
    for right in (False, True):
        monkeypatch.setattr(_factor, "_RIGHT_SOLVE_IS_FASTER", right)
        results[right] = everything(parametrization, loc.float(), m.float(), x.float())
    for key, reference in exact.items():
        for right in (False, True):
            got = results[right][key]
            assert got.shape == reference.shape and got.dtype == torch.float32, (key, right)
            if key != "rsample":  # float32 and float64 draw different noise from one seed
                scale = reference.abs().max().clamp(min=1.0)
                err = ((got.double() - reference).abs().max() / scale).item()
                assert err < 1e-5, (key, "right" if right else "left", err)
        # the same memory layout too: users may .view() what they get back
        assert results[True][key].stride() == results[False][key].stride(), key
        scale = results[False][key].abs().max().clamp(min=1.0)
        route_gap = (results[True][key] - results[False][key]).abs().max() / scale
        assert route_gap.item() < 1e-5, key
