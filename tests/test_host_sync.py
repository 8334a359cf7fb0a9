"""No host synchronization in the hot methods on CUDA, unvalidated."""

import pytest
import torch
from helpers import PARAMETRIZATIONS, WRT, matrix_for, random_spd

from torch_mvn_ext import JacobianMVN

D = 3


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
