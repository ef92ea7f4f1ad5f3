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

from .samples import FIRST, Samples, by_sample
from .rules import NotCovered, Sink, Use, register

__all__ = ["BroadcastUse"]


class BroadcastUse(Use):
    label = "broadcast"

    def __init__(self, mode, derived, leaf: torch.Tensor, shape, aligned: bool, samples: Samples = FIRST):
        super().__init__(derived.sampled, leaf)
        self.batch, self.pullback, self.shape, self.aligned = mode.batch_size, derived.pullback, shape, aligned
        self.samples = samples  # where the leaf holds them

    def path(self, st) -> str:
        return "broadcast" if self.pullback.label == "view" else f"broadcast ({self.pullback.label})"

    def contribute(self, grad: torch.Tensor, sink: Sink) -> None:
        if not self.aligned:  # the rows of each sample (the leaf's size there is 1 + the fold) summed
            grad = by_sample(grad, self.samples, self.batch).sum(dim=(1, 2)).reshape(self.batch, *self.shape)
        self.pullback.contribute(grad, self.aligned, sink)


def _per_sample_leaf(mode, t: torch.Tensor, out_shape, concatenated: bool, samples: Samples):
    """(leaf, aligned) standing in for the derived tensor t in an op whose result has
    ``out_shape`` and holds its samples as ``samples`` says."""
    batch, derived = mode.batch_size, mode.derived(t)
    ndim = len(out_shape)
    if ndim == 0 or t.dim() > ndim:
        raise NotCovered("a result without a batch dimension")
    at = samples.dim
    shape = (1,) * (ndim - t.dim()) + tuple(t.shape)
    if shape[at] == 1 and not concatenated:  # shared by the batch: one copy per row of the samples' dim
        target = shape[:at] + (out_shape[at],) + shape[at + 1:]
        return t.detach().reshape(shape).expand(target).requires_grad_(True), False
    if at == 0 and samples.exact(out_shape, batch) and shape[0] == batch and t.dim() == ndim:
        why = derived.pullback.per_sample_ok()
        if why is not None:
            raise NotCovered(why)
        return t.detach().requires_grad_(True), True
    raise NotCovered(f"a parameter operand of shape {list(t.shape)} that neither is shared by the batch nor has "
                     f"one row per sample (batch {batch}, samples on dim {at} of {list(out_shape)})")


def _replace(mode, value, leaves, out_shape, concatenated, samples):
    if isinstance(value, torch.Tensor):
        derived = mode.derived(value)
        if derived is None:
            return value
        leaf, aligned = _per_sample_leaf(mode, value, out_shape, concatenated, samples)
        leaves.append((derived, leaf, tuple(value.shape), aligned))
        return leaf
    if isinstance(value, (list, tuple)):
        return type(value)(_replace(mode, v, leaves, out_shape, concatenated, samples) for v in value)
    return value


def _run(mode, func, args, kwargs, out_shape, samples: Samples, result: Samples, concatenated=False):
    """samples: where the result holds them as the leaves see it; result: how to mark it."""
    leaves = []
    new_args = tuple(_replace(mode, a, leaves, out_shape, concatenated, samples) for a in args)
    new_kwargs = {k: _replace(mode, v, leaves, out_shape, concatenated, samples) for k, v in kwargs.items()}
    out = func(*new_args, **new_kwargs)
    mode.mark_data(out, result)
    for derived, leaf, shape, aligned in leaves:
        mode.add_use(BroadcastUse(mode, derived, leaf, shape, aligned, samples))
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


def _broadcast_shapes(shapes):
    """torch.broadcast_shapes for plain sizes (torch's goes through its Python reference
    implementation: 40 us a call, every elementwise use of every batch)."""
    out = [1] * max((len(shape) for shape in shapes), default=0)
    for shape in shapes:
        for at, n in enumerate(shape, len(out) - len(shape)):
            if n != 1:
                if out[at] == 1:
                    out[at] = n
                elif out[at] != n:
                    raise NotCovered(f"operands of shapes {[list(s) for s in shapes]} that do not broadcast")
    return torch.Size(out)


@register(*_elementwise_funcs())
def elementwise(mode, func, args, kwargs):
    name = getattr(func, "__name__", "")
    in_place = name.endswith("_") and not name.endswith("__") or name.startswith("__i")
    if in_place and not mode.is_data(args[0]):
        raise NotCovered("an in-place update of a parameter-derived tensor")
    shapes = [t.shape for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    shape = _broadcast_shapes(shapes)
    data = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and mode.is_data(t)]
    found = {Samples(s.dim + len(shape) - t.dim(), s.inner) for t in data
             for s in [mode.samples_of(t, "the data operand")]}  # broadcast against more dims
    if len(found) != 1:
        raise NotCovered("data operands with their samples on different dims")
    samples = found.pop()
    if not samples.fits(shape, mode.batch_size) or any(shape[samples.dim] != t.shape[samples.dim - len(shape) + t.dim()]
                                                       for t in data):
        raise NotCovered(f"a result of shape {list(shape)} that broadcasts the samples' dim")
    return _run(mode, func, args, kwargs, tuple(shape), samples, samples)


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
    if data is None:
        raise NotCovered("an unusual call")
    samples = mode.samples_of(data, "the concatenated data")
    if samples.dim != 0 or not samples.exact(data.shape, mode.batch_size) \
            or any(mode.samples(t) not in (None, samples) for t in tensors):
        raise NotCovered("a concatenation whose data does not have the batch first")
    result = Samples(1 if func is torch.stack and dim % result_ndim == 0 else 0)
    return _run(mode, func, args, kwargs, tuple(data.shape), samples, result, concatenated=True)
