"""Interception of parameter uses: a ``TorchFunctionMode`` over the batched forward (the
rules' API, and their registry, are rules.py).

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

import logging
import sys
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode

from .rules import (_DERIVED_RULES, _RULES, AutogradPullback, Derived, NotCovered, Use, ViewOfPullback, ViewPullback,
                    func_name, register_derived, tensors_in)
from .samples import FIRST, Samples, factory, follow, lost
from .views import SampledTensor

_log = logging.getLogger("tangent_kernels")

__all__ = ["DATA", "UseMode", "leaf_kind"]


DATA = FIRST  # the model's inputs: sample b is row b of dim 0


_NOT_WRITES = {"requires_grad_", "retain_grad", "share_memory_"}


def _storage(t: torch.Tensor) -> int:
    """The address of a tensor's memory: the same for its views and aliases."""
    return t.untyped_storage().data_ptr()


def _writes_in_place(func) -> bool:
    name = getattr(func, "__name__", "")
    if name in _NOT_WRITES:
        return False
    return (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or name in ("__setitem__",)


# func -> (whether its results are constants, whether it writes its first argument):
# asked of every op of every forward, decided once per function.
_FACTS: Dict[Any, Tuple[bool, bool]] = {}


def _facts(func) -> Tuple[bool, bool]:
    try:
        facts = _FACTS.get(func)
    except TypeError:  # an unhashable callable
        return factory(func), _writes_in_place(func)
    if facts is None:
        facts = _FACTS[func] = (factory(func), _writes_in_place(func))
    return facts


def _detaches(func, args, out) -> bool:
    """Whether a data op returned tensors cut off the graph of inputs that autograd tracks."""
    # The results first: they are tracked in the common case, which settles it.
    results = tensors_in(out)
    if not results or any(t.requires_grad for t in results):
        return False
    if not any(t.requires_grad for value in args for t in tensors_in(value)):
        return False
    return any(t.is_floating_point() for t in results)


@register_derived(torch.Tensor.contiguous, torch.Tensor.clone, torch.clone)
def _same_values(mode, func, args, kwargs, derived):
    """A copy of a derived tensor (Swin's bias ``.contiguous()``) holds its values, element
    for element: it keeps its pullback (autograd's would form whole per-sample gradients)."""
    out = func(*args, **kwargs)
    source = mode.derived(args[0]) if args else None
    if source is not None and len(derived) == 1 and out.requires_grad and out.shape == args[0].shape:
        mode.set_kind(out, source)
    else:
        mode.mark_derived(out, derived)
    return out


def leaf_kind(st: SampledTensor) -> Derived:
    """What the mode knows of a sampled leaf: itself, a view of itself."""
    return Derived(ViewPullback(st, st.leaf), (st,))


class UseMode(TorchFunctionMode):
    """The interception for one batched forward (see the module docstring)."""

    def __init__(self, sampled: Sequence[SampledTensor], batch_size: int, backend: str,
                 leaf_kinds: Optional[Sequence[Derived]] = None):
        """leaf_kinds: what is known of each sampled leaf (``leaf_kind``), in ``sampled``'s
        order: made once by a caller that runs the mode every batch."""
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
        self._module_names: Dict[int, str] = {}
        for st, kind in zip(sampled, leaf_kinds if leaf_kinds is not None else map(leaf_kind, sampled)):
            self.set_kind(st.leaf, kind)

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
        if _facts(func)[0]:
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
                continue
            pullback = AutogradPullback(t, list(sampled.values()))
            base = self.derived(root) if root is not t else None
            # The view's storage positions are the base's flat indices when the base is contiguous.
            if base is not None and not isinstance(base.pullback, (AutogradPullback, ViewPullback)) \
                    and root.is_contiguous():
                self.set_kind(t, Derived(ViewOfPullback(base.pullback, root, t, pullback), base.sampled))
            else:
                self.set_kind(t, Derived(pullback, list(sampled.values())))

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

    def watch_inputs(self, tensors: Sequence[torch.Tensor], module_names: Optional[Dict[int, str]] = None,
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
        self._module_names = module_names or {}

    def _where(self) -> str:
        """" in module 'name'" for the innermost of the model's modules whose code is running
        (the frames are walked on this error path rather than every module call hooked,
        which cost 5% of a forward), "" outside them."""
        frame = sys._getframe(1)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch.nn.Module) and id(owner) in self._module_names:
                return f" in module {self._module_names[id(owner)]!r}"
            frame = frame.f_back
        return ""

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
        where = self._where()
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
        where = self._where()
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
        kinds = self._kinds
        for value in (*args, *kwargs.values()):
            for t in ((value,) if isinstance(value, torch.Tensor) else tensors_in(value)):
                entry = kinds.get(id(t))  # self.kind(t), inlined: every argument of every op
                kind = entry[1] if entry is not None and entry[0]() is t else None
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
        if args and _facts(func)[1]:
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
