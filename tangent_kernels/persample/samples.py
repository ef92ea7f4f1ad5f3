"""Where a data tensor's samples are, followed from the batch through every op.

The model's inputs hold sample b in row b of dim 0. Every op on data passes through the
mode, which carries that fact to the op's results by what the op does, never by reading
a size: a reshape keeps the order of the elements, so the samples of the result are
where that order puts them; a permute moves them with their dim; an index, a split or a
reduction keeps them unless it cuts through their dim. Sizes are only checked to agree;
an op none of these families names (an activation, a convolution, pooling, a library's
own op) is taken to keep the layout when its result has the input's dims and the same
size on the samples' dim, and loses them otherwise. Values that mix samples along a
kept layout (``h + h.flip(0)``) are the spot check's to catch, not this.

One dim holds the samples, possibly folded with others (``Samples``): along it, index i
belongs to sample (i // inner) % B. So [B, T, d] has them on dim 0 (inner 1); Swin's
windows [B * nW, T, C] on dim 0 with inner nW (sample-major); sequence first [T, B, d]
on dim 1; [T * B, d] on dim 0 with inner 1 and T blocks of B (sample-minor). Where no one
dim holds them (a reshape that splits them across two dims, an op that reduces over
them, an op whose layout is unknown) the fact is *lost*, with the op that lost it: the
rules then refuse the tensor, and its parameters take the generic path with that reason.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch

__all__ = ["Samples", "by_sample", "follow", "lost"]


class Samples:
    """A data tensor's samples: on ``dim``, index i is sample (i // inner) % B; dim None:
    not known, ``why`` says which op lost them."""

    __slots__ = ("dim", "inner", "why")

    def __init__(self, dim: Optional[int], inner: int = 1, why: str = ""):
        self.dim, self.inner, self.why = dim, inner, why

    def __repr__(self):
        if self.dim is None:
            return f"Samples(lost: {self.why})"
        return f"Samples(dim {self.dim}, inner {self.inner})"

    def __eq__(self, other):
        return isinstance(other, Samples) and (self.dim, self.inner) == (other.dim, other.inner) \
            and self.dim is not None

    def __hash__(self):
        return hash((self.dim, self.inner))

    def known(self) -> bool:
        return self.dim is not None

    def fits(self, shape, batch: int) -> bool:
        return self.dim is not None and self.dim < len(shape) and shape[self.dim] > 0 \
            and shape[self.dim] % (self.inner * batch) == 0

    def exact(self, shape, batch: int) -> bool:
        """One sample per index of the dim, in order: [.., B, ..]."""
        return self.dim is not None and self.inner == 1 and self.dim < len(shape) and shape[self.dim] == batch

    def outer(self, shape, batch: int) -> int:
        return shape[self.dim] // (self.inner * batch)


def lost(why: str) -> Samples:
    return Samples(None, 1, why)


FIRST = Samples(0)


def by_sample(t: torch.Tensor, samples: Samples, batch: int) -> torch.Tensor:
    """t with its samples first: [B, outer, inner, *the other dims in order] (a view
    where the layout allows)."""
    if samples.dim == 0 and samples.inner == 1 and t.shape[0] == batch:  # [B, ...]: every use's usual case
        return t.unsqueeze(1).unsqueeze(1)
    t = t.movedim(samples.dim, 0)
    t = t.unflatten(0, (t.shape[0] // (samples.inner * batch), batch, samples.inner))
    return t.transpose(0, 1)


def _name(func) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property (x.T, x.mT): the descriptor's name
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _base_name(name: str) -> str:
    """add for add, add_, __add__, __radd__, __iadd__."""
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name[:1] in ("r", "i") and name[1:] in _BROADCASTING:
            name = name[1:]
        return name
    return name[:-1] if name.endswith("_") else name


_BROADCASTING = frozenset(
    "add sub mul div true_divide truediv floor_divide floordiv rsub where addcmul addcdiv maximum minimum fmax "
    "fmin lerp pow float_power fmod mod remainder hypot atan2 arctan2 copysign eq ne lt le gt ge greater less "
    "greater_equal less_equal not_equal logical_and logical_or logical_xor bitwise_and bitwise_or bitwise_xor and "
    "or xor masked_fill clamp clip xlogy ldexp heaviside logaddexp expand expand_as broadcast_to".split())
_RESHAPES = frozenset("view reshape flatten unflatten view_as reshape_as squeeze unsqueeze ravel".split())
_PERMUTES = frozenset("permute transpose swapaxes swapdims t T mT H mH adjoint movedim moveaxis".split())
_REDUCTIONS = frozenset(
    "sum mean nansum nanmean prod amax amin max min argmax argmin std var std_mean var_mean norm logsumexp any all "
    "median nanmedian mode count_nonzero vector_norm linalg_vector_norm aminmax".split())
# Results that are constants whatever the values of the data argument.
_FACTORIES = frozenset(
    "new_zeros new_ones new_full new_empty new_tensor zeros_like ones_like empty_like full_like".split())
_APPENDS = frozenset("embedding one_hot".split())  # results: the argument's dims, then new ones
_MATMULS = frozenset("matmul mm bmm __matmul__ __rmatmul__".split())


def _ints(value) -> Optional[List[int]]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return [value]
    if isinstance(value, (tuple, list, torch.Size)) and all(isinstance(v, int) and not isinstance(v, bool)
                                                             for v in value):
        return list(value)
    return None


def _prod(values) -> int:
    return math.prod(values)


def _reshaped(shape, s: Samples, out_shape, batch: int, name: str) -> Samples:
    """A reshape keeps the elements' order: sample of flat element e is (e // step) % B."""
    if _prod(shape) != _prod(out_shape):
        return lost(f"{name} changed the number of elements")
    step = s.inner * _prod(shape[s.dim + 1:])
    for d in range(len(out_shape)):
        after = _prod(out_shape[d + 1:])
        if after and step % after == 0 and _prod(out_shape[d:]) % (step * batch) == 0:
            return Samples(d, step // after)
    return lost(f"{name} {list(shape)} -> {list(out_shape)} split the samples' dim {s.dim} across dims")


def _permuted(name, args, kwargs, ndim, s: Samples) -> Samples:
    if name in ("T", "H"):  # every dim reversed (for 2-D: the transpose)
        order = list(range(ndim))[::-1]
    elif name in ("t", "mT", "mH", "adjoint"):
        order = list(range(ndim))
        if ndim >= 2:
            order[-1], order[-2] = order[-2], order[-1]
    elif name == "permute":
        order = _ints(args[1]) if len(args) == 2 else _ints(list(args[1:]))
        if order is None:
            order = _ints(kwargs.get("dims"))
    elif name in ("movedim", "moveaxis"):
        source = _ints(args[1] if len(args) > 1 else kwargs.get("source"))
        target = _ints(args[2] if len(args) > 2 else kwargs.get("destination"))
        source, target = [v % ndim for v in source], [v % ndim for v in target]
        rest = [d for d in range(ndim) if d not in source]
        order = [None] * ndim
        for a, b in zip(source, target):
            order[b] = a
        it = iter(rest)
        order = [next(it) if o is None else o for o in order]
    else:  # transpose and its aliases
        pair = [a for a in args[1:3]] + [kwargs[k] for k in ("dim0", "dim1", "axis0", "axis1") if k in kwargs]
        a, b = (v % ndim for v in pair[:2])
        order = list(range(ndim))
        order[a], order[b] = b, a
    order = [d % ndim for d in order]
    return Samples(order.index(s.dim), s.inner)


def _dim_argument(args, kwargs, position: int, default=None):
    for key in ("dim", "axis", "dims"):
        if key in kwargs:
            return kwargs[key]
    return args[position] if len(args) > position else default


def _reduced(name, args, kwargs, t, s: Samples, r) -> Samples:
    if len(args) > 1 and isinstance(args[1], torch.Tensor):  # max(x, y): elementwise
        return Samples(s.dim, s.inner)
    position = 2 if name in ("norm", "vector_norm", "linalg_vector_norm") else 1  # (x, p / ord, dim)
    dims = _ints(_dim_argument(args, kwargs, position))
    if dims is None:
        return lost(f"{name} reduced over every dim, the samples' too")
    ndim = max(t.dim(), 1)
    dims = {d % ndim for d in dims}
    if s.dim in dims:
        return lost(f"{name} reduced over the samples' dim {s.dim}")
    keep = r.dim() == t.dim()  # keepdim, however it was passed (the reduced dims are at least one)
    return Samples(s.dim - (0 if keep else sum(1 for d in dims if d < s.dim)), s.inner)


def _split(name, args, kwargs, t, s: Samples, count: int) -> Samples:
    defaults = {"select": None, "narrow": None, "unbind": 0, "unfold": None}
    position = 1 if name in ("select", "narrow", "unbind", "unfold") else 2
    dim = _dim_argument(args, kwargs, position, defaults.get(name, 0))
    dim = (dim if isinstance(dim, int) else 0) % t.dim()
    if name in ("select", "unbind"):
        if dim == s.dim:
            return lost(f"{name} took one index of the samples' dim")
        return Samples(s.dim - (1 if dim < s.dim else 0), s.inner)
    if dim == s.dim and (count > 1 or name == "unfold" or name == "narrow"):
        return lost(f"{name} cut the samples' dim")
    return Samples(s.dim, s.inner)


def _matmul(name, args, t, s: Samples, out) -> Samples:
    left, right = (args[1], args[0]) if name == "__rmatmul__" else (args[0], args[1])
    if not (isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor)) or left.dim() < 2 or right.dim() < 2:
        return lost(f"{name} of a vector")
    if t is left:
        if s.dim == left.dim() - 1:
            return lost(f"{name} summed over the samples' dim")
        return Samples(s.dim + out.dim() - left.dim(), s.inner)
    if s.dim == right.dim() - 2:
        return lost(f"{name} summed over the samples' dim")
    return Samples(s.dim + out.dim() - right.dim(), s.inner)


