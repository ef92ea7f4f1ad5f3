"""What a computation is, for deciding whether a checkpoint may be resumed by a call (and
whether the ranks of a distributed run were given the same one).

A checkpoint made with the same weights but another computation must be refused: a
Tanh replaced by a ReLU, ``self.scale = 2.0``, a global the ``forward`` reads, a hook, a
frozen layer, ``model.forward = ...``, ``output=lambda o: o[:, 0]`` changed to
``o[:, 2]``, a global list a helper of the output reads. So the fingerprint is not a
list of things someone thought of but everything reachable from the model and the
output callable, walked recursively:

- every module (its place in the tree and class) and everything in its ``vars()``: plain
  attributes by value (numbers, strings, containers, tensors by content, objects by their
  class and ``__dict__``/``__slots__``), instance-level overrides (``forward`` or any
  other), the forward/backward hooks (in order), ``requires_grad`` of every parameter
  and which parameters are one tensor; torch's global module hooks;
- every class met (the module classes, classes held in attributes or read as globals):
  the code of its methods and its class attributes;
- every function met (methods, hooks, the output callable, helpers): its code (nested
  code included), defaults, closure values, and the globals its code names, by value,
  recursively (a global function's own globals, a global class's attributes).

Weights and buffers are hashed elsewhere (``checkpoint.model_fingerprint``); here a
tensor that is one of the model's is named, not hashed again. Library code (the
standard library and installed packages: torch, transformers) is identified by its
code and qualified names, not by the values of its module globals: those change with
the library's version, whose code is hashed.

The result is itemized (``parts``: where -> a short value) so that a mismatch names what
differs ("act.approximate: checkpoint has 'none', this call 'tanh'"); the ``digest``
decides. What cannot be read (an object whose state lives in C, a lock, a file) is listed
in ``undecidable``: a resume then needs the run named explicitly (``checkpoint_key=``).
Deterministic across processes: no ``id()`` or address enters a hash, sets and plain
dicts are ordered by their items' hashes, hook handle ids are dropped.
"""

from __future__ import annotations

import collections
import enum
import functools
import hashlib
import logging
import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .code_reads import HOOK_FLAGS, HOOKS, NOT_ATTRIBUTES, cell_value, code_names, is_library, read_names

__all__ = ["Fingerprint", "computation_fingerprint", "callable_fingerprint", "structure_fingerprint"]

_SIMPLE = (bool, int, float, complex, str, bytes, type(None))
_TORCH_VALUES = (torch.dtype, torch.device, torch.layout, torch.memory_format, torch.qscheme)
_CLASS_NOISE = {"__dict__", "__weakref__", "__doc__", "__module__", "__qualname__", "__firstlineno__",
                "__static_attributes__", "__annotations__", "__parameters__", "__orig_bases__", "__slotnames__",
                "_abc_impl"}
# A bound on one part's walk: a structure deeper than this is not a model's state.
_MAX_DEPTH = 40


@dataclass
class Fingerprint:
    """``digest``: one hash of everything; ``parts``: where -> a short shown value (to name
    what differs); ``undecidable``: where the walk met state it cannot read."""

    digest: str
    parts: Dict[str, str] = field(default_factory=dict)
    undecidable: List[str] = field(default_factory=list)


class _Undecidable(Exception):
    pass


def _name(obj) -> str:
    return f"{getattr(obj, '__module__', None) or '?'}.{getattr(obj, '__qualname__', None) or getattr(obj, '__name__', '?')}"


_NO_VALUE = object()


def _shown(value, digest: str) -> str:
    """What a part shows in an error: the value itself when it is short and plain."""
    if value is _NO_VALUE:
        return f"#{digest[:12]}"
    if isinstance(value, (bool, int, float, type(None))) or (isinstance(value, str) and len(value) <= 60):
        return repr(value)
    if isinstance(value, (tuple, list)) and len(value) <= 8 and all(isinstance(v, (bool, int, float, type(None)))
                                                                    for v in value):
        return repr(value)
    return f"#{digest[:12]}"


