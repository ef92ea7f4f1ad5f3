"""Solvers that share one factor or one sketch across betas (krylov, cg / nesterov with a
Nystrom preconditioner) and ``solver="auto"``, against float64 ``torch.linalg.solve`` on
kernels with eNTK-like power-law spectra (cond(K + beta I) up to 1e7)."""

import math
import warnings

import pytest
import torch

from tangent_kernels.solve import ConvergenceWarning, KernelRidge, solve
from tangent_kernels.solvers import auto as auto_module


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs: OpenMP spin-waits cost more than the work
    yield
    torch.set_num_threads(threads)


def power_law(n, decay, seed, dtype=torch.float64):
    """K = Q diag(lam) Q^T, lam_i ~ i^-decay scaled to mean diag 1; one-hot-like targets."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    lam = torch.arange(1, n + 1, dtype=torch.float64).pow(-decay)
    lam *= n / lam.sum()
    K = (Q * lam) @ Q.T
    labels = torch.randint(0, 4, (n,), generator=g)
    return ((K + K.T) / 2).to(dtype), torch.nn.functional.one_hot(labels, 4).to(dtype), float(lam[0])


def exact(K, Y, beta):
    A = K.double() + beta * torch.eye(K.shape[0], dtype=torch.float64)
    return torch.linalg.solve(A, Y.double())


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def residual(K, Y, beta, alpha):
    K64, Y64, a64 = K.double(), Y.double(), alpha.double()
    return float((K64 @ a64 + beta * a64 - Y64).norm() / Y64.norm())


SHARED = {
    "krylov": dict(),
    "krylov+none": dict(precond=None),
    "cg+nystrom": dict(precond_rank=40),
    "cg+nystrom+path": dict(precond_rank=40, warm_start=True),
    "nesterov+nystrom": dict(precond_rank=40, eval_every=1),
}


# nesterov needs ~ sqrt((lam_r + beta) / beta) ln(1 / tol) steps: at cond 1e7 that is
# 10^4+ of them, so it is checked at cond 1e3 only.
CASES = [(name, decay, beta_min) for name in SHARED for decay, beta_min in [(1.0, 1e-3), (1.5, 1e-5)]
         if not (name == "nesterov+nystrom" and beta_min < 1e-4)]


@pytest.mark.parametrize("name, decay, beta_min", CASES)
def test_every_beta_matches_float64_solve(name, decay, beta_min):
    n = 160
    K, Y, lam1 = power_law(n, decay, seed=1)
    betas = [beta_min, math.sqrt(beta_min), 1.0]
    cond = (lam1 + beta_min) / beta_min
    assert cond >= 1e3 if decay == 1.0 else cond >= 1e6  # the conditioning claimed above
    solver = name.split("+")[0]
    kw = dict(SHARED[name], tol=1e-9, max_iter=20_000 if solver == "nesterov" else 2000)
    alpha, info = solve(K, Y, betas, solver, return_info=True, **kw)
    for j, b in enumerate(betas):
        # tol bounds the residual; the error is at most cond(K + b I) times that.
        assert residual(K, Y, b, alpha[j]) <= 1e-9 * 1.01
        assert rel(alpha[j], exact(K, Y, b)) <= 1e-9 * (lam1 + b) / b
    assert info["converged"] == [True] * 3


def test_krylov_float32_kernel_to_1e3_with_a_float32_factor():
    K, Y, _ = power_law(300, 1.3, seed=2, dtype=torch.float32)
    betas = [1e-3 * 10 ** (i / 3) for i in range(10)]  # 3 decades: one group, one factor
    alpha, info = solve(K, Y, betas, "krylov", tol=1e-3, return_info=True)
    assert info["factors"] == 1 and info["precisions"] == ["factor float32, basis float32"]
    for j, b in enumerate(betas):
        assert residual(K, Y, b, alpha[j]) <= 1e-3
        assert abs(residual(K, Y, b, alpha[j]) - info["residual"][j]) <= 1e-5  # reported = measured


def test_krylov_float32_kernel_below_float32_products_goes_float64():
    K, Y, _ = power_law(300, 1.3, seed=3, dtype=torch.float32)
    betas = [1e-3, 1e-2, 1e-1]
    alpha, info = solve(K, Y, betas, "krylov", tol=1e-8, dtype=torch.float64, return_info=True)
    assert info["precisions"] == ["factor float64, basis float64"]
    for j, b in enumerate(betas):
        assert residual(K, Y, b, alpha[j]) <= 1e-8


def test_krylov_retries_in_float64_where_float32_cannot_certify_tol():
    # cond(K + beta I) ~ 1e7 in float32: float32 products K V cannot certify 1e-3 for the
    # smallest betas (they stall); those betas, and only those, are solved again in float64.
    K, Y, _ = power_law(600, 1.9, seed=12, dtype=torch.float32)
    betas = [1e-4, 1e-3, 1e-2, 1e-1]
    alpha, info = solve(K, Y, betas, "krylov", tol=1e-3, return_info=True)
    assert info["precisions"] == ["factor float32, basis float32", "factor float64, basis float64"]
    assert info["converged"] == [True] * 4
    for j, b in enumerate(betas):
        assert residual(K, Y, b, alpha[j]) <= 1e-3


def test_krylov_splits_a_wide_beta_range_into_groups():
    K, Y, _ = power_law(200, 1.2, seed=4)
    betas = [10.0 ** e for e in range(-6, 3)]  # the telescopic search's first round: 8 decades
    alpha, info = solve(K, Y, betas, "krylov", tol=1e-8, return_info=True)
    assert info["factors"] == 3
    assert all(c > 0 for c in info["centers"])
    for j, b in enumerate(betas):
        assert rel(alpha[j], exact(K, Y, b)) <= 1e-8 * (float(torch.linalg.eigvalsh(K)[-1]) + b) / b


def test_krylov_targets_of_low_rank_and_zero_targets():
    K, Y, _ = power_law(120, 1.2, seed=5)
    Y2 = torch.cat([Y[:, :1], Y[:, :1], torch.zeros_like(Y[:, :1])], dim=1)  # rank 1 of 3 columns
    alpha = solve(K, Y2, [1e-2, 1e-1], "krylov", tol=1e-10)
    for j, b in enumerate([1e-2, 1e-1]):
        torch.testing.assert_close(alpha[j], exact(K, Y2, b), rtol=0, atol=1e-7)
    assert torch.equal(solve(K, torch.zeros(120, 2, dtype=torch.float64), [1e-2], "krylov"),
                       torch.zeros(1, 120, 2, dtype=torch.float64))


def test_krylov_beta_zero_on_a_singular_kernel_reports_no_convergence():
    g = torch.Generator().manual_seed(6)
    F = torch.randn(50, 5, generator=g, dtype=torch.float64)
    K = F @ F.T  # rank 5
    Y = torch.randn(50, 2, generator=g, dtype=torch.float64)
    with pytest.warns(ConvergenceWarning, match="krylov stopped above tol"):
        alpha, info = solve(K, Y, [0.0, 1.0], "krylov", return_info=True)
    assert torch.isfinite(alpha).all()
    assert info["converged"] == [False, True]


def test_preconditioned_nesterov_converges_where_plain_nesterov_does_not():
    K, Y, _ = power_law(300, 1.3, seed=7)
    betas = [1e-3, 1e-2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        plain = solve(K, Y, betas, "nesterov", tol=1e-3, max_iter=300, eval_every=5, return_info=True)[1]
    pre = solve(K, Y, betas, "nesterov", precond_rank=60, tol=1e-3, max_iter=300, eval_every=5, return_info=True)[1]
    assert not all(plain["converged"]) and all(pre["converged"])
    assert max(pre["n_iter"]) < 300 and pre["precond_rank"] == 60


def test_preconditioned_nesterov_early_stopping_keeps_the_best_validation_iterate():
    g = torch.Generator().manual_seed(8)
    X = torch.randn(140, 6, generator=g, dtype=torch.float64)
    K_all = torch.exp(-torch.cdist(X, X) ** 2 / 4)
    y = torch.sin(X[:, :1] * 2) + 0.5 * torch.randn(140, 1, generator=g, dtype=torch.float64)
    K, Kv, ytr, yv = K_all[:100, :100], K_all[100:, :100], y[:100], y[100:]
    kr = KernelRidge(betas=0.0, solver="nesterov", precond_rank=20, max_iter=400, eval_every=5,
                     tol=1e-12).fit(K, ytr, Kv, yv)
    h = kr.history_[0]
    best = min(range(len(h["val_loss"])), key=lambda i: h["val_loss"][i])
    assert h["best_iteration"] == h["iteration"][best]
    assert float((Kv @ kr.dual_coef_ - yv).pow(2).mean()) == pytest.approx(h["val_loss"][best], rel=1e-9)


def test_auto_reports_its_choice():
    K, Y, _ = power_law(100, 1.2, seed=9)
    labels = Y.argmax(1)
    _, info = solve(K, Y, [1e-2, 1e-1], return_info=True)
    assert info["solver"] == "krylov" and "Cholesky factor" in info["solver_reason"]
    _, info = solve(K, Y, 1e-2, "cholesky", return_info=True)
    assert info["solver"] == "cholesky" and info["solver_reason"] is None
    loo = KernelRidge(betas=(1e-2, 1e-1)).fit(K, labels)
    assert loo.solver_ == "eigh" and "leave-one-out" in loo.solver_reason_
    val = KernelRidge(betas=(1e-2, 1e-1)).fit(K[:80, :80], labels[:80], K[80:, :80], labels[80:])
    assert val.solver_ == "krylov"
    assert KernelRidge(betas=1e-2, solver="cg").fit(K, labels).solver_reason_ == "chosen by the caller"


def test_auto_falls_back_to_nystrom_cg_when_a_factor_does_not_fit(monkeypatch):
    K, Y, _ = power_law(100, 1.2, seed=10)
    monkeypatch.setattr(auto_module, "_free_bytes", lambda device: 1000)
    alpha, info = solve(K, Y, [1e-2, 1e-1], tol=1e-9, return_info=True)
    assert info["solver"] == "cg" and info["precond_rank"] == 25 and "does not fit" in info["solver_reason"]
    for j, b in enumerate([1e-2, 1e-1]):
        assert rel(alpha[j], exact(K, Y, b)) <= 1e-9 * 1e4


def test_warm_start_path_starts_each_beta_from_the_previous_solution():
    K, Y, _ = power_law(200, 1.3, seed=11)
    betas = [1e-3, 1e-2, 1e-1, 1.0]
    _, block = solve(K, Y, betas, "cg", precond_rank=30, tol=1e-8, return_info=True)
    alpha, path = solve(K, Y, betas, "cg", precond_rank=30, tol=1e-8, warm_start=True, return_info=True)
    assert path["converged"] == [True] * 4
    # The largest beta starts from zero, as in the block; the next ones need fewer steps.
    assert path["n_iter"][3] == block["n_iter"][3]
    assert sum(path["n_iter"][:3]) < sum(block["n_iter"][:3])
    for j, b in enumerate(betas):
        assert residual(K, Y, b, alpha[j]) <= 1e-8 * 1.01
    with pytest.raises(ValueError, match="warm_start applies to solver='cg' only"):
        solve(K, Y, betas, "krylov", warm_start=True)


def test_a_row_shard_goes_to_the_distributed_solvers_and_not_to_kernel_ridge():
    from tangent_kernels.distributed import KShard

    K, Y, _ = power_law(20, 1.2, seed=13)
    shard = KShard(rows=K, row_start=0, shape=(20, 20), row_offsets=(0, 20), rank=0, world_size=1, symmetric=True)
    with pytest.raises(TypeError, match=r"KernelRidge.fit takes a whole K; for a row-sharded K"):
        KernelRidge(betas=1e-2).fit(shard, Y)
    with pytest.raises(ValueError, match=r"a row-sharded K \(tk.distributed.KShard\) is solved by 'cg' or 'nesterov'"):
        solve(shard, Y, 1e-2, "krylov")


def test_auto_takes_cholesky_for_many_target_columns():
    K, _, _ = power_law(120, 1.2, seed=14)
    Y = torch.randn(120, 80, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    alpha, info = solve(K, Y, [1e-2, 1e-1], return_info=True)
    assert info["solver"] == "cholesky" and "80 target columns" in info["solver_reason"]
    for j, b in enumerate([1e-2, 1e-1]):
        assert rel(alpha[j], exact(K, Y, b)) <= 1e-10
