"""Which implementation of the sampled-gradient contractions runs: the ``backend=`` choice.

  "torch"   plain torch (``tangent_kernels.sampled``), any device: the reference;
  "cpp"     the C++ CPU kernels (csrc/cpu/sampled_grad.cpp), CPU tensors;
  "cuda"    the CUDA kernels (csrc/cuda/sampled_grad.cu), CUDA tensors;
  "triton"  the Triton kernels (kernels/), CUDA tensors (CPU only under TRITON_INTERPRET=1);
  "auto"    CPU: "cpp" when the extension has its CPU kernels (measured faster than
            "torch": docs/kernels.md), else "torch". CUDA: "cuda" when built (measured
            fastest on an H100: bench/RESULTS.md), else "triton", else "torch".
The "torch", "cpp" and "cuda" ops share one schema (``tangent_kernels.ops`` and
``tangent_kernels.sampled``: the same arguments, ``out=``/``out_columns=`` keywords and
return), so each can write a result straight into the caller's feature block; Triton's
ops return a new [B, m] tensor.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import ops, sampled

__all__ = ["BACKENDS", "COMPILED", "resolve_backend", "linear_kernel", "conv_kernel", "embedding_kernel",
           "writes_in_place"]

BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")
COMPILED = ("cpp", "cuda")


def _compiled_missing(backend: str, device: torch.device) -> Optional[str]:
    """Why the compiled sampled-gradient kernels of ``backend`` cannot run on ``device``."""
    wanted = "cpu" if backend == "cpp" else "cuda"
    if device.type != wanted:
        other = "cuda" if backend == "cpp" else "cpp"
        return f"backend={backend!r} runs on {wanted.upper()} tensors, not {device}; use backend={other!r}, 'auto' or 'torch'"
    if not ops.extension_loaded():
        return f"backend={backend!r} needs the compiled extension: {ops.extension_error()} (see tangent_kernels.info())"
    if not ops.has_sampled_kernels(wanted):
        return (f"backend={backend!r}: the loaded extension has no {wanted.upper()} sampled-gradient kernels "
                f"(see tangent_kernels.info()); rebuild it with {'TANGENT_KERNELS_CUDA=1 ' if backend == 'cuda' else ''}"
                f"{ops.BUILD_HINT}")
    return None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend to use on ``device``; a clear error for an unknown or unusable one."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {list(BACKENDS)}")
    if backend == "torch":
        return backend
    if backend in COMPILED:
        reason = _compiled_missing(backend, device)
        if reason is not None:
            raise ValueError(reason)
        return backend
    if backend == "auto" and device.type != "cuda":
        # On CPU Triton only runs interpreted (for tests): far slower than either.
        return "cpp" if device.type == "cpu" and _compiled_missing("cpp", device) is None else "torch"
    from .. import kernels

    if backend == "auto":
        if _compiled_missing("cuda", device) is None:
            return "cuda"
        return "triton" if kernels.available() else "torch"
    reason = kernels.unavailable_reason()
    if reason is not None:
        raise ValueError(f"backend='triton' is not available: {reason}")
    if device.type != "cuda" and not kernels.INTERPRETED:
        raise ValueError(f"backend='triton' runs on CUDA devices (or under TRITON_INTERPRET=1), not {device}")
    return backend


# The backends whose ops take out=/out_columns= (one schema; Triton's return a new tensor).
_WRITE_OUT = ("torch",) + COMPILED


def writes_in_place(backend: str, out: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether ``backend``'s op can write straight into ``out`` (a 2-D float block on the
    operands' device)."""
    return (backend in _WRITE_OUT and out.dim() == 2 and out.device == like.device and out.is_contiguous()
            and out.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64))


def linear_kernel(backend: str):
    """(a [B, T, I], d [B, T, O], rows, cols[, out=, out_columns=]) -> [B, m]:
    F[b, j] = sum_t d[b, t, rows[j]] a[b, t, cols[j]] (the keywords: not on "triton")."""
    if backend == "triton":
        return torch.ops.tangent_kernels.triton_sampled_linear_grad
    return ops.sampled_linear_grad if backend in COMPILED else sampled.sampled_linear_grad


def embedding_kernel(backend: str):
    """(tokens [B, T], d [B, T, E], rows, cols, padding_idx[, out=, out_columns=]) -> [B, m]."""
    if backend == "triton":
        return torch.ops.tangent_kernels.triton_sampled_embedding_grad
    return ops.sampled_embedding_grad if backend in COMPILED else sampled.sampled_embedding_grad


def conv_kernel(backend: str):
    """(a_pad, d, out_channel, in_channel, kernel_offsets, stride, dilation[, out=, out_columns=])
    -> [B, m]: the sampled convolution-weight contraction of ``backend`` (conv.py)."""
    if backend == "triton":
        return torch.ops.tangent_kernels.triton_sampled_conv_grad
    return ops.sampled_conv_grad if backend in COMPILED else sampled.sampled_conv_grad
