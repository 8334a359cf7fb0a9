"""The Fisher information of a matrix: its peak memory, and a clear error before an allocation that cannot
succeed."""

import resource
import time

import pytest
import torch
from helpers import PARAMETRIZATIONS, random_spd
from timing import peak_bytes  # benchmarks/timing.py: peak memory as the benchmark measures it

from torch_mvn_ext import JacobianMVN


def _vech_size(d):
    return d * (d + 1) // 2


# torch 2.11's profiler says, on a second profile in one process, that each profile keeps only its own events.
@pytest.mark.filterwarnings("ignore:Warning. Profiler clears events:UserWarning")
@pytest.mark.parametrize("wrt", PARAMETRIZATIONS)
def test_fisher_information_peak_memory(wrt):
    d = JacobianMVN(torch.zeros(24, dtype=torch.float64), scale_tril=torch.linalg.cholesky(random_spd((), 24)))
    d.fisher_information(wrt)  # warm up: lazy factors and one-off allocations are not counted
    peak, f = peak_bytes(lambda: d.fisher_information(wrt))
    result = f.numel() * f.element_size()
    assert f.shape == (300, 300)
    assert peak <= 1.5 * result, f"peak {peak} bytes is {peak / result:.2f}x the {result}-byte result"


@pytest.mark.parametrize("wrt", PARAMETRIZATIONS)
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
