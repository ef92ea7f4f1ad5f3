"""What code reachable from a model's call can read: the names its functions read
(attributes, globals), the functions a value holds, and whether a module is library code
(the standard library, installed packages) or the user's. The identity walk (identity.py)
fingerprints what these say can matter, and nothing else.
"""

from __future__ import annotations

import functools
import os
import site
import sys
import sysconfig
import types
from typing import List, Optional

from torch import nn

__all__ = ["HOOK_FLAGS", "HOOKS", "NOT_ATTRIBUTES", "cell_value", "code_names", "functions_of", "is_library",
           "read_names"]

# vars() entries of a module that are not walked as plain attributes: tensors and
# children (walked by name), hook tables (walked as hooks, without their handle ids),
# and the state-dict hooks, which take no part in computing.
HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
HOOK_FLAGS = {"_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
              "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")}
NOT_ATTRIBUTES = {"_parameters", "_buffers", "_modules", "_state_dict_hooks", "_state_dict_pre_hooks",
                  "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", *HOOKS,
                  *(flag for flags in HOOK_FLAGS.values() for flag in flags)}

_LIBRARY_ROOTS = tuple(sorted({os.path.realpath(p) + os.sep for p in
                               [sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")]
                               + list(getattr(site, "getsitepackages", lambda: [])())}))


@functools.lru_cache(maxsize=None)
def is_library(module_name: Optional[str]) -> bool:
    """Code of the standard library or an installed package (not the user's)."""
    module = sys.modules.get(module_name or "")
    if module is None:
        return False
    path = getattr(module, "__file__", None)
    if path is None:  # a builtin or frozen module (sys, _thread); a module made at run time is the user's
        origin = getattr(getattr(module, "__spec__", None), "origin", None)
        return module_name in sys.builtin_module_names or origin in ("built-in", "frozen")
    return os.path.realpath(path).startswith(_LIBRARY_ROOTS)


def code_names(code: types.CodeType) -> set:
    """The names a code object (nested ones included) reads: attributes and globals, and
    the string constants that look like names (``getattr(self, "scale")``)."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= code_names(const)
        elif isinstance(const, str) and const.isidentifier():
            names.add(const)
    return names


def functions_of(value) -> List[types.FunctionType]:
    if isinstance(value, (staticmethod, classmethod, types.MethodType)):
        value = value.__func__
    if isinstance(value, property):
        return [f for f in (value.fget, value.fset) if isinstance(f, types.FunctionType)]
    if isinstance(value, functools.partial):
        return functions_of(value.func)
    if isinstance(value, types.FunctionType):
        return [value]
    call = getattr(type(value), "__call__", None)  # a callable object
    return [call] if isinstance(call, types.FunctionType) else []


def cell_value(cell):
    try:
        return cell.cell_contents
    except ValueError:
        return None


def read_names(model: Optional[nn.Module], roots=()) -> set:
    """Every attribute name that code reachable from the model's call (and from ``roots``,
    e.g. the output) can read: from ``forward`` and ``__call__``, through the methods of its
    modules' classes of the names read, instance-level overrides, hooks, and the functions
    they name as globals (a fixed point; a superset). A module attribute, or a library
    class's method, no such code names does not change what is computed (GPT-2's
    ``generation_config``, read by ``generate``; ``nn.Module.smart_apply``, which importing
    transformers adds)."""
    classes, callables = [], list(roots)
    for module in model.modules() if model is not None else ():
        for cls in type(module).__mro__:
            if cls not in classes:
                classes.append(cls)
        state = vars(module)
        callables += [v for k, v in state.items() if k not in NOT_ATTRIBUTES and callable(v)]
        callables += [hook for hooks in HOOKS for hook in state.get(hooks, {}).values()]
    names = {"forward", "__call__"}
    pending = [f for c in callables for f in functions_of(c)]
    done, grown = set(), True
    while grown or pending:
        grown = False
        for cls in classes:
            for name, value in vars(cls).items():
                if name in names and (cls, name) not in done:
                    done.add((cls, name))
                    pending += functions_of(value)
        while pending:
            fn = pending.pop()
            if fn.__code__ in done:
                continue
            done.add(fn.__code__)
            read = code_names(fn.__code__)
            grown |= not read <= names
            names |= read
            pending += [g for name in read if name in fn.__globals__ for g in functions_of(fn.__globals__[name])]
            pending += [g for cell in fn.__closure__ or () for g in functions_of(cell_value(cell))]
    return names
