"""Triton sampled ConvNd weight gradient: ``tangent_kernels::triton_sampled_conv_grad``.

    F[b, j] = sum_p d[b, o_j, p] * a_pad[b, c_j, p * stride + k_j * dilation]   (per spatial dim)

a_pad: [B, C, *S] the padded layer input, d: [B, O, *P] gradient at the layer output,
out_channel/in_channel: [m] (in_channel absolute, groups resolved by the caller),
kernel_offsets: [m, ndim], stride/dilation: ndim ints -> out: [B, m], ndim in 1..3.
Reference: ``tangent_kernels.sampled.sampled_conv_grad`` (which takes the strided
``conv_patches`` view of a_pad instead of stride and dilation).

The launcher pads 1-d and 2-d problems to 3-d with leading size-1 dims, so one kernel
serves all. Each program owns one sample b and BLOCK_M sampled entries, walks the
flattened output positions in BLOCK_P tiles, unravels them to (p0, p1, p2) and gathers
the two [BLOCK_P, BLOCK_M] operand tiles: the per-entry part of each address (channel,
kernel offset) is computed once, the per-position part once per tile. Dtype rule: see
``kernels/__init__``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from .launch import block_size, check_launch_device, check_floats, check_indices, check_range

_OP = "triton_sampled_conv_grad"


@triton.jit
def position_offsets(flat, P1, P2, conv_s0, conv_s1, conv_s2, stride_a0, stride_a1, stride_a2,
                     stride_d0, stride_d1, stride_d2):
    """Flat output positions (int64) -> their element offsets into a_pad and into d."""
    p2 = flat % P2
    p1 = (flat // P2) % P1
    p0 = flat // (P1 * P2)
    a_pos = p0 * conv_s0 * stride_a0 + p1 * conv_s1 * stride_a1 + p2 * conv_s2 * stride_a2
    d_pos = p0 * stride_d0 + p1 * stride_d1 + p2 * stride_d2
    return a_pos, d_pos


@triton.jit
def _sampled_conv_grad_kernel(
    # pointers; koffs is [M, 3] contiguous
    a_ptr, d_ptr, ochan_ptr, ichan_ptr, koffs_ptr, out_ptr,
    # sizes: output positions per dim, sampled entries
    P0, P1, P2, M,
    # convolution geometry, per dim
    conv_s0, conv_s1, conv_s2, dil0, dil1, dil2,
    # strides (in elements)
    stride_ab, stride_ac, stride_a0, stride_a1, stride_a2,
    stride_db, stride_do, stride_d0, stride_d1, stride_d2,
    stride_ob, stride_om,
    # meta-parameters
    ACC_FP64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    ochan = tl.load(ochan_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    ichan = tl.load(ichan_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    k0 = tl.load(koffs_ptr + offs_m * 3 + 0, mask=mask_m, other=0).to(tl.int64)
    k1 = tl.load(koffs_ptr + offs_m * 3 + 1, mask=mask_m, other=0).to(tl.int64)
    k2 = tl.load(koffs_ptr + offs_m * 3 + 2, mask=mask_m, other=0).to(tl.int64)

    # Per-entry address parts: [BLOCK_M] pointers.
    a_base = (a_ptr + b * stride_ab + ichan * stride_ac
              + k0 * dil0 * stride_a0 + k1 * dil1 * stride_a1 + k2 * dil2 * stride_a2)
    d_base = d_ptr + b * stride_db + ochan * stride_do

    if ACC_FP64:
        acc = tl.zeros([BLOCK_M], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)

    n_pos = P0 * P1 * P2
    for p_start in range(0, n_pos, BLOCK_P):
        offs_p = (p_start + tl.arange(0, BLOCK_P)).to(tl.int64)
        mask_p = offs_p < n_pos
        # Per-position address parts: [BLOCK_P] element offsets.
        a_pos, d_pos = position_offsets(offs_p, P1, P2, conv_s0, conv_s1, conv_s2, stride_a0, stride_a1, stride_a2,
                                        stride_d0, stride_d1, stride_d2)
        mask = mask_p[:, None] & mask_m[None, :]
        a = tl.load(a_base[None, :] + a_pos[:, None], mask=mask, other=0.0)
        d = tl.load(d_base[None, :] + d_pos[:, None], mask=mask, other=0.0)
        acc += tl.sum(a.to(acc.dtype) * d.to(acc.dtype), axis=0)

    tl.store(out_ptr + b * stride_ob + offs_m * stride_om, acc.to(out_ptr.dtype.element_ty), mask=mask_m)


def _check(a_pad: torch.Tensor, d: torch.Tensor, out_channel: torch.Tensor, in_channel: torch.Tensor,
           kernel_offsets: torch.Tensor, stride: Sequence[int], dilation: Sequence[int]) -> int:
    """Shapes and dtypes (no values); returns ndim."""
    check_floats(_OP, a_pad=a_pad, d=d)
    ndim = a_pad.dim() - 2
    if not 1 <= ndim <= 3 or d.dim() != a_pad.dim() or d.shape[0] != a_pad.shape[0]:
        raise ValueError(f"{_OP}: expected a_pad [B, C, *S] and d [B, O, *P] with 1 to 3 spatial dims and "
                         f"the same B; got a_pad {list(a_pad.shape)}, d {list(d.shape)}")
    m = check_indices(_OP, out_channel=out_channel, in_channel=in_channel)
    if kernel_offsets.dtype.is_floating_point or kernel_offsets.dtype == torch.bool:
        raise TypeError(f"{_OP}: kernel_offsets must be an integer tensor, got {kernel_offsets.dtype}")
    if kernel_offsets.dim() != 2 or kernel_offsets.shape[0] != m or kernel_offsets.shape[1] != ndim:
        raise ValueError(f"{_OP}: kernel_offsets must have shape [{m}, {ndim}], got {list(kernel_offsets.shape)}")
    if len(stride) != ndim or len(dilation) != ndim or min(*stride, *dilation) < 1:
        raise ValueError(f"{_OP}: stride and dilation must be {ndim} positive ints, got {list(stride)}, "
                         f"{list(dilation)}")
    return ndim


@torch.library.custom_op(f"tangent_kernels::{_OP}", mutates_args=())
def triton_sampled_conv_grad(a_pad: torch.Tensor, d: torch.Tensor, out_channel: torch.Tensor,
                             in_channel: torch.Tensor, kernel_offsets: torch.Tensor, stride: Sequence[int],
                             dilation: Sequence[int]) -> torch.Tensor:
    """F[b, j] = sum_p d[b, o_j, p] * a_pad[b, c_j, p * stride + k_j * dilation] -> [B, m].

    a_pad [B, C, *S], d [B, O, *P], out_channel/in_channel [m], kernel_offsets [m, ndim].
    """
    ndim = _check(a_pad, d, out_channel, in_channel, kernel_offsets, stride, dilation)
    check_launch_device(_OP, a_pad=a_pad, d=d, out_channel=out_channel, in_channel=in_channel,
                 kernel_offsets=kernel_offsets)
    batch, m = d.shape[0], out_channel.shape[0]
    out_size, in_size = d.shape[2:], a_pad.shape[2:]
    out = torch.empty(batch, m, dtype=d.dtype, device=d.device)
    if batch == 0 or m == 0:
        return out
    if any(size == 0 for size in out_size):
        return out.zero_()
    # Largest kernel offset per dim whose last window still lies inside a_pad.
    bounds = {"out_channel": (out_channel, d.shape[1]), "in_channel": (in_channel, a_pad.shape[1])}
    for k in range(ndim):
        reach = in_size[k] - 1 - (out_size[k] - 1) * stride[k]
        bounds[f"kernel_offsets[:, {k}]"] = (kernel_offsets[:, k], max(reach // dilation[k] + 1, 0))
    check_range(_OP, bounds)

    # Pad to 3 spatial dims with leading size-1 dims (stride 0 in memory: never stepped).
    lead = 3 - ndim
    offsets3 = torch.zeros(m, 3, dtype=torch.int64, device=d.device)
    offsets3[:, lead:] = kernel_offsets
    size_p = (1,) * lead + tuple(out_size)
    stride_a = (0,) * lead + a_pad.stride()[2:]
    stride_d = (0,) * lead + d.stride()[2:]
    conv_stride = (1,) * lead + tuple(stride)
    conv_dilation = (1,) * lead + tuple(dilation)

    block_m = block_size(m, 16, 64)
    block_p = block_size(math.prod(out_size), 16, 64)
    grid = (triton.cdiv(m, block_m), batch)
    _sampled_conv_grad_kernel[grid](
        a_pad, d, out_channel.contiguous(), in_channel.contiguous(), offsets3, out,
        *size_p, m,
        *conv_stride, *conv_dilation,
        a_pad.stride(0), a_pad.stride(1), *stride_a,
        d.stride(0), d.stride(1), *stride_d,
        *out.stride(),
        ACC_FP64=d.dtype == torch.float64, BLOCK_P=block_p, BLOCK_M=block_m,
    )
    return out


@triton_sampled_conv_grad.register_fake
def _(a_pad, d, out_channel, in_channel, kernel_offsets, stride, dilation):
    _check(a_pad, d, out_channel, in_channel, kernel_offsets, stride, dilation)
    return d.new_empty(d.shape[0], out_channel.shape[0])
