"""``LookAhead``: kernel ridge regression on a labelled set, factorized once, that answers
"what would it predict at E if (x, y) were added to the labelled set" for every candidate
x of a pool and every label y it might have.

The linearized network trained on L predicts f0(z) + K(z, L) (K_LL + beta I)^{-1} (y_L - f0(L))
(Mohamadi, Bae, Sutherland, NeurIPS 2022, eq. 11). Adding (x_c, y) to L changes that by a
rank-b term (b = 1 for a scalar kernel, k for the full eNTK): with the Cholesky factor
C C^T = K_LL + beta I, v_c = C^{-1} K(L, x_c) and w_E = C^{-1} K(L, E),

    S_c     = K(x_c, x_c) + beta I - v_c^T v_c                 (the Schur complement, [b, b])
    f+(E)   = f(E) + (K(E, x_c) - w_E^T v_c) S_c^{-1} (y - f(x_c))

where f is the current kernel-model prediction. One triangular solve serves every
candidate of a chunk (v for all of them at once), one GEMM gives w_E^T v for all of E,
and the [b, b] Schur complements are factorized as one batch.

Kernel forms (every argument follows the form of K_LL):
- scalar: K_LL [m, m] with targets [m] (one output), or [m, k] (the pNTK: a scalar
  kernel times I_k; the k outputs share every solve, so nothing costs k^2);
- full eNTK: K_LL [m, m, k, k] with targets [m, k]; the kernel is flattened to
  [m k, m k] (row i k + a, column j k + b) and a candidate is a block of k rows.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from . import checks as inp
from ._factor import BlockFactor

# Elements (of the working dtype) that one chunk's temporaries may hold when chunk=None:
# 2^24 float64 = 128 MiB, a few times the L2/L3-friendly GEMM blocks but far below RAM.
_CHUNK_ELEMENTS = 1 << 24


class LookAhead:
    """Kernel ridge regression on L, factorized once; see the module docstring.

    Args:
        K_LL: [m, m] scalar kernel or [m, m, k, k] full eNTK of the labelled points.
        y_L: targets, [m] or [m, k] (one-hot rows for classification; float).
        f0: the network's outputs at the labelled points (the linearization's offset),
            same shape as y_L; None means 0 (plain kernel ridge regression).
        beta: ridge, absolute: (K_LL + beta I). Also added to every candidate's own
            kernel value, so a candidate is regularized exactly like a labelled point.
        dtype: working precision (float64: the exactness targets hold there).

    Nothing passed in is modified or kept by reference.
    """

    def __init__(self, K_LL: Any, y_L: Any, *, f0: Any = None, beta: float = 0.0,
                 dtype: torch.dtype = torch.float64):
        self.beta = inp.beta_value(beta)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float64 (the default) or torch.float32; got {dtype!r}")
        shp = inp.shape(K_LL, "K_LL")
        if len(shp) == 2 and shp[0] == shp[1]:
            self.full, k = False, None
        elif len(shp) == 4 and shp[0] == shp[1] and shp[2] == shp[3]:
            self.full, k = True, shp[2]
        else:
            raise ValueError(
                f"K_LL must be a Gram [m, m] (scalar kernel) or [m, m, k, k] (full eNTK, tk.gram(..., "
                f"output='full')); got {list(shp)}"
            )
        m = shp[0]
        if m == 0:
            raise ValueError("K_LL is empty (m = 0): the labelled set needs at least one point")
        ys = inp.shape(y_L, "y_L")
        if self.full:
            inp.expect("y_L", ys, [m, k], f"one row of {k} targets per labelled point, like K_LL's k")
        elif len(ys) not in (1, 2) or ys[0] != m:
            raise ValueError(
                f"y_L must have shape [{m}] or [{m}, k] (one target row per labelled point); got {list(ys)}"
            )
        # b: rows per point in the flat system; q: output columns sharing every solve.
        self.k = k if self.full else (ys[1] if len(ys) == 2 else None)
        self._b = k if self.full else 1
        self._q = 1 if self.full or len(ys) == 1 else ys[1]
        self.dtype = dtype
        device = K_LL.device if isinstance(K_LL, torch.Tensor) else torch.device("cpu")
        K = inp.flat_kernel(inp.working(K_LL, "K_LL", dtype, device), self.full)  # our own copy: _factor writes it
        self.device, N = K.device, K.shape[0]
        inp.check_symmetric(K, "K_LL")
        self._C = BlockFactor(self._factor(K, "K_LL + beta I", "the labelled set", N, float(K.diagonal().abs().max())))
        del K
        r = self._residual(y_L, f0, m, "y_L", "f0")
        self._z = self._C.solve(r)  # C^{-1} (y_L - f0), [N, q]
        self._alpha: Optional[torch.Tensor] = None
        self.m = m

    # ------------------------------------------------------------------ internals

    def _tiny(self, rows: int) -> float:
        # Relative size under which a pivot (or a Schur complement) is rounding noise: forming
        # d - v^T v loses a few eps * d per term of v, ``rows`` terms at worst.
        return 64 * max(rows, 1) * torch.finfo(self.dtype).eps

    def _factor(self, K: torch.Tensor, what: str, points: str, rows: int, scale: float) -> torch.Tensor:
        """Cholesky factor of K + beta I (K is overwritten). ``rows``: of the whole system;
        ``scale``: the largest diagonal entry of the kernel block before any Schur reduction."""
        K.diagonal().add_(self.beta)
        C, info = torch.linalg.cholesky_ex(K)
        if int(info) == 0:
            # Cholesky of a singular matrix may still "succeed" on rounding-sized pivots.
            small = C.diagonal() ** 2 <= self._tiny(rows) * (scale + self.beta)
            if bool(small.any()):
                info = int(small.nonzero()[0]) + 1
        if int(info) != 0:
            raise ValueError(
                f"{what} is not positive definite (Cholesky stops at row {int(info) - 1} of {K.shape[0]}): "
                f"{points} has duplicated or linearly dependent points under this kernel. Pass beta > 0 "
                f"(e.g. 1e-6 times the largest diagonal entry, {scale:.3g}) or drop the duplicates"
            )
        return C

    def _flat_targets(self, y: Any, name: str, rows: int) -> torch.Tensor:
        t = inp.working(y, name, self.dtype, self.device)
        return t.reshape(rows * self._b, self._q)

    def _residual(self, y: Any, f0: Any, n: int, yname: str, fname: str) -> torch.Tensor:
        r = self._flat_targets(y, yname, n)
        if f0 is not None:
            inp.expect(fname, inp.shape(f0, fname), inp.shape(y, yname), f"the network's outputs, shaped like {yname}")
            r -= self._flat_targets(f0, fname, n)
        return r

    def _out_shape(self, fs: Any, n: int, name: str, meaning: str) -> torch.Tensor:
        """Offsets f0 at n points -> flat [n b, q] (zeros when None)."""
        want = [n] if self.k is None else [n, self.k]
        if fs is None:
            return torch.zeros(n * self._b, self._q, dtype=self.dtype, device=self.device)
        inp.expect(name, inp.shape(fs, name), want, meaning)
        return self._flat_targets(fs, name, n)

    def _cross(self, K: Any, name: str, n: int, meaning: str) -> torch.Tensor:
        """A cross kernel K(X, L) [n, m(, k, k)] -> flat [n b, N] in the working dtype."""
        want = [n, self.m] + ([self.k, self.k] if self.full else [])
        inp.expect(name, inp.shape(K, name), want, meaning)
        return inp.flat_kernel(inp.working(K, name, self.dtype, self.device), self.full)

    def _unflat(self, F: torch.Tensor, n: int) -> torch.Tensor:
        """Flat predictions [..., n b, q] -> [..., n] or [..., n, k]."""
        lead = F.shape[:-2]
        return F.reshape(*lead, n) if self.k is None else F.reshape(*lead, n, self.k)

    @property
    def n_rows(self) -> int:
        """Rows of the flat system: m, or m k for the full eNTK."""
        return self._C.n

    @property
    def alpha(self) -> torch.Tensor:
        """Dual coefficients (K_LL + beta I)^{-1} (y_L - f0), shaped like y_L."""
        if self._alpha is None:
            self._alpha = self._C.solve_transposed(self._z)
        return self._unflat(self._alpha, self.m)

    # ------------------------------------------------------------------ public

    def predict(self, K_EL: Any, f0_E: Any = None) -> torch.Tensor:
        """Predictions at E: f0_E + K(E, L) alpha. K_EL [e, m] or [e, m, k, k]; f0_E the
        network's outputs at E ([e] or [e, k]) or None. Returns [e] or [e, k]."""
        e = inp.shape(K_EL, "K_EL")[0] if len(inp.shape(K_EL, "K_EL")) else 0
        F = self._cross(K_EL, "K_EL", e, "the kernel between the evaluation points and the labelled set")
        self.alpha  # noqa: B018 (fills the cache)
        out = self._out_shape(f0_E, e, "f0_E", "the network's outputs at the evaluation points") + F @ self._alpha
        return self._unflat(out, e)

    def what_if(self, K_CL: Any, k_CC: Any, K_EL: Any, K_EC: Any, y_C: Any, *, f0_C: Any = None,
                f0_E: Any = None, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                chunk: Optional[int] = None) -> torch.Tensor:
        """Predictions at E after adding (x_c, y_C[c, r]) to L, for every candidate c and
        every one of its r labels; each exactly the kernel regression on L + {(x_c, y)}.

        Args:
            K_CL: [c, m] (or [c, m, k, k]) kernel between candidates and labelled points.
            k_CC: each candidate's kernel with itself: [c] (or [c, k, k]); the diagonal only.
            K_EL: [e, m] (or [e, m, k, k]) kernel between evaluation points and L.
            K_EC: [e, c] (or [e, c, k, k]) kernel between evaluation points and candidates.
            y_C: the labels to try, [c, r] (one output) or [c, r, k]; the same labels for
                every candidate cost nothing as an expanded view (``Y.expand(c, r, k)``).
            f0_C, f0_E: the network's outputs at candidates / evaluation points, or None.
            reduce: maps one chunk's predictions [n, r, e(, k)] to anything with leading
                dimension n (scores [n, r], typically); the results are concatenated, and
                the full [c, r, e(, k)] is never formed. The predictions it receives are
                a fresh tensor it may overwrite (e.g. subtract a reference in place).
            chunk: candidates per chunk; None sizes chunks to ~128 MiB of temporaries.

        Returns [c, r, e] (or [c, r, e, k]), or the concatenated ``reduce`` results.
        Raises ValueError naming the candidates whose augmented system is singular
        (a duplicate of a labelled point with beta = 0).
        """
        cs = inp.shape(K_CL, "K_CL")
        c = cs[0] if cs else 0
        es = inp.shape(K_EL, "K_EL")
        e = es[0] if es else 0
        b, q, N, full = self._b, self._q, self.n_rows, self.full
        inp.expect("k_CC", inp.shape(k_CC, "k_CC"), [c] + ([self.k, self.k] if full else []),
                   "each candidate's kernel with itself: the diagonal of K(C, C)")
        inp.expect("K_EC", inp.shape(K_EC, "K_EC"), [e, c] + ([self.k, self.k] if full else []),
                   "the kernel between evaluation points and candidates")
        ys = inp.shape(y_C, "y_C")
        want_y = [c, None] + ([] if self.k is None else [self.k])
        inp.expect("y_C", ys, want_y, "the labels to try: one row of r labels per candidate")
        r = ys[1]
        if f0_C is not None:
            inp.expect("f0_C", inp.shape(f0_C, "f0_C"), [c] + ([] if self.k is None else [self.k]),
                       "the network's outputs at the candidates")
        if chunk is None:
            per = N * b + 2 * e * b + 2 * r * e * b * q + b * b
            chunk = max(1, _CHUNK_ELEMENTS // per)
        elif isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive int (candidates per chunk) or None; got {chunk!r}")
        if reduce is not None and not callable(reduce):
            raise TypeError(f"reduce must be a callable mapping predictions [n, r, e, ...] to scores; got {reduce!r}")

        F_EL = self._cross(K_EL, "K_EL", e, "the kernel between the evaluation points and the labelled set")
        W = self._C.solve(F_EL.T)  # [N, e b]
        del F_EL
        fE = self._out_shape(f0_E, e, "f0_E", "the network's outputs at the evaluation points") + W.T @ self._z
        eye_b = torch.eye(b, dtype=self.dtype, device=self.device)
        tiny = self._tiny(N)
        out, parts = None, []
        for s in range(0, c, chunk):
            t = min(c, s + chunk)
            n = t - s
            F_CL = inp.flat_kernel(inp.working(K_CL[s:t], "K_CL", self.dtype, self.device), full)  # [n b, N]
            V = self._C.solve(F_CL.T)  # [N, n b]
            del F_CL
            fC = V.T @ self._z  # [n b, q]
            if f0_C is not None:
                fC += self._flat_targets(f0_C[s:t], "f0_C", n)
            d = inp.working(k_CC[s:t], "k_CC", self.dtype, self.device).reshape(n, b, b) + self.beta * eye_b
            Vb = V.T.reshape(n, b, N)
            S = d - Vb @ Vb.transpose(1, 2)  # [n, b, b]
            LS, info = torch.linalg.cholesky_ex(S)
            piv = LS.diagonal(dim1=1, dim2=2) ** 2
            bad = (info != 0) | (piv <= tiny * d.diagonal(dim1=1, dim2=2).amax(1, keepdim=True)).any(1)
            if bool(bad.any()):
                idx = (bad.nonzero().flatten() + s).tolist()
                raise ValueError(
                    f"adding candidate(s) {idx[:10]}{' ...' if len(idx) > 10 else ''} makes the kernel system "
                    "singular (the candidate is, under this kernel, a duplicate of or a combination of labelled "
                    "points): its look-ahead is undefined at beta = 0. Pass beta > 0, or drop those candidates "
                    "(e.g. points already in the labelled set)"
                )
            yc = inp.working(y_C[s:t], "y_C", self.dtype, self.device).reshape(n, r, b, q)
            res = yc - fC.reshape(n, 1, b, q)  # y - f(x_c): [n, r, b, q]
            coef = torch.cholesky_solve(res.permute(0, 2, 1, 3).reshape(n, b, r * q), LS)  # S^{-1} res: [n, b, r q]
            Q = inp.flat_kernel(inp.working(K_EC[:, s:t], "K_EC", self.dtype, self.device), full)  # [e b, n b]
            Q -= W.T @ V
            del V
            # pred[c, r, (e, a), q] = fE[(e, a), q] + sum_b' Q[(e, a), (c, b')] coef[c, b', r, q], written
            # once in its final layout: the predictions are the largest tensor here, and passes over
            # them (not the solves) dominate the time at |L| = 1000 (measured).
            if b == 1:
                pred = torch.addcmul(fE.view(1, 1, e, q), Q.T.view(n, 1, e, 1), coef.view(n, r, 1, q))
            else:
                QT = Q.reshape(e * b, n, b).permute(1, 2, 0)  # [n, b, e b]
                pred = torch.baddbmm(fE.view(1, 1, e * b).expand(n, r, e * b), coef.transpose(1, 2), QT).unsqueeze(-1)
            del Q
            pred = self._unflat(pred, e)
            if reduce is None:
                if out is None:
                    out = torch.empty((c,) + tuple(pred.shape[1:]), dtype=self.dtype, device=self.device)
                out[s:t] = pred
            else:
                got = reduce(pred)
                if not isinstance(got, torch.Tensor) or got.ndim == 0 or got.shape[0] != n:
                    raise ValueError(
                        f"reduce must return a tensor with leading dimension {n} (one row per candidate of the "
                        f"chunk); got {type(got).__name__} {tuple(getattr(got, 'shape', ()))}"
                    )
                parts.append(got)
        if reduce is not None:
            return torch.cat(parts) if parts else torch.empty(0, dtype=self.dtype, device=self.device)
        if out is None:
            return torch.empty((0, r, e) + (() if self.k is None else (self.k,)), dtype=self.dtype, device=self.device)
        return out

    def add(self, K_AL: Any, K_AA: Any, y_A: Any, f0_A: Any = None) -> "LookAhead":
        """Append labelled points A with a block Cholesky update (no refactorization):
        K_AL [a, m] (or [a, m, k, k]) against the current labelled set, K_AA [a, a] (or
        [a, a, k, k]), targets y_A and network outputs f0_A shaped like y_L's rows.
        Returns self; afterwards every method works on L + A."""
        s = inp.shape(K_AL, "K_AL")
        a = s[0] if s else 0
        F_AL = self._cross(K_AL, "K_AL", a, "the kernel between the new points and the current labelled set")
        want = [a, a] + ([self.k, self.k] if self.full else [])
        inp.expect("K_AA", inp.shape(K_AA, "K_AA"), want, "the Gram of the new points")
        ywant = [a] + ([] if self.k is None else [self.k])
        inp.expect("y_A", inp.shape(y_A, "y_A"), ywant, "the new points' targets, like y_L's rows")
        F_AA = inp.flat_kernel(inp.working(K_AA, "K_AA", self.dtype, self.device), self.full)
        inp.check_symmetric(F_AA, "K_AA")
        r = self._residual(y_A, f0_A, a, "y_A", "f0_A")
        B = self._C.solve(F_AL.T)  # [N, a b]
        C22 = self._factor(F_AA - B.T @ B, "The Schur complement of the new points", "the new points (with L)",
                           self.n_rows + F_AA.shape[0], float(F_AA.diagonal().abs().max()))
        z2 = torch.linalg.solve_triangular(C22, r - B.T @ self._z, upper=False)
        self._C.append(B.T, C22)
        self._z, self._alpha = torch.cat([self._z, z2]), None
        self.m += a
        return self

    def __repr__(self) -> str:
        form = f"full eNTK, k={self.k}" if self.full else ("scalar" if self.k is None else f"scalar x I_{self.k}")
        return f"LookAhead(m={self.m}, {form}, beta={self.beta:g}, dtype={str(self.dtype).replace('torch.', '')})"
