"""``solve``: the functional entry point, and the dispatch every caller goes through."""

from __future__ import annotations

import dataclasses

import warnings
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..precisions import fp32_math
from ._checks import (default_tol, _beta_scale, _check_beta_range, _check_betas, check_kernel, _check_options,
                      _check_psd_estimate, check_targets, label_count, _out_dtype, Array)
from .auto import choose
from ._common import ConvergenceWarning, _Config, _matmul_fp64, _Result
from ._metrics import _Validation
from .cg import _cg
from .cholesky import _cholesky
from .eigh import _eigh
from .krylov import _krylov
from .nesterov import _nesterov




def _run(solver: str, K: torch.Tensor, T: torch.Tensor, betas: List[float], cfg: _Config,
         val: Optional[_Validation], cv: Optional[str], allow_tf32: bool) -> _Result:
    _check_beta_range(K, betas)
    with fp32_math(allow_tf32), torch.no_grad():
        if solver == "cg":
            _check_psd_estimate(K, cfg.seed)
        if solver == "nesterov":
            result = _nesterov(K, T, betas, cfg, val)
        elif solver == "cg":
            result = _cg(K, T, betas, cfg)
        elif solver == "krylov":
            result = _krylov(K, T, betas, cfg)
        elif solver == "eigh":
            result = _eigh(K, T, betas, cfg, cv)
        elif solver == "cholesky":
            result = _cholesky(K, T, betas, cfg)
        else:
            raise AssertionError(f"solver {solver!r} reached the dispatch unresolved")
    result.extra["solver"] = solver
    finite = torch.isfinite(result.coefs.reshape(len(betas), -1)).all(dim=1).tolist()
    if not all(finite):
        bad = [b for b, ok in zip(betas, finite) if not ok]
        scale = float(K.diagonal().double().mean())
        raise ValueError(
            f"the {solver} solution is not finite for beta = {', '.join(f'{b:g}' for b in bad[:4])}: a beta so far "
            f"from K's scale (mean diagonal {scale:.3g}) overflows or underflows the arithmetic. Use betas within "
            "a few orders of magnitude of that scale (beta_scale='trace' makes betas relative to it)"
        )
    if result.coefs.dtype == torch.float64 and cfg.out_eps > torch.finfo(torch.float64).eps:
        _report_rounded(K, T, betas, cfg, result)
    return result


def _report_rounded(K: torch.Tensor, T: torch.Tensor, betas: List[float], cfg: _Config, result: _Result) -> None:
    """Residuals of the coefficients as returned (rounded to float32), not as computed.

    Refinement and krylov's float64 attempts reach residuals that float32 coefficients
    cannot hold on an ill-conditioned K (rounding alpha costs ~ eps32 cond(K + beta I)):
    measured 9e-4 computed and 1.2e-3 returned at cond 4.7e6. Reporting the computed one
    would call converged what the caller does not get. One float64 product of K."""
    B, n, m = result.coefs.shape
    rounded = result.coefs.to(torch.float32).double()
    KX = _matmul_fp64(K, rounded.permute(1, 0, 2).reshape(n, B * m)).view(n, B, m).permute(1, 0, 2)
    bt = torch.tensor(betas, dtype=torch.float64, device=K.device).view(B, 1, 1)
    T64 = T.double()
    tnorm = float(T64.norm())
    if tnorm == 0:
        return
    rel = ((KX + bt * rounded - T64[None]).pow(2).sum(dim=(1, 2)).sqrt() / tnorm).tolist()
    result.extra["computed_residual"] = list(result.residual)
    for j, r in enumerate(rel):
        result.residual[j] = max(result.residual[j], r)
        result.converged[j] = result.residual[j] <= cfg.tol


