"""What the sampled-gradient op tests share (tests/test_sampled_{linear,conv,embedding}_grad.py):
the backends available here, random problems, float64 references and the two tolerances.

References: float64, gather then sum (independent of every implementation), computed from
the same rounded inputs the op sees, so input rounding cancels.

Two tolerances, each justified where it is defined:
- `assert_close` (the C++ / CUDA kernels and the plain-torch backend): the error relative
  to the largest |reference| entry, from `tolerance(dtype, out_dtype)`;
- `assert_within_bound` (the Triton kernels): an entry-wise bound from the accumulation
  length and the output rounding.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from tangent_kernels import kernels, ops

CPP = ops.has_sampled_kernels("cpu")
needs_cpp = pytest.mark.skipif(not CPP, reason="the C++ extension with the sampled-gradient CPU kernels is not built "
                                               "(pip install --no-build-isolation -e .)")
CUDA = torch.cuda.is_available() and ops.has_sampled_kernels("cuda")
CUDA_SKIP = "needs a CUDA GPU and the extension's CUDA kernels"
# Where the Triton kernels run: CUDA tensors on a GPU, CPU tensors through the interpreter.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not kernels.INTERPRETED else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Triton in the interpreter: fp32 and fp16 only (bf16 dots are wrong there; bf16 runs on a GPU).
TRITON_DTYPES = [torch.float32, torch.float16]


# --- tolerances ------------------------------------------------------------------------------

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


def assert_within_bound(out, ref, ref_abs, n_terms: int, dtype: torch.dtype) -> None:
    """The Triton kernels' entry-wise bound. Their errors are (1) accumulating n terms in
    fp32 (fp64 for fp64): the products of two fp16/bf16 values are exact in fp32, and a sum
    of n terms has error at most n * u_acc * sum|terms|; (2) rounding the result to the
    output dtype: half an ulp, u_out * |result| (or half the subnormal spacing near zero):

        |out - ref| <= u_out * |ref| + 2 (n + 1) u_acc * sum|terms| + tiny_out

    with sum|terms| the reference run on |inputs| (the factor 2 absorbs second-order terms).
    """
    assert out.dtype == dtype and out.shape == ref.shape
    info = torch.finfo(dtype)
    u_out = info.eps / 2
    u_acc = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps / 2
    tiny_out = info.smallest_normal * info.eps
    bound = u_out * ref.abs() + 2 * (n_terms + 1) * u_acc * ref_abs + tiny_out
    err = (out.double() - ref).abs()
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"error exceeds the {dtype} bound by {worst:.3g}x (max abs error {err.max().item():.3g})"


# --- inputs ----------------------------------------------------------------------------------


def check_triton_compiled(op, case) -> None:
    """A Triton op traced by torch.compile (fullgraph, aot_eager) gives what it gives eagerly,
    within the float32 bound. ``case``: (args, ref, ref_abs, n) of the op's triton_case."""
    args, ref, ref_abs, n = case
    compiled = torch.compile(lambda *xs: op(*xs) * 2, backend="aot_eager", fullgraph=True)
    out = compiled(*args) / 2
    assert_within_bound(out.cpu(), ref.cpu(), ref_abs.cpu(), n, torch.float32)


def check_triton_bf16(op, case) -> None:
    """A Triton op on bf16 inputs within the bf16 bound (GPU)."""
    args, ref, ref_abs, n = case
    out = op(*args)
    assert_within_bound(out.cpu(), ref.cpu(), ref_abs.cpu(), n, torch.bfloat16)


def case_generator(*key) -> torch.Generator:
    """A fresh generator per case, seeded from the case's parameters."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def strided(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The same values in a non-contiguous layout (a transposed copy viewed back)."""
    return t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() > 1 else t


def randn_rounded(gen, *shape, dtype, noncontig=False) -> torch.Tensor:
    """Values rounded to dtype, on TRITON_DEVICE; noncontig lays them out transposed and strided."""
    if not noncontig:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(TRITON_DEVICE)
    # Every other entry of a reversed-dims tensor: strided in every dim, no unit stride.
    wide = torch.randn(*reversed(shape[:-1]), 2 * shape[-1], generator=gen, dtype=torch.float64)
    wide = wide.to(dtype).to(TRITON_DEVICE)
    return wide[..., ::2].permute(*reversed(range(len(shape) - 1)), len(shape) - 1)


def random_index(gen, high: int, m: int, noncontig=False) -> torch.Tensor:
    if noncontig:
        return torch.randint(0, high, (2 * m,), generator=gen).to(TRITON_DEVICE)[::2]
    return torch.randint(0, high, (m,), generator=gen).to(TRITON_DEVICE)


def as_f64(*tensors):
    return [t.double() for t in tensors]


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


# --- references (float64, gather then sum: independent of every implementation) ------------

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
