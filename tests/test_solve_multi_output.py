"""KernelRidge on the full k x k eNTK (tk.gram(..., output="full")), against a float64
reference built from per-sample Jacobians: one linear system over (sample, output) pairs."""

import pytest
import torch
from torch import nn

import tangent_kernels as tk


def problem(seed=0, k=3):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, k)).double()
    X = torch.randn(70, 5, generator=g, dtype=torch.float64)
    labels = (X[:, :k] + 0.3 * torch.randn(70, k, generator=g, dtype=torch.float64)).argmax(1)
    return model, X, labels


def jacobians(model, X):
    """[n, k, p] per-sample Jacobians of all k outputs, one sample at a time (float64)."""
    params = [p for p in model.parameters()]
    rows = []
    for x in X:
        out = model(x[None])[0]
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[a], params,
                                                                                      retain_graph=True)])
                                 for a in range(out.numel())]))
    return torch.stack(rows)


def test_full_kernel_ridge_matches_the_flattened_float64_system():
    model, X, labels = problem()
    tr, va, te = X[:40], X[40:55], X[55:]
    K = tk.gram(model, [tr], output="full", precision="fp64", progress=False)
    K_val = tk.gram(model, [va], None, [tr], output="full", precision="fp64", progress=False)
    K_test = tk.gram(model, [te], None, [tr], output="full", precision="fp64", progress=False)
    assert K.shape == (40, 40, 3, 3) and K_val.shape == (15, 40, 3, 3)
    beta = 1e-2
    kr = tk.KernelRidge(betas=[beta, 1.0], tol=1e-12).fit(K, labels[:40], K_val, labels[40:55])
    J, Jt = jacobians(model, tr).reshape(120, -1), jacobians(model, te).reshape(45, -1)
    Y = torch.nn.functional.one_hot(labels[:40], 3).double().reshape(120)
    b = kr.best_beta_
    alpha = torch.linalg.solve(J @ J.T + b * torch.eye(120, dtype=torch.float64), Y)
    torch.testing.assert_close(kr.dual_coef_, alpha.view(40, 3), rtol=1e-6, atol=1e-9)
    scores = (Jt @ J.T @ alpha).view(15, 3)
    torch.testing.assert_close(kr.predict(K_test), scores, rtol=1e-6, atol=1e-9)
    assert kr.n_outputs_ == 3 and kr.dual_coefs_.shape == (2, 40, 3)
    assert torch.equal(kr.predict_labels(K_test), scores.argmax(1))


def test_full_kernel_shapes_and_selection_are_checked():
    model, X, labels = problem(seed=1)
    K = tk.gram(model, [X[:30]], output="full", progress=False)
    K_val = tk.gram(model, [X[30:40]], None, [X[:30]], output="full", progress=False)
    with pytest.raises(ValueError, match="chooses beta on validation data"):
        tk.KernelRidge(betas=[1e-2, 1e-1]).fit(K, labels[:30])
    with pytest.raises(ValueError, match="needs 3 target columns"):
        tk.KernelRidge(betas=1e-2).fit(K, torch.randn(30, 2))
    with pytest.raises(ValueError, match=r"K_val must be a multi-output kernel \[n1, n2, 3, 3\]"):
        tk.KernelRidge(betas=[1e-2, 1.0]).fit(K, labels[:30], K_val[..., :2, :2], labels[30:40])
    kr = tk.KernelRidge(betas=1e-2).fit(K, labels[:30])
    with pytest.raises(ValueError, match="K_test must be a multi-output kernel"):
        kr.predict(K_val[:, :, 0, 0])
    flat = tk.KernelRidge(betas=1e-2).fit(K[:, :, 0, 0], labels[:30])
    with pytest.raises(ValueError, match="fit's K was \\[n, n\\]"):
        flat.predict(K_val)
    assert kr.predict(K_val).shape == (10, 3)
