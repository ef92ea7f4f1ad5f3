"""Kernel ridge solvers (tangent_kernels.solve) against float64 references.

References: torch.linalg.solve on K + beta I, scikit-learn's KernelRidge, and brute-force
leave-one-out. Problems are small (n <= 120) and seeded per test.
"""

import math
import warnings

import numpy as np
import pytest
import torch

from tangent_kernels.solve import ConvergenceWarning, KernelRidge, NotFittedError, solve
from conftest import exact_solution, rel_err

# Matrices here are tiny: with OpenMP threads on oversubscribed cores each GEMM spin-waits.
pytestmark = pytest.mark.usefixtures("one_thread")

SOLVERS = ["nesterov", "nesterov+nystrom", "cg", "cg+nystrom", "krylov", "krylov+none", "eigh", "cholesky",
           "auto"]
# Iterative solvers get a tight tol so that their error bound (cond * tol) sits below the
# comparison tolerance on well-conditioned problems.
TIGHT = dict(tol=1e-11, max_iter=20_000)


def args_for(solver):
    if solver == "cg+nystrom":
        return "cg", dict(precond_rank=10, **TIGHT)
    if solver == "nesterov+nystrom":
        return "nesterov", dict(precond_rank=10, **TIGHT)
    if solver == "krylov+none":
        return "krylov", dict(precond=None, **TIGHT)
    if solver in ("nesterov", "cg", "krylov", "auto"):
        return solver, dict(TIGHT)
    return solver, {}


def spd(n, cond, seed, dtype=torch.float64):
    """Q diag(lam) Q^T with lam log-spaced from 1 down to 1/cond."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    lam = torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)
    K = (Q * lam) @ Q.T
    return ((K + K.T) / 2).to(dtype)


def gaussian_problem(n, n_val, seed, classes=3, noise=0.0):
    """RBF kernel on random points: K [n, n], K_val [n_val, n], labels and targets."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n + n_val, 4, generator=g, dtype=torch.float64)
    Kall = torch.exp(-torch.cdist(X, X) ** 2 / 8)
    w = torch.randn(4, classes, generator=g, dtype=torch.float64)
    f = torch.sin(X @ w)
    labels = (f + noise * torch.randn(f.shape, generator=g, dtype=torch.float64)).argmax(1)
    y = f + noise * torch.randn(f.shape, generator=g, dtype=torch.float64)
    return Kall[:n, :n], Kall[n:, :n], labels[:n], labels[n:], y[:n], y[n:]


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("solver", SOLVERS)
def test_matches_linalg_solve_well_conditioned(solver):
    g = torch.Generator().manual_seed(1)
    K = spd(60, cond=1e3, seed=1)
    Y = torch.randn(60, 3, generator=g, dtype=torch.float64)
    betas = [1e-3, 1e-2, 0.1]
    name, kw = args_for(solver)
    alpha = solve(K, Y, betas, name, **kw)
    assert alpha.shape == (3, 60, 3) and alpha.dtype == torch.float64
    for j, b in enumerate(betas):
        assert rel_err(alpha[j], exact_solution(K, Y, b)) <= 1e-6


@pytest.mark.parametrize("solver", SOLVERS)
def test_matches_linalg_solve_ill_conditioned(solver):
    # cond(K + beta I) = 1e5 (K itself: 1e12). Documented bounds on the relative error:
    # exact solvers cond * eps * n ~ 1e-9; iterative ones cond * tol = 1e-5 at tol = 1e-10
    # (fp64 cannot take the residual much below eps * cond = 2e-11 here).
    g = torch.Generator().manual_seed(2)
    K = spd(60, cond=1e12, seed=2)
    Y = torch.randn(60, 2, generator=g, dtype=torch.float64)
    beta = 1e-5
    name, kw = args_for(solver)
    kw["tol"] = 1e-10
    alpha, info = solve(K, Y, beta, name, return_info=True, **kw)
    bound = 1e-9 if name in ("eigh", "cholesky") else 1e-5
    assert rel_err(alpha, exact_solution(K, Y, beta)) <= bound
    assert info["residual"][0] <= 1e-10


