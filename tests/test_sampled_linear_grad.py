"""sampled_linear_grad, on every backend, against a float64 reference:

    out[b, j] = sum_t d[b, t, rows[j]] * a[b, t, cols[j]]      a: [B, T, I], d: [B, T, O]

Backends: plain torch (sampled.py, also the reference's twin), the C++ CPU kernel
(tangent_kernels::sampled_linear_grad), Triton (tangent_kernels::triton_sampled_linear_grad;
through its interpreter without a GPU, so shapes stay small), and the CUDA kernel (`gpu`
tests, skipped without one). Fresh seeded inputs per case: one sample / one token, odd
sizes, tokens past the unrolled width, no entries, strided inputs; in-place writes at
out_columns; opcheck and torch.compile; the error messages. Tolerances: tests/_sampled.py.
"""

from __future__ import annotations

import pytest
import torch

from _sampled import (CPP, CUDA, CUDA_SKIP, DTYPES, TRITON_DEVICE, TRITON_DTYPES, as_f64, assert_close,
                      assert_within_bound, case_generator, linear_problem, needs_cpp, needs_cuda, random_index,
                      randn_rounded, ref_linear, strided, check_triton_bf16, check_triton_compiled)
from tangent_kernels import ops, sampled

registered = torch.ops.tangent_kernels

# --- plain torch (sampled.py) --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(3, 6, 40, 30, 9), (4, 5, 7, 6, 30), (5, 3, 6, 4, 24), (2, 1, 9, 8, 70)],
                         ids=["sparse", "dense", "dense-chunked", "one-token"])
