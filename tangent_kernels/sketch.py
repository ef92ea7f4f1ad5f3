"""Random projections of per-sample gradients (sketched eNTKs): ``tk.Projection``.

The sketched features are F R, with F [B, p] a batch's per-sample gradients and R [p, dim]
a random matrix with E[R R^T] = I, so that K~ = (F R)(F R)^T is an unbiased estimate of
K = F F^T. R is never held whole: it is generated in slices of rows [block_cols, dim]
from a counter-based integer hash of (seed, tensor name, flat position in the tensor,
column), and each slice is multiplied into the batch's block as the block forms
(``Projection.project``), so a store then holds [B, dim] per batch. One call keeps the
slices it generated for its later batches while they fit a budget (``KeptRows``), never
beyond the call.

Because an entry of R is a pure function of (seed, tensor name, position, column), R is the
same for every batch size, block size, run and device (the Rademacher signs bit for bit;
the Gaussian entries up to the last bits of the device's log, sqrt, cos and sin), a subsample's rows
are the full-parameter R's rows at its positions, and the first d columns of R for dim
are, up to the 1/sqrt(dim) scale, R for dim = d. docs/sketch.md has the variance.
"""

from __future__ import annotations

import hashlib
import math
from typing import Dict, Optional

import torch

from .params import ParamIndex

__all__ = ["KeptRows", "Projection", "check_projection", "kept_rows_budget"]

KINDS = ("gaussian", "rademacher", "kronecker")
# How much worse than balanced (a = b = sqrt(dim)) a Kronecker split may be: a factor of
# a (out side) below sqrt(dim) / _SPLIT_SLACK is refused (a prime dim would give 1 x dim,
# whose out side alone has relative variance 2: no sketch).
_SPLIT_SLACK = 4

_M64 = 1 << 64


def _signed(c: int) -> int:
    # torch has no uint64 arithmetic: the constants as the int64 of the same bits (mul
    # and add wrap modulo 2**64 alike in two's complement).
    return c - _M64 if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1, _MUL2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
