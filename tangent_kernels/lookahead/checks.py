"""Input checks and conversions of the look-ahead problem (within this subpackage only).

Every tensor argument may be a torch.Tensor or a numpy array (a memory-mapped one
included): pool-sized arguments are sliced per chunk before they are converted, so a
float32 memmap of 50,000 candidates is never copied whole into float64.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..solvers._checks import as_tensor as tensor  # noqa: F401 - the one array conversion


def shape(x: Any, name: str) -> tuple:
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray; got {type(x).__name__}")
    return tuple(x.shape)


def working(x: Any, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """x converted to the working dtype and device, checked real and finite; never the
    caller's own storage (callers may modify it)."""
    t = tensor(x, name)
    if t.is_complex() or not t.is_floating_point():
        hint = (" (integer class labels: one-hot them, e.g. torch.nn.functional.one_hot(y, k).double())"
                if not t.is_complex() and t.dtype != torch.bool else "")
        raise TypeError(f"{name} must be a real floating-point tensor; got dtype {t.dtype}{hint}")
    out = t.to(device=device, dtype=dtype)
    if out.data_ptr() == t.data_ptr() and t.numel():
        out = out.clone()
    lo, hi = torch.aminmax(out) if out.numel() else (torch.zeros(()), torch.zeros(()))
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        bad = tuple(int(i) for i in (~torch.isfinite(out)).nonzero()[0].tolist())
        raise ValueError(
            f"{name} has non-finite values (NaN or inf), the first at index {bad}; fix or drop those points"
        )
    return out


def expect(name: str, got: Sequence[int], want: Sequence[Optional[int]], meaning: str) -> None:
    """Raise naming the argument when ``got`` does not match ``want`` (None: any size)."""
    ok = len(got) == len(want) and all(w is None or g == w for g, w in zip(got, want))
    if not ok:
        wanted = "[" + ", ".join("*" if w is None else str(w) for w in want) + "]"
        raise ValueError(f"{name} must have shape {wanted} ({meaning}); got {list(got)}")


def beta_value(beta: Any) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.integer, np.floating)):
        raise TypeError(f"beta must be a number (the ridge in (K_LL + beta I) alpha = y_L - f0); got {beta!r}")
    beta = float(beta)
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be finite and >= 0 (the ridge in (K_LL + beta I) alpha = y_L - f0); got {beta!r}")
    return beta


def check_symmetric(K: torch.Tensor, name: str, tol: float = 1e-6) -> None:
    """Catches a cross kernel or a transposed block passed where a Gram belongs, not
    rounding. ||K - K^T||_F is estimated with 8 fixed random probes (K V against V^T K:
    two thin GEMMs, no transposed copy of K); the estimate is zero only for a symmetric K."""
    g = torch.Generator(device=K.device).manual_seed(0)
    V = torch.randn(K.shape[0], 8, generator=g, device=K.device, dtype=K.dtype)
    KV = K @ V
    asym, scale = float((KV - (V.T @ K).T).norm()), float(KV.norm())
    if asym > tol * max(scale, 1e-300):
        raise ValueError(
            f"{name} is not symmetric: ||K - K.T||_F / ||K||_F ~ {asym / scale:.2g} (estimated) > {tol:g}. Pass "
            f"the Gram of the points with themselves; if the asymmetry is rounding, symmetrize with (K + K.T) / 2"
        )


def flat_kernel(K: torch.Tensor, full: bool) -> torch.Tensor:
    """[n1, n2] stays; [n1, n2, k, k] -> [n1 k, n2 k] with row i k + a, column j k + b
    holding K[i, j, a, b] (the ordering of tangent_kernels.solvers.multi_output)."""
    if not full:
        return K
    n1, n2, k, _ = K.shape
    return K.permute(0, 2, 1, 3).reshape(n1 * k, n2 * k)