def _einsum(args, t, s: Samples) -> Samples:
    if not isinstance(args[0], str) or "->" not in args[0] or "." in args[0]:
        return lost("einsum without an explicit output")
    operands = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]
    inputs, output = args[0].replace(" ", "").split("->")
    for sub, operand in zip(inputs.split(","), operands):
        if operand is t:
            letter = sub[s.dim]
            if letter not in output:
                return lost("einsum summed over the samples' dim")
            return Samples(output.index(letter), s.inner)
    return lost("einsum")


def _concatenated(name, args, kwargs, t, s: Samples) -> Samples:
    dim = _dim_argument(args, kwargs, 1, 0)
    dim = dim if isinstance(dim, int) else 0
    if name == "stack":
        dim %= t.dim() + 1
        return Samples(s.dim + (1 if dim <= s.dim else 0), s.inner)
    if dim % t.dim() == s.dim:
        return lost(f"{name} joined tensors along the samples' dim")
    return Samples(s.dim, s.inner)


def _consumes(item) -> int:
    if item is None or item is Ellipsis:
        return 0
    return item.dim() if isinstance(item, torch.Tensor) and item.dtype == torch.bool else 1


def _identity_axis(item, size: int) -> Optional[int]:
    """The dim k along which the integer index ``item`` is arange(size) (every other dim of
    size 1): indexing by it keeps each sample where it was. None otherwise."""
    if not isinstance(item, torch.Tensor) or item.dtype == torch.bool or item.is_floating_point() \
            or item.numel() != size or item.dim() == 0:
        return None
    axes = [k for k, n in enumerate(item.shape) if n == size]
    if len(axes) != 1 and size != 1:
        return None
    if not torch.equal(item.reshape(-1), torch.arange(size, device=item.device, dtype=item.dtype)):
        return None
    return axes[0] if axes else 0


