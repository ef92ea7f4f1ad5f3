"""sampled_conv_grad, on every backend, against a float64 reference: the per-sample
gradient of a conv weight at sampled entries (o, c, kernel offset),

    out[b, j] = sum_p d[b, o_j, p] * a_pad[b, c_j, p * stride + offset_j * dilation]

with a_pad: [B, C, *in] (already padded), d: [B, O, *out]. Backends: plain torch
(sampled.py: patches and a plan), the C++ CPU kernel (tangent_kernels::sampled_conv_grad),
Triton (tangent_kernels::triton_sampled_conv_grad; through its interpreter without a GPU,
so shapes stay small) and the CUDA kernel (`gpu` tests, skipped without one). Cases:
conv1d/2d/3d, groups and depthwise, stride and dilation, one output position, 1x1 strided,
strided inputs; every-entry checks against autograd; opcheck, torch.compile, the errors.
The dense (GEMM) Triton strategy has its own module: tests/test_dense_conv_grad.py.
Tolerances: tests/_sampled.py.
"""

from __future__ import annotations

import pytest
import torch

from _sampled import (CPP, CUDA, CUDA_SKIP, DTYPES, TRITON_DEVICE, TRITON_DTYPES, as_f64, assert_close,
                      assert_within_bound, case_generator, conv_problem, needs_cpp, needs_cuda, random_index,
                      randn_rounded, ref_conv, strided, check_triton_bf16, check_triton_compiled)
from tangent_kernels import ops, sampled

registered = torch.ops.tangent_kernels

CONV_CASES = [  # channels, out_channels, groups, kernel, stride, dilation, size
    (3, 4, 1, (3,), (1,), (1,), (11,)),                      # conv1d
    (4, 6, 2, (3, 2), (2, 1), (1, 2), (9, 8)),               # grouped, strided, dilated, odd kernel
    (5, 5, 5, (3, 3), (1, 1), (1, 1), (7, 6)),               # depthwise
    (3, 4, 1, (3, 3), (1, 1), (1, 1), (3, 3)),               # one output position
    (2, 3, 1, (2, 3, 2), (1, 2, 1), (2, 1, 1), (5, 7, 4)),   # conv3d
    (6, 4, 2, (1, 1), (2, 2), (1, 1), (6, 5)),               # 1x1 strided (a resnet downsample)
]


# --- plain torch (sampled.py) --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_matches_reference(dtype):
    g = torch.Generator().manual_seed(13)
    channels, out_channels, groups, kernel, stride, dilation, size = CONV_CASES[1]
    a_pad, d, oc, ic, offsets = conv_problem(g, dtype, 2, channels, out_channels, groups, kernel, stride, dilation,
                                             size, 12)
    flat = offsets[:, 0] * kernel[1] + offsets[:, 1]
    plan, order = sampled.conv_plan(oc, ic, flat, kernel)
    patches = sampled.conv_patches(a_pad, kernel, stride, dilation, d.shape[2:])
    expected = ref_conv(a_pad, d, oc, ic, offsets, stride, dilation)[:, order]
    assert_close(sampled.sampled_conv_grad_planned(patches, d, plan), expected, dtype, dtype)


# --- C++ CPU kernel -----------------------------------------------------------------------------------

@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_cpp_matches_reference(dtype, case):
    g = case_generator(dtype, case)
    channels, out_channels, groups, kernel, stride, dilation, size = case
    for batch, m in ((3, 23), (1, 4)):
        a_pad, d, oc, ic, offsets = conv_problem(g, dtype, batch, channels, out_channels, groups, kernel, stride,
                                                 dilation, size, m)
        expected = ref_conv(a_pad, d, oc, ic, offsets, stride, dilation)
        out = ops.sampled_conv_grad(a_pad, d, oc, ic, offsets, stride, dilation)
        assert out.dtype == dtype
        assert_close(out, expected, dtype, dtype)
        if dtype != torch.float64:  # fp32 out: the accumulation alone
            out32 = torch.empty(batch, m, dtype=torch.float32)
            ops.sampled_conv_grad(a_pad, d, oc, ic, offsets, stride, dilation, out=out32)
            assert_close(out32, expected, dtype, torch.float32)
        got = ops.sampled_conv_grad(strided(a_pad, g), strided(d, g), oc, ic, offsets, stride, dilation)
        assert_close(got, expected, dtype, dtype)


# --- CUDA kernel (run on a GPU machine; skipped here) -------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_cuda_matches_reference(dtype, case):
    if not CUDA:
        pytest.skip(CUDA_SKIP)
    g = torch.Generator().manual_seed(23)
    channels, out_channels, groups, kernel, stride, dilation, size = case
    a_pad, d, oc, ic, offsets = conv_problem(g, dtype, 3, channels, out_channels, groups, kernel, stride, dilation,
                                             size, 29)
    expected = ref_conv(a_pad, d, oc, ic, offsets, stride, dilation)
    got = ops.sampled_conv_grad(a_pad.cuda(), d.cuda(), oc.cuda(), ic.cuda(), offsets.cuda(), stride, dilation)
    assert_close(got.cpu(), expected, dtype, dtype)


