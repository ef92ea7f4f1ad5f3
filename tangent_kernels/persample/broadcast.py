"""Derived tensors meeting data in broadcasting ops: a per-sample leaf in their place.

``x + pos_embedding``, ``hidden * rms_weight``, ``torch.cat([cls_token.expand(B, -1, -1),
x], 1)``, ``scores += position_bias``: no formula per op is needed. The derived operand D
is replaced, for this one call, by a leaf L that broadcasts to the same result but has
one row per sample: D expanded along the batch (stride 0, no copy) when D is shared by
the batch, or D itself detached when its rows already are the samples'. The batched
backward then yields ds/dL, whose row b is sample b's gradient at D (autograd has
already summed it over D's broadcast dims), and D's pullback turns it into sampled
entries. Rows flattened batch-major into dim 0 ([B * T, d] + bias, Swin's
[B * windows, H, N, N] + a relative-position bias) are summed per sample.
"""

from __future__ import annotations

from typing import Optional

import torch

from .uses import NotCovered, Sink, Use, register

__all__ = ["BroadcastUse"]


class BroadcastUse(Use):
    label = "broadcast"

    def __init__(self, mode, derived, leaf: torch.Tensor, shape, aligned: bool, samples_dim: int = 0):
        super().__init__(derived.sampled, leaf)
        self.batch, self.pullback, self.shape, self.aligned = mode.batch_size, derived.pullback, shape, aligned
        self.samples_dim = samples_dim

    def contribute(self, grad: torch.Tensor, sink: Sink) -> None:
        if self.samples_dim:  # sequence first: the leaf is [1 or T, B, ...]
            grad = grad.movedim(self.samples_dim, 0)
        if not self.aligned:
            if grad.shape[0] != self.batch:  # batch-major flattened rows
                grad = grad.reshape(self.batch, -1, *grad.shape[1:]).sum(dim=1)
            grad = grad.reshape(self.batch, *self.shape)
        self.pullback.contribute(grad, self.aligned, sink)


def _per_sample_leaf(mode, t: torch.Tensor, ndim: int, rows: int, concatenated: bool, where: Optional[int],
                     guessed: bool = False):
    """(leaf, aligned, samples dim) standing in for the derived tensor t in an op whose
    result has ``ndim`` dims and ``rows`` rows, its samples on dim ``where``."""
    batch, derived = mode.batch_size, mode.derived(t)
    if ndim == 0 or t.dim() > ndim:
        raise NotCovered("a result without a batch dimension")
    shape = (1,) * (ndim - t.dim()) + tuple(t.shape)
    if where == 1 and not concatenated and shape[1] == 1:  # sequence first [T, B, ...]
        leaf = t.detach().reshape(shape).expand(shape[0], batch, *shape[2:]).requires_grad_(True)
        return leaf, False, 1
    if shape[0] == 1 and not concatenated:
        if guessed and where != 0 and rows % batch == 0:  # read from a shape: [B * H, T, T] with T = B
            where = 0
        if where != 0:
            raise NotCovered(f"a result of {rows} rows for a batch of {batch} (its leading dimension is not the batch)")
        leaf = t.detach().reshape(shape).expand(rows, *shape[1:]).requires_grad_(True)
        return leaf, False, 0
    if shape[0] == batch and rows == batch and t.dim() == ndim:
        why = derived.pullback.per_sample_ok()
        if why is not None:
            raise NotCovered(why)
        return t.detach().requires_grad_(True), True, 0
    raise NotCovered(f"a parameter operand of shape {list(t.shape)} that neither is shared by the batch nor has "
                     f"one row per sample (batch {batch})")


def _replace(mode, value, leaves, ndim, rows, concatenated, where, guessed):
    if isinstance(value, torch.Tensor):
        derived = mode.derived(value)
        if derived is None:
            return value
        leaf, aligned, at = _per_sample_leaf(mode, value, ndim, rows, concatenated, where, guessed)
        leaves.append((derived, leaf, tuple(value.shape), aligned, at))
        return leaf
    if isinstance(value, (list, tuple)):
        return type(value)(_replace(mode, v, leaves, ndim, rows, concatenated, where, guessed) for v in value)
    return value


def _run(mode, func, args, kwargs, ndim, rows, concatenated=False, where=0, guessed=False):
    leaves = []
    new_args = tuple(_replace(mode, a, leaves, ndim, rows, concatenated, where, guessed) for a in args)
    new_kwargs = {k: _replace(mode, v, leaves, ndim, rows, concatenated, where, guessed) for k, v in kwargs.items()}
    out = func(*new_args, **new_kwargs)
    mode.mark_data(out, leaves[0][4] if leaves else where)
    for derived, leaf, shape, aligned, where in leaves:
        mode.add_use(BroadcastUse(mode, derived, leaf, shape, aligned, where))
    return out


_ELEMENTWISE_NAMES = (
    "add", "sub", "mul", "div", "true_divide", "rsub", "where", "addcmul", "addcdiv", "maximum", "minimum",
    "lerp", "pow", "fmod", "remainder", "hypot", "atan2", "copysign",
)
_OPERATOR_NAMES = (
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "__pow__", "__rpow__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
    "add_", "sub_", "mul_", "div_", "addcmul_", "addcdiv_", "lerp_",
)


def _elementwise_funcs():
    for name in _ELEMENTWISE_NAMES:
        yield getattr(torch, name, None)
        yield getattr(torch.Tensor, name, None)
    for name in _OPERATOR_NAMES:
        yield getattr(torch.Tensor, name, None)


@register(*_elementwise_funcs())
def elementwise(mode, func, args, kwargs):
    name = getattr(func, "__name__", "")
    in_place = name.endswith("_") and not name.endswith("__") or name.startswith("__i")
    if in_place and not mode.is_data(args[0]):
        raise NotCovered("an in-place update of a parameter-derived tensor")
    shapes = [t.shape for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    try:
        shape = torch.broadcast_shapes(*shapes)
    except RuntimeError:
        raise NotCovered(f"operands of shapes {[list(s) for s in shapes]} that do not broadcast") from None
    data = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and mode.is_data(t))
    guessed = mode.tracked_dim(data) is None
    where = mode.samples_dim(data)
    if where is not None:
        where += len(shape) - data.dim()  # the data operand broadcast against more dims
    return _run(mode, func, args, kwargs, len(shape), shape[0] if len(shape) else 0, where=where, guessed=guessed)


@register(torch.cat, getattr(torch, "concat", None), getattr(torch, "concatenate", None), torch.stack)
def concatenate(mode, func, args, kwargs):
    tensors = args[0] if args else kwargs.get("tensors")
    if not isinstance(tensors, (list, tuple)) or not tensors or "out" in kwargs:
        raise NotCovered("an unusual call")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
    ndim = tensors[0].dim()
    result_ndim = ndim + (1 if func is torch.stack else 0)
    if ndim == 0 or dim % result_ndim == 0:
        raise NotCovered("concatenation along the batch dimension")
    data = next((t for t in tensors if mode.is_data(t)), None)
    if data is None or mode.samples_dim(data) != 0:
        raise NotCovered("a concatenation whose data does not have the batch first")
    return _run(mode, func, args, kwargs, ndim, data.shape[0], concatenated=True, where=0)
