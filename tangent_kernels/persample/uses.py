"""Interception of parameter uses: a ``TorchFunctionMode`` over the batched forward.

Every torch function called during the forward passes through ``UseMode``, which keeps
one fact per tensor it has seen:
- *data*: computed from the batch (its rows belong to samples);
- *derived*: computed from sampled parameters alone (the parameter leaves themselves,
  their views, ``P.expand(B, ...)``, ``embedding(position_ids, P)``, ...), with a
  *pullback* that turns per-sample gradients at that tensor into the sampled entries;
- neither: a constant (buffers, masks, ``arange``), not tracked.
An op whose inputs are data only, or constants only, just runs. An op whose inputs are
derived only yields a derived tensor. An op that *mixes* data with derived tensors is a
*use*: a rule (linear.py, conv.py, embedding.py, broadcast.py, decompose.py) runs it and
records what the per-sample gradient of the derived operand needs; if no rule fits, the
parameters involved are reported uncovered (with why) and go down the generic path.
Module types and class names play no part: a weight used functionally inside another
module, a tied weight used by two layers, a layer called twice are all just uses, and the
contributions of all uses of a parameter add up.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode

from .samples import FIRST, Samples, factory, follow, lost
from .views import SampledTensor, geometry_of, is_the_leaf

_log = logging.getLogger("tangent_kernels")

__all__ = ["DATA", "Derived", "NotCovered", "Uncovered", "Use", "UseMode", "Sink", "register", "register_derived",
           "ViewPullback", "AutogradPullback", "bind", "func_name"]


DATA = FIRST  # the model's inputs: sample b is row b of dim 0


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


def bind(func, args, kwargs, signature: Optional[inspect.Signature] = None) -> Dict[str, Any]:
    """The call's arguments by parameter name, defaults filled in."""
    if signature is None:
        signature = _SIGNATURES.get(func)
        if signature is None:
            signature = _SIGNATURES[func] = inspect.signature(func)
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
    parameters (a relative-position bias gathered by a buffer index, ``1 + weight``)."""

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


class Derived:
    """What the mode knows of a derived tensor: its pullback and the parameters it holds."""

    __slots__ = ("pullback", "sampled")

    def __init__(self, pullback, sampled: Sequence[SampledTensor]):
        self.pullback, self.sampled = pullback, tuple(sampled)


_NOT_WRITES = {"requires_grad_", "retain_grad", "share_memory_"}


def _storage(t: torch.Tensor) -> int:
    """The address of a tensor's memory: the same for its views and aliases."""
    return t.untyped_storage().data_ptr()


