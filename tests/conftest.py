import pathlib
import sys

import pytest
import torch
from helpers import TOLERANCES

# The benchmark's modules import one another by name, as siblings (benchmarks/run.py is run as a script); tests
# import them the same way.
BENCHMARKS = str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.append(BENCHMARKS)


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same random state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture(params=[torch.float64], ids=["float64"])
def dtype(request):
    return request.param


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def any_dtype(request):
    return request.param


@pytest.fixture
def tol(dtype):
    return TOLERANCES[dtype]


@pytest.fixture
def assert_close():
    """``torch.testing.assert_close`` with the tolerance of the tensors' dtype."""

    def check(actual, expected, **kwargs):
        kw = dict(TOLERANCES[expected.dtype])
        kw.update(kwargs)
        torch.testing.assert_close(actual, expected, **kw)

    return check


def pytest_addoption(parser):
    parser.addoption(
        "--differential-cases",
        type=int,
        default=None,
        help="number of random cases test_differential.py draws (default: a quick run)",
    )


_DEFAULT_VALIDATE_ARGS = torch.distributions.Distribution._validate_args


@pytest.fixture(autouse=True)
def default_validation():
    """Every test starts with torch's default argument validation: any ``torch.compile`` call turns it off for the
    whole process (torch's own behaviour), which would leave the tests after a compiled one unvalidated."""
    torch.distributions.Distribution.set_default_validate_args(_DEFAULT_VALIDATE_ARGS)
