"""sampled_embedding_grad, on every backend, against a float64 reference: the per-sample
gradient of an embedding table at sampled entries (row r_j = a token id, column c_j),

    out[b, j] = sum_t [tokens[b, t] == r_j] * d[b, t, c_j]     (0 for the padding row)

with tokens: [B, T] integers, d: [B, T, E]. Backends: plain torch (sampled.py), the C++
CPU kernel (tangent_kernels::sampled_embedding_grad), Triton
(tangent_kernels::triton_sampled_embedding_grad; through its interpreter without a GPU)
and the CUDA kernel (`gpu` tests, skipped without one). Cases: padding_idx or none, one
sample / one token / one entry, strided inputs; an every-entry check against autograd;
opcheck, torch.compile, the errors. Tolerances: tests/_sampled.py.
"""

from __future__ import annotations

import pytest
import torch

from _sampled import (CUDA, CUDA_SKIP, DTYPES, TRITON_DEVICE, TRITON_DTYPES, as_f64, assert_close,
                      assert_within_bound, case_generator, needs_cpp, needs_cuda, random_index, randn_rounded,
                      ref_embedding, strided, check_triton_bf16, check_triton_compiled)
from tangent_kernels import ops, sampled

registered = torch.ops.tangent_kernels


def embedding_problem(g, dtype, batch, length, vocab, dim, m):
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    d = torch.randn(batch, length, dim, generator=g).to(dtype)
    rows = torch.randint(0, vocab, (m,), generator=g)
    rows[0] = 2  # the padding row (when there is one) is always among the entries
    cols = torch.randint(0, dim, (m,), generator=g)
    return tokens, d, rows, cols


# --- plain torch (sampled.py) and the C++ CPU kernel ---------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_torch_matches_reference(dtype, padding_idx):
    g = torch.Generator().manual_seed(13 + (padding_idx or 0))
    tokens, d, rows, cols = embedding_problem(g, dtype, 3, 9, 6, 5, 14)
    got = sampled.sampled_embedding_grad(tokens, d, rows, cols, padding_idx)
    assert_close(got, ref_embedding(tokens, d, rows, cols, padding_idx), dtype, dtype)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_cpp_matches_reference(dtype, padding_idx):
    g = torch.Generator().manual_seed(7 + (padding_idx or 0))
    for batch, length, vocab, dim, m in ((3, 9, 6, 5, 14), (1, 1, 3, 2, 4)):
        tokens, d, rows, cols = embedding_problem(g, dtype, batch, length, vocab, dim, m)
        expected = ref_embedding(tokens, d, rows, cols, padding_idx)
        got = ops.sampled_embedding_grad(tokens.int(), d, rows, cols, padding_idx)
        assert_close(got, expected, dtype, dtype)
        assert_close(ops.sampled_embedding_grad(tokens, strided(d, g), rows, cols, padding_idx), expected, dtype, dtype)


# --- CUDA kernel (run on a GPU machine; skipped here) ---------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_reference(dtype):
    if not CUDA:
        pytest.skip(CUDA_SKIP)
    g = torch.Generator().manual_seed(23)
    tokens = torch.randint(0, 6, (3, 9), generator=g)
    de = torch.randn(3, 9, 5, generator=g).to(dtype)
    rows, cols = torch.randint(0, 6, (14,), generator=g), torch.randint(0, 5, (14,), generator=g)
    got = ops.sampled_embedding_grad(tokens.cuda(), de.cuda(), rows.cuda(), cols.cuda(), 2)
    assert_close(got.cpu(), ref_embedding(tokens, de, rows, cols, 2), dtype, dtype)


# --- Triton -------------------------------------------------------------------------------------------

# (B, T, vocabulary V, E, m, padding_idx, noncontig)
TRITON_CASES = [
    (2, 9, 5, 4, 13, None, False),
    (2, 9, 5, 4, 13, 2, False),
    (1, 1, 3, 2, 1, None, False),  # one sample, one token, one entry
    (3, 70, 6, 5, 70, 0, True),  # two token tiles, two entry blocks, strided inputs
]


