"""Half precision on CPU: a clear ValueError naming the dtype, or a distribution that works."""

import pytest
import torch
from helpers import PARAMETRIZATIONS, matrix_for, random_spd
from torch.distributions import MultivariateNormal

from torch_mvn_ext import JacobianMVN

D = 3


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
