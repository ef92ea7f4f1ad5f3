"""``KernelRidge``: fit on a Gram matrix, choose beta, predict."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._model import check_device
from ..precisions import fp32_math
from ._checks import (default_tol, _beta_scale, _check_betas, _check_cross, check_kernel, _check_offset, _check_options,
                      check_targets, label_count, _out_dtype, _Targets, Array)
from ._common import _Config, _Result
from ._metrics import _key, _metrics, _Validation
from . import multi_output as outputs
from .api import _resolve, _run, _sharded, _warn_unconverged


# Telescopic search ("auto"): decades of beta relative to mean diag(K), then a finer grid.
_AUTO_RANGE = (1e-6, 1e2)


class NotFittedError(ValueError, AttributeError):
    """predict()/score() called before fit() (a ValueError, like scikit-learn's)."""


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
        solver: ``"auto"`` (default: ``eigh`` for model selection without validation data,
            else ``krylov``, or ``cg`` + Nystrom where a factor does not fit; the choice is in
            ``solver_`` and ``solver_reason_``), ``"krylov"``, ``"cg"``, ``"cholesky"``,
            ``"eigh"``, ``"nesterov"`` (the seed's; ``precond_rank=`` preconditions it).
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
        fit_time_ (seconds), n_classes_ (labels) or None, n_train_, solver_ (the solver
        that ran) and solver_reason_ (why, for ``solver="auto"``), tol_ (the tolerance used:
        ``tol``, or for ``tol=None`` 1e-6 with float64 results and 1e-3 with float32 ones).
    """

    def __init__(
        self,
        betas: Union[str, float, Sequence[float]] = (1e-3, 1e-2, 1e-1),
        solver: str = "auto",
        max_iter: int = 1000,
        tol: Optional[float] = None,
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
        precond: Optional[str] = "cholesky",
        warm_start: bool = False,
        dtype: Optional[torch.dtype] = None,
        n_classes: Optional[int] = None,
        sym_tol: Optional[float] = None,
        allow_tf32: bool = False,
        seed: int = 0,
        progress: Optional[bool] = False,
    ):
        _check_options(solver, max_iter, tol, eval_every, precond_rank, precond, warm_start)
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
        self._cfg = _Config(max_iter=int(max_iter), tol=1e-6 if tol is None else float(tol), eval_every=int(eval_every),
                            early_stopping=bool(early_stopping), patience=patience,
                            precond_rank=precond_rank, precond_power=precond_power, refine=refine,
                            factor_dtype=factor_dtype, krylov_precond=precond,
                            warm_start=warm_start, seed=seed, progress=progress)

    def __repr__(self) -> str:
        return (f"KernelRidge(betas={self.betas!r}, solver={self.solver!r}, max_iter={self.max_iter}, "
                f"tol={self.tol!r}, early_stopping={self.early_stopping}, eval_every={self.eval_every})")

    # -- fit ---------------------------------------------------------------------------

    def fit(self, K: Array, Y: Array, K_val: Optional[Array] = None, Y_val: Optional[Array] = None,
            f0: Optional[Array] = None, f0_val: Optional[Array] = None) -> "KernelRidge":
        """Fit on the training Gram K [n, n] and targets Y (int labels [n] or values [n] / [n, m]).

        K may also be the full k x k eNTK [n, n, k, k] (``tk.gram(..., output="full")``): one
        system over (sample, output) pairs, Y labels 0 .. k-1 or targets [n, k], K_val
        [n_val, n, k, k]; coefficients are then [n, k] and predictions [n_test, k].

        K_val [n_val, n] = K(X_val, X_train) and Y_val select beta (and nesterov's early
        stopping). f0 [n, m] / f0_val [n_val, m]: outputs of the network being linearized; the
        kernel model fits the remainder Y - f0 and predicts f0 + K alpha. Returns self.
        """
        start = time.perf_counter()
        if (K_val is None) != (Y_val is None):
            raise ValueError("pass K_val and Y_val together (or neither)")
        _sharded(K, "KernelRidge.fit")
        block = 1
        if outputs.ndim(K) == 4:  # the full k x k eNTK: one system over (sample, output) pairs
            K, block = outputs.flatten_kernel(K, "K")
        K = check_kernel(K, self.sym_tol, self.device)
        n, dev, dt = K.shape[0] // block, K.device, K.dtype
        counts = [c for c in (label_count(Y, "Y"), label_count(Y_val, "Y_val") if Y_val is not None else None)
                  if c is not None]
        n_classes = self.n_classes if self.n_classes is not None else (max(counts) if counts else None)
        targets = check_targets(Y, n, "Y", "K", dt, dev, n_classes)
        m = targets.values.shape[1]
        if block > 1 and m != block:
            raise ValueError(
                f"K is a {block}-output kernel [n, n, {block}, {block}], so Y needs {block} target columns "
                f"(or labels 0 .. {block - 1}: one-hot targets); got {m}"
            )
        classification = targets.labels is not None
        fitted = targets.values
        if f0 is not None:
            fitted = fitted - _check_offset(f0, (n, m), "f0", fitted)
        val = None
        if K_val is not None:
            if block > 1:
                K_val = outputs.flatten_kernel(K_val, "K_val", block)[0]
            Kv = _check_cross(K_val, n * block, "K_val", dt, dev)
            Kv_rows = Kv.shape[0] // block
            vt = check_targets(Y_val, Kv_rows, "Y_val", "K_val", dt, dev, n_classes, classification)
            if vt.values.shape[1] != m:
                raise ValueError(f"Y_val has {vt.values.shape[1]} target columns but Y has {m}")
            if (f0 is None) != (f0_val is None):
                raise ValueError("pass f0 and f0_val together: validation scores are f0_val + K_val @ alpha")
            fv = _check_offset(f0_val, (Kv_rows, m), "f0_val", fitted) if f0_val is not None else None
            val = _Validation(Kv, vt, fv, block)
        elif f0_val is not None:
            raise ValueError("f0_val given without K_val / Y_val")

        auto = isinstance(self.betas, str)
        needs_loo = val is None and (auto or len(self.betas) > 1)
        n_betas = 9 if auto else len(self.betas)  # the telescopic search's first round
        if block > 1 and needs_loo:
            raise ValueError(
                "a multi-output kernel chooses beta on validation data (leave-one-out would leave out one "
                "(sample, output) pair, not a sample): pass K_val [n_val, n, k, k] and Y_val, or a single beta"
            )
        solver, cfg, reason = _resolve(self.solver, K, n_betas, self._cfg, needs_loo, 1 if block > 1 else m)
        if val is None and solver != "eigh" and (auto or len(self.betas) > 1):
            what = "betas='auto'" if auto else f"{len(self.betas)} betas"
            raise ValueError(
                f"choosing among {what} needs validation data: pass K_val and Y_val, use "
                "solver='eigh' (exact leave-one-out scores), or give a single beta"
            )
        cv = self.cv if (val is None and solver == "eigh") else None
        scale = _beta_scale(K, self.beta_scale)
        out_dtype = _out_dtype(self.dtype, dt)
        tol = default_tol(self.tol, out_dtype)
        cfg = dataclasses.replace(cfg, out_eps=float(torch.finfo(out_dtype).eps), tol=tol)

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
            flat = fitted.reshape(n * block, 1) if block > 1 else fitted
            result = _run(solver, K, flat, [b * scale for b in user], cfg, val, cv, self.allow_tf32)
            runs.extend((b, result, i) for i, b in enumerate(user))

        runs.sort(key=lambda r: r[0])
        best, scores = self._select(runs, val, cv, targets)
        self.betas_ = [b for b, _, _ in runs]
        self.dual_coefs_ = torch.stack([r.coefs[i] for _, r, i in runs]).to(out_dtype).view(len(runs), n, m)
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
        self._block = block
        self._uses_f0 = f0 is not None
        if val is None:  # with validation data, stopping early is the point, not a failure
            _warn_unconverged(solver, _Result(self.dual_coefs_, self.n_iter_, self.converged_,
                                                   self.residual_, []), self.betas_, tol, out_dtype)
        self.solver_ = solver
        self.tol_ = tol
        self.solver_reason_ = reason if reason is not None else "chosen by the caller"
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
        block = getattr(self, "_block", 1)
        if block > 1:
            K_test = outputs.flatten_kernel(K_test, "K_test", block)[0]
        elif outputs.ndim(K_test) == 4:
            raise ValueError("K_test is a multi-output kernel [n_test, n, k, k] but fit's K was [n, n]; "
                             "fit on the [n, n, k, k] kernel (tk.gram(..., output='full')) to predict with one")
        Kt = _check_cross(K_test, self.n_train_ * block, "K_test", coef.dtype, coef.device)
        if self._uses_f0 and f0_test is None:
            raise ValueError("fit used f0: pass f0_test (the network's outputs on the test samples)")
        if not self._uses_f0 and f0_test is not None:
            raise ValueError("f0_test given but fit had no f0: pass f0 to fit, or drop f0_test")
        with fp32_math(self.allow_tf32), torch.no_grad():
            scores = Kt @ coef.reshape(-1, 1 if block > 1 else coef.shape[1])
        if block > 1:
            scores = scores.view(-1, block)
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
        targets = check_targets(Y_test, scores.shape[0], "Y_test", "K_test", scores.dtype, scores.device,
                                 self.n_classes_, self.n_classes_ is not None)
        metrics = _metrics(scores[:, None, :], targets)
        return metrics["accuracy" if "accuracy" in metrics else "r2"][0]