def triton_case(case, dtype):
    """(args, float64 reference, reference on |inputs|, accumulation length)."""
    batch, length, vocab, dim, m, padding_idx, noncontig = case
    gen = case_generator("embedding", case, dtype)
    tokens = torch.randint(0, vocab, (batch, length), generator=gen)
    if noncontig:
        tokens = torch.randint(0, vocab, (length, 2 * batch), generator=gen)[:, ::2].t()
    tokens = tokens.to(TRITON_DEVICE)
    if padding_idx is not None:
        tokens[:, 0] = padding_idx  # the padding row occurs, and is sampled below
    d = randn_rounded(gen, batch, length, dim, dtype=dtype, noncontig=noncontig)
    rows, cols = random_index(gen, vocab, m, noncontig), random_index(gen, dim, m, noncontig)
    if padding_idx is not None:
        rows[0] = padding_idx
    (d64,) = as_f64(d)
    ref = sampled.sampled_embedding_grad(tokens, d64, rows, cols, padding_idx)
    ref_abs = sampled.sampled_embedding_grad(tokens, d64.abs(), rows, cols, padding_idx)
    return (tokens, d, rows, cols, padding_idx), ref, ref_abs, length


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_reference(case, dtype):
    args, ref, ref_abs, n = triton_case(case, dtype)
    out = registered.triton_sampled_embedding_grad(*args)
    assert_within_bound(out.cpu(), ref.cpu(), ref_abs.cpu(), n, dtype)
    if case[5] is not None:
        assert (out[:, 0] == 0).all(), "the padding row must get no gradient"


def test_triton_matches_weight_grad_fp64():
    """All entries of an nn.Embedding with padding_idx: equal to per-sample autograd."""
    gen = case_generator("embedding-all")
    emb = torch.nn.Embedding(5, 3, padding_idx=1).double().to(TRITON_DEVICE)
    tokens = torch.randint(0, 5, (2, 7), generator=gen).to(TRITON_DEVICE)
    d = randn_rounded(gen, 2, 7, 3, dtype=torch.float64)
    expected = torch.stack([torch.autograd.grad(emb(tokens[b]), emb.weight, d[b])[0].reshape(-1) for b in range(2)])
    local = torch.arange(15, device=TRITON_DEVICE)
    out = registered.triton_sampled_embedding_grad(tokens, d, local // 3, local % 3, 1)
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)


def test_triton_compile():
    check_triton_compiled(registered.triton_sampled_embedding_grad, triton_case(TRITON_CASES[1], torch.float32))


@pytest.mark.gpu
@needs_cuda
def test_triton_bf16_gpu():
    check_triton_bf16(registered.triton_sampled_embedding_grad, triton_case(TRITON_CASES[1], torch.bfloat16))


# --- opcheck, every backend ---------------------------------------------------------------------------

def opcheck_args(backend):
    """Sample arguments of the backend's registered op."""
    if backend == "triton":
        return triton_case(TRITON_CASES[1], torch.float32)[0]
    device = "cuda" if backend == "cuda" else "cpu"
    g = torch.Generator().manual_seed(17)
    tokens = torch.randint(0, 5, (2, 4), generator=g)
    args = (tokens, torch.randn(2, 4, 3, generator=g), torch.tensor([0, 4, 1]), torch.tensor([2, 0, 1]), 1,
            torch.zeros(2, 3), None)
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in args)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), pytest.param("cuda", marks=pytest.mark.gpu),
                                     "triton"])
def test_opcheck(backend):
    if backend == "cuda" and not CUDA:
        pytest.skip(CUDA_SKIP)
    op = registered.triton_sampled_embedding_grad if backend == "triton" else registered.sampled_embedding_grad
    torch.library.opcheck(op.default, opcheck_args(backend))


# --- errors ---------------------------------------------------------------------------------------------

def test_triton_refuses_float_tokens():
    (tokens, d, rows, cols, pad), *_ = triton_case(TRITON_CASES[0], torch.float32)
    with pytest.raises(TypeError, match="tokens must be an integer"):
        registered.triton_sampled_embedding_grad(tokens.float(), d, rows, cols, pad)


# --- one schema: every backend takes out= / out_columns= ------------------------------------------

# Triton's op returns a new tensor (no out= form), so it is checked by the tests above.
SCHEMA_BACKENDS = [pytest.param(sampled.sampled_embedding_grad, id="torch"),
                   pytest.param(ops.sampled_embedding_grad, id="cpp", marks=needs_cpp)]


@pytest.mark.parametrize("op", SCHEMA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_every_backend_writes_out_columns_only(op, dtype, padding_idx):
    """One call form for every backend: F lands at out[:, out_columns], the rest of out
    stays as it was, and out itself is returned."""
    g = case_generator("schema", dtype, padding_idx)
    tokens, d, rows, cols = embedding_problem(g, dtype, 3, 9, 6, 5, 14)
    expected = ref_embedding(tokens, d, rows, cols, padding_idx)
    block = torch.full((3, 20), -7.0, dtype=dtype)
    columns = torch.randperm(20, generator=g)[:14]
    assert op(tokens, d, rows, cols, padding_idx, out=block, out_columns=columns) is block
    assert_close(block[:, columns], expected, dtype, dtype)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[columns] = False
    assert bool((block[:, untouched] == -7.0).all())
    block = torch.full((3, 20), -7.0, dtype=dtype)
    op(tokens, d, rows, cols, padding_idx, out=block)
    assert_close(block[:, :14], expected, dtype, dtype)
    assert bool((block[:, 14:] == -7.0).all())
