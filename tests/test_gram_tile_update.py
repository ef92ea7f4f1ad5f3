"""gram_tile_update (K += A B^T on the entries a tile of the Gram may touch): every
backend against a float64 reference, over shapes, dtypes, tile placements (lower /
offsets) and strided K views; opcheck, torch.compile, and the error messages. Backends:
plain torch, the C++ CPU kernel (tangent_kernels::gram_tile_update), Triton
(tangent_kernels::triton_gram_tile_update; through its interpreter without a GPU, fp32 K
only) and the CUDA kernel (`gpu` tests, skipped without one).

Tolerance: each backend is compared with the float64 product of the *same* inputs
(16-bit -> float32 conversion is exact), so the only error is the rounding of the
accumulation in K's dtype. For any summation order (blocked, chunked, FMA) that error
is at most (d + 2) * u * (|A| |B|^T + |K|) per entry: d products and additions plus the
final add into K, with u the unit roundoff of K's dtype (the table below). An indexing
or masking bug is off by ~|A| |B|^T, far above this bound for the d used here.
"""

from __future__ import annotations

import pytest
import torch

import tangent_kernels.kernels as triton_kernels
from tangent_kernels import ops
from tangent_kernels._ext import extension_loaded, has_cuda_kernels

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}  # u of the accumulation (K's) dtype

# (input dtype, K dtype): every supported pair
DTYPES = [
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float32),
    (torch.float16, torch.float64),
    (torch.bfloat16, torch.float64),
    (torch.float32, torch.float64),
    (torch.float64, torch.float64),
]
# (m, n, d): K is [m, n], A [m, d], B [n, d]
SHAPES = [(1, 1, 1), (5, 123, 77), (0, 7, 3), (7, 0, 3), (4, 6, 0), (64, 64, 33), (70, 45, 130)]
# where the tile sits in the full Gram: (row_offset, col_offset, lower)
PLACEMENTS = {
    "full": (0, 0, False),
    "full-offsets-ignored": (0, 1000, False),
    "diagonal": (0, 0, True),
    "diagonal-offset": (100, 100, True),
    "below": (1000, 0, True),
    "above": (0, 1000, True),
    "crossing-down": (5, 0, True),
    "crossing-right": (0, 5, True),
}

# Triton (no float64, so not in the DTYPES grid) has its own cases below.
CPU_BACKENDS = [b for b in ops.available_tile_backends("cpu") if b != "triton"]
GPU_BACKENDS = ["cuda", "torch"]
needs_ext = pytest.mark.skipif(not extension_loaded(), reason="tangent_kernels._C is not built")
needs_triton = pytest.mark.skipif(not triton_kernels.available(),
                                  reason=f"Triton cannot run here: {triton_kernels.unavailable_reason()}")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not triton_kernels.INTERPRETED else "cpu"


def dtype_id(pair):
    return f"{str(pair[0]).split('.')[-1]}->{str(pair[1]).split('.')[-1]}"


def make_inputs(m, n, d, in_dtype, k_dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, d, generator=g).to(in_dtype)
    B = torch.randn(n, d, generator=g).to(in_dtype)
    K = torch.randn(m, n, generator=g, dtype=torch.float64).to(k_dtype)
    K.view(-1)[::7] = -0.0  # a masked -0.0 must stay -0.0 (adding a masked-out 0 would flip it)
    return K.to(device), A.to(device), B.to(device)


def allowed_mask(m, n, row_offset, col_offset, lower, device="cpu"):
    if not lower:
        return torch.ones(m, n, dtype=torch.bool, device=device)
    rows = torch.arange(m, device=device) + row_offset
    cols = torch.arange(n, device=device) + col_offset
    return rows[:, None] >= cols[None, :]


def bits(t):
    """Bit patterns of a float tensor's entries (so -0.0 != 0.0 and NaN == same NaN)."""
    t = t.contiguous()
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def check_update(K_after, K_before, A, B, row_offset, col_offset, lower):
    m, n, d = A.shape[0], B.shape[0], A.shape[1]
    allowed = allowed_mask(m, n, row_offset, col_offset, lower, K_before.device)
    A64, B64, K64 = A.double(), B.double(), K_before.double()
    expected = torch.where(allowed, K64 + A64 @ B64.T, K64)
    bound = (d + 2) * UNIT_ROUNDOFF[K_before.dtype] * (A64.abs() @ B64.abs().T + K64.abs())
    err = (K_after.double() - expected).abs()
    worst = (err - bound).max().item() if err.numel() else 0.0
    assert worst <= 0, f"error exceeds the rounding bound by {worst:.3g} (max error {err.max().item():.3g})"
    assert torch.equal(bits(K_after[~allowed]), bits(K_before[~allowed])), "entries above the diagonal changed"


