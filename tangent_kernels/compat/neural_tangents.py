"""neural-tangents' ``empirical_ntk_fn`` conventions for PyTorch models.

Before (JAX)::

    kernel_fn = nt.empirical_ntk_fn(f, trace_axes=(-1,))
    k = kernel_fn(x1, x2, params)

After (PyTorch; ``f`` an ``nn.Module``, or a batched ``f(params, x)`` over a dict of
parameters)::

    from tangent_kernels.compat import neural_tangents as nt
    kernel_fn = nt.empirical_ntk_fn(f, trace_axes=(-1,))
    k = kernel_fn(x1, x2, params)

As in neural-tangents: traced axes are *averaged* (divided by their size), so the default
``trace_axes=(-1,)`` gives the mean over outputs [N1, N2]; ``trace_axes=()`` gives
[N1, N2, O, O]; ``diagonal_axes=(-1,)`` gives [N1, N2, O]; ``x2=None`` means x1. Outputs are
[N, O] (the only output axis is -1, or 1) or [N] (a kernel [N1, N2] in every layout).
The kernel is always ``f``'s own: a functional ``f`` that closes over the one module whose
parameters ``params`` names, and is shown to be its forward on x1 and x2 (the same outputs
and Jacobians), is computed by tk.gram on that module; any other ``f`` (a softmax, a scaled
input, a selected output...: a warning says which, when a module was found) by its
Jacobian with torch.func, as neural-tangents does (exact, not faster). ``vmap_axes`` and ``implementation`` are
accepted and ignored (one computation serves all). ``batch(kernel_fn, batch_size)`` maps
the batch size onto tk.gram's loader batches (K is blocked by tk.gram either way).
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from ._module import function_kernel, module_at, verified_module
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
        x2 = x1 if x2 is None else x2
        compute = "trace" if traced else "diagonal" if diagonal else "full"
        model = _model(f, params, x1, x2)
        if model is None:  # f is more than a module's forward: its own Jacobians
            k, shape = function_kernel(f, params, x1, x2, compute, per_sample=False, name="f",
                                       batch_size=_batch_size)
            if len(shape) > 1:
                raise NotImplementedError(
                    f"f returns outputs of shape [N, {', '.join(map(str, shape))}]: only [N] and [N, O] outputs "
                    "are supported (the output axis is -1); reshape them to [N, O] in f")
            outputs = shape[0] if shape else 1
        else:
            k = empirical_ntk(model, x1, x2, compute, batch_size=_batch_size)
            outputs = _outputs(model, x1[:1]) if traced else 1
        if traced:  # neural-tangents averages traced axes
            k = k / outputs
        return k

    ntk_fn._tangent_kernels = True
    return ntk_fn


def _model(f, params, x1: torch.Tensor, x2: torch.Tensor) -> Optional[nn.Module]:
    """The module whose kernel is f's: f itself (or a copy at params), the module that a
    functional f(params, x) is shown to be on x1 and x2, or None (f is differentiated)."""
    if isinstance(f, nn.Module):  # tk.gram evaluates it in eval mode and restores its mode
        return f if params is None else module_at(f, params)
    if params is None:
        raise TypeError("f(params, x) needs params: call ntk_fn(x1, x2, params)")
    return verified_module(f, params, [x1] if x2 is x1 else [x1, x2], per_sample=False, name="f",
                           stacklevel=4)


def _outputs(model: nn.Module, x: torch.Tensor) -> int:
    from .._model import eval_mode

    with torch.no_grad(), eval_mode(model):
        return int(model(x).reshape(x.shape[0], -1).shape[1])


def batch(kernel_fn, batch_size: int = 0, **kwargs):
    """neural-tangents' ``nt.batch``: for our kernel functions the batch size becomes the
    loader's batch size; any other function is returned as it is."""
    if getattr(kernel_fn, "_tangent_kernels", False) and batch_size:
        return functools.partial(kernel_fn, _batch_size=batch_size)
    return kernel_fn
