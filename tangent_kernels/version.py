"""The package version, apart from the package __init__ so that its modules can read it
without importing the package (and everything it imports)."""

__version__ = "0.1.0"
