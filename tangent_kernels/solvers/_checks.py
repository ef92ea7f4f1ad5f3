"""Input checks of kernel problems: kernels, targets, offsets, cross kernels, betas,
options; PSD and beta-range checks; beta scaling and the result dtype."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

import numpy as np
import torch

from ._common import _generator, _lambda_max, _working_dtype


SOLVERS = ("auto", "krylov", "cg", "cholesky", "eigh", "nesterov")

# Default tolerance for the symmetry check, ||K - K.T||_F / ||K||_F. It catches a wrong matrix
# (a cross kernel, a transposed block), not rounding: G @ G.T in fp32 from BLAS is
# symmetric only to ~sqrt(p) * eps relative, and fp32 kernels cast to fp64 keep that.
_SYM_TOL = 1e-4


Array = Union[torch.Tensor, np.ndarray]


# ----------------------------------------------------------------------------- input checks


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """x (a torch.Tensor or a numpy array) as a tensor sharing its memory where it can; no
    dtype or device change. The one conversion of array arguments for the solvers, the
    analysis and the look-ahead."""
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


def check_kernel(K: Any, sym_tol: Optional[float], device: Optional[torch.device] = None) -> torch.Tensor:
    """K -> [n, n] tensor in the working dtype on ``device``; raises on a bad kernel."""
    K = as_tensor(K, "K")
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


def label_count(Y: Any, name: str) -> Optional[int]:
    """max label + 1 when Y holds integer labels, else None (no conversion, no checks)."""
    if isinstance(Y, (torch.Tensor, np.ndarray)):
        t = as_tensor(Y, name)
        if not t.is_floating_point() and t.dtype != torch.bool and not t.is_complex() and t.numel():
            return int(t.max()) + 1
    return None


def check_targets(
    Y: Any, n: int, name: str, n_rows_name: str, dtype: torch.dtype, device: torch.device,
    n_classes: Optional[int], want_labels: Optional[bool] = None,
) -> _Targets:
    """Y: int labels [n] -> one-hot [n, n_classes]; float [n] or [n, m] -> [n, m] targets."""
    Y = as_tensor(Y, name)
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
    f0 = as_tensor(f0, name)
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
    Kx = as_tensor(Kx, name)
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
        values = as_tensor(betas, name).reshape(-1).tolist()
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


def default_tol(tol: Optional[float], out_dtype: torch.dtype) -> float:
    """``tol=None``: 1e-6 for float64 coefficients, 1e-3 for float32 ones, which cannot
    hold much less (rounding alpha costs up to ~ 6e-8 cond(K + beta I): 1e-5 .. 3e-4
    measured on eNTK-like spectra at n = 4096 .. 8192, 1.5e-4 at cond 5e3)."""
    if tol is not None:
        return float(tol)
    return 1e-6 if out_dtype == torch.float64 else 1e-3


def _check_options(solver: str, max_iter: int, tol: Optional[float], eval_every: int, precond_rank: Optional[int],
                   precond: Optional[str] = "cholesky", warm_start: bool = False) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(map(repr, SOLVERS))}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer; got {max_iter!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float, np.integer, np.floating))
                            or not (0 <= tol < math.inf)):
        raise ValueError(f"tol must be a finite number >= 0 (relative residual); got {tol!r}")
    if isinstance(eval_every, bool) or not isinstance(eval_every, (int, np.integer)) or eval_every < 1:
        raise ValueError(f"eval_every must be a positive integer; got {eval_every!r}")
    if precond_rank is not None:
        if solver not in ("cg", "nesterov", "auto"):
            raise ValueError(f"precond_rank applies to solver='cg' and 'nesterov' only; got solver={solver!r}")
        if isinstance(precond_rank, bool) or not isinstance(precond_rank, (int, np.integer)) or precond_rank < 0:
            raise ValueError(f"precond_rank must be a non-negative integer or None; got {precond_rank!r}")
    if precond not in ("cholesky", None):
        raise ValueError(f"precond must be 'cholesky' or None (krylov's preconditioner); got {precond!r}")
    if not isinstance(warm_start, bool):
        raise TypeError(f"warm_start must be True or False; got {warm_start!r}")
    if warm_start and solver != "cg":
        raise ValueError(f"warm_start applies to solver='cg' only (the beta path); got solver={solver!r}")


# ----------------------------------------------------------------------------- dispatch


# An eigenvalue below -this * lambda_max is not rounding: K is not a Gram matrix (PSD).
# fp32 K of n = 50,000 carries eigenvalue errors of ~n * 6e-8 * lambda_max = 3e-3 at worst.
_NEGATIVE_EIGENVALUE = 1e-2


def _rounding_allowance(largest: float, n: int, dtype: torch.dtype) -> float:
    """How far below zero an eigenvalue of a PSD K of ``n`` rows stored in ``dtype`` may
    come out: rounding K's entries moves its eigenvalues by up to ~ n eps lambda_max, and
    never less than ``_NEGATIVE_EIGENVALUE`` lambda_max is allowed (a float32 K cast to
    float64 keeps float32's rounding)."""
    return max(_NEGATIVE_EIGENVALUE, n * float(torch.finfo(dtype).eps)) * max(largest, 0.0)


def _indefinite(smallest: float, largest: float, n: int, dtype: torch.dtype) -> bool:
    """K's extreme eigenvalues (estimates from K itself) say K is not PSD beyond rounding."""
    return largest < 0 or smallest < -_rounding_allowance(largest, n, dtype)


def _not_psd(smallest: float, largest: float) -> ValueError:
    return ValueError(
        f"K is not positive semi-definite: its smallest eigenvalue is about {smallest:.3g} (largest "
        f"{largest:.3g}); an eNTK Gram is PSD, so K is not one (a cross kernel K(X1, X2) passed as K, a K "
        "edited or assembled from different runs?). Pass the Gram K(X, X) of one computation, or project "
        "it onto the PSD cone yourself (e.g. clamp its eigenvalues at 0) if that is what you mean"
    )


def _extreme_eigenvalues(K: torch.Tensor, seed: int) -> Tuple[float, float]:
    """(smallest, largest) eigenvalue estimates of K by subspace iteration (K and
    lambda_max I - K), which a clearly indefinite K fails at once."""
    gen = _generator(K.device, seed)
    largest = _lambda_max(K, 20, gen)
    if largest <= 0:  # K = 0, or no positive eigenvalue: a diagonal entry bounds the smallest
        return min(float(K.diagonal().min()), 0.0), largest
    shifted = largest * torch.eye(K.shape[0], dtype=K.dtype, device=K.device) - K
    return largest - _lambda_max(shifted, 20, gen), largest


def _check_psd_estimate(K: torch.Tensor, seed: int) -> None:
    """For the iterative solvers: refuse a K whose own spectrum estimate is indefinite."""
    smallest, largest = _extreme_eigenvalues(K, seed)
    if _indefinite(smallest, largest, K.shape[0], K.dtype):
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
