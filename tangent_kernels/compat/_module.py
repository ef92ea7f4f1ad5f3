"""Finding the nn.Module behind a functional model ``f(params, x)``, and evaluating it at
given parameters without touching the caller's module."""

from __future__ import annotations

import copy
from typing import Callable, Dict, Optional

import torch
from torch import nn

__all__ = ["module_behind", "module_at"]


def module_behind(fn: Callable, params: Dict[str, torch.Tensor]) -> Optional[nn.Module]:
    """The one nn.Module that ``fn`` closes over or reads as a global and whose parameter
    names are ``params``' keys (the tutorials' ``functional_call(net, params, ...)``), or
    None when there is not exactly one."""
    candidates = []
    seen = set()

    def consider(value):
        if isinstance(value, nn.Module) and id(value) not in seen:
            seen.add(id(value))
            names = {name for name, _ in value.named_parameters()}
            if set(params) <= names and params:
                candidates.append(value)

    for cell in getattr(fn, "__closure__", None) or ():
        try:
            consider(cell.cell_contents)
        except ValueError:
            continue
    code = getattr(fn, "__code__", None)
    scope = getattr(fn, "__globals__", {})
    for name in getattr(code, "co_names", ()):
        consider(scope.get(name))
    return candidates[0] if len(candidates) == 1 else None


def module_at(module: nn.Module, params: Dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``module`` whose parameters are ``params`` (others frozen), in eval mode."""
    copied = copy.deepcopy(module)
    named = dict(copied.named_parameters())
    with torch.no_grad():
        for name, p in named.items():
            if name in params:
                value = params[name].detach()
                p.data = value.to(dtype=value.dtype, device=value.device).clone()
                p.requires_grad_(True)
            else:
                p.requires_grad_(False)
    return copied.eval()