def _getitem(t, index, s: Optional[Samples], samples_of):
    """x[index] -> (the Samples of the result, (where the advanced indices' block lands,
    its number of dims)). Basic indexing keeps or drops dims; an advanced index on the
    samples' dim keeps them only when it is the identity (x[arange(B), lengths], HF's
    mask[arange(B)[:, None, None, None], kv[None, None, None, :]]). s None: the block only."""
    items = list(index) if isinstance(index, tuple) else [index]
    items = [torch.tensor(i) if isinstance(i, list) and i and all(isinstance(v, int) for v in i) else i
             for i in items]
    consumed = sum(_consumes(i) for i in items)
    expanded = []
    for i in items:
        expanded += [slice(None)] * (t.dim() - consumed) if i is Ellipsis else [i]
    expanded += [slice(None)] * (t.dim() - sum(_consumes(i) for i in expanded))
    advanced = [k for k, i in enumerate(expanded) if isinstance(i, torch.Tensor)]
    block_ndim = 0
    if advanced:
        advanced = sorted(advanced + [k for k, i in enumerate(expanded) if isinstance(i, int)])
        # a boolean mask gives one dim (its count of True), whatever its own dims
        block_ndim = len(torch.broadcast_shapes(*[(1,) if expanded[k].dtype == torch.bool else expanded[k].shape
                                                  for k in advanced if isinstance(expanded[k], torch.Tensor)]))
    sample_dim = None if s is None else s.dim
    out_dim, in_dim, sample_at, block_at, in_block = 0, 0, None, None, None
    for k, item in enumerate(expanded):
        if item is None:
            out_dim += 1
        elif k in advanced:
            width = _consumes(item)
            if sample_dim is not None and in_dim <= sample_dim < in_dim + width:
                axis = _identity_axis(item, t.shape[in_dim]) if samples_of(item) is None else None
                if axis is None:
                    return lost("an index into the samples' dim"), None
                in_block = block_ndim - item.dim() + axis
                sample_at = "block"
            in_dim += width
            if block_at is None:
                block_at = out_dim
                out_dim += block_ndim
        elif isinstance(item, (int, torch.SymInt)) and not isinstance(item, bool):
            if in_dim == sample_dim:
                return lost("an index into the samples' dim"), None
            in_dim += 1
        elif isinstance(item, slice):
            if in_dim == sample_dim:
                n = t.shape[in_dim]
                if item != slice(None) and range(n)[item] != range(n):
                    return lost("a slice of the samples' dim"), None
                sample_at = out_dim
            in_dim += 1
            out_dim += 1
        else:
            return lost(f"an index of type {type(item).__name__}"), None
    if advanced:
        if advanced != list(range(advanced[0], advanced[-1] + 1)):  # not adjacent: the block goes first
            if isinstance(sample_at, int):
                sample_at += block_ndim if sample_at < block_at else 0
            block_at = 0
        if sample_at == "block":
            sample_at = block_at + in_block
    if s is None:
        return None, (block_at, block_ndim)
    return (Samples(sample_at, s.inner) if sample_at is not None else lost("indexing")), (block_at, block_ndim)


