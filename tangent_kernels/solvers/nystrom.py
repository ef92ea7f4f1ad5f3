"""A randomized Nystrom approximation of K, shared by every beta as a preconditioner."""

from __future__ import annotations

import math

import torch

from ._common import _orthonormal


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

    def apply_sqrt(self, R: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """P^{-1/2} R (the symmetric square root; same eigenvectors) for R [n, a, c]."""
        n, a, c = R.shape
        roots = (1 + scales).clamp_min(0).sqrt() - 1
        W = (self.U.T @ R.reshape(n, a * c)).view(-1, a, c) * roots[:, :, None]
        return R + (self.U @ W.view(-1, a * c)).view(n, a, c)

    def lambda_max(self, K: torch.Tensor, betas: torch.Tensor, scales: torch.Tensor, iters: int,
                   gen: torch.Generator) -> torch.Tensor:
        """Per beta, the largest eigenvalue of P^{-1} (K + beta I) -> [a], by power iteration
        on the symmetric P^{-1/2} (K + beta I) P^{-1/2} with 2 vectors per beta (a Ritz
        value: a lower bound, which the caller pads). The sketch alone would only bound it
        by lam_r + beta if U were exact eigenvectors; a random sketch is not."""
        n, a = K.shape[0], betas.numel()
        # The same start for every beta: a beta's estimate does not depend on its batch.
        V = torch.randn(n, 1, 2, generator=gen, device=K.device, dtype=K.dtype).expand(n, a, 2)

        def op(V: torch.Tensor) -> torch.Tensor:
            Z = self.apply_sqrt(V, scales)
            Z = (K @ Z.reshape(n, -1)).view(n, a, 2) + betas.view(1, a, 1) * Z
            return self.apply_sqrt(Z, scales)

        est = torch.zeros(a, dtype=K.dtype, device=K.device)
        for _ in range(iters):
            V = V / V.norm(dim=0, keepdim=True).clamp_min(torch.finfo(K.dtype).tiny)
            SV = op(V)
            est = (V * SV).sum(dim=0).max(dim=1).values  # Rayleigh quotients of unit vectors
            V = SV
        return est