def _sharded(K, caller: str):
    """tangent_kernels.distributed when K is one of its row shards, else None."""
    if type(K).__name__ != "KShard":  # cheap test first: the distributed package imports more
        return None
    from .. import distributed
    if not isinstance(K, distributed.KShard):
        return None
    if caller != "solve":
        raise TypeError(
            f"{caller} takes a whole K; for a row-sharded K (tk.distributed.KShard) call tk.solve(K_shard, Y, betas, "
            "solver='cg' or 'nesterov') on every rank, or gather it first with K_shard.gather()"
        )
    return distributed


def _resolve(solver: str, K: torch.Tensor, n_betas: int, cfg: _Config,
             needs_loo: bool, n_outputs: int = 1) -> Tuple[str, _Config, Optional[str]]:
    """"auto" -> a concrete solver, its config and the reason (None when the user chose)."""
    if solver != "auto":
        return solver, cfg, None
    chosen, options, reason = choose(K.shape[0], n_betas, K.device, K.dtype, needs_loo, n_outputs)
    if cfg.precond_rank is not None and chosen in ("cg", "nesterov"):
        options = {}  # the user's rank wins
    return chosen, dataclasses.replace(cfg, **options), reason


def _warn_unconverged(solver: str, result: _Result, betas: List[float], tol: float, dtype: torch.dtype) -> None:
    bad = [(b, r) for b, r, c in zip(betas, result.residual, result.converged) if not c]
    if not bad:
        return
    listed = ", ".join(f"beta={b:g}: {r:.2e}" for b, r in bad[:4]) + (", ..." if len(bad) > 4 else "")
    if solver in ("eigh", "cholesky"):
        what, fix = "ended", "keep refine on (the default) or pass float64 K"
    else:
        what, fix = "stopped", "raise max_iter, use solver='cholesky'/'eigh', or pass float64 K"
    warnings.warn(
        f"{solver} {what} above tol={tol:g} for {len(bad)} of {len(betas)} beta(s) (relative "
        f"residual {listed}); {fix}."
        + (" float32 cannot take the relative residual much below 6e-8 * cond(K + beta I); "
           "dtype=torch.float64 returns float64 coefficients (cholesky, eigh and krylov compute them)."
           if dtype == torch.float32 else ""),
        ConvergenceWarning,
        stacklevel=3,
    )


