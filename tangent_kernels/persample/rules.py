"""The rule API of the batched pass: what a rule (linear.py, conv.py, embedding.py,
broadcast.py, decompose.py, fallback.py) registers, receives and hands back.

- ``register`` / ``register_derived``: a rule for the torch functions it takes, in the
  registry ``UseMode`` (uses.py) consults for every op that mixes data with parameters;
- ``Use``: one such call, whose ``contribute`` turns the gradient at its output into the
  sampled entries of every parameter it involves; ``Sink``: where those entries go;
- ``ViewPullback`` / ``AutogradPullback`` / ``Derived``: what is known of a tensor computed
  from parameters alone, and how per-sample gradients at it reach the parameters;
- ``NotCovered`` (a rule declines a call) and ``Uncovered`` (tensors the batched pass
  cannot serve, with why).
Kept apart from the interception (uses.py) so that a rule depends on this API only.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .views import SampledTensor, geometry_of, is_the_leaf

__all__ = ["AutogradPullback", "Derived", "NotCovered", "Sink", "Uncovered", "Use", "ViewOfPullback", "ViewPullback",
           "bind", "func_name", "register", "register_derived", "tensors_in", "whole_vector"]


class Uncovered(Exception):
    """Parameter tensors that the batched pass cannot serve, each with the reason."""

    def __init__(self, why: Dict[str, str]):
        super().__init__("; ".join(f"{name}: {reason}" for name, reason in why.items()))
        self.why = dict(why)


class NotCovered(Exception):
    """A rule cannot take this call (the reason says why); the op runs plainly."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


# func -> rule(mode, func, args, kwargs) -> output, for ops that mix data and derived tensors.
_RULES: Dict[Callable, Callable] = {}
# func -> rule(mode, func, args, kwargs, derived) -> output, for ops on derived tensors alone
# that deserve a cheaper pullback than autograd's.
_DERIVED_RULES: Dict[Callable, Callable] = {}


def register(*funcs):
    def decorate(rule):
        for func in funcs:
            if func is not None:
                _RULES[func] = rule
        return rule
    return decorate


def register_derived(*funcs):
    def decorate(rule):
        for func in funcs:
            _DERIVED_RULES[func] = rule
        return rule
    return decorate


def func_name(func) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    module = getattr(func, "__module__", None) or ""
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    return name if "." in name or not module else f"{module.replace('torch._C._nn', 'F')}.{name}"


_SIGNATURES: Dict[Callable, inspect.Signature] = {}
# func -> (its parameters' names, their defaults) for a signature of plain parameters
# (no *args, **kwargs, positional-only): bound without inspect's machinery, which cost
# 40 us a call (a layer norm per block, every batch); None: inspect binds it.
_PLAIN: Dict[Callable, Optional[tuple]] = {}


def _plain(signature: inspect.Signature) -> Optional[tuple]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = list(signature.parameters.values())
    if any(p.kind not in kinds for p in parameters):
        return None
    positional = sum(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters)
    return tuple(p.name for p in parameters), {p.name: p.default for p in parameters}, positional


def bind(func, args, kwargs, signature: Optional[inspect.Signature] = None) -> Dict[str, Any]:
    """The call's arguments by parameter name, defaults filled in."""
    if signature is None:
        signature = _SIGNATURES.get(func)
        if signature is None:
            signature = _SIGNATURES[func] = inspect.signature(func)
            _PLAIN[func] = _plain(signature)
        plain = _PLAIN.get(func)
        if plain is not None:
            names, defaults, positional = plain
            if len(args) <= positional and not any(name in kwargs for name in names[:len(args)]) \
                    and all(key in defaults for key in kwargs):
                bound = dict(zip(names, args))
                bound.update(kwargs)
                if len(bound) < len(names):
                    for name in names:
                        if name not in bound:
                            if defaults[name] is inspect.Parameter.empty:
                                break  # a missing argument: inspect says which
                            bound[name] = defaults[name]
                    else:
                        return {name: bound[name] for name in names}
                else:
                    return {name: bound[name] for name in names}
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


