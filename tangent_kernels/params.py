"""Parameter subsamples: the global flat index and its per-tensor view.

A model's *global flat index* enumerates every trainable scalar parameter: positions
in the concatenation of ``p.reshape(-1)`` for each parameter with ``requires_grad``,
in ``model.named_parameters()`` order, shared (tied) parameters once. Everything
else (which tensors a subsample touches, the local offsets inside each tensor) is
derived here and nowhere else.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Iterator, List, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["ParamLayout", "ParamIndex", "TensorSlice", "subsample", "resolve_idx"]


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and flat offsets of a model's trainable parameters."""

    names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> "ParamLayout":
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"expected a torch.nn.Module, got {type(model).__name__}; pass the model itself"
            )
        # named_parameters() already yields a tied parameter once (first name wins),
        # which is exactly the convention of the global flat index.
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @functools.cached_property  # the layout is frozen: computed once, not on every access
    def numels(self) -> Tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """offsets[t] is the global position of tensor t's first element; offsets[-1] == total."""
        return np.concatenate([[0], np.cumsum(self.numels, dtype=np.int64)])

    @property
    def total(self) -> int:
        return int(sum(self.numels))

    def fingerprint(self) -> str:
        """A short hash of the layout, to tell architectures apart in errors and metadata."""
        text = ";".join(f"{n}:{tuple(s)}" for n, s in zip(self.names, self.shapes))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TensorSlice:
    """The part of a subsample that falls in one parameter tensor.

    ``local`` are flat positions inside that tensor, ``columns`` the feature columns
    they fill: feature[:, columns[k]] = d s / d param.reshape(-1)[local[k]].
    """

    name: str
    local: torch.Tensor  # int64 [m]
    columns: torch.Tensor  # int64 [m]
    # The whole tensor in order into consecutive columns (idx=None): columns[0] + local.
    # Known from construction, so that the per-batch copies need no check of 670k indices.
    whole: bool = False

    def span(self, numel: int):
        """The columns as a slice when the piece is the whole tensor (of ``numel``
        entries) in order into consecutive columns, else None."""
        if self.whole or _is_span(self.local, self.columns, numel):
            return slice(int(self.columns[0]), int(self.columns[0]) + self.local.numel())
        return None


def _is_span(local: torch.Tensor, columns: torch.Tensor, numel: int) -> bool:
    n = local.numel()
    if n != numel or n == 0:
        return False
    # Both hold distinct values: ascending local of the tensor's size is 0 .. n-1, and
    # ascending columns spanning n values are consecutive (one pass each, no arange).
    if n > 1 and not (bool((local[1:] > local[:-1]).all()) and bool((columns[1:] > columns[:-1]).all())):
        return False
    return int(columns[-1]) - int(columns[0]) == n - 1


