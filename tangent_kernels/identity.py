"""What a computation is, for deciding whether a checkpoint may be resumed by a call.

A checkpoint made with the same weights but another computation must be refused: a
Tanh replaced by a ReLU, a changed ``forward``, ``output=lambda o: o[:, 0]`` changed to
``o[:, 2]``. The structure fingerprint covers every module's type, hyper-parameters
(``extra_repr``), its place in the tree and the code of its ``forward``; a callable's
fingerprint covers its code (nested code included), defaults, closure values and the
simple globals it reads. Where that cannot be decided (a builtin, a callable whose
closure holds an object without a value-based repr), the fingerprint is None and a
resume needs the run named explicitly (``checkpoint_key=``).
"""

from __future__ import annotations

import functools
import hashlib
import types
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["callable_fingerprint", "structure_fingerprint"]

_SIMPLE = (bool, int, float, complex, str, bytes, type(None))


class _Undecidable(Exception):
    pass


def _value(h, value: Any, depth: int = 0) -> None:
    if depth > 6:
        raise _Undecidable
    if isinstance(value, _SIMPLE):
        h.update(repr((type(value).__name__, value)).encode())
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    elif isinstance(value, (tuple, list, frozenset, set)):
        h.update(type(value).__name__.encode())
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        for item in items:
            _value(h, item, depth + 1)
    elif isinstance(value, dict):
        for key in sorted(value, key=repr):
            _value(h, key, depth + 1)
            _value(h, value[key], depth + 1)
    elif isinstance(value, slice):
        _value(h, (value.start, value.stop, value.step), depth + 1)
    elif isinstance(value, (types.ModuleType, type)):
        h.update(f"{getattr(value, '__module__', '')}.{value.__qualname__ if isinstance(value, type) else value.__name__}".encode())
    elif isinstance(value, types.CodeType):
        _code(h, value, depth + 1)
    elif callable(value):
        _callable(h, value, depth + 1)
    else:
        raise _Undecidable


def _code(h, code: types.CodeType, depth: int) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code(h, const, depth + 1)
        else:
            _value(h, const, depth + 1)


def _callable(h, fn, depth: int = 0) -> None:
    if isinstance(fn, functools.partial):
        _callable(h, fn.func, depth + 1)
        _value(h, fn.args, depth + 1)
        _value(h, fn.keywords, depth + 1)
        return
    if isinstance(fn, types.MethodType):
        _callable(h, fn.__func__, depth + 1)
        return
    code = getattr(fn, "__code__", None)
    if code is None:
        if isinstance(fn, (types.BuiltinFunctionType, types.BuiltinMethodType)):
            h.update(f"{getattr(fn, '__module__', '')}.{fn.__qualname__}".encode())
            return
        call = getattr(type(fn), "__call__", None)
        if getattr(call, "__code__", None) is None:
            raise _Undecidable
        _code(h, call.__code__, depth + 1)
        _value(h, dict(vars(fn)) if hasattr(fn, "__dict__") else (), depth + 1)
        return
    h.update(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}".encode())
    _code(h, code, depth + 1)
    _value(h, fn.__defaults__ or (), depth + 1)
    _value(h, fn.__kwdefaults__ or {}, depth + 1)
    for cell in fn.__closure__ or ():
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        _value(h, contents, depth + 1)
    scope = getattr(fn, "__globals__", {})
    for name in code.co_names:  # the simple globals it reads (an index, a scale), not modules or functions
        if name in scope and isinstance(scope[name], _SIMPLE + (torch.Tensor, tuple)):
            h.update(name.encode())
            _value(h, scope[name], depth + 1)


def callable_fingerprint(fn) -> Optional[str]:
    """A hash that changes when the callable computes something else, or None when that
    cannot be decided from it."""
    h = hashlib.blake2b(digest_size=16)
    try:
        _callable(h, fn)
    except _Undecidable:
        return None
    return h.hexdigest()


def structure_fingerprint(model: nn.Module) -> str:
    """Module types, hyper-parameters, the tree's order and the code of every forward."""
    h = hashlib.blake2b(digest_size=16)
    for name, module in model.named_modules(remove_duplicate=False):
        kind = type(module)
        h.update(f"{name}:{kind.__module__}.{kind.__qualname__}({module.extra_repr()})".encode())
        forward = getattr(kind, "forward", None)
        if getattr(forward, "__code__", None) is not None:
            _code(h, forward.__code__, 0)
    return h.hexdigest()
