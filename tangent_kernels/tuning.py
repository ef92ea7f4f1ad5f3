"""The knobs that change how (never what) tangent_kernels computes, in one place.

    import tangent_kernels as tk
    with tk.tuning.tuned(tile_rows=256):        # smaller Gram tiles for the duration
        K = tk.gram(model, loader, idx)

``settings`` holds the values in force (tests may ``monkeypatch.setattr(tuning.settings,
"tile_rows", 4)``); ``tuned`` sets some for a ``with`` block and restores them after.
Every value is checked when it is set, so a typo fails at the assignment, not in the
middle of a run. The knobs:

- ``tile_rows`` (1024): rows per Gram tile (tiles.py, the distributed schedule): large
  enough for BLAS efficiency, small enough that the lower-triangle schedule skips about
  half the work. Tests lower it to make several tiles of a few samples.
- ``batched`` (True): False puts every tensor on the generic torch.func path (no
  batched pass; persample/extractor.py). For baselines and tests of that path.
- ``dense_strategy`` ("auto"): the per-layer dense GEMM strategy on CUDA
  (persample/dense.py): "auto" (measured per layer), "always", "never".
- ``generic_strategy`` ("auto"): how the generic path evaluates per-sample gradients
  (persample/generic.py): "auto", "vmap" or "loop".
"""

from __future__ import annotations

import sys
import types
import warnings
from contextlib import contextmanager
from typing import Dict

__all__ = ["DENSE_STRATEGIES", "GENERIC_STRATEGIES", "Settings", "keep_old_names", "settings", "tuned"]

DENSE_STRATEGIES = ("auto", "always", "never")
GENERIC_STRATEGIES = ("auto", "vmap", "loop")


class Settings:
    """The knobs' values in force; each assignment is checked."""

    __slots__ = ("tile_rows", "batched", "dense_strategy", "generic_strategy")

    def __init__(self):
        self.tile_rows = 1024
        self.batched = True
        self.dense_strategy = "auto"
        self.generic_strategy = "auto"

    def __setattr__(self, name: str, value) -> None:
        if name == "tile_rows" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"tile_rows must be a positive int (rows per Gram tile); got {value!r}")
        if name == "batched" and not isinstance(value, bool):
            raise ValueError(f"batched must be True or False; got {value!r}")
        if name == "dense_strategy" and value not in DENSE_STRATEGIES:
            raise ValueError(f"dense_strategy = {value!r}; use one of {DENSE_STRATEGIES}")
        if name == "generic_strategy" and value not in GENERIC_STRATEGIES:
            raise ValueError(f"generic_strategy = {value!r}; use one of {GENERIC_STRATEGIES}")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return "Settings(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__) + ")"


settings = Settings()


@contextmanager
def tuned(**changes):
    """``settings`` with ``changes`` for the duration of the block, then as they were
    (process-wide: not for concurrent runs that want different values)."""
    unknown = sorted(set(changes) - set(Settings.__slots__))
    if unknown:
        raise TypeError(f"unknown tuning knob(s) {', '.join(unknown)}; the knobs: {', '.join(Settings.__slots__)}")
    saved = {name: getattr(settings, name) for name in changes}
    try:
        for name, value in changes.items():
            setattr(settings, name, value)
        yield settings
    finally:
        for name, value in saved.items():
            object.__setattr__(settings, name, value)


def keep_old_names(module_name: str, names: Dict[str, str]) -> None:
    """The module-level knobs that came before ``settings`` (``persample.dense.DENSE_STRATEGY``,
    ``persample.extractor.BATCHED``, ``persample.generic.STRATEGY``) keep working, deprecated:
    reading or assigning ``module.NAME`` reads or sets ``settings.<knob>`` (an assignment
    that nothing read any more would be silently ignored)."""
    module = sys.modules[module_name]

    def warn(name: str) -> None:
        warnings.warn(f"{module_name}.{name} is deprecated: use tangent_kernels.tuning.settings.{names[name]} "
                      f"or tangent_kernels.tuning.tuned({names[name]}=...)", DeprecationWarning, stacklevel=3)

    def forwarded(name: str) -> property:
        # A data descriptor (a property on the module's class), so that monkeypatch and
        # plain assignment both go through it and it restores what it read.
        def get(module):
            warn(name)
            return getattr(settings, names[name])

        def set_(module, value):
            warn(name)
            setattr(settings, names[name], value)

        return property(get, set_)

    OldNames = type("OldNames", (types.ModuleType,), {name: forwarded(name) for name in names})
    module.__class__ = OldNames