class _Walk:
    def __init__(self, named: Dict[int, str], read: set):
        self.named = named  # id -> name of the model's modules and tensors (kept alive by the model)
        self.read = read  # every name code reachable from the call reads (read_names)
        self.parts: Dict[str, str] = {}
        self.full: Dict[str, str] = {}
        self.owners: Dict[str, Any] = {}  # part key -> its object
        self.undecidable: List[str] = []

    # ------------------------------------------------------------------ parts
    def part(self, key: str, compute, value=_NO_VALUE) -> None:
        """Walk one part (its own hash; objects met twice within it are hashed once)."""
        h = hashlib.blake2b(digest_size=16)
        self.parts[key] = "(being walked)"
        try:
            compute(h, {})
        except _Undecidable as why:
            self.undecidable.append(f"{key} ({why})")
            h.update(b"<undecidable>")
        except Exception as error:  # an object that cannot be read (a proxy, a property that raises)
            self.undecidable.append(f"{key} (reading it raised {type(error).__name__})")
            h.update(b"<undecidable>")
        digest = h.hexdigest()
        self.full[key] = digest
        self.parts[key] = _shown(value, digest)

    def unique(self, key: str, obj):
        """(the part key of ``obj``, whether it is new): two objects of one name (two local
        classes of one qualname) get two keys, numbered in the order they are met."""
        n, candidate = 1, key
        while candidate in self.owners:
            if self.owners[candidate] is obj:
                return candidate, False
            n += 1
            candidate = f"{key} #{n}"
        self.owners[candidate] = obj  # held: an id could be reused by another object
        return candidate, True

    def klass(self, cls: type) -> str:
        key, new = self.unique(f"class {_name(cls)}", cls)
        if new:
            self.part(key, lambda h, seen: self._class_body(h, cls))
        return key

    def global_value(self, scope: dict, name: str) -> None:
        key, new = self.unique(f"global {scope.get('__name__', '?')}.{name}", scope)
        if new:
            self.part(key, lambda h, seen: self.value(h, scope[name], seen, 0), scope[name])

    # ------------------------------------------------------------------ values
    def value(self, h, value: Any, seen: Dict[int, int], depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise _Undecidable(f"a structure deeper than {_MAX_DEPTH}")
        if id(value) in self.named:
            h.update(f"<{self.named[id(value)]}>".encode())
            return
        if isinstance(value, _SIMPLE):
            h.update(repr((type(value).__name__, value)).encode())
            return
        if isinstance(value, torch.Tensor):
            h.update(b"tensor" + repr(value.requires_grad).encode())
            t = value.detach()
            if t.is_meta or t.layout != torch.strided:
                raise _Undecidable(f"a {t.layout} tensor on {t.device}")
            t = t.cpu().contiguous().reshape(-1)
            h.update(repr((tuple(value.shape), str(t.dtype))).encode())
            h.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
            return
        if isinstance(value, _TORCH_VALUES) or isinstance(value, (slice, range, type(Ellipsis))):
            h.update(f"{type(value).__name__}:{value!r}".encode())
            return
        if isinstance(value, enum.Enum):
            h.update(f"{_name(type(value))}.{value.name}".encode())
            return
        if isinstance(value, types.ModuleType):
            h.update(f"module {value.__name__}".encode())
            return
        if isinstance(value, logging.Logger):  # writes messages, computes nothing (and holds open streams)
            h.update(f"logger {value.name}".encode())
            return
        if isinstance(value, type):
            h.update(self.klass(value).encode())
            return
        if isinstance(value, types.CodeType):
            self.code(h, value, seen, depth + 1)
            return
        if id(value) in seen:  # a cycle, or an object met twice in this part
            h.update(f"<seen {seen[id(value)][0]}>".encode())
            return
        seen[id(value)] = (len(seen), value)  # held: a temporary's id must not be reused within the part
        if isinstance(value, types.GeneratorType):  # e.g. held by a @contextmanager decorator: code and locals
            h.update(b"generator")
            self.code(h, value.gi_code, seen, depth + 1)
            frame = value.gi_frame
            self.value(h, dict(frame.f_locals) if frame is not None else None, seen, depth + 1)
        elif isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise _Undecidable("a numpy array of Python objects")
            h.update(repr((value.shape, value.dtype.str)).encode())
            h.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, (tuple, list, collections.deque)):
            h.update(f"{type(value).__name__}[{len(value)}]".encode())
            for item in value:
                self.value(h, item, seen, depth + 1)
        elif isinstance(value, (set, frozenset)):
            h.update(f"{type(value).__name__}[{len(value)}]".encode())
            for item in sorted(self.digest(item, depth) for item in value):
                h.update(item.encode())
        elif isinstance(value, dict):
            h.update(f"{type(value).__name__}[{len(value)}]".encode())
            items = [(self.digest(k, depth), v) for k, v in value.items()]
            if not isinstance(value, collections.OrderedDict):  # insertion order can follow a hash seed
                items.sort(key=lambda item: item[0])
            for key, item in items:
                h.update(key.encode())
                self.value(h, item, seen, depth + 1)
        elif isinstance(value, (types.FunctionType, types.MethodType, functools.partial, staticmethod, classmethod,
                                property, types.BuiltinFunctionType, types.BuiltinMethodType, types.MethodWrapperType,
                                types.WrapperDescriptorType, types.MethodDescriptorType,
                                types.GetSetDescriptorType, types.MemberDescriptorType)):
            self.callable(h, value, seen, depth + 1)
        else:
            self.instance(h, value, seen, depth + 1)

    def digest(self, value, depth: int) -> str:
        h = hashlib.blake2b(digest_size=16)
        self.value(h, value, {}, depth + 1)
        return h.hexdigest()

    def instance(self, h, value, seen, depth: int) -> None:
        """An object by its class and its state (``__dict__`` and ``__slots__``); one whose
        state lives in C (its class, or a base other than object, is not Python's) cannot
        be read."""
        cls = type(value)
        opaque = [base for base in cls.__mro__[:-1] if not base.__flags__ & (1 << 9)]  # Py_TPFLAGS_HEAPTYPE
        if opaque and callable(getattr(value, "__wrapped__", None)):  # functools.lru_cache and the like
            h.update(f"wrapper {_name(cls)}".encode())
            self.value(h, value.__wrapped__, seen, depth + 1)
            return
        if opaque or not (hasattr(value, "__dict__") or hasattr(cls, "__slots__")):
            raise _Undecidable(f"a {_name(cls)} (its state is not Python attributes)")
        h.update(self.klass(cls).encode())
        state = dict(vars(value)) if hasattr(value, "__dict__") else {}
        for base in cls.__mro__:
            for slot in getattr(base, "__dict__", {}).get("__slots__", ()) if base is not object else ():
                if slot not in ("__dict__", "__weakref__") and hasattr(value, slot):
                    state[slot] = getattr(value, slot)
        if isinstance(value, nn.Module):  # a module outside the model: its tensors too, its hooks in order
            for hooks in HOOKS:
                flags = [state.get(flag, {}) for flag in HOOK_FLAGS.get(hooks, ())]
                state[hooks] = [(hook, [handle in flag for flag in flags]) for handle, hook in state[hooks].items()]
            for name in NOT_ATTRIBUTES - {"_parameters", "_buffers", "_modules", *HOOKS}:
                state.pop(name, None)
        for name in sorted(state):
            h.update(name.encode())
            self.value(h, state[name], seen, depth + 1)

    # ------------------------------------------------------------------ code
    def callable(self, h, fn, seen, depth: int) -> None:
        if isinstance(fn, functools.partial):
            h.update(b"partial")
            self.value(h, fn.func, seen, depth + 1)
            self.value(h, fn.args, seen, depth + 1)
            self.value(h, fn.keywords, seen, depth + 1)
        elif isinstance(fn, types.MethodType):
            h.update(b"method")
            self.value(h, fn.__func__, seen, depth + 1)
            self.value(h, fn.__self__, seen, depth + 1)
        elif isinstance(fn, (staticmethod, classmethod)):
            h.update(type(fn).__name__.encode())
            self.value(h, fn.__func__, seen, depth + 1)
        elif isinstance(fn, property):
            for accessor in (fn.fget, fn.fset, fn.fdel):
                self.value(h, accessor, seen, depth + 1)
        elif isinstance(fn, types.FunctionType):
            self.function(h, fn, seen, depth)
        else:  # builtins and C descriptors: by name, and what a bound one is bound to
            h.update(f"builtin {_name(fn)}".encode())
            owner = getattr(fn, "__self__", None)
            if owner is not None and not isinstance(owner, (types.ModuleType, type)):
                self.value(h, owner, seen, depth + 1)

    def function(self, h, fn: types.FunctionType, seen, depth: int) -> None:
        h.update(f"function {_name(fn)}".encode())
        self.code(h, fn.__code__, seen, depth + 1)
        scope = fn.__globals__
        library = is_library(scope.get("__name__"))
        held = [fn.__defaults__ or (), fn.__kwdefaults__ or {}] + [cell_value(cell) for cell in fn.__closure__ or ()]
        for value in held:
            try:
                self.value(h, value, seen, depth + 1)
            except _Undecidable:
                if not library:
                    raise
                # A library's own sentinels and decorator state (a @contextmanager's
                # generator) are its version's; what a user put there is read above.
                h.update(f"<{_name(type(value))}>".encode())
        if library:
            return
        names = sorted(code_names(fn.__code__))  # attribute names too: a superset, harmless
        for name in names:
            if name in scope and not name.startswith("__"):
                self.global_value(scope, name)
                # A user's module read as a global (``helpers.SCALE``): what the code names in it.
                if isinstance(scope[name], types.ModuleType) and not is_library(scope[name].__name__):
                    inner = vars(scope[name])
                    for attribute in names:
                        if attribute in inner and not attribute.startswith("__"):
                            self.global_value(inner, attribute)

    def code(self, h, code: types.CodeType, seen, depth: int) -> None:
        h.update(code.co_code)
        h.update(repr((code.co_names, code.co_argcount, code.co_kwonlyargcount, code.co_flags)).encode())
        for const in code.co_consts:
            self.value(h, const, seen, depth + 1)

    def _class_body(self, h, cls: type) -> None:
        library = is_library(cls.__module__)
        for base in cls.__bases__:
            if base is not object:
                h.update(self.klass(base).encode())
        for name in sorted(vars(cls)):
            if name in _CLASS_NOISE:
                continue
            value = vars(cls)[name]
            if library and not isinstance(value, _SIMPLE + (types.FunctionType, staticmethod, classmethod, property)):
                continue  # a library class's other attributes are its version's, whose code is hashed
            if library and not (name.startswith("__") or name in self.read):
                continue  # not called: e.g. nn.Module.smart_apply, which importing transformers adds
            h.update(name.encode())
            self.value(h, value, {}, 0)


