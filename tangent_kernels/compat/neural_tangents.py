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
[N, O] (the only output axis is -1, or 1) or [N] (the kernel [N1, N2] for ``trace_axes=()``:
there, as in neural-tangents, axis -1 is the batch axis, so tracing it is refused).
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
from typing import Dict, Optional, Sequence, Tuple

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
        shape = _output_shape(f, params, model, x1[:1])
        _check_output_axes(shape, traced, diagonal)
        if model is None:  # f is more than a module's forward: its own Jacobians
            k = function_kernel(f, params, x1, x2, compute, per_sample=False, name="f", batch_size=_batch_size)[0]
        else:
            k = empirical_ntk(model, x1, x2, compute, batch_size=_batch_size)
        if not shape:  # [N] outputs have no output axes in neural-tangents' layout
            return k.reshape(x1.shape[0], x2.shape[0])
        return k / shape[0] if traced else k  # neural-tangents averages traced axes

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


def _output_shape(f, params, model: Optional[nn.Module], x: torch.Tensor) -> Tuple[int, ...]:
    """The shape of one sample's output: () for [N] outputs, (O,) for [N, O]."""
    from .._model import eval_mode
    from ..outputs import logits_of

    with torch.no_grad():
        if model is None:
            out = f(params, x)
        else:
            with eval_mode(model):
                out = model(x)
    if not isinstance(out, torch.Tensor):
        if model is None:
            raise TypeError(f"f must return one tensor (its outputs), as in neural-tangents; it returns "
                            f"{type(out).__name__}")
        out = logits_of(out, x.shape[0])  # a model output object: its logits, as tk.gram reads them
    return tuple(out.shape[1:])


def _check_output_axes(shape: Tuple[int, ...], traced: bool, diagonal: bool) -> None:
    if len(shape) > 1:
        raise NotImplementedError(
            f"f returns outputs of shape [N, {', '.join(map(str, shape))}]: only [N] and [N, O] outputs are "
            "supported (the output axis is -1); reshape them to [N, O] in f")
    if not shape and (traced or diagonal):
        raise NotImplementedError(
            "f returns [N] outputs: in neural-tangents axis -1 is then the batch axis, not an output axis; "
            "pass trace_axes=() (and no diagonal_axes) for the [N1, N2] kernel")


def batch(kernel_fn, batch_size: int = 0, **kwargs):
    """neural-tangents' ``nt.batch``: for our kernel functions the batch size becomes the
    loader's batch size; any other function is returned as it is."""
    if getattr(kernel_fn, "_tangent_kernels", False) and batch_size:
        return functools.partial(kernel_fn, _batch_size=batch_size)
    return kernel_fn