class ParamIndex:
    """A subsample of a model's trainable parameters, in a fixed column order.

    ``positions`` ([p] int64, CPU) are global flat positions; column j of
    ``tk.features`` is the gradient with respect to the parameter at ``positions[j]``.
    Build one with :func:`subsample`, or from your own positions with
    :meth:`from_positions`.
    """

    def __init__(self, layout: ParamLayout, positions: torch.Tensor, _whole: bool = False):
        self.layout = layout
        self.positions = positions
        self._slices = self._whole_slices() if _whole else self._split()

    @classmethod
    def from_positions(cls, model: nn.Module, positions) -> "ParamIndex":
        layout = _layout_with_parameters(model)
        return cls(layout, _validate_positions(positions, layout.total))

    @classmethod
    def all(cls, model: nn.Module) -> "ParamIndex":
        layout = _layout_with_parameters(model)
        return cls(layout, torch.arange(layout.total, dtype=torch.int64), _whole=True)

    def __len__(self) -> int:
        return int(self.positions.numel())

    def __repr__(self) -> str:
        return (
            f"ParamIndex(p={len(self)} of {self.layout.total} trainable parameters, "
            f"{len(self._slices)} of {len(self.layout.names)} tensors touched)"
        )

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, ParamIndex)
            and self.layout == other.layout
            and torch.equal(self.positions, other.positions)
        )

    __hash__ = None  # mutable-looking tensor payload: equality only

    @property
    def tensor_slices(self) -> List[TensorSlice]:
        """The touched tensors in ``named_parameters()`` order, with their positions."""
        return self._slices

    @property
    def touched_names(self) -> List[str]:
        return [s.name for s in self._slices]

    def __iter__(self) -> Iterator[TensorSlice]:
        return iter(self._slices)

    def _whole_slices(self) -> List[TensorSlice]:
        """Every tensor whole, in order (idx=None): no search over the positions (0.6 s
        for resnet18's 11M on every call)."""
        offsets = self.layout.offsets
        # positions is 0 .. total-1, so a tensor's local 0 .. numel-1 is its head: views, no
        # arange per tensor (36 ms for resnet18's 62 tensors, on every call).
        return [TensorSlice(name, self.positions[:numel], self.positions[offsets[t]:offsets[t + 1]], whole=True)
                for t, (name, numel) in enumerate(zip(self.layout.names, self.layout.numels)) if numel]

    def _split(self) -> List[TensorSlice]:
        offsets = torch.from_numpy(self.layout.offsets)
        tensor_of = torch.searchsorted(offsets, self.positions, right=True) - 1
        # One stable sort groups columns by tensor while keeping their given order; positions
        # already grouped (sorted, as idx=None and subsample give) need none, and their
        # per-tensor pieces are slices, not gathers (the sort and the gathers took 0.1 s
        # for an MLP's 670k parameters, on every call).
        grouped = tensor_of.numel() < 2 or bool((tensor_of[1:] >= tensor_of[:-1]).all())
        columns = torch.arange(tensor_of.numel()) if grouped else torch.argsort(tensor_of, stable=True)
        counts = torch.bincount(tensor_of, minlength=len(self.layout.names)).tolist()
        slices, start = [], 0
        for t, count in enumerate(counts):
            if count:
                cols = columns[start : start + count]
                picked = self.positions[start : start + count] if grouped else self.positions[cols]
                # Grouped columns are consecutive; all of a tensor's distinct entries, ascending, are it whole.
                whole = grouped and count == self.layout.numels[t] and (
                    count < 2 or bool((picked[1:] > picked[:-1]).all()))
                slices.append(TensorSlice(self.layout.names[t], picked - offsets[t], cols, whole=whole))
                start += count
        return slices


def _layout_with_parameters(model: nn.Module) -> ParamLayout:
    layout = ParamLayout.of(model)
    if layout.total == 0:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (none with requires_grad=True); "
            "the eNTK needs at least one: unfreeze some with p.requires_grad_(True)"
        )
    return layout


def _validate_positions(positions, total: int) -> torch.Tensor:
    if isinstance(positions, np.ndarray):
        positions = torch.from_numpy(positions)
    elif isinstance(positions, (list, tuple, range)):
        positions = torch.as_tensor(list(positions)) if len(positions) else torch.empty(0, dtype=torch.int64)
    if not isinstance(positions, torch.Tensor):
        raise TypeError(
            f"idx must be None, a tk.ParamIndex, or a 1-D integer tensor/array of global flat "
            f"positions; got {type(positions).__name__}"
        )
    if positions.dtype == torch.bool or positions.is_floating_point() or positions.is_complex():
        raise TypeError(
            f"idx must hold integer positions, got dtype {positions.dtype}; convert with "
            "idx.long() (and use torch.nonzero(mask) for a boolean mask)"
        )
    if positions.dim() != 1:
        raise ValueError(
            f"idx must be 1-D, got shape {tuple(positions.shape)}; flatten it with idx.reshape(-1)"
        )
    if positions.numel() == 0:
        raise ValueError("idx is empty; select at least one parameter (e.g. tk.subsample(model, 1000))")
    positions = positions.detach().to("cpu", torch.int64)
    lo, hi = int(positions.min()), int(positions.max())
    if lo < 0 or hi >= total:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"idx holds position {bad}, out of range: valid global flat positions are "
            f"0 .. {total - 1} (the model has {total} trainable parameters)"
        )
    uniq, counts = torch.unique(positions, return_counts=True)
    if uniq.numel() != positions.numel():
        dup = uniq[counts > 1]
        raise ValueError(
            f"idx has {positions.numel() - uniq.numel()} duplicated position(s), e.g. {dup[:5].tolist()}; "
            "each parameter may appear once: use torch.unique(idx)"
        )
    return positions.contiguous()