def test_torch_both_branches_match_reference(dtype, shape, monkeypatch):
    """The gather branch and the dense branch (densely sampled weights with tokens) of
    sampled.sampled_linear_grad, the latter also split into chunks of samples."""
    monkeypatch.setattr(sampled, "_CHUNK_ELEMENTS", 2 * shape[2] * shape[3] if shape[0] == 5 else 1 << 25)
    g = torch.Generator().manual_seed(sum(shape))
    a, d, rows, cols = linear_problem(g, dtype, *shape)
    assert_close(sampled.sampled_linear_grad(a, d, rows, cols), ref_linear(a, d, rows, cols), dtype, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_matches_reference(dtype):
    g = torch.Generator().manual_seed(13)
    a, d, rows, cols = linear_problem(g, dtype, 3, 6, 5, 4, 9)
    assert_close(sampled.sampled_linear_grad(a, d, rows, cols), ref_linear(a, d, rows, cols), dtype, dtype)


# --- C++ CPU kernel -----------------------------------------------------------------------------

LINEAR_SHAPES = [  # batch, tokens, in, out, m
    (3, 5, 7, 6, 11),
    (1, 1, 4, 3, 5),     # one sample, one token
    (4, 37, 9, 13, 17),  # odd sizes, tokens past the unrolled width
    (2, 3, 5, 4, 0),     # no entries
]


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_cpp_matches_reference(dtype, shape):
    g = case_generator(dtype, shape)
    a, d, rows, cols = linear_problem(g, dtype, *shape)
    expected = ref_linear(a, d, rows, cols)
    for out_dtype in {dtype, torch.float32 if dtype != torch.float64 else dtype}:
        out = ops.sampled_linear_grad(a, d, rows, cols, out=torch.empty(shape[0], shape[4], dtype=out_dtype))
        assert_close(out, expected, dtype, out_dtype)
    # Non-contiguous a and d (the kernel reads through strides).
    assert_close(ops.sampled_linear_grad(strided(a, g), strided(d, g), rows, cols), expected, dtype, dtype)


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


# --- CUDA kernel (run on a GPU machine; skipped here) -------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_reference(dtype):
    if not CUDA:
        pytest.skip(CUDA_SKIP)
    g = torch.Generator().manual_seed(23)
    a, d, rows, cols = linear_problem(g, dtype, *LINEAR_SHAPES[2])
    got = ops.sampled_linear_grad(a.cuda(), d.cuda(), rows.cuda(), cols.cuda())
    assert_close(got.cpu(), ref_linear(a, d, rows, cols), dtype, dtype)


# --- Triton ---------------------------------------------------------------------------------------

# (B, T, I, O, m, noncontig)
TRITON_CASES = [
    (2, 5, 7, 3, 11, False),
    (1, 1, 4, 6, 1, False),  # one sample, one token, one entry
    (3, 70, 5, 9, 70, True),  # two token tiles, two entry blocks, strided inputs
    (2, 3, 3, 2, 0, False),  # no entries
]


def triton_case(case, dtype):
    """(args, float64 reference, reference on |inputs|, accumulation length)."""
    batch, tokens, n_in, n_out, m, noncontig = case
    gen = case_generator("linear", case, dtype)
    a = randn_rounded(gen, batch, tokens, n_in, dtype=dtype, noncontig=noncontig)
    d = randn_rounded(gen, batch, tokens, n_out, dtype=dtype, noncontig=noncontig)
    rows, cols = random_index(gen, n_out, m, noncontig), random_index(gen, n_in, m, noncontig)
    a64, d64 = as_f64(a, d)
    ref = sampled.sampled_linear_grad(a64, d64, rows, cols)
    ref_abs = sampled.sampled_linear_grad(a64.abs(), d64.abs(), rows, cols)
    return (a, d, rows, cols), ref, ref_abs, tokens


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_reference(case, dtype):
    args, ref, ref_abs, n = triton_case(case, dtype)
    a, d, rows, cols = args
    if case[-1]:
        assert not a.is_contiguous() and not d.is_contiguous() and not rows.is_contiguous()
    out = registered.triton_sampled_linear_grad(*args)
    assert_within_bound(out.cpu(), ref.cpu(), ref_abs.cpu(), n, dtype)


def test_triton_all_entries_fp64():
    """Every weight entry, fp64 accumulate: equals the dense per-sample gradient d^T a."""
    gen = case_generator("linear-all")
    a = randn_rounded(gen, 2, 6, 3, dtype=torch.float64)
    d = randn_rounded(gen, 2, 6, 4, dtype=torch.float64)
    local = torch.arange(4 * 3, device=TRITON_DEVICE)
    out = registered.triton_sampled_linear_grad(a, d, local // 3, local % 3)
    dense = torch.einsum("bto,bti->boi", d, a).reshape(2, -1)
    torch.testing.assert_close(out, dense, rtol=1e-13, atol=1e-13)


def test_triton_compile():
    check_triton_compiled(registered.triton_sampled_linear_grad, triton_case(TRITON_CASES[0], torch.float32))


@pytest.mark.gpu
@needs_cuda
def test_triton_bf16_gpu():
    check_triton_bf16(registered.triton_sampled_linear_grad, triton_case(TRITON_CASES[0], torch.bfloat16))


# --- opcheck, every backend -------------------------------------------------------------------------

def opcheck_args(backend):
    """Sample arguments of the backend's registered op."""
    if backend == "triton":
        return triton_case(TRITON_CASES[0], torch.float32)[0]
    device = "cuda" if backend.startswith("cuda") else "cpu"
    g = torch.Generator().manual_seed(17)
    a, d, rows, cols = linear_problem(g, torch.float32, 2, 3, 4, 5, 6)
    if backend.endswith("-fp64"):  # no out_columns
        args = (a.double(), d.double(), rows, cols, torch.zeros(2, 6, dtype=torch.float64), None)
    else:  # out_columns into a wider block
        args = (a, d, rows, cols, torch.zeros(2, 8), torch.tensor([7, 0, 3, 2, 5, 1]))
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in args)


@pytest.mark.parametrize("backend", [
    pytest.param("cpp", marks=needs_cpp), pytest.param("cpp-fp64", marks=needs_cpp),
    pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("cuda-fp64", marks=pytest.mark.gpu),
    "triton"])
def test_opcheck(backend):
    if backend.startswith("cuda") and not CUDA:
        pytest.skip(CUDA_SKIP)
    op = registered.triton_sampled_linear_grad if backend == "triton" else registered.sampled_linear_grad
    torch.library.opcheck(op.default, opcheck_args(backend))


# --- errors, every backend ------------------------------------------------------------------------

def valid_args(backend) -> dict:
    """Arguments of a valid call of the backend's op, by name."""
    if backend == "triton":
        (a, d, rows, cols), *_ = triton_case(TRITON_CASES[0], torch.float32)
        return dict(a=a, d=d, rows=rows, cols=cols)
    g = torch.Generator().manual_seed(19)
    a, d, rows, cols = linear_problem(g, torch.float32, 2, 3, 4, 5, 6)
    return dict(a=a, d=d, rows=rows, cols=cols, out=torch.zeros(2, 6), out_columns=None)


ERRORS = {  # name: (backend, {argument: its bad value from the valid ones}, exception, message pattern)
    "cpp-cols-out-of-range": ("cpp", dict(cols=lambda x: torch.full((6,), 4)), RuntimeError,
                              r"cols\[\d\] = 4 is outside \[0, 4\)"),
    "cpp-dtype-mismatch": ("cpp", dict(a=lambda x: x["a"].double()), RuntimeError,
                           r"a and d must have the same dtype.*cast one"),
    "cpp-int32-rows": ("cpp", dict(rows=lambda x: x["rows"].int()), RuntimeError,
                       r"rows must be an int64 tensor.*\.long\(\)"),
    "cpp-out-rows": ("cpp", dict(out=lambda x: torch.zeros(3, 6)), RuntimeError,
                     r"out must have one row per sample \(2\)"),
    "cpp-out-too-narrow": ("cpp", dict(out=lambda x: torch.zeros(2, 5)), RuntimeError,
                           r"without out_columns, out needs at least m = 6 columns"),
    "cpp-out_columns-out-of-range": ("cpp", dict(out_columns=lambda x: torch.full((6,), 9)), RuntimeError,
                                     r"out_columns\[0\] = 9 is outside \[0, 6\)"),
    "triton-dtype-mismatch": ("triton", dict(d=lambda x: x["d"].double()), TypeError, "share one dtype"),
    "triton-rows-out-of-range": ("triton", dict(rows=lambda x: x["rows"] + 3), IndexError,
                                 r"rows has values in \[.*\], outside \[0, 3\)"),
    "triton-index-lengths": ("triton", dict(cols=lambda x: x["cols"][:-1]), ValueError, "1-D of one length"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_inputs_name_the_problem(name):
    backend, bad, error, pattern = ERRORS[name]
    if backend == "cpp" and not CPP:
        pytest.skip("the C++ extension with the sampled-gradient CPU kernels is not built")
    args = valid_args(backend)
    args.update({arg: value(args) for arg, value in bad.items()})
    op = registered.triton_sampled_linear_grad if backend == "triton" else registered.sampled_linear_grad
    with pytest.raises(error, match=pattern):
        op(*args.values())


# --- one schema: every backend takes out= / out_columns= ------------------------------------------

# Triton's op returns a new tensor (no out= form), so it is checked by the tests above.
SCHEMA_BACKENDS = [pytest.param(sampled.sampled_linear_grad, id="torch"),
                   pytest.param(ops.sampled_linear_grad, id="cpp", marks=needs_cpp)]


@pytest.mark.parametrize("op", SCHEMA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(3, 5, 7, 6, 11), (4, 5, 7, 6, 30)], ids=["sparse", "dense"])
@pytest.mark.parametrize("consecutive", [False, True], ids=["scattered", "run"])
def test_every_backend_writes_out_columns_only(op, dtype, shape, consecutive):
    """One call form for every backend: F lands at out[:, out_columns], the rest of out
    stays as it was, and out itself is returned."""
    g = case_generator("schema", dtype, shape)
    a, d, rows, cols = linear_problem(g, dtype, *shape)
    width = shape[4] + 9
    block = torch.full((shape[0], width), -7.0, dtype=dtype)
    columns = torch.arange(4, 4 + shape[4]) if consecutive else torch.randperm(width, generator=g)[:shape[4]]
    returned = op(a, d, rows, cols, out=block, out_columns=columns)
    assert returned is block
    assert_close(block[:, columns], ref_linear(a, d, rows, cols), dtype, dtype)
    untouched = torch.ones(width, dtype=torch.bool)
    untouched[columns] = False
    assert bool((block[:, untouched] == -7.0).all())
    # Without out_columns: the first m columns of out.
    block = torch.full((shape[0], width), -7.0, dtype=dtype)
    op(a, d, rows, cols, out=block)
    assert_close(block[:, :shape[4]], ref_linear(a, d, rows, cols), dtype, dtype)
    assert bool((block[:, shape[4]:] == -7.0).all())


@pytest.mark.parametrize("op", SCHEMA_BACKENDS)
def test_every_backend_rejects_a_wrong_out(op):
    g = torch.Generator().manual_seed(3)
    a, d, rows, cols = linear_problem(g, torch.float32, 3, 4, 5, 6, 7)
    with pytest.raises(RuntimeError, match="out_columns must be 1-D of length m = 7"):
        op(a, d, rows, cols, out=torch.zeros(3, 10), out_columns=torch.arange(5))
    with pytest.raises(RuntimeError, match="without out_columns, out needs at least m = 7 columns"):
        op(a, d, rows, cols, out=torch.zeros(3, 4))
