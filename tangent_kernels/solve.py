"""Kernel ridge regression on a precomputed (eNTK) Gram matrix.

This module owns everything after the Gram matrix: checking a kernel problem, the four
dual solvers, choosing the regularization strength, and the ``KernelRidge`` estimator.

The problem, for every regularization strength beta and all m outputs at once::

    (K + beta I) alpha = Y            K: [n, n] symmetric PSD, Y: [n, m], alpha: [n, m]
    scores(X_test) = K(X_test, X) alpha (+ f0(X_test))

beta is absolute, exactly scikit-learn's ``KernelRidge(alpha=beta, kernel="precomputed")``
(whose dual problem is the same linear system); ``beta_scale="trace"`` multiplies
it by the mean diagonal of K so that one grid fits kernels of any scale.

Solvers (all device-agnostic: they run where K lives):

- ``"nesterov"``: the seed's dual gradient iteration a <- a - eta ((K a - Y) + beta a),
  accelerated (O'Donoghue & Candes' scheme with adaptive gradient restart), every beta
  and every output advancing together in one GEMM per step; validation early stopping.
- ``"cg"``: conjugate gradients on every (beta, output) column at once, optionally
  preconditioned by a randomized Nystrom approximation of K's top eigenpairs.
- ``"eigh"``: one eigendecomposition, then every beta in closed form, and exact
  leave-one-out / GCV scores for choosing beta without a validation set.
- ``"cholesky"``: one factorization per beta in fp32, then fp64 iterative refinement.

Dtype rule (decided here, once): the *working dtype* is float64 when K is float64 and
float32 otherwise (float16/bfloat16 kernels are upcast). Nesterov, CG and eigh compute
in the working dtype. Cholesky factors in ``factor_dtype`` (float32 by default) and
refines with float64 residuals and a float64 solution (falling back to float64 factors
when the float32 ones are not accurate enough); eigh refines the same way when the
working dtype is float32. Coefficients are returned in the working dtype unless
``dtype=`` asks for another. Float32 GEMMs are IEEE fp32: TF32 is switched off for the
duration of a solve (and restored) unless ``allow_tf32=True``. Inputs are never
modified; K is copied only when its dtype or device changes.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._model import check_device, fp32_math
from .engine import _check_progress, _progress_bar

__all__ = ["KernelRidge", "solve", "SOLVERS", "NotFittedError", "ConvergenceWarning"]

SOLVERS = ("nesterov", "cg", "eigh", "cholesky")

# Default tolerance for the symmetry check, ||K - K.T||_F / ||K||_F. It catches a wrong matrix
# (a cross kernel, a transposed block), not rounding: G @ G.T in fp32 from BLAS is
# symmetric only to ~sqrt(p) * eps relative, and fp32 kernels cast to fp64 keep that.
_SYM_TOL = 1e-4
# Element budget of one block of rows when an fp32 K is multiplied in fp64 (refinement
# residuals): 2**24 elements = 128 MiB in fp64, where a whole fp64 copy of an n = 50,000
# kernel would be 20 GB.
_CHUNK_ELEMENTS = 2**24
# Nesterov's step is 1 / (safety * lambda_max_estimate + beta). The subspace-iteration
# estimate is a Ritz value, a lower bound; 5% headroom costs 5% of progress along the top
# eigenvector only, and keeps eta * lambda_max < 1 even for slowly separating spectra.
_LAMBDA_SAFETY = 1.05
# Telescopic search ("auto"): decades of beta relative to mean diag(K), then a finer grid.
_AUTO_RANGE = (1e-6, 1e2)


class NotFittedError(ValueError, AttributeError):
    """predict()/score() called before fit() (a ValueError, like scikit-learn's)."""


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped at max_iter (or stagnated) above the tolerance."""


Array = Union[torch.Tensor, np.ndarray]


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


# ----------------------------------------------------------------------------- input checks


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name} is a numpy array of dtype object; pass a numeric array")
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray; got {type(x).__name__}")


def _check_float(x: torch.Tensor, name: str) -> None:
    if x.is_complex() or not x.is_floating_point():
        raise TypeError(
            f"{name} must be a real floating-point tensor; got dtype {x.dtype} "
            f"(convert with {name}.float() or {name}.double())"
        )


def _first_bad(x: torch.Tensor) -> Tuple[int, ...]:
    return tuple(int(i) for i in (~torch.isfinite(x)).nonzero()[0].tolist())


def _check_finite(x: torch.Tensor, name: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        count = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{name} has {count} non-finite value(s) (NaN or inf), the first at index "
            f"{_first_bad(x)}; fix or drop those samples before fitting"
        )


def _check_kernel(K: Any, sym_tol: Optional[float], device: Optional[torch.device] = None) -> torch.Tensor:
    """K -> [n, n] tensor in the working dtype on ``device``; raises on a bad kernel."""
    K = _as_tensor(K, "K")
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(
            f"K must be a square [n, n] Gram matrix K(X_train, X_train); got shape {tuple(K.shape)}. "
            "A cross kernel K(X_other, X_train) goes to K_val= or predict()."
        )
    if K.shape[0] == 0:
        raise ValueError("K is empty (n = 0); a kernel problem needs at least one training sample")
    _check_float(K, "K")
    if device is not None:
        K = K.to(device)
    K = K.to(_working_dtype(K.dtype))
    tol = _SYM_TOL if sym_tol is None else float(sym_tol)
    if not tol >= 0:
        raise ValueError(f"sym_tol must be >= 0 (math.inf skips the symmetry check); got {sym_tol!r}")
    # aminmax: one pass, no n x n temporary (isfinite(K).all() measured 15x slower on CPU);
    # NaN/inf propagate into the min or the max.
    lo, hi = torch.aminmax(K)
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        _check_finite(K, "K")
    if math.isfinite(tol):
        # ||K - K^T||_F estimated with 8 random probes: K V and K^T V are two thin GEMMs
        # (K is never transposed in memory), where an entrywise comparison would transpose
        # K through memory (~0.3 s at n = 4096 on CPU). The estimate is unbiased and is zero
        # only if K is symmetric; +-50% is plenty to tell a Gram from a wrong matrix.
        g = _generator(K.device, 0)
        V = torch.randn(K.shape[0], 8, generator=g, device=K.device, dtype=K.dtype)
        KV = K @ V
        KtV = (V.T @ K).T  # measured 4x faster than K.T @ V on CPU
        asym, scale = float((KV - KtV).norm()), float(KV.norm())
        if asym > tol * scale:
            raise ValueError(
                f"K is not symmetric: ||K - K.T||_F / ||K||_F ~ {asym / scale:.2g} (estimated) exceeds "
                f"sym_tol = {tol:g}. Pass the training Gram K(X_train, X_train); if the asymmetry is "
                "rounding, symmetrize with (K + K.T) / 2 or raise sym_tol."
            )
    return K


@dataclass
class _Targets:
    """Regression targets in the working dtype: values [n, m]; labels [n] for classification."""

    values: torch.Tensor
    labels: Optional[torch.Tensor]


def _label_count(Y: Any, name: str) -> Optional[int]:
    """max label + 1 when Y holds integer labels, else None (no conversion, no checks)."""
    if isinstance(Y, (torch.Tensor, np.ndarray)):
        t = _as_tensor(Y, name)
        if not t.is_floating_point() and t.dtype != torch.bool and not t.is_complex() and t.numel():
            return int(t.max()) + 1
    return None


def _check_targets(
    Y: Any, n: int, name: str, n_rows_name: str, dtype: torch.dtype, device: torch.device,
    n_classes: Optional[int], want_labels: Optional[bool] = None,
) -> _Targets:
    """Y: int labels [n] -> one-hot [n, n_classes]; float [n] or [n, m] -> [n, m] targets."""
    Y = _as_tensor(Y, name)
    if Y.dtype == torch.bool or Y.is_complex():
        raise TypeError(
            f"{name} has dtype {Y.dtype}; pass integer class labels [n] (e.g. {name}.long()) "
            "or real-valued regression targets [n] / [n, m]"
        )
    is_labels = not Y.is_floating_point()
    if want_labels is not None and is_labels != want_labels:
        kind = "integer class labels" if want_labels else "floating-point regression targets"
        raise TypeError(f"{name} must hold {kind} like Y does; got dtype {Y.dtype}")
    if Y.ndim == 0 or Y.ndim > 2 or (is_labels and Y.ndim != 1):
        want = "[n] integer labels" if is_labels else "[n] or [n, m] targets"
        raise ValueError(f"{name} must be {want}; got shape {tuple(Y.shape)}")
    if Y.shape[0] != n:
        raise ValueError(
            f"{name} has {Y.shape[0]} rows but {n_rows_name} has {n}: one target row per sample"
        )
    Y = Y.to(device)
    if is_labels:
        if Y.numel() and int(Y.min()) < 0:
            raise ValueError(f"{name} has negative class labels (min {int(Y.min())}); labels must be 0 .. C-1")
        assert n_classes is not None
        if Y.numel() and int(Y.max()) >= n_classes:
            raise ValueError(f"{name} has label {int(Y.max())} but n_classes={n_classes}")
        labels = Y.long()
        values = torch.nn.functional.one_hot(labels, n_classes).to(dtype)
        return _Targets(values, labels)
    _check_finite(Y, name)
    values = Y.to(dtype)
    return _Targets(values[:, None] if values.ndim == 1 else values, None)


def _check_offset(f0: Any, shape: Tuple[int, int], name: str, like: torch.Tensor) -> torch.Tensor:
    f0 = _as_tensor(f0, name)
    _check_float(f0, name)
    if f0.ndim == 1 and shape[1] == 1:
        f0 = f0[:, None]
    if tuple(f0.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape {tuple(shape)} (one network output per sample and target column); "
            f"got {tuple(f0.shape)}"
        )
    _check_finite(f0, name)
    return f0.to(device=like.device, dtype=like.dtype)


def _check_cross(Kx: Any, n: int, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    Kx = _as_tensor(Kx, name)
    if Kx.ndim != 2 or Kx.shape[1] != n:
        hint = f" (one sample? use {name}[None])" if Kx.ndim == 1 and Kx.shape[0] == n else ""
        raise ValueError(
            f"{name} must be the cross kernel K(X_other, X_train) of shape [n_other, {n}]; "
            f"got {tuple(Kx.shape)}{hint}"
        )
    _check_float(Kx, name)
    Kx = Kx.to(device=device, dtype=dtype)
    _check_finite(Kx, name)
    return Kx


def _check_betas(betas: Any, name: str = "betas") -> List[float]:
    if isinstance(betas, (torch.Tensor, np.ndarray)):
        values = _as_tensor(betas, name).reshape(-1).tolist()
    elif isinstance(betas, (int, float, np.integer, np.floating)) and not isinstance(betas, bool):
        values = [betas]
    elif isinstance(betas, (list, tuple)):
        values = list(betas)
    else:
        raise TypeError(f"{name} must be a number, a sequence of numbers or 'auto'; got {betas!r}")
    if not values:
        raise ValueError(f"{name} is empty; give at least one regularization strength")
    out = []
    for b in values:
        if isinstance(b, bool) or not isinstance(b, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must hold numbers; got {b!r}")
        b = float(b)
        if not math.isfinite(b) or b < 0:
            raise ValueError(
                f"{name} must be finite and >= 0 (beta is the ridge strength in (K + beta I) alpha = Y); got {b!r}"
            )
        out.append(b)
    return out


def _check_options(solver: str, max_iter: int, tol: float, eval_every: int, precond_rank: Optional[int]) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(map(repr, SOLVERS))}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer; got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.integer, np.floating)) or not (0 <= tol < math.inf):
        raise ValueError(f"tol must be a finite number >= 0 (relative residual); got {tol!r}")
    if isinstance(eval_every, bool) or not isinstance(eval_every, (int, np.integer)) or eval_every < 1:
        raise ValueError(f"eval_every must be a positive integer; got {eval_every!r}")
    if precond_rank is not None:
        if solver != "cg":
            raise ValueError(f"precond_rank applies to solver='cg' only; got solver={solver!r}")
        if isinstance(precond_rank, bool) or not isinstance(precond_rank, (int, np.integer)) or precond_rank < 0:
            raise ValueError(f"precond_rank must be a non-negative integer or None; got {precond_rank!r}")


# ----------------------------------------------------------------------------- metrics


@dataclass
class _Validation:
    """Held-out data: cross kernel [n_val, n], targets, and f0 offsets [n_val, m] or None."""

    K: torch.Tensor
    targets: _Targets
    f0: Optional[torch.Tensor]

    def scores(self, coefs: torch.Tensor) -> torch.Tensor:
        """coefs [n, a, m] -> validation scores [n_val, a, m] (f0 added)."""
        n, a, m = coefs.shape
        P = (self.K @ coefs.reshape(n, a * m)).view(-1, a, m)
        return P if self.f0 is None else P + self.f0[:, None, :]


def _metrics(P: torch.Tensor, targets: _Targets) -> Dict[str, List[float]]:
    """Scores P [n, a, m] against targets -> {'loss': [a], 'accuracy' or 'r2': [a]}."""
    T = targets.values
    err = P - T[:, None, :]
    out = {"loss": err.pow(2).mean(dim=(0, 2)).tolist()}
    if targets.labels is not None:
        hits = P.argmax(dim=2) == targets.labels[:, None]
        out["accuracy"] = hits.to(P.dtype).mean(dim=0).tolist()
    else:
        # R^2 per output, averaged over outputs (scikit-learn's multioutput="uniform_average");
        # a constant target column scores 1 when predicted exactly, else 0 (as scikit-learn).
        sse = err.pow(2).sum(dim=0)  # [a, m]
        sst = (T - T.mean(dim=0)).pow(2).sum(dim=0)  # [m]
        r2 = torch.where(sst > 0, 1 - sse / sst.clamp_min(torch.finfo(P.dtype).tiny), (sse == 0).to(P.dtype))
        out["r2"] = r2.mean(dim=1).tolist()
    return out


def _key(metrics: Dict[str, List[float]], i: int) -> Tuple[float, ...]:
    """Larger is better: accuracy first (ties broken by lower loss), else lower loss. NaN is worst."""
    loss = metrics["loss"][i]
    loss = -math.inf if math.isnan(loss) else -loss
    if "accuracy" in metrics:
        return (metrics["accuracy"][i], loss)
    return (loss,)


def _new_history(beta: float, validation: bool, classification: bool) -> Dict[str, Any]:
    h: Dict[str, Any] = {"beta": beta, "iteration": [], "train_loss": [], "residual": []}
    if validation:
        h["val_loss"] = []
        h["val_accuracy" if classification else "val_r2"] = []
        h["best_iteration"] = None
    return h


def _record(h: Dict[str, Any], iteration: int, train: float, residual: float,
            val: Optional[Dict[str, List[float]]], i: int) -> None:
    h["iteration"].append(iteration)
    h["train_loss"].append(train)
    h["residual"].append(residual)
    if val is not None:
        h["val_loss"].append(val["loss"][i])
        key = "val_accuracy" if "accuracy" in val else "val_r2"
        h[key].append(val["accuracy" if "accuracy" in val else "r2"][i])


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
    bar = _progress_bar(total, desc, _check_progress(progress), unit="it")
    if bar is None:
        return _NullBar()
    bar.leave = False
    return bar


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

    lam = _LAMBDA_SAFETY * _lambda_max(K, cfg.power_iters, _generator(dev, cfg.seed))
    all_b = torch.tensor(betas, dtype=dt, device=dev)
    all_L = (lam + all_b).clamp_min(torch.finfo(dt).tiny)
    all_eta, all_q = 1 / all_L, all_b / all_L

    track = val is not None and cfg.early_stopping
    best = T.new_zeros(B, n, m) if track else None
    best_key: List[Optional[Tuple[float, ...]]] = [None] * B
    since_best = [0] * B

    active = list(range(B))
    bt, eta, q = all_b, all_eta, all_q
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
            Xn = Y - eta.view(1, a, 1) * G
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
                bar.set_postfix_str(f"residual {max(res):.2e}, {len(active)} betas running")
            Y = Xn + momentum.unsqueeze(0) * D
            X = Xn
            theta = theta_next
            bar.update(1)
    finally:
        bar.close()
    return _Result(out, n_iter, converged, residual, history, {"lambda_max": lam / _LAMBDA_SAFETY})


# ----------------------------------------------------------------------------- cg


class _Nystrom:
    """Randomized Nystrom preconditioner for K + beta I (Frangella, Tropp & Udell 2023).

    K ~= U diag(lam) U^T with U [n, r]; for each beta the preconditioner is
    P^{-1} = (lam_r + beta) U (diag(lam) + beta)^{-1} U^T + (I - U U^T), which maps the top
    r eigenvalues of K + beta I to ~ lam_r + beta: CG then sees cond ~ (lam_r + beta) / beta.
    ``power`` subspace iterations sharpen the sketch toward the true top eigenvectors.
    The small r x r algebra runs in fp64 (it costs O(n r^2), nothing next to the sketch).
    """

    def __init__(self, K: torch.Tensor, rank: int, power: int, gen: torch.Generator):
        n = K.shape[0]
        r = min(rank, n)
        Omega = _orthonormal(torch.randn(n, r, generator=gen, device=K.device, dtype=K.dtype))
        for _ in range(power):
            Omega = _orthonormal(K @ Omega)
        S = (K @ Omega).double()
        O = Omega.double()
        eps = torch.finfo(K.dtype).eps
        # Shift of Frangella et al. with ||S||_F for their ||S||_2: an upper bound that
        # avoids an SVD of the [n, r] sketch; it only needs to exceed S's rounding.
        nu = math.sqrt(n) * eps * float(S.norm())
        S += nu * O
        M = O.T @ S
        C, info = torch.linalg.cholesky_ex((M + M.T) / 2)
        while int(info) != 0:  # the shift was too small for this sketch's rounding
            nu *= 10
            S += 9 * nu / 10 * O
            M = O.T @ S
            C, info = torch.linalg.cholesky_ex((M + M.T) / 2)
        Bm = torch.linalg.solve_triangular(C, S.T, upper=False).T  # S C^{-T}: [n, r]
        lam, V = torch.linalg.eigh(Bm.T @ Bm)  # squared singular values of Bm, ascending
        sigma = lam.clamp_min(0).sqrt()
        keep = sigma > sigma.max() * 1e-12
        V, sigma = V[:, keep], sigma[keep]
        self.U = ((Bm @ V) / sigma).to(K.dtype)  # left singular vectors of Bm
        self.lam = (sigma.pow(2) - nu).clamp_min(0).to(K.dtype)
        self.rank = int(self.lam.numel())

    def scales(self, betas: torch.Tensor) -> torch.Tensor:
        """[r, a]: (lam_r + beta) / (lam + beta) - 1 for each kept eigenvalue and beta."""
        lam_r = self.lam.min()
        return (lam_r + betas)[None, :] / (self.lam[:, None] + betas[None, :]) - 1

    def apply(self, R: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """P^{-1} R for R [n, a, m], scales [r, a] -> [n, a, m]."""
        n, a, m = R.shape
        W = (self.U.T @ R.reshape(n, a * m)).view(-1, a, m) * scales[:, :, None]
        return R + (self.U @ W.view(-1, a * m)).view(n, a, m)


def _cg(K: torch.Tensor, T: torch.Tensor, betas: List[float], cfg: _Config) -> _Result:
    """(Preconditioned) conjugate gradients on every (beta, output) column at once.

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
    pre = None
    if cfg.precond_rank:
        pre = _Nystrom(K, cfg.precond_rank, cfg.precond_power, _generator(dev, cfg.seed))
    precond_time = time.perf_counter() - t0

    active = list(range(B))
    bt = torch.tensor(betas, dtype=dt, device=dev)
    scales = pre.scales(bt) if pre is not None else None

    def precondition(R: torch.Tensor) -> torch.Tensor:
        return pre.apply(R, scales) if pre is not None else R

    X = T.new_zeros(n, B, m)
    R = T[:, None, :].repeat(1, B, 1)
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
                true = T[:, None, :] - (K @ Xc.reshape(n, -1)).view(n, len(check), m) - b3[:, sel] * Xc
                true_res = (true.pow(2).sum(dim=(0, 2)).sqrt() / tnorm).tolist()
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
    if float(lam.min()) < -_NEGATIVE_EIGENVALUE * max(largest, 0.0) or largest < 0:
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


# ----------------------------------------------------------------------------- cholesky


def _cholesky_apply(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """(L L^T)^{-1} R in L's dtype: two triangular solves (measured 1.7x faster than
    torch.cholesky_solve for n = 4096, 10 right-hand sides on CPU)."""
    Z = torch.linalg.solve_triangular(L, R.to(L.dtype), upper=False)
    return torch.linalg.solve_triangular(L.mT, Z, upper=True)


def _cholesky(K: torch.Tensor, T: torch.Tensor, betas: List[float], cfg: _Config) -> _Result:
    """Per beta: factor K + beta I in ``factor_dtype`` (fp32), then fp64 iterative refinement.

    fp32 factors cost half of fp64 ones on GPUs that have fast fp64 and far less on those
    that do not; refinement with fp64 residuals recovers an fp64-accurate solution in a
    few triangular solves whenever cond(K + beta I) * 6e-8 < 1. Where it is not (tiny
    beta on a very ill-conditioned K), or the fp32 factorization breaks down, the beta is
    refactored in fp64. One n x n workspace is reused across betas.
    """
    n, m = T.shape
    B = len(betas)
    dt = K.dtype
    refine = True if cfg.refine is None else cfg.refine
    T64 = T.double()
    X = torch.zeros(n, B, m, dtype=torch.float64, device=K.device)
    n_iter, converged, residual = [0] * B, [False] * B, [math.nan] * B
    history = [_new_history(b, False, False) for b in betas]
    factor_dtypes: List[str] = []
    work: Dict[torch.dtype, torch.Tensor] = {}

    def factor(beta: float, fdt: torch.dtype) -> Optional[torch.Tensor]:
        A = work.get(fdt)
        if A is None:
            # Column-major, the layout LAPACK/cuSOLVER factor in: cholesky_ex then writes L
            # over A in place instead of into a second n x n buffer.
            A = work[fdt] = torch.empty(n, n, dtype=fdt, device=K.device).mT
        # K.mT has A's memory order, so this is a straight copy (a transposing one measured
        # as slow as the fp32 factorization, n = 4096 CPU). The factor thus reads K's upper
        # triangle; refinement uses all of K, so it converges to the solution for K itself.
        A.copy_(K.mT)
        A.diagonal().add_(beta)
        info = torch.empty((), dtype=torch.int32, device=K.device)
        torch.linalg.cholesky_ex(A, out=(A, info))
        return A if int(info) == 0 else None

    bar = _bar(B, "cholesky", cfg.progress)
    try:
        for j, beta in enumerate(betas):
            fdt = cfg.factor_dtype
            L = factor(beta, fdt)
            if L is None and fdt != torch.float64:
                fdt = torch.float64
                L = factor(beta, fdt)
            if L is None:
                raise ValueError(
                    f"K + beta I is not positive definite for beta={beta:g} (K is singular or not PSD "
                    "at this precision); use a larger beta, solver='eigh' (pseudo-inverse), or "
                    "solver='nesterov' with early stopping"
                )
            bt = torch.tensor([beta], dtype=torch.float64, device=K.device)

            def apply_inverse(R: torch.Tensor, L: torch.Tensor = L) -> torch.Tensor:
                return _cholesky_apply(L, R.reshape(n, m)).view(n, 1, m)

            x = apply_inverse(T64.view(n, 1, m)).double()
            if refine:
                x, res, steps, stalled = _refine(K, T64, bt, x, apply_inverse, cfg.out_eps, cfg.max_refine)
                if stalled[0] and res[0] > cfg.tol and fdt != torch.float64:
                    fdt = torch.float64
                    del work[cfg.factor_dtype]  # free the fp32 workspace before the fp64 one
                    L64 = factor(beta, fdt)
                    if L64 is not None:
                        def apply64(R: torch.Tensor, L: torch.Tensor = L64) -> torch.Tensor:
                            return _cholesky_apply(L, R.reshape(n, m)).view(n, 1, m)

                        x, res, more, _ = _refine(K, T64, bt, x, apply64, cfg.out_eps, cfg.max_refine)
                        steps = [steps[0] + more[0]]
                n_iter[j], converged[j], residual[j] = steps[0], res[0] <= cfg.tol, res[0]
                _, train = _residual_stats(K, T, bt.to(dt), x.to(dt))
            else:
                rel, train = _residual_stats(K, T, bt.to(dt), x.to(dt))
                converged[j], residual[j] = rel[0] <= cfg.tol, rel[0]
            X[:, j] = x[:, 0]
            if cfg.factor_dtype != torch.float64:
                work.pop(torch.float64, None)  # a fallback's fp64 workspace is per beta
            factor_dtypes.append(str(fdt).replace("torch.", ""))
            _record(history[j], n_iter[j], train[0], residual[j], None, 0)
            bar.update(1)
    finally:
        bar.close()
    return _Result(X.permute(1, 0, 2), n_iter, converged, residual, history,
                   {"factor_dtypes": factor_dtypes})


# ----------------------------------------------------------------------------- dispatch


# An eigenvalue below -this * lambda_max is not rounding: K is not a Gram matrix (PSD).
# fp32 K of n = 50,000 carries eigenvalue errors of ~n * 6e-8 * lambda_max = 3e-3 at worst.
_NEGATIVE_EIGENVALUE = 1e-2


def _not_psd(smallest: float, largest: float) -> ValueError:
    return ValueError(
        f"K is not positive semi-definite: its smallest eigenvalue is about {smallest:.3g} (largest "
        f"{largest:.3g}); an eNTK Gram is PSD, so K is not one (a cross kernel K(X1, X2) passed as K, a K "
        "edited or assembled from different runs?). Pass the Gram K(X, X) of one computation, or project "
        "it onto the PSD cone yourself (e.g. clamp its eigenvalues at 0) if that is what you mean"
    )


def _check_psd_estimate(K: torch.Tensor, seed: int) -> None:
    """For the iterative solvers: the extreme eigenvalues by subspace iteration (K and
    lambda_max I - K), which a clearly indefinite K fails at once."""
    gen = _generator(K.device, seed)
    largest = _lambda_max(K, 20, gen)
    if largest <= 0:
        return
    shifted = largest * torch.eye(K.shape[0], dtype=K.dtype, device=K.device) - K
    smallest = largest - _lambda_max(shifted, 20, gen)
    if smallest < -_NEGATIVE_EIGENVALUE * largest:
        raise _not_psd(smallest, largest)


def _check_beta_range(K: torch.Tensor, betas: List[float]) -> None:
    # Squared norms of (K + beta I) x appear in every solver: past sqrt(max) they overflow.
    limit = math.sqrt(torch.finfo(K.dtype).max)
    huge = [b for b in betas if b > limit]
    if huge:
        raise ValueError(
            f"beta = {huge[0]:g} is beyond what {str(K.dtype).replace('torch.', '')} arithmetic can solve with "
            f"(limit {limit:.3g}; K's mean diagonal is {float(K.diagonal().double().mean()):.3g}): use betas within "
            "a few orders of magnitude of K's scale (beta_scale='trace' makes them relative to it)"
        )


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
        elif solver == "eigh":
            result = _eigh(K, T, betas, cfg, cv)
        else:
            result = _cholesky(K, T, betas, cfg)
    finite = torch.isfinite(result.coefs.reshape(len(betas), -1)).all(dim=1).tolist()
    if not all(finite):
        bad = [b for b, ok in zip(betas, finite) if not ok]
        scale = float(K.diagonal().double().mean())
        raise ValueError(
            f"the {solver} solution is not finite for beta = {', '.join(f'{b:g}' for b in bad[:4])}: a beta so far "
            f"from K's scale (mean diagonal {scale:.3g}) overflows or underflows the arithmetic. Use betas within "
            "a few orders of magnitude of that scale (beta_scale='trace' makes betas relative to it)"
        )
    return result


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
        + (" float32 cannot take the relative residual much below 6e-8 * cond(K + beta I)."
           if dtype == torch.float32 else ""),
        ConvergenceWarning,
        stacklevel=3,
    )


def _beta_scale(K: torch.Tensor, beta_scale: Optional[str]) -> float:
    if beta_scale is None or beta_scale == "none":
        return 1.0
    if beta_scale == "trace":
        scale = float(K.diagonal().mean())
        if not scale > 0:
            raise ValueError(f"beta_scale='trace' needs a positive mean diagonal of K; got {scale:g}")
        return scale
    raise ValueError(f"beta_scale must be None or 'trace'; got {beta_scale!r}")


def _out_dtype(dtype: Optional[torch.dtype], working: torch.dtype) -> torch.dtype:
    if dtype is None:
        return working
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32, torch.float64 or None; got {dtype!r}")
    return dtype


def solve(
    K: Array,
    Y: Array,
    beta: Union[float, Sequence[float], Array],
    solver: str = "nesterov",
    *,
    max_iter: int = 1000,
    tol: float = 1e-6,
    eval_every: int = 10,
    beta_scale: Optional[str] = None,
    precond_rank: Optional[int] = None,
    precond_power: int = 1,
    refine: Optional[bool] = None,
    factor_dtype: torch.dtype = torch.float32,
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
        solver: ``"nesterov"``, ``"cg"``, ``"eigh"`` or ``"cholesky"`` (see the module docs).
        max_iter, tol, eval_every: iterative solvers stop when ||(K + beta I) alpha - Y||_F
            <= tol * ||Y||_F per beta (checked every ``eval_every`` steps for nesterov,
            every step for cg), else at ``max_iter``. eigh and cholesky are exact: they return
            the result dtype's precision, and ``tol`` only decides ``converged``.
        precond_rank, precond_power: cg's Nystrom preconditioner rank (None/0: none) and
            subspace iterations of its sketch.
        refine: fp64 iterative refinement (default: always for cholesky, for eigh when the
            working dtype is float32; never for the iterative solvers).
        factor_dtype: dtype of cholesky's factors.
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
    _check_options(solver, max_iter, tol, eval_every, precond_rank)
    scalar = isinstance(beta, (int, float, np.integer, np.floating)) or (
        isinstance(beta, (torch.Tensor, np.ndarray)) and beta.ndim == 0
    )
    betas = _check_betas(beta, "beta")
    K = _check_kernel(K, sym_tol)
    n = K.shape[0]
    count = _label_count(Y, "Y")
    targets = _check_targets(Y, n, "Y", "K", K.dtype, K.device,
                             n_classes if n_classes is not None else count)
    scale = _beta_scale(K, beta_scale)
    cfg = _Config(max_iter=int(max_iter), tol=float(tol), eval_every=int(eval_every), early_stopping=False,
                  precond_rank=precond_rank, precond_power=precond_power, refine=refine,
                  factor_dtype=factor_dtype, seed=seed, progress=progress,
                  out_eps=float(torch.finfo(_out_dtype(dtype, K.dtype)).eps))
    result = _run(solver, K, targets.values, [b * scale for b in betas], cfg, None, None, allow_tf32)
    _warn_unconverged(solver, result, betas, tol, _out_dtype(dtype, K.dtype))
    alpha = result.coefs.to(_out_dtype(dtype, K.dtype))
    if scalar:
        alpha = alpha[0]
    if return_info:
        info = {"n_iter": result.n_iter, "converged": result.converged, "residual": result.residual,
                "history": result.history, **result.extra}
        return alpha, info
    return alpha


# ----------------------------------------------------------------------------- estimator


class KernelRidge:
    """Kernel ridge regression / classification on a precomputed (eNTK) Gram matrix.

    ``fit`` solves (K + beta I) alpha = Y - f0 for every beta in ``betas`` with the chosen
    solver, picks the best beta on the validation set (``K_val``, ``Y_val``), or, without
    one, by leave-one-out (``solver="eigh"``, exact and cheap), and keeps its coefficients.

    Args:
        betas: ridge strengths >= 0 (absolute like scikit-learn's ``alpha``, or relative to
            mean diag(K) with ``beta_scale="trace"``), or ``"auto"``: the telescopic search,
            decades 1e-6 .. 1e2 relative to mean diag(K), then ``auto_rounds - 1`` finer grids
            (quarter, then sixteenth decades) around the best validation/LOO score.
        solver: ``"nesterov"`` (default, the seed's), ``"cg"``, ``"eigh"``, ``"cholesky"``.
        max_iter, tol: iterative solvers' budget and relative-residual target (see ``solve``).
        early_stopping: with validation data, nesterov keeps each beta's iterate with the best
            validation score (accuracy, ties broken by loss; loss for regression) instead of
            the last one. No effect on the other solvers or without validation data.
        eval_every: nesterov evaluates residual, train loss and validation every this many steps.
        device: where to solve (default: K's device); results live there.
        beta_scale: None (absolute betas) or ``"trace"``.
        patience: nesterov stops a beta after this many evaluations without validation
            improvement (default None: run to tol / max_iter and keep the best).
        cv: model selection without validation data (eigh only): ``"loo"`` (exact
            leave-one-out, default) or ``"gcv"``.
        progress: tqdm bar for the iterative solvers: False (default), True or None (on a
            terminal), "always" (also in logs and notebooks). Other keywords go to ``solve`` (precond_rank, refine, dtype, ...).

    Attributes after ``fit``:
        dual_coef_ [n, m]: coefficients of ``best_beta_``; dual_coefs_ [len(betas_), n, m] all.
        betas_ (list, in the scale of ``beta_scale``), best_beta_, best_index_, beta_scale_
        (the multiplier: 1.0 or mean diag(K)), n_iter_ (per beta), converged_, residual_
        (final relative residual per beta), history_ (per beta: dict of lists ``iteration``,
        ``train_loss`` (MSE of K alpha + f0 against the targets), ``residual``, and with
        validation ``val_loss`` + ``val_accuracy`` (labels) or ``val_r2`` (targets), and
        ``best_iteration`` (nesterov: evaluated during the iterations; the other solvers' final
        validation metrics are in ``scores_``), scores_ (per beta: the selection metrics and
        their ``source``),
        cv_predictions_ ([len(betas_), n, m] leave-one-out scores, eigh without validation),
        fit_time_ (seconds), n_classes_ (labels) or None, n_train_.
    """

    def __init__(
        self,
        betas: Union[str, float, Sequence[float]] = (1e-3, 1e-2, 1e-1),
        solver: str = "nesterov",
        max_iter: int = 1000,
        tol: float = 1e-6,
        early_stopping: bool = True,
        eval_every: int = 10,
        device: Optional[Union[str, torch.device]] = None,
        *,
        beta_scale: Optional[str] = None,
        patience: Optional[int] = None,
        cv: str = "loo",
        auto_rounds: int = 2,
        precond_rank: Optional[int] = None,
        precond_power: int = 1,
        refine: Optional[bool] = None,
        factor_dtype: torch.dtype = torch.float32,
        dtype: Optional[torch.dtype] = None,
        n_classes: Optional[int] = None,
        sym_tol: Optional[float] = None,
        allow_tf32: bool = False,
        seed: int = 0,
        progress: Optional[bool] = False,
    ):
        _check_options(solver, max_iter, tol, eval_every, precond_rank)
        if isinstance(betas, str):
            if betas != "auto":
                raise ValueError(f"betas must be numbers or 'auto'; got {betas!r}")
        else:
            betas = _check_betas(betas)
        if beta_scale not in (None, "none", "trace"):
            raise ValueError(f"beta_scale must be None or 'trace'; got {beta_scale!r}")
        if cv not in ("loo", "gcv"):
            raise ValueError(f"cv must be 'loo' or 'gcv'; got {cv!r}")
        if patience is not None and (not isinstance(patience, int) or patience < 1):
            raise ValueError(f"patience must be a positive integer or None; got {patience!r}")
        if not isinstance(auto_rounds, int) or auto_rounds < 1:
            raise ValueError(f"auto_rounds must be a positive integer; got {auto_rounds!r}")
        self.betas = betas
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.early_stopping = early_stopping
        self.eval_every = eval_every
        self.device = check_device(device)
        self.beta_scale = beta_scale
        self.patience = patience
        self.cv = cv
        self.auto_rounds = auto_rounds
        self.dtype = dtype
        self.n_classes = n_classes
        self.sym_tol = sym_tol
        self.allow_tf32 = allow_tf32
        self._cfg = _Config(max_iter=int(max_iter), tol=float(tol), eval_every=int(eval_every),
                            early_stopping=bool(early_stopping), patience=patience,
                            precond_rank=precond_rank, precond_power=precond_power, refine=refine,
                            factor_dtype=factor_dtype, seed=seed, progress=progress)

    def __repr__(self) -> str:
        return (f"KernelRidge(betas={self.betas!r}, solver={self.solver!r}, max_iter={self.max_iter}, "
                f"tol={self.tol:g}, early_stopping={self.early_stopping}, eval_every={self.eval_every})")

    # -- fit ---------------------------------------------------------------------------

    def fit(self, K: Array, Y: Array, K_val: Optional[Array] = None, Y_val: Optional[Array] = None,
            f0: Optional[Array] = None, f0_val: Optional[Array] = None) -> "KernelRidge":
        """Fit on the training Gram K [n, n] and targets Y (int labels [n] or values [n] / [n, m]).

        K_val [n_val, n] = K(X_val, X_train) and Y_val select beta (and nesterov's early
        stopping). f0 [n, m] / f0_val [n_val, m]: outputs of the network being linearized; the
        kernel model fits the remainder Y - f0 and predicts f0 + K alpha. Returns self.
        """
        start = time.perf_counter()
        if (K_val is None) != (Y_val is None):
            raise ValueError("pass K_val and Y_val together (or neither)")
        K = _check_kernel(K, self.sym_tol, self.device)
        n, dev, dt = K.shape[0], K.device, K.dtype
        counts = [c for c in (_label_count(Y, "Y"), _label_count(Y_val, "Y_val") if Y_val is not None else None)
                  if c is not None]
        n_classes = self.n_classes if self.n_classes is not None else (max(counts) if counts else None)
        targets = _check_targets(Y, n, "Y", "K", dt, dev, n_classes)
        m = targets.values.shape[1]
        classification = targets.labels is not None
        fitted = targets.values
        if f0 is not None:
            fitted = fitted - _check_offset(f0, (n, m), "f0", fitted)
        val = None
        if K_val is not None:
            Kv = _check_cross(K_val, n, "K_val", dt, dev)
            vt = _check_targets(Y_val, Kv.shape[0], "Y_val", "K_val", dt, dev, n_classes, classification)
            if vt.values.shape[1] != m:
                raise ValueError(f"Y_val has {vt.values.shape[1]} target columns but Y has {m}")
            if (f0 is None) != (f0_val is None):
                raise ValueError("pass f0 and f0_val together: validation scores are f0_val + K_val @ alpha")
            fv = _check_offset(f0_val, (Kv.shape[0], m), "f0_val", fitted) if f0_val is not None else None
            val = _Validation(Kv, vt, fv)
        elif f0_val is not None:
            raise ValueError("f0_val given without K_val / Y_val")

        auto = isinstance(self.betas, str)
        if val is None and self.solver != "eigh" and (auto or len(self.betas) > 1):
            what = "betas='auto'" if auto else f"{len(self.betas)} betas"
            raise ValueError(
                f"choosing among {what} needs validation data: pass K_val and Y_val, use "
                "solver='eigh' (exact leave-one-out scores), or give a single beta"
            )
        cv = self.cv if (val is None and self.solver == "eigh") else None
        scale = _beta_scale(K, self.beta_scale)
        out_dtype = _out_dtype(self.dtype, dt)
        cfg = dataclasses.replace(self._cfg, out_eps=float(torch.finfo(out_dtype).eps))

        if auto:
            grid_scale = float(K.diagonal().mean())
            if not grid_scale > 0:
                raise ValueError(f"betas='auto' needs a positive mean diagonal of K; got {grid_scale:g}")
            lo, hi = _AUTO_RANGE
            exps = np.arange(round(math.log10(lo)), round(math.log10(hi)) + 1, dtype=float)
            rel = [float(10.0 ** e) for e in exps]
        else:
            rel = list(self.betas)
            grid_scale = scale
        runs: List[Tuple[float, _Result, int]] = []  # (beta in user scale, result, index in result)
        tried: set = set()
        spacing = 1.0
        for round_ in range(self.auto_rounds if auto else 1):
            if round_ > 0:
                spacing /= 4
                best_rel = runs[self._select(runs, val, cv, targets)[0]][0] * scale / grid_scale
                rel = [best_rel * 10 ** (spacing * s) for s in (-3, -2, -1, 1, 2, 3)]
            user = [r * grid_scale / scale for r in rel]
            user = [b for b in user if float(f"{b:.9g}") not in tried] if auto else user
            if not user:
                break
            tried.update(float(f"{b:.9g}") for b in user)
            result = _run(self.solver, K, fitted, [b * scale for b in user], cfg, val, cv, self.allow_tf32)
            runs.extend((b, result, i) for i, b in enumerate(user))

        runs.sort(key=lambda r: r[0])
        best, scores = self._select(runs, val, cv, targets)
        self.betas_ = [b for b, _, _ in runs]
        self.dual_coefs_ = torch.stack([r.coefs[i] for _, r, i in runs]).to(out_dtype)
        self.best_index_ = best
        self.best_beta_ = self.betas_[best]
        self.dual_coef_ = self.dual_coefs_[best]
        self.beta_scale_ = scale
        self.n_iter_ = [r.n_iter[i] for _, r, i in runs]
        self.converged_ = [r.converged[i] for _, r, i in runs]
        self.residual_ = [r.residual[i] for _, r, i in runs]
        self.history_ = [dict(r.history[i], beta=b) for b, r, i in runs]
        self.scores_ = scores
        self.cv_predictions_ = None
        if cv is not None:
            preds = [targets.values - r.extra["cv_residuals"][i] for _, r, i in runs]
            self.cv_predictions_ = torch.stack(preds)  # targets - e = LOO scores (f0 included)
        self.n_classes_ = n_classes if classification else None
        self.n_train_ = n
        self.n_outputs_ = m
        self._uses_f0 = f0 is not None
        if val is None:  # with validation data, stopping early is the point, not a failure
            _warn_unconverged(self.solver, _Result(self.dual_coefs_, self.n_iter_, self.converged_,
                                                   self.residual_, []), self.betas_, self.tol, out_dtype)
        self.fit_time_ = time.perf_counter() - start
        return self

    def _select(self, runs: List[Tuple[float, _Result, int]], val: Optional[_Validation], cv: Optional[str],
                targets: _Targets) -> Tuple[int, List[Dict[str, Any]]]:
        """Index of the best run and per-run selection scores (validation, LOO/GCV, or none)."""
        scores: List[Dict[str, Any]] = []
        keys = []
        for _, r, i in runs:
            if val is not None:
                coef = r.coefs[i].to(val.K.dtype)
                metrics = _metrics(val.scores(coef[:, None, :]), val.targets)
                source = "val"
            elif cv is not None:
                e = r.extra["cv_residuals"][i]
                if cv == "loo":
                    # LOO scores in target space: the f0 offset cancels in Y - scores.
                    metrics = _metrics((targets.values - e)[:, None, :], targets)
                else:
                    metrics = {"loss": [float(e.pow(2).mean())]}
                source = cv
            else:
                scores.append({"source": None})
                keys.append((0.0,))
                continue
            score = {k: v[0] for k, v in metrics.items()}
            score["source"] = source
            scores.append(score)
            keys.append(_key(metrics, 0))
        best = max(range(len(runs)), key=lambda j: keys[j])  # first of equals: the smaller beta
        return best, scores

    # -- predict -----------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "dual_coef_"):
            raise NotFittedError("this KernelRidge is not fitted yet; call fit(K, Y, ...) before predict/score")

    def predict(self, K_test: Array, f0_test: Optional[Array] = None, *, beta: Optional[float] = None) -> torch.Tensor:
        """Scores [n_test, m] = K_test @ dual_coef_ (+ f0_test) for K_test = K(X_test, X_train) [n_test, n].

        ``beta=`` predicts with another fitted beta from ``betas_`` instead of ``best_beta_``.
        For labels, the predicted class is ``scores.argmax(1)`` (``predict_labels``).
        """
        self._check_fitted()
        coef = self.dual_coef_
        if beta is not None:
            matches = [i for i, b in enumerate(self.betas_) if math.isclose(b, beta, rel_tol=1e-9)]
            if not matches:
                raise ValueError(f"beta={beta!r} was not fitted; fitted betas_: {self.betas_}")
            coef = self.dual_coefs_[matches[0]]
        Kt = _check_cross(K_test, self.n_train_, "K_test", coef.dtype, coef.device)
        if self._uses_f0 and f0_test is None:
            raise ValueError("fit used f0: pass f0_test (the network's outputs on the test samples)")
        if not self._uses_f0 and f0_test is not None:
            raise ValueError("f0_test given but fit had no f0: pass f0 to fit, or drop f0_test")
        with fp32_math(self.allow_tf32), torch.no_grad():
            scores = Kt @ coef
        if f0_test is not None:
            scores = scores + _check_offset(f0_test, tuple(scores.shape), "f0_test", scores)
        return scores

    def predict_labels(self, K_test: Array, f0_test: Optional[Array] = None) -> torch.Tensor:
        """Predicted class indices [n_test] (argmax of ``predict``); for integer-label fits."""
        self._check_fitted()
        if self.n_classes_ is None:
            raise ValueError("predict_labels needs a fit on integer labels; this one was fitted on real targets")
        return self.predict(K_test, f0_test).argmax(dim=1)

    def score(self, K_test: Array, Y_test: Array, f0_test: Optional[Array] = None) -> float:
        """Accuracy (fitted on labels) or R^2 averaged over outputs (fitted on targets)."""
        scores = self.predict(K_test, f0_test)
        targets = _check_targets(Y_test, scores.shape[0], "Y_test", "K_test", scores.dtype, scores.device,
                                 self.n_classes_, self.n_classes_ is not None)
        metrics = _metrics(scores[:, None, :], targets)
        return metrics["accuracy" if "accuracy" in metrics else "r2"][0]
