"""Triton Gram tile update: ``tangent_kernels::triton_gram_tile_update``.

    K[r, c] += sum_k A[r, k] * B[c, k]     K: [m, n], A: [m, d], B: [n, d]

with, when ``lower``, the entries above the global diagonal (row_offset + r <
col_offset + c) left untouched: the semantics of ``tangent_kernels.ops.gram_tile_update``
(its docstring has the full contract; ``ops.gram_tile_update_torch`` is the reference).

Each program owns a BLOCK_M x BLOCK_N block of K and walks d in BLOCK_K steps with
``tl.dot`` (tensor cores on a GPU), accumulating in fp32: 16-bit or fp32 inputs, fp32 K.
A block entirely above the diagonal does no work. fp32 inputs use IEEE fp32 products
unless ``allow_tf32`` (fp32 must mean fp32, as everywhere in tangent_kernels). fp64 is
not offered here (the cpp and torch backends have it): Triton's fp64 dot is not
available on every GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import block_size, check_launch_device

_OP = "triton_gram_tile_update"
_INPUTS = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _gram_tile_update_kernel(
    k_ptr, a_ptr, b_ptr,
    M, N, D, row_offset, col_offset,
    stride_km, stride_kn, stride_am, stride_ad, stride_bn, stride_bd,
    LOWER: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Above the diagonal: the block's last row is above its first column -> no products.
    d_end = D
    if LOWER:
        if row_offset + pid_m * BLOCK_M + BLOCK_M - 1 < col_offset + pid_n * BLOCK_N:
            d_end = 0
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, d_end, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_k = offs_k < D
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ad,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bd,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if ALLOW_TF32:
            acc = tl.dot(a, b, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")
    keep = mask_m[:, None] & mask_n[None, :]
    if LOWER:
        keep = keep & ((row_offset + offs_m)[:, None] >= (col_offset + offs_n)[None, :])
    k_ptrs = k_ptr + offs_m[:, None] * stride_km + offs_n[None, :] * stride_kn
    current = tl.load(k_ptrs, mask=keep, other=0.0)
    tl.store(k_ptrs, current + acc, mask=keep)


def _check(K: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
    if A.dtype != B.dtype or A.dtype not in _INPUTS:
        raise TypeError(f"{_OP}: A and B must share one dtype among float16/bfloat16/float32, got {A.dtype} and "
                        f"{B.dtype} (float64 runs on backend='cpp' or 'torch')")
    if K.dtype != torch.float32:
        raise TypeError(f"{_OP}: K must be float32 (the accumulation dtype), got {K.dtype}; float64 K runs on "
                        "backend='cpp' or 'torch'")
    if K.dim() != 2 or A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[1] or tuple(K.shape) != (A.shape[0], B.shape[0]):
        raise ValueError(f"{_OP}: expected K [m, n], A [m, d], B [n, d]; got K {list(K.shape)}, A {list(A.shape)}, "
                         f"B {list(B.shape)}")


@torch.library.custom_op(f"tangent_kernels::{_OP}", mutates_args=("K",))
def triton_gram_tile_update(K: torch.Tensor, A: torch.Tensor, B: torch.Tensor, row_offset: int, col_offset: int,
                            lower: bool, allow_tf32: bool = False) -> None:
    """K += A @ B.T in place (fp32 accumulation); with ``lower`` only on/below the global diagonal."""
    _check(K, A, B)
    check_launch_device(_OP, K=K, A=A, B=B)
    m, n, d = A.shape[0], B.shape[0], A.shape[1]
    if m == 0 or n == 0 or d == 0:
        return
    block_m, block_n = block_size(m, 16, 64), block_size(n, 16, 64)
    block_k = block_size(d, 16, 32)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gram_tile_update_kernel[grid](
        K, A, B, m, n, d, int(row_offset), int(col_offset),
        *K.stride(), *A.stride(), *B.stride(),
        LOWER=bool(lower), ALLOW_TF32=bool(allow_tf32),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )


@triton_gram_tile_update.register_fake
def _(K, A, B, row_offset, col_offset, lower, allow_tf32=False):
    _check(K, A, B)
