"""tangent_kernels: fast empirical neural tangent kernels (eNTKs) for PyTorch models.

    import tangent_kernels as tk
    idx = tk.subsample(model, 500_000)          # a uniform parameter subsample
    K = tk.gram(model, loader, idx)             # [n, n] eNTK Gram over the loader
    G = tk.features(model, loader, idx)         # [n, p] per-sample gradient features
    kr = tk.KernelRidge(betas="auto").fit(K, y) # kernel ridge regression on K
"""

from . import analysis, distributed, reference, tracking, tuning
from ._ext import info
from .checkpoint import CheckpointCorrupt, CheckpointInUse, CheckpointMismatch
from .data import LoadedOrder
from .pipeline import features, gram  # request -> features -> Gram: docs/pipeline.md
from .progress import ProgressEvent
from .io import load_gram, save_gram
from .kernel import Kernel
from .lookahead import LookAhead
from .outputs import OutputProbes
from .params import ParamIndex, subsample
from .coverage import CoverageReport, coverage
from .sketch import Projection
from .solve import ConvergenceWarning, KernelRidge, NotFittedError, solve  # the shim module first: tk.solve stays the function

from .version import __version__  # noqa: F401 - tk.__version__

__all__ = [
    "CheckpointCorrupt",
    "CheckpointInUse",
    "CheckpointMismatch",
    "ConvergenceWarning",
    "CoverageReport",
    "Kernel",
    "KernelRidge",
    "LoadedOrder",
    "LookAhead",
    "NotFittedError",
    "OutputProbes",
    "ParamIndex",
    "ProgressEvent",
    "Projection",
    "analysis",
    "distributed",
    "coverage",
    "features",
    "gram",
    "info",
    "load_gram",
    "reference",
    "save_gram",
    "solve",
    "subsample",
    "tracking",
    "tuning",
]