def _writes_in_place(func) -> bool:
    name = getattr(func, "__name__", "")
    if name in _NOT_WRITES:
        return False
    return (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or name in ("__setitem__",)


def _detaches(func, args, out) -> bool:
    """Whether a data op returned tensors cut off the graph of inputs that autograd tracks."""
    if not any(t.requires_grad for value in args for t in tensors_in(value)):
        return False
    results = tensors_in(out)
    return bool(results) and not any(t.requires_grad for t in results) and any(t.is_floating_point() for t in results)


def tensors_in(value) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


class UseMode(TorchFunctionMode):
    """The interception for one batched forward (see the module docstring)."""

    def __init__(self, sampled: Sequence[SampledTensor], batch_size: int, backend: str):
        super().__init__()
        self.batch_size, self.backend = batch_size, backend
        self._by_leaf = {id(st.leaf): st for st in sampled}
        self._kinds: Dict[int, Tuple[weakref.ref, Any]] = {}
        self.uses: List[Use] = []
        self.uncovered: Dict[str, str] = {}
        # The first op that cut data tracked by autograd off its graph (detach, no_grad).
        self.detached: Optional[str] = None
        # The batch's own tensors (and their bases), and which module is running (watch_inputs).
        self._inputs: set = set()
        self._parameters: Dict[int, str] = {}
        self._originals: Dict[int, str] = {}
        self._module_stack: Optional[list] = None
        self._module_names: Dict[int, str] = {}
        for st in sampled:
            self.set_kind(st.leaf, Derived(ViewPullback(st, st.leaf), (st,)))

    # --- what is known of a tensor ---
    def set_kind(self, t: torch.Tensor, kind) -> None:
        self._kinds[id(t)] = (weakref.ref(t), kind)

    def kind(self, t) -> Any:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self._kinds.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def derived(self, t) -> Optional[Derived]:
        kind = self.kind(t)
        return kind if isinstance(kind, Derived) else None

    def is_data(self, t) -> bool:
        return isinstance(self.kind(t), Samples)

    def samples(self, t) -> Optional[Samples]:
        """Where data tensor t holds its samples (followed from the batch: samples.py);
        None for a tensor that is not data."""
        kind = self.kind(t)
        return kind if isinstance(kind, Samples) else None

    def samples_of(self, t, what: str) -> Samples:
        """The Samples of data tensor t, or NotCovered naming ``what`` and why they are lost."""
        kind = self.samples(t)
        if kind is None or not kind.known():
            why = kind.why if kind is not None else "not computed from the batch"
            raise NotCovered(f"{what} of shape {list(t.shape)}: which dim holds the samples is not known ({why})")
        if not kind.fits(t.shape, self.batch_size):
            raise NotCovered(f"{what} of shape {list(t.shape)} cannot hold the samples on dim {kind.dim} "
                             f"(batch {self.batch_size})")
        return kind

    def mark_data(self, value, samples: Optional[Samples] = FIRST) -> None:
        for t in tensors_in(value):
            self.set_kind(t, samples if samples is not None else lost("not followed"))

    def _propagate(self, func, args, kwargs, out) -> None:
        """Mark a data op's results with where their samples are (samples.follow)."""
        if factory(func):
            return  # x.new_zeros(...), torch.zeros_like(x): constants
        results = tensors_in(out)
        if results:
            for t, samples in zip(results, follow(func, args, kwargs, results, self.samples, self.batch_size)):
                self.set_kind(t, samples)
        elif getattr(func, "__name__", "") == "__setitem__" and args and isinstance(args[0], torch.Tensor) \
                and not self.is_data(args[0]):
            # Data written into a constant (a buffer filled by indexing): where its samples
            # are is not followed.
            target = args[0]
            self.set_kind(target, Samples(0, target.shape[0]) if self.batch_size == 1 and target.dim()
                          else lost("__setitem__ wrote data into a tensor that held none"))

    def mark_derived(self, value, derived_inputs: Sequence[Derived]) -> None:
        sampled = {id(st): st for d in derived_inputs for st in d.sampled}
        for t in tensors_in(value):
            if not t.requires_grad:  # e.g. .detach(): no gradient flows through it
                continue
            root = t if t._base is None else t._base
            st = self._by_leaf.get(id(root))
            if st is not None and st.leaf is root:
                self.set_kind(t, Derived(ViewPullback(st, t), (st,)))
            else:
                self.set_kind(t, Derived(AutogradPullback(t, list(sampled.values())), list(sampled.values())))

    def add_use(self, use: Use) -> None:
        self.uses.append(use)

    def uncover(self, derived: Sequence[Derived], why: str) -> None:
        for d in derived:
            for st in d.sampled:
                self.uncovered.setdefault(st.name, why)

    def reenter(self, fn: Callable, *args, **kwargs):
        """Run ``fn`` with the mode active again (handlers run with it popped): for rules
        that rewrite one call as several, each of which the mode then sees."""
        with self:
            return fn(*args, **kwargs)

    def watch_inputs(self, tensors: Sequence[torch.Tensor], module_stack: Optional[list] = None,
                     module_names: Optional[Dict[int, str]] = None,
                     parameters: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """The batch's own tensors and the model's parameters: the forward must not write
        them, nor any view or alias of them (``.data``, ``.detach()``): they share memory
        with the caller's."""
        self._inputs = {_storage(t) for t in tensors if t.numel()}
        self._parameters = {_storage(t): name for name, t in (parameters or {}).items() if t.numel()}
        # The caller's parameter objects: the evaluation substitutes every one of them, so
        # one (or a view of one) that reaches an op was kept where functional_call cannot
        # see it (a plain attribute, a list, a closure): its gradient would be lost.
        self._originals = {id(t): name for name, t in (parameters or {}).items()}
        self._module_stack, self._module_names = module_stack, module_names or {}

    def _stale_name(self, t: torch.Tensor) -> Optional[str]:
        name = self._originals.get(id(t))
        if name is None and t._base is not None:
            name = self._originals.get(id(t._base))
        return name

    def _refuse_stale_parameter(self, func, t: torch.Tensor, out=None) -> None:
        """out: the op's result, when it ran (metadata reads, .detach(), .item() carry no
        gradient and pass); None: refuse."""
        if out is not None and not any(r.requires_grad for r in tensors_in(out)):
            return
        name = self._stale_name(t)
        stack = self._module_stack
        where = f" in module {self._module_names.get(id(stack[-1]), type(stack[-1]).__name__)!r}" if stack else ""
        raise ValueError(
            f"the model's forward uses parameter {name} (or a view of it) through a reference kept outside the "
            f"module's parameters ({func_name(func)}{where}), e.g. self.w_t = self.w.t() made in __init__ or a "
            "list holding the parameter: tangent_kernels substitutes the parameters for every evaluation "
            "(torch.func.functional_call), so the gradient through that reference would be lost. Compute the "
            "view in forward from the registered parameter"
        )

    def _refuse_in_place_write(self, func, target) -> None:
        if not isinstance(target, torch.Tensor):
            return
        where = ""
        stack = self._module_stack
        if stack:
            where = f" in module {self._module_names.get(id(stack[-1]), type(stack[-1]).__name__)!r}"
        storage = _storage(target) if target.numel() else None
        if storage in self._inputs:
            raise ValueError(
                f"the model writes its input in place ({func_name(func)}{where}): tangent_kernels evaluates a "
                "batch more than once and never changes the caller's data. Compute out of place in forward "
                "(e.g. x = x * 2 instead of x.mul_(2), or x = x.clone() first)"
            )
        derived = self.derived(target)
        if derived is not None or storage in self._parameters:
            names = ", ".join(st.name for st in derived.sampled) if derived is not None else self._parameters[storage]
            raise ValueError(
                f"the model writes parameter {names} in place during its forward ({func_name(func)}{where}): "
                "tangent_kernels never changes the model's parameters. Compute out of place, or evaluate a copy "
                "of the model (copy.deepcopy)"
            )

    # --- the interception ---
    def _scan(self, args, kwargs) -> Tuple[bool, List[Derived], Optional[torch.Tensor]]:
        """(whether data is involved, the derived arguments, a stale parameter argument)."""
        data, derived, stale = False, [], None
        for value in (*args, *kwargs.values()):
            for t in tensors_in(value):
                kind = self.kind(t)
                if isinstance(kind, Samples):
                    data = True
                elif kind is not None:
                    derived.append(kind)
                elif self._originals and self._stale_name(t) is not None:
                    stale = t
        return data, derived, stale

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        data, derived, stale = self._scan(args, kwargs)
        if args and _writes_in_place(func):
            self._refuse_in_place_write(func, args[0])
        if stale is not None and derived:
            self._refuse_stale_parameter(func, stale)
        if not derived:
            out = func(*args, **kwargs)
            if stale is not None:
                self._refuse_stale_parameter(func, stale, out)
            if data:
                self._propagate(func, args, kwargs, out)
                if self.detached is None and _detaches(func, args, out):
                    self.detached = func_name(func) if torch.is_grad_enabled() else "an op under torch.no_grad"
            return out
        if not data:
            rule = _DERIVED_RULES.get(func)
            if rule is not None:
                return rule(self, func, args, kwargs, derived)
            out = func(*args, **kwargs)
            self.mark_derived(out, derived)
            return out
        if not torch.is_grad_enabled():
            # Autograd records nothing here, so no use can be read back: inside a custom
            # autograd.Function's forward the parameter's gradient flows through a backward
            # the mode cannot see; under no_grad it is zero. The generic path gets both right.
            why = f"{func_name(func)}: used with gradients off (a custom autograd.Function, or torch.no_grad)"
            self.uncover(derived, why)
            out = func(*args, **kwargs)
            self._propagate(func, args, kwargs, out)
            return out
        rule = _RULES.get(func)
        why = f"{func_name(func)} (no rule for this operation)"
        if rule is None:
            from .fallback import per_op

            out, why = per_op(self, func, args, kwargs, derived)
            if why is None:
                return out
            why = f"{func_name(func)} (no rule; {why})"
        if rule is not None:
            try:
                return rule(self, func, args, kwargs)
            except NotCovered as reason:
                why = f"{func_name(func)}: {reason.why}"
            except Exception as error:  # noqa: BLE001 - see below
                # A rule that breaks on a call it did not foresee must not stop the run: the
                # op runs plainly below (re-raising the model's own error if the op itself
                # failed) and the tensors take the generic path, which is exact.
                why = f"{func_name(func)}: the rule failed ({type(error).__name__}: {str(error)[:200]})"
                _log.warning("tangent_kernels: %s; its parameters take the generic path", why)
        self.uncover(derived, why)
        out = func(*args, **kwargs)
        self._propagate(func, args, kwargs, out)
        return out


def whole_vector(view, width: int) -> Optional[str]:
    """The leaf's name when ``view`` (a ViewPullback or Operand) is a whole 1-D leaf of
    ``width`` entries in its own order, else None."""
    st, geometry = getattr(view, "st", None), getattr(view, "geometry", None)
    if st is None or geometry is None or st.leaf.dim() != 1 or st.leaf.numel() != width:
        return None
    return st.name if is_the_leaf(geometry, st.leaf) else None