def resolve_idx(model: nn.Module, idx) -> ParamIndex:
    """Turn the public ``idx`` argument (None, ParamIndex, positions) into a ParamIndex."""
    if idx is None:
        return ParamIndex.all(model)
    if isinstance(idx, ParamIndex):
        layout = _layout_with_parameters(model)
        if idx.layout != layout:
            raise ValueError(
                "this ParamIndex was made for a different parameter layout "
                f"(fingerprint {idx.layout.fingerprint()}, {idx.layout.total} parameters) than the "
                f"model's (fingerprint {layout.fingerprint()}, {layout.total} parameters); "
                "rebuild it with tk.subsample(model, n) for this model"
            )
        return idx
    return ParamIndex.from_positions(model, idx)


# --- subsampling ------------------------------------------------------------------

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# Positions hashed per block: a power of two (the block trick in _smallest_keys), small
# enough that a block's two uint64 buffers stay in cache.
_CHUNK = 1 << 17
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1, _MUL2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # A fixed integer hash (Steele et al.'s SplitMix64 finalizer). Unlike torch.randperm
    # or NumPy's Generator, whose streams may change between releases, this is pure
    # uint64 arithmetic: the same keys on every machine and every version.
    with np.errstate(over="ignore"):
        x = (x + np.uint64(_GOLDEN)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * _MUL1) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * _MUL2) & _MASK64
        return x ^ (x >> np.uint64(31))


def _seed_key(seed: int) -> int:
    # Every 64-bit word of the seed is folded in (seeds of any size differ; seeds below
    # 2**64 keep the keys they always had).
    key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    seed >>= 64
    while seed:
        word = np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
        key = _splitmix64(np.array([key], dtype=np.uint64) ^ word)[0]
        seed >>= 64
    return int(key)


