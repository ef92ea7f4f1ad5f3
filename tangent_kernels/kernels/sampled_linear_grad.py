"""Triton sampled Linear weight gradient: ``tangent_kernels::triton_sampled_linear_grad``.

    F[b, j] = sum_t d[b, t, rows[j]] * a[b, t, cols[j]]

a: [B, T, I] layer input, d: [B, T, O] gradient at the layer output, rows/cols: [m]
-> out: [B, m]. Reference: ``tangent_kernels.sampled.sampled_linear_grad``.

A sampled dot product, not a GEMM: each program owns one sample b and BLOCK_M sampled
entries, walks the T tokens in BLOCK_T tiles, gathers the two [BLOCK_T, BLOCK_M]
operand tiles and reduces over tokens. Work and traffic scale with B x m x T; the
per-sample gradient [B, O, I] is never formed. Dtype rule: see ``kernels/__init__``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import block_size, check_launch_device, check_floats, check_indices, check_range

_OP = "triton_sampled_linear_grad"


@triton.jit
def _sampled_linear_grad_kernel(
    # pointers
    a_ptr, d_ptr, rows_ptr, cols_ptr, out_ptr,
    # sizes
    T, M,
    # strides (in elements)
    stride_ab, stride_at, stride_ai,
    stride_db, stride_dt, stride_do,
    stride_ob, stride_om,
    # meta-parameters
    ACC_FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # int64: B * T * I may exceed 2**31

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    cols = tl.load(cols_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)

    a_base = a_ptr + b * stride_ab + cols * stride_ai  # [BLOCK_M] pointers
    d_base = d_ptr + b * stride_db + rows * stride_do

    if ACC_FP64:
        acc = tl.zeros([BLOCK_M], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)

    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask = (offs_t < T)[:, None] & mask_m[None, :]
        a = tl.load(a_base[None, :] + offs_t[:, None] * stride_at, mask=mask, other=0.0)
        d = tl.load(d_base[None, :] + offs_t[:, None] * stride_dt, mask=mask, other=0.0)
        acc += tl.sum(a.to(acc.dtype) * d.to(acc.dtype), axis=0)

    out_ptrs = out_ptr + b * stride_ob + offs_m * stride_om
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m)


def _check(a: torch.Tensor, d: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
    check_floats(_OP, a=a, d=d)
    if a.dim() != 3 or d.dim() != 3 or a.shape[:2] != d.shape[:2]:
        raise ValueError(f"{_OP}: expected a [B, T, I] and d [B, T, O] with the same B, T; "
                         f"got a {list(a.shape)}, d {list(d.shape)}")
    check_indices(_OP, rows=rows, cols=cols)


@torch.library.custom_op(f"tangent_kernels::{_OP}", mutates_args=())
def triton_sampled_linear_grad(a: torch.Tensor, d: torch.Tensor, rows: torch.Tensor,
                               cols: torch.Tensor) -> torch.Tensor:
    """F[b, j] = sum_t d[b, t, rows[j]] * a[b, t, cols[j]]; a [B, T, I], d [B, T, O], rows/cols [m] -> [B, m]."""
    _check(a, d, rows, cols)
    check_launch_device(_OP, a=a, d=d, rows=rows, cols=cols)
    batch, tokens = a.shape[:2]
    m = rows.shape[0]
    out = torch.empty(batch, m, dtype=a.dtype, device=a.device)
    if batch == 0 or m == 0:
        return out
    check_range(_OP, {"rows": (rows, d.shape[2]), "cols": (cols, a.shape[2])})
    rows, cols = rows.contiguous(), cols.contiguous()
    block_m = block_size(m, 16, 64)
    block_t = block_size(tokens, 16, 64)
    grid = (triton.cdiv(m, block_m), batch)
    _sampled_linear_grad_kernel[grid](
        a, d, rows, cols, out,
        tokens, m,
        *a.stride(), *d.stride(), *out.stride(),
        ACC_FP64=a.dtype == torch.float64, BLOCK_T=block_t, BLOCK_M=block_m,
    )
    return out


@triton_sampled_linear_grad.register_fake
def _(a, d, rows, cols):
    _check(a, d, rows, cols)
    return a.new_empty(a.shape[0], rows.shape[0])
