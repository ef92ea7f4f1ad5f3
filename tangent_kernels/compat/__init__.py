"""Adapters with other eNTK libraries' exact signatures and layouts, so that swapping one
import moves existing code onto tangent_kernels. One module per library; nothing in the
core knows about them. Done: ``torch_func`` (PyTorch's "Neural Tangent Kernels" tutorial)
and ``neural_tangents`` (its ``empirical_ntk_fn`` conventions, for PyTorch models). Not
done yet: TRAK, laplace-torch and LM-Kernel-FT adapters (docs/compat.md).
"""

from . import neural_tangents, torch_func

__all__ = ["neural_tangents", "torch_func"]
