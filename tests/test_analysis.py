"""tk.analysis against direct formulas on random problems."""

import numpy as np
import pytest
import torch

import tangent_kernels as tk
from conftest import psd


def test_spectrum_matches_numpy_eigenvalues_and_participation_ratio():
    K = psd(30, 12, 0)
    spec = tk.analysis.spectrum(K)
    expected = np.sort(np.linalg.eigvalsh(K.numpy()))[::-1]
    assert np.allclose(spec.eigenvalues.numpy(), expected, rtol=1e-10, atol=1e-10)
    assert spec.effective_dimension == pytest.approx(float(K.trace()) ** 2 / float((K * K).sum()), rel=1e-10)
    assert spec.trace == pytest.approx(float(K.trace()), rel=1e-12)
    assert spec.explained(12) == pytest.approx(1.0, rel=1e-9)  # rank 12: all of the trace
    assert 0 < spec.explained(1) < 1


def test_effective_dimension_extremes():
    v = torch.randn(10, 1, dtype=torch.float64)
    assert tk.analysis.spectrum(v @ v.T).effective_dimension == pytest.approx(1.0, rel=1e-9)
    assert tk.analysis.spectrum(3 * torch.eye(7)).effective_dimension == pytest.approx(7.0, rel=1e-6)


def test_degrees_of_freedom_is_trace_of_hat_matrix():
    K, beta = psd(25, 25, 1), 0.7
    hat = K @ torch.linalg.inv(K + beta * torch.eye(25, dtype=torch.float64))
    assert tk.analysis.degrees_of_freedom(K, beta) == pytest.approx(float(hat.trace()), rel=1e-9)
    with pytest.raises(ValueError, match="beta must be > 0"):
        tk.analysis.degrees_of_freedom(K, 0.0)


@pytest.mark.parametrize("centered", [False, True])
def test_alignment_matches_the_definition(centered):
    K = psd(40, 8, 2)
    y = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(3))
    Y = torch.nn.functional.one_hot(y).double()
    T = Y @ Y.T
    if centered:
        H = torch.eye(40, dtype=torch.float64) - 1.0 / 40
        K, T = H @ K @ H, H @ T @ H
    expected = float((K * T).sum() / (K.norm() * T.norm()))
    assert tk.analysis.alignment(psd(40, 8, 2), y, centered=centered) == pytest.approx(expected, rel=1e-10)
    # real-valued targets [n, m] go through the same formula
    assert tk.analysis.alignment(psd(40, 8, 2), Y, centered=centered) == pytest.approx(expected, rel=1e-10)


def test_alignment_of_the_ideal_kernel_is_one():
    y = torch.tensor([0, 1, 1, 2, 0, 2])
    Y = torch.nn.functional.one_hot(y).double()
    assert tk.analysis.alignment(Y @ Y.T, y) == pytest.approx(1.0, rel=1e-12)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="must be a square"):
        tk.analysis.spectrum(torch.randn(3, 4))
    with pytest.raises(ValueError, match="not symmetric"):
        tk.analysis.spectrum(torch.randn(5, 5))
    with pytest.raises(ValueError, match="non-finite"):
        tk.analysis.spectrum(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="Y has 3 rows but K has 4"):
        tk.analysis.alignment(torch.eye(4), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="negative class labels"):
        tk.analysis.alignment(torch.eye(3), torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="alignment is undefined"):
        tk.analysis.alignment(torch.eye(3), torch.tensor([1, 1, 1]), centered=True)
    with pytest.raises(ValueError, match="k must be in"):
        tk.analysis.spectrum(torch.eye(3)).explained(4)
