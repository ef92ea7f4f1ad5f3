"""The compiled sampled-gradient ops (tangent_kernels::sampled_{linear,conv,embedding}_grad):
each against an independent plain-torch gather-and-sum reference computed in float64 from
the same (rounded) inputs, on fresh random shapes, every dtype, strided inputs, odd
sizes, groups/depthwise, 1-sample and 1-position cases; in-place writes at out_columns;
torch.library.opcheck; the error messages. The plain-torch backend (sampled.py) is run
against the same reference; Triton's ops are covered in tests/test_triton_sampled.py.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from tangent_kernels import ops, sampled

CPP = ops.has_sampled_kernels("cpu")
needs_cpp = pytest.mark.skipif(not CPP, reason="the C++ extension with the sampled-gradient CPU kernels is not built "
                                               "(pip install --no-build-isolation -e .)")
CUDA = torch.cuda.is_available() and ops.has_sampled_kernels("cuda")

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def tolerance(dtype: torch.dtype, out_dtype: torch.dtype) -> float:
    """Relative (to the largest |reference|) error allowed.

    Inputs are rounded before both sides see them, so only the summation and the final
    rounding differ: fp64 accumulation of <= ~1e3 terms stays ~1e-13; fp32 accumulation
    (all other dtypes) ~1e3 * 6e-8 < 1e-4 worst case, typically ~1e-6; then one rounding
    into out's dtype (bf16: 2^-8, fp16: 2^-11 relative). Sums of mixed signs can cancel,
    hence the scale is the largest entry, not each entry.
    """
    accumulate = 1e-12 if dtype == torch.float64 else 1e-5
    rounding = {torch.float64: 0.0, torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}[out_dtype]
    return accumulate + 2 * rounding


def assert_close(result: torch.Tensor, expected: torch.Tensor, dtype, out_dtype):
    assert result.shape == expected.shape
    if expected.numel() == 0:
        return
    scale = expected.abs().max().clamp_min(1e-30)
    error = float((result.double() - expected).abs().max() / scale)
    assert error <= tolerance(dtype, out_dtype), (error, dtype, out_dtype)


def strided(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The same values in a non-contiguous layout (a transposed copy viewed back)."""
    return t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() > 1 else t


# --- references (float64, gather then sum: independent of both implementations) -------

def ref_linear(a, d, rows, cols):
    return torch.einsum("btm,btm->bm", d.double()[:, :, rows], a.double()[:, :, cols])


def ref_conv(a_pad, d, out_channel, in_channel, offsets, stride, dilation):
    nd = a_pad.dim() - 2
    out_size = d.shape[2:]
    columns = []
    for j in range(out_channel.numel()):
        index = [slice(None), int(in_channel[j])]
        for i in range(nd):
            start = int(offsets[j, i]) * dilation[i]
            index.append(slice(start, start + (out_size[i] - 1) * stride[i] + 1, stride[i]))
        window = a_pad.double()[tuple(index)]
        columns.append((window * d.double()[:, int(out_channel[j])]).flatten(1).sum(1))
    return torch.stack(columns, dim=1) if columns else torch.zeros(d.shape[0], 0, dtype=torch.float64)


def ref_embedding(tokens, d, rows, cols, padding_idx):
    hits = (tokens[:, :, None] == rows[None, None, :]).double()
    if padding_idx is not None:
        hits[:, :, rows == padding_idx] = 0
    return torch.einsum("btm,btm->bm", hits, d.double()[:, :, cols])


# --- random problems -------------------------------------------------------------------

def linear_problem(g, dtype, batch, tokens, n_in, n_out, m):
    a = torch.randn(batch, tokens, n_in, generator=g).to(dtype)
    d = torch.randn(batch, tokens, n_out, generator=g).to(dtype)
    rows = torch.randint(0, n_out, (m,), generator=g)
    cols = torch.randint(0, n_in, (m,), generator=g)
    return a, d, rows, cols


