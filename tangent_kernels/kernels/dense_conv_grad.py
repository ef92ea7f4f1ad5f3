"""Triton dense strategy for sampled ConvNd/Linear weight gradients:
``tangent_kernels::triton_dense_conv_grad``.

Same result as ``triton_sampled_conv_grad`` (groups = 1):

    F[b, j] = sum_p d[b, o_j, p] * a_pad[b, c_j, p * stride + k_j * dilation]

computed the other way round. The sparse kernels do one dot product per sampled entry
(cost ~ entries x positions, gathers, no matrix units); this one computes the full
per-sample weight gradient d_b @ unfold(a_b)^T tile by tile as an implicit GEMM on the
matrix units (cost ~ the whole layer, at tensor-core rate), and its epilogue keeps only
the sampled entries of each tile: a tile's accumulator lives in registers and is never
written to memory, so the dense per-sample gradient is never materialized. Only tiles
that hold a sampled entry are computed. Which strategy is faster depends on the layer
(sampling density, positions, channels): ``persample.dense`` measures both per use on the first
CUDA batch and keeps the faster (docs/kernels.md).

Layout: rows of the per-sample gradient are output channels (BLOCK_M per tile), its
columns are (input channel, kernel offset) pairs flattened as in ``weight[o].flatten()``
(BLOCK_N per tile); the reduction runs over the output positions (BLOCK_K per step).
``dense_plan`` sorts the sampled entries by tile once per layer; the kernel's grid is
(tiles with entries, samples).

fp32 inputs multiply in IEEE fp32 unless ``allow_tf32`` (TF32 matrix units: ~1e-3
relative error per product, for precision="tf32"); fp16/bf16 inputs use their matrix
units; accumulation is fp32 and the [B, m] output has the input dtype. fp64 is not
supported (the sparse kernels serve it).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from .launch import block_size, check_launch_device, check_indices
from .sampled_conv_grad import position_offsets

_OP = "triton_dense_conv_grad"


class DensePlan(NamedTuple):
    """Sampled entries grouped by gradient tile (built once per layer by ``dense_plan``)."""

    tile_m: torch.Tensor  # [T] row-tile index of each tile with entries
    tile_n: torch.Tensor  # [T] column-tile index
    tile_start: torch.Tensor  # [T + 1] CSR offsets into the two lists below
    entry_local: torch.Tensor  # [m] int32 position of each entry inside its tile (row * BLOCK_N + col)
    entry_index: torch.Tensor  # [m] the entry's index j in the caller's order (output column)
    block_m: int
    block_n: int
    block_e: int  # entries handled per epilogue step


def dense_plan(out_channel: torch.Tensor, in_channel: torch.Tensor, kernel_offsets: torch.Tensor,
               kernel_size: Sequence[int], block_m: int = 64, block_n: int = 64) -> DensePlan:
    """Group the m sampled entries (out_channel, in_channel, kernel_offsets [m, ndim]) of a
    weight of spatial ``kernel_size`` by the (BLOCK_M x BLOCK_N) tile that holds them."""
    m = check_indices(_OP, out_channel=out_channel, in_channel=in_channel)
    kernel_size = tuple(int(k) for k in kernel_size)
    if kernel_offsets.dim() != 2 or kernel_offsets.shape != (m, len(kernel_size)):
        raise ValueError(f"{_OP}: kernel_offsets must have shape [{m}, {len(kernel_size)}], "
                         f"got {list(kernel_offsets.shape)}")
    per_channel = math.prod(kernel_size)
    flat_offset = torch.zeros(m, dtype=torch.int64, device=out_channel.device)
    for k, size in enumerate(kernel_size):
        flat_offset = flat_offset * size + kernel_offsets[:, k].long()
    column = in_channel.long() * per_channel + flat_offset
    row = out_channel.long()
    tiles_n = int(column.max()) // block_n + 1 if m else 1
    tile = (row // block_m) * tiles_n + column // block_n
    tile_sorted, order = torch.sort(tile, stable=True)
    tiles, counts = torch.unique_consecutive(tile_sorted, return_counts=True)
    start = torch.zeros(tiles.numel() + 1, dtype=torch.int64, device=tile.device)
    start[1:] = torch.cumsum(counts, 0)
    local = ((row % block_m) * block_n + column % block_n)[order].to(torch.int32)
    block_e = block_size(int(counts.max()) if m else 1, 16, 256)
    return DensePlan(tiles // tiles_n, tiles % tiles_n, start, local, order, block_m, block_n, block_e)


@triton.jit
def _dense_conv_grad_kernel(
    a_ptr, d_ptr, tile_m_ptr, tile_n_ptr, start_ptr, local_ptr, index_ptr, out_ptr,
    # gradient rows (output channels), columns (input channels x kernel), positions
    O, N, P1, P2, NP,
    # kernel extent per padded dim (K0 is implied), and its product
    K1, K2, KK,
    conv_s0, conv_s1, conv_s2, dil0, dil1, dil2,
    stride_ab, stride_ac, stride_a0, stride_a1, stride_a2,
    stride_db, stride_do, stride_d0, stride_d1, stride_d2,
    stride_ob, stride_om,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tm = tl.load(tile_m_ptr + pid)
    tn = tl.load(tile_n_ptr + pid)

    rm = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rm < O
    rn = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    # Column -> (input channel, kernel offset per dim): once per program.
    ic = rn // KK
    kf = rn % KK
    k0 = kf // (K1 * K2)
    k1 = (kf // K2) % K1
    k2 = kf % K2
    a_col = ic * stride_ac + k0 * dil0 * stride_a0 + k1 * dil1 * stride_a1 + k2 * dil2 * stride_a2
    d_row = rm * stride_do
    a_b = a_ptr + b * stride_ab
    d_b = d_ptr + b * stride_db

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for p_start in range(0, NP, BLOCK_K):
        rp = (p_start + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_p = rp < NP
        a_pos, d_pos = position_offsets(rp, P1, P2, conv_s0, conv_s1, conv_s2, stride_a0, stride_a1, stride_a2,
                                        stride_d0, stride_d1, stride_d2)
        d_tile = tl.load(d_b + d_row[:, None] + d_pos[None, :], mask=mask_m[:, None] & mask_p[None, :], other=0.0)
        a_tile = tl.load(a_b + a_pos[:, None] + a_col[None, :], mask=mask_p[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(d_tile, a_tile, acc, input_precision=PRECISION)

    # Epilogue: only this tile's sampled entries leave the registers.
    flat = tl.reshape(acc, [BLOCK_M * BLOCK_N])
    start = tl.load(start_ptr + pid)
    stop = tl.load(start_ptr + pid + 1)
    for e_start in range(start, stop, BLOCK_E):
        re = e_start + tl.arange(0, BLOCK_E)
        mask_e = re < stop
        local = tl.load(local_ptr + re, mask=mask_e, other=0)
        values = tl.gather(flat, local, 0)
        j = tl.load(index_ptr + re, mask=mask_e, other=0)
        tl.store(out_ptr + b * stride_ob + j * stride_om, values.to(out_ptr.dtype.element_ty), mask=mask_e)


def _check(a_pad: torch.Tensor, d: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int],
           dilation: Sequence[int]) -> int:
    if a_pad.dtype != d.dtype or a_pad.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{_OP}: a_pad and d must share one dtype among fp16/bf16/fp32 (fp64: use the sparse "
                        f"kernels), got {a_pad.dtype} and {d.dtype}")
    ndim = a_pad.dim() - 2
    if not 1 <= ndim <= 3 or d.dim() != a_pad.dim() or d.shape[0] != a_pad.shape[0]:
        raise ValueError(f"{_OP}: expected a_pad [B, C, *S] and d [B, O, *P] with 1 to 3 spatial dims and "
                         f"the same B; got a_pad {list(a_pad.shape)}, d {list(d.shape)}")
    if len(kernel_size) != ndim or len(stride) != ndim or len(dilation) != ndim or min(*stride, *dilation) < 1:
        raise ValueError(f"{_OP}: kernel_size, stride and dilation must be {ndim} positive ints, got "
                         f"{list(kernel_size)}, {list(stride)}, {list(dilation)}")
    for k in range(ndim):
        reach = (d.shape[2 + k] - 1) * stride[k] + (kernel_size[k] - 1) * dilation[k]
        if d.shape[2 + k] > 0 and reach >= a_pad.shape[2 + k]:
            raise ValueError(f"{_OP}: kernel {list(kernel_size)} with stride {list(stride)} and dilation "
                             f"{list(dilation)} reads outside a_pad {list(a_pad.shape)} for d {list(d.shape)}")
    return ndim


@torch.library.custom_op(f"tangent_kernels::{_OP}", mutates_args=())
def triton_dense_conv_grad(a_pad: torch.Tensor, d: torch.Tensor, tile_m: torch.Tensor, tile_n: torch.Tensor,
                           tile_start: torch.Tensor, entry_local: torch.Tensor, entry_index: torch.Tensor,
                           m: int, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
                           block_m: int, block_n: int, block_e: int, allow_tf32: bool) -> torch.Tensor:
    """[B, m]: the sampled entries (grouped by ``dense_plan``) of each sample's weight
    gradient of a groups=1 convolution with input a_pad [B, C, *S] and output gradient
    d [B, O, *P]. Pass a plan's fields in order: ``op(a_pad, d, *plan[:5], m, ...)``."""
    ndim = _check(a_pad, d, kernel_size, stride, dilation)
    check_launch_device(_OP, a_pad=a_pad, d=d, tile_m=tile_m, entry_local=entry_local)
    batch = d.shape[0]
    out = torch.zeros(batch, m, dtype=d.dtype, device=d.device)
    tiles = tile_m.shape[0]
    if batch == 0 or m == 0 or tiles == 0 or any(size == 0 for size in d.shape[2:]):
        return out
    lead = 3 - ndim
    positions = (1,) * lead + tuple(d.shape[2:])
    kernel = (1,) * lead + tuple(kernel_size)
    stride_a = (0,) * lead + a_pad.stride()[2:]
    stride_d = (0,) * lead + d.stride()[2:]
    precision = ("tf32" if allow_tf32 else "ieee") if d.dtype == torch.float32 else "tf32"
    n_columns = a_pad.shape[1] * math.prod(kernel_size)
    block_k = 32
    _dense_conv_grad_kernel[(tiles, batch)](
        a_pad, d, tile_m, tile_n, tile_start, entry_local, entry_index, out,
        d.shape[1], n_columns, positions[1], positions[2], math.prod(positions),
        kernel[1], kernel[2], math.prod(kernel),
        *((1,) * lead + tuple(stride)), *((1,) * lead + tuple(dilation)),
        a_pad.stride(0), a_pad.stride(1), *stride_a,
        d.stride(0), d.stride(1), *stride_d,
        *out.stride(),
        PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_E=block_e,
    )
    return out


@triton_dense_conv_grad.register_fake
def _(a_pad, d, tile_m, tile_n, tile_start, entry_local, entry_index, m, kernel_size, stride, dilation,
      block_m, block_n, block_e, allow_tf32):
    _check(a_pad, d, kernel_size, stride, dilation)
    return d.new_empty(d.shape[0], m)


def dense_conv_grad(a_pad: torch.Tensor, d: torch.Tensor, plan: DensePlan, m: int, kernel_size: Sequence[int],
                    stride: Sequence[int], dilation: Sequence[int], allow_tf32: bool = False) -> torch.Tensor:
    """``triton_dense_conv_grad`` with a ``DensePlan``."""
    return torch.ops.tangent_kernels.triton_dense_conv_grad(
        a_pad, d, plan.tile_m, plan.tile_n, plan.tile_start, plan.entry_local, plan.entry_index, m,
        list(kernel_size), list(stride), list(dilation), plan.block_m, plan.block_n, plan.block_e, allow_tf32)
