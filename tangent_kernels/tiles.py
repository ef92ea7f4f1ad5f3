"""The Gram phase: K from two feature stores, tile by tile over row blocks.

For K(X, X) only tiles on or below the diagonal are computed, then mirrored. fp32 tiles
over long feature rows are summed in fp64 from fp32 partial products; the structured
tensors' contributions join each tile; host and disk stores are staged on the device a
block at a time (on CUDA the next block's copy overlaps the current tile's GEMMs).
Every finished row block is checkpointed. docs/engine.md has the why of each choice.

Every logit (docs/outputs.md): ``form`` "rows" is the ordinary Gram of the stores' rows
(one scalar output, or output="full" with a row per (sample, logit)); for "trace" and
"diagonal" a store row is one sample's k logits' features side by side [k * p]: the
trace is the ordinary Gram of those rows, the diagonal k Grams of their column blocks
(formed as [k, n1, n2], returned as [n1, n2, k]). Neither forms the k^2 cross products.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import List, Optional, Tuple

import torch

from .checkpoint import Checkpoint
from .ops import gram_tile_update
from .store import FeatureStore
from .structured.stores import FactorStores, structured_rows
from .tuning import settings

_log = logging.getLogger("tangent_kernels")


__all__ = ["blocked_gram", "check_out_memory"]


def _check_k_fits(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, copies: int = 1) -> None:
    """A clear error, before the Gram phase, for a K larger than the memory there is
    (``copies``: K is formed in another layout first, then copied)."""
    from .store import available_host_bytes

    need = copies * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    have = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_host_bytes()
    if need > have:
        every_logit = " (k^2 times the trace's K: output='trace' or 'diagonal' need [n1, n2] or [n1, n2, k])" \
            if len(shape) == 4 else ""
        raise MemoryError(
            f"K {list(shape)} needs {need / 2**30:.2f} GiB of {device} memory and {have / 2**30:.2f} GiB are free"
            f"{every_logit}: use fewer samples or a larger device, or pass out= (a preallocated tensor, e.g. a "
            "memory-mapped one) for a one-output K"
        )


def _check_out(out: torch.Tensor, shape: Tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(
            f"out must be a [{shape[0]}, {shape[1]}] tensor of dtype {dtype} for this Gram; got "
            f"{list(out.shape)} {out.dtype}"
        )
    return out


def check_out_memory(out: torch.Tensor, dtype: torch.dtype) -> None:
    """What can be said of ``out`` before the loaders tell K's shape: fail before any work."""
    if out.dtype != dtype:
        raise ValueError(f"out must be a tensor of dtype {dtype} for this Gram (K's dtype for this precision); got {out.dtype}")
    if out.requires_grad:
        raise ValueError("out requires grad: K is written into it in place, which autograd forbids for a tensor "
                         "it tracks; pass a plain tensor (e.g. out.detach() or torch.empty(n1, n2))")
    overlapping = any(stride == 0 and size > 1 for stride, size in zip(out.stride(), out.shape))
    if not overlapping and out.numel():
        # torch says 0 (no overlap), 1 (overlap) or 2 (cannot tell: any non-contiguous
        # layout). For 2, dims sorted by stride must nest (each stride at least the extent
        # of the dims below it), which every slice, transpose and step of a tensor does.
        verdict = torch._debug_has_internal_overlap(out)
        if verdict == 2:
            dims = sorted((stride, size) for stride, size in zip(out.stride(), out.shape) if size > 1)
            extent = 1
            for stride, size in dims:
                if stride < extent:
                    verdict = 1
                    break
                extent = stride * size
        overlapping = verdict == 1
    if overlapping:
        raise ValueError(
            f"out's elements overlap in memory (strides {tuple(out.stride())}, e.g. an expanded or as_strided "
            f"view): it cannot hold K; pass a tensor with memory of its own, e.g. torch.empty(n1, n2, dtype={dtype})"
        )