class Sink:
    """Where contributions go for one batch: out [B, p], whose batched columns start at zero."""

    def __init__(self, out: torch.Tensor, backend: str, use_counts: Dict[str, int], dense=None,
                 dead_tokens: Optional[Dict[str, bool]] = None, factors=None):
        self.out, self.backend, self.use_counts, self.dense = out, backend, use_counts, dense
        self.factors = factors  # factors.FactorSink of the structured tensors, or None
        # use key -> whether its output gradient had tokens that are zero for every sample
        # (kept across batches by the batched pass; linear.py).
        self.dead_tokens = {} if dead_tokens is None else dead_tokens

    def overwrites(self, st: SampledTensor, unique: bool) -> bool:
        """Whether a contribution may be written instead of added (the only one for st)."""
        return unique and self.use_counts.get(st.name, 0) == 1

    def add(self, st: SampledTensor, columns: torch.Tensor, values: torch.Tensor, unique: bool,
            rows: slice = slice(None)) -> None:
        values = values.to(self.out.dtype)
        span = st.span(columns)
        if span is not None:
            if self.overwrites(st, unique) and rows == slice(None):
                self.out[:, span] = values
            else:
                self.out[rows, span] += values
        elif self.overwrites(st, unique) and rows == slice(None):
            self.out[:, columns] = values
        else:
            self.out[rows].index_add_(1, columns, values)


class Use:
    """One call that consumes derived tensors together with data.

    target: the tensor or autograd edge whose gradient the use needs (ds/d(target) for
    every sample at once, read from one batched backward). ``contribute`` turns that
    gradient into the sampled entries of every parameter involved.
    """

    label = "use"

    def __init__(self, sampled: Sequence[SampledTensor], target, guarded: Sequence[torch.Tensor] = ()):
        self.sampled = tuple(sampled)
        self.target = target
        self.targets = [target]  # a use with several outputs has several
        # Names this use across batches (uses come in the same order every forward):
        # "<first tensor> <label> #<k-th such use of it>"; set by the batched pass.
        self.key = ""
        # Inputs the contraction reads after the forward: an in-place change to one of them
        # (after the use) would make it read other values than the op did.
        self._guarded = [(t, t._version) for t in guarded]

    def path(self, st: SampledTensor) -> str:
        """How this use reaches st, for the coverage report."""
        return self.label

    def changed_input(self) -> bool:
        return any(t._version != version for t, version in self._guarded)

    def contribute_all(self, grads: List[Optional[torch.Tensor]], sink: Sink) -> None:
        """The gradients at ``targets`` (None where nothing reached one) -> F."""
        if grads[0] is not None:
            self.contribute(grads[0], sink)

    def contribute(self, grad: torch.Tensor, sink: Sink) -> None:
        raise NotImplementedError

    def factor_form(self, st: SampledTensor):
        """A ``structured.FactorForm`` when this use hands st's per-sample gradient as
        factors (structured Gram), else None: features only."""
        return None

    def absorbable_bias(self, st: SampledTensor) -> Optional[str]:
        """The name of a whole 1-D bias this use adds to the output of weight ``st``'s
        factor form, with the same scale, so that appending a constant 1 to the input
        factor gives the bias' gradient too (structured.plan); else None."""
        return None


class ViewPullback:
    """A derived tensor that is a parameter leaf or a strided view of it."""

    label = "view"

    def __init__(self, st: SampledTensor, view: torch.Tensor):
        self.st, self.geometry = st, geometry_of(view, st.leaf)

    def per_sample_ok(self) -> Optional[str]:
        """None when a view of shape [B, ...] shows every sample the same entries."""
        size, stride, _ = self.geometry
        return None if stride[0] == 0 or size[0] == 1 else "a parameter view whose rows are different entries"

    def contribute(self, grad: torch.Tensor, aligned: bool, sink: Sink) -> None:
        """grad [B, *shape]: per-sample gradients at the whole view (aligned: at its row b)."""
        size, stride, offset = self.geometry
        if aligned:
            size, stride = size[1:], stride[1:]
        elements, columns, unique = self.st.hits((size, stride, offset))
        if elements.numel():
            sink.add(self.st, columns, grad.reshape(grad.shape[0], -1)[:, elements], unique)


# Bytes of per-sample parameter gradients the autograd pullback forms at once.
_AUTOGRAD_PULLBACK_BYTES = 256 << 20


