"""Triton sampled Embedding weight gradient: ``tangent_kernels::triton_sampled_embedding_grad``.

    F[b, j] = sum_t [tokens[b, t] == rows[j] and tokens[b, t] != padding_idx] * d[b, t, cols[j]]

tokens: int [B, T], d: [B, T, E] gradient at the embedding output, rows/cols: [m]
-> out: [B, m]. Reference: ``tangent_kernels.sampled.sampled_embedding_grad``.

Each program owns one sample b and BLOCK_M sampled entries and walks the tokens in
BLOCK_T tiles: it compares the token tile against the sampled rows and loads d only
where a token hits (masked load), so traffic scales with the hits, not with m x T.
Dtype rule: see ``kernels/__init__``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import block_size, check_launch_device, check_floats, check_indices, check_range

_OP = "triton_sampled_embedding_grad"


@triton.jit
def _sampled_embedding_grad_kernel(
    # pointers
    tokens_ptr, d_ptr, rows_ptr, cols_ptr, out_ptr,
    # sizes and the padding row (read only when HAS_PADDING)
    T, M, padding_idx,
    # strides (in elements)
    stride_tb, stride_tt,
    stride_db, stride_dt, stride_de,
    stride_ob, stride_om,
    # meta-parameters
    HAS_PADDING: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    cols = tl.load(cols_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    d_base = d_ptr + b * stride_db + cols * stride_de  # [BLOCK_M] pointers

    if ACC_FP64:
        acc = tl.zeros([BLOCK_M], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)

    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask_t = offs_t < T
        tok = tl.load(tokens_ptr + b * stride_tb + offs_t * stride_tt, mask=mask_t, other=0).to(tl.int64)
        if HAS_PADDING:
            mask_t = mask_t & (tok != padding_idx)
        hit = mask_t[:, None] & mask_m[None, :] & (tok[:, None] == rows[None, :])
        d = tl.load(d_base[None, :] + offs_t[:, None] * stride_dt, mask=hit, other=0.0)
        acc += tl.sum(d.to(acc.dtype), axis=0)

    tl.store(out_ptr + b * stride_ob + offs_m * stride_om, acc.to(out_ptr.dtype.element_ty), mask=mask_m)


def _check(tokens: torch.Tensor, d: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
    check_floats(_OP, d=d)
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"{_OP}: tokens must be an integer tensor, got {tokens.dtype}; use .long()")
    if tokens.dim() != 2 or d.dim() != 3 or tokens.shape != d.shape[:2]:
        raise ValueError(f"{_OP}: expected tokens [B, T] and d [B, T, E] with the same B, T; "
                         f"got tokens {list(tokens.shape)}, d {list(d.shape)}")
    check_indices(_OP, rows=rows, cols=cols)


@torch.library.custom_op(f"tangent_kernels::{_OP}", mutates_args=())
def triton_sampled_embedding_grad(tokens: torch.Tensor, d: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                                  padding_idx: Optional[int] = None) -> torch.Tensor:
    """F[b, j] = sum_t [tokens[b, t] == rows[j] != padding_idx] * d[b, t, cols[j]] -> [B, m].

    tokens int [B, T], d [B, T, E], rows/cols [m]. Rows are only compared, never used
    as addresses, so they are not range-checked (an unused row gives 0); cols are.
    """
    _check(tokens, d, rows, cols)
    check_launch_device(_OP, tokens=tokens, d=d, rows=rows, cols=cols)
    batch, length = tokens.shape
    m = rows.shape[0]
    out = torch.empty(batch, m, dtype=d.dtype, device=d.device)
    if batch == 0 or m == 0:
        return out
    check_range(_OP, {"cols": (cols, d.shape[2])})
    rows, cols = rows.contiguous(), cols.contiguous()
    block_m = block_size(m, 16, 64)
    block_t = block_size(length, 16, 64)
    grid = (triton.cdiv(m, block_m), batch)
    _sampled_embedding_grad_kernel[grid](
        tokens, d, rows, cols, out,
        length, m, 0 if padding_idx is None else padding_idx,
        *tokens.stride(), *d.stride(), *out.stride(),
        HAS_PADDING=padding_idx is not None, ACC_FP64=d.dtype == torch.float64,
        BLOCK_T=block_t, BLOCK_M=block_m,
    )
    return out


@triton_sampled_embedding_grad.register_fake
def _(tokens, d, rows, cols, padding_idx=None):
    _check(tokens, d, rows, cols)
    return d.new_empty(tokens.shape[0], rows.shape[0])
