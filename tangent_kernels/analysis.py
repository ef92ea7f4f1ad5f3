"""Reading a Gram matrix: its spectrum and how well it aligns with the targets.

    spec = tk.analysis.spectrum(K)          # eigenvalues (descending) and effective dimension
    a = tk.analysis.alignment(K, y)         # kernel-target alignment in [-1, 1] ([0, 1] for PSD K)

Both accept the tensors or NumPy arrays that ``tk.gram`` and ``KernelRidge`` take and
check them the same way (square, symmetric up to rounding, finite), in every output form
of ``tk.gram`` (docs/outputs.md):

- [n, n]: one scalar output, or ``output="trace"`` (an ordinary kernel);
- [n, n, k, k] (``output="full"``): the kn x kn matrix over (sample, logit) pairs, row
  i k + a (as ``KernelRidge`` solves it);
- [n, n, k] (``output="diagonal"``): the kn x kn block-diagonal matrix with blocks
  K[..., a] (the full kernel without its cross-logit blocks), never formed: its
  eigenvalues are the k per-logit kernels' together.

For a k-logit kernel the targets have k columns (labels 0 .. k-1 taken one-hot, or
real targets [n, k]), stacked into one column over the (sample, logit) pairs, and
``centered`` centers over the samples within each logit (H K_ab H, H Y).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .solvers import multi_output as _outputs
from .solvers._checks import as_tensor, check_kernel, check_targets, label_count

__all__ = ["Spectrum", "spectrum", "alignment", "degrees_of_freedom"]


@dataclass(frozen=True)
class Spectrum:
    """Eigen-summary of a symmetric PSD kernel matrix K [n, n].

    eigenvalues: all n eigenvalues, descending, float64 (rounding may leave tiny
        negative ones at the end of a PSD K's spectrum: they are kept, not clipped).
    effective_dimension: the participation ratio (sum lambda)^2 / sum lambda^2 =
        trace(K)^2 / ||K||_F^2: 1 for a rank-one K, n for a multiple of the identity.
    trace: sum of the eigenvalues.
    """

    eigenvalues: torch.Tensor
    effective_dimension: float
    trace: float

    def explained(self, k: int) -> float:
        """Fraction of the trace in the top ``k`` eigenvalues."""
        if not 0 <= k <= len(self.eigenvalues):
            raise ValueError(f"k must be in [0, {len(self.eigenvalues)}]; got {k}")
        return float(self.eigenvalues[:k].sum()) / self.trace if self.trace else float("nan")


def spectrum(K: Any, *, sym_tol: Optional[float] = None) -> Spectrum:
    """Eigenvalues (fp64, descending) and effective dimension of the Gram matrix ``K``.

    Args:
        K: [n, n] symmetric Gram matrix (tensor or NumPy array), e.g. from ``tk.gram``;
            or [n, n, k, k] / [n, n, k] (every logit: kn eigenvalues, see the module's
            docstring).
        sym_tol: bound on ||K - K.T||_F / ||K||_F (default 1e-4; ``math.inf`` skips).
    """
    blocks = _blocks(K, sym_tol)
    eigenvalues = torch.cat([torch.linalg.eigvalsh((B + B.T) / 2) for B in blocks]).sort(descending=True).values
    trace = float(eigenvalues.sum())
    squares = float((eigenvalues**2).sum())
    effective = trace**2 / squares if squares > 0 else 0.0
    return Spectrum(eigenvalues, effective, trace)


def degrees_of_freedom(K: Any, beta: float, *, sym_tol: Optional[float] = None) -> float:
    """Effective degrees of freedom of kernel ridge regression: trace(K (K + beta I)^-1)
    = sum lambda / (lambda + beta), between 0 (beta -> inf) and rank(K) (beta -> 0).
    ``beta`` is absolute, as in ``KernelRidge`` without ``beta_scale``."""
    beta = float(beta)
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (at 0 the degrees of freedom are rank(K)); got {beta!r}")
    eigenvalues = spectrum(K, sym_tol=sym_tol).eigenvalues.clamp_min(0)
    return float((eigenvalues / (eigenvalues + beta)).sum())


def alignment(K: Any, Y: Any, *, centered: bool = False, sym_tol: Optional[float] = None) -> float:
    """Kernel-target alignment <K, Y Y^T>_F / (||K||_F ||Y Y^T||_F) (Cristianini et al., 2002).

    Args:
        K: [n, n] symmetric Gram matrix; or [n, n, k, k] / [n, n, k] (every logit, with
            targets of k columns: see the module's docstring).
        Y: integer class labels [n] (taken one-hot) or real targets [n] / [n, m].
        centered: center K and Y Y^T first (H K H with H = I - 11^T/n; Cortes et al., 2012),
            which discounts the constant component that makes every PSD kernel look
            aligned with one-hot targets.
    Returns:
        A number in [-1, 1]; in [0, 1] for PSD K and uncentered targets.
    """
    if _outputs.ndim(K) in (3, 4):
        return _every_logit_alignment(K, Y, centered, sym_tol)
    K = check_kernel(K, sym_tol).double()
    n = K.shape[0]
    targets = check_targets(Y, n, "Y", "K", torch.float64, K.device, label_count(Y, "Y")).values
    if centered:
        K = K - K.mean(dim=0, keepdim=True)
        K = K - K.mean(dim=1, keepdim=True)
        targets = targets - targets.mean(dim=0, keepdim=True)  # H Y Y^T H = (H Y)(H Y)^T
    # <K, Y Y^T>_F = sum(Y * K Y) and ||Y Y^T||_F = ||Y^T Y||_F: no n x n target matrix.
    inner = float((targets * (K @ targets)).sum())
    k_norm, y_norm = float(K.norm()), float((targets.T @ targets).norm())
    if k_norm == 0 or y_norm == 0:
        which = "K" if k_norm == 0 else "the (centered) targets"
        raise ValueError(f"alignment is undefined: {which} is zero (after centering, constant targets are zero)")
    return inner / (k_norm * y_norm)


def _blocks(K: Any, sym_tol: Optional[float]):
    """The symmetric float64 matrices whose eigenvalues are K's (module docstring): [K]
    for [n, n], the kn x kn matrix for [n, n, k, k], the k blocks K[..., a] for [n, n, k]."""
    if _outputs.ndim(K) == 4:
        K = _outputs.flatten_kernel(_square(K), "K")[0]
    elif _outputs.ndim(K) == 3:
        K = _square(K)
        return [check_kernel(K[..., a], sym_tol).double() for a in range(K.shape[2])]
    return [check_kernel(K, sym_tol).double()]


def _square(K: Any) -> torch.Tensor:
    K = as_tensor(K, "K")
    if K.shape[0] != K.shape[1]:
        form = "[n, n, k, k] (output='full')" if K.ndim == 4 else "[n, n, k] (output='diagonal')"
        raise ValueError(f"K must be a training Gram {form} with n1 = n2; got shape {tuple(K.shape)}. A cross "
                         "kernel K(X_other, X_train) has no spectrum or alignment of its own")
    return K


def _every_logit_alignment(K: Any, Y: Any, centered: bool, sym_tol: Optional[float]) -> float:
    """alignment() of a k-logit kernel: <K, y y^T>_F / (||K||_F ||y||^2) over the kn x kn
    matrix, y the targets [n, k] stacked (row i k + a)."""
    blocks = _blocks(K, sym_tol)  # the checks; the values are read from K below
    K = _square(K).double().to(blocks[0].device)
    n, k = K.shape[0], K.shape[2]
    targets = check_targets(Y, n, "Y", "K", torch.float64, K.device, label_count(Y, "Y")).values
    if targets.shape[1] != k:
        raise ValueError(f"K is a {k}-logit kernel {list(K.shape)}, so Y needs {k} target columns (or labels "
                         f"0 .. {k - 1}: one-hot targets); got {targets.shape[1]}")
    if centered:  # over the samples, within each pair of logits: (H x I_k) K (H x I_k)
        K = K - K.mean(dim=0, keepdim=True)
        K = K - K.mean(dim=1, keepdim=True)
        targets = targets - targets.mean(dim=0, keepdim=True)
    # K y over (sample, logit) pairs: [n, k]
    product = torch.einsum("ijab,jb->ia", K, targets) if K.ndim == 4 else torch.einsum("ija,ja->ia", K, targets)
    inner = float((targets * product).sum())
    k_norm, y_norm = float(K.norm()), float((targets * targets).sum())
    if k_norm == 0 or y_norm == 0:
        which = "K" if k_norm == 0 else "the (centered) targets"
        raise ValueError(f"alignment is undefined: {which} is zero (after centering, constant targets are zero)")
    return inner / (k_norm * y_norm)
