"""Moved: ``tk.coverage`` is an API-level report over the whole pipeline, in
tangent_kernels/coverage.py. Kept importable here for code that imported it from
persample (deprecated: import ``tangent_kernels.coverage``)."""

from ..coverage import CoverageReport, coverage  # noqa: F401

__all__ = ["CoverageReport", "coverage"]
