"""Multi-output kernels: ``tk.gram(..., output="full")``'s [n1, n2, k, k] as a matrix.

Kernel ridge regression with the full k x k eNTK is one linear system over (sample,
output) pairs: row i k + a, column j k + b holds K[i, j, a, b] = <d f_a(x_i), d f_b(x_j)>,
and the targets [n, k] stack into one column. The estimator solves that system with any
solver and keeps its coefficients as [n, k] (alpha[j, b]), so that
scores[t, a] = sum_{j, b} K_test[t, j, a, b] alpha[j, b].
"""

from __future__ import annotations

from typing import Any, Tuple

import torch

from ._checks import as_tensor


def ndim(K: Any) -> int:
    return len(K.shape) if hasattr(K, "shape") else 0


def flatten_kernel(K: Any, name: str, k: int = 0) -> Tuple[torch.Tensor, int]:
    """[n1, n2, k, k] -> ([n1 k, n2 k], k); ``k`` (when given) must match."""
    K = as_tensor(K, name)
    if K.ndim != 4 or K.shape[2] != K.shape[3] or (k and K.shape[2] != k):
        want = f"[n1, n2, {k}, {k}]" if k else "[n1, n2, k, k]"
        raise ValueError(
            f"{name} must be a multi-output kernel {want} (tk.gram(..., output='full')); got {tuple(K.shape)}"
        )
    n1, n2, k = K.shape[0], K.shape[1], K.shape[2]
    return K.permute(0, 2, 1, 3).reshape(n1 * k, n2 * k), k


def unflatten_scores(P: torch.Tensor, k: int) -> torch.Tensor:
    """Scores of the flat system [n k, a, 1] -> [n, a, k]."""
    N, a, _ = P.shape
    return P.view(N // k, k, a).permute(0, 2, 1)
