"""tangent_kernels: fast empirical neural tangent kernels (eNTKs) for PyTorch models.

    import tangent_kernels as tk
    idx = tk.subsample(model, 500_000)          # a uniform parameter subsample
    K = tk.gram(model, loader, idx)             # [n, n] eNTK Gram over the loader
    G = tk.features(model, loader, idx)         # [n, p] per-sample gradient features
"""

from . import reference
from .engine import features, gram
from .params import ParamIndex, subsample

__version__ = "0.1.0"

__all__ = ["ParamIndex", "features", "gram", "reference", "subsample"]
