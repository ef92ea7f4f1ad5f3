"""The Triton Gram tile update (run here through TRITON_INTERPRET=1) against a float64
reference: every entry it may touch gets K + A B^T, every other entry stays bit-identical.

Tolerance: products accumulated in fp32 over d terms; with fp32 or 16-bit inputs (exact
in fp32 once upcast) the error is about sqrt(d) * 2**-24 * sum|a_k b_k| per entry, so
1e-5 relative to the largest |A| |B|^T entry leaves a wide margin for d <= 200.
"""

import pytest
import torch

import tangent_kernels.kernels as triton_kernels
from tangent_kernels import ops

pytestmark = pytest.mark.skipif(
    not triton_kernels.available(), reason=f"Triton cannot run here: {triton_kernels.unavailable_reason()}"
)

DEVICE = "cuda" if torch.cuda.is_available() and not triton_kernels.INTERPRETED else "cpu"
# (m, n, d, row_offset, col_offset, lower): odd sizes, one row / column / feature, the
# diagonal crossing the block, blocks fully above and fully below it.
CASES = [
    (37, 29, 71, 0, 0, False),
    (40, 40, 33, 10, 10, True),
    (17, 50, 5, 30, 0, True),
    (5, 64, 1, 0, 60, True),
    (70, 9, 130, 100, 0, True),
    (1, 1, 200, 3, 3, True),
    (16, 16, 16, 0, 100, True),
]


def _reference(K, A, B, row_offset, col_offset, lower):
    expected = K.double() + A.double() @ B.double().T
    if lower:
        rows = row_offset + torch.arange(K.shape[0], device=K.device)[:, None]
        cols = col_offset + torch.arange(K.shape[1], device=K.device)[None, :]
        expected = torch.where(rows >= cols, expected, K.double())
    return expected


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_triton_tile_update_matches_float64(case, dtype):
    m, n, d, row_offset, col_offset, lower = case
    g = torch.Generator().manual_seed(sum(case))
    A = torch.randn(m, d, generator=g).to(dtype).to(DEVICE)
    B = torch.randn(n, d, generator=g).to(dtype).to(DEVICE)
    big = torch.randn(m + 3, 2 * n + 1, generator=g).to(DEVICE)
    K = big[1 : m + 1, 1 : 2 * n + 1 : 2]  # a strided view inside a larger Gram
    before, outside = K.clone(), big.clone()
    ops.gram_tile_update(K, A, B, row_offset, col_offset, lower, backend="triton")
    expected = _reference(before, A, B, row_offset, col_offset, lower)
    scale = float((A.double().abs() @ B.double().abs().T).max()) or 1.0
    assert float((K.double() - expected).abs().max()) <= 1e-5 * scale
    untouched = expected == before.double()
    assert torch.equal(K[untouched], before[untouched])  # masked entries: exactly as they were
    mask = torch.ones_like(big, dtype=torch.bool)
    mask[1 : m + 1, 1 : 2 * n + 1 : 2] = False
    assert torch.equal(big[mask], outside[mask])  # nothing outside the view is written


def test_triton_tiles_in_a_symmetric_gram_equal_the_cpp_or_torch_ones():
    g = torch.Generator().manual_seed(7)
    F = torch.randn(50, 40, generator=g).to(DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        K = torch.zeros(50, 50, device=DEVICE)
        for i0 in range(0, 50, 16):
            for j0 in range(0, i0 + 1, 16):
                ops.gram_tile_update(K[i0 : i0 + 16, j0 : j0 + 16], F[i0 : i0 + 16], F[j0 : j0 + 16], i0, j0,
                                     lower=i0 == j0, backend=backend)
        results[backend] = K
    assert torch.allclose(results["triton"], results["torch"], rtol=1e-5, atol=1e-5)
    assert torch.equal(results["triton"].triu(1), torch.zeros(50, 50, device=DEVICE).triu(1))


def test_triton_tile_refuses_float64_with_the_fix():
    K, A = torch.zeros(2, 2, dtype=torch.float64, device=DEVICE), torch.ones(2, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64 runs on backend='cpp' or 'torch'"):
        ops.gram_tile_update(K, A, A, backend="triton")


def test_opcheck():
    g = torch.Generator().manual_seed(8)
    K = torch.randn(9, 7, generator=g).to(DEVICE)
    A, B = torch.randn(9, 20, generator=g).to(DEVICE), torch.randn(7, 20, generator=g).to(DEVICE)
    torch.library.opcheck(torch.ops.tangent_kernels.triton_gram_tile_update.default, (K, A, B, 2, 0, True, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_triton_is_listed_where_it_runs():
    assert ("triton" in ops.available_tile_backends(DEVICE)) == triton_kernels.available()