def blocked_gram(first: FeatureStore, second: FeatureStore, symmetric: bool, k_dtype: torch.dtype,
                 device: torch.device, out: Optional[torch.Tensor], ckpt: Optional[Checkpoint], events,
                 budget: int, terms: Optional[Tuple[FactorStores, FactorStores]] = None, form: str = "rows",
                 outputs: int = 1, tile_rows: Optional[int] = None) -> torch.Tensor:
    """K from two feature stores, one row block at a time (lower triangle only when
    symmetric), each finished block checkpointed; on CUDA out-of-memory the tile size
    halves and the block is recomputed (tiles are overwritten, never accumulated twice).
    terms: the two sides' structured factors, whose contributions join each tile.
    form: "rows", "trace" ([n1, n2]) or "diagonal" ([n1, n2, outputs]), as the module
    docstring says; a store row of "trace"/"diagonal" holds ``outputs`` logits.
    tile_rows: rows per tile (None: ``tuning.settings.tile_rows``), lowered to fit the
    budget of staged host or disk rows."""
    n1, n2 = first.n, second.n
    logits = outputs if form == "diagonal" else 1
    if out is None:
        rows_per_sample = n1 // max(first.samples, 1) if form == "rows" else 1
        _check_k_fits((first.samples, second.samples, rows_per_sample, rows_per_sample) if rows_per_sample > 1
                      else (n1, n2, logits) if logits > 1 else (n1, n2), k_dtype, device, copies=min(logits, 2))
    k = _check_out(out, (n1, n2), k_dtype) if out is not None else None
    # K as logit-major [logits, n1, n2]: each logit of the diagonal is a Gram of its own
    # with contiguous rows (a [n1, n2, k] layout made every tile operation strided: 40% of
    # an all-structured k = 100 diagonal); copied to [n1, n2, k] at the end.
    stack = k.unsqueeze(0) if k is not None else torch.empty(logits, n1, n2, dtype=k_dtype, device=device)
    # The checkpoint records K's rows as the result has them: [n1, n2 * k] for the diagonal.
    flat_shape = (n1, n2 * logits)
    done = 0
    if ckpt is not None:
        ckpt.start_k(flat_shape, k_dtype)
        done = ckpt.k_rows_done
        if done:
            rows = ckpt.read_k_rows(done, flat_shape, k_dtype)
            stack[:, :done].copy_(rows.view(done, n2, logits).permute(2, 0, 1))
            events("gram", None, done, n1, resumed=True)
    tile_rows = settings.tile_rows if tile_rows is None else tile_rows
    mirror_rows = tile_rows
    staged = [s for s in {id(first): first, id(second): second}.values() if s.kind != "device"]
    if staged:  # host/disk stores stage two row blocks on the device per tile: keep them in budget
        resident = sum(s.device_bytes for s in (first, second) if s.kind == "device")
        # A's block, B's block, and on CUDA the next B block already in flight (_staged_blocks).
        in_flight = 2 if _overlaps_copies(second, device) else 1
        per_row = first.row_bytes + in_flight * second.row_bytes
        if terms is not None:
            per_row += terms[0].staged_row_bytes(form) + in_flight * terms[1].staged_row_bytes(form)
        tile_rows = max(1, min(tile_rows, (budget - resident) // max(per_row, 1)))
    if ckpt is not None and ckpt.k_tile_rows:
        # Continue with the interrupted run's tiles (smaller after an out-of-memory
        # halving): the same tile shapes give the same bits. A smaller budget than
        # that run's still wins, at the cost of bit-identity.
        tile_rows = min(tile_rows, ckpt.k_tile_rows)
    i0 = done
    while i0 < n1:
        i1 = min(i0 + tile_rows, n1)
        try:
            _row_block(stack, first, second, i0, i1, tile_rows, symmetric, device, terms, form)
        except torch.cuda.OutOfMemoryError:
            if tile_rows == 1:
                raise
            tile_rows //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            _log.info("out of memory in the Gram phase: tiles of %d rows now", tile_rows)
            continue
        _check_finite_rows(stack, i0, i1, i1 if symmetric else n2)
        if ckpt is not None:
            ckpt.record_k_rows(i0, stack[:, i0:i1].permute(1, 2, 0).reshape(i1 - i0, n2 * logits), tile_rows)
        events("gram", None, i1, n1, resumed=False)
        i0 = i1
    if symmetric:
        for logit in stack:
            _mirror_lower(logit, mirror_rows)
    if form == "diagonal":
        return stack.permute(1, 2, 0).contiguous()
    return k if k is not None else stack[0]  # out= itself


def _check_finite_rows(k: torch.Tensor, i0: int, i1: int, cols: int) -> None:
    """K's finished rows [i0, i1) (columns < cols) are finite, before they are checkpointed
    (k: [logits, n1, n2]).

    Finite features can still have products beyond K's dtype (a model whose outputs are
    ~1e20: its features are finite in float32, K's entries ~1e40 are not), and that inf
    would reach the user as K. One aminmax pass: inf and nan propagate into it."""
    block = k[:, i0:i1, :cols]
    if not block.numel():
        return
    low, high = torch.aminmax(block)
    if math.isfinite(float(low)) and math.isfinite(float(high)):
        return
    scale = "scale the model's outputs down (K scales with their square)"
    fix = scale if k.dtype == torch.float64 else (
        f"use precision='fp64' (K in float64, up to 1.8e308; 'fp32', 'tf32', 'bf16' and 'fp16' all accumulate "
        f"K in float32) or {scale}")
    raise ValueError(
        f"K is not finite: rows {i0}..{i1 - 1} hold inf or nan after accumulating the per-sample gradients' "
        f"products in {str(k.dtype).replace('torch.', '')} (largest finite value {torch.finfo(k.dtype).max:.3g}); "
        f"the gradients themselves were finite, their products overflow: {fix}"
    )


def _row_block(stack: torch.Tensor, first: FeatureStore, second: FeatureStore, i0: int, i1: int, tile_rows: int,
               symmetric: bool, device: torch.device,
               terms: Optional[Tuple[FactorStores, FactorStores]] = None, form: str = "rows") -> None:
    """Rows [i0, i1) of K, stack: [logits, n1, n2] (logits > 1 for the diagonal only)."""
    a, a_scales = first.rows(i0, i1), first.scales(i0, i1)
    # The diagonal's logit g: columns [g p, (g + 1) p) of the rows, into stack[g].
    logits = stack.shape[0]
    width = a.shape[1] // logits
    try:
        stop = i1 if symmetric else second.n
        ranges = [(j0, min(j0 + tile_rows, stop)) for j0 in range(0, stop, tile_rows)]
        # closing(): an error mid-row (e.g. out of memory) releases the staged blocks now,
        # before the retry, not whenever the generator is collected.
        with contextlib.closing(_staged_blocks(second, ranges, device)) as blocks:
            for j0, j1, b in blocks:
                on_device = stack.device == device
                tiles = stack[:, i0:i1, j0:j1] if on_device else \
                    torch.empty(logits, i1 - i0, j1 - j0, dtype=stack.dtype, device=device)
                lower = symmetric and j1 > i0
                extra = structured_rows(*terms, i0, i1, j0, j1, stack.dtype, form) if terms is not None else None
                if extra is not None and form != "diagonal":
                    extra = extra.unsqueeze(0)
                for g in range(logits):
                    columns = slice(g * width, (g + 1) * width) if form == "diagonal" else slice(None)
                    _tile(tiles[g], a[:, columns], b[:, columns], a_scales, second, i0, i1, j0, j1, lower,
                          None if extra is None else extra[g])
                if not on_device:
                    stack[:, i0:i1, j0:j1].copy_(tiles)
    finally:
        first.release(a)


def _tile(tile: torch.Tensor, a, b, a_scales, second: FeatureStore, i0, i1, j0, j1, lower: bool,
          extra: Optional[torch.Tensor]) -> None:
    """tile := a @ b.T (unscaled) + extra, the structured tensors' part (None: none)."""
    tile.zero_()
    # Long reductions over feature columns are summed in fp64; a structured tensor's
    # contribution is one fp32 term, and a few dozen such terms summed in fp32 stay
    # within ~1e-6 (fp64 tiles for them alone cost 20% of an MLP's full kernel).
    if tile.dtype == torch.float32 and a.shape[1] > _P_CHUNK:
        tile.copy_(_accumulated_tile(a, b, a_scales, second, i0, i1, j0, j1, lower, extra))
        return
    gram_tile_update(tile, a, b, i0, j0, lower=lower)
    if a_scales is not None:
        tile.mul_((1.0 / a_scales[:, None]) * (1.0 / second.scales(j0, j1)[None, :]))
    if extra is not None:
        tile.add_(extra)


# Columns of one fp32 partial product of a tile: long reductions over p are summed in
# fp64 from fp32 partial GEMMs of this many columns. One fp32 GEMM over all of
# resnet18's 11.2M columns was off by 2.1e-4 (relative); 64k-column chunks, 9.6e-7.
_P_CHUNK = 1 << 16


def _accumulated_tile(a, b, a_scales, second: FeatureStore, i0, i1, j0, j1, lower: bool,
                      extra: Optional[torch.Tensor]) -> torch.Tensor:
    """An fp32 K's tile summed in fp64: fp32 partial products over column chunks of the
    features, and the structured tensors' fp32 contribution ``extra``."""
    total = torch.zeros(i1 - i0, j1 - j0, dtype=torch.float64, device=a.device)
    part = torch.empty(i1 - i0, j1 - j0, dtype=torch.float32, device=a.device)
    for c0 in range(0, a.shape[1], _P_CHUNK):
        part.zero_()
        gram_tile_update(part, a[:, c0:c0 + _P_CHUNK], b[:, c0:c0 + _P_CHUNK], i0, j0, lower=lower)
        if a_scales is not None:
            part.mul_((1.0 / a_scales[:, None]) * (1.0 / second.scales(j0, j1)[None, :]))
        total.add_(part)
    if extra is not None:
        total.add_(extra)
    return total


def _overlaps_copies(feature_store: FeatureStore, device: torch.device) -> bool:
    # Only pinned host memory copies to the GPU asynchronously; a disk store's rows come
    # from a pageable memory map, whose copy the host waits for anyway.
    return feature_store.kind == "host" and device.type == "cuda"


def _staged_blocks(feature_store: FeatureStore, ranges: List[Tuple[int, int]], device: torch.device):
    """Yield (j0, j1, rows [j0, j1) on ``device``) for each range, releasing each block
    after the caller's step.

    From a host store to a CUDA device, block r + 1 is copied on a side stream while the
    caller computes with block r, so the transfers hide behind the tile GEMMs; the
    compute stream waits for a block's copy only when it reaches that block. Two
    blocks are then staged at once, which ``blocked_gram`` budgets for.
    """
    if not _overlaps_copies(feature_store, device):
        for j0, j1 in ranges:
            block = feature_store.rows(j0, j1)
            try:
                yield j0, j1, block
            finally:
                feature_store.release(block)
        return
    compute, copies = torch.cuda.current_stream(device), torch.cuda.Stream(device)

    def stage(j0: int, j1: int):
        with torch.cuda.stream(copies):
            block = feature_store.rows(j0, j1)
            ready = torch.cuda.Event()
            ready.record(copies)
        return block, ready

    pending = stage(*ranges[0]) if ranges else None
    try:
        for r, (j0, j1) in enumerate(ranges):
            block, ready = pending
            pending = None
            try:
                pending = stage(*ranges[r + 1]) if r + 1 < len(ranges) else None
                compute.wait_event(ready)
                # Allocated on the side stream, used on the compute stream: the caching
                # allocator must not hand its memory out again before that use is done.
                block.record_stream(compute)
                yield j0, j1, block
            finally:
                feature_store.release(block)
    finally:
        if pending is not None:
            feature_store.release(pending[0])


def _mirror_lower(k: torch.Tensor, block_rows: int) -> None:
    """Upper triangle := transpose of the lower one, block by block (no n x n temporary)."""
    n = k.shape[0]
    for i0 in range(0, n, block_rows):
        i1 = min(i0 + block_rows, n)
        diagonal = k[i0:i1, i0:i1]
        diagonal.copy_(diagonal.tril() + diagonal.tril(-1).T)
        if i1 < n:
            k[i0:i1, i1:].copy_(k[i1:, i0:i1].T)
