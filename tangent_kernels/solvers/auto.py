"""``solver="auto"``: which solver a kernel problem gets, from the measured table.

The table is docs/solvers.md's (bench/bench_solve.py). In short:

- model selection without validation data (several betas, no ``K_val``): ``eigh``, the
  only solver with exact leave-one-out scores;
- otherwise ``krylov``: one fp32 Cholesky factor serves every beta (measured at n = 8192
  on CPU, 10 betas x 10 classes to 1e-3, decay-1.3 spectrum: 1.2x the time of one plain
  fp32 Cholesky solve of one beta; Nystrom-preconditioned ``cg`` 3.65x, per-beta
  ``cholesky`` 9.8x). On the spectrum of a real eNTK at betas where float32 fails (decay
  1.9, cond 4.7e6) krylov needs its float64 retry and took 7.7x, Nystrom ``cg`` 5.2x
  (neither reached 1e-3 in float32 coefficients): not enough to switch the rule, which
  would need a prediction of that regime before solving;
- ``cholesky`` for more than 64 target columns (krylov's basis and projected systems grow
  with them);
- ``cg`` with a Nystrom sketch when a second n x n matrix (the factor) does not fit
  beside K in the memory of K's device: it needs only n x rank.

The choice is returned with its reason, which ``solve(..., return_info=True)`` reports
as ``info["solver"]`` / ``info["solver_reason"]`` and ``KernelRidge`` as ``solver_``.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from ._common import _free_bytes

# The factor and its working copies must fit in this share of the free memory.
_FACTOR_MEMORY_SHARE = 0.8
# Above this many target columns krylov's projected systems ((steps x m)^3 / 3 per beta and
# step) outgrow a factorization per beta (at m = 100, 15 steps, 10 betas: ~20% of one
# n = 8192 Cholesky; at m = 300 more than one).
_KRYLOV_MAX_OUTPUTS = 64
# Nystrom rank of the fallback: ~ the spectrum's knee on eNTKs (docs/solvers.md), capped by n.
_FALLBACK_RANK = 2000


def choose(n: int, n_betas: int, device: torch.device, dtype: torch.dtype,
           needs_loo: bool, n_outputs: int = 1) -> Tuple[str, Dict[str, int], str]:
    """-> (solver, extra options for it, a one-line reason)."""
    if needs_loo:
        return "eigh", {}, "several betas and no validation data: eigh's exact leave-one-out scores choose beta"
    factor_bytes = n * n * 4  # one float32 factor; K itself is already resident
    if factor_bytes > _FACTOR_MEMORY_SHARE * _free_bytes(device):
        rank = min(_FALLBACK_RANK, max(1, n // 4))
        return "cg", {"precond_rank": rank}, (
            f"a float32 factor of K ({factor_bytes / 2**30:.1f} GiB) does not fit in the free memory of {device}: "
            f"cg with a rank-{rank} Nystrom preconditioner"
        )
    if n_outputs > _KRYLOV_MAX_OUTPUTS:
        return "cholesky", {}, (
            f"{n_outputs} target columns: krylov's basis grows by that many columns per step and its "
            "per-beta projected systems with it; one Cholesky factor per beta does not grow with them"
        )
    return "krylov", {}, (
        f"one float32 Cholesky factor shared by all {n_betas} beta(s) through one Krylov space "
        "(the fastest solver measured, docs/solvers.md)"
    )