def _model(walk: _Walk, model: nn.Module) -> None:
    tensors: Dict[int, str] = {}
    read = walk.read
    for path, module in model.named_modules(remove_duplicate=False):
        where = path or "(model)"
        cls = type(module)
        walk.parts[f"{where}: class"] = walk.klass(cls)[len("class "):]
        prefix = f"{path}." if path else ""
        state = vars(module)
        for name, param in state["_parameters"].items():
            if param is None:
                walk.parts[f"{prefix}{name}"] = "None"
                continue
            shown = f"requires_grad={param.requires_grad}"
            if id(param) in tensors and tensors[id(param)] != f"{prefix}{name}":
                shown += f", the tensor {tensors[id(param)]}"
            tensors.setdefault(id(param), f"{prefix}{name}")
            walk.parts[f"{prefix}{name}"] = shown
            hooks = getattr(param, "_backward_hooks", None)
            if hooks:
                _hooks(walk, f"{prefix}{name}: tensor hooks", hooks, ())
        for name, buffer in state["_buffers"].items():
            if buffer is None:
                walk.parts[f"{prefix}{name}"] = "None"
        for name, child in state["_modules"].items():
            if child is None:
                walk.parts[f"{prefix}{name}"] = "None"
        for hooks in HOOKS:
            if state.get(hooks):
                _hooks(walk, f"{where}: {hooks.strip('_').replace('_', ' ')}", state[hooks],
                       [state.get(flag, {}) for flag in HOOK_FLAGS.get(hooks, ())])
        for name in sorted(state):
            # Plain values always (cheap, and a name built at run time reads them too);
            # objects where some code reachable from the call names them.
            if name not in NOT_ATTRIBUTES and (isinstance(state[name], _SIMPLE) or name in read):
                _attribute(walk, f"{prefix}{name}", state[name])
    from torch.nn.modules import module as torch_module

    for hooks in HOOKS:
        table = getattr(torch_module, f"_global{hooks}", None)
        if table:
            flags = [getattr(torch_module, f"_global{flag}", {}) for flag in HOOK_FLAGS.get(hooks, ())]
            _hooks(walk, f"torch's global {hooks.strip('_').replace('_', ' ')}", table, flags)