# --- Triton -------------------------------------------------------------------------------------------

# (B, C, O, groups, out positions P, kernel K, stride, dilation, slack, m, noncontig)
TRITON_CASES = [
    (2, 3, 4, 1, (5,), (3,), (1,), (1,), 0, 13, False),
    (1, 2, 2, 1, (1,), (2,), (2,), (3,), 1, 1, False),  # one output position, one entry
    (2, 4, 6, 2, (3, 5), (3, 2), (2, 1), (1, 2), 1, 40, False),  # groups, stride, dilation
    (3, 4, 4, 4, (4, 4), (3, 3), (1, 1), (1, 1), 0, 17, True),  # depthwise, channels-last-like
    (2, 3, 5, 1, (9, 8), (2, 2), (1, 1), (1, 1), 0, 70, False),  # two position tiles, two blocks
    (2, 2, 3, 1, (2, 3, 2), (2, 1, 2), (1, 2, 2), (2, 1, 3), 1, 19, True),  # 3-d
]


def triton_case(case, dtype):
    """(args, float64 reference, reference on |inputs|, accumulation length)."""
    batch, c_in, c_out, groups, out_size, kernel, stride, dilation, slack, m, noncontig = case
    gen = case_generator("conv", case, dtype)
    # Smallest padded input the geometry needs, plus slack (stride not dividing it).
    in_size = [(p - 1) * s + (k - 1) * dl + 1 + slack for p, k, s, dl in zip(out_size, kernel, stride, dilation)]
    a_pad = randn_rounded(gen, batch, c_in, *in_size, dtype=dtype, noncontig=noncontig)
    d = randn_rounded(gen, batch, c_out, *out_size, dtype=dtype, noncontig=noncontig)
    # Groups resolved as ConvRule does: output channel o reads the input channels of its group.
    out_channel = random_index(gen, c_out, m)
    in_channel = (out_channel // (c_out // groups)) * (c_in // groups) + random_index(gen, c_in // groups, m)
    offsets = torch.stack([random_index(gen, k, m) for k in kernel], dim=1)
    args = (a_pad, d, out_channel, in_channel, offsets, list(stride), list(dilation))
    a64, d64 = as_f64(a_pad, d)

    kernel_flat = offsets[:, 0]
    for k in range(1, len(kernel)):
        kernel_flat = kernel_flat * kernel[k] + offsets[:, k]
    plan, order = sampled.conv_plan(out_channel, in_channel, kernel_flat, kernel)

    def reference(x, y):
        patches = sampled.conv_patches(x, kernel, stride, dilation, out_size)
        ref = torch.empty(batch, m, dtype=torch.float64, device=TRITON_DEVICE)
        ref[:, order] = sampled.sampled_conv_grad_planned(patches, y, plan)  # plan order -> entry order
        return ref

    n_terms = 1
    for p in out_size:
        n_terms *= p
    return args, reference(a64, d64), reference(a64.abs(), d64.abs()), n_terms


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"{len(c[4])}d-P{'x'.join(map(str, c[4]))}-m{c[9]}")
def test_triton_matches_reference(case, dtype):
    args, ref, ref_abs, n = triton_case(case, dtype)
    if case[-1]:
        assert not args[0].is_contiguous() and not args[1].is_contiguous()
    out = registered.triton_sampled_conv_grad(*args)
    assert_within_bound(out.cpu(), ref.cpu(), ref_abs.cpu(), n, dtype)


def test_triton_matches_weight_grad_fp64():
    """All entries of a grouped, strided, dilated Conv2d: equal to per-sample autograd."""
    gen = case_generator("conv-all")
    conv = torch.nn.Conv2d(4, 2, (2, 3), stride=(2, 1), padding=1, dilation=(1, 2), groups=2, bias=False)
    conv = conv.double().to(TRITON_DEVICE)
    x = randn_rounded(gen, 2, 4, 5, 6, dtype=torch.float64)
    d = randn_rounded(gen, 2, 2, *conv(x).shape[2:], dtype=torch.float64)
    expected = torch.stack([torch.autograd.grad(conv(x[b : b + 1]), conv.weight, d[b : b + 1])[0].reshape(-1)
                            for b in range(2)])
    local = torch.arange(conv.weight.numel(), device=TRITON_DEVICE)
    kernel_size, per_out = 6, conv.weight[0].numel()
    out_channel = local // per_out
    in_channel = out_channel * conv.weight.shape[1] + (local % per_out) // kernel_size  # groups_out = 1
    offsets = torch.stack(torch.unravel_index(local % kernel_size, (2, 3)), dim=1)
    a_pad = torch.nn.functional.pad(x, conv._reversed_padding_repeated_twice)
    out = registered.triton_sampled_conv_grad(a_pad, d, out_channel, in_channel, offsets, [2, 1], [1, 2])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_triton_compile():
    check_triton_compiled(registered.triton_sampled_conv_grad, triton_case(TRITON_CASES[2], torch.float32))