_IMAGE_TO_COLUMNS = (torch.nn.functional.unfold, torch.nn.functional.fold)
_SPLITS = frozenset("split chunk tensor_split split_with_sizes unbind select narrow unfold".split())


def follow(func, args, kwargs, results: Sequence[torch.Tensor], samples_of: Callable, batch: int) -> List[Samples]:
    """The samples of each result of a data op. samples_of(t): a tensor's Samples, None
    for a constant. Never raises: an argument form not foreseen here loses them."""
    name = _name(func)
    try:
        if name not in _MOVERS and func not in _IMAGE_TO_COLUMNS:
            kept = _kept(args, kwargs, results, samples_of, batch)
            if kept is not None:
                return kept
        return _follow(name, func, args, kwargs, results, samples_of, batch)
    except Exception as error:  # noqa: BLE001 - the user's op must run whatever we make of it
        why = lost(f"{name} (not followed: {type(error).__name__})")
        return [why] * len(results)


# Ops that may move the samples whatever the shapes (_one's families), in place too.
_MOVERS = frozenset(_RESHAPES | _PERMUTES | _SPLITS | _REDUCTIONS | _MATMULS | _APPENDS
                    | {"__getitem__", "einsum", "cat", "concat", "concatenate", "stack", "linear"}
                    | {f"{name}_" for name in _RESHAPES | _PERMUTES})


def _kept(args, kwargs, results, samples_of, batch) -> Optional[List[Samples]]:
    """The answer of _one's last rule (the layout kept) without its walk, for an op of no
    family whose data arguments all hold the samples alike and have the results' shape
    (an activation, a residual add, dropout, softmax: most ops of a forward); None
    otherwise."""
    found, shape = None, None
    for value in (*args, *kwargs.values()):
        for t in ((value,) if isinstance(value, torch.Tensor) else value if isinstance(value, (list, tuple)) else ()):
            if not isinstance(t, torch.Tensor):
                continue
            s = samples_of(t)
            if s is None:
                continue
            if s.dim is None or (found is not None and (s != found or t.shape != shape)):
                return None
            found, shape = s, t.shape
    if found is None or not found.fits(shape, batch) or any(r.shape != shape for r in results):
        return None
    return [found] * len(results)


