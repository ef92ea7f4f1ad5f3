"""One Cholesky factor, every beta: a block Krylov space shared by all betas.

For a central beta b0, M = K + b0 I = L L^T (one fp32 factorization). For any other beta,
M^{-1} (K + beta I) = I + (beta - b0) M^{-1}, so the Krylov spaces of every preconditioned
system are the same space, span{M^{-1} Y, M^{-2} Y, ...}: one block of m columns (the
targets) per step serves every beta, where per-beta preconditioned CG would carry
betas x m columns. In that space each beta takes its Galerkin solution (what CG would
return there, optimal in the (K + beta I)-norm), and its residual is computed explicitly
from K V, so it is the residual of K itself, not of the recursion.

How fast it converges: the preconditioned operator's eigenvalues are
(lambda + beta) / (lambda + b0), all between 1 and beta / b0, so its condition number is
at most max(beta / b0, b0 / beta) whatever K's spectrum: with b0 inside a range of three
decades, <= 100, so at most ~ sqrt(100) ln(2 / tol) / 2 ~ 38 steps to 1e-3 (measured: 12
at n = 4096 and 8192 on a power-law spectrum with decay 1.3). Betas spread over more than ``_CLUSTER_DECADES``
decades are split into groups with a factor each (a factor costs n^3 / 3; a wider group
costs more steps, ~ range^(1/4)).

Precision: the factor only shapes the space and every residual is computed from K V, so
rounding never biases the answer, but it can stall it. A float32 factor's backward error
E ~ eps ||K|| breaks the shift invariance by E / beta, and float32 products K V carry
errors ~ eps ||K|| ||x||: on an ill-conditioned K small betas stall above tol (measured:
1.8e-4 at n = 4096 for decay 1.3; 2.4e-3 against a true 9.7e-4 at cond 5e6, decay 1.9).
So a group runs first with a float32 factor (``factor_dtype``) and the working dtype's
basis, and the betas it leaves above tol run again with a float64 factor, basis and K V
(an fp32 K multiplied in fp64 block by block); tol < ``_FP32_FLOOR`` or a float64 K starts
there. Small projected systems are fp64.
``precond=None`` uses no factor: the unpreconditioned space span{Y, K Y, ...}, shared by
every beta because shifts leave Krylov spaces unchanged (multi-shift CG's idea), which
is cheap per step and slow for small betas.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch

from ._checks import _extreme_eigenvalues, _indefinite, _not_psd, _rounding_allowance
from ._common import _Config, _Result, _bar, _free_bytes, _matmul_fp64
from ._metrics import _new_history, _record
from .cholesky import _cholesky_apply, _Factorizer

# A group of betas spans at most this many decades around its factor's b0 (measured at
# n = 8192, CPU, 10 betas over 3 decades: 15 steps; steps grow as range^(1/4)).
_CLUSTER_DECADES = 3.0
# Where b0 sits between a group's smallest and largest beta (log scale). At the middle,
# the largest beta took 17 steps and the smallest 6 (n = 4096, 3 decades); at 2/3, 12 and
# 10: the relative residual of a large beta converges more slowly for the same ratio.
_CENTER_WEIGHT = 2 / 3
# Below this relative residual float32 products K @ V cannot certify the residual
# (their rounding is ~1e-5 of ||K|| ||x|| on eNTK spectra): the basis is float64 then.
_FP32_FLOOR = 1e-4
# A float64 copy of a float32 K is kept for a float64 attempt when it takes at most this
# share of the free memory (n = 8192: 512 MiB).
_FP64_COPY_SHARE = 0.25
# A beta whose residual fell less than this factor over _STALL_STEPS steps has reached
# what its precision allows.
_STALL_FACTOR = 0.9
_STALL_STEPS = 4
# Without a factor, CG-like plateaus of tens of steps are normal on ill-conditioned K.
_STALL_STEPS_PLAIN = 50


def _groups(betas: List[float]) -> List[List[int]]:
    """Indices of betas in groups spanning <= _CLUSTER_DECADES decades each (zeros join
    the smallest positive beta's group)."""
    order = sorted(range(len(betas)), key=lambda j: betas[j])
    groups: List[List[int]] = []
    low = None
    for j in order:
        b = betas[j]
        if groups and (b == 0 or low is None or low == 0 or math.log10(b / low) <= _CLUSTER_DECADES):
            groups[-1].append(j)
            if low == 0 and b > 0:
                low = b
            continue
        groups.append([j])
        low = b
    return groups


def _center(betas: List[float], scale: float) -> float:
    """b0: two thirds of the way up a group's positive betas on a log scale (a group of zeros: a tiny
    positive shift relative to K's scale, so that M is positive definite)."""
    positive = [b for b in betas if b > 0]
    if not positive:
        return 1e-6 * scale
    return min(positive) ** (1 - _CENTER_WEIGHT) * max(positive) ** _CENTER_WEIGHT


def _krylov(K: torch.Tensor, T: torch.Tensor, betas: List[float], cfg: _Config) -> _Result:
    n, m = T.shape
    B = len(betas)
    dt = K.dtype
    out = torch.zeros(B, n, m, dtype=torch.float64, device=K.device)
    history = [_new_history(b, False, False) for b in betas]
    n_iter, converged, residual = [0] * B, [False] * B, [math.nan] * B
    if float(T.norm()) == 0:
        for j in range(B):
            converged[j], residual[j] = True, 0.0
        return _Result(out, n_iter, converged, residual, history, {"factors": 0})

    scale = float(K.diagonal().double().mean().clamp_min(torch.finfo(torch.float64).tiny))
    factors = _Factorizer(K) if cfg.krylov_precond == "cholesky" else None
    exact = dt == torch.float64 or cfg.tol < _FP32_FLOOR
    first = (torch.float64 if cfg.tol < _FP32_FLOOR else cfg.factor_dtype, torch.float64 if exact else dt)
    centers: List[float] = []
    precisions: List[str] = []
    K64: Optional[torch.Tensor] = K if dt == torch.float64 else None
    judge = _PSDJudge(K, cfg.seed)
    bar = _bar(cfg.max_iter, "krylov", cfg.progress)
    try:
        for group in _groups(betas):
            gb = [betas[j] for j in group]
            b0 = _center(gb, scale)
            X, its, res, train = None, [0] * len(gb), [math.inf] * len(gb), [math.nan] * len(gb)
            attempts = [first] if first == (torch.float64, torch.float64) else [first, (torch.float64, torch.float64)]
            for factor_dtype, basis_dtype in attempts:  # float32 first, float64 where it stalls
                apply = None
                if factors is not None:
                    factors.work.clear()  # one n x n workspace at a time
                    apply = _preconditioner(factors, b0, factor_dtype, n)
                todo = [i for i, r in enumerate(res) if r > cfg.tol]  # a retry solves only these
                if basis_dtype == torch.float64 and K64 is None and dt != torch.float64:
                    K64 = _float64_copy(K)
                X2, its2, res2, train2 = _solve_group(K if K64 is None or basis_dtype != torch.float64 else K64,
                                                      T, [gb[i] for i in todo], apply, basis_dtype, cfg, bar, judge)
                if basis_dtype != torch.float64:
                    # float32 products K V misjudge residuals near float32's floor in both
                    # directions: every beta's residual is measured again in float64.
                    res2, train2 = _float64_residuals(K if K64 is None else K64, T, [gb[i] for i in todo], X2)
                if X is None:
                    X = torch.zeros(len(gb), *X2.shape[1:], dtype=torch.float64, device=K.device)
                for k, i in enumerate(todo):
                    its[i] += its2[k]
                    if res2[k] < res[i]:
                        X[i], res[i], train[i] = X2[k], res2[k], train2[k]
                label = (str(factor_dtype) if factors is not None else "none").replace("torch.", "")
                precisions.append(f"factor {label}, basis {str(basis_dtype).replace('torch.', '')}")
                if max(res) <= cfg.tol:
                    break
            centers.append(b0)
            for i, j in enumerate(group):
                out[j] = X[i]
                n_iter[j], residual[j], converged[j] = its[i], res[i], res[i] <= cfg.tol
                _record(history[j], its[i], train[i], res[i], None, 0)
    finally:
        bar.close()
        if factors is not None:
            factors.work.clear()
    # float64 coefficients stay float64 (as cholesky's); a float32 run gives float32 ones.
    coefs = out if exact or any("basis float64" in p for p in precisions) else out.to(dt)
    return _Result(coefs, n_iter, converged, residual, history,
                   {"factors": len(centers) if factors is not None else 0, "centers": centers,
                    "precisions": precisions})


def _float64_copy(K: torch.Tensor) -> Optional[torch.Tensor]:
    """K in float64 when a copy takes at most ``_FP64_COPY_SHARE`` of the free memory (one
    conversion instead of one per step of a float64 attempt), else None (block by block)."""
    need = K.numel() * 8
    if need > _FP64_COPY_SHARE * _free_bytes(K.device):
        return None
    return K.double()


def _float64_residuals(K: torch.Tensor, T: torch.Tensor, betas: List[float], X: torch.Tensor):
    """Relative residuals and train MSE of X [a, n, m] (float64), K in any dtype."""
    a, n, m = X.shape
    if a == 0:
        return [], []
    KX = _matmul_fp64(K, X.permute(1, 0, 2).reshape(n, a * m)).view(n, a, m).permute(1, 0, 2)
    fit = KX - T.double()[None]
    bt = torch.tensor(betas, dtype=torch.float64, device=K.device).view(a, 1, 1)
    tnorm = float(T.double().norm())
    rel = ((fit + bt * X).pow(2).sum(dim=(1, 2)).sqrt() / tnorm).tolist()
    return rel, fit.pow(2).mean(dim=(1, 2)).tolist()


def _preconditioner(factors: _Factorizer, b0: float, factor_dtype: torch.dtype,
                    n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """R [n, c] -> (K + b0 I)^{-1} R from one factor; b0 grows where the factorization
    breaks down at ``factor_dtype`` (the space only has to be good, not exact)."""
    L = None
    for _ in range(8):
        L = factors.factor(b0, factor_dtype)
        if L is not None:
            break
        b0 *= 10
    if L is None:
        L = factors.factor(b0, torch.float64)
    if L is None:
        raise ValueError(
            "K + beta I could not be factored for any tested beta (K is not PSD at this precision); "
            "check K, or use solver='eigh'"
        )

    def apply(R: torch.Tensor) -> torch.Tensor:
        return _cholesky_apply(L, R)

    return apply


def _solve_group(K: torch.Tensor, T: torch.Tensor, betas: List[float],
                 apply: Optional[Callable[[torch.Tensor], torch.Tensor]], bdt: torch.dtype,
                 cfg: _Config, bar, judge: "_PSDJudge") -> tuple:
    """The shared space for one group of betas -> (X [a, n, m] fp64, steps, relative
    residuals, train MSE of K x against T), per beta at its best step."""
    n, m = T.shape
    a = len(betas)
    dev = K.device
    Y = T.to(bdt)
    Y64 = T.double()
    tnorm = float(Y64.norm())
    bt = torch.tensor(betas, dtype=torch.float64, device=dev)

    def matmul(V: torch.Tensor) -> torch.Tensor:
        if bdt == torch.float64 and K.dtype != torch.float64:
            return _matmul_fp64(K, V)
        return K @ V.to(K.dtype)

    def precondition(R: torch.Tensor) -> torch.Tensor:
        return R if apply is None else apply(R).to(bdt)

    Vs: List[torch.Tensor] = []
    Ws: List[torch.Tensor] = []
    # Projected quantities in fp64, grown by one block per step: V^T W and V^T Y.
    VW = torch.zeros(0, 0, dtype=torch.float64, device=dev)
    VY = torch.zeros(0, m, dtype=torch.float64, device=dev)
    X = torch.zeros(a, n, m, dtype=torch.float64, device=dev)
    res = [math.inf] * a
    train = [math.nan] * a
    steps = [0] * a
    active = list(range(a))
    recent: List[List[float]] = [[] for _ in range(a)]
    block = precondition(Y)
    # The basis (V and K V: 2 n x columns) may take a quarter of K's memory, at least 2,048
    # columns, and never more than n (then the space is everything and the solve exact).
    max_columns = min(n, max(n // 8, 2048, 4 * m))
    stall_steps = _STALL_STEPS if apply is not None else _STALL_STEPS_PLAIN
    for step in range(1, cfg.max_iter + 1):
        for _ in range(2):  # block classical Gram-Schmidt, twice is enough
            for V in Vs:
                block = block - V @ (V.T @ block)
        Q, R = torch.linalg.qr(block)
        # Directions already in the space (targets of rank < m, or an exhausted space).
        keep = R.diagonal().abs() > 1e-10 * R.diagonal().abs().max().clamp_min(torch.finfo(bdt).tiny)
        if step > 1:
            keep &= R.diagonal().abs() > torch.finfo(bdt).eps * 64
        Q = Q[:, keep]
        if Q.shape[1] == 0:
            break
        W = matmul(Q)
        Vs.append(Q)
        Ws.append(W)
        V_all = torch.cat(Vs, dim=1)
        W_all = torch.cat(Ws, dim=1)
        c = V_all.shape[1]
        Q64, W64 = Q.double(), W.double()
        VW = torch.cat([torch.cat([VW, V_all[:, : c - Q.shape[1]].double().T @ W64], dim=1),
                        Q64.T @ W_all.double()], dim=0)
        VY = torch.cat([VY, Q64.T @ Y64], dim=0)
        H0 = (VW + VW.T) / 2  # V^T K V; V^T V = I to the basis dtype's rounding
        # Ritz values of K lie inside its spectrum, and this space is drawn toward the small
        # end of K + b0 I (where negative eigenvalues of a non-Gram K are): a clearly
        # negative one is a reason to ask K itself, at the price of a c x c eigvalsh.
        ritz = torch.linalg.eigvalsh(H0)
        if judge.suspects(float(ritz[0]), float(ritz[-1])):
            judge.check(V_all.double() @ torch.linalg.eigh(H0).eigenvectors[:, :1])
        eye = torch.eye(c, dtype=torch.float64, device=dev)
        V64, WY = V_all.double(), W_all.double()
        for i in list(active):
            H = H0 + bt[i] * eye
            C, info = torch.linalg.cholesky_ex(H)
            if int(info) == 0:
                z = torch.cholesky_solve(VY, C)
            else:
                # K + beta I is not positive definite on this space (beta below K's own
                # rounding: an fp32 K's eigenvalues move by ~ eps sqrt(n) ||K||). Galerkin
                # would amplify that; the minimal residual in the space never exceeds ||Y||.
                z = torch.linalg.lstsq(WY + bt[i] * V64, Y64).solution
            x = V64 @ z
            fit = WY @ z - Y64  # K x - T, from K V: the residual of K itself
            rel = float((fit + bt[i] * x).norm()) / tnorm
            steps[i] = step
            if rel < res[i]:
                res[i], train[i] = rel, float(fit.pow(2).mean())
                X[i] = x
            recent[i].append(res[i])
            stalled = (len(recent[i]) > stall_steps
                       and recent[i][-1] > _STALL_FACTOR * recent[i][-stall_steps - 1])
            if res[i] <= cfg.tol or stalled:
                active.remove(i)
        bar.update(1)
        bar.set_postfix_str(f"residual {max(res):.2e}, {len(active)} betas running")
        if not active or c + m > max_columns:
            break
        block = precondition(Ws[-1] if apply is None else Q)
    return X, steps, res, train


class _PSDJudge:
    """Whether K is PSD, judged from K's own spectrum, never from a Ritz value alone.

    A Ritz value of the space is only a suspicion: the space is drawn to K's small end, so
    its largest Ritz value says nothing of ||K|| (a float32 F F^T of rank 20 at n = 300 was
    refused at -1e-6 against a "largest" of 3.9e-7, with lambda_max = 325), and float32
    products K V carry errors ~ eps ||K||. A suspicion is decided by the Rayleigh quotient
    of its Ritz vector on K in float64 (an upper bound on K's smallest eigenvalue) against
    K's largest eigenvalue estimated by subspace iteration, with ``_rounding_allowance``
    of K's stored dtype: rounding is never blamed on the user."""

    def __init__(self, K: torch.Tensor, seed: int):
        self.K, self.seed = K, seed
        # max K_ii <= lambda_max: a floor under the allowance that costs no product.
        self.lower = max(float(K.diagonal().max()), 0.0)
        self.spectrum: Optional[tuple] = None  # (smallest, largest) estimates, on the first suspicion

    def suspects(self, smallest_ritz: float, largest_ritz: float) -> bool:
        largest = max(self.lower, largest_ritz, self.spectrum[1] if self.spectrum else 0.0)
        return smallest_ritz < -_rounding_allowance(largest, self.K.shape[0], self.K.dtype)

    def check(self, u: torch.Tensor) -> None:
        """u [n, 1] float64, a Ritz vector: raise if K's own spectrum is indefinite."""
        quotient = float((u * _matmul_fp64(self.K, u)).sum() / (u * u).sum())
        if self.spectrum is None:
            smallest, largest = _extreme_eigenvalues(self.K, self.seed)
            self.spectrum = (smallest, max(largest, self.lower))
        smallest, largest = min(quotient, self.spectrum[0]), self.spectrum[1]
        if _indefinite(smallest, largest, self.K.shape[0], self.K.dtype):
            raise _not_psd(smallest, largest)
