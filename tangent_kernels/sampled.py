"""Sampled per-sample weight gradients in plain torch (the "torch" backend).

Each function computes only the sampled entries of every sample's weight gradient,
from what a use recorded in one batched forward/backward (persample/): the op's input
``a`` and ``d = ds/dz`` at its output. Work and memory scale with the number of sampled
entries m times the positions a weight is applied at (tokens, pixels), chunked over m
to bound memory; the exceptions are a densely sampled linear layer with tokens, whose
full per-sample gradients are formed a few samples at a time because one batched
matmul is cheaper there than the gathers, and embedding tables, gathered by the rows
the tokens select.

Shapes: B samples, T tokens/positions, m sampled entries. Accumulation is in the
dtype of the inputs (fp32 or fp64 here).

One schema with the compiled ops (``tangent_kernels.ops``): ``sampled_linear_grad``,
``sampled_conv_grad`` and ``sampled_embedding_grad`` take the same arguments, including
the keywords ``out=`` ([B, N], written in place) and ``out_columns=`` (the m columns of
``out`` to write; default the first m), and return ``out`` (or a new [B, m] tensor), so
a caller can switch backend without knowing which one it holds.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = [
    "check_out",
    "sampled_conv_grad",
    "sampled_conv_grad_planned",
    "sampled_embedding_grad",
    "embedding_row_plan",
    "sampled_embedding_grad_by_rows",
    "sampled_linear_grad",
    "dense_linear_wins",
    "conv_patches",
    "conv_plan",
]

# Upper bound on one chunk's gathered operands (B x chunk x T elements each).
_CHUNK_ELEMENTS = 1 << 25


def _chunked(m: int, per_entry: int, fn: Callable[[slice], torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    step = max(1, _CHUNK_ELEMENTS // max(per_entry, 1))
    for start in range(0, m, step):
        part = slice(start, min(start + step, m))
        out[:, part] = fn(part)
    return out


def check_out(op: str, out: torch.Tensor, batch: int, m: int, out_columns) -> None:
    """The ``out``/``out_columns`` contract every backend checks (the compiled kernels in C++)."""
    if out.dim() != 2 or out.shape[0] != batch:
        raise RuntimeError(f"{op}: out must be 2-D [B={batch}, N], got shape {list(out.shape)}")
    if out_columns is None and out.shape[1] < m:
        raise RuntimeError(f"{op}: without out_columns, out needs at least m = {m} columns, got {list(out.shape)}")
    if out_columns is not None and (out_columns.dim() != 1 or out_columns.shape[0] != m):
        raise RuntimeError(f"{op}: out_columns must be 1-D of length m = {m}, got {list(out_columns.shape)}")


def _deliver(op: str, values: torch.Tensor, out, out_columns, entries=None) -> torch.Tensor:
    """values [B, m] into ``out`` at ``out_columns`` (the compiled ops' contract); ``entries``
    says which of the m entries values' columns hold, when they come in another order."""
    if out is None and out_columns is None and entries is None:
        return values
    batch, m = values.shape
    if out is None:
        out = torch.empty(batch, m, dtype=values.dtype, device=values.device)
    check_out(op, out, batch, m, out_columns)
    values = values.to(out.dtype)  # one rounding into out's dtype, as the compiled kernels do
    if out_columns is None:
        targets = slice(0, m) if entries is None else entries.to(out.device)
    else:
        out_columns = out_columns.long().to(out.device)
        targets = out_columns if entries is None else out_columns[entries.to(out.device)]
        if m and out.device.type == "cpu":
            # Checked on the host like the C++ CPU kernel (on CUDA, indexing's device assert
            # stands in, as in the CUDA kernels: no sync). A run of consecutive columns, the
            # usual case in a feature block, is written as a slice, not scattered.
            low, high = int(targets.min()), int(targets.max())
            if low < 0 or high >= out.shape[1]:
                raise RuntimeError(f"{op}: out_columns must lie in [0, {out.shape[1]}) (out's columns), got "
                                   f"[{low}, {high}]")
            if high - low == m - 1 and torch.equal(targets, torch.arange(low, high + 1)):
                targets = slice(low, high + 1)
    out[:, targets] = values
    return out


# When to form a linear layer's dense per-sample gradients (one batched matmul, then a
# gather) instead of gathering [B, T, m] operands. Measured on the 2-core CPU: a gathered
# multiply-add costs ~8 ns, the matmul ~0.015 ns per multiply-add plus ~0.33 ns per
# output entry written, so dense wins when m / (I * O) > (0.015 T + 0.33) / (8 T), i.e.
# 0.002 + 0.04 / T (T = 128: 0.2%; T = 4: 1.2%). On a small transformer (6% sampled, 64
# tokens; docs/kernels.md) the torch backend went from 1.7 s to 0.5 s.
_DENSE_FRACTION, _DENSE_FRACTION_PER_TOKEN = 0.002, 0.04
# Dense per-sample gradients formed at once (elements): 16 MB in fp32 keeps the batched
# matmul efficient (several samples per call) without adding a 128 MB temporary to the
# batched pass's peak memory (measured 1.7x a training step's with 2**25 on a BERT).
_DENSE_CHUNK_ELEMENTS = 1 << 22


def dense_linear_wins(tokens: int, m: int, n_in: int, n_out: int) -> bool:
    """Whether forming a linear layer's dense per-sample gradients is cheaper on a CPU."""
    return tokens > 1 and m >= (_DENSE_FRACTION + _DENSE_FRACTION_PER_TOKEN / tokens) * n_in * n_out


def sampled_linear_grad(a: torch.Tensor, d: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, *,
                        out: torch.Tensor | None = None, out_columns: torch.Tensor | None = None) -> torch.Tensor:
    """F[b, j] = sum_t d[b, t, rows[j]] * a[b, t, cols[j]].

    a: [B, T, I], d: [B, T, O], rows/cols: int64 [m] -> [B, m]. The gradient of
    W[o, i] for y = a W^T: rows index outputs, cols index inputs. ``out``/``out_columns``
    as in ``tangent_kernels.ops.sampled_linear_grad``: F lands in out[:, out_columns].
    """
    values = _sampled_linear_grad(a, d, rows.long(), cols.long())
    return _deliver("sampled_linear_grad", values, out, out_columns)


def _sampled_linear_grad(a: torch.Tensor, d: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    batch, tokens, n_in, n_out = a.shape[0], a.shape[1], a.shape[2], d.shape[2]
    out = torch.empty(batch, rows.numel(), dtype=a.dtype, device=a.device)
    if dense_linear_wins(tokens, rows.numel(), n_in, n_out):
        # Densely sampled: the full per-sample gradient of a few samples at a time
        # (_CHUNK_ELEMENTS bounds it), of which only the sampled entries are kept.
        flat = rows * n_in + cols
        step = max(1, _DENSE_CHUNK_ELEMENTS // max(n_in * n_out, 1))
        for start in range(0, batch, step):
            part = slice(start, min(start + step, batch))
            torch.index_select(torch.bmm(d[part].transpose(1, 2), a[part]).flatten(1), 1, flat, out=out[part])
        return out
    return _chunked(
        rows.numel(), batch * tokens,
        lambda part: torch.einsum("btm,btm->bm", d[:, :, rows[part]], a[:, :, cols[part]]), out,
    )


def conv_patches(a_padded: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
                 out_size: Sequence[int]) -> torch.Tensor:
    """A strided view [B, C, *kernel, *out_size] of the padded input: no copy.

    view[b, c, k..., p...] = a_padded[b, c, p * stride + k * dilation].
    """
    s_b, s_c, *s_space = a_padded.stride()
    size = [a_padded.shape[0], a_padded.shape[1], *kernel, *out_size]
    strides = [s_b, s_c, *(s * dl for s, dl in zip(s_space, dilation)), *(s * st for s, st in zip(s_space, stride))]
    return a_padded.as_strided(size, strides, a_padded.storage_offset())


def conv_plan(out_channels: torch.Tensor, in_channels: torch.Tensor, kernel_flat: torch.Tensor,
              kernel: Sequence[int]):
    """Group sampled conv weight entries by kernel offset: (plan, order).

    Entries sharing an offset read one strided slice [B, C, *out] of the input, so a
    channel ``index_select`` per offset replaces a 4-index gather (which took a third
    of resnet18's time on CPU). ``sampled_conv_grad_planned`` returns columns in ``order``.
    """
    order = torch.argsort(kernel_flat, stable=True)
    offsets, counts = torch.unique_consecutive(kernel_flat[order], return_counts=True)
    groups, start = [], 0
    for offset, count in zip(offsets.tolist(), counts.tolist()):
        entries = order[start : start + count]
        start += count
        position = tuple(int(i) for i in torch.unravel_index(torch.tensor(offset), tuple(kernel)))
        groups.append((position, in_channels[entries], out_channels[entries]))
    return groups, order


def sampled_conv_grad(a_pad: torch.Tensor, d: torch.Tensor, out_channel: torch.Tensor, in_channel: torch.Tensor,
                      kernel_offsets: torch.Tensor, stride, dilation, *, out: torch.Tensor | None = None,
                      out_columns: torch.Tensor | None = None) -> torch.Tensor:
    """F[b, j] = sum_p d[b, out_channel[j], p] * a_pad[b, in_channel[j], p * stride + kernel_offsets[j] * dilation].

    a_pad: [B, C, *S] (already padded), d: [B, O, *P] with 1-3 spatial dims,
    kernel_offsets: [m, ndim] integer -> [B, m] in entry order; ``out``/``out_columns``
    as in ``tangent_kernels.ops.sampled_conv_grad``. Callers that reuse one plan across
    batches call ``conv_plan`` once and ``sampled_conv_grad_planned``.
    """
    m = out_channel.shape[0]
    if m == 0:
        return _deliver("sampled_conv_grad", d.new_empty(d.shape[0], 0), out, out_columns)
    kernel_offsets = kernel_offsets.long().reshape(m, -1)
    # Any kernel extent that holds every offset serves to number them: the largest offset + 1.
    kernel = [int(k) + 1 for k in kernel_offsets.max(0).values.tolist()]
    flat = torch.zeros(m, dtype=torch.int64, device=kernel_offsets.device)
    for i, k in enumerate(kernel):
        flat = flat * k + kernel_offsets[:, i]
    plan, order = conv_plan(out_channel.long(), in_channel.long(), flat, kernel)
    patches = conv_patches(a_pad, kernel, stride, dilation, d.shape[2:])
    values = sampled_conv_grad_planned(patches, d, plan)
    return _deliver("sampled_conv_grad", values, out, out_columns, entries=order)


def sampled_conv_grad_planned(patches: torch.Tensor, d: torch.Tensor, plan) -> torch.Tensor:
    """F[b, j] = sum_p d[b, o_j, p] * a_pad[b, c_j, p * stride + k_j * dilation].

    patches: [B, C, *kernel, *out] (``conv_patches``), d: [B, O, *out], plan from
    ``conv_plan`` -> [B, m], columns in the plan's order.
    """
    batch = d.shape[0]
    positions = d[0, 0].numel()
    d_flat = d.reshape(batch, d.shape[1], positions)
    parts = []
    for position, in_channels, out_channels in plan:
        window = patches[(slice(None), slice(None)) + position].reshape(batch, patches.shape[1], positions)
        out = torch.empty(batch, in_channels.numel(), dtype=d.dtype, device=d.device)
        parts.append(_chunked(
            in_channels.numel(), batch * positions,
            lambda sl: torch.einsum("bmp,bmp->bm", window.index_select(1, in_channels[sl]),
                                    d_flat.index_select(1, out_channels[sl])),
            out,
        ))
    return torch.cat(parts, dim=1)


def sampled_embedding_grad(tokens: torch.Tensor, d: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                           padding_idx: int | None = None, *, out: torch.Tensor | None = None,
                           out_columns: torch.Tensor | None = None) -> torch.Tensor:
    """F[b, j] = sum_t [tokens[b, t] == rows[j]] * d[b, t, cols[j]].

    tokens: int [B, T], d: [B, T, E] -> [B, m]. The row ``padding_idx`` gets no
    gradient, as in ``nn.Embedding``. ``out``/``out_columns`` as in
    ``tangent_kernels.ops.sampled_embedding_grad``.
    """
    values = _sampled_embedding_grad(tokens, d, rows, cols, padding_idx)
    return _deliver("sampled_embedding_grad", values, out, out_columns)


def _sampled_embedding_grad(tokens, d, rows, cols, padding_idx) -> torch.Tensor:
    batch, length = tokens.shape
    if padding_idx is not None:
        tokens = tokens.masked_fill(tokens == padding_idx, -1)
    out = torch.empty(batch, rows.numel(), dtype=d.dtype, device=d.device)

    def part(sl: slice) -> torch.Tensor:
        hits = (tokens.unsqueeze(2) == rows[sl]).to(d.dtype)  # [B, T, m]
        return torch.einsum("btm,btm->bm", hits, d[:, :, cols[sl]])

    return _chunked(rows.numel(), batch * length, part, out)


def embedding_row_plan(rows: torch.Tensor, cols: torch.Tensor, vocab: int, padding_idx: int | None = None):
    """The sampled entries of an embedding table grouped by table row: (entry, col), both
    int64 [vocab, k] with k the most entries any row holds; entry[v, i] is the index in
    0 .. m-1 of row v's i-th sampled entry (-1 past the row's count, and everywhere on
    ``padding_idx``, which gets no gradient), col[v, i] its column of the table."""
    m = rows.numel()
    counts = torch.bincount(rows, minlength=vocab)
    width = max(int(counts.max()) if m else 0, 1)
    order = torch.argsort(rows, stable=True)
    sorted_rows = rows[order]
    slot = torch.arange(m, device=rows.device) - (torch.cumsum(counts, 0) - counts)[sorted_rows]
    entry = torch.full((vocab, width), -1, dtype=torch.int64, device=rows.device)
    col = torch.zeros((vocab, width), dtype=torch.int64, device=rows.device)
    entry[sorted_rows, slot] = order
    col[sorted_rows, slot] = cols[order]
    if padding_idx is not None:
        entry[padding_idx] = -1
    return entry, col


def sampled_embedding_grad_by_rows(tokens: torch.Tensor, d: torch.Tensor, plan, m: int) -> torch.Tensor:
    """``sampled_embedding_grad`` by the table rows the tokens hit: each token adds d at its
    row's sampled entries (``embedding_row_plan``), so the cost is B x T x k instead of
    B x T x m: a sample's gradient lives in the few rows its tokens select.

    tokens: int [B, T], d: [B, T, E] -> [B, m].
    """
    entry, col = plan
    batch, length = tokens.shape
    width = entry.shape[1]
    out = torch.zeros(batch, m + 1, dtype=d.dtype, device=d.device)  # column m collects the misses
    step = max(1, _CHUNK_ELEMENTS // max(length * width, 1))
    for start in range(0, batch, step):
        part = slice(start, min(start + step, batch))
        hit_entry, hit_col = entry[tokens[part]], col[tokens[part]]  # [b, T, k]
        values = torch.gather(d[part], 2, hit_col)
        out[part].scatter_add_(1, hit_entry.masked_fill(hit_entry < 0, m).reshape(hit_entry.shape[0], -1),
                               values.reshape(values.shape[0], -1))
    return out[:, :m]
