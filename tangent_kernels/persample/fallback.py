"""Any other op that mixes data with parameters: per-sample vector-Jacobian products of
that op alone.

An op no rule knows (``F.prelu``, ``F.conv_transpose2d``, ``F.bilinear``, a library's
own fused op) is still a use when it is *batch-separable* as far as its arguments show:
every data argument and every tensor it returns has the batch on dim 0. Its outputs'
gradients come from the batched backward like any use's; the per-sample gradients of its
parameter operands are then taken by evaluating the op again on one sample at a time
(``[b:b+1]`` of each data argument) and differentiating it alone with that sample's
output gradient: B evaluations of one op, not of the model. Whether the op really treats
samples separately is what the spot check verifies, as for every rule; an op whose
one-sample evaluation fails sends its tensors to the generic path.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .uses import Sink, Uncovered, Use, func_name, tensors_in

__all__ = ["per_op"]


def _rebuild(value, replace):
    if isinstance(value, torch.Tensor):
        return replace(value)
    if isinstance(value, (list, tuple)):
        return type(value)(replace(v) if isinstance(v, torch.Tensor) else v for v in value)
    return value


class OpUse(Use):
    label = "per-op"

    def __init__(self, mode, func, args, kwargs, outputs: List[torch.Tensor], operands):
        sampled = {id(st): st for derived, _, _ in operands for st in derived.sampled}
        data = [t for value in (*args, *kwargs.values()) for t in tensors_in(value) if mode.is_data(t)]
        super().__init__(list(sampled.values()), None, guarded=data)
        self.targets = [torch.autograd.graph.get_gradient_edge(t) for t in outputs]
        self.func, self.args, self.kwargs, self.batch = func, args, kwargs, mode.batch_size
        self.operands = operands  # [(derived, tensor, aligned)]
        self._data = {id(t) for t in data}

    def contribute_all(self, grads: List[Optional[torch.Tensor]], sink: Sink) -> None:
        if all(g is None for g in grads):
            return
        per_sample = [[] for _ in self.operands]
        positions = {id(t): i for i, (_, t, _) in enumerate(self.operands)}
        try:
            for b in range(self.batch):
                leaves = [(t[b:b + 1] if aligned else t).detach().requires_grad_(True)
                          for _, t, aligned in self.operands]

                def one_sample(t):
                    if id(t) in self._data:
                        return t[b:b + 1]
                    return leaves[positions[id(t)]] if id(t) in positions else t

                with torch.enable_grad():
                    out = self.func(*[_rebuild(a, one_sample) for a in self.args],
                                    **{k: _rebuild(v, one_sample) for k, v in self.kwargs.items()})
                pairs = [(o, g[b:b + 1]) for o, g in zip(tensors_in(out), grads) if g is not None and o.requires_grad]
                found = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
                for i, (leaf, g) in enumerate(zip(leaves, found)):
                    per_sample[i].append(torch.zeros_like(leaf) if g is None else g)
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            why = f"{func_name(self.func)}: evaluating it on one sample failed ({type(error).__name__}: {str(error)[:150]})"
            raise Uncovered({st.name: why for st in self.sampled}) from None
        for (derived, tensor, aligned), grad in zip(self.operands, per_sample):
            grad = torch.cat(grad)
            derived.pullback.contribute(grad if aligned else grad.reshape(self.batch, *tensor.shape), aligned, sink)


def per_op(mode, func, args, kwargs, derived_inputs):
    """The op as a per-op use, or None (the caller reports why) when it is not batch-separable."""
    batch = mode.batch_size
    operands = []
    for value in (*args, *kwargs.values()):
        for t in tensors_in(value):
            if mode.is_data(t) and (t.dim() == 0 or t.shape[0] != batch or mode.samples_dim(t) != 0):
                return None, f"a data argument of shape {list(t.shape)} without the batch on dim 0"
            derived = mode.derived(t)
            if derived is not None and all(t is not other for _, other, _ in operands):
                aligned = t.dim() > 0 and t.shape[0] == batch and derived.pullback.per_sample_ok() is None
                operands.append((derived, t, aligned))
    out = func(*args, **kwargs)
    mode.mark_data(out)
    outputs = [t for t in tensors_in(out) if t.requires_grad]
    if not outputs:
        return out, None
    if any(t.dim() == 0 or t.shape[0] != batch for t in tensors_in(out)):
        mode.uncover(derived_inputs, f"{func_name(func)} (no rule; its results do not have the batch on dim 0)")
        return out, None
    mode.add_use(OpUse(mode, func, args, kwargs, outputs, operands))
    return out, None
