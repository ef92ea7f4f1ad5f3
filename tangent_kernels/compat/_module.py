"""Finding the nn.Module behind a functional model ``f(params, x)``, proving that ``f`` is
that module's forward before the adapters hand the module to tk.gram, and the kernel of
``f`` itself (torch.func) when it is not."""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Callable, Dict, Optional

import torch
from torch import nn

__all__ = ["function_kernel", "module_at", "module_behind", "verified_module"]


def module_behind(fn: Callable, params: Dict[str, torch.Tensor]) -> Optional[nn.Module]:
    """The one nn.Module that ``fn`` closes over or reads as a global and whose parameter
    names are ``params``' keys (the tutorials' ``functional_call(net, params, ...)``), or
    None when there is not exactly one."""
    candidates = []
    seen = set()

    def consider(value):
        if isinstance(value, nn.Module) and id(value) not in seen:
            seen.add(id(value))
            names = {name for name, _ in value.named_parameters()}
            if set(params) <= names and params:
                candidates.append(value)

    for cell in getattr(fn, "__closure__", None) or ():
        try:
            consider(cell.cell_contents)
        except ValueError:
            continue
    code = getattr(fn, "__code__", None)
    scope = getattr(fn, "__globals__", {})
    for name in getattr(code, "co_names", ()):
        consider(scope.get(name))
    return candidates[0] if len(candidates) == 1 else None