def solve(
    K: Array,
    Y: Array,
    beta: Union[float, Sequence[float], Array],
    solver: str = "auto",
    *,
    max_iter: int = 1000,
    tol: Optional[float] = None,
    eval_every: int = 10,
    beta_scale: Optional[str] = None,
    precond_rank: Optional[int] = None,
    precond_power: int = 1,
    refine: Optional[bool] = None,
    factor_dtype: torch.dtype = torch.float32,
    precond: Optional[str] = "cholesky",
    warm_start: bool = False,
    dtype: Optional[torch.dtype] = None,
    n_classes: Optional[int] = None,
    sym_tol: Optional[float] = None,
    allow_tf32: bool = False,
    seed: int = 0,
    progress: Optional[bool] = False,
    return_info: bool = False,
):
    """Dual coefficients alpha with (K + beta I) alpha = Y, for one beta or many at once.

    Args:
        K: [n, n] symmetric PSD training Gram matrix (tensor or numpy array).
        Y: integer labels [n] (one-hot targets [n, C], C = max label + 1 or ``n_classes``),
            or real targets [n] (treated as [n, 1]) or [n, m].
        beta: a number >= 0 or a sequence of them (absolute, scikit-learn's ``alpha``;
            multiplied by mean diag(K) when ``beta_scale="trace"``).
        solver: ``"auto"`` (default: chosen by n, memory and the measured table, reported as
            ``info["solver"]``), ``"krylov"``, ``"cg"``, ``"cholesky"``, ``"eigh"`` or
            ``"nesterov"`` (docs/solvers.md says which when).
        max_iter, tol, eval_every: iterative solvers stop when ||(K + beta I) alpha - Y||_F
            <= tol * ||Y||_F per beta (tol=None: 1e-6 for float64 results, 1e-3 for float32
            ones, which cannot hold much less) (checked every ``eval_every`` steps for nesterov,
            every step for cg), else at ``max_iter``. eigh and cholesky are exact: they return
            the result dtype's precision, and ``tol`` only decides ``converged``.
        precond_rank, precond_power: the Nystrom preconditioner's rank (None/0: none) and
            subspace iterations of its sketch, for cg and nesterov (one sketch, every beta).
        precond: krylov's preconditioner: ``"cholesky"`` (one factor per group of betas) or
            None (no factor: the plain Krylov space shared by every beta, multi-shift style).
        warm_start: cg only: one beta at a time, largest first, each started from the
            previous solution (the regularization path) instead of every beta in one block.
        refine: fp64 iterative refinement (default: always for cholesky, for eigh when the
            working dtype is float32; never for the iterative solvers).
        factor_dtype: dtype of cholesky's and krylov's factors (krylov uses float64 below
            tol = 1e-4, where a float32 factor's rounding would stall it).
        dtype: dtype of the result (default: K's working dtype, see the module docs).
        sym_tol: tolerance on ||K - K.T||_F / ||K||_F (default 1e-4; math.inf skips the check).
        allow_tf32: let fp32 GEMMs on CUDA use TF32 (faster, ~1e-3 relative error).
        seed: seed of the random sketches (power iteration, Nystrom).
        progress: tqdm bar: False (default) none, True or None on a terminal, "always"
            also when stderr is not a terminal.
        return_info: also return a dict with per-beta ``n_iter``, ``converged``,
            ``residual``, ``history`` and solver extras.

    Returns:
        alpha [n, m] for a scalar beta, [len(beta), n, m] for a sequence, on K's device
        (and ``info`` when ``return_info``). Warns ``ConvergenceWarning`` for a beta left
        above ``tol``.
    """
    _check_options(solver, max_iter, tol, eval_every, precond_rank, precond, warm_start)
    sharded = _sharded(K, "solve")
    if sharded is not None:  # a row shard of K under torch.distributed: its own iterations
        if solver not in ("auto", "cg", "nesterov"):
            raise ValueError(f"a row-sharded K (tk.distributed.KShard) is solved by 'cg' or 'nesterov'; got {solver!r}")
        return sharded.solve(K, Y, beta, solver="cg" if solver == "auto" else solver, tol=tol,
                             max_iter=max_iter, seed=seed)
    scalar = isinstance(beta, (int, float, np.integer, np.floating)) or (
        isinstance(beta, (torch.Tensor, np.ndarray)) and beta.ndim == 0
    )
    betas = _check_betas(beta, "beta")
    K = check_kernel(K, sym_tol)
    n = K.shape[0]
    count = label_count(Y, "Y")
    targets = check_targets(Y, n, "Y", "K", K.dtype, K.device,
                             n_classes if n_classes is not None else count)
    scale = _beta_scale(K, beta_scale)
    tol = default_tol(tol, _out_dtype(dtype, K.dtype))
    cfg = _Config(max_iter=int(max_iter), tol=tol, eval_every=int(eval_every), early_stopping=False,
                  precond_rank=precond_rank, precond_power=precond_power, refine=refine,
                  factor_dtype=factor_dtype, krylov_precond=precond, warm_start=warm_start,
                  seed=seed, progress=progress,
                  out_eps=float(torch.finfo(_out_dtype(dtype, K.dtype)).eps))
    solver, cfg, reason = _resolve(solver, K, len(betas), cfg, needs_loo=False, n_outputs=targets.values.shape[1])
    result = _run(solver, K, targets.values, [b * scale for b in betas], cfg, None, None, allow_tf32)
    result.extra["solver_reason"] = reason
    _warn_unconverged(solver, result, betas, tol, _out_dtype(dtype, K.dtype))
    alpha = result.coefs.to(_out_dtype(dtype, K.dtype))
    if scalar:
        alpha = alpha[0]
    if return_info:
        info = {"n_iter": result.n_iter, "converged": result.converged, "residual": result.residual,
                "history": result.history, **result.extra}
        return alpha, info
    return alpha