@pytest.mark.parametrize("solver", ["eigh", "cholesky"])
def test_float32_kernel_exact_solvers_round_correctly(solver):
    # fp32 K stays fp32; fp64 refinement makes the fp32 coefficients the correctly rounded
    # solution of the fp32 system (error ~ eps32), where plain fp32 would give cond * eps32.
    g = torch.Generator().manual_seed(3)
    K = spd(80, cond=1e4, seed=3, dtype=torch.float32)
    Y = torch.randn(80, 2, generator=g)
    alpha = solve(K, Y, 1e-4, solver)
    assert alpha.dtype == torch.float32
    assert rel_err(alpha, exact_solution(K, Y, 1e-4)) <= 1e-6
    with pytest.warns(ConvergenceWarning, match=f"{solver} ended above tol=1e-06"):
        unrefined = solve(K, Y, 1e-4, solver, refine=False, tol=1e-6)
    assert rel_err(unrefined, exact_solution(K, Y, 1e-4)) > 10 * rel_err(alpha, exact_solution(K, Y, 1e-4))


@pytest.mark.parametrize("solver", ["nesterov", "cg+nystrom"])
def test_float32_kernel_iterative_solvers(solver):
    # fp32 iterative solvers stop at the fp32 floor (~ cond * eps32 relative error); the
    # documented bound for cond(K + beta I) = 1e3 is 1e-4.
    g = torch.Generator().manual_seed(4)
    K = spd(80, cond=1e3, seed=4, dtype=torch.float32)
    Y = torch.randn(80, 2, generator=g)
    name, kw = args_for(solver)
    kw.update(tol=1e-6, max_iter=3000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        alpha = solve(K, Y, 1e-3, name, **kw)
    assert alpha.dtype == torch.float32
    assert rel_err(alpha, exact_solution(K, Y, 1e-3)) <= 1e-4


def test_cholesky_falls_back_to_float64_factors():
    # cond(K + beta I) = 1e9: whether float32 breaks down or refinement stalls there is
    # rounding's call; either way the beta ends on float64 factors and is accurate (bound:
    # cond * eps * n ~ 1e-5), and cond 1e5 is accurate to float64's rounding.
    K = spd(60, cond=1e12, seed=31)
    Y = torch.randn(60, 2, generator=torch.Generator().manual_seed(31), dtype=torch.float64)
    alpha, info = solve(K, Y, [1e-9, 1e-5], "cholesky", return_info=True)
    assert info["factor_dtypes"][0] == "float64"
    assert rel_err(alpha[0], exact_solution(K, Y, 1e-9)) <= 1e-5
    assert rel_err(alpha[1], exact_solution(K, Y, 1e-5)) <= 1e-9
    # The path, forced: J = 1 1^T plus 1e-8 I rounds to J itself in float32 (1 + 1e-8 == 1),
    # and every step of J's elimination is exact, so the float32 factorization meets a zero
    # pivot on any machine; float64 holds the 1e-8 (cond 6e9, bound cond * eps * n ~ 1e-4).
    J = torch.ones(60, 60, dtype=torch.float64)
    alpha, info = solve(J, Y, 1e-8, "cholesky", return_info=True)
    assert info["factor_dtypes"] == ["float64"]
    assert rel_err(alpha, exact_solution(J, Y, 1e-8)) <= 1e-4
    # And where float32 provably factors (Demmel: 20 n^1.5 eps32 cond < 1 at cond 100), it
    # keeps its float32 factor, refined to float64's accuracy.
    K = spd(60, cond=100, seed=32)
    alpha, info = solve(K, Y, 0.0, "cholesky", return_info=True)
    assert info["factor_dtypes"] == ["float32"]
    assert rel_err(alpha, exact_solution(K, Y, 0.0)) <= 1e-13


def test_float64_result_from_float32_kernel():
    g = torch.Generator().manual_seed(5)
    K = spd(50, cond=1e3, seed=5, dtype=torch.float32)
    Y = torch.randn(50, 2, generator=g)
    alpha = solve(K, Y, 1e-3, "cholesky", dtype=torch.float64)
    assert alpha.dtype == torch.float64
    assert rel_err(alpha, exact_solution(K, Y, 1e-3)) <= 1e-12


def test_half_precision_kernel_is_upcast():
    g = torch.Generator().manual_seed(6)
    K = spd(40, cond=10, seed=6, dtype=torch.float16)
    Y = torch.randn(40, 2, generator=g)
    alpha = solve(K, Y, 0.1, "eigh")
    assert alpha.dtype == torch.float32
    assert rel_err(alpha, exact_solution(K.float(), Y, 0.1)) <= 1e-6


@pytest.mark.parametrize("solver", SOLVERS)
def test_batched_betas_equal_separate_solves(solver):
    g = torch.Generator().manual_seed(7)
    K = spd(50, cond=1e3, seed=7)
    Y = torch.randn(50, 2, generator=g, dtype=torch.float64)
    betas = [1e-3, 3e-2, 1.0]
    name, kw = args_for(solver)
    kw["tol"] = 1e-8
    batched, info = solve(K, Y, betas, name, return_info=True, **kw)
    for j, b in enumerate(betas):
        single, single_info = solve(K, Y, b, name, return_info=True, **kw)
        if info["solver"] == "krylov":
            # One space serves the group of betas, so a beta's iterates depend on its group:
            # both answers meet tol = 1e-8, so they agree to cond(K + beta I) * tol <= 1e-5.
            assert rel_err(batched[j], single) <= 1e-5
            assert max(info["residual"][j], single_info["residual"][0]) <= 1e-8
        else:
            torch.testing.assert_close(batched[j], single, rtol=1e-9, atol=1e-12)
            assert info["n_iter"][j] == single_info["n_iter"][0]


@pytest.mark.parametrize("solver", SOLVERS)
def test_one_sample_one_output(solver):
    K = torch.tensor([[2.0]], dtype=torch.float64)
    name, kw = args_for(solver)
    alpha = solve(K, torch.tensor([3.0], dtype=torch.float64), [0.0, 0.5], name, **kw)
    assert alpha.shape == (2, 1, 1)
    torch.testing.assert_close(alpha[:, 0, 0], torch.tensor([1.5, 3.0 / 2.5], dtype=torch.float64))


def test_one_output_from_1d_targets():
    g = torch.Generator().manual_seed(8)
    K = spd(30, cond=10, seed=8)
    y = torch.randn(30, generator=g, dtype=torch.float64)
    alpha = solve(K, y, 0.1, "cholesky")
    assert alpha.shape == (30, 1)
    torch.testing.assert_close(alpha, exact_solution(K, y[:, None], 0.1))
    kr = KernelRidge(betas=0.1, solver="eigh").fit(K, y)
    assert kr.predict(K[:5]).shape == (5, 1)


def test_zero_targets_give_zero_coefficients():
    K = spd(20, cond=10, seed=9)
    for solver in ("nesterov", "cg", "eigh", "cholesky"):
        alpha = solve(K, torch.zeros(20, 2, dtype=torch.float64), 0.1, solver)
        assert torch.count_nonzero(alpha) == 0


def test_beta_scale_trace():
    g = torch.Generator().manual_seed(10)
    K = 50 * spd(40, cond=100, seed=10)
    Y = torch.randn(40, 2, generator=g, dtype=torch.float64)
    scaled = solve(K, Y, 1e-2, "eigh", beta_scale="trace")
    torch.testing.assert_close(scaled, exact_solution(K, Y, 1e-2 * float(K.diagonal().mean())))
    kr = KernelRidge(betas=1e-2, solver="eigh", beta_scale="trace").fit(K, Y)
    assert kr.betas_ == [1e-2] and kr.beta_scale_ == pytest.approx(float(K.diagonal().mean()))


def test_numpy_inputs():
    K, Kv, _, _, y, _ = gaussian_problem(40, 10, seed=11)
    kr_np = KernelRidge(betas=0.1, solver="cholesky").fit(K.numpy(), y.numpy())
    kr_t = KernelRidge(betas=0.1, solver="cholesky").fit(K, y)
    out = kr_np.predict(Kv.numpy())
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, kr_t.predict(Kv))
    torch.testing.assert_close(solve(K.numpy(), y.numpy(), 0.1, "eigh"), exact_solution(K, y, 0.1))


