"""Random projections of per-sample gradients (sketched eNTKs): ``tk.Projection``.

The sketched features are F R, with F [B, p] a batch's per-sample gradients and R [p, dim]
a random matrix with E[R R^T] = I, so that K~ = (F R)(F R)^T is an unbiased estimate of
K = F F^T. R is never held whole: it is generated in slices of rows [block_cols, dim]
from a counter-based integer hash of (seed, tensor name, flat position in the tensor,
column), and each slice is multiplied into the batch's block as the block forms
(``Projection.project``), so a store then holds [B, dim] per batch.

Because an entry of R is a pure function of (seed, tensor name, position, column), R is the
same for every batch size, block size, run and device (the Rademacher signs bit for bit;
the Gaussian entries up to the last bits of the device's log, sqrt, cos and sin), a subsample's rows
are the full-parameter R's rows at its positions, and the first d columns of R for dim
are, up to the 1/sqrt(dim) scale, R for dim = d. docs/sketch.md has the variance.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch

from .params import ParamIndex

__all__ = ["Projection", "check_projection"]

KINDS = ("gaussian", "rademacher")

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


def _hash32(x: torch.Tensor, salt: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons' 32-bit integer hash, a bijection) of x ^ salt, on int32
    tensors (multiplications wrap modulo 2**32, as uint32's would). Overwrites x."""
    x.bitwise_xor_(salt)
    x.bitwise_xor_((x >> 16) & 0xFFFF).mul_(_LOW1)
    x.bitwise_xor_((x >> 15) & 0x1FFFF).mul_(_LOW2)
    return x.bitwise_xor_((x >> 16) & 0xFFFF)


class Projection:
    """A random projection of the eNTK features to ``dim`` columns: ``projection=`` of
    :func:`tk.features` ([n, dim]) and :func:`tk.gram` (the sketched K~ = (G R)(G R)^T,
    unbiased for K over ``idx``: E[K~] = K).

    Args:
        dim: the number of columns of the sketch (> 0). The error of an entry of K~ falls
            as 1/sqrt(dim) (docs/sketch.md).
        kind: "gaussian" (entries N(0, 1/dim)) or "rademacher" (entries +-1/sqrt(dim),
            a smaller variance, bit-identical on every device).
        seed: an int; the same seed gives the same R for every batch size, run and device.
    """

    def __init__(self, dim: int, kind: str = "gaussian", seed: int = 0):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"Projection dim must be a positive int (the number of sketch columns), got {dim!r}")
        if kind == "kronecker":
            raise NotImplementedError("Projection kind 'kronecker' is not implemented yet: use kind='gaussian' or "
                                      "'rademacher' (dense projections of every tensor)")
        if kind not in KINDS:
            raise ValueError(f"Projection kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Projection seed must be an int, got {type(seed).__name__}")
        self.dim, self.kind, self.seed = dim, kind, seed

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

    def _tensor_key(self, name: str) -> int:
        digest = hashlib.sha256(f"tk.Projection:{self.seed}:{name}".encode()).digest()
        return _signed(int.from_bytes(digest[:8], "little"))

    def rows(self, name: str, local: torch.Tensor, dtype: torch.dtype = torch.float32,
             device=None) -> torch.Tensor:
        """R's rows [m, dim] for the entries at flat positions ``local`` [m] (int64) of the
        parameter tensor ``name``, scaled so that E[R R^T] = I."""
        device = local.device if device is None else torch.device(device)
        keys = _mix(local.to(device=device, dtype=torch.int64).add(self._tensor_key(name)))
        # A row's 64-bit key as two 32-bit words (lo, hi); an entry's hash is
        # lowbias32((lo + counter) ^ hi): int32 arithmetic, 5x the speed of the 64-bit mix
        # on a CPU (no 64-bit vector multiply), and one hash per entry of R is its cost.
        lo = keys.to(torch.int32)  # the low 32 bits (a wrapping cast)
        hi = _shr(keys, 32).to(torch.int32)
        scale = 1.0 / math.sqrt(self.dim)
        if self.kind == "rademacher":
            # 32 signs per hash, one a bit: exactly +-1 with probability 1/2 each.
            words = -(-self.dim // 32)
            h = _hash32(lo[:, None] + torch.arange(words, dtype=torch.int32, device=device), hi[:, None])
            bits = (h[:, :, None] >> torch.arange(32, dtype=torch.int32, device=device)) & 1
            signs = bits.reshape(len(local), words * 32)[:, :self.dim]
            return signs.to(dtype).mul_(-2.0).add_(1.0).mul_(scale)  # bit 1 -> -scale, 0 -> +scale
        # Box-Muller, both outputs: columns 2c and 2c + 1 from the uniforms of counters 2c
        # and 2c + 1, 24 bits each, u1 in (0, 1] (no log of 0), u2 in [0, 1). The 24-bit grid
        # truncates the tails at 5.8 sigma: E[z^2] differs from 1 by ~1e-7.
        pairs = -(-self.dim // 2)
        counters = torch.arange(2 * pairs, dtype=torch.int32, device=device)
        h = _hash32(lo[:, None] + counters, hi[:, None]).view(len(local), pairs, 2)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        uniforms = ((h >> 8) & 0xFFFFFF).to(work)
        del h
        radius = uniforms[..., 0].add_(1.0).mul_(2.0 ** -24).log_().mul_(-2.0).sqrt_().mul_(scale)
        angle = uniforms[..., 1].mul_(2.0 ** -24 * 2 * math.pi)
        z = torch.stack([angle.cos(), angle.sin_()], dim=-1).mul_(radius[..., None])
        return z.reshape(len(local), 2 * pairs)[:, :self.dim].to(dtype)

    def project(self, block: torch.Tensor, index: ParamIndex) -> torch.Tensor:
        """block [B, p] (or [B, k, p]) of ``index``'s columns -> block @ R, [B, dim] (or
        [B, k, dim]), R generated slice by slice: never [p, dim] in memory."""
        p = block.shape[-1]
        if p != len(index):
            raise AssertionError(f"a block of {p} columns for an index of {len(index)}")  # an internal error
        flat = block.reshape(-1, p)
        out = torch.zeros(flat.shape[0], self.dim, dtype=block.dtype, device=block.device)
        step = max(1, _SLICE_ENTRIES // self.dim)
        for piece in index.tensor_slices:
            for a in range(0, piece.local.numel(), step):
                local = piece.local[a:a + step]
                if piece.whole:  # consecutive columns: a view, no gather
                    first = int(piece.columns[a])
                    part = flat[:, first:first + local.numel()]
                else:
                    part = flat.index_select(1, piece.columns[a:a + step].to(block.device))
                out.addmm_(part, self.rows(piece.name, local, block.dtype, block.device))
        return out.reshape(*block.shape[:-1], self.dim)


def check_projection(projection) -> Optional[Projection]:
    if projection is not None and not isinstance(projection, Projection):
        raise TypeError(f"projection must be a tk.Projection(dim, kind=..., seed=...) or None, got "
                        f"{type(projection).__name__}")
    return projection