def _follow(name, func, args, kwargs, results, samples_of, batch) -> List[Samples]:
    sources = [(t, s) for value in (*args, *kwargs.values())
               for t in ([value] if isinstance(value, torch.Tensor) else value if isinstance(value, (list, tuple))
                         else []) if isinstance(t, torch.Tensor) for s in [samples_of(t)] if s is not None]
    out = _follow_each(name, func, args, kwargs, results, sources, samples_of, batch)
    if batch == 1:  # one sample: every element is its own, whatever the op did
        out = [s if s.known() else Samples(0, r.shape[0]) if r.dim() and r.shape[0] else s
               for s, r in zip(out, results)]
    return out


def _follow_each(name, func, args, kwargs, results, sources, samples_of, batch) -> List[Samples]:
    for _, s in sources:
        if not s.known():
            return [s] * len(results)
    base = _base_name(name)
    out = []
    for r in results:
        found = None
        for t, s in sources:
            one = _one(func, name, base, args, kwargs, t, s, r, len(results), samples_of, batch)
            if one.known() and not one.fits(r.shape, batch):
                one = lost(f"{name}: a result of shape {list(r.shape)} cannot hold the samples of "
                           f"{list(t.shape)}")
            if not one.known():
                found = one
                break
            if found is not None and found != one:
                found = lost(f"{name} of data with their samples on different dims")
                break
            found = one
        out.append(found)
    return out


def _one(func, name, base, args, kwargs, t, s: Samples, r, count, samples_of, batch) -> Samples:
    """The samples of result r coming from data argument t."""
    if func in _IMAGE_TO_COLUMNS:  # [N, C, *spatial] <-> [N, C * k, L]: dim 0 kept
        return Samples(0, s.inner) if s.dim == 0 else lost(f"{name} of data with the samples not first")
    if name.endswith("_") and not name.endswith("__"):
        if name[:-1] in _PERMUTES:
            name = name[:-1]
        elif name[:-1] in _RESHAPES:
            return lost(f"{name} (an in-place reshape)")
    if name in _RESHAPES:
        return _reshaped(tuple(t.shape), s, tuple(r.shape), batch, name)
    if name in _PERMUTES:
        return _permuted(name, args, kwargs, t.dim(), s)
    if name == "__getitem__":
        if args[0] is not t:  # a data index tensor: its samples go where the indexed block goes
            block = _getitem(args[0], args[1], None, samples_of)[1]
            if block is None or block[0] is None:
                return lost("indexing by data")
            return Samples(block[0] + block[1] - t.dim() + s.dim, s.inner)
        return _getitem(t, args[1], s, samples_of)[0]
    if name in _SPLITS:
        return _split(name, args, kwargs, t, s, count)
    if name in _REDUCTIONS:
        return _reduced(name, args, kwargs, t, s, r)
    if name in _MATMULS:
        return _matmul(name, args, t, s, r)
    if name == "einsum":
        return _einsum(args, t, s)
    if name in ("cat", "concat", "concatenate", "stack"):
        return _concatenated(name, args, kwargs, t, s)
    if name == "linear":  # by a constant weight: the last dim is mixed
        return lost("linear summed over the samples' dim") if s.dim == t.dim() - 1 else Samples(s.dim, s.inner)
    if name in _APPENDS and r.dim() >= t.dim():
        return Samples(s.dim, s.inner)
    if base in _BROADCASTING and r.dim() >= t.dim():
        at = s.dim + r.dim() - t.dim()
        if r.shape[at] == t.shape[s.dim]:
            return Samples(at, s.inner)
        return lost(f"{name} broadcast the samples' dim")
    if r.dim() == t.dim() and r.shape[s.dim] == t.shape[s.dim]:
        return Samples(s.dim, s.inner)  # an op that keeps the layout (activations, convolutions, pooling, ...)
    return lost(f"{name} changed the shape {list(t.shape)} -> {list(r.shape)}")


def factory(func) -> bool:
    """Whether a data op's results are constants (x.new_zeros, torch.zeros_like)."""
    return _name(func) in _FACTORIES
