"""PyTorch's "Neural Tangent Kernels" tutorial (torch.func), with one import changed.

Before::

    def fnet_single(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    params = {k: v.detach() for k, v in net.named_parameters()}
    result = empirical_ntk_jacobian_contraction(fnet_single, params, x_train, x_test, "trace")

After::

    from tangent_kernels.compat.torch_func import empirical_ntk_jacobian_contraction

(the same lines). Layouts as in the tutorial: ``compute="full"`` [N1, N2, O, O],
``"trace"`` [N1, N2] (a sum over the outputs), ``"diagonal"`` [N1, N2, O]; a scalar
output per sample is O = 1 (as tk.gram counts a [B] output). The kernel is always that of
``fnet_single`` itself. When ``fnet_single`` closes over (or reads as a global) the one
``nn.Module`` whose parameters ``params`` names and is shown to be that module's forward
on x1 and x2 (the same outputs and Jacobians), as the tutorial's is, the kernel is
computed by ``tk.gram`` on that module at ``params`` (the caller's module is not
touched); otherwise (a softmax, a scaled input, a selected output...: a warning says
which) by the tutorial's own torch.func computation on ``fnet_single`` (exact, not
faster). ``empirical_ntk(net, x1, x2, compute)`` is the same on a module directly.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ._module import function_kernel, verified_module

__all__ = ["empirical_ntk", "empirical_ntk_jacobian_contraction", "empirical_ntk_ntk_vps"]

_COMPUTE = ("full", "trace", "diagonal")


def _check_compute(compute: str) -> None:
    if compute not in _COMPUTE:
        raise ValueError(f"compute must be one of {_COMPUTE} (the tutorial's), got {compute!r}")


def empirical_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, compute: str = "full", *,
                  batch_size: Optional[int] = None, **gram_kwargs) -> torch.Tensor:
    """The eNTK of ``model`` over all its trainable parameters between x1 [N1, ...] and
    x2 [N2, ...], in the tutorial's layout for ``compute``. float64 parameters compute in
    float64, others in float32; ``gram_kwargs`` go to ``tk.gram`` (idx=, backend=, ...)."""
    from .. import pipeline

    _check_compute(compute)
    precision = "fp64" if any(p.dtype == torch.float64 for p in model.parameters()) else "fp32"
    gram_kwargs.setdefault("precision", precision)
    gram_kwargs.setdefault("progress", False)
    split = (lambda x: [x]) if batch_size is None else (lambda x: list(x.split(batch_size)))
    second = None if x2 is x1 else split(x2)
    return pipeline.gram(model, split(x1), gram_kwargs.pop("idx", None), second, output=compute, **gram_kwargs)


def _kernel(fnet_single, params: Dict[str, torch.Tensor], x1: torch.Tensor, x2: torch.Tensor,
            compute: str) -> torch.Tensor:
    """The kernel of fnet_single: tk.gram on the module behind it when it is shown to be
    that module's forward, else torch.func on fnet_single itself."""
    _check_compute(compute)
    inputs = [x1] if x2 is x1 else [x1, x2]
    module = verified_module(fnet_single, params, inputs, per_sample=True, name="fnet_single", stacklevel=4)
    if module is None:
        return function_kernel(fnet_single, params, x1, x2, compute, per_sample=True, name="fnet_single")[0]
    return empirical_ntk(module, x1, x2, compute)


def empirical_ntk_jacobian_contraction(fnet_single, params: Dict[str, torch.Tensor], x1: torch.Tensor,
                                       x2: torch.Tensor, compute: str = "full") -> torch.Tensor:
    """The tutorial's ``empirical_ntk_jacobian_contraction``, same signature and layout."""
    return _kernel(fnet_single, params, x1, x2, compute)


def empirical_ntk_ntk_vps(func, params: Dict[str, torch.Tensor], x1: torch.Tensor, x2: torch.Tensor,
                          compute: str = "full") -> torch.Tensor:
    """The tutorial's ``empirical_ntk_ntk_vps`` (NTK-vector products), same signature and
    layout; the same kernel, computed as ``empirical_ntk_jacobian_contraction`` does."""
    return _kernel(func, params, x1, x2, compute)
