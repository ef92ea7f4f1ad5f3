"""Solvers that share one factor or one sketch across betas (krylov, cg / nesterov with a
Nystrom preconditioner) and ``solver="auto"``, against float64 ``torch.linalg.solve`` on
kernels with eNTK-like power-law spectra (cond(K + beta I) up to 1e7)."""

import math
import re
import warnings

import pytest
import torch

from tangent_kernels.solve import ConvergenceWarning, KernelRidge, solve
from tangent_kernels.solvers import auto as auto_module
from conftest import exact_solution, rel_err

# Matrices here are tiny: with OpenMP threads on oversubscribed cores each GEMM spin-waits.
pytestmark = pytest.mark.usefixtures("one_thread")


def power_law(n, decay, seed, dtype=torch.float64):
    """K = Q diag(lam) Q^T, lam_i ~ i^-decay scaled to mean diag 1; one-hot-like targets."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    lam = torch.arange(1, n + 1, dtype=torch.float64).pow(-decay)
    lam *= n / lam.sum()
    K = (Q * lam) @ Q.T
    labels = torch.randint(0, 4, (n,), generator=g)
    return ((K + K.T) / 2).to(dtype), torch.nn.functional.one_hot(labels, 4).to(dtype), float(lam[0])


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
        assert rel_err(alpha[j], exact_solution(K, Y, b)) <= 1e-9 * (lam1 + b) / b
    assert info["converged"] == [True] * 3


def test_krylov_float32_kernel_to_1e3_with_a_float32_factor():
    K, Y, _ = power_law(300, 1.3, seed=2, dtype=torch.float32)
    betas = [1e-3 * 10 ** (i / 3) for i in range(10)]  # 3 decades: one group, one factor
    alpha, info = solve(K, Y, betas, "krylov", tol=1e-3, return_info=True)
    # Whether float32 certifies every beta here or a float64 attempt finishes some is
    # rounding's call (CPU, BLAS build, threads); the contract is the residual.
    assert info["factors"] == 1 and info["precisions"][0] == "factor float32, basis float32"
    assert info["converged"] == [True] * 10
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


def spike(n, seed):
    """K = 2^20 1 1^T + diag(d), d in multiples of 1/8 from 1/8 to 4: every entry is exact in
    float32, so the float32 K is exactly this PSD matrix (lambda_max ~ 2^20 n, lambda_min
    >= 1/8), and targets with zero column sums lie where d is, away from the spike."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randint(1, 33, (n,), generator=g, dtype=torch.float64) / 8
    K = 2.0**20 * torch.ones(n, n, dtype=torch.float64) + torch.diag(d)
    Y = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return K.float(), (Y - Y.mean(0)).float()


def test_krylov_retries_in_float64_where_float32_cannot_certify_tol():
    # float32 products K V err by ~ eps32 lambda_max ||v|| ~ 16 ||v||, and the solution for
    # beta = 0.1 lives where K's eigenvalues are <= 4: no rounding can certify 1e-3 there
    # (float32 leaves residuals of O(1)), while beta = 1e8 ~ lambda_max / 3 is within 1e-6 in
    # float32 whatever the rounding. Groups run in ascending beta order, so only the first
    # group (beta 0.1) has a float64 attempt.
    K, Y = spike(256, seed=12)
    assert torch.equal(K.double(), 2.0**20 + torch.diag(K.double().diagonal() - 2.0**20))  # exact in float32
    betas = [0.1, 1e8]
    alpha, info = solve(K, Y, betas, "krylov", tol=1e-3, dtype=torch.float64, return_info=True)
    assert info["precisions"] == ["factor float32, basis float32", "factor float64, basis float64",
                                  "factor float32, basis float32"]
    assert info["converged"] == [True] * 2
    for j, b in enumerate(betas):
        assert residual(K, Y, b, alpha[j]) <= 1e-3


@pytest.mark.parametrize("solver", ["krylov", "auto"])
@pytest.mark.parametrize("decay", [0.0, 2.0])
def test_a_float32_psd_kernel_with_rounding_negative_eigenvalues_is_solved(solver, decay):
    # F F^T of rank 20 at n = 300 in float32: rounding leaves eigenvalues near -1e-5 of a
    # lambda_max near 300 (3e-8 of it). krylov's space is drawn to K's small end, where
    # those are: it once refused such a K as "not PSD", quoting a Ritz value of that space.
    g = torch.Generator().manual_seed(20)
    F = torch.randn(300, 20, generator=g) * torch.arange(1, 21).pow(-decay / 2)
    K = F @ F.T
    Y = torch.nn.functional.one_hot(torch.randint(0, 4, (300,), generator=g), 4).float()
    eigenvalues = torch.linalg.eigvalsh(K.double())
    assert -1e-6 * eigenvalues[-1] < eigenvalues[0] < 0  # indefinite by rounding alone
    betas = [1e-2, 1e-1, 1.0]  # cond(K + beta I) up to ~3e4: within float64 coefficients' reach
    alpha, info = solve(K, Y, betas, solver, tol=1e-3, dtype=torch.float64, return_info=True)
    assert info["converged"] == [True] * 3
    for j, b in enumerate(betas):
        assert residual(K, Y, b, alpha[j]) <= 1e-3
    # A beta below the rounding (K + beta I is indefinite as stored) is not the user's fault
    # either: a finite answer and at most a ConvergenceWarning, never "not PSD".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        assert torch.isfinite(solve(K, Y, [1e-7, 1e-2], solver)).all()