@pytest.mark.parametrize("solver", SOLVERS)
def test_inputs_are_not_modified(solver):
    K32 = spd(30, cond=100, seed=32, dtype=torch.float32)
    y = torch.randn(30, 2, generator=torch.Generator().manual_seed(32))
    K_before, y_before = K32.clone(), y.clone()
    name, kw = args_for(solver)
    kw.update(tol=1e-4, max_iter=200)
    KernelRidge(betas=0.1, solver=name, **kw).fit(K32, y, K32[:5], y[:5], f0=y, f0_val=y[:5])
    assert torch.equal(K32, K_before) and torch.equal(y, y_before)


# ----------------------------------------------------------------------------- scikit-learn


@pytest.mark.parametrize("solver", SOLVERS)
def test_matches_sklearn_kernel_ridge(solver):
    sk_kernel_ridge = pytest.importorskip("sklearn.kernel_ridge").KernelRidge
    K, Kv, _, _, y, _ = gaussian_problem(60, 25, seed=12)
    beta = 0.05  # our beta is scikit-learn's alpha: both solve (K + alpha I) dual_coef = y
    sk = sk_kernel_ridge(alpha=beta, kernel="precomputed").fit(K.numpy(), y.numpy())
    name, kw = args_for(solver)
    kw.pop("max_iter", None), kw.pop("tol", None)
    kr = KernelRidge(betas=beta, solver=name, tol=1e-11, max_iter=20_000, **kw).fit(K, y)
    np.testing.assert_allclose(kr.predict(Kv).numpy(), sk.predict(Kv.numpy()), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(kr.dual_coef_.numpy(), sk.dual_coef_, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- early stopping


def noisy_interpolation_problem(seed):
    """beta = 0 on noisy targets: the converged interpolant overfits, early iterates do not."""
    g = torch.Generator().manual_seed(seed)
    n, nv = 80, 60
    X = torch.rand(n + nv, 1, generator=g, dtype=torch.float64) * 6
    K = torch.exp(-torch.cdist(X, X) ** 2 / 0.5)
    y = torch.sin(X) + 0.5 * torch.randn(n + nv, 1, generator=g, dtype=torch.float64)
    return K[:n, :n], K[n:, :n], y[:n], torch.sin(X[n:])


def val_mse(Kv, yv, alpha):
    return float((Kv @ alpha - yv).pow(2).mean())


def test_early_stopping_keeps_best_validation_iterate():
    K, Kv, y, yv = noisy_interpolation_problem(seed=13)
    kw = dict(betas=0.0, solver="nesterov", max_iter=3000, eval_every=10, tol=1e-12)
    kr = KernelRidge(early_stopping=True, **kw).fit(K, y, Kv, yv)
    h = kr.history_[0]
    losses = h["val_loss"]
    best = int(np.argmin(losses))
    assert h["best_iteration"] == h["iteration"][best] < h["iteration"][-1]
    # It matters here: the last iterate is clearly worse than the best one.
    assert losses[-1] > 1.2 * losses[best]
    # The kept coefficients are that iterate: recompute its validation loss independently.
    assert val_mse(Kv, yv, kr.dual_coef_) == pytest.approx(losses[best], rel=1e-9)
    assert kr.scores_[0]["loss"] == pytest.approx(losses[best], rel=1e-9)
    last = KernelRidge(early_stopping=False, **kw).fit(K, y, Kv, yv)
    assert val_mse(Kv, yv, last.dual_coef_) == pytest.approx(losses[-1], rel=1e-9)


def test_patience_stops_early():
    K, Kv, y, yv = noisy_interpolation_problem(seed=14)
    kr = KernelRidge(betas=0.0, solver="nesterov", max_iter=3000, eval_every=10, patience=5, tol=1e-12).fit(K, y, Kv, yv)
    h = kr.history_[0]
    # The contract, whichever check rounding makes the best: the run stops at the fifth
    # check after the best one, none of which improved on it, and keeps the best iterate.
    best = h["iteration"].index(h["best_iteration"])
    assert kr.n_iter_[0] == h["iteration"][-1] == h["best_iteration"] + 5 * 10 < 3000
    assert len(h["iteration"]) == best + 6
    assert all(loss >= h["val_loss"][best] for loss in h["val_loss"][best + 1:])
    assert val_mse(Kv, yv, kr.dual_coef_) == pytest.approx(h["val_loss"][best], rel=1e-9)


def test_beta_zero_with_early_stopping_on_labels():
    # Rank-deficient K (n = 60 > rank 8): K + 0 I is singular; nesterov still runs, stays
    # finite and early stopping picks a useful iterate.
    g = torch.Generator().manual_seed(15)
    F = torch.randn(90, 8, generator=g, dtype=torch.float64)
    labels = (F[:, :3] + 0.3 * torch.randn(90, 3, generator=g, dtype=torch.float64)).argmax(1)
    K_all = F @ F.T
    K, Kv = K_all[:60, :60], K_all[60:, :60]
    kr = KernelRidge(betas=[0.0], solver="nesterov", max_iter=500).fit(K, labels[:60], Kv, labels[60:])
    assert torch.isfinite(kr.dual_coef_).all()
    acc = kr.history_[0]["val_accuracy"]
    assert kr.scores_[0]["accuracy"] == max(acc) >= 0.6
    assert kr.score(Kv, labels[60:]) == pytest.approx(max(acc))
    with pytest.raises(ValueError, match="not positive definite for beta=0"):
        KernelRidge(betas=0.0, solver="cholesky").fit(K, labels[:60])


# ----------------------------------------------------------------------------- model selection


def test_classification_fit_predict_score():
    K, Kv, lab, lab_v, _, _ = gaussian_problem(100, 40, seed=16, noise=0.2)
    kr = KernelRidge(betas=(1e-3, 1e-2, 1e-1), solver="cg", tol=1e-8).fit(K, lab, Kv, lab_v)
    assert kr.n_classes_ == 3 and kr.dual_coef_.shape == (100, 3)
    scores = kr.predict(Kv)
    acc = float((scores.argmax(1) == lab_v).double().mean())
    assert kr.score(Kv, lab_v) == pytest.approx(acc)
    assert torch.equal(kr.predict_labels(Kv), scores.argmax(1))
    accs = [s["accuracy"] for s in kr.scores_]
    assert accs[kr.best_index_] == max(accs)
    assert set(kr.history_[0]) >= {"iteration", "train_loss", "residual", "beta"}


def test_regression_scores_are_mse_and_r2():
    K, Kv, _, _, y, yv = gaussian_problem(80, 30, seed=17, noise=0.1)
    kr = KernelRidge(betas=(1e-2, 1e-1), solver="eigh").fit(K, y, Kv, yv)
    pred = kr.predict(Kv)
    r2 = 1 - ((pred - yv) ** 2).sum(0) / ((yv - yv.mean(0)) ** 2).sum(0)
    best = kr.scores_[kr.best_index_]
    assert best["r2"] == pytest.approx(float(r2.mean()))
    assert best["loss"] == pytest.approx(float(((pred - yv) ** 2).mean()))
    assert kr.score(Kv, yv) == pytest.approx(float(r2.mean()))


@pytest.mark.parametrize("solver", ["eigh", "nesterov"])
def test_auto_betas_telescopic_search(solver):
    K, Kv, _, _, y, yv = gaussian_problem(60, 30, seed=18, noise=0.3)
    kr = KernelRidge(betas="auto", solver=solver, max_iter=300).fit(K, y, Kv, yv)
    mean_diag = float(K.diagonal().mean())
    coarse = [mean_diag * 10.0**e for e in range(-6, 3)]
    assert all(any(math.isclose(b, c, rel_tol=1e-9) for b in kr.betas_) for c in coarse)
    assert len(kr.betas_) == len(coarse) + 6 and kr.betas_ == sorted(kr.betas_)
    losses = [s["loss"] for s in kr.scores_]
    best_coarse = min(range(len(kr.betas_)), key=lambda i: losses[i] if any(
        math.isclose(kr.betas_[i], c, rel_tol=1e-9) for c in coarse) else math.inf)
    fine = [b for b in kr.betas_ if not any(math.isclose(b, c, rel_tol=1e-9) for c in coarse)]
    # the finer grid brackets the best coarse beta within half a decade on each side
    assert min(fine) < kr.betas_[best_coarse] < max(fine)
    assert max(fine) / min(fine) == pytest.approx(10 ** 1.5)
    assert losses[kr.best_index_] == min(losses) <= losses[best_coarse]


def test_leave_one_out_matches_brute_force():
    K, _, lab, _, _, _ = gaussian_problem(30, 0, seed=19)
    betas = [1e-3, 1e-1, 1.0]
    kr = KernelRidge(betas=betas, solver="eigh").fit(K, lab)
    T = torch.nn.functional.one_hot(lab, 3).double()
    for j, b in enumerate(betas):
        loo = torch.empty(30, 3, dtype=torch.float64)
        for i in range(30):
            keep = [k for k in range(30) if k != i]
            loo[i] = K[i, keep] @ exact_solution(K[keep][:, keep], T[keep], b)
        torch.testing.assert_close(kr.cv_predictions_[j], loo, rtol=1e-8, atol=1e-10)
        assert kr.scores_[j]["loss"] == pytest.approx(float((loo - T).pow(2).mean()), rel=1e-8)
        assert kr.scores_[j]["accuracy"] == pytest.approx(float((loo.argmax(1) == lab).double().mean()))
    assert kr.scores_[0]["source"] == "loo"


def test_gcv_matches_formula():
    K, _, _, _, y, _ = gaussian_problem(40, 0, seed=20, noise=0.2)
    betas = [1e-2, 1e-1]
    kr = KernelRidge(betas=betas, solver="eigh", cv="gcv").fit(K, y)
    for j, b in enumerate(betas):
        H = K @ torch.linalg.inv(K + b * torch.eye(40, dtype=torch.float64))
        gcv = ((y - H @ y) ** 2).mean() / (1 - torch.trace(H) / 40) ** 2
        assert kr.scores_[j]["loss"] == pytest.approx(float(gcv), rel=1e-8)


def test_f0_offsets():
    K, Kv, lab, lab_v, _, _ = gaussian_problem(60, 20, seed=21)
    g = torch.Generator().manual_seed(21)
    f0, f0v = torch.randn(60, 3, generator=g, dtype=torch.float64), torch.randn(20, 3, generator=g, dtype=torch.float64)
    kr = KernelRidge(betas=0.1, solver="cholesky").fit(K, lab, Kv, lab_v, f0=f0, f0_val=f0v)
    T = torch.nn.functional.one_hot(lab, 3).double()
    alpha = exact_solution(K, T - f0, 0.1)
    torch.testing.assert_close(kr.dual_coef_, alpha)
    torch.testing.assert_close(kr.predict(Kv, f0v), f0v + Kv @ alpha)
    assert kr.scores_[0]["loss"] == pytest.approx(float((f0v + Kv @ alpha - torch.nn.functional.one_hot(lab_v, 3)).pow(2).mean()))
    with pytest.raises(ValueError, match="fit used f0: pass f0_test"):
        kr.predict(Kv)


def test_predict_with_another_beta():
    K, Kv, _, _, y, yv = gaussian_problem(40, 10, seed=22)
    kr = KernelRidge(betas=(1e-2, 1.0), solver="eigh").fit(K, y, Kv, yv)
    torch.testing.assert_close(kr.predict(Kv, beta=1.0), Kv @ exact_solution(K, y, 1.0))
    with pytest.raises(ValueError, match=r"beta=0\.5 was not fitted"):
        kr.predict(Kv, beta=0.5)


def test_convergence_warning_and_progress_bar(capsys):
    K = spd(40, cond=1e6, seed=23)
    Y = torch.randn(40, 2, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    with pytest.warns(ConvergenceWarning, match=r"nesterov stopped above tol=1e-10 for 1 of 1 beta.*raise max_iter"):
        solve(K, Y, 1e-6, "nesterov", max_iter=20, tol=1e-10, progress="always")
    assert "nesterov" in capsys.readouterr().err
    with pytest.warns(ConvergenceWarning):
        solve(K, Y, 1e-2, "nesterov", max_iter=20, progress=True)  # True: a terminal only (pytest captures)
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="progress must be"):
        solve(K, Y, 1e-2, "nesterov", progress="yes")
    solve(K, Y, 1e-2, "cholesky")
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- bad input


def well_posed(seed=24):
    K = spd(10, cond=10, seed=seed)
    y = torch.arange(10) % 3
    return K, y


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda K, y: (K[:, :9], y), ValueError, r"K must be a square \[n, n\] Gram matrix.*got shape \(10, 9\)"),
        (lambda K, y: (K[None], y), ValueError, r"K must be a square.*got shape \(1, 10, 10\)"),
        (lambda K, y: (K + torch.triu(torch.ones_like(K), 1), y), ValueError, r"K is not symmetric: \|\|K - K\.T\|\|_F / \|\|K\|\|_F ~ [\d.e+-]+ \(estimated\) exceeds sym_tol = 0\.0001"),
        (lambda K, y: (K.index_put((torch.tensor([3]), torch.tensor([4])), torch.tensor(math.nan, dtype=K.dtype)), y),
         ValueError, r"K has 1 non-finite value.*\(3, 4\)"),
        (lambda K, y: ((K * 10).long(), y), TypeError, r"K must be a real floating-point tensor; got dtype torch.int64"),
        (lambda K, y: (K.tolist(), y), TypeError, r"K must be a torch.Tensor or numpy.ndarray; got list"),
        (lambda K, y: (K, y[:9]), ValueError, r"Y has 9 rows but K has 10"),
        (lambda K, y: (K, torch.zeros(10, 2, 2)), ValueError, r"Y must be \[n\] or \[n, m\] targets; got shape \(10, 2, 2\)"),
        (lambda K, y: (K, y[:, None]), ValueError, r"Y must be \[n\] integer labels; got shape \(10, 1\)"),
        (lambda K, y: (K, y > 0), TypeError, r"Y has dtype torch.bool; pass integer class labels"),
        (lambda K, y: (K, y - 1), ValueError, r"Y has negative class labels"),
        (lambda K, y: (K, torch.full((10,), math.inf)), ValueError, r"Y has 10 non-finite value"),
    ],
    ids=["not-square", "3d", "not-symmetric", "nan", "int-kernel", "list", "y-rows", "y-3d", "labels-2d",
         "y-bool", "negative-label", "y-inf"],
)
def test_bad_kernel_or_targets(make, error, match):
    K, y = make(*well_posed())
    with pytest.raises(error, match=match):
        KernelRidge(betas=0.1, solver="eigh").fit(K, y)
    with pytest.raises(error, match=match):
        solve(K, y, 0.1, "eigh")


