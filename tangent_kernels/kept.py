"""The features (and structured factors) tk.Kernel keeps of the loaders it evaluated last,
so that ``.cross(test, train)`` right after ``.gram(train)`` does not compute the train side
again.

A kept side is reused only when nothing it was computed from changed (docs/kernel.md):

- the **loader**: the same object, yielding batches of the same bytes, shapes and dtypes
  (``checkpoint.batch_fingerprint`` of every batch, the hash checkpoints resume by);
- the **weights**: every parameter and buffer the same tensor (identity, storage), with
  the same ``_version`` counter and the same values as a copy taken when the side was
  computed (a write through ``.data`` moves no version counter; the copy sees it);
- the **computation**: every module's class, its ``forward`` and its plain attributes
  (by value; tensors by identity and version) as they were;
- the **structure, idx, output and precision**: fixed per Kernel; a structure change drops
  everything (kernel.py), and so does a change of the extractor's structured plan.

Memory: the kept stores and the weights' copy together stay under ``max_memory`` bytes
(the oldest side is dropped first; a side larger than the bound is not kept). Only
in-memory stores are kept (a store spilled to disk is not).
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch import nn

from .checkpoint import batch_fingerprint
from .data import iterate_inputs

__all__ = ["KeptFeatures", "computation_tokens"]

# vars() entries of a module that are not plain attributes (as in _model.module_attributes_kept);
# the training flag is not either: every evaluation runs in eval mode.
_INTERNALS = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training"})
# At most this many loaders are kept (each entry holds a reference to its loader).
_ENTRIES = 4


def _token(value, depth: int = 0):
    """What an attribute's value is, for telling a change: simple values by value, tensors
    by identity and version, containers item by item, other objects by identity."""
    if isinstance(value, (bool, int, float, complex, str, bytes, type(None))):
        return value
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value), value._version)
    if depth < 2 and isinstance(value, (list, tuple)):
        return (type(value), tuple(_token(v, depth + 1) for v in value))
    if depth < 2 and isinstance(value, dict):
        return (type(value), tuple((k, _token(v, depth + 1)) for k, v in value.items()))
    return ("object", id(value))


def computation_tokens(model: nn.Module) -> list:
    """Every module's identity, class, forward and plain attributes (by value; tensors by
    identity and version): equal lists, the same computation (short of code and globals)."""
    tokens = []
    for module in model.modules():
        cls = type(module)
        attributes = tuple((key, _token(value)) for key, value in vars(module).items() if key not in _INTERNALS)
        tokens.append((id(module), cls, getattr(cls, "forward", None), attributes))
    return tokens


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Entry:
    def __init__(self, loader, fingerprints, signature, stores, plan, nbytes):
        self.loader, self.fingerprints, self.signature = loader, fingerprints, signature
        self.stores, self.plan, self.nbytes = stores, plan, nbytes


class KeptFeatures:
    """The kept sides of one Kernel (a FeatureStore each, with its FactorStores)."""

    def __init__(self, model: nn.Module, max_memory: int):
        self.model, self.max_memory = model, int(max_memory)
        self.entries: List[_Entry] = []
        self._weights: Optional[list] = None  # (tensor, version, data_ptr, copy) when the entries were computed
        self._computation: Optional[list] = None
        self._now: Optional[list] = None
        self.hits = 0  # sides reused (for tests and benchmarks)
        self._in_use: List[_Entry] = []  # handed to the current call: never dropped during it
        # The buffers of the entries dropped at the start of this call, for the stores it
        # opens (store.recycled_buffers); emptied when the call ends (Kernel._run).
        self.recycled: List[torch.Tensor] = []

    @property
    def nbytes(self) -> int:
        """Bytes held: the kept stores and the weights' copy."""
        return sum(e.nbytes for e in self.entries) + sum(_nbytes(w[3]) for w in self._weights or [])

    def clear(self, recycle: bool = False) -> None:
        for entry in self.entries:
            _release(entry.stores, self.recycled if recycle else None)
        self.entries, self._weights, self._computation = [], None, None

    def _tensors(self) -> list:
        return [t for _, t in self.model.named_parameters(remove_duplicate=False)] + \
               [t for _, t in self.model.named_buffers(remove_duplicate=False)]

    def validate(self, computation: list) -> None:
        """Drop everything if the weights or the computation changed since the entries
        were computed (before each call; ``computation``: computation_tokens of the model now)."""
        self._in_use = []
        self._now = computation  # this call's, for offer
        if not self.entries:
            return
        tensors = self._tensors()
        same = len(tensors) == len(self._weights) and all(
            t is w and t._version == version and t.data_ptr() == pointer
            for t, (w, version, pointer, _) in zip(tensors, self._weights))
        # Versions first (an optimizer step moves them: no comparison of values needed).
        same = same and all(torch.equal(t.detach(), copy) for t, (_, _, _, copy) in zip(tensors, self._weights))
        if not same or computation != self._computation:
            self.clear(recycle=True)

    def lookup(self, loader, inputs, expected_signature, plan) -> Optional[Any]:
        """The kept FeatureStore of ``loader`` (its ``.structured`` the factors) and its
        first batch's signature, when the loader is the kept object and still yields the
        same batches, and the extractor's plan is the one it was computed with; else None."""
        entry = next((e for e in self.entries if e.loader is loader), None)
        if entry is None or entry.plan != plan:
            return None
        if expected_signature is not None and entry.signature != expected_signature:
            return None  # the engine's own check of the second loader then names the difference
        fingerprints = [(batch.size, batch_fingerprint(batch)) for batch in iterate_inputs(loader, inputs, "loader")]
        if fingerprints != entry.fingerprints:
            self.entries.remove(entry)
            _release(entry.stores)
            return None
        self.entries.remove(entry)
        self.entries.append(entry)  # most recently used last
        self._in_use.append(entry)
        self.hits += 1
        return entry.stores[0], entry.signature

    def offer(self, loader, fingerprints, signature, feature_store, plan) -> None:
        """Keep a side just computed (at the current weights) if it fits the bound."""
        stores = [feature_store] + (feature_store.structured.stores if feature_store.structured is not None else [])
        if any(s.kind == "disk" for s in stores):
            return
        for entry in [e for e in self.entries if e.loader is loader]:
            self.entries.remove(entry)
            _release(entry.stores)
        if self._weights is None:
            tensors = self._tensors()
            weights_bytes = sum(_nbytes(t) for t in tensors)
            if weights_bytes > self.max_memory:
                return
            self._weights = [(t, t._version, t.data_ptr(), t.detach().clone()) for t in tensors]
            self._computation = self._now if self._now is not None else computation_tokens(self.model)
        nbytes = sum(s.nbytes for s in stores)
        spare = [e for e in self.entries if not any(e is used for used in self._in_use)]
        while spare and (self.nbytes + nbytes > self.max_memory or len(self.entries) >= _ENTRIES):
            oldest = spare.pop(0)
            self.entries.remove(oldest)
            _release(oldest.stores)
        if self.nbytes + nbytes > self.max_memory:
            if not self.entries:
                self._weights, self._computation = None, None
            return
        for s in stores:
            s.kept = True
        self.entries.append(_Entry(loader, fingerprints, signature, stores, plan, nbytes))


def _release(stores, recycle: Optional[list] = None) -> None:
    for s in stores:
        s.kept = False
        s.close(recycle)
