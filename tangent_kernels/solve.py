"""The solvers' public names at their historical import path (``tangent_kernels.solve``).

The code lives in ``tangent_kernels/solvers/``, one file per solver.
"""

from .solvers import SOLVERS, ConvergenceWarning, KernelRidge, NotFittedError, solve

__all__ = ["KernelRidge", "solve", "SOLVERS", "NotFittedError", "ConvergenceWarning"]
