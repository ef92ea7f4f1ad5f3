"""Test session setup: Triton's CPU interpreter when there is no GPU, and `gpu` tests
skipped (with the reason shown) when no CUDA device is visible."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated, i.e. when tangent_kernels is
    # imported: it must be set before any test module imports the package.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config):
    """Which backends this run exercises, at the top of the log."""
    try:
        import tangent_kernels._ext as ext

        return str(ext.info()).splitlines()
    except Exception as error:  # the tests themselves will show the failure in full
        return [f"tangent_kernels: info() failed: {type(error).__name__}: {error}"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
