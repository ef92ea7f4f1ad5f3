"""Test session setup and what the test modules share.

Setup: Triton's CPU interpreter when there is no GPU, and `gpu` tests skipped (with the
reason shown) when no CUDA device is visible.

Shared helpers (import them: ``from conftest import rel_err``): the relative error every
float64-reference comparison uses, the tolerance table for K per precision, and the seeded
input makers several modules need. Shared fixtures: ``one_thread``, ``set_tile_rows`` /
``small_tiles``, ``set_batched`` and ``set_dense_strategy`` (the engine's module-level knobs, set
through monkeypatch here only, so that a change of how those knobs are set is made once).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated, i.e. when tangent_kernels is
    # imported: it must be set before any test module imports the package.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config):
    """Which backends this run exercises, at the top of the log."""
    try:
        import tangent_kernels._ext as ext

        return str(ext.info()).splitlines()
    except Exception as error:  # the tests themselves will show the failure in full
        return [f"tangent_kernels: info() failed: {type(error).__name__}: {error}"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# --- comparison with a float64 reference -------------------------------------------------

# Relative Frobenius error bounds of K vs the float64 reference, per precision. fp64: both
# sides are exact up to summation order (~1e-16 per op). fp32: features carry ~1e-7
# relative rounding per layer of the backward pass, K sums p products; 1e-5 leaves a wide
# margin. bf16 / fp16 / tf32: ~4-8 unit roundoffs, justified in test_precision.py.
K_TOLERANCE = {"fp64": 1e-10, "fp32": 1e-5, "tf32": 2e-2, "bf16": 2e-2, "fp16": 4e-3}


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected|| (Frobenius), computed in float64."""
    got, expected = got.detach().double(), expected.detach().double()
    return float((got - expected).norm() / expected.norm())


def assert_matches_float64(got: torch.Tensor, reference: torch.Tensor, precision: str) -> None:
    """got (computed at `precision`) within K_TOLERANCE[precision] of the float64 reference."""
    error = rel_err(got, reference)
    assert error <= K_TOLERANCE[precision], f"relative error {error:.3g} > {K_TOLERANCE[precision]:g} ({precision})"


def exact_solution(K: torch.Tensor, Y: torch.Tensor, beta: float) -> torch.Tensor:
    """(K + beta I)^-1 Y by a float64 dense solve: the reference of every kernel-ridge solver."""
    A = K.double() + beta * torch.eye(K.shape[0], dtype=torch.float64)
    return torch.linalg.solve(A, Y.double())


# --- seeded inputs --------------------------------------------------------------------------

def batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """x split into loader batches of `size` samples (the last one ragged)."""
    return [x[i : i + size] for i in range(0, x.shape[0], size)]


def psd(n: int, rank: int, seed: int) -> torch.Tensor:
    """A float64 n x n positive semi-definite matrix of the given rank: a a^T, a seeded."""
    a = torch.randn(n, rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T


def seeded_mlp(seed: int = 0, d: int = 6, activation=nn.Tanh) -> nn.Module:
    """d -> 8 -> 3, initialized from torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), activation(), nn.Linear(8, 3))


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module: its matrices are tiny, and with OpenMP threads on
    oversubscribed cores each GEMM spin-waits ~10 ms (measured 100x slower than one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def set_tile_rows(monkeypatch):
    """set_tile_rows(n): K's Gram phase works in tiles of n rows (tuning.settings.tile_rows) for
    this test, so that small problems still have several row blocks, off-diagonal tiles and ragged
    edges."""
    from tangent_kernels import tuning

    def setter(rows: int) -> None:
        monkeypatch.setattr(tuning.settings, "tile_rows", rows)

    return setter


@pytest.fixture
def small_tiles(set_tile_rows):
    """Tiles of 4 rows (see set_tile_rows)."""
    set_tile_rows(4)


@pytest.fixture
def set_batched(monkeypatch):
    """set_batched(False): every parameter tensor goes down the generic (per-sample autograd) path
    of the feature extractor, for this test (tuning.settings.batched)."""
    from tangent_kernels import tuning

    def setter(flag: bool) -> None:
        monkeypatch.setattr(tuning.settings, "batched", flag)

    return setter


@pytest.fixture
def set_dense_strategy(monkeypatch):
    """set_dense_strategy(name): the dense-or-sparse choice of the conv/linear kernels for this
    test (tuning.settings.dense_strategy)."""
    from tangent_kernels import tuning

    def setter(name: str) -> None:
        monkeypatch.setattr(tuning.settings, "dense_strategy", name)

    return setter
