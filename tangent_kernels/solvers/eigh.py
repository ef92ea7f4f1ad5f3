"""One eigendecomposition, every beta in closed form, exact leave-one-out scores."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch

from ._checks import _indefinite, _not_psd
from ._common import _Config, _refine, _residual_stats, _Result
from ._metrics import _new_history, _record


# ----------------------------------------------------------------------------- eigh


def _eigh(K: torch.Tensor, T: torch.Tensor, betas: List[float], cfg: _Config, cv: Optional[str]) -> _Result:
    """K = U diag(lam) U^T once; alpha_beta = U diag(1 / (lam + beta)) U^T T for every beta.

    lam is clamped at 0 (K is PSD; negative eigenvalues are rounding), and modes with
    lam + beta <= eps * lam_max are dropped (a pseudo-inverse: beta = 0 on a singular K
    gives the minimum-norm interpolant instead of amplified rounding noise; any beta above
    eps * lam_max keeps every mode).

    With ``cv`` ('loo' or 'gcv') the leave-one-out residuals are computed in closed form
    (as scikit-learn's RidgeCV does): with w = beta / (lam + beta) (1 for dropped modes),
    T - K alpha = U (w * U^T T) and 1 - H_ii = ((U * U) w)_i, so
    e_loo = (T - K alpha) / (1 - H_ii); GCV replaces 1 - H_ii by its mean.
    """
    n, m = T.shape
    B = len(betas)
    dt = K.dtype
    lam, U = torch.linalg.eigh(K)
    largest = float(lam.max())
    if _indefinite(float(lam.min()), largest, n, dt):
        raise _not_psd(float(lam.min()), largest)
    lam = lam.clamp_min(0)
    bt = torch.tensor(betas, dtype=dt, device=K.device)
    den = lam[:, None] + bt[None, :]  # [n, B]
    # Eigenvalues carry absolute errors ~ eps * lam_max: below that, lam + beta is noise.
    kept = den > torch.finfo(dt).eps * lam.max()
    inv = torch.where(kept, 1 / den.clamp_min(torch.finfo(dt).tiny), torch.zeros_like(den))
    UT = U.T @ T  # [n, m]
    coefs = (U @ (inv[:, :, None] * UT[:, None, :]).reshape(n, B * m)).view(n, B, m)
    extra: Dict[str, Any] = {}
    if cv is not None:
        w = torch.where(kept, bt[None, :] * inv, torch.ones_like(inv))  # [n, B]
        resid = (U @ (w[:, :, None] * UT[:, None, :]).reshape(n, B * m)).view(n, B, m)
        if cv == "loo":
            denom = (U * U) @ w  # [n, B]
        else:
            denom = w.mean(dim=0, keepdim=True).expand(n, B)
        ok = denom > 16 * torch.finfo(dt).eps
        e = torch.where(ok[:, :, None], resid / denom.clamp_min(torch.finfo(dt).tiny)[:, :, None],
                        torch.full_like(resid, math.nan))
        extra["cv_residuals"] = e.permute(1, 0, 2)  # [B, n, m]
    X = coefs
    n_iter = [0] * B
    # fp32 eigh is backward stable only to ~ eps * lam_max: at beta = 1e-3 * mean diag that
    # leaves ~1e-2 relative error (measured, n = 4096). A few fp64 refinement steps (each
    # two GEMMs with U and one fp64 residual pass) restore correctly rounded fp32 coefficients.
    if (dt == torch.float32) if cfg.refine is None else cfg.refine:
        def apply_inverse(R: torch.Tensor) -> torch.Tensor:
            Rw = R.to(dt)
            W = (U.T @ Rw.reshape(n, -1)).view(n, -1, m) * inv[:, :, None]
            return (U @ W.reshape(n, -1)).view(n, -1, m)

        X, res, n_iter, _ = _refine(K, T.double(), bt, coefs.double(), apply_inverse, cfg.out_eps, cfg.max_refine)
        _, train = _residual_stats(K, T, bt, X.to(dt))
    else:
        res, train = _residual_stats(K, T, bt, coefs)
    converged = [r <= cfg.tol for r in res]
    history = [_new_history(b, False, False) for b in betas]
    for j in range(B):
        _record(history[j], n_iter[j], train[j], res[j], None, j)
    extra["eigenvalues"] = lam
    return _Result(X.permute(1, 0, 2), n_iter, converged, res, history, extra)