@pytest.mark.gpu
@needs_cuda
def test_triton_bf16_gpu():
    check_triton_bf16(registered.triton_sampled_conv_grad, triton_case(TRITON_CASES[2], torch.bfloat16))


# --- opcheck, every backend -----------------------------------------------------------------------------

def opcheck_args(backend):
    """Sample arguments of the backend's registered op."""
    if backend == "triton":
        return triton_case(TRITON_CASES[2], torch.float32)[0]
    device = "cuda" if backend == "cuda" else "cpu"
    g = torch.Generator().manual_seed(17)
    a_pad, d, oc, ic, offsets = conv_problem(g, torch.float32, 2, 4, 6, 2, (3, 2), (2, 1), (1, 2), (9, 8), 5)
    args = (a_pad, d, oc, ic, offsets, [2, 1], [1, 2], torch.zeros(2, 5), None)
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in args)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), pytest.param("cuda", marks=pytest.mark.gpu),
                                     "triton"])
def test_opcheck(backend):
    if backend == "cuda" and not CUDA:
        pytest.skip(CUDA_SKIP)
    op = registered.triton_sampled_conv_grad if backend == "triton" else registered.sampled_conv_grad
    torch.library.opcheck(op.default, opcheck_args(backend))


# --- errors, every backend --------------------------------------------------------------------------------

def valid_args(backend) -> dict:
    """Arguments of a valid call of the backend's entry point, by name."""
    if backend == "triton":
        args, *_ = triton_case(TRITON_CASES[0], torch.float32)
    else:
        g = torch.Generator().manual_seed(19)
        args = (*conv_problem(g, torch.float32, 2, 4, 6, 2, (3, 2), (2, 1), (1, 2), (9, 8), 5), (2, 1), (1, 2))
    return dict(zip(["a_pad", "d", "out_channel", "in_channel", "kernel_offsets", "stride", "dilation"], args))


ERRORS = {  # name: (backend, {argument: its bad value from the valid ones}, exception, message pattern)
    "cpp-offsets-read-outside": ("cpp", dict(kernel_offsets=lambda x: torch.full((5, 2), 3)), RuntimeError,
                                 r"kernel_offsets\[0, 0\] = 3 reads outside a_pad"),
    "cpp-stride-dims": ("cpp", dict(stride=lambda x: (2,)), RuntimeError,
                        r"stride and dilation need one value per spatial dim \(2\)"),
    "triton-dilation-dims": ("triton", dict(stride=lambda x: [1, 1], dilation=lambda x: [1]), ValueError,
                             "stride and dilation"),
    "triton-offsets-out-of-range": ("triton", dict(kernel_offsets=lambda x: x["kernel_offsets"] + 1), IndexError,
                                    r"kernel_offsets\[:, 0\]"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_inputs_name_the_problem(name):
    backend, bad, error, pattern = ERRORS[name]
    if backend == "cpp" and not CPP:
        pytest.skip("the C++ extension with the sampled-gradient CPU kernels is not built")
    args = valid_args(backend)
    args.update({arg: value(args) for arg, value in bad.items()})
    op = registered.triton_sampled_conv_grad if backend == "triton" else ops.sampled_conv_grad
    with pytest.raises(error, match=pattern):
        op(*args.values())


# --- one schema: every backend takes out= / out_columns= ------------------------------------------

# Triton's op returns a new tensor (no out= form), so it is checked by the tests above.
SCHEMA_BACKENDS = [pytest.param(sampled.sampled_conv_grad, id="torch"),
                   pytest.param(ops.sampled_conv_grad, id="cpp", marks=needs_cpp)]


@pytest.mark.parametrize("op", SCHEMA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CONV_CASES)
def test_every_backend_writes_out_columns_only(op, dtype, case):
    """One call form for every backend: F (in entry order) lands at out[:, out_columns],
    the rest of out stays as it was, and out itself is returned."""
    g = case_generator("schema", dtype, case)
    channels, out_channels, groups, kernel, stride, dilation, size = case
    m = 13
    a_pad, d, oc, ic, offsets = conv_problem(g, dtype, 3, channels, out_channels, groups, kernel, stride, dilation,
                                             size, m)
    expected = ref_conv(a_pad, d, oc, ic, offsets, stride, dilation)
    block = torch.full((3, m + 8), -7.0, dtype=dtype)
    columns = torch.randperm(m + 8, generator=g)[:m]
    assert op(a_pad, d, oc, ic, offsets, stride, dilation, out=block, out_columns=columns) is block
    assert_close(block[:, columns], expected, dtype, dtype)
    untouched = torch.ones(m + 8, dtype=torch.bool)
    untouched[columns] = False
    assert bool((block[:, untouched] == -7.0).all())
    # Without out: a new [B, m] tensor, in entry order.
    assert_close(op(a_pad, d, oc, ic, offsets, stride, dilation), expected, dtype, dtype)