class AutogradPullback:
    """Any other derived tensor D = f(P, ...): per-sample vector-Jacobian products through
    f by autograd (``is_grads_batched``), which forms the full per-sample gradient of
    each parameter involved, a few samples at a time. Used for small computations on
    parameters (``1 + weight``, a table indexed with negative positions)."""

    label = "autograd"

    def __init__(self, tensor: torch.Tensor, sampled: Sequence[SampledTensor]):
        self.tensor, self.sampled = tensor, tuple(sampled)

    def per_sample_ok(self) -> Optional[str]:
        return None

    def contribute(self, grad: torch.Tensor, aligned: bool, sink: Sink) -> None:
        batch, tensor = grad.shape[0], self.tensor
        leaves = [st.leaf for st in self.sampled]
        per_sample = sum(leaf.numel() for leaf in leaves) + (tensor.numel() if aligned else 0)
        chunk = max(1, _AUTOGRAD_PULLBACK_BYTES // max(per_sample * grad.element_size(), 1))
        for start in range(0, batch, chunk):
            stop = min(start + chunk, batch)
            if aligned:  # grad[b] is the gradient at row b of the tensor alone
                seeds = grad.new_zeros((stop - start,) + tuple(tensor.shape))
                seeds[torch.arange(stop - start), torch.arange(start, stop)] = grad[start:stop]
            else:
                seeds = grad[start:stop].reshape((stop - start,) + tuple(tensor.shape))
            try:
                grads = torch.autograd.grad(tensor, leaves, seeds, retain_graph=True, allow_unused=True,
                                            is_grads_batched=True)
            except RuntimeError:  # an op without a batching rule: one sample at a time
                per = [torch.autograd.grad(tensor, leaves, seed, retain_graph=True, allow_unused=True)
                       for seed in seeds]
                grads = [None if per[0][i] is None else torch.stack([g[i] for g in per]) for i in range(len(leaves))]
            for st, g in zip(self.sampled, grads):
                if g is not None and st.m:
                    sink.add(st, st.columns, g.reshape(stop - start, -1)[:, st.local], True, rows=slice(start, stop))


class ViewOfPullback:
    """A view of a derived tensor whose own pullback is cheaper than autograd's (a table
    read at shared indices, embedding.py): the per-sample gradients at the view are
    scattered back to the whole tensor (the view's adjoint: an index_add over its element
    positions) and go through that pullback. T5's relative-attention bias is such a
    view (a permute and an unsqueeze of an embedding lookup)."""

    label = "view of a derived tensor"

    def __init__(self, base_pullback, base: torch.Tensor, view: torch.Tensor, fallback: AutogradPullback):
        self.base_pullback, self.base_shape = base_pullback, tuple(base.shape)
        self.size, self.stride, self.offset = geometry_of(view, base)
        self.fallback = fallback  # the aligned case (rows per sample), which the base's rows do not follow
        self.label = base_pullback.label

    def per_sample_ok(self) -> Optional[str]:
        return self.fallback.per_sample_ok()

    def contribute(self, grad: torch.Tensor, aligned: bool, sink: Sink) -> None:
        if aligned:
            self.fallback.contribute(grad, aligned, sink)
            return
        positions = torch.full((), self.offset, dtype=torch.int64, device=grad.device)
        for n, s in zip(self.size, self.stride):
            positions = positions.unsqueeze(-1) + torch.arange(n, device=grad.device) * s
        batch = grad.shape[0]
        whole = grad.new_zeros((batch, math.prod(self.base_shape)))
        whole.index_add_(1, positions.reshape(-1), grad.reshape(batch, -1))
        self.base_pullback.contribute(whole.reshape((batch,) + self.base_shape), False, sink)


class Derived:
    """What the mode knows of a derived tensor: its pullback and the parameters it holds."""

    __slots__ = ("pullback", "sampled")

    def __init__(self, pullback, sampled: Sequence[SampledTensor]):
        self.pullback, self.sampled = pullback, tuple(sampled)


def tensors_in(value) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def whole_vector(view, width: int) -> Optional[str]:
    """The leaf's name when ``view`` (a ViewPullback or Operand) is a whole 1-D leaf of
    ``width`` entries in its own order, else None."""
    st, geometry = getattr(view, "st", None), getattr(view, "geometry", None)
    if st is None or geometry is None or st.leaf.dim() != 1 or st.leaf.numel() != width:
        return None
    return st.name if is_the_leaf(geometry, st.leaf) else None
