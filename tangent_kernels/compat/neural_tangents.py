"""neural-tangents' ``empirical_ntk_fn`` conventions for PyTorch models.

Before (JAX)::

    kernel_fn = nt.empirical_ntk_fn(f, trace_axes=(-1,))
    k = kernel_fn(x1, x2, params)

After (PyTorch; ``f`` an ``nn.Module``, or ``f(params, x)`` over a dict of parameters
that closes over its module, batched over x)::

    from tangent_kernels.compat import neural_tangents as nt
    kernel_fn = nt.empirical_ntk_fn(f, trace_axes=(-1,))
    k = kernel_fn(x1, x2, params)

As in neural-tangents: traced axes are *averaged* (divided by their size), so the default
``trace_axes=(-1,)`` gives the mean over outputs [N1, N2]; ``trace_axes=()`` gives
[N1, N2, O, O]; ``diagonal_axes=(-1,)`` gives [N1, N2, O]; ``x2=None`` means x1. Outputs are
[N, O]: the only output axis is -1 (or 1). ``vmap_axes`` and ``implementation`` are
accepted and ignored (one computation serves all). ``batch(kernel_fn, batch_size)`` maps
the batch size onto tk.gram's loader batches (K is blocked by tk.gram either way).
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from ._module import module_at, module_behind
from .torch_func import empirical_ntk

__all__ = ["batch", "empirical_ntk_fn"]


def _output_axes(axes: Sequence[int], what: str) -> bool:
    axes = tuple(axes)
    if not axes:
        return False
    if any(axis not in (-1, 1) for axis in axes) or len(axes) > 1:
        raise NotImplementedError(f"{what}={axes}: only the output axis (-1) of [N, O] outputs is supported")
    return True


def empirical_ntk_fn(f, trace_axes: Sequence[int] = (-1,), diagonal_axes: Sequence[int] = (),
                     vmap_axes=None, implementation=None):
    """``ntk_fn(x1, x2=None, params=None)`` with neural-tangents' layout and normalization."""
    traced, diagonal = _output_axes(trace_axes, "trace_axes"), _output_axes(diagonal_axes, "diagonal_axes")
    if traced and diagonal:
        raise ValueError("an axis cannot be both traced and diagonal (as in neural-tangents)")

    def ntk_fn(x1: torch.Tensor, x2: Optional[torch.Tensor] = None, params: Optional[Dict[str, torch.Tensor]] = None,
               _batch_size: Optional[int] = None, **kwargs) -> torch.Tensor:
        if kwargs:
            raise TypeError(f"keyword arguments to f are not supported here: {sorted(kwargs)}")
        model = _model(f, params)
        x2 = x1 if x2 is None else x2
        compute = "trace" if traced else "diagonal" if diagonal else "full"
        k = empirical_ntk(model, x1, x2, compute, batch_size=_batch_size)
        if traced:  # neural-tangents averages traced axes
            outputs = _outputs(model, x1[:1])
            k = k / outputs
        return k

    ntk_fn._tangent_kernels = True
    return ntk_fn


def _model(f, params) -> nn.Module:
    if isinstance(f, nn.Module):
        return f.eval() if params is None else module_at(f, params)
    if params is None:
        raise TypeError("f(params, x) needs params: call ntk_fn(x1, x2, params)")
    module = module_behind(f, params)
    if module is None:
        raise NotImplementedError(
            "f does not close over the one nn.Module whose parameters params names: pass that module as f "
            "(nt.empirical_ntk_fn(module)), or use tangent_kernels.gram directly"
        )
    return module_at(module, params)


def _outputs(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x).reshape(x.shape[0], -1).shape[1])


def batch(kernel_fn, batch_size: int = 0, **kwargs):
    """neural-tangents' ``nt.batch``: for our kernel functions the batch size becomes the
    loader's batch size; any other function is returned as it is."""
    if getattr(kernel_fn, "_tangent_kernels", False) and batch_size:
        return functools.partial(kernel_fn, _batch_size=batch_size)
    return kernel_fn
