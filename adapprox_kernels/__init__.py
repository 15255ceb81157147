"""adapprox_kernels: the Adapprox (low-rank adaptive second moment) and AdaMeM (low-rank momentum)
optimizers and their kernels."""

from . import _requirements  # noqa: F401  (first: refuses a torch older than it supports)
from . import triton_backend  # noqa: F401  (registers the "triton" backend; triton itself is imported lazily)
from .adamem import AdaMeM
from .adapprox import Adapprox
from .linear_operator import DenseOperator, LinearOperator
from .srsi import as_rsi, error_ratio, srsi
from .state_report import StateReport

__version__ = "0.1.0"

__all__ = [
    "AdaMeM",
    "Adapprox",
    "DenseOperator",
    "LinearOperator",
    "StateReport",
    "as_rsi",
    "error_ratio",
    "srsi",
    "__version__",
]
