"""dense_conv_grad (tangent_kernels::triton_dense_conv_grad, the GEMM with a sampled
epilogue; Triton is its only backend) against per-sample autograd weight gradients in
float64, gathered at the sampled entries. The sparse op for the same gradients, on every
backend, is tests/test_sampled_conv_grad.py.

Runs through Triton's interpreter without a GPU (small shapes and 16x16 tiles, so
every case spans several row and column tiles), compiled on a GPU.

Tolerance: the reference is computed in fp64 from the same rounded inputs, so the
kernel's errors are the fp32 accumulation of n = positions products (at most
n * 2^-24 * sum|terms|; fp16 products are exact in fp32) and the rounding of the result
to the output dtype (half an ulp of |ref|). TF32 multiplies carry 2^-11 per operand.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from tangent_kernels import kernels

DEVICE = "cuda" if torch.cuda.is_available() and not kernels.INTERPRETED else "cpu"
UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# (in, out, kernel, stride, padding, dilation, spatial input size, sampled entries)
CASES = [
    (3, 5, (3,), (1,), 1, (1,), (9,), 20),
    (4, 20, (3, 3), (1, 1), 1, (1, 1), (6, 5), 70),
    (6, 17, (2, 3), (2, 1), 1, (1, 2), (7, 8), 130),
    (5, 33, (1, 1), (2, 2), 0, (1, 1), (5, 5), 40),
    (2, 3, (2, 2, 2), (1, 2, 1), 0, (1, 1, 1), (3, 5, 4), 24),
    (7, 9, (3, 3), (1, 1), 1, (1, 1), (1, 1), 50),  # one output position, padding only
]


def _case(case, dtype, seed_key):
    c_in, c_out, kernel, stride, padding, dilation, size, m = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, dtype, seed_key)).encode()))
    batch = 3
    x = torch.randn(batch, c_in, *size, generator=gen, dtype=torch.float64).to(dtype).double()
    weight = torch.randn(c_out, c_in, *kernel, generator=gen, dtype=torch.float64)
    conv = CONV[len(kernel)]
    out_shape = conv(x, weight, stride=stride, padding=padding, dilation=dilation).shape
    d = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(dtype).double()
    full = torch.stack([
        torch.autograd.grad(conv(x[b : b + 1], weight.requires_grad_(True), stride=stride, padding=padding,
                                 dilation=dilation), weight, d[b : b + 1])[0].reshape(-1)
        for b in range(batch)
    ])
    abs_full = torch.stack([
        torch.autograd.grad(conv(x[b : b + 1].abs(), weight, stride=stride, padding=padding, dilation=dilation),
                            weight, d[b : b + 1].abs())[0].reshape(-1)
        for b in range(batch)
    ])
    local = torch.randperm(weight.numel(), generator=gen)[: min(m, weight.numel())]
    per_out, kk = weight[0].numel(), weight[0, 0].numel()
    out_channel, in_channel = local // per_out, (local % per_out) // kk
    offsets = torch.stack(torch.unravel_index(local % kk, kernel), dim=1)
    a_pad = F.pad(x, (padding,) * (2 * len(kernel))).to(dtype).to(DEVICE)
    return (a_pad, d.to(dtype).to(DEVICE), out_channel.to(DEVICE), in_channel.to(DEVICE), offsets.to(DEVICE),
            kernel, stride, dilation, full[:, local], abs_full[:, local], d[0, 0].numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[2])}d-k{'x'.join(map(str, c[2]))}-m{c[7]}")
def test_dense_matches_per_sample_weight_gradients(case, dtype):
    a_pad, d, oc, ic, offsets, kernel, stride, dilation, ref, ref_abs, n = _case(case, dtype, "dense")
    plan = kernels.dense_plan(oc, ic, offsets, kernel, block_m=16, block_n=16)
    out = kernels.dense_conv_grad(a_pad, d, plan, oc.numel(), kernel, stride, dilation)
    assert out.shape == ref.shape and out.dtype == dtype
    bound = UNIT[dtype] * ref.abs() + 2 * (n + 1) * UNIT[torch.float32] * ref_abs + torch.finfo(dtype).tiny
    error = (out.double().cpu() - ref).abs()
    assert bool((error <= bound).all()), float((error / bound).max())


def test_dense_tf32_within_its_rounding():
    case = CASES[2]
    a_pad, d, oc, ic, offsets, kernel, stride, dilation, ref, ref_abs, n = _case(case, torch.float32, "tf32")
    plan = kernels.dense_plan(oc, ic, offsets, kernel, block_m=16, block_n=16)
    out = kernels.dense_conv_grad(a_pad, d, plan, oc.numel(), kernel, stride, dilation, allow_tf32=True)
    # Each TF32 operand carries up to 2^-11 relative rounding: 2 * 2^-11 per product.
    assert bool(((out.double().cpu() - ref).abs() <= 2 * 2.0**-11 * ref_abs * 1.01 + 1e-30).all())


def test_plan_groups_entries_by_tile_and_keeps_every_entry_once():
    gen = torch.Generator().manual_seed(5)
    local = torch.randperm(40 * 30 * 9, generator=gen)[:500]
    oc, ic, kf = local // 270, (local % 270) // 9, local % 9
    offsets = torch.stack(torch.unravel_index(kf, (3, 3)), dim=1)
    plan = kernels.dense_plan(oc, ic, offsets, (3, 3), block_m=16, block_n=32)
    assert sorted(plan.entry_index.tolist()) == list(range(500))
    assert int(plan.tile_start[-1]) == 500 and plan.tile_start.numel() == plan.tile_m.numel() + 1
    columns = ic * 9 + kf
    for t in range(plan.tile_m.numel()):
        members = plan.entry_index[plan.tile_start[t] : plan.tile_start[t + 1]]
        assert bool((oc[members] // 16 == plan.tile_m[t]).all() and (columns[members] // 32 == plan.tile_n[t]).all())
        local_in_tile = (oc[members] % 16) * 32 + columns[members] % 32
        assert torch.equal(plan.entry_local[plan.tile_start[t] : plan.tile_start[t + 1]].long(), local_in_tile)


def test_dense_refuses_fp64_and_out_of_reach_kernels():
    a_pad = torch.randn(2, 3, 5, 5, dtype=torch.float64, device=DEVICE)
    d = torch.randn(2, 4, 3, 3, dtype=torch.float64, device=DEVICE)
    plan = kernels.dense_plan(torch.tensor([0]), torch.tensor([0]), torch.tensor([[0, 0]]), (3, 3))
    with pytest.raises(TypeError, match="fp64: use the sparse"):
        kernels.dense_conv_grad(a_pad, d, plan, 1, (3, 3), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="reads outside a_pad"):
        kernels.dense_conv_grad(a_pad.float(), d.float(), plan, 1, (3, 3), (2, 2), (1, 1))


def test_opcheck():
    a_pad, d, oc, ic, offsets, kernel, stride, dilation, *_ = _case(CASES[1], torch.float32, "opcheck")
    plan = kernels.dense_plan(oc, ic, offsets, kernel, block_m=16, block_n=16)
    args = (a_pad, d, *plan[:5], oc.numel(), list(kernel), list(stride), list(dilation), 16, 16, plan.block_e, False)
    torch.library.opcheck(torch.ops.tangent_kernels.triton_dense_conv_grad, args,
                          test_utils=("test_schema", "test_faketensor"))
