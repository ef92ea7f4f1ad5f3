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

import torch

from .uses import DATA, NotCovered, Sink, Use, register

__all__ = ["BroadcastUse"]


class BroadcastUse(Use):
    label = "broadcast"

    def __init__(self, mode, derived, leaf: torch.Tensor, shape, aligned: bool):
        super().__init__(derived.sampled, leaf)
        self.batch, self.pullback, self.shape, self.aligned = mode.batch_size, derived.pullback, shape, aligned

    def contribute(self, grad: torch.Tensor, sink: Sink) -> None:
        if not self.aligned:
            if grad.shape[0] != self.batch:  # batch-major flattened rows
                grad = grad.reshape(self.batch, -1, *grad.shape[1:]).sum(dim=1)
            grad = grad.reshape(self.batch, *self.shape)
        self.pullback.contribute(grad, self.aligned, sink)


def _per_sample_leaf(mode, t: torch.Tensor, ndim: int, rows: int, concatenated: bool = False):
    """(leaf, aligned) standing in for the derived tensor t in an op whose result has
    ``ndim`` dims and ``rows`` rows."""
    batch, derived = mode.batch_size, mode.derived(t)
    if ndim == 0 or t.dim() > ndim:
        raise NotCovered("a result without a batch dimension")
    shape = (1,) * (ndim - t.dim()) + tuple(t.shape)
    if shape[0] == 1 and not concatenated:
        if rows % batch:
            raise NotCovered(f"a result of {rows} rows for a batch of {batch} (its leading dimension is not the batch)")
        leaf = t.detach().reshape(shape).expand(rows, *shape[1:]).requires_grad_(True)
        return leaf, False
    if shape[0] == batch and rows == batch and t.dim() == ndim:
        why = derived.pullback.per_sample_ok()
        if why is not None:
            raise NotCovered(why)
        return t.detach().requires_grad_(True), True
    raise NotCovered(f"a parameter operand of shape {list(t.shape)} that neither is shared by the batch nor has "
                     f"one row per sample (batch {batch})")


def _replace(mode, value, leaves, ndim, rows, concatenated=False):
    if isinstance(value, torch.Tensor):
        derived = mode.derived(value)
        if derived is None:
            return value
        leaf, aligned = _per_sample_leaf(mode, value, ndim, rows, concatenated)
        leaves.append((derived, leaf, tuple(value.shape), aligned))
        return leaf
    if isinstance(value, (list, tuple)):
        return type(value)(_replace(mode, v, leaves, ndim, rows, concatenated) for v in value)
    return value


def _run(mode, func, args, kwargs, ndim, rows, concatenated=False):
    leaves = []
    new_args = tuple(_replace(mode, a, leaves, ndim, rows, concatenated) for a in args)
    new_kwargs = {k: _replace(mode, v, leaves, ndim, rows, concatenated) for k, v in kwargs.items()}
    out = func(*new_args, **new_kwargs)
    mode.mark_data(out)
    for derived, leaf, shape, aligned in leaves:
        mode.add_use(BroadcastUse(mode, derived, leaf, shape, aligned))
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
    if in_place and mode.kind(args[0]) is not DATA:
        raise NotCovered("an in-place update of a parameter-derived tensor")
    shapes = [t.shape for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    try:
        shape = torch.broadcast_shapes(*shapes)
    except RuntimeError:
        raise NotCovered(f"operands of shapes {[list(s) for s in shapes]} that do not broadcast") from None
    return _run(mode, func, args, kwargs, len(shape), shape[0] if len(shape) else 0)


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
    rows = next((t.shape[0] for t in tensors if mode.kind(t) is DATA), None)
    return _run(mode, func, args, kwargs, ndim, rows, concatenated=True)