def conv_problem(g, dtype, batch, channels, out_channels, groups, kernel, stride, dilation, size, m):
    """a_pad and d shaped as a real conv would give them, entries (o, c, k) a grouped
    conv's weight really has: c lies in o's group."""
    nd = len(kernel)
    out_size = [(s - dl * (k - 1) - 1) // st + 1 for s, k, st, dl in zip(size, kernel, stride, dilation)]
    a_pad = torch.randn(batch, channels, *size, generator=g).to(dtype)
    d = torch.randn(batch, out_channels, *out_size, generator=g).to(dtype)
    out_channel = torch.randint(0, out_channels, (m,), generator=g)
    per_group_in, per_group_out = channels // groups, out_channels // groups
    in_channel = (out_channel // per_group_out) * per_group_in + torch.randint(0, per_group_in, (m,), generator=g)
    offsets = torch.stack([torch.randint(0, k, (m,), generator=g) for k in kernel], dim=1).reshape(m, nd)
    return a_pad, d, out_channel, in_channel, offsets


LINEAR_SHAPES = [  # batch, tokens, in, out, m
    (3, 5, 7, 6, 11),
    (1, 1, 4, 3, 5),     # one sample, one token
    (4, 37, 9, 13, 17),  # odd sizes, tokens past the unrolled width
    (2, 3, 5, 4, 0),     # no entries
]

CONV_CASES = [  # channels, out_channels, groups, kernel, stride, dilation, size
    (3, 4, 1, (3,), (1,), (1,), (11,)),                      # conv1d
    (4, 6, 2, (3, 2), (2, 1), (1, 2), (9, 8)),               # grouped, strided, dilated, odd kernel
    (5, 5, 5, (3, 3), (1, 1), (1, 1), (7, 6)),               # depthwise
    (3, 4, 1, (3, 3), (1, 1), (1, 1), (3, 3)),               # one output position
    (2, 3, 1, (2, 3, 2), (1, 2, 1), (2, 1, 1), (5, 7, 4)),   # conv3d
    (6, 4, 2, (1, 1), (2, 2), (1, 1), (6, 5)),               # 1x1 strided (a resnet downsample)
]


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_cpp_linear_matches_reference(dtype, shape):
    g = torch.Generator().manual_seed(zlib.crc32(repr((dtype, shape)).encode()))
    a, d, rows, cols = linear_problem(g, dtype, *shape)
    expected = ref_linear(a, d, rows, cols)
    for out_dtype in {dtype, torch.float32 if dtype != torch.float64 else dtype}:
        out = ops.sampled_linear_grad(a, d, rows, cols, out=torch.empty(shape[0], shape[4], dtype=out_dtype))
        assert_close(out, expected, dtype, out_dtype)
    # Non-contiguous a and d (the kernel reads through strides).
    assert_close(ops.sampled_linear_grad(strided(a, g), strided(d, g), rows, cols), expected, dtype, dtype)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_cpp_conv_matches_reference(dtype, case):
    g = torch.Generator().manual_seed(zlib.crc32(repr((dtype, case)).encode()))
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


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_cpp_embedding_matches_reference(dtype, padding_idx):
    g = torch.Generator().manual_seed(7 + (padding_idx or 0))
    for batch, length, vocab, dim, m in ((3, 9, 6, 5, 14), (1, 1, 3, 2, 4)):
        tokens = torch.randint(0, vocab, (batch, length), generator=g)
        d = torch.randn(batch, length, dim, generator=g).to(dtype)
        rows = torch.randint(0, vocab, (m,), generator=g)
        rows[0] = 2  # the padding row is always among the entries
        cols = torch.randint(0, dim, (m,), generator=g)
        expected = ref_embedding(tokens, d, rows, cols, padding_idx)
        got = ops.sampled_embedding_grad(tokens.int(), d, rows, cols, padding_idx)
        assert_close(got, expected, dtype, dtype)
        assert_close(ops.sampled_embedding_grad(tokens, strided(d, g), rows, cols, padding_idx), expected, dtype, dtype)


@needs_cpp
def test_cpp_writes_only_out_columns_of_a_strided_block():
    """out_columns address the caller's feature block directly; other entries stay as they were."""
    g = torch.Generator().manual_seed(11)
    a, d, rows, cols = linear_problem(g, torch.float32, 3, 4, 5, 6, 7)
    block = torch.full((10, 3), -5.0).T  # [3, 10], column-major: strides (1, 3)
    columns = torch.randperm(10, generator=g)[:7]
    ops.sampled_linear_grad(a, d, rows, cols, out=block, out_columns=columns)
    assert_close(block[:, columns], ref_linear(a, d, rows, cols), torch.float32, torch.float32)
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[columns] = False
    assert bool((block[:, untouched] == -5.0).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(3, 6, 40, 30, 9), (4, 5, 7, 6, 30), (5, 3, 6, 4, 24), (2, 1, 9, 8, 70)],
                         ids=["sparse", "dense", "dense-chunked", "one-token"])
def test_torch_linear_both_branches_match_reference(dtype, shape, monkeypatch):
    """The gather branch and the dense branch (densely sampled weights with tokens) of
    sampled.sampled_linear_grad, the latter also split into chunks of samples."""
    monkeypatch.setattr(sampled, "_CHUNK_ELEMENTS", 2 * shape[2] * shape[3] if shape[0] == 5 else 1 << 25)
    g = torch.Generator().manual_seed(sum(shape))
    a, d, rows, cols = linear_problem(g, dtype, *shape)
    assert_close(sampled.sampled_linear_grad(a, d, rows, cols), ref_linear(a, d, rows, cols), dtype, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_backend_matches_reference(dtype):
    """sampled.py (the "torch" backend) against the same references."""
    g = torch.Generator().manual_seed(13)
    a, d, rows, cols = linear_problem(g, dtype, 3, 6, 5, 4, 9)
    assert_close(sampled.sampled_linear_grad(a, d, rows, cols), ref_linear(a, d, rows, cols), dtype, dtype)
    channels, out_channels, groups, kernel, stride, dilation, size = CONV_CASES[1]
    a_pad, d, oc, ic, offsets = conv_problem(g, dtype, 2, channels, out_channels, groups, kernel, stride, dilation,
                                             size, 12)
    flat = offsets[:, 0] * kernel[1] + offsets[:, 1]
    plan, order = sampled.conv_plan(oc, ic, flat, kernel)
    patches = sampled.conv_patches(a_pad, kernel, stride, dilation, d.shape[2:])
    expected = ref_conv(a_pad, d, oc, ic, offsets, stride, dilation)[:, order]
    assert_close(sampled.sampled_conv_grad(patches, d, plan), expected, dtype, dtype)


# --- opcheck ------------------------------------------------------------------------------

def opcheck_samples(device="cpu"):
    g = torch.Generator().manual_seed(17)
    a, d, rows, cols = linear_problem(g, torch.float32, 2, 3, 4, 5, 6)
    linear = (a, d, rows, cols, torch.zeros(2, 8), torch.tensor([7, 0, 3, 2, 5, 1]))
    linear_plain = (a.double(), d.double(), rows, cols, torch.zeros(2, 6, dtype=torch.float64), None)
    a_pad, dc, oc, ic, offsets = conv_problem(g, torch.float32, 2, 4, 6, 2, (3, 2), (2, 1), (1, 2), (9, 8), 5)
    conv = (a_pad, dc, oc, ic, offsets, [2, 1], [1, 2], torch.zeros(2, 5), None)
    tokens = torch.randint(0, 5, (2, 4), generator=g)
    embedding = (tokens, torch.randn(2, 4, 3, generator=g), torch.tensor([0, 4, 1]), torch.tensor([2, 0, 1]), 1,
                 torch.zeros(2, 3), None)
    samples = [("sampled_linear_grad", linear), ("sampled_linear_grad", linear_plain),
               ("sampled_conv_grad", conv), ("sampled_embedding_grad", embedding)]
    return [(name, tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in args))
            for name, args in samples]


@needs_cpp
@pytest.mark.parametrize("index", range(4))
def test_opcheck_cpu(index):
    name, args = opcheck_samples()[index]
    torch.library.opcheck(getattr(torch.ops.tangent_kernels, name).default, args)


# --- errors ---------------------------------------------------------------------------------

@needs_cpp
def test_errors_name_the_problem():
    g = torch.Generator().manual_seed(19)
    a, d, rows, cols = linear_problem(g, torch.float32, 2, 3, 4, 5, 6)
    op = torch.ops.tangent_kernels.sampled_linear_grad
    out = torch.zeros(2, 6)
    with pytest.raises(RuntimeError, match=r"cols\[\d\] = 4 is outside \[0, 4\)"):
        op(a, d, rows, torch.full((6,), 4), out, None)
    with pytest.raises(RuntimeError, match=r"a and d must have the same dtype.*cast one"):
        op(a.double(), d, rows, cols, out, None)
    with pytest.raises(RuntimeError, match=r"rows must be an int64 tensor.*\.long\(\)"):
        op(a, d, rows.int(), cols, out, None)
    with pytest.raises(RuntimeError, match=r"out must have one row per sample \(2\)"):
        op(a, d, rows, cols, torch.zeros(3, 6), None)
    with pytest.raises(RuntimeError, match=r"without out_columns, out needs at least m = 6 columns"):
        op(a, d, rows, cols, torch.zeros(2, 5), None)
    with pytest.raises(RuntimeError, match=r"out_columns\[0\] = 9 is outside \[0, 6\)"):
        op(a, d, rows, cols, out, torch.full((6,), 9))
    a_pad, dc, oc, ic, offsets = conv_problem(g, torch.float32, 2, 4, 6, 2, (3, 2), (2, 1), (1, 2), (9, 8), 5)
    with pytest.raises(RuntimeError, match=r"kernel_offsets\[0, 0\] = 3 reads outside a_pad"):
        ops.sampled_conv_grad(a_pad, dc, oc, ic, torch.full((5, 2), 3), (2, 1), (1, 2))
    with pytest.raises(RuntimeError, match=r"stride and dilation need one value per spatial dim \(2\)"):
        ops.sampled_conv_grad(a_pad, dc, oc, ic, offsets, (2,), (1, 2))


# --- GPU (run on a GPU machine; skipped here) -----------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_cuda_conv_and_linear_match_reference(dtype, case):
    if not CUDA:
        pytest.skip("needs a CUDA GPU and the extension's CUDA kernels")
    g = torch.Generator().manual_seed(23)
    channels, out_channels, groups, kernel, stride, dilation, size = case
    a_pad, d, oc, ic, offsets = conv_problem(g, dtype, 3, channels, out_channels, groups, kernel, stride, dilation,
                                             size, 29)
    expected = ref_conv(a_pad, d, oc, ic, offsets, stride, dilation)
    got = ops.sampled_conv_grad(a_pad.cuda(), d.cuda(), oc.cuda(), ic.cuda(), offsets.cuda(), stride, dilation)
    assert_close(got.cpu(), expected, dtype, dtype)
    a, dl, rows, cols = linear_problem(g, dtype, *LINEAR_SHAPES[2])
    got = ops.sampled_linear_grad(a.cuda(), dl.cuda(), rows.cuda(), cols.cuda())
    assert_close(got.cpu(), ref_linear(a, dl, rows, cols), dtype, dtype)
    tokens = torch.randint(0, 6, (3, 9), generator=g)
    de = torch.randn(3, 9, 5, generator=g).to(dtype)
    rows, cols = torch.randint(0, 6, (14,), generator=g), torch.randint(0, 5, (14,), generator=g)
    got = ops.sampled_embedding_grad(tokens.cuda(), de.cuda(), rows.cuda(), cols.cuda(), 2)
    assert_close(got.cpu(), ref_embedding(tokens, de, rows, cols, 2), dtype, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(4))
def test_opcheck_cuda(index):
    if not CUDA:
        pytest.skip("needs a CUDA GPU and the extension's CUDA kernels")
    name, args = opcheck_samples("cuda")[index]
    torch.library.opcheck(getattr(torch.ops.tangent_kernels, name).default, args)