@pytest.mark.parametrize("solver", ["krylov", "auto"])
@pytest.mark.parametrize("depth", [0.05, 1.0])
def test_krylov_refuses_a_kernel_indefinite_beyond_rounding_quoting_its_spectrum(solver, depth):
    g = torch.Generator().manual_seed(21)
    F = torch.randn(300, 20, generator=g)
    v = torch.randn(300, 1, generator=g)
    K = F @ F.T
    largest = float(torch.linalg.eigvalsh(K.double())[-1])
    K -= depth * largest * (v @ v.T) / (v.T @ v)  # one eigenvalue near -depth * lambda_max
    smallest = float(torch.linalg.eigvalsh(K.double())[0])
    with pytest.raises(ValueError, match="K is not positive semi-definite") as raised:
        solve(K, torch.randn(300, 2, generator=g), [1e-3, 1e-2], solver)
    quoted, top = (float(x) for x in re.search(r"about (\S+) \(largest (\S+)\)", str(raised.value)).groups())
    # K's own estimates: a Rayleigh quotient (>= the smallest eigenvalue) and lambda_max
    # by subspace iteration, not the Ritz values of a preconditioned space.
    assert smallest <= quoted + 5e-3 * abs(quoted) and quoted < -1e-2 * top  # quoted to 3 digits
    assert top == pytest.approx(largest, rel=0.05)


def test_krylov_splits_a_wide_beta_range_into_groups():
    K, Y, _ = power_law(200, 1.2, seed=4)
    betas = [10.0 ** e for e in range(-6, 3)]  # the telescopic search's first round: 8 decades
    alpha, info = solve(K, Y, betas, "krylov", tol=1e-8, return_info=True)
    assert info["factors"] == 3
    assert all(c > 0 for c in info["centers"])
    for j, b in enumerate(betas):
        assert rel_err(alpha[j], exact_solution(K, Y, b)) <= 1e-8 * (float(torch.linalg.eigvalsh(K)[-1]) + b) / b


def test_krylov_targets_of_low_rank_and_zero_targets():
    K, Y, _ = power_law(120, 1.2, seed=5)
    Y2 = torch.cat([Y[:, :1], Y[:, :1], torch.zeros_like(Y[:, :1])], dim=1)  # rank 1 of 3 columns
    alpha = solve(K, Y2, [1e-2, 1e-1], "krylov", tol=1e-10)
    for j, b in enumerate([1e-2, 1e-1]):
        torch.testing.assert_close(alpha[j], exact_solution(K, Y2, b), rtol=0, atol=1e-7)
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
        assert rel_err(alpha[j], exact_solution(K, Y, b)) <= 1e-9 * 1e4


def test_warm_start_path_starts_each_beta_from_the_previous_solution():
    K, Y, _ = power_law(200, 1.3, seed=11)
    betas = [1e-3, 1e-2, 1e-1, 1.0]
    alpha, path = solve(K, Y, betas, "cg", precond_rank=30, tol=1e-8, warm_start=True, return_info=True)
    assert path["converged"] == [True] * 4
    for j, b in enumerate(betas):
        assert residual(K, Y, b, alpha[j]) <= 1e-8 * 1.01
    # The largest beta starts from zero: the very computation of a cold solve of it alone.
    _, cold = solve(K, Y, [1.0], "cg", precond_rank=30, tol=1e-8, return_info=True)
    assert path["n_iter"][3] == cold["n_iter"][0]
    # Each next beta starts from its neighbour's solution: 0.1% apart, its initial residual
    # is ~1e-3 of a cold start's, worth about half of the steps (measured 17 of 32).
    close = [1e-2 * (1 + i * 1e-3) for i in range(4)]
    _, block = solve(K, Y, close, "cg", precond_rank=30, tol=1e-8, return_info=True)
    _, path = solve(K, Y, close, "cg", precond_rank=30, tol=1e-8, warm_start=True, return_info=True)
    assert path["converged"] == [True] * 4
    assert all(p < 0.75 * b for p, b in zip(path["n_iter"][:3], block["n_iter"][:3]))
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
        assert rel_err(alpha[j], exact_solution(K, Y, b)) <= 1e-10
