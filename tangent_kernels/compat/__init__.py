"""Adapters with other eNTK libraries' exact signatures and layouts, so that swapping one
import moves existing code onto tangent_kernels. One module per library; nothing in the
core knows about them (docs/compat.md):

- ``torch_func``: PyTorch's "Neural Tangent Kernels" tutorial;
- ``neural_tangents``: its ``empirical_ntk_fn`` conventions, for PyTorch models;
- ``trak``: a TRAK gradient computer (``TRAKer(gradient_computer=...)``) and projector
  (``TRAKer(projector=SketchProjector(...))``, tk.Projection behind it: no fast_jl);
- ``laplace``: laplace-torch curvature backends (``Laplace(backend=...)``), imported on
  first use because it subclasses laplace-torch's classes (needs ``laplace-torch``);
- ``lm_kernel_ft``: LM-Kernel-FT's ``compute_kernel_sharded``.
"""

import importlib

from . import lm_kernel_ft, neural_tangents, torch_func, trak

__all__ = ["laplace", "lm_kernel_ft", "neural_tangents", "torch_func", "trak"]


def __getattr__(name):
    if name == "laplace":
        return importlib.import_module(".laplace", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