def _attribute(walk: _Walk, key: str, value) -> None:
    walk.part(key, lambda h, seen: walk.value(h, value, seen, 0), value)


def _hooks(walk: _Walk, key: str, table, flags) -> None:
    # In order, without their handle ids (a process-wide counter).
    def compute(h, seen):
        for handle, hook in table.items():
            h.update(repr([handle in flag for flag in flags]).encode())
            walk.value(h, hook, seen, 0)

    walk.part(key, compute)


def _named(model: Optional[nn.Module]) -> Dict[int, str]:
    if model is None:
        return {}
    named = {id(m): f"module {p or '(model)'}" for p, m in model.named_modules(remove_duplicate=False)}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        named.setdefault(id(tensor), f"tensor {name}")
    return named


def computation_fingerprint(model: Optional[nn.Module] = None, *callables) -> Fingerprint:
    """Everything reachable from ``model`` (structure, attributes, hooks, requires_grad,
    the code and globals of its classes) and from ``callables`` (e.g. the output), except
    the values of its weights and buffers (``checkpoint.model_fingerprint``)."""
    walk = _Walk(_named(model), read_names(model, callables))
    if model is not None:
        _model(walk, model)
    for n, fn in enumerate(callables):
        _attribute(walk, f"callable {n} ({_name(fn)})" if len(callables) > 1 else f"callable {_name(fn)}", fn)
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(walk.parts):
        h.update(f"{key}={walk.parts[key]}:{walk.full.get(key, '')}\n".encode())
    return Fingerprint(h.hexdigest(), dict(walk.parts), sorted(set(walk.undecidable)))


def callable_fingerprint(fn) -> Optional[str]:
    """A hash that changes when the callable computes something else, or None when that
    cannot be decided from it."""
    result = computation_fingerprint(None, fn)
    return None if result.undecidable else result.digest


def structure_fingerprint(model: nn.Module) -> str:
    """Everything about the model except its weights' values (see computation_fingerprint)."""
    return computation_fingerprint(model).digest
