"""Kernel ridge regression on a row-sharded K: CG and Nesterov, one local GEMM and one
all_reduce per step.

Every rank holds its rows K[R_r, :] (a :class:`KShard`) and a full copy of the iterates
(n x columns: small next to K's n^2 / W). A step multiplies the local rows with the
search directions, writes the product into its rows of a zero [n + 1, c] buffer and
all_reduces it: every rank then has K @ P and runs the same O(n c) update. The buffer's
last row carries rank 0's stop decisions (which (beta, output) columns have converged),
so all ranks stop the same columns at the same step even if their floating-point
reductions differ in the last bit (different thread counts): a decision one rank took
alone would leave the others waiting in the next all_reduce. The price is one step's
delay: a column stopped at step k is frozen from step k + 1.

Solves (K + beta I) alpha = Y for every beta at once, beta absolute (scikit-learn's
``KernelRidge(alpha=beta, kernel="precomputed")``), as the single-process solvers do.
Not here (yet): preconditioning, validation-based early stopping and beta selection
(``tk.KernelRidge``'s), and classification targets (pass one-hot or +-1 columns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Union

import torch

from .exchange import Comm
from .shard import KShard

__all__ = ["KShardOperator", "ShardedSolution", "solve", "SOLVERS"]

SOLVERS = ("cg", "nesterov")
# Step 1 / (safety * lambda_max + beta): the block power estimate is a lower bound
# (the single-process Nesterov takes the same 5%).
_LAMBDA_SAFETY = 1.05


class KShardOperator:
    """K as a linear operator over its row shards: ``op @ V`` is K @ V on every rank
    (one local GEMM, one all_reduce). ``shape``, ``dtype``, ``device`` are K's."""

    def __init__(self, shard: KShard):
        if not isinstance(shard, KShard):
            raise TypeError(f"expected a KShard (tk.gram(..., gather='rows')), got {type(shard).__name__}")
        self.shard = shard
        # Rows in host memory on an NCCL group still travel through this rank's GPU.
        self.comm = Comm(shard.group, device=shard.rows.device if shard.rows.is_cuda else None)
        self.shape, self.dtype, self.device = tuple(shard.shape), shard.rows.dtype, shard.rows.device

    def matmul(self, V: torch.Tensor, control: torch.Tensor = None):
        """K @ V [n, c]; with ``control`` [c], also rank 0's control row (others' ignored)."""
        s = self.shard
        buffer = torch.zeros(self.shape[0] + (control is not None), V.shape[1], dtype=self.dtype,
                             device=self.comm.device)
        buffer[s.row_start:s.row_stop].copy_(s.rows @ V)
        if control is not None and s.rank == 0:
            buffer[-1].copy_(control)
        with self.comm.phase("solve: K @ V"):
            self.comm.all_reduce_(buffer)
        buffer = buffer.to(self.device)
        return (buffer[:-1], buffer[-1]) if control is not None else buffer

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        vector = V.dim() == 1
        out = self.matmul(V[:, None] if vector else V)
        return out[:, 0] if vector else out

    def diagonal(self) -> torch.Tensor:
        """K's diagonal, on every rank."""
        d = torch.zeros(self.shape[0], dtype=self.dtype, device=self.comm.device)
        d[self.shard.row_start:self.shard.row_stop].copy_(self.shard.diagonal())
        return self.comm.all_reduce_(d).to(self.device)


@dataclass
class ShardedSolution:
    """coefs: [len(betas), n, m] dual coefficients (the same on every rank); per beta the
    steps taken, whether the relative residual ||(K + beta I) a - Y|| / ||Y|| reached tol,
    and that residual (rank 0's)."""

    coefs: torch.Tensor
    betas: List[float]
    n_iter: List[int]
    converged: List[bool]
    residual: List[float]
    solver: str


