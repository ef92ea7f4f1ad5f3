"""Sampled parameter tensors, and which of their sampled entries a view of them holds.

Every use of a parameter is traced back to one leaf: the tensor that ``functional_call``
puts in the model for it. A use may see the leaf itself or any strided view of it (a
transpose, the q/k/v third of a packed projection, an ``expand`` along the batch): the
view's sizes, strides and storage offset say, for each of its elements, which entry of
the leaf it is, so the sampled entries a view holds, and where, follow without looking
at values.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import torch

__all__ = ["SampledTensor", "Geometry", "geometry_of", "is_the_leaf"]

Geometry = Tuple[Tuple[int, ...], Tuple[int, ...], int]  # (size, stride, offset in elements from the leaf's start)

# Positions of at most this many view elements are formed at once.
_CHUNK = 1 << 22


def geometry_of(view: torch.Tensor, leaf: torch.Tensor) -> Geometry:
    return tuple(view.shape), tuple(view.stride()), view.storage_offset() - leaf.storage_offset()


def is_the_leaf(geometry: Geometry, leaf: torch.Tensor) -> bool:
    """Whether a view with ``geometry`` is the whole leaf in its own layout."""
    return tuple(geometry[0]) == tuple(leaf.shape) and tuple(geometry[1]) == tuple(leaf.stride()) and geometry[2] == 0


class SampledTensor:
    """One parameter tensor with sampled entries: its leaf, and where its entries go in F.

    local: flat positions of the sampled entries in the tensor; columns: their columns of
    the feature block F [B, p] (both int64 [m], on the compute device).
    """

    def __init__(self, name: str, leaf: torch.Tensor, local: torch.Tensor, columns: torch.Tensor,
                 whole: bool = False):
        self.name, self.leaf, self.local, self.columns = name, leaf, local, columns
        # Every entry, in order, into consecutive columns (params.TensorSlice.whole): the
        # checks below are known without a pass over them.
        self._whole = whole
        if whole or local.numel() < 2 or bool((local[1:] >= local[:-1]).all()):  # sorted already: no sort
            self._sorted_local, self._sorted_columns = local, columns
        else:
            order = torch.argsort(local)
            self._sorted_local, self._sorted_columns = local[order], columns[order]
        self._hits: Dict[Geometry, Tuple[torch.Tensor, torch.Tensor, bool]] = {}
        # Index plans of the rules, keyed by what they depend on: made on the first batch only.
        self.cache: Dict[tuple, object] = {}
        self._spans: Dict[int, tuple] = {}  # id(columns) -> (columns, slice or None)

    def span(self, columns: torch.Tensor):
        """``columns`` as a slice when they are consecutive and ascending (the usual case:
        idx sorted), for a strided copy instead of a scatter; else None."""
        if self._whole and columns is self.columns:
            return slice(int(columns[0]), int(columns[0]) + columns.numel())
        entry = self._spans.get(id(columns))
        if entry is None or entry[0] is not columns:
            n = columns.numel()
            consecutive = n > 0 and bool((columns == torch.arange(n, device=columns.device) + columns[0]).all())
            entry = self._spans[id(columns)] = (columns, slice(int(columns[0]), int(columns[0]) + n) if consecutive else None)
        return entry[1]

    def whole(self, geometry: Geometry) -> bool:
        """Whether a view with ``geometry`` has every element sampled, in its own order
        (idx=None): its gradient then needs no gather."""
        key = ("whole", geometry)
        leaf = self.leaf
        if self._whole and leaf.is_contiguous() and is_the_leaf(geometry, leaf):
            return True
        if key not in self.cache:
            elements = self.hits(geometry)[0]
            numel = math.prod(geometry[0])
            self.cache[key] = elements.numel() == numel and bool(
                (elements == torch.arange(numel, device=elements.device)).all())
        return self.cache[key]

    @property
    def m(self) -> int:
        return self.local.numel()

    def hits(self, geometry: Geometry) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """(elements, columns, unique) for a view of the leaf with ``geometry``.

        elements [h]: flat (row-major) indices into the view of the elements that are
        sampled entries; columns [h]: their columns of F; unique: whether no column
        repeats (a view that shows one entry several times, e.g. an ``expand``, repeats
        columns, and its contributions must be summed).
        """
        cached = self._hits.get(geometry)
        if cached is None:
            cached = self._hits[geometry] = self._compute_hits(*geometry)
        return cached

    def _compute_hits(self, size: Sequence[int], stride: Sequence[int], offset: int):
        device = self.local.device
        leaf = self.leaf
        if tuple(size) == tuple(leaf.shape) and tuple(stride) == tuple(leaf.stride()) and offset == 0 and leaf.is_contiguous():
            return self.local, self.columns, True
        numel = math.prod(size)
        if numel == 0 or self.m == 0:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return empty, empty, True
        if not size:  # a 0-dim view: one element
            size, stride = (1,), (0,)
        inner = torch.full((), offset, dtype=torch.int64, device=device)
        for n, s in zip(size[1:], stride[1:]):
            inner = inner.unsqueeze(-1) + torch.arange(n, device=device) * s
        inner = inner.reshape(-1)
        step = max(1, _CHUNK // max(inner.numel(), 1))
        elements, columns = [], []
        for start in range(0, size[0], step):
            stop = min(start + step, size[0])
            positions = ((torch.arange(start, stop, device=device) * stride[0])[:, None] + inner[None, :]).reshape(-1)
            slot = torch.searchsorted(self._sorted_local, positions).clamp_(max=self.m - 1)
            hit = self._sorted_local[slot] == positions
            found = torch.nonzero(hit).reshape(-1)
            elements.append(found + start * inner.numel())
            columns.append(self._sorted_columns[slot[found]])
        elements, columns = torch.cat(elements), torch.cat(columns)
        unique = torch.unique(columns).numel() == columns.numel()
        return elements, columns, unique
