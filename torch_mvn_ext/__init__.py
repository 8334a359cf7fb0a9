"""A multivariate normal for PyTorch and Pyro with closed-form per-sample derivatives of its log-density."""

from . import kl  # noqa: F401  (registers the KL divergences)
from ._factor import NotPositiveDefiniteError
from .autoguide import AutoJacobianLowRankMVN, AutoJacobianMVN
from .jacobian_lowrank_mvn import JacobianLowRankMVN
from .jacobian_mvn import JacobianMVN

__version__ = "0.1.0"

__all__ = [
    "AutoJacobianLowRankMVN",
    "AutoJacobianMVN",
    "JacobianLowRankMVN",
    "JacobianMVN",
    "NotPositiveDefiniteError",
    "__version__",
]
