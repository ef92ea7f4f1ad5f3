"""tk.analysis on every output form of tk.gram (issue 23): [n, n, k, k] as the kn x kn
matrix over (sample, logit) pairs, [n, n, k] as the block-diagonal one, against the
formulas on explicitly built matrices."""

import pytest
import torch

import tangent_kernels as tk
from _models import mlp


def _jacobian(n=9, k=3, p=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, p, generator=g, dtype=torch.float64)


def _forms(J):
    full = torch.einsum("iap,jbp->ijab", J, J)
    return full, full.diagonal(dim1=2, dim2=3).contiguous()


def _matrix_of_full(full):
    n, _, k, _ = full.shape
    return full.permute(0, 2, 1, 3).reshape(n * k, n * k)  # row i k + a


def _matrix_of_diagonal(diagonal):
    n, _, k = diagonal.shape
    M = torch.zeros(n, k, n, k, dtype=diagonal.dtype)
    for a in range(k):
        M[:, a, :, a] = diagonal[..., a]
    return M.reshape(n * k, n * k)


def _alignment(M, y, centered, n, k):
    """The definition on the kn x kn matrix M, targets y [n k]; centering over samples
    within each logit: H' = H_n (x) I_k."""
    if centered:
        H = torch.kron(torch.eye(n, dtype=torch.float64) - 1.0 / n, torch.eye(k, dtype=torch.float64))
        M, y = H @ M @ H, H @ y
    T = torch.outer(y, y)
    return float((M * T).sum() / (M.norm() * T.norm()))


@pytest.mark.parametrize("form", ["full", "diagonal"])
def test_spectrum_of_every_logit_kernels(form):
    full, diagonal = _forms(_jacobian())
    K, M = (full, _matrix_of_full(full)) if form == "full" else (diagonal, _matrix_of_diagonal(diagonal))
    spec = tk.analysis.spectrum(K)
    expected = torch.linalg.eigvalsh(M).flip(0)
    assert spec.eigenvalues.shape == (27,) and torch.allclose(spec.eigenvalues, expected, rtol=1e-10, atol=1e-10)
    assert spec.trace == pytest.approx(float(M.trace()), rel=1e-12)
    assert spec.effective_dimension == pytest.approx(float(M.trace()) ** 2 / float((M * M).sum()), rel=1e-10)
    assert tk.analysis.degrees_of_freedom(K, 0.5) == pytest.approx(
        float((M @ torch.linalg.inv(M + 0.5 * torch.eye(27, dtype=torch.float64))).trace()), rel=1e-9)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("form", ["full", "diagonal"])
def test_alignment_of_every_logit_kernels(form, centered):
    full, diagonal = _forms(_jacobian(seed=1))
    K, M = (full, _matrix_of_full(full)) if form == "full" else (diagonal, _matrix_of_diagonal(diagonal))
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2])
    Y = torch.nn.functional.one_hot(labels, 3).double()
    expected = _alignment(M, Y.reshape(-1), centered, 9, 3)
    assert tk.analysis.alignment(K, labels, centered=centered) == pytest.approx(expected, rel=1e-10)
    targets = torch.randn(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = _alignment(M, targets.reshape(-1), centered, 9, 3)
    assert tk.analysis.alignment(K.numpy(), targets.numpy(), centered=centered) == pytest.approx(expected, rel=1e-10)


def test_the_forms_of_tk_gram_agree():
    """Integration: the full kernel's kn eigenvalues sum to the trace form's trace, and
    the diagonal's eigenvalues are the per-logit kernels' together."""
    torch.manual_seed(3)
    model, x = mlp(3), torch.randn(8, 6)
    K = {form: tk.gram(model, [x], output=form, precision="fp64", progress=False)
         for form in ("full", "trace", "diagonal")}
    traces = {form: tk.analysis.spectrum(K[form]).trace for form in K}
    assert traces["full"] == pytest.approx(traces["trace"], rel=1e-10)
    assert traces["diagonal"] == pytest.approx(traces["trace"], rel=1e-10)
    per_logit = torch.cat([tk.analysis.spectrum(K["diagonal"][..., a]).eigenvalues for a in range(3)])
    assert torch.allclose(tk.analysis.spectrum(K["diagonal"]).eigenvalues, per_logit.sort(descending=True).values,
                          rtol=1e-10, atol=1e-12)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    assert all(-1 <= tk.analysis.alignment(K[form], y) <= 1 for form in K)


def test_bad_every_logit_kernels_say_what_is_wrong():
    full, diagonal = _forms(_jacobian())
    with pytest.raises(ValueError, match=r"n1 = n2; got shape \(9, 4, 3, 3\)"):
        tk.analysis.spectrum(full[:, :4])
    with pytest.raises(ValueError, match=r"\[n, n, k\] \(output='diagonal'\) with n1 = n2"):
        tk.analysis.alignment(diagonal[:, :4], torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="Y needs 3 target columns"):
        tk.analysis.alignment(full, torch.randn(9, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="not symmetric"):
        tk.analysis.spectrum(diagonal + torch.randn(9, 9, 3, dtype=torch.float64))