# Bounds a slice of R to this many entries: its int64 hash buffers (two of them, 16 MiB
# each at 2**21 entries) stay small next to a batch of features.
_SLICE_ENTRIES = 1 << 21
# Bounds the projected factors of a chunk of samples (add_factor_sketch), in entries.
_FACTOR_ENTRIES = 1 << 18
# A call's kept slices of R (KeptRows) hold at most this many bytes, and at most a quarter
# of the call's max_memory: the whole R of a 30k-parameter MLP at dim 2,048 (or 130k
# parameters at dim 512) fits, at Gaussian generation's ~5 ns per entry 0.3 s saved per
# batch after the first; a larger R is kept in part (its first slices), the rest made per
# batch. The quarter leaves a gram's feature store most of the budget it was given.
KEPT_ROWS_BYTES = 256 << 20
_KEPT_ROWS_SHARE = 4


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    # A logical right shift of int64 (torch's >> is arithmetic: it copies the sign bit).
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 tensors (the hash params.subsample uses, there on
    uint64 NumPy arrays): a bijection of 64-bit words, pure integer arithmetic, so the same
    bits on every device and torch version. Overwrites x."""
    x.add_(_GOLDEN)
    x.bitwise_xor_(_shr(x, 30)).mul_(_MUL1)
    x.bitwise_xor_(_shr(x, 27)).mul_(_MUL2)
    return x.bitwise_xor_(_shr(x, 31))


_LOW1, _LOW2 = 0x7FEB352D, 0x846CA68B - (1 << 32)  # lowbias32's multipliers, as int32


def _hash32(x: torch.Tensor, salt: torch.Tensor, tmp: Optional[torch.Tensor] = None) -> torch.Tensor:
    """lowbias32 (C. Wellons' 32-bit integer hash, a bijection) of x ^ salt, on int32
    tensors (multiplications wrap modulo 2**32, as uint32's would). Overwrites x (and tmp,
    a scratch buffer of x's shape, allocated when not given)."""
    tmp = torch.empty_like(x) if tmp is None else tmp
    x.bitwise_xor_(salt)
    for shift, multiplier in ((16, _LOW1), (15, _LOW2), (16, None)):
        # A logical right shift of int32: the arithmetic shift, its copied sign bits masked.
        torch.bitwise_right_shift(x, shift, out=tmp).bitwise_and_((1 << (32 - shift)) - 1)
        x.bitwise_xor_(tmp)
        if multiplier is not None:
            x.mul_(multiplier)
    return x


class Projection:
    """A random projection of the eNTK features to ``dim`` columns: ``projection=`` of
    :func:`tk.features` ([n, dim]), :func:`tk.gram` and :class:`tk.Kernel` (the sketched
    K~ = (G R)(G R)^T, unbiased for K over ``idx``: E[K~] = K).

    Args:
        dim: the number of columns of the sketch (> 0). The error of an entry of K~ falls
            as 1/sqrt(dim) (docs/sketch.md).
        kind: "gaussian" (entries N(0, 1/dim)), "rademacher" (entries +-1/sqrt(dim),
            a smaller variance, bit-identical on every device) or "kronecker": a weight
            used as x -> W x (linear, or convolution through its unfolded patches) is
            projected as R_out (x) R_in, its input and output-gradient factors each
            projected on their own, (R_out^T g_t)(R_in^T x_t)^T summed over positions,
            never forming its per-sample gradient; every other tensor (biases, norms,
            embeddings, generic ops) takes the Gaussian kind's R. ``dim`` must then split
            as a x b (``factor_dims``) near sqrt(dim) x sqrt(dim), e.g. a power of two.
        seed: an int; the same seed gives the same R for every batch size, run and device.
    """

    def __init__(self, dim: int, kind: str = "gaussian", seed: int = 0):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"Projection dim must be a positive int (the number of sketch columns), got {dim!r}")
        if kind not in KINDS:
            raise ValueError(f"Projection kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Projection seed must be an int, got {type(seed).__name__}")
        self.dim, self.kind, self.seed = dim, kind, seed
        if kind == "kronecker":
            a = self.factor_dims[0]
            if a * _SPLIT_SLACK < math.sqrt(dim):
                raise ValueError(
                    f"Projection dim {dim} splits no better than {a} x {dim // a} for kind='kronecker' (each "
                    f"Kronecker-projected tensor's sketch is an a x b grid of columns, with a relative variance of "
                    f"about 2/a + 2/b): pick a dim with a balanced factorization, e.g. a power of two "
                    f"({2 ** round(math.log2(dim))})")

    def __repr__(self) -> str:
        return f"Projection(dim={self.dim}, kind={self.kind!r}, seed={self.seed})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Projection) and (self.dim, self.kind, self.seed) == (other.dim, other.kind, other.seed)

    def __hash__(self) -> int:
        return hash((self.dim, self.kind, self.seed))

    @property
    def identity(self) -> str:
        """What a checkpoint records: R is a function of these (and the generator's version)."""
        return f"{self.kind} dim={self.dim} seed={self.seed} generator=lowbias32-v1"

    @property
    def factor_dims(self) -> tuple:
        """(a, b), a <= b, a b = dim: the Kronecker kind's columns of R_out and R_in. For a
        rank-one gradient g x^T the sketch's relative variance is ~2/a + 2/b, least when
        balanced: a is dim's largest divisor not above sqrt(dim)."""
        a = max(d for d in range(1, math.isqrt(self.dim) + 1) if self.dim % d == 0)
        return a, self.dim // a

    @property
    def structured(self) -> str:
        """The extractor's structured mode this projection needs: the Kronecker kind takes
        every linear map's factors (structured.plan.decide's "products"); the dense kinds
        take features for every tensor."""
        return "products" if self.kind == "kronecker" else "never"

    def _tensor_key(self, name: str) -> int:
        digest = hashlib.sha256(f"tk.Projection:{self.seed}:{name}".encode()).digest()
        return _signed(int.from_bytes(digest[:8], "little"))

    def _factor_key(self, name: str, side: str) -> int:
        # Another prefix than _tensor_key's: no tensor name collides with a factor's key.
        digest = hashlib.sha256(f"tk.Projection.kronecker-{side}:{self.seed}:{name}".encode()).digest()
        return _signed(int.from_bytes(digest[:8], "little"))

    def rows(self, name: str, local: torch.Tensor, dtype: torch.dtype = torch.float32,
             device=None) -> torch.Tensor:
        """R's rows [m, dim] for the entries at flat positions ``local`` [m] (int64) of the
        parameter tensor ``name``, scaled so that E[R R^T] = I. (For the Kronecker kind:
        the rows of a tensor it does not Kronecker-project, the Gaussian kind's.)"""
        return _rows(self._tensor_key(name), local, self.dim, self.kind == "rademacher", dtype, device)

    def factor_rows(self, name: str, side: str, local: torch.Tensor, dtype: torch.dtype = torch.float32,
                    device=None) -> torch.Tensor:
        """The Kronecker kind's R_out ([m, a], ``side="out"``: positions along the tensor's
        output-gradient axis) or R_in ([m, b], ``side="in"``: along its input axis), Gaussian
        with variance 1/a (1/b): the entry of the tensor at (o, i) has R's row
        kron(R_out[o], R_in[i]), column c_out * b + c_in."""
        if side not in ("in", "out"):
            raise ValueError(f"factor_rows: side must be 'in' or 'out', got {side!r}")
        width = self.factor_dims[0 if side == "out" else 1]
        return _rows(self._factor_key(name, side), local, width, False, dtype, device)

    def project(self, block: torch.Tensor, index: ParamIndex, kept: Optional["KeptRows"] = None) -> torch.Tensor:
        """block [B, p] (or [B, k, p]) of ``index``'s columns -> block @ R, [B, dim] (or
        [B, k, dim]), R generated slice by slice: never [p, dim] in memory. kept: the
        call's KeptRows, whose slices are taken instead of generated again (the same
        tensors, so the same product, bit for bit)."""
        p = block.shape[-1]
        if p != len(index):
            raise AssertionError(f"a block of {p} columns for an index of {len(index)}")  # an internal error
        flat = block.reshape(math.prod(block.shape[:-1]), p)  # -1 fails for p = 0 (every tensor factored)
        rademacher = self.kind == "rademacher"
        # Gaussian R's columns generated in _normals' order (cos outputs, then sin
        # outputs) and the product's columns put back in order once: the same sums per
        # column, one pass over [B, dim] instead of one over every slice of R.
        width = self.dim if rademacher else 2 * -(-self.dim // 2)
        out = torch.zeros(flat.shape[0], width, dtype=block.dtype, device=block.device)
        step = max(1, _SLICE_ENTRIES // self.dim)
        for piece in index.tensor_slices:
            for a in range(0, piece.local.numel(), step):
                local = piece.local[a:a + step]
                if piece.whole:  # consecutive columns: a view, no gather
                    first = int(piece.columns[a])
                    part = flat[:, first:first + local.numel()]
                else:
                    part = flat.index_select(1, piece.columns[a:a + step].to(block.device))
                def make(piece=piece, local=local):
                    return _rows(self._tensor_key(piece.name), local, self.dim, rademacher, block.dtype,
                                 block.device, interleaved=rademacher)

                rows = make() if kept is None else kept.rows(self, index, (piece.name, a, block.dtype, block.device),
                                                            make)
                out.addmm_(part, rows)
        if not rademacher:
            out = _deinterleave(out, self.dim).contiguous()
        return out.reshape(*block.shape[:-1], self.dim)

    def project_factors(self, factors: Dict[str, tuple], choices: Dict[str, object], out: torch.Tensor) -> torch.Tensor:
        """Adds the Kronecker sketch of each structured tensor to ``out`` [B, dim] (or
        [B, k, dim]) and returns it, from its factors x [B, T, X] and g [B, T, G] (or
        [B, k, T, G]); choices: structured.plan.Choice per tensor."""
        for name, (x, g) in factors.items():
            if out.dim() == 3:
                for a in range(out.shape[1]):
                    self.add_factor_sketch(name, choices[name], x, g[:, a], out[:, a])
            else:
                self.add_factor_sketch(name, choices[name], x, g, out)
        return out

    def add_factor_sketch(self, name: str, choice, x: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> None:
        """out [B, dim] += sum_t (R_out^T g_t) (x) (R_in^T x_t) for one use (or all) of the
        tensor ``name``: x [B, T, X], g [B, T, G], the Choice's selected entries (a Kronecker
        subsample's: its x_index / g_index positions). B T (G a + X b + a b) multiply-adds,
        no per-sample gradient."""
        if choice.index or choice.bias is not None:  # the plan's "products" mode gives neither
            raise AssertionError(f"{name}: token-id or bias-augmented factors cannot be Kronecker-projected")
        a, b = self.factor_dims
        positions = [torch.arange(width) if chosen is None else chosen.cpu()
                     for chosen, width in ((choice.g_index, g.shape[-1]), (choice.x_index, x.shape[-1]))]
        r_out = self.factor_rows(name, "out", positions[0], out.dtype, out.device)
        r_in = self.factor_rows(name, "in", positions[1], out.dtype, out.device)
        # Chunks of samples bound what a chunk adds, the projected factors [S, T, a] and
        # [S, T, b] and the contiguous copies the products may take of x and g (a conv
        # layer's unfolded patches are a transposed view).
        step = self.factor_chunk(x.shape[1] * (x.shape[2] + g.shape[2] + a + b))
        for s0 in range(0, x.shape[0], step):
            u = g[s0:s0 + step].to(out.dtype) @ r_out  # [S, T, a]
            v = x[s0:s0 + step].to(out.dtype) @ r_in  # [S, T, b]
            out[s0:s0 + step].add_(torch.bmm(u.transpose(1, 2), v).reshape(u.shape[0], -1))

    @staticmethod
    def factor_chunk(per_sample: int) -> int:
        """Samples per chunk of factors of ``per_sample`` entries each (at least one): what
        the rules form at once for this projection (a conv layer's unfolded patches, T
        times its kernel's input width, are the largest)."""
        return max(1, _FACTOR_ENTRIES // max(1, per_sample))

    def sketch(self, block: torch.Tensor, index: ParamIndex, factors: Optional[Dict[str, tuple]] = None,
               choices: Optional[Dict[str, object]] = None) -> torch.Tensor:
        """A batch's sketch [B, dim] (or [B, k, dim]): its features' columns ``index``
        projected densely, plus (Kronecker kind) its structured tensors' whole factors."""
        out = self.project(block, index)
        return self.project_factors(factors, choices, out) if factors else out


class KeptRows:
    """The slices of R one call (a tk.features or tk.gram, both loaders of a cross Gram)
    generated for its first batch, kept for its later batches while they fit ``budget``
    bytes (``kept_rows_budget``); slices past it are generated per batch as without one.
    Made per call and dropped with it: nothing is held past the call, and a Projection
    holds no memory of its own. A slice is a pure function of its key, so a kept slice is
    the tensor a later batch would have generated."""

    def __init__(self, budget: int):
        self.budget, self.held = max(0, int(budget)), 0
        self.index, self.slices = None, {}

    def rows(self, projection: Projection, index: ParamIndex, key: tuple, make) -> torch.Tensor:
        if not self.budget:
            return make()
        if index is not self.index:  # another column set (a new plan): its slices are other rows
            self.index, self.slices, self.held = index, {}, 0
        key = (projection, *key)
        rows = self.slices.get(key)
        if rows is None:
            rows = make()
            # A Rademacher slice is a view of whole 32-sign words: count what it keeps alive.
            size = rows.untyped_storage().nbytes()
            if self.held + size <= self.budget:
                self.slices[key] = rows
                self.held += size
        return rows


def kept_rows_budget(max_memory: Optional[int], batches: Optional[int]) -> int:
    """Bytes of R a call keeps across its batches (KeptRows): KEPT_ROWS_BYTES, at most a
    quarter of ``max_memory`` (a Gram's; None for tk.features), none for a call known to
    have one batch (``batches``; None where unknown)."""
    if batches is not None and batches <= 1:
        return 0
    return KEPT_ROWS_BYTES if max_memory is None else min(KEPT_ROWS_BYTES, max_memory // _KEPT_ROWS_SHARE)


# Rows of R are generated this many entries at a time into reused buffers: the dozen
# elementwise passes of the hash and of Box-Muller then stay in a core's L2 cache, and
# no pass allocates (fresh multi-MiB tensors cost page faults on every slice).
_CHUNK_ENTRIES = 1 << 17


def _rows(key: int, local: torch.Tensor, width: int, rademacher: bool, dtype: torch.dtype, device,
          interleaved: bool = True) -> torch.Tensor:
    """Rows [m, width] of entries of variance 1/width for the positions ``local`` under
    a tensor's (or factor's) 64-bit ``key``. Gaussian with ``interleaved=False``: the
    columns in the order (0, 2, 4, ..., 1, 3, 5, ...) (all cos outputs of Box-Muller, then
    all sin outputs; an odd width's one extra column included: ``_deinterleave`` restores
    R's order), which saves a pass over R."""
    device = local.device if device is None else torch.device(device)
    keys = _mix(local.to(device=device, dtype=torch.int64).add(key))
    # A row's 64-bit key as two 32-bit words (lo, hi); an entry's hash is
    # lowbias32((lo + counter) ^ hi): int32 arithmetic, 5x the speed of the 64-bit mix
    # on a CPU (no 64-bit vector multiply), and one hash per entry of R is its cost.
    lo = keys.to(torch.int32)[:, None]  # the low 32 bits (a wrapping cast)
    hi = _shr(keys, 32).to(torch.int32)[:, None]
    scale = 1.0 / math.sqrt(width)
    if rademacher:
        return _signs(lo, hi, width, scale, dtype)
    z = _normals(lo, hi, width, scale, dtype)
    return _deinterleave(z, width) if interleaved else z


def _signs(lo: torch.Tensor, hi: torch.Tensor, width: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    # 32 signs per hash, one a bit (bit j of hash w is column 32 w + j): exactly +-1 with
    # probability 1/2 each, bit 1 -> -scale, 0 -> +scale. Expanded a byte at a time through
    # a 256 x 8 table (byte k of a word holds its bits 8k..8k+7: the int32 words are viewed
    # as bytes, little-endian on every CPU and GPU torch runs on), one pass instead of five.
    device = lo.device
    words = -(-width // 32)
    bits = (torch.arange(256, dtype=torch.int32, device=device)[:, None]
            >> torch.arange(8, dtype=torch.int32, device=device)) & 1
    table = bits.to(dtype).mul_(-2.0).add_(1.0).mul_(scale)  # the same ops, so the same values, as per entry
    h = _hash32(lo + torch.arange(words, dtype=torch.int32, device=device), hi)
    signs = table.index_select(0, h.view(torch.uint8).reshape(-1).to(torch.int32))
    return signs.reshape(lo.shape[0], words * 32)[:, :width]


def _normals(lo: torch.Tensor, hi: torch.Tensor, width: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """[m, 2 pairs]: Box-Muller's cos outputs (R's even columns), then its sin outputs (odd)."""
    # Both outputs: columns 2c and 2c + 1 from the uniforms of counters 2c and 2c + 1,
    # 24 bits each, u1 in (0, 1] (no log of 0), u2 in [0, 1). The 24-bit grid truncates
    # the tails at 5.8 sigma: E[z^2] differs from 1 by ~1e-7. Each entry goes through the
    # same elementwise ops as in generator lowbias32-v1's first code (the pinned values).
    device, m = lo.device, lo.shape[0]
    pairs = -(-width // 2)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty(m, 2 * pairs, dtype=work, device=device)
    # Counters 2c (u1) for the first pairs columns, 2c + 1 (u2) for the rest: both
    # uniforms read contiguously (strided reads of interleaved pairs cost 2 of ~15 passes).
    counters = torch.arange(2 * pairs, dtype=torch.int32, device=device).view(pairs, 2).t().reshape(-1)
    # A GPU has no small cache to stay in, and a launch per op per chunk: one chunk per slice.
    rows = max(1, (_CHUNK_ENTRIES if device.type == "cpu" else _SLICE_ENTRIES) // (2 * pairs))
    h = torch.empty(min(m, rows), 2 * pairs, dtype=torch.int32, device=device)
    tmp = torch.empty_like(h)
    uniforms = None if work == torch.float32 else torch.empty(h.shape, dtype=work, device=device)
    radius = torch.empty(h.shape[0], pairs, dtype=work, device=device)
    angle = torch.empty_like(radius)
    for r0 in range(0, m, rows):
        r = min(rows, m - r0)
        hc, tc, rc, ac = h[:r], tmp[:r], radius[:r], angle[:r]
        torch.add(lo[r0:r0 + r], counters, out=hc)
        _hash32(hc, hi[r0:r0 + r], tc)
        torch.bitwise_right_shift(hc, 8, out=tc)
        # float32: the int32 -> float32 conversion (exact, 24 bits) inside the first float
        # op, one pass fewer; float64 must convert first (int32 op float is float32).
        uniform = tc.bitwise_and_(0xFFFFFF)
        uniform = uniform if uniforms is None else uniforms[:r].copy_(uniform)
        torch.add(uniform[:, :pairs], 1.0, out=rc)
        rc.mul_(2.0 ** -24).log_().mul_(-2.0).sqrt_().mul_(scale)
        torch.mul(uniform[:, pairs:], 2.0 ** -24 * 2 * math.pi, out=ac)
        block = out[r0:r0 + r]
        torch.mul(torch.cos(ac, out=block[:, :pairs]), rc, out=block[:, :pairs])
        torch.mul(torch.sin(ac, out=block[:, pairs:]), rc, out=block[:, pairs:])
    return out if dtype == work else out.to(dtype)


def _deinterleave(z: torch.Tensor, width: int) -> torch.Tensor:
    """_normals' [m, 2 pairs] (cos block, sin block) -> R's columns in order, [m, width]."""
    pairs = z.shape[-1] // 2
    return torch.stack((z[..., :pairs], z[..., pairs:]), dim=-1).reshape(*z.shape[:-1], 2 * pairs)[..., :width]


def check_projection(projection) -> Optional[Projection]:
    if projection is not None and not isinstance(projection, Projection):
        raise TypeError(f"projection must be a tk.Projection(dim, kind=..., seed=...) or None, got "
                        f"{type(projection).__name__}")
    return projection
