"""Any other op that mixes data with parameters: per-sample vector-Jacobian products of
that op alone.

An op no rule knows (``F.prelu``, ``F.conv_transpose2d``, ``F.bilinear``, an LSTM's fused
op, a library's own) is still a use when it is *batch-separable* as far as its arguments
show: every data argument and every tensor it returns has one slice per sample (on dim 0,
or on dim 1 as an LSTM's hidden states [layers, B, hidden]). Its outputs'
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

from .samples import Samples, lost
from .rules import Sink, Uncovered, Use, func_name, tensors_in

__all__ = ["per_op"]


def _rebuild(value, replace):
    if isinstance(value, torch.Tensor):
        return replace(value)
    if isinstance(value, (list, tuple)):
        return type(value)(replace(v) if isinstance(v, torch.Tensor) else v for v in value)
    return value


class OpUse(Use):
    label = "per-op"

    def __init__(self, mode, func, args, kwargs, outputs, operands, sliced):
        """outputs: [(tensor, samples dim)] of the results autograd tracks; operands:
        [(derived, tensor, aligned)]; sliced: id(argument tensor) -> its samples dim."""
        sampled = {id(st): st for derived, _, _ in operands for st in derived.sampled}
        data = [t for value in (*args, *kwargs.values()) for t in tensors_in(value) if mode.is_data(t)]
        super().__init__(list(sampled.values()), None, guarded=data)
        self.targets = [torch.autograd.graph.get_gradient_edge(t) for t, _ in outputs]
        self.output_dims = [dim for _, dim in outputs]
        self.func, self.args, self.kwargs, self.batch = func, args, kwargs, mode.batch_size
        self.operands, self.sliced = operands, sliced

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
                    if id(t) in positions:
                        return leaves[positions[id(t)]]
                    dim = self.sliced.get(id(t))
                    return t if dim is None else t.narrow(dim, b, 1)

                with torch.enable_grad():
                    out = self.func(*[_rebuild(a, one_sample) for a in self.args],
                                    **{k: _rebuild(v, one_sample) for k, v in self.kwargs.items()})
                results = [t for t in tensors_in(out) if t.requires_grad]
                pairs = [(o, g.narrow(dim, b, 1)) for o, g, dim in zip(results, grads, self.output_dims)
                         if g is not None]
                found = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
                for i, (leaf, g) in enumerate(zip(leaves, found)):
                    per_sample[i].append(torch.zeros_like(leaf) if g is None else g)
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            why = f"{func_name(self.func)}: evaluating it on one sample failed ({type(error).__name__}: {str(error)[:150]})"
            raise Uncovered({st.name: why for st in self.sampled}) from None
        for (derived, tensor, aligned), grad in zip(self.operands, per_sample):
            grad = torch.cat(grad)
            derived.pullback.contribute(grad if aligned else grad.reshape(self.batch, *tensor.shape), aligned, sink)


# How far the op evaluated on one sample may differ from the batch's row of it (relative
# to the batch's largest entry): rounding only. Samples read from the wrong dim differ
# by the size of the values.
_PROBE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def _exact_dims(batch: int, shape) -> List[int]:
    return [d for d, size in enumerate(shape) if size == batch]


def _probe(func, args, kwargs, results, sliced, batch: int):
    """The op again on sample 0 alone: (the dim of each result that holds the samples, or
    None where the shapes do not say, why not). The sample's results must be the batch's
    row 0, which checks that the slicing was right and that the op keeps samples apart."""
    def first(t):
        dim = sliced.get(id(t))
        return t if dim is None else t.narrow(dim, 0, 1)

    try:
        with torch.no_grad():
            one = tensors_in(func(*[_rebuild(a, first) for a in args],
                                  **{k: _rebuild(v, first) for k, v in kwargs.items()}))
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        return None, f"evaluating it on one sample failed ({type(error).__name__}: {str(error)[:150]})"
    if len(one) != len(results):
        return None, "one sample gives another number of results"
    dims = []
    for batched, single in zip(results, one):
        if batched.dim() != single.dim():
            return None, "one sample's result has other dims"
        differ = [d for d in range(batched.dim()) if batched.shape[d] != single.shape[d]]
        if not differ:  # one sample (any dim of size 1 holds it), or a result shared by the batch
            dims.append(next((d for d in range(batched.dim()) if batched.shape[d] == 1), None) if batch == 1
                        else None)
            continue
        if len(differ) != 1 or single.shape[differ[0]] != 1:
            return None, f"results of shape {list(batched.shape)} for the batch, {list(single.shape)} for one sample"
        dim = differ[0]
        row = batched.detach().narrow(dim, 0, 1)
        if row.is_floating_point():
            scale = float(row.abs().max()) if row.numel() else 0.0
            tolerance = _PROBE_TOLERANCE.get(row.dtype, 1e-2) * max(scale, 1e-30)
            if row.numel() and float((row - single.to(row.dtype)).abs().max()) > tolerance:
                return None, "one sample's result differs from the batch's row (the op mixes samples)"
        elif not torch.equal(row, single):
            return None, "one sample's result differs from the batch's row (the op mixes samples)"
        dims.append(dim)
    return dims, None


def per_op(mode, func, args, kwargs, derived_inputs):
    """Record the op as a per-op use and return (its result, None); or (None, why) when
    its arguments do not show one slice per sample (nothing was run then)."""
    batch = mode.batch_size
    operands, sliced, constants = [], {}, []
    for value in (*args, *kwargs.values()):
        for t in tensors_in(value):
            derived = mode.derived(t)
            if derived is not None:
                if all(t is not other for _, other, _ in operands):
                    aligned = t.dim() > 0 and t.shape[0] == batch and derived.pullback.per_sample_ok() is None \
                        and t.stride(0) == 0
                    operands.append((derived, t, aligned))
                continue
            samples = mode.samples(t)
            if samples is None:
                # A constant with a dim of exactly B (an LSTM's zero initial state [layers, B,
                # hidden]) may be per sample: tried below, the probe decides.
                if _exact_dims(batch, t.shape):
                    constants.append(t)
                continue
            if not samples.exact(t.shape, batch):
                why = samples.why if not samples.known() else f"its samples on dim {samples.dim} folded with others"
                return None, f"a data argument of shape {list(t.shape)} without one slice per sample ({why})"
            sliced[id(t)] = samples.dim
    out = func(*args, **kwargs)
    results = tensors_in(out)
    # The constants as they are, then sliced on their (first, then second, ...) dim of size
    # B; the first try under which every result autograd tracks has one slice per sample.
    tries = max((len(_exact_dims(batch, t.shape)) for t in constants), default=0)
    dims, why = None, None
    for k in range(-1, tries):
        trial = dict(sliced)
        for t in constants if k >= 0 else ():
            candidates = _exact_dims(batch, t.shape)
            trial[id(t)] = candidates[min(k, len(candidates) - 1)]
        found, failed = _probe(func, args, kwargs, results, trial, batch)
        if found is not None and any(dim is None for t, dim in zip(results, found) if t.requires_grad):
            found, failed = None, "a result without one slice per sample"
        if found is not None:
            dims, sliced = found, trial
            break
        why = why or failed
    if dims is None:
        for t in results:
            mode.mark_data(t, lost(f"{func_name(func)}: {why}"))
        mode.uncover(derived_inputs, f"{func_name(func)} (no rule; {why})")
        return out, None
    for t, dim in zip(results, dims):
        mode.mark_data(t, Samples(dim) if dim is not None else lost(f"{func_name(func)}: a result shared by the batch"))
    outputs = [(t, dim) for t, dim in zip(results, dims) if t.requires_grad]
    if not outputs:
        return out, None
    mode.add_use(OpUse(mode, func, args, kwargs, outputs, operands, sliced))
    return out, None
