"""What the Triton op launchers share (Liger-Kernel's ``ops/utils.py``): whether Triton can
run here, the argument checks every launcher makes, and the block-size rule. Apart from
the package ``__init__`` so that the op modules import it and not the package that
imports them."""

from __future__ import annotations

import os

import torch

__all__ = ["INTERPRETED", "IMPORT_ERROR", "available", "block_size", "check_floats", "check_indices",
           "check_launch_device", "check_range", "unavailable_reason"]

# Read once, at import, like Triton itself does when it decorates the kernels below.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401
except ImportError as error:  # pragma: no cover - triton ships with CUDA torch
    IMPORT_ERROR: str | None = f"triton is not installed ({error}); install it with `pip install triton`"
else:
    IMPORT_ERROR = None


def unavailable_reason() -> str | None:
    """Why the Triton kernels cannot run here, or None when they can."""
    if IMPORT_ERROR is not None:
        return IMPORT_ERROR
    if INTERPRETED or torch.cuda.is_available():
        return None
    return ("no CUDA GPU is visible and TRITON_INTERPRET=1 was not set before importing "
            "tangent_kernels.kernels (set it to run the kernels on CPU through Triton's interpreter)")


def available() -> bool:
    """Whether the Triton kernels can run here (a CUDA GPU, or TRITON_INTERPRET=1 at import)."""
    return unavailable_reason() is None


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_floats(op: str, **tensors: torch.Tensor) -> torch.dtype:
    """All named tensors share one supported floating dtype; returns it."""
    dtypes = {name: t.dtype for name, t in tensors.items()}
    first = next(iter(dtypes.values()))
    if any(dt != first for dt in dtypes.values()) or first not in _FLOATS:
        raise TypeError(f"{op}: expected {', '.join(dtypes)} to share one dtype among fp16/bf16/fp32/fp64, "
                        f"got {dtypes}; cast them with .to(dtype)")
    return first


def check_indices(op: str, **indices: torch.Tensor) -> int:
    """Index tensors are 1-D integer tensors of one length m; returns m."""
    m = next(iter(indices.values())).shape[0] if next(iter(indices.values())).dim() == 1 else -1
    for name, t in indices.items():
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{op}: {name} must be an integer tensor, got {t.dtype}; use .long()")
        if t.dim() != 1 or t.shape[0] != m:
            shapes = {n: list(x.shape) for n, x in indices.items()}
            raise ValueError(f"{op}: {', '.join(indices)} must be 1-D of one length m, got {shapes}")
    return m


def check_launch_device(op: str, **tensors: torch.Tensor) -> None:
    """One device for all tensors, and one Triton can launch on."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(dv != first for dv in devices.values()):
        raise ValueError(f"{op}: all tensors must be on one device, got {devices}")
    if first.type == "meta":
        return
    if IMPORT_ERROR is not None:
        raise RuntimeError(f"{op}: {IMPORT_ERROR}")
    if first.type != "cuda" and not INTERPRETED:
        raise ValueError(f"{op}: Triton kernels run on CUDA tensors, got {first}; move the inputs to a GPU, "
                         "or set TRITON_INTERPRET=1 before importing tangent_kernels to run them on CPU")


def check_range(op: str, bounds: dict[str, tuple[torch.Tensor, int]]) -> None:
    """Every index lies in [0, size): one host sync for all of them.

    The kernels gather with these indices unchecked, so an out-of-range index would
    read stray memory (the torch reference raises instead).
    """
    if not bounds:
        return
    names = list(bounds)
    extrema = torch.stack([torch.stack([t.min(), t.max()]).to(torch.int64) for t, _ in bounds.values()])
    for name, (low, high) in zip(names, extrema.tolist()):
        size = bounds[name][1]
        if low < 0 or high >= size:
            raise IndexError(f"{op}: {name} has values in [{low}, {high}], outside [0, {size})")


def block_size(n: int, low: int, high: int) -> int:
    """A power of two in [low, high] covering n where it can (tl.arange needs powers of two)."""
    return max(low, min(high, 1 << max(n - 1, 0).bit_length()))
