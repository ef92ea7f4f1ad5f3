"""Kernel ridge regression on a precomputed (eNTK) Gram matrix.

The problem, for every regularization strength beta and all m outputs at once::

    (K + beta I) alpha = Y            K: [n, n] symmetric PSD, Y: [n, m], alpha: [n, m]
    scores(X_test) = K(X_test, X) alpha (+ f0(X_test))

beta is absolute, exactly scikit-learn's ``KernelRidge(alpha=beta, kernel="precomputed")``
(whose dual problem is the same linear system); ``beta_scale="trace"`` multiplies
it by the mean diagonal of K so that one grid fits kernels of any scale.

One file per solver, each a function ``(K, targets, betas, config, ...) -> _Result``
(docs/solvers.md says which one when, with measurements):

- ``nesterov.py``: the seed's dual gradient iteration with momentum and validation early
  stopping, optionally preconditioned by the shared Nystrom sketch (``precond_rank=``).
- ``cg.py``: block conjugate gradients on every (beta, output) column at once, optionally
  preconditioned by the Nystrom sketch (``nystrom.py``), with fp64 residual replacement,
  or along the beta path with warm starts.
- ``krylov.py``: one Cholesky factor (or none: multi-shift) generates one block Krylov
  space that serves every beta; minimal residual per beta in it.
- ``eigh.py``: one eigendecomposition, every beta in closed form, exact LOO / GCV.
- ``cholesky.py``: one fp32 factorization per beta, fp64 iterative refinement.

Shared pieces: ``_checks.py`` (input checks), ``_common.py`` (precision, config and
result types, refinement), ``_metrics.py`` (validation, histories), ``auto.py`` (the
default solver's choice), ``outputs.py`` (the full k x k eNTK as one system), ``api.py``
(``solve`` and the dispatch), ``estimator.py`` (``KernelRidge``).

Dtype rule (decided here, once): the *working dtype* is float64 when K is float64 and
float32 otherwise (float16/bfloat16 kernels are upcast). Nesterov, CG and eigh compute
in the working dtype. Cholesky factors in ``factor_dtype`` (float32 by default) and
refines with float64 residuals and a float64 solution (falling back to float64 factors
when the float32 ones are not accurate enough); eigh refines the same way when the
working dtype is float32. Coefficients are returned in the working dtype unless
``dtype=`` asks for another. Float32 GEMMs are IEEE fp32: TF32 is switched off for the
duration of a solve (and restored) unless ``allow_tf32=True``. Inputs are never
modified; K is copied only when its dtype or device changes.
"""

from ._checks import SOLVERS
from ._common import ConvergenceWarning
from .api import solve
from .estimator import KernelRidge, NotFittedError

__all__ = ["KernelRidge", "solve", "SOLVERS", "NotFittedError", "ConvergenceWarning"]