def solve(K: KShard, Y, betas: Union[float, Sequence[float]], *, solver: str = "cg", tol: float = 1e-6,
          max_iter: int = 1000, power_iters: int = 20, seed: int = 0) -> ShardedSolution:
    """Dual coefficients of kernel ridge regression on a row-sharded K(X, X), every beta at once.

    Call on every rank of K's group with the same full targets ``Y`` [n] or [n, m]
    (float; the whole vector on every rank). ``solver``: "cg" (conjugate gradients,
    per (beta, output) column) or "nesterov" (accelerated gradient with restarts, step
    from a block power estimate of lambda_max: ``power_iters`` more all_reduces).
    """
    op = KShardOperator(K)
    if not K.symmetric:
        raise ValueError("kernel ridge regression needs the symmetric K(X, X); this shard is of a cross kernel")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)} for a row-sharded K; got {solver!r}")
    T = torch.as_tensor(Y).to(device=op.device, dtype=op.dtype)
    if T.dim() == 1:
        T = T[:, None]
    if T.dim() != 2 or T.shape[0] != op.shape[0]:
        raise ValueError(f"Y must be [n] or [n, m] with n = {op.shape[0]} (K's rows); "
                         f"got {list(torch.as_tensor(Y).shape)}")
    betas = [float(b) for b in ([betas] if isinstance(betas, (int, float)) else betas)]
    if not betas or not all(math.isfinite(b) and b > 0 for b in betas):
        raise ValueError(f"betas must be positive, finite numbers; got {betas!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1) or not tol > 0:
        raise ValueError(f"max_iter must be an int >= 1 and tol > 0; got max_iter={max_iter!r}, tol={tol!r}")
    with torch.no_grad():
        run = _cg if solver == "cg" else _nesterov
        coefs, n_iter, residual = run(op, T, betas, tol, max_iter, power_iters, seed)
    # Rank 0's account of the run, so that every rank reports the same.
    n_iter, residual = op.comm.all_objects((n_iter, residual))[0]
    return ShardedSolution(coefs, betas, n_iter, [r <= tol for r in residual], residual, solver)


def _columns(betas: List[float], m: int, like: torch.Tensor) -> torch.Tensor:
    """Each (beta, output) column's beta, beta-major: column j * m + t."""
    return torch.tensor(betas, dtype=like.dtype, device=like.device).repeat_interleave(m)


def _per_beta(squares: torch.Tensor, m: int, tnorm: float) -> torch.Tensor:
    """Relative residual per beta from the squared norms of its m columns."""
    return squares.view(-1, m).sum(dim=1).sqrt() / tnorm


def _record_step(res: List[float], done: torch.Tensor, residual: List[float], n_iter: List[int], k: int,
                 tol: float, max_iter: int, m: int, like: torch.Tensor) -> torch.Tensor:
    """Per beta still running: its residual, and the step it first reached tol; -> the
    per-column "reached tol" flags [betas x m] that ride in the next all_reduce."""
    for j, r in enumerate(res):
        if not bool(done[j * m]):
            residual[j] = r
            if r <= tol and n_iter[j] == max_iter:
                n_iter[j] = k
    return torch.tensor(res, dtype=like.dtype, device=like.device).le(tol).to(like.dtype).repeat_interleave(m)


def _cg(op: KShardOperator, T, betas, tol, max_iter, power_iters, seed):
    n, m = T.shape
    B, tnorm = len(betas), float(T.norm())
    bc = _columns(betas, m, T)
    X = T.new_zeros(n, B * m)
    R = T.repeat(1, B)
    P = R.clone()
    rz = (R * R).sum(dim=0)
    n_iter, residual = [max_iter] * B, [math.inf] * B
    flags = torch.zeros(B * m, dtype=T.dtype, device=T.device)
    if tnorm == 0:
        return X.T.reshape(B, m, n).transpose(1, 2), [0] * B, [0.0] * B
    for k in range(1, max_iter + 1):
        KP, control = op.matmul(P, flags)
        done = control > 0.5  # rank 0's decisions of the last step
        if bool(done.all()):
            break
        AP = KP + bc * P
        alpha = torch.where(done, torch.zeros_like(rz), rz / (P * AP).sum(dim=0))
        X += alpha * P
        R -= alpha * AP
        rz_next = (R * R).sum(dim=0)
        P = torch.where(done, P, R + (rz_next / rz) * P)
        rz = torch.where(done, rz, rz_next)
        res = _per_beta(rz, m, tnorm).tolist()
        flags = _record_step(res, done, residual, n_iter, k, tol, max_iter, m, T)
    return X.T.reshape(B, m, n).transpose(1, 2).contiguous(), n_iter, residual


def _lambda_max(op: KShardOperator, n: int, iters: int, seed: int, like: torch.Tensor) -> float:
    """Largest eigenvalue of K (a block power iteration; a lower bound)."""
    generator = torch.Generator().manual_seed(seed)  # the same start on every rank
    V = torch.randn(n, min(4, n), generator=generator, dtype=torch.float64).to(like.device, like.dtype)
    for _ in range(iters):
        V, _ = torch.linalg.qr(op @ V)
    ritz = torch.linalg.eigvalsh((V.T @ (op @ V)).double())
    return float(ritz.max())


def _nesterov(op: KShardOperator, T, betas, tol, max_iter, power_iters, seed):
    n, m = T.shape
    B, tnorm = len(betas), float(T.norm())
    bc = _columns(betas, m, T)
    out = T.new_zeros(n, B * m)
    if tnorm == 0:
        return out.T.reshape(B, m, n).transpose(1, 2), [0] * B, [0.0] * B
    L = (_LAMBDA_SAFETY * _lambda_max(op, n, power_iters, seed, T) + bc).clamp_min(torch.finfo(T.dtype).tiny)
    eta, q = 1 / L, (bc / L).clamp_max(1)
    Tc = T.repeat(1, B)
    X, Y, theta = T.new_zeros(n, B * m), T.new_zeros(n, B * m), T.new_ones(B * m)
    n_iter, residual = [max_iter] * B, [math.inf] * B
    flags = torch.zeros(B * m, dtype=T.dtype, device=T.device)
    checked, frozen = Y, torch.zeros(B * m, dtype=torch.bool, device=T.device)
    for k in range(1, max_iter + 1):
        KY, control = op.matmul(Y, flags)
        done = control > 0.5
        newly = done & ~frozen
        out = torch.where(newly, checked, out)  # the iterate whose residual rank 0 accepted
        frozen = done
        if bool(done.all()):
            break
        G = KY + bc * Y - Tc  # the gradient at Y is the residual (K + beta I) Y - T
        res = _per_beta((G * G).sum(dim=0), m, tnorm).tolist()
        flags = _record_step(res, done, residual, n_iter, k, tol, max_iter, m, T)
        checked = Y
        Xn = Y - eta * G
        D = Xn - X
        restart = (G * D).sum(dim=0) > 0
        th2 = theta * theta
        c = th2 - q
        theta_next = 0.5 * (torch.sqrt(c * c + 4 * th2) - c)
        momentum = torch.where(restart, torch.zeros_like(theta), theta * (1 - theta) / (th2 + theta_next))
        theta = torch.where(restart, torch.ones_like(theta_next), theta_next)
        Y, X = Xn + momentum * D, Xn
    out = torch.where(frozen, out, checked)  # betas still running at max_iter: the last checked iterate
    return out.T.reshape(B, m, n).transpose(1, 2).contiguous(), n_iter, residual
