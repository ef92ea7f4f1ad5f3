"""tangent_kernels: fast empirical neural tangent kernels for PyTorch models."""

__version__ = "0.1.0"