@pytest.mark.parametrize("placement", list(PLACEMENTS), ids=list(PLACEMENTS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtypes", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_float64_reference(backend, dtypes, shape, placement):
    row_offset, col_offset, lower = PLACEMENTS[placement]
    K, A, B = make_inputs(*shape, *dtypes)
    before = K.clone()
    out = ops.gram_tile_update(K, A, B, row_offset, col_offset, lower, backend=backend)
    assert out is K
    check_update(K, before, A, B, row_offset, col_offset, lower)


FULL_SHAPES = {  # layout -> shape of the bigger matrix K is a view of
    "slice": lambda m, n: (m + 7, n + 11),
    "transposed": lambda m, n: (n + 4, m + 2),
    "every-other-column": lambda m, n: (m, 2 * n),
}


def strided_view_like(full, layout, m, n):
    """A [m, n] view into `full` of the given layout."""
    if layout == "slice":  # K_full[i0:i1, j0:j1]: row stride != width
        return full[3:3 + m, 5:5 + n]
    if layout == "transposed":  # column-major: stride(1) != 1
        return full.T[1:1 + m, 2:2 + n]
    if layout == "every-other-column":  # stride(1) == 2
        return full[:, ::2]
    raise ValueError(layout)


def strided_view(layout, m, n, k_dtype, device="cpu", seed=1):
    """(K, full): a [m, n] view K into a bigger random matrix full."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(*FULL_SHAPES[layout](m, n), generator=g, dtype=torch.float64).to(k_dtype).to(device)
    return strided_view_like(full, layout, m, n), full


def outside_view(full, layout, m, n):
    marker = torch.zeros_like(full, dtype=torch.bool)
    strided_view_like(marker, layout, m, n).fill_(True)
    return ~marker


@pytest.mark.parametrize("placement", ["full", "diagonal", "crossing-down"])
@pytest.mark.parametrize("layout", ["slice", "transposed", "every-other-column"])
@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.float64, torch.float64)], ids=dtype_id)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_views_in_place(backend, dtypes, layout, placement):
    row_offset, col_offset, lower = PLACEMENTS[placement]
    m, n, d = 37, 29, 19
    K, full = strided_view(layout, m, n, dtypes[1])
    _, A, B = make_inputs(m, n, d, *dtypes, seed=2)
    before, full_before = K.clone(), full.clone()
    ops.gram_tile_update(K, A, B, row_offset, col_offset, lower, backend=backend)
    check_update(K, before, A, B, row_offset, col_offset, lower)
    outside = outside_view(full, layout, m, n)
    assert torch.equal(bits(full[outside]), bits(full_before[outside])), "entries outside the view changed"



@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.bfloat16, torch.float64)], ids=dtype_id)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_many_row_blocks_and_long_rows(backend, dtypes):
    """Several 256-row blocks of the C++ kernel and several d-chunks of its upcast."""
    m, n, d = 300, 290, 4096 * 2 + 77
    K, A, B = make_inputs(m, n, d, *dtypes, seed=3)
    for row_offset, col_offset in [(0, 0), (40, 0), (0, 40)]:
        before = K.clone()
        ops.gram_tile_update(K, A, B, row_offset, col_offset, True, backend=backend)
        check_update(K, before, A, B, row_offset, col_offset, True)


def test_auto_prefers_cpp_on_cpu_when_built():
    assert CPU_BACKENDS == (["cpp", "torch"] if extension_loaded() else ["torch"])


# --- opcheck and torch.compile --------------------------------------------------------

def opcheck_samples(device):
    samples = []
    for (m, n, d), (in_dtype, k_dtype), (row_offset, col_offset, lower) in [
        ((5, 7, 3), (torch.float32, torch.float32), (0, 0, False)),
        ((6, 6, 4), (torch.float16, torch.float32), (0, 0, True)),
        ((4, 9, 5), (torch.float64, torch.float64), (3, 1, True)),
        ((3, 2, 8), (torch.bfloat16, torch.float64), (0, 0, False)),
    ]:
        K, A, B = make_inputs(m, n, d, in_dtype, k_dtype, device)
        samples.append((K, A, B, row_offset, col_offset, lower))
    K_view, _ = strided_view("slice", 6, 5, torch.float32, device)
    _, A, B = make_inputs(6, 5, 3, torch.float32, torch.float32, device)
    samples.append((K_view, A, B, 2, 0, True))
    return samples


def triton_opcheck_sample():
    g = torch.Generator().manual_seed(8)
    K = torch.randn(9, 7, generator=g).to(TRITON_DEVICE)
    A, B = torch.randn(9, 20, generator=g).to(TRITON_DEVICE), torch.randn(7, 20, generator=g).to(TRITON_DEVICE)
    return (K, A, B, 2, 0, True, False)


@pytest.mark.parametrize("backend, index", [pytest.param("cpp", i, marks=needs_ext) for i in range(5)]
                         + [pytest.param("cuda", i, marks=pytest.mark.gpu) for i in range(5)]
                         + [pytest.param("triton", 0, marks=needs_triton)])
def test_opcheck(backend, index):
    if backend == "triton":
        torch.library.opcheck(torch.ops.tangent_kernels.triton_gram_tile_update.default, triton_opcheck_sample(),
                              test_utils=("test_schema", "test_faketensor"))
        return
    if backend == "cuda" and not has_cuda_kernels():
        pytest.skip("the extension was built without its CUDA kernels")
    args = opcheck_samples("cuda" if backend == "cuda" else "cpu")[index]
    torch.library.opcheck(torch.ops.tangent_kernels.gram_tile_update.default, args)


@needs_ext
def test_torch_compile_fullgraph():
    def update(K, A, B):
        ops.gram_tile_update(K, A, B, 2, 0, True)
        return K * 1

    K, A, B = make_inputs(6, 8, 5, torch.float16, torch.float32)
    K_eager = K.clone()
    update(K_eager, A, B)
    torch._dynamo.reset()
    compiled = torch.compile(update, backend="aot_eager", fullgraph=True)
    out = compiled(K, A, B)
    assert torch.equal(out, K_eager) and torch.equal(K, K_eager)


# --- errors ---------------------------------------------------------------------------

f32, f64 = torch.float32, torch.float64
ERROR_CASES = {
    # name: (K, A, B, Python error type, pattern in both the Python and the C++ message)
    "dtype-mismatch": (lambda: (torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(3, 4, dtype=f64)), TypeError,
                       "same dtype"),
    "d-mismatch": (lambda: (torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(3, 5)), ValueError, "same d"),
    "K-shape": (lambda: (torch.zeros(3, 2), torch.zeros(2, 4), torch.zeros(3, 4)), ValueError, "K must have shape"),
    "K-dtype": (lambda: (torch.zeros(2, 3, dtype=torch.float16), torch.zeros(2, 4), torch.zeros(3, 4)), TypeError,
                "K must be float32 or float64"),
    "fp64-into-fp32": (lambda: (torch.zeros(2, 3), torch.zeros(2, 4, dtype=f64), torch.zeros(3, 4, dtype=f64)),
                       TypeError, "float64 inputs need a float64 K"),
    "int-inputs": (lambda: (torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.int32),
                            torch.zeros(3, 4, dtype=torch.int32)), TypeError, "must be float16, bfloat16"),
    "A-3d": (lambda: (torch.zeros(2, 3), torch.zeros(2, 4, 1), torch.zeros(3, 4)), ValueError, "A must be 2-D"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_errors_python(backend, case):
    make, error, pattern = ERROR_CASES[case]
    with pytest.raises(error, match=pattern):
        ops.gram_tile_update(*make(), backend=backend)


@needs_ext
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_cpp(case):
    make, _, pattern = ERROR_CASES[case]
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.tangent_kernels.gram_tile_update(*make(), 0, 0, False)


@needs_ext
def test_error_cpp_self_overlapping_K():
    K = torch.zeros(1, 3).expand(2, 3)
    with pytest.raises(RuntimeError, match="self-overlapping"):
        torch.ops.tangent_kernels.gram_tile_update(K, torch.zeros(2, 4), torch.zeros(3, 4), 0, 0, False)


def test_error_device_mismatch():
    with pytest.raises(ValueError, match="same device"):
        ops.gram_tile_update(torch.zeros(2, 3), torch.zeros(2, 4, device="meta"), torch.zeros(3, 4))


def test_error_bad_backend_name():
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'cublas'"):
        ops.gram_tile_update(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(3, 4), backend="cublas")


def test_error_cuda_backend_on_cpu_tensors():
    with pytest.raises(ValueError, match="backend='cuda' runs on CUDA tensors"):
        ops.gram_tile_update(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(3, 4), backend="cuda")


def test_error_cpp_backend_without_extension(monkeypatch):
    import tangent_kernels._ext as ext

    monkeypatch.setattr(ext, "_C", None)
    monkeypatch.setattr(ext, "_error", "extension not built: run `pip install --no-build-isolation -e .`")
    with pytest.raises(RuntimeError, match="needs the compiled extension: extension not built: run `pip install"):
        ops.gram_tile_update(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(3, 4), backend="cpp")
    K = torch.zeros(2, 3)  # "auto" falls back to torch
    ops.gram_tile_update(K, torch.ones(2, 4), torch.ones(3, 4))
    assert torch.equal(K, torch.full((2, 3), 4.0))


# --- GPU (run where a CUDA device is visible) ------------------------------------------

def gpu_backends():
    return [b for b in GPU_BACKENDS if b == "torch" or has_cuda_kernels()]


GPU_SHAPES = SHAPES + [(200, 300, 1000), (129, 65, 17), (256, 256, 64)]
GPU_PLACEMENTS = dict(PLACEMENTS, **{"tile-edge-63": (63, 0, True), "tile-edge-64": (0, 64, True),
                                     "skips-blocks": (0, 100, True)})


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtypes", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_matches_float64_reference(backend, dtypes, shape):
    if backend not in gpu_backends():
        pytest.skip("the extension was built without its CUDA kernels")
    for placement, (row_offset, col_offset, lower) in GPU_PLACEMENTS.items():
        K, A, B = make_inputs(*shape, *dtypes, device="cuda")
        before = K.clone()
        ops.gram_tile_update(K, A, B, row_offset, col_offset, lower, backend=backend)
        torch.cuda.synchronize()
        try:
            check_update(K, before, A, B, row_offset, col_offset, lower)
        except AssertionError as exc:
            raise AssertionError(f"placement {placement!r}: {exc}") from None


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["slice", "transposed", "every-other-column"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_strided_views_in_place(backend, layout):
    if backend not in gpu_backends():
        pytest.skip("the extension was built without its CUDA kernels")
    m, n, d = 100, 70, 33
    K, full = strided_view(layout, m, n, torch.float32, device="cuda")
    _, A, B = make_inputs(m, n, d, torch.bfloat16, torch.float32, device="cuda", seed=4)
    before, full_before = K.clone(), full.clone()
    ops.gram_tile_update(K, A, B, 30, 0, True, backend=backend)
    check_update(K, before, A, B, 30, 0, True)
    outside = outside_view(full, layout, m, n)
    assert torch.equal(bits(full[outside]), bits(full_before[outside]))


@pytest.mark.gpu
def test_gpu_auto_uses_torch_and_lists_backends():
    assert ops.available_tile_backends("cuda")[0] == "torch"
    K, A, B = make_inputs(9, 8, 7, torch.float16, torch.float32, device="cuda")
    before = K.clone()
    ops.gram_tile_update(K, A, B, 0, 0, True)
    check_update(K, before, A, B, 0, 0, True)


@pytest.mark.gpu
def test_gpu_error_device_mismatch():
    with pytest.raises(ValueError, match="same device"):
        ops.gram_tile_update(torch.zeros(2, 3, device="cuda"), torch.zeros(2, 4), torch.zeros(3, 4, device="cuda"))
    if extension_loaded():
        with pytest.raises(RuntimeError, match="same device"):
            torch.ops.tangent_kernels.gram_tile_update(
                torch.zeros(2, 3, device="cuda"), torch.zeros(2, 4), torch.zeros(3, 4, device="cuda"), 0, 0, False)


# --- Triton (run here through TRITON_INTERPRET=1) ----------------------------------------
# Tolerance: products accumulated in fp32 over d terms; with fp32 or 16-bit inputs (exact
# in fp32 once upcast) the error is about sqrt(d) * 2**-24 * sum|a_k b_k| per entry, so
# 1e-5 relative to the largest |A| |B|^T entry leaves a wide margin for d <= 200.

# (m, n, d, row_offset, col_offset, lower): odd sizes, one row / column / feature, the
# diagonal crossing the block, blocks fully above and fully below it.
TRITON_CASES = [
    (37, 29, 71, 0, 0, False),
    (40, 40, 33, 10, 10, True),
    (17, 50, 5, 30, 0, True),
    (5, 64, 1, 0, 60, True),
    (70, 9, 130, 100, 0, True),
    (1, 1, 200, 3, 3, True),
    (16, 16, 16, 0, 100, True),
]


def triton_reference(K, A, B, row_offset, col_offset, lower):
    expected = K.double() + A.double() @ B.double().T
    if lower:
        rows = row_offset + torch.arange(K.shape[0], device=K.device)[:, None]
        cols = col_offset + torch.arange(K.shape[1], device=K.device)[None, :]
        expected = torch.where(rows >= cols, expected, K.double())
    return expected


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16]
                         + ([torch.bfloat16] if TRITON_DEVICE == "cuda" else []))
def test_triton_matches_float64(case, dtype):
    m, n, d, row_offset, col_offset, lower = case
    g = torch.Generator().manual_seed(sum(case))
    A = torch.randn(m, d, generator=g).to(dtype).to(TRITON_DEVICE)
    B = torch.randn(n, d, generator=g).to(dtype).to(TRITON_DEVICE)
    big = torch.randn(m + 3, 2 * n + 1, generator=g).to(TRITON_DEVICE)
    K = big[1 : m + 1, 1 : 2 * n + 1 : 2]  # a strided view inside a larger Gram
    before, outside = K.clone(), big.clone()
    ops.gram_tile_update(K, A, B, row_offset, col_offset, lower, backend="triton")
    expected = triton_reference(before, A, B, row_offset, col_offset, lower)
    scale = float((A.double().abs() @ B.double().abs().T).max()) or 1.0
    assert float((K.double() - expected).abs().max()) <= 1e-5 * scale
    untouched = expected == before.double()
    assert torch.equal(K[untouched], before[untouched])  # masked entries: exactly as they were
    mask = torch.ones_like(big, dtype=torch.bool)
    mask[1 : m + 1, 1 : 2 * n + 1 : 2] = False
    assert torch.equal(big[mask], outside[mask])  # nothing outside the view is written


@needs_triton
def test_triton_tiles_in_a_symmetric_gram_equal_the_torch_ones():
    g = torch.Generator().manual_seed(7)
    F = torch.randn(50, 40, generator=g).to(TRITON_DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        K = torch.zeros(50, 50, device=TRITON_DEVICE)
        for i0 in range(0, 50, 16):
            for j0 in range(0, i0 + 1, 16):
                ops.gram_tile_update(K[i0 : i0 + 16, j0 : j0 + 16], F[i0 : i0 + 16], F[j0 : j0 + 16], i0, j0,
                                     lower=i0 == j0, backend=backend)
        results[backend] = K
    assert torch.allclose(results["triton"], results["torch"], rtol=1e-5, atol=1e-5)
    assert torch.equal(results["triton"].triu(1), torch.zeros(50, 50, device=TRITON_DEVICE).triu(1))


@needs_triton
def test_triton_refuses_float64_with_the_fix():
    K = torch.zeros(2, 2, dtype=torch.float64, device=TRITON_DEVICE)
    A = torch.ones(2, 3, dtype=torch.float64, device=TRITON_DEVICE)
    with pytest.raises(TypeError, match="float64 runs on backend='cpp' or 'torch'"):
        ops.gram_tile_update(K, A, A, backend="triton")


def test_triton_runs_here():
    """Triton's CPU interpreter (or a GPU) is part of the test setup: never skipped silently."""
    assert triton_kernels.available(), triton_kernels.unavailable_reason()
    assert triton_kernels.unavailable_reason() is None


@needs_triton
def test_triton_is_listed_where_it_runs():
    assert ("triton" in ops.available_tile_backends(TRITON_DEVICE)) == triton_kernels.available()
