"""Block (preconditioned) conjugate gradients, every (beta, output) column at once."""

from __future__ import annotations

import math
import time
from typing import List, Optional

import torch

from ._common import _Config, _Result, _bar, _generator, _matmul_fp64
from ._metrics import _new_history, _record
from .nystrom import _Nystrom


def _cg(K: torch.Tensor, T: torch.Tensor, betas: List[float], cfg: _Config) -> _Result:
    """Block CG over every beta at once, or with ``cfg.warm_start`` along the beta path."""
    if cfg.warm_start and len(betas) > 1:
        return _cg_path(K, T, betas, cfg)
    return _cg_block(K, T, betas, cfg)


def _cg_path(K: torch.Tensor, T: torch.Tensor, betas: List[float], cfg: _Config) -> _Result:
    """One beta at a time, largest first, each started from the previous beta's solution
    (the regularization path), all preconditioned by one shared sketch. Each solve carries
    m columns instead of betas x m, and a warm start saves the steps that the previous
    solution already made; betas run one after the other, so GEMMs are narrower."""
    order = sorted(range(len(betas)), key=lambda j: -betas[j])
    t0 = time.perf_counter()
    pre = (_Nystrom(K, cfg.precond_rank, cfg.precond_power, _generator(K.device, cfg.seed))
           if cfg.precond_rank else None)
    precond_time = time.perf_counter() - t0
    B, (n, m) = len(betas), T.shape
    out = T.new_zeros(B, n, m)
    n_iter, converged, residual = [0] * B, [False] * B, [math.nan] * B
    history: List = [None] * B
    x0 = None
    for j in order:
        r = _cg_block(K, T, [betas[j]], cfg, x0=x0, pre=pre)
        out[j], x0 = r.coefs[0], r.coefs[0]
        n_iter[j], converged[j], residual[j], history[j] = r.n_iter[0], r.converged[0], r.residual[0], r.history[0]
    extra = {"precond_rank": pre.rank if pre is not None else 0, "precond_time": precond_time}
    return _Result(out, n_iter, converged, residual, history, extra)


def _cg_block(K: torch.Tensor, T: torch.Tensor, betas: List[float], cfg: _Config,
              x0: Optional[torch.Tensor] = None, pre: Optional[_Nystrom] = None) -> _Result:
    """(Preconditioned) conjugate gradients on every (beta, output) column at once.

    ``x0`` [n, m]: a start shared by every beta (default 0); ``pre``: a sketch already built.

    One GEMM K @ P per step for all columns. The recursive residual drives the stopping
    test; when it says a beta is done, the true residual is computed: accepted if <= tol,
    otherwise CG restarts from it (residual replacement), and a beta whose true residual
    does not halve between replacements has reached the working precision's floor and stops.
    """
    n, m = T.shape
    B = len(betas)
    dev, dt = K.device, K.dtype
    out = T.new_zeros(B, n, m)
    history = [_new_history(b, False, False) for b in betas]
    n_iter, converged, residual = [0] * B, [False] * B, [math.nan] * B
    tnorm = float(T.norm())
    if tnorm == 0:
        for j in range(B):
            converged[j], residual[j] = True, 0.0
        return _Result(out, n_iter, converged, residual, history)

    t0 = time.perf_counter()
    if pre is None and cfg.precond_rank:
        pre = _Nystrom(K, cfg.precond_rank, cfg.precond_power, _generator(dev, cfg.seed))
    precond_time = time.perf_counter() - t0

    active = list(range(B))
    bt = torch.tensor(betas, dtype=dt, device=dev)
    scales = pre.scales(bt) if pre is not None else None

    def precondition(R: torch.Tensor) -> torch.Tensor:
        return pre.apply(R, scales) if pre is not None else R

    X = T.new_zeros(n, B, m)
    R = T[:, None, :].repeat(1, B, 1)
    if x0 is not None:
        X += x0[:, None, :]
        R -= (K @ x0)[:, None, :] + bt.view(1, B, 1) * X
    Z = precondition(R)
    P = Z.clone()
    rz = (R * Z).sum(dim=0)
    last_true = [math.inf] * B
    bar = _bar(cfg.max_iter, "cg", cfg.progress)
    try:
        for k in range(1, cfg.max_iter + 1):
            a = len(active)
            b3 = bt.view(1, a, 1)
            AP = (K @ P.reshape(n, a * m)).view(n, a, m)
            AP += b3 * P
            pAp = (P * AP).sum(dim=0)
            step = torch.where(pAp > 0, rz / pAp.clamp_min(torch.finfo(dt).tiny), torch.zeros_like(rz))
            X += step * P
            R -= step * AP
            res = (R.pow(2).sum(dim=(0, 2)).sqrt() / tnorm).tolist()
            if k % cfg.eval_every == 0:
                train = (-R - b3 * X).pow(2).mean(dim=(0, 2)).tolist()
                for i, j in enumerate(active):
                    _record(history[j], k, train[i], res[i], None, i)
            check = [i for i in range(a) if res[i] <= cfg.tol or k == cfg.max_iter]
            restart: List[int] = []
            done: List[int] = []
            if check:
                sel = torch.tensor(check, device=dev)
                Xc = X[:, sel]
                # The residual that certifies convergence (and restarts CG) is formed in fp64:
                # in fp32 its own rounding, ~eps ||K|| ||x||, is what stalled fp32 CG above
                # 1e-3 at n = 50,000 (bench/RESULTS.md); the recursion stays in fp32.
                Xc64 = Xc.double()
                true = (T.double()[:, None, :] - _matmul_fp64(K, Xc64.reshape(n, -1)).view(n, len(check), m)
                        - b3[:, sel].double() * Xc64)
                true_res = (true.pow(2).sum(dim=(0, 2)).sqrt() / tnorm).tolist()
                true = true.to(dt)
                for c_i, i in enumerate(check):
                    j = active[i]
                    stalled = true_res[c_i] > 0.5 * last_true[j]
                    if true_res[c_i] <= cfg.tol or k == cfg.max_iter or stalled:
                        done.append(i)
                        n_iter[j], residual[j] = k, true_res[c_i]
                        converged[j] = true_res[c_i] <= cfg.tol
                        out[j] = X[:, i]
                        if not history[j]["iteration"] or history[j]["iteration"][-1] != k:
                            fit = true[:, c_i] + bt[i] * Xc[:, c_i]  # T - K x
                            _record(history[j], k, float(fit.pow(2).mean()), true_res[c_i], None, 0)
                    else:
                        last_true[j] = true_res[c_i]
                        R[:, i] = true[:, c_i]
                        restart.append(i)
            if done:
                keep = [i for i in range(a) if i not in done]
                restart = [keep.index(i) for i in restart]
                active = [active[i] for i in keep]
                if not active:
                    bar.update(1)
                    break
                sel = torch.tensor(keep, device=dev)
                X, R, P, rz, bt = X[:, sel], R[:, sel], P[:, sel], rz[sel], bt[sel]
                if scales is not None:
                    scales = scales[:, sel]
            Z = precondition(R)
            rz_next = (R * Z).sum(dim=0)
            mix = torch.where(rz > 0, rz_next / rz.clamp_min(torch.finfo(dt).tiny), torch.zeros_like(rz))
            if restart:
                mix[restart] = 0
            P = Z + mix * P
            rz = rz_next
            bar.set_postfix_str(f"residual {max(res):.2e}, {len(active)} betas running")
            bar.update(1)
    finally:
        bar.close()
    extra = {"precond_rank": pre.rank if pre is not None else 0, "precond_time": precond_time}
    return _Result(out, n_iter, converged, residual, history, extra)
