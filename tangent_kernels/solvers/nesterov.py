"""The seed's solver: accelerated dual gradient descent, every beta at once."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from ._common import _Config, _Result, _bar, _generator, _lambda_max
from .nystrom import _Nystrom
from ._metrics import _Validation, _key, _metrics, _new_history, _record


# Nesterov's step is 1 / (safety * lambda_max_estimate + beta). The subspace-iteration
# estimate is a Ritz value, a lower bound; 5% headroom costs 5% of progress along the top
# eigenvector only, and keeps eta * lambda_max < 1 even for slowly separating spectra.
_LAMBDA_SAFETY = 1.05
# With a preconditioner the Ritz estimate comes from 2 vectors per beta (not 4 per K):
# more headroom, measured to keep every step stable on power-law spectra at no visible cost.
_PRECOND_SAFETY = 1.2


# ----------------------------------------------------------------------------- nesterov


def _nesterov(K: torch.Tensor, T: torch.Tensor, betas: List[float], cfg: _Config,
              val: Optional[_Validation]) -> _Result:
    """Accelerated dual gradient descent on f(a) = a^T (K + beta I) a / 2 - a^T T, every beta at once.

    State per (beta, output) column, all in [n, a, m] tensors (a = betas still running):
    x_k, the extrapolated point y_k and theta_k of O'Donoghue & Candes' Algorithm 1 with
    q = beta / L (beta is the strong-convexity bound we know; K's own lambda_min >= 0 is
    not assumed), gradient restart when g(y_k)^T (x_{k+1} - x_k) > 0. One GEMM K @ y per
    step; the gradient at y_k is the residual (K + beta I) y_k - T, so every check
    evaluates y_k itself and returns it. Every ``eval_every`` steps: residual, train loss,
    validation scores; a beta stops at residual <= tol, after ``patience`` checks without
    validation improvement, or at max_iter.
    """
    n, m = T.shape
    B = len(betas)
    dev, dt = K.device, K.dtype
    out = T.new_zeros(B, n, m)
    classification = val is not None and val.targets.labels is not None
    history = [_new_history(b, val is not None, classification) for b in betas]
    n_iter, converged, residual = [0] * B, [False] * B, [math.nan] * B
    tnorm = float(T.norm())
    if tnorm == 0:  # alpha = 0 solves every beta exactly
        for j in range(B):
            converged[j], residual[j] = True, 0.0
        return _Result(out, n_iter, converged, residual, history)

    all_b = torch.tensor(betas, dtype=dt, device=dev)
    gen = _generator(dev, cfg.seed)
    pre, all_scales = None, None
    if cfg.precond_rank:
        # EigenPro's idea with a Nystrom sketch shared by every beta: the step follows
        # P^{-1} g, so it is limited by lambda_max(P^{-1}(K + beta I)) ~ lam_r + beta instead
        # of lambda_max(K) + beta; beta stays the strong-convexity bound (the complement's).
        pre = _Nystrom(K, cfg.precond_rank, cfg.precond_power, gen)
        all_scales = pre.scales(all_b)
        all_L = (_PRECOND_SAFETY * pre.lambda_max(K, all_b, all_scales, cfg.power_iters, gen)).clamp_min(
            torch.finfo(dt).tiny)
        lam = float(all_L.max())
    else:
        lam = _LAMBDA_SAFETY * _lambda_max(K, cfg.power_iters, gen)
        all_L = (lam + all_b).clamp_min(torch.finfo(dt).tiny)
    all_eta, all_q = 1 / all_L, (all_b / all_L).clamp_max(1)

    track = val is not None and cfg.early_stopping
    best = T.new_zeros(B, n, m) if track else None
    best_key: List[Optional[Tuple[float, ...]]] = [None] * B
    since_best = [0] * B

    active = list(range(B))
    bt, eta, q, scales = all_b, all_eta, all_q, all_scales
    X = T.new_zeros(n, B, m)
    Y = T.new_zeros(n, B, m)
    theta = T.new_ones(B, m)
    Tc = T[:, None, :]
    bar = _bar(cfg.max_iter, "nesterov", cfg.progress)
    try:
        for k in range(1, cfg.max_iter + 1):
            a = len(active)
            b3 = bt.view(1, a, 1)
            G = (K @ Y.reshape(n, a * m)).view(n, a, m)
            G += b3 * Y - Tc  # gradient at y = residual (K + beta I) y - T
            Xn = Y - eta.view(1, a, 1) * (G if pre is None else pre.apply(G, scales))
            D = Xn - X
            restart = (G * D).sum(dim=0) > 0  # [a, m]
            th2 = theta * theta
            c = th2 - q.view(a, 1)
            theta_next = 0.5 * (torch.sqrt(c * c + 4 * th2) - c)
            momentum = theta * (1 - theta) / (th2 + theta_next)
            momentum = torch.where(restart, torch.zeros_like(momentum), momentum)
            theta_next = torch.where(restart, torch.ones_like(theta_next), theta_next)

            if k % cfg.eval_every == 0 or k == cfg.max_iter:
                res = (G.pow(2).sum(dim=(0, 2)).sqrt() / tnorm).tolist()
                train = (G - b3 * Y).pow(2).mean(dim=(0, 2)).tolist()  # (K y - T)^2
                if not all(math.isfinite(r) for r in res):
                    raise FloatingPointError(
                        "nesterov diverged (non-finite residual); K may not be PSD or its scale "
                        "overflows the working dtype: check K, or use solver='eigh' / 'cholesky'"
                    )
                metrics = _metrics(val.scores(Y), val.targets) if val is not None else None
                done = []
                for i, j in enumerate(active):
                    _record(history[j], k, train[i], res[i], metrics, i)
                    stop = res[i] <= cfg.tol or k == cfg.max_iter
                    if track:
                        key = _key(metrics, i)
                        if best_key[j] is None or key > best_key[j]:
                            best_key[j], since_best[j] = key, 0
                            best[j] = Y[:, i]
                            history[j]["best_iteration"] = k
                        else:
                            since_best[j] += 1
                            stop |= cfg.patience is not None and since_best[j] >= cfg.patience
                    if stop:
                        done.append(i)
                        n_iter[j], converged[j], residual[j] = k, res[i] <= cfg.tol, res[i]
                        out[j] = best[j] if track else Y[:, i]
                if done:
                    keep = [i for i in range(a) if i not in done]
                    active = [active[i] for i in keep]
                    if not active:
                        bar.update(1)
                        break
                    sel = torch.tensor(keep, device=dev)
                    X, Xn, Y, D = X[:, sel], Xn[:, sel], Y[:, sel], D[:, sel]
                    theta_next, momentum = theta_next[sel], momentum[sel]
                    bt, eta, q = bt[sel], eta[sel], q[sel]
                    if scales is not None:
                        scales = scales[:, sel]
                bar.set_postfix_str(f"residual {max(res):.2e}, {len(active)} betas running")
            Y = Xn + momentum.unsqueeze(0) * D
            X = Xn
            theta = theta_next
            bar.update(1)
    finally:
        bar.close()
    extra = {"lambda_max": lam / (_LAMBDA_SAFETY if pre is None else _PRECOND_SAFETY),
             "precond_rank": pre.rank if pre is not None else 0}
    return _Result(out, n_iter, converged, residual, history, extra)