def module_at(module: nn.Module, params: Dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``module`` whose parameters are ``params`` (others frozen), in eval mode."""
    copied = copy.deepcopy(module)
    named = dict(copied.named_parameters())
    with torch.no_grad():
        for name, p in named.items():
            if name in params:
                value = params[name].detach()
                p.data = value.to(dtype=value.dtype, device=value.device).clone()
                p.requires_grad_(True)
            else:
                p.requires_grad_(False)
    return copied.eval()


# How far the user's function may sit from the module's own forward and still be served by
# it. Evaluating one module per sample (vmap) or batched differs by rounding only: measured
# 0 in the outputs and 7e-9 relative in the vector-Jacobian product for resnet18 in float32
# (0 and 0 for the tutorial CNN). What a function does around the module call (a softmax, a
# scale, a selection, a detached parameter) moves values or gradients by 10% and more here.
# Dtypes coarser than float32 are held to the float32 bound, so they take the exact path.
_SAME_TOL = {torch.float64: 1e-12}
_SAME_TOL_DEFAULT = 1e-5
_CHECK_CHUNK = 128


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    gap, scale = float((a - b).norm()), float(b.norm())
    if scale == 0:
        return 0.0 if gap == 0 else float("inf")
    return gap / scale


def _difference(fn, copy: nn.Module, params: Dict[str, torch.Tensor], x: torch.Tensor, per_sample: bool,
                generator: torch.Generator) -> Optional[str]:
    """Why ``fn`` is not ``copy``'s forward on the batch x (values, then a random
    vector-Jacobian product over all of x's samples), or None when it is."""
    from torch.func import functional_call, vjp, vmap

    mine = vmap(fn, (None, 0)) if per_sample else fn
    out, pull = vjp(lambda p: mine(p, x), params)
    ref, ref_pull = vjp(lambda p: functional_call(copy, p, (x,)), params)
    if not isinstance(out, torch.Tensor) or not isinstance(ref, torch.Tensor):
        return f"it returns {type(out).__name__} where the module returns {type(ref).__name__}"
    if out.shape != ref.shape:
        return f"it returns outputs of shape {list(out.shape)} for a batch where the module returns {list(ref.shape)}"
    tol = _SAME_TOL.get(ref.dtype, _SAME_TOL_DEFAULT)
    if out.dtype != ref.dtype or _relative(out, ref) > tol:
        return f"its outputs differ from the module's by {_relative(out.to(ref.dtype), ref):.2g} relative"
    # J_f(x_i) == J_module(x_i) for every sample i, almost surely, when their products with
    # one random cotangent over all of x agree: a difference on any sample moves the sum.
    u = torch.randn(ref.shape, generator=generator).to(ref.device, ref.dtype)
    mine_grad, ref_grad = pull(u)[0], ref_pull(u)[0]
    a = torch.cat([mine_grad[k].reshape(-1) for k in params])
    b = torch.cat([ref_grad[k].reshape(-1) for k in params])
    if _relative(a, b) > tol:
        return f"its gradients differ from the module's by {_relative(a, b):.2g} relative"
    return None


@contextlib.contextmanager
def _evaluating(name: str):
    """torch.func's errors on the user's function, with what it means for it."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:
        raise RuntimeError(
            f"{name} could not be evaluated and differentiated by torch.func (vmap, vjp, jacrev), as the "
            f"original library does: {error}. If its module is in train mode (dropout, batch norm: random, or "
            "coupling the samples), call .eval() on it first") from error


def verified_module(fn: Callable, params: Dict[str, torch.Tensor], inputs, per_sample: bool,
                    name: str, stacklevel: int = 3) -> Optional[nn.Module]:
    """``module_at(module_behind(fn, params), params)`` when ``fn`` is that module's forward
    at ``params`` on every sample of ``inputs`` (a sequence of batches): the same outputs
    and the same Jacobians. ``fn(params, x)`` takes one sample when ``per_sample`` (the
    tutorial's ``fnet_single``), else a batch. None when there is no such module, or, with
    a warning naming the difference, when ``fn`` does more than call it (a softmax, an
    input or output scale, an output selection...): the caller then differentiates ``fn``."""
    from ..precisions import fp32_math

    module = module_behind(fn, params)
    if module is None:
        return None
    copy = module_at(module, params)
    detached = {k: v.detach() for k, v in params.items()}
    generator = torch.Generator().manual_seed(0)
    with fp32_math(False), _evaluating(name):
        for x in inputs:
            for chunk in x.split(_CHECK_CHUNK):
                why = _difference(fn, copy, detached, chunk, per_sample, generator)
                if why is not None:
                    warnings.warn(
                        f"{name} is not the {type(module).__name__}'s forward at params on these inputs ({why}): "
                        f"the kernel is computed from {name} itself by torch.func (exact, without tk.gram's speed)",
                        stacklevel=stacklevel)
                    return None
    return copy


def _check_deterministic(fn, params, x: torch.Tensor, per_sample: bool, name: str) -> None:
    """A function whose outputs change between two calls (dropout in train mode) has no
    tangent kernel: its Jacobians would be those of one random draw per batch."""
    from torch.func import vmap

    mine = vmap(fn, (None, 0)) if per_sample else fn
    with torch.no_grad():
        once, again = mine(params, x), mine(params, x)
    if not isinstance(once, torch.Tensor):
        raise TypeError(f"{name} must return one tensor (its outputs), as the original library's does; "
                        f"it returns {type(once).__name__}")
    if _relative(again, once) > _SAME_TOL.get(once.dtype, _SAME_TOL_DEFAULT):
        raise ValueError(
            f"{name} returns different outputs on two calls with the same params and inputs (by "
            f"{_relative(again, once):.2g} relative): it is random and has no tangent kernel. A module in train "
            "mode with dropout? call .eval() on it first")


def function_kernel(fn: Callable, params: Dict[str, torch.Tensor], x1: torch.Tensor, x2: torch.Tensor,
                    compute: str, per_sample: bool, name: str, batch_size: Optional[int] = None):
    """(K, output shape per sample) of ``fn`` itself by torch.func: the tutorial's
    ``vmap(jacrev(fnet_single))`` when ``per_sample``, else neural-tangents' Jacobian of
    the batched ``fn(params, x)`` (over ``batch_size`` samples at a time when given).
    K is [N1, N2, O, O] for ``compute="full"``, [N1, N2] for "trace" (a sum), [N1, N2, O]
    for "diagonal", with O the number of entries of one sample's output (1 for a scalar,
    as tk.gram counts a [B] output)."""
    from torch.func import jacrev, vmap

    from ..precisions import fp32_math

    detached = {k: v.detach() for k, v in params.items()}
    jac_of = vmap(jacrev(fn), (None, 0)) if per_sample else jacrev(fn)
    shape = []

    def jacobians(x):
        chunks = [x] if batch_size is None else x.split(batch_size)
        per_chunk = [jac_of(detached, chunk) for chunk in chunks]
        first = per_chunk[0][next(iter(detached))]
        shape[:] = first.shape[1:first.dim() - detached[next(iter(detached))].dim()]
        return [torch.cat([jac[k] for jac in per_chunk]).reshape(x.shape[0], -1, v.numel())
                for k, v in detached.items()]

    equation = {"full": "Naf,Mbf->NMab", "trace": "Naf,Maf->NM", "diagonal": "Naf,Maf->NMa"}[compute]
    with fp32_math(False), _evaluating(name):
        _check_deterministic(fn, detached, x1[:_CHECK_CHUNK], per_sample, name)
        first = jacobians(x1)
        second = first if x2 is x1 else jacobians(x2)
        k = sum(torch.einsum(equation, a, b) for a, b in zip(first, second))
    return k, tuple(shape)
