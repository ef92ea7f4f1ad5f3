"""A lower Cholesky factor that grows by block rows (within this subpackage only).

    C = [[D_0,  0,   0 ],        block i: rows [s_i, s_i + M_i), stored as
         [B_1, D_1,  0 ],        B_i [M_i, s_i] (against every earlier row) and
         [  B_2,    D_2]]        D_i [M_i, M_i] (lower, its own Cholesky factor)

Appending a block stores two new tensors and copies nothing. Each one contiguous, so
LAPACK reads them in place: a factor kept in a preallocated buffer's corner (leading
dimension > N) was copied by torch before every triangular solve (measured: 1.5x the
solve at N = 2000), and copying it into fresh memory on every append cost more than the
append's own triangular solve. Solves are block substitutions (a GEMM and a small
triangular solve per block); past ``MAX_BLOCKS`` blocks they are merged into one
(a copy of N^2, once every few appends).
"""

from __future__ import annotations

from typing import List, Tuple

import torch

MAX_BLOCKS = 8


class BlockFactor:
    def __init__(self, D: torch.Tensor):
        self.blocks: List[Tuple[int, torch.Tensor, torch.Tensor]] = [(0, D[:, :0], D)]
        self.n = D.shape[0]

    def append(self, B: torch.Tensor, D: torch.Tensor) -> None:
        """Rows [n, n + M): B [M, n] against the current rows, D [M, M] lower."""
        self.blocks.append((self.n, B.contiguous(), D.contiguous()))
        self.n += D.shape[0]
        if len(self.blocks) > MAX_BLOCKS:
            self.blocks = self._merged()

    def _merged(self) -> List[Tuple[int, torch.Tensor, torch.Tensor]]:
        C = self.dense()
        return [(0, C[:, :0], C)]

    def dense(self) -> torch.Tensor:
        first = self.blocks[0][2]
        C = torch.zeros(self.n, self.n, dtype=first.dtype, device=first.device)
        for s, B, D in self.blocks:
            M = D.shape[0]
            C[s:s + M, :s] = B
            C[s:s + M, s:s + M] = D
        return C

    def solve(self, R: torch.Tensor) -> torch.Tensor:
        """C^{-1} R for R [n, cols]."""
        if len(self.blocks) == 1:
            return torch.linalg.solve_triangular(self.blocks[0][2], R, upper=False)
        X = torch.empty(R.shape, dtype=R.dtype, device=R.device)
        for s, B, D in self.blocks:
            M = D.shape[0]
            rhs = R[s:s + M] - B @ X[:s] if s else R[s:s + M]
            X[s:s + M] = torch.linalg.solve_triangular(D, rhs, upper=False)
        return X

    def solve_transposed(self, Z: torch.Tensor) -> torch.Tensor:
        """C^{-T} Z for Z [n, cols] (back substitution, last block first)."""
        if len(self.blocks) == 1:
            return torch.linalg.solve_triangular(self.blocks[0][2].T, Z, upper=True)
        X = torch.empty(Z.shape, dtype=Z.dtype, device=Z.device)
        acc = torch.zeros(Z.shape, dtype=Z.dtype, device=Z.device)  # sum over later blocks of B^T x
        for s, B, D in reversed(self.blocks):
            M = D.shape[0]
            x = torch.linalg.solve_triangular(D.T, Z[s:s + M] - acc[s:s + M], upper=True)
            X[s:s + M] = x
            if s:
                acc[:s] += B.T @ x
        return X