def _first_bound(total: int, n: int) -> int:
    """A key bound that about n + 8 sqrt(n) + 64 of the total uniform keys fall under, so
    that fewer than n do with probability below 1e-15 for every n (Poisson tail; then
    _smallest_keys doubles it). The draw does not depend on it, only the time."""
    expected = n + 8 * math.isqrt(n) + 64
    return -(-(expected << 64) // total)  # ceil(2**64 expected / total)


def _smallest_keys(total: int, n: int, seed: int) -> np.ndarray:
    """Positions of the n smallest keys splitmix64(position ^ seed_key) among 0..total-1
    (a uniform n-subset), sorted. The hash is a bijection of uint64, so the keys of distinct
    positions are distinct: the n smallest are one set, whatever finds them.

    Finds them in one vectorized pass over blocks of positions, keeping only the keys
    under a bound that a few more than n of them fall under, then an O(n) selection:
    no sort of the total keys (4 s for resnet50's 25M with a running top-n).
    """
    if n >= total:
        return np.arange(total, dtype=np.int64)
    seed_key = _seed_key(seed)
    block = min(_CHUNK, 1 << (total - 1).bit_length())  # a small tensor's draw: a small template
    # Within an aligned block [b, b + block), position ^ seed_key is (b ^ seed_key's high
    # bits) + (offset ^ seed_key's low bits), a sum without carries; so the hash's first
    # step, + golden, is one add of a per-block constant to a template made once.
    template = (np.arange(block, dtype=np.uint64) ^ np.uint64(seed_key & (block - 1))) + np.uint64(_GOLDEN)
    x, y = np.empty(block, np.uint64), np.empty(block, np.uint64)
    s30, s27, s31 = np.uint64(30), np.uint64(27), np.uint64(31)
    bound = _first_bound(total, n)
    while True:
        # The last step, key = z ^ (z >> 31), leaves z's top 33 bits as they are: with a
        # bound that is a multiple of 2**33, key < bound exactly when z < bound, so the
        # step is left to the few kept keys.
        bound = -(-bound >> 33) << 33
        keep_all = bound >= 1 << 64
        limit = np.uint64(min(bound, (1 << 64) - 1))
        kept_pos, kept_z = [], []
        with np.errstate(over="ignore"):
            for start in range(0, total, block):
                m = min(block, total - start)
                z, t = x[:m], y[:m]
                np.add(template[:m], np.uint64((start ^ seed_key) & ~(block - 1) & 0xFFFFFFFFFFFFFFFF), out=z)
                np.right_shift(z, s30, out=t)
                np.bitwise_xor(z, t, out=z)
                np.multiply(z, _MUL1, out=z)
                np.right_shift(z, s27, out=t)
                np.bitwise_xor(z, t, out=z)
                np.multiply(z, _MUL2, out=z)
                if keep_all:
                    kept_pos.append(np.arange(start, start + m, dtype=np.int64))
                    kept_z.append(z.copy())
                else:
                    hit = np.flatnonzero(z < limit)
                    kept_pos.append(hit.astype(np.int64) + start)
                    kept_z.append(z[hit])
        pos = np.concatenate(kept_pos)
        if pos.size >= n:
            break
        bound *= 2  # fewer than n keys under the bound (p < 1e-15): a higher one
    z = np.concatenate(kept_z)
    key = z ^ (z >> s31)
    if pos.size > n:
        # Distinct keys: the n-th smallest splits them exactly; the kept positions are
        # already ascending (blocks in order), so the mask keeps them sorted.
        nth = np.partition(key, n - 1)[n - 1]
        pos = pos[key <= nth]
    return pos


def subsample(model: nn.Module, n: int, *, seed: int = 0, structure: str = "uniform") -> ParamIndex:
    """Draw ``n`` of the model's trainable parameters uniformly without replacement.

    Deterministic for a given (parameter layout, n, seed) on any device and any torch
    or NumPy version: the draw keeps the n smallest values of a fixed 64-bit integer
    hash of (position, seed), computed on the CPU. Positions are returned sorted
    (column j of the features is the j-th smallest sampled position), which keeps
    per-tensor gathers contiguous.

    Args:
        model: the network; only parameters with ``requires_grad`` are eligible.
        n: how many parameters to keep, 1 <= n <= number of trainable parameters.
        seed: any Python int.
        structure: "uniform" (default), or "kronecker": per parameter tensor, viewed as
            a matrix [shape[0], rest], a random set of rows times a random set of
            columns (a tensor's share of ``n`` in proportion to its size, rows and
            columns in the matrix's aspect ratio; 1-D tensors uniformly). ``tk.gram``
            then keeps the structured form for those tensors, at n^2 T^2 (rows + cols)
            per layer instead of n^2 rows cols (docs/structured.md). The per-tensor
            rounding makes the size about ``n``: ``len(idx)`` is exact.
    """
    layout = _layout_with_parameters(model)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    n = int(n)
    if not 1 <= n <= layout.total:
        raise ValueError(
            f"cannot subsample n={n} parameters: the model has {layout.total} trainable "
            f"parameters, so n must be in 1 .. {layout.total} (use idx=None for all of them)"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if structure == "kronecker":
        return ParamIndex(layout, torch.from_numpy(_kronecker_positions(layout, n, int(seed))))
    if structure != "uniform":
        raise ValueError(f"structure must be 'uniform' or 'kronecker', got {structure!r}")
    positions = torch.from_numpy(_smallest_keys(layout.total, n, int(seed)))
    return ParamIndex(layout, positions)


def _tensor_seed(seed: int, tensor: int, part: int) -> int:
    # Independent draws per tensor and per axis, from one user seed.
    digest = hashlib.sha256(f"{seed}:{tensor}:{part}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _kronecker_positions(layout: ParamLayout, n: int, seed: int) -> np.ndarray:
    """Rows x columns per tensor (see subsample), as sorted global positions."""
    parts = []
    offsets = layout.offsets
    for t, (shape, numel) in enumerate(zip(layout.shapes, layout.numels)):
        share = n * numel / layout.total
        if len(shape) < 2:
            m = min(numel, int(round(share)))
            if m:
                parts.append(offsets[t] + _smallest_keys(numel, m, _tensor_seed(seed, t, 0)))
            continue
        rows, cols = shape[0], numel // shape[0]
        if share < 0.5:
            continue
        # r / c = rows / cols with r c = share: the same fraction of each axis.
        r = int(min(rows, max(1, round(np.sqrt(share * rows / cols)))))
        c = int(min(cols, max(1, round(share / r))))
        chosen_rows = _smallest_keys(rows, r, _tensor_seed(seed, t, 1))
        chosen_cols = _smallest_keys(cols, c, _tensor_seed(seed, t, 2))
        parts.append(offsets[t] + (chosen_rows[:, None] * cols + chosen_cols[None, :]).reshape(-1))
    if not parts:
        raise ValueError(f"a Kronecker subsample of n={n} leaves every tensor empty: raise n")
    return np.sort(np.concatenate(parts))
