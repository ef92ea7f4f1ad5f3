"""Triton sampled-gradient ops (tangent_kernels/kernels/) against sampled.py in float64.

Without a GPU the kernels run on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1, set below before anything imports triton); shapes stay small
because the interpreter is slow. With a GPU the same tests run the compiled kernels on
CUDA tensors, and the bf16 test runs too (bf16 is not checked in the interpreter).

Tolerance, per dtype, from a bound rather than a fixed table. The reference is
computed in float64 *from the same rounded inputs*, so input rounding cancels and the
kernel's only errors are (1) accumulating n terms in fp32 (fp64 for fp64): the
products of two fp16/bf16 values are exact in fp32, and a sum of n terms has error at
most n * u_acc * sum|terms|; (2) rounding the result to the output dtype: half an ulp,
u_out * |result| (or half the subnormal spacing near zero). So

    |out - ref| <= u_out * |ref| + 2 (n + 1) u_acc * sum|terms| + tiny_out

with sum|terms| the reference run on |inputs| (the factor 2 absorbs second-order terms).
"""

from __future__ import annotations

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tangent_kernels import kernels, sampled  # noqa: E402

ops = torch.ops.tangent_kernels
DEVICE = "cuda" if torch.cuda.is_available() and not kernels.INTERPRETED else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _generator(*key) -> torch.Generator:
    """A fresh generator per case, seeded from the case's parameters."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(gen, *shape, dtype, noncontig=False) -> torch.Tensor:
    """Values rounded to dtype; noncontig lays them out transposed and strided."""
    if not noncontig:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    # Every other entry of a reversed-dims tensor: strided in every dim, no unit stride.
    wide = torch.randn(*reversed(shape[:-1]), 2 * shape[-1], generator=gen, dtype=torch.float64)
    wide = wide.to(dtype).to(DEVICE)
    return wide[..., ::2].permute(*reversed(range(len(shape) - 1)), len(shape) - 1)


def _index(gen, high: int, m: int, noncontig=False) -> torch.Tensor:
    if noncontig:
        return torch.randint(0, high, (2 * m,), generator=gen).to(DEVICE)[::2]
    return torch.randint(0, high, (m,), generator=gen).to(DEVICE)


def _assert_within_bound(out, ref, ref_abs, n_terms: int, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    info = torch.finfo(dtype)
    u_out = info.eps / 2
    u_acc = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps / 2
    tiny_out = info.smallest_normal * info.eps
    bound = u_out * ref.abs() + 2 * (n_terms + 1) * u_acc * ref_abs + tiny_out
    err = (out.double() - ref).abs()
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"error exceeds the {dtype} bound by {worst:.3g}x (max abs error {err.max().item():.3g})"


def _f64(*tensors):
    return [t.double() for t in tensors]


# --- sampled_linear_grad -------------------------------------------------------------

# (B, T, I, O, m, noncontig)
LINEAR_CASES = [
    (2, 5, 7, 3, 11, False),
    (1, 1, 4, 6, 1, False),  # one sample, one token, one entry
    (3, 70, 5, 9, 70, True),  # two token tiles, two entry blocks, strided inputs
    (2, 3, 3, 2, 0, False),  # no entries
]


def _linear_case(case, dtype):
    batch, tokens, n_in, n_out, m, noncontig = case
    gen = _generator("linear", case, dtype)
    a = _randn(gen, batch, tokens, n_in, dtype=dtype, noncontig=noncontig)
    d = _randn(gen, batch, tokens, n_out, dtype=dtype, noncontig=noncontig)
    rows, cols = _index(gen, n_out, m, noncontig), _index(gen, n_in, m, noncontig)
    a64, d64 = _f64(a, d)
    ref = sampled.sampled_linear_grad(a64, d64, rows, cols)
    ref_abs = sampled.sampled_linear_grad(a64.abs(), d64.abs(), rows, cols)
    return (a, d, rows, cols), ref, ref_abs, tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", LINEAR_CASES)
def test_sampled_linear_grad(case, dtype):
    args, ref, ref_abs, n = _linear_case(case, dtype)
    a, d, rows, cols = args
    if case[-1]:
        assert not a.is_contiguous() and not d.is_contiguous() and not rows.is_contiguous()
    out = ops.triton_sampled_linear_grad(*args)
    _assert_within_bound(out.cpu(), ref.cpu(), ref_abs.cpu(), n, dtype)


def test_sampled_linear_grad_all_entries_fp64():
    """Every weight entry, fp64 accumulate: equals the dense per-sample gradient d^T a."""
    gen = _generator("linear-all")
    a = _randn(gen, 2, 6, 3, dtype=torch.float64)
    d = _randn(gen, 2, 6, 4, dtype=torch.float64)
    local = torch.arange(4 * 3, device=DEVICE)
    out = ops.triton_sampled_linear_grad(a, d, local // 3, local % 3)
    dense = torch.einsum("bto,bti->boi", d, a).reshape(2, -1)
    torch.testing.assert_close(out, dense, rtol=1e-13, atol=1e-13)


# --- sampled_conv_grad ---------------------------------------------------------------

# (B, C, O, groups, out positions P, kernel K, stride, dilation, slack, m, noncontig)
CONV_CASES = [
    (2, 3, 4, 1, (5,), (3,), (1,), (1,), 0, 13, False),
    (1, 2, 2, 1, (1,), (2,), (2,), (3,), 1, 1, False),  # one output position, one entry
    (2, 4, 6, 2, (3, 5), (3, 2), (2, 1), (1, 2), 1, 40, False),  # groups, stride, dilation
    (3, 4, 4, 4, (4, 4), (3, 3), (1, 1), (1, 1), 0, 17, True),  # depthwise, channels-last-like
    (2, 3, 5, 1, (9, 8), (2, 2), (1, 1), (1, 1), 0, 70, False),  # two position tiles, two blocks
    (2, 2, 3, 1, (2, 3, 2), (2, 1, 2), (1, 2, 2), (2, 1, 3), 1, 19, True),  # 3-d
]


def _conv_case(case, dtype):
    batch, c_in, c_out, groups, out_size, kernel, stride, dilation, slack, m, noncontig = case
    gen = _generator("conv", case, dtype)
    # Smallest padded input the geometry needs, plus slack (stride not dividing it).
    in_size = [(p - 1) * s + (k - 1) * dl + 1 + slack for p, k, s, dl in zip(out_size, kernel, stride, dilation)]
    a_pad = _randn(gen, batch, c_in, *in_size, dtype=dtype, noncontig=noncontig)
    d = _randn(gen, batch, c_out, *out_size, dtype=dtype, noncontig=noncontig)
    # Groups resolved as ConvRule does: output channel o reads the input channels of its group.
    out_channel = _index(gen, c_out, m)
    in_channel = (out_channel // (c_out // groups)) * (c_in // groups) + _index(gen, c_in // groups, m)
    offsets = torch.stack([_index(gen, k, m) for k in kernel], dim=1)
    args = (a_pad, d, out_channel, in_channel, offsets, list(stride), list(dilation))
    a64, d64 = _f64(a_pad, d)

    kernel_flat = offsets[:, 0]
    for k in range(1, len(kernel)):
        kernel_flat = kernel_flat * kernel[k] + offsets[:, k]
    plan, order = sampled.conv_plan(out_channel, in_channel, kernel_flat, kernel)

    def reference(x, y):
        patches = sampled.conv_patches(x, kernel, stride, dilation, out_size)
        ref = torch.empty(batch, m, dtype=torch.float64, device=DEVICE)
        ref[:, order] = sampled.sampled_conv_grad(patches, y, plan)  # plan order -> entry order
        return ref

    n_terms = 1
    for p in out_size:
        n_terms *= p
    return args, reference(a64, d64), reference(a64.abs(), d64.abs()), n_terms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{len(c[4])}d-P{'x'.join(map(str, c[4]))}-m{c[9]}")
def test_sampled_conv_grad(case, dtype):
    args, ref, ref_abs, n = _conv_case(case, dtype)
    if case[-1]:
        assert not args[0].is_contiguous() and not args[1].is_contiguous()
    out = ops.triton_sampled_conv_grad(*args)
    _assert_within_bound(out.cpu(), ref.cpu(), ref_abs.cpu(), n, dtype)


def test_sampled_conv_grad_matches_weight_grad_fp64():
    """All entries of a grouped, strided, dilated Conv2d: equal to per-sample autograd."""
    gen = _generator("conv-all")
    conv = torch.nn.Conv2d(4, 2, (2, 3), stride=(2, 1), padding=1, dilation=(1, 2), groups=2, bias=False)
    conv = conv.double().to(DEVICE)
    x = _randn(gen, 2, 4, 5, 6, dtype=torch.float64)
    d = _randn(gen, 2, 2, *conv(x).shape[2:], dtype=torch.float64)
    expected = torch.stack([torch.autograd.grad(conv(x[b : b + 1]), conv.weight, d[b : b + 1])[0].reshape(-1)
                            for b in range(2)])
    local = torch.arange(conv.weight.numel(), device=DEVICE)
    kernel_size, per_out = 6, conv.weight[0].numel()
    out_channel = local // per_out
    in_channel = out_channel * conv.weight.shape[1] + (local % per_out) // kernel_size  # groups_out = 1
    offsets = torch.stack(torch.unravel_index(local % kernel_size, (2, 3)), dim=1)
    a_pad = torch.nn.functional.pad(x, conv._reversed_padding_repeated_twice)
    out = ops.triton_sampled_conv_grad(a_pad, d, out_channel, in_channel, offsets, [2, 1], [1, 2])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# --- sampled_embedding_grad ----------------------------------------------------------

# (B, T, vocabulary V, E, m, padding_idx, noncontig)
EMBEDDING_CASES = [
    (2, 9, 5, 4, 13, None, False),
    (2, 9, 5, 4, 13, 2, False),
    (1, 1, 3, 2, 1, None, False),  # one sample, one token, one entry
    (3, 70, 6, 5, 70, 0, True),  # two token tiles, two entry blocks, strided inputs
]


def _embedding_case(case, dtype):
    batch, length, vocab, dim, m, padding_idx, noncontig = case
    gen = _generator("embedding", case, dtype)
    tokens = torch.randint(0, vocab, (batch, length), generator=gen)
    if noncontig:
        tokens = torch.randint(0, vocab, (length, 2 * batch), generator=gen)[:, ::2].t()
    tokens = tokens.to(DEVICE)
    if padding_idx is not None:
        tokens[:, 0] = padding_idx  # the padding row occurs, and is sampled below
    d = _randn(gen, batch, length, dim, dtype=dtype, noncontig=noncontig)
    rows, cols = _index(gen, vocab, m, noncontig), _index(gen, dim, m, noncontig)
    if padding_idx is not None:
        rows[0] = padding_idx
    (d64,) = _f64(d)
    ref = sampled.sampled_embedding_grad(tokens, d64, rows, cols, padding_idx)
    ref_abs = sampled.sampled_embedding_grad(tokens, d64.abs(), rows, cols, padding_idx)
    return (tokens, d, rows, cols, padding_idx), ref, ref_abs, length


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", EMBEDDING_CASES)
def test_sampled_embedding_grad(case, dtype):
    args, ref, ref_abs, n = _embedding_case(case, dtype)
    out = ops.triton_sampled_embedding_grad(*args)
    _assert_within_bound(out.cpu(), ref.cpu(), ref_abs.cpu(), n, dtype)
    if case[5] is not None:
        assert (out[:, 0] == 0).all(), "the padding row must get no gradient"


def test_sampled_embedding_grad_matches_weight_grad_fp64():
    """All entries of an nn.Embedding with padding_idx: equal to per-sample autograd."""
    gen = _generator("embedding-all")
    emb = torch.nn.Embedding(5, 3, padding_idx=1).double().to(DEVICE)
    tokens = torch.randint(0, 5, (2, 7), generator=gen).to(DEVICE)
    d = _randn(gen, 2, 7, 3, dtype=torch.float64)
    expected = torch.stack([torch.autograd.grad(emb(tokens[b]), emb.weight, d[b])[0].reshape(-1) for b in range(2)])
    local = torch.arange(15, device=DEVICE)
    out = ops.triton_sampled_embedding_grad(tokens, d, local // 3, local % 3, 1)
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)


# --- all ops: opcheck, torch.compile, bf16 on a GPU, errors, availability --------------

SAMPLES = {
    "triton_sampled_linear_grad": lambda dtype: _linear_case(LINEAR_CASES[0], dtype),
    "triton_sampled_conv_grad": lambda dtype: _conv_case(CONV_CASES[2], dtype),
    "triton_sampled_embedding_grad": lambda dtype: _embedding_case(EMBEDDING_CASES[1], dtype),
}


def test_available():
    assert kernels.available(), kernels.unavailable_reason()
    assert kernels.unavailable_reason() is None


@pytest.mark.parametrize("name", SAMPLES)
def test_opcheck(name):
    args = SAMPLES[name](torch.float32)[0]
    torch.library.opcheck(getattr(ops, name).default, args)


@pytest.mark.parametrize("name", SAMPLES)
def test_compile(name):
    args, ref, ref_abs, n = SAMPLES[name](torch.float32)
    op = getattr(ops, name)
    compiled = torch.compile(lambda *xs: op(*xs) * 2, backend="aot_eager", fullgraph=True)
    out = compiled(*args) / 2
    _assert_within_bound(out.cpu(), ref.cpu(), ref_abs.cpu(), n, torch.float32)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", SAMPLES)
def test_bf16_gpu(name):
    args, ref, ref_abs, n = SAMPLES[name](torch.bfloat16)
    out = getattr(ops, name)(*args)
    _assert_within_bound(out.cpu(), ref.cpu(), ref_abs.cpu(), n, torch.bfloat16)


def test_bad_inputs_raise_at_the_boundary():
    (a, d, rows, cols), *_ = _linear_case(LINEAR_CASES[0], torch.float32)
    with pytest.raises(TypeError, match="share one dtype"):
        ops.triton_sampled_linear_grad(a, d.double(), rows, cols)
    with pytest.raises(IndexError, match=r"rows has values in \[.*\], outside \[0, 3\)"):
        ops.triton_sampled_linear_grad(a, d, rows + 3, cols)
    with pytest.raises(ValueError, match="1-D of one length"):
        ops.triton_sampled_linear_grad(a, d, rows, cols[:-1])
    args, *_ = _conv_case(CONV_CASES[0], torch.float32)
    with pytest.raises(ValueError, match="stride and dilation"):
        ops.triton_sampled_conv_grad(*args[:5], [1, 1], [1])
    a_pad, d, o, c, k, stride, dilation = args
    with pytest.raises(IndexError, match=r"kernel_offsets\[:, 0\]"):
        ops.triton_sampled_conv_grad(a_pad, d, o, c, k + 1, stride, dilation)
    (tokens, d, rows, cols, pad), *_ = _embedding_case(EMBEDDING_CASES[0], torch.float32)
    with pytest.raises(TypeError, match="tokens must be an integer"):
        ops.triton_sampled_embedding_grad(tokens.float(), d, rows, cols, pad)
