"""Shared pieces of the solvers: precision helpers, configuration and result types,
progress bars, random sketches' generators, eigenvalue estimates, iterative refinement."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..progress import check_progress, progress_bar
from ..store import available_host_bytes


# Element budget of one block of rows when an fp32 K is multiplied in fp64 (refinement
# residuals): 2**24 elements = 128 MiB in fp64, where a whole fp64 copy of an n = 50,000
# kernel would be 20 GB.
_CHUNK_ELEMENTS = 2**24


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped at max_iter (or stagnated) above the tolerance."""


# ----------------------------------------------------------------------------- precision


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(n_cols: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, n_cols))


def _matmul_fp64(K: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """K @ X accumulated in fp64 for any K dtype. X: [n, c] float64 -> [n, c] float64.

    An fp32 K is converted block of rows by block of rows, never as a whole (an fp64 copy
    of a 50,000^2 kernel is 20 GB).
    """
    if K.dtype == torch.float64:
        return K @ X
    out = torch.empty(K.shape[0], X.shape[1], dtype=torch.float64, device=K.device)
    step = _chunk_rows(K.shape[1])
    for i in range(0, K.shape[0], step):
        out[i : i + step] = K[i : i + step].double() @ X
    return out


# ----------------------------------------------------------------------------- solver plumbing


@dataclass
class _Config:
    max_iter: int = 1000
    tol: float = 1e-6
    eval_every: int = 10
    early_stopping: bool = True
    patience: Optional[int] = None
    precond_rank: Optional[int] = None
    precond_power: int = 1
    power_iters: int = 20
    refine: Optional[bool] = None
    max_refine: int = 10
    out_eps: float = float(torch.finfo(torch.float64).eps)  # precision the result is returned in
    factor_dtype: torch.dtype = torch.float32
    krylov_precond: Optional[str] = "cholesky"
    warm_start: bool = False
    seed: int = 0
    progress: Optional[bool] = False


@dataclass
class _Result:
    """coefs [B, n, m] in the working dtype (or fp64 after refinement) plus per-beta records."""

    coefs: torch.Tensor
    n_iter: List[int]
    converged: List[bool]
    residual: List[float]
    history: List[Dict[str, Any]]
    extra: Dict[str, Any] = field(default_factory=dict)


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, progress):
    """A bar with the meaning ``progress=`` has everywhere in tangent_kernels (engine's
    rules): False none, True or None on a terminal, "always" also in logs/notebooks."""
    bar = progress_bar(total, desc, check_progress(progress), unit="it")
    if bar is None:
        return _NullBar()
    bar.leave = False
    return bar


def _free_bytes(device: torch.device) -> int:
    """Free memory of ``device`` (host memory for the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_host_bytes()


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _orthonormal(V: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(V).Q


def _lambda_max(K: torch.Tensor, iters: int, gen: torch.Generator) -> float:
    """Largest eigenvalue of the PSD K by block subspace iteration (4 vectors) + Rayleigh-Ritz."""
    n = K.shape[0]
    V = _orthonormal(torch.randn(n, min(4, n), generator=gen, device=K.device, dtype=K.dtype))
    for _ in range(iters):
        V = _orthonormal(K @ V)
    H = V.T @ (K @ V)
    return max(float(torch.linalg.eigvalsh((H + H.T) / 2).max()), 0.0)


def _residual_stats(K: torch.Tensor, T: torch.Tensor, betas: torch.Tensor, X: torch.Tensor):
    """True residuals of X [n, a, m] in the working dtype -> (relative residual [a], train MSE [a])."""
    n, a, m = X.shape
    KX = (K @ X.reshape(n, a * m)).view(n, a, m)
    fit = KX - T[:, None, :]
    R = fit + betas.view(1, a, 1) * X
    tnorm = float(T.norm())
    rel = (R.pow(2).sum(dim=(0, 2)).sqrt() / tnorm if tnorm > 0 else R.new_zeros(a)).tolist()
    return rel, fit.pow(2).mean(dim=(0, 2)).tolist()


def _refine(
    K: torch.Tensor, T64: torch.Tensor, betas: torch.Tensor, X: torch.Tensor,
    apply_inverse: Callable[[torch.Tensor], torch.Tensor], out_eps: float, max_steps: int,
) -> Tuple[torch.Tensor, List[float], List[int], List[bool]]:
    """Mixed-precision iterative refinement of X [n, a, m] (float64, updated in place).

    Residuals R = T - (K + beta I) X are formed in fp64; corrections come from the
    low-precision inverse ``apply_inverse(R_scaled)`` ([n, a, m] in, [n, a, m] out) applied
    to R scaled to unit norm per beta (so an fp32 inverse never sees underflowing values).
    Each step shrinks the error by ~ cond(K + beta I) * eps(factor). Per beta it stops once
    a correction no longer changes X at the output precision (||D|| <= out_eps ||X||), when
    the residual stops halving (the fp64 floor, or an inverse too inaccurate to converge:
    ``stalled``), or after max_steps. Returns X, relative residuals, steps, stalled flags.
    """
    n, a, m = X.shape
    tnorm = float(T64.norm())
    b = betas.to(torch.float64).view(1, a, 1)
    active = [True] * a
    res = [math.inf] * a
    steps = [0] * a
    stalled = [False] * a
    negligible = [False] * a
    previous: Optional[torch.Tensor] = None
    for step in range(max_steps + 1):
        R = T64[:, None, :] - _matmul_fp64(K, X.reshape(n, a * m)).view(n, a, m) - b * X
        norms = R.pow(2).sum(dim=(0, 2)).sqrt()
        rel = (norms / tnorm if tnorm > 0 else torch.zeros_like(norms)).tolist()
        for i in range(a):
            if not active[i]:
                continue
            active[i] = False
            if rel[i] > 0.5 * res[i]:
                stalled[i] = True
                if rel[i] > res[i] and previous is not None:  # got worse: keep the previous iterate
                    X[:, i] = previous[:, i]
                    steps[i] -= 1
                    continue
            res[i] = rel[i]
            active[i] = not (stalled[i] or negligible[i] or rel[i] == 0 or step == max_steps)
        if not any(active):
            break
        idx = [i for i in range(a) if active[i]]
        scale = norms.clamp_min(torch.finfo(torch.float64).tiny).view(1, a, 1)
        D = apply_inverse(R / scale).to(torch.float64) * scale
        previous = X.clone()
        X[:, idx] += D[:, idx]
        small = (D.pow(2).sum(dim=(0, 2)) <= (out_eps**2) * X.pow(2).sum(dim=(0, 2))).tolist()
        for i in idx:
            steps[i] += 1
            negligible[i] = small[i]
    return X, res, steps, stalled