def test_symmetry_tolerance():
    K, y = well_posed(25)
    noisy = K + 1e-7 * torch.randn(10, 10, generator=torch.Generator().manual_seed(25), dtype=K.dtype)
    solve(noisy, y, 0.1, "eigh")  # rounding-level asymmetry is accepted
    with pytest.raises(ValueError, match="not symmetric"):
        solve(noisy, y, 0.1, "eigh", sym_tol=0)
    skewed = K + 1e-3 * torch.triu(torch.ones_like(K), 1)
    with pytest.raises(ValueError, match="not symmetric"):
        solve(skewed, y, 0.1, "eigh")
    with pytest.warns(ConvergenceWarning):  # eigh reads the lower triangle: not a solve of skewed
        assert torch.isfinite(solve(skewed, y, 0.1, "eigh", sym_tol=math.inf)).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(K_val=torch.zeros(4, 9), Y_val=torch.zeros(4, dtype=torch.long)), ValueError,
         r"K_val must be the cross kernel K\(X_other, X_train\) of shape \[n_other, 10\]; got \(4, 9\)"),
        (dict(K_val=torch.zeros(4, 10)), ValueError, r"pass K_val and Y_val together"),
        (dict(K_val=torch.zeros(4, 10), Y_val=torch.zeros(3, dtype=torch.long)), ValueError, r"Y_val has 3 rows but K_val has 4"),
        (dict(K_val=torch.zeros(4, 10), Y_val=torch.zeros(4)), TypeError, r"Y_val must hold integer class labels like Y does"),
        (dict(K_val=torch.full((4, 10), math.nan), Y_val=torch.zeros(4, dtype=torch.long)), ValueError, r"K_val has 40 non-finite"),
        (dict(f0=torch.zeros(10, 2)), ValueError, r"f0 must have shape \(10, 3\)"),
        (dict(K_val=torch.zeros(4, 10), Y_val=torch.zeros(4, dtype=torch.long), f0=torch.zeros(10, 3)), ValueError,
         r"pass f0 and f0_val together"),
    ],
    ids=["k-val-cols", "k-val-alone", "y-val-rows", "y-val-kind", "k-val-nan", "f0-shape", "f0-val-missing"],
)
def test_bad_validation_data(kwargs, error, match):
    K, y = well_posed(26)
    with pytest.raises(error, match=match):
        KernelRidge(betas=0.1).fit(K, y, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(betas=-1.0), ValueError, r"betas must be finite and >= 0.*got -1\.0"),
        (dict(betas=(0.1, math.nan)), ValueError, r"betas must be finite and >= 0.*got nan"),
        (dict(betas=()), ValueError, r"betas is empty"),
        (dict(betas="grid"), ValueError, r"betas must be numbers or 'auto'; got 'grid'"),
        (dict(solver="lsqr"), ValueError, r"unknown solver 'lsqr'; choose one of 'auto', 'krylov', 'cg', 'cholesky', 'eigh', 'nesterov'"),
        (dict(max_iter=0), ValueError, r"max_iter must be a positive integer; got 0"),
        (dict(tol=-1e-3), ValueError, r"tol must be a finite number >= 0"),
        (dict(eval_every=0), ValueError, r"eval_every must be a positive integer"),
        (dict(precond_rank=8, solver="eigh"), ValueError, r"precond_rank applies to solver='cg' and 'nesterov' only"),
        (dict(precond="nystrom"), ValueError, r"precond must be 'cholesky' or None"),
        (dict(beta_scale="max"), ValueError, r"beta_scale must be None or 'trace'"),
        (dict(cv="kfold", solver="eigh"), ValueError, r"cv must be 'loo' or 'gcv'"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        KernelRidge(**kwargs)


def test_bad_solve_arguments():
    K, y = well_posed(27)
    with pytest.raises(ValueError, match=r"unknown solver 'newton'"):
        solve(K, y, 0.1, "newton")
    with pytest.raises(ValueError, match=r"beta must be finite and >= 0.*got -0\.5"):
        solve(K, y, [0.1, -0.5], "eigh")
    with pytest.raises(TypeError, match=r"dtype must be torch.float32, torch.float64 or None"):
        solve(K, y, 0.1, "eigh", dtype=torch.float16)


def test_several_betas_need_a_selection_rule():
    K, y = well_posed(28)
    with pytest.raises(ValueError, match=r"choosing among 3 betas needs validation data.*solver='eigh'"):
        KernelRidge(betas=(1e-3, 1e-2, 1e-1), solver="nesterov").fit(K, y)
    with pytest.raises(ValueError, match=r"betas='auto' needs validation data"):
        KernelRidge(betas="auto", solver="cg").fit(K, y)


def test_predict_errors():
    K, y = well_posed(29)
    kr = KernelRidge(betas=0.1, solver="eigh")
    with pytest.raises(NotFittedError, match=r"not fitted yet; call fit\(K, Y, \.\.\.\) before predict"):
        kr.predict(K)
    with pytest.raises(ValueError, match="not fitted yet"):  # NotFittedError is a ValueError
        kr.score(K, y)
    kr.fit(K, y)
    with pytest.raises(ValueError, match=r"K_test must be the cross kernel.*\[n_other, 10\]; got \(10,\) \(one sample\? use K_test\[None\]\)"):
        kr.predict(K[0])
    with pytest.raises(ValueError, match=r"f0_test given but fit had no f0"):
        kr.predict(K, torch.zeros(10, 3))
    reg = KernelRidge(betas=0.1, solver="eigh").fit(K, torch.randn(10, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="predict_labels needs a fit on integer labels"):
        reg.predict_labels(K)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("solver", SOLVERS)
def test_gpu_matches_cpu_and_keeps_tf32_setting(solver):
    K = spd(300, cond=1e3, seed=30)
    Y = torch.randn(300, 4, generator=torch.Generator().manual_seed(30), dtype=torch.float64)
    name, kw = args_for(solver)
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    for dtype, bound in ((torch.float64, 1e-6), (torch.float32, 1e-3)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            alpha = solve(K.to("cuda", dtype), Y.to("cuda", dtype), [1e-3, 1e-1], name, **kw)
        assert alpha.device.type == "cuda" and alpha.dtype == dtype
        for j, b in enumerate([1e-3, 1e-1]):
            assert rel_err(alpha[j].cpu(), exact_solution(K, Y, b)) <= bound
    assert matmul.fp32_precision == before
    kr = KernelRidge(betas=(1e-3, 1e-1), solver=name, **kw).fit(K.cuda(), Y.cuda(), K[:50].cuda(), Y[:50].cuda())
    assert kr.predict(K[:20].cuda()).device.type == "cuda"
