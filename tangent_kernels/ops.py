"""The Gram tile update op, ``tangent_kernels::gram_tile_update``: its Python face, its
plain-torch reference, its fake (meta) implementation, and the choice of backend.

    gram_tile_update(K, A, B, row_offset, col_offset, lower)
        K: [m, n] float32/float64 tile of a Gram matrix (any strides; updated in place)
        A: [m, d], B: [n, d]  float16/bfloat16/float32/float64, one dtype
        K[r, c] += sum_k A[r, k] * B[c, k]   for r < m, c < n,
        except, when ``lower``, entries with row_offset + r < col_offset + c (above the
        diagonal of the full Gram) are left untouched.

Dtype rule (decided here, for every backend): products are accumulated in K's dtype:
float32 for 16-bit or float32 inputs with a float32 K, float64 with a float64 K.
Float64 inputs need a float64 K.

Backends: "cpp" (the C++ CPU kernel, csrc/cpu), "cuda" (the hand-written CUDA kernel,
csrc/cuda), "triton" (tangent_kernels/kernels/gram_tile_update.py), "torch" (plain
torch: the reference, and the fallback when the extension is not built) and "auto".
The C++ schema is in csrc/ops.cpp; the compiled kernels are reached through
``torch.ops.tangent_kernels.gram_tile_update``, which the dispatcher routes by device.
"""

from __future__ import annotations

from typing import List, Union

import torch

from ._ext import BUILD_HINT, extension_error, extension_loaded, has_cpu_kernels, has_cuda_kernels
from .sampled import check_out

__all__ = ["BACKENDS", "available_tile_backends", "gram_tile_update", "gram_tile_update_torch", "has_sampled_kernels",
           "sampled_conv_grad", "sampled_embedding_grad", "sampled_linear_grad",
           "BUILD_HINT", "extension_error", "extension_loaded"]

OP_NAME = "tangent_kernels::gram_tile_update"
BACKENDS = ("auto", "cpp", "cuda", "torch", "triton")

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_K_DTYPES = (torch.float32, torch.float64)
# Upcast chunks of the torch path (16-bit inputs): at most this many bytes of upcast
# A and B columns at once, since d can be ~1e6 and a full float32 copy of A is larger
# than A itself.
_CAST_CHUNK_BYTES = 64 << 20


def _check_args(K: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
    """The public boundary's checks (the C++ kernels repeat them for direct op calls)."""
    for name, t, want in (("K", K, "[m, n]"), ("A", A, "[m, d]"), ("B", B, "[n, d]")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gram_tile_update: {name} must be a torch.Tensor {want}, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"gram_tile_update: {name} must be 2-D {want}, got shape {list(t.shape)}")
    if A.dtype != B.dtype:
        raise TypeError(f"gram_tile_update: A and B must have the same dtype, got A {A.dtype} and B {B.dtype}; "
                        "cast one of them")
    if A.dtype not in _INPUT_DTYPES:
        raise TypeError(f"gram_tile_update: A and B must be float16, bfloat16, float32 or float64, got {A.dtype}")
    if K.dtype not in _K_DTYPES:
        raise TypeError(f"gram_tile_update: K must be float32 or float64 (the accumulation dtype), got {K.dtype}")
    if A.dtype == torch.float64 and K.dtype != torch.float64:
        raise TypeError(f"gram_tile_update: float64 inputs need a float64 K (accumulating them in {K.dtype} would "
                        f"lose their precision), got K {K.dtype}")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"gram_tile_update: A [m, d] and B [n, d] must have the same d, got A {list(A.shape)} "
                         f"and B {list(B.shape)}")
    if K.shape[0] != A.shape[0] or K.shape[1] != B.shape[0]:
        raise ValueError(f"gram_tile_update: K must have shape [A.shape[0], B.shape[0]] = "
                         f"[{A.shape[0]}, {B.shape[0]}], got {list(K.shape)}")
    if A.device != K.device or B.device != K.device:
        raise ValueError(f"gram_tile_update: K, A and B must be on the same device, got K on {K.device}, "
                         f"A on {A.device}, B on {B.device}")


def gram_tile_update_torch(
    K: torch.Tensor, A: torch.Tensor, B: torch.Tensor, row_offset: int = 0, col_offset: int = 0, lower: bool = False
) -> None:
    """The op in plain torch (any device): the reference, and the fallback backend."""
    _check_args(K, A, B)
    m, n, d = A.shape[0], B.shape[0], A.shape[1]
    # With `lower`, row r may touch columns c <= row_offset - col_offset + r: none past
    # the last row's diagonal.
    cols = max(0, min(n, row_offset - col_offset + m)) if lower else n
    if m == 0 or cols == 0 or d == 0:
        return
    acc = K.dtype
    Bc, Kc = B[:cols], K[:, :cols]
    if A.dtype == acc:
        P = A @ Bc.T
    else:
        chunk = max(64, _CAST_CHUNK_BYTES // ((m + cols) * torch.finfo(acc).bits // 8))
        P = torch.zeros(m, cols, dtype=acc, device=K.device)
        for k0 in range(0, d, chunk):
            P.addmm_(A[:, k0:k0 + chunk].to(acc), Bc[:, k0:k0 + chunk].to(acc).T)
    if lower:
        rows = torch.arange(m, device=K.device) + row_offset
        allowed = rows[:, None] >= torch.arange(cols, device=K.device)[None, :] + col_offset
        # where() rather than adding a masked 0: masked entries stay bit-identical.
        Kc.copy_(torch.where(allowed, Kc + P, Kc))
    else:
        Kc.add_(P)


def available_tile_backends(device: Union[str, torch.device] = "cpu") -> List[str]:
    """Backends that can run the op on ``device`` here, "auto"'s choice first."""
    device = torch.device(device)
    if device.type == "cpu":
        found = ["cpp", "torch"] if has_cpu_kernels() else ["torch"]
    elif device.type == "cuda" and has_cuda_kernels() and torch.cuda.is_available():
        found = ["torch", "cuda"]
    else:
        found = ["torch"]
    if _triton_tiles_run_on(device):
        found.append("triton")
    return found


def _triton_tiles_run_on(device: torch.device) -> bool:
    from . import kernels  # imports Triton: only when asked

    if not kernels.available():
        return False
    return device.type == "cpu" if kernels.INTERPRETED else device.type == "cuda"


def _unavailable(backend: str, device: torch.device) -> str:
    """Why ``backend`` cannot run on ``device`` (for the error message)."""
    if backend == "cpp" and device.type != "cpu":
        return f"backend='cpp' runs on CPU tensors, got tensors on {device}; use backend='cuda' or 'torch'"
    if backend == "cuda" and device.type != "cuda":
        return f"backend='cuda' runs on CUDA tensors, got tensors on {device}; use backend='cpp' or 'torch'"
    if backend == "triton":
        from . import kernels

        return kernels.unavailable_reason() or (
            f"backend='triton' runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), got {device}")
    if not extension_loaded():
        return f"backend={backend!r} needs the compiled extension: {extension_error()}"
    if backend == "cuda" and not has_cuda_kernels():
        return ("backend='cuda': the extension was built without its CUDA sources; rebuild with "
                f"TANGENT_KERNELS_CUDA=1 {BUILD_HINT} on a machine with nvcc and a CUDA build of torch")
    return f"backend={backend!r} is not available on {device}"


def gram_tile_update(
    K: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    row_offset: int = 0,
    col_offset: int = 0,
    lower: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``K += A @ B.T`` in place, in K's dtype; with ``lower`` only on/below the global
    diagonal (entries with ``row_offset + r < col_offset + c`` are left untouched).

    Args:
        K: [m, n] float32/float64 tile, possibly a strided view into a larger Gram.
        A: [m, d] rows of the tile; B: [n, d] its columns; one dtype among
            float16/bfloat16/float32/float64 (float64 needs a float64 K).
        row_offset, col_offset: global position of K[0, 0] in the full Gram.
        lower: update only global row >= global column (a tile of a symmetric Gram).
        backend: "auto" (C++ on CPU when built, else torch; torch/cuBLAS on CUDA),
            "cpp", "cuda", "torch" or "triton" (CUDA, or CPU under TRITON_INTERPRET=1;
            float16/bfloat16/float32 inputs and a float32 K; TF32 products only when
            torch's CUDA matmuls allow them).

    Returns:
        K (updated in place).
    """
    if backend not in BACKENDS:
        raise ValueError(f"gram_tile_update: backend must be one of {BACKENDS}, got {backend!r}")
    _check_args(K, A, B)
    row_offset, col_offset, lower = int(row_offset), int(col_offset), bool(lower)
    device = K.device
    if backend == "auto":
        # On CUDA tensors "auto" keeps the cuBLAS path (torch) for now: the hand-written
        # CUDA kernel has not yet been validated or measured against cuBLAS on a GPU.
        backend = "cpp" if device.type == "cpu" and has_cpu_kernels() else "torch"
    elif backend != "torch" and backend not in available_tile_backends(device):
        reason = _unavailable(backend, device)
        wrong_device = (backend == "cpp") != (device.type == "cpu") or (backend == "cuda") != (device.type == "cuda")
        raise (ValueError if wrong_device else RuntimeError)(f"gram_tile_update: {reason}")
    if backend == "torch":
        gram_tile_update_torch(K, A, B, row_offset, col_offset, lower)
    elif backend == "triton":
        torch.ops.tangent_kernels.triton_gram_tile_update(K, A, B, row_offset, col_offset, lower, _cuda_tf32_allowed())
    else:
        torch.ops.tangent_kernels.gram_tile_update(K, A, B, row_offset, col_offset, lower)
    return K


def _cuda_tf32_allowed() -> bool:
    """Whether fp32 CUDA matmuls may use TF32 right now (precision="tf32" sets this)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return bool(matmul.allow_tf32)  # pragma: no cover - torch < 2.9


def _fake_gram_tile_update(K, A, B, row_offset, col_offset, lower):
    """Fake (meta) kernel: checks the arguments; the op only mutates K, returns nothing."""
    _check_args(K, A, B)


if extension_loaded():  # the schema exists only once tangent_kernels._C is loaded
    torch.library.register_fake(OP_NAME)(_fake_gram_tile_update)


# --- sampled per-sample gradient ops (C++ CPU / CUDA kernels) --------------------------
#
#   torch.ops.tangent_kernels.sampled_linear_grad(a, d, rows, cols, out, out_columns)
#   torch.ops.tangent_kernels.sampled_conv_grad(a_pad, d, out_channel, in_channel,
#                                               kernel_offsets, stride, dilation, out, out_columns)
#   torch.ops.tangent_kernels.sampled_embedding_grad(tokens, d, rows, cols, padding_idx, out, out_columns)
#
# each writes out[b, out_columns[j]] (out[b, j] without out_columns) for every sample b
# and sampled entry j, in place, into the caller's feature block; semantics in
# csrc/sampled_grad.h. The plain-torch twins in tangent_kernels.sampled share this schema
# (same arguments, the same out=/out_columns= keywords and return, the same checks).
# Accumulation is float32 (float64 for float64 inputs), rounded once into out's dtype.

SAMPLED_OPS = ("sampled_linear_grad", "sampled_conv_grad", "sampled_embedding_grad")


def _index(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int64 else t.long()


def _out(out, batch: int, m: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(batch, m, dtype=like.dtype, device=like.device) if out is None else out


def sampled_linear_grad(a: torch.Tensor, d: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, *,
                        out: torch.Tensor | None = None, out_columns: torch.Tensor | None = None) -> torch.Tensor:
    """out[b, out_columns[j]] = sum_t d[b, t, rows[j]] * a[b, t, cols[j]] (C++/CUDA kernel).

    a: [B, T, I], d: [B, T, O]; rows/cols: [m] integer. Without ``out`` a new [B, m]
    tensor in a's dtype is returned; with it, ``out`` ([B, N], any float dtype) is
    written in place at ``out_columns`` (distinct; default the first m columns).
    """
    out = _out(out, a.shape[0], rows.shape[0], a)
    torch.ops.tangent_kernels.sampled_linear_grad(
        a, d, _index(rows), _index(cols), out, None if out_columns is None else _index(out_columns))
    return out


def sampled_conv_grad(a_pad: torch.Tensor, d: torch.Tensor, out_channel: torch.Tensor, in_channel: torch.Tensor,
                      kernel_offsets: torch.Tensor, stride, dilation, *, out: torch.Tensor | None = None,
                      out_columns: torch.Tensor | None = None) -> torch.Tensor:
    """out[b, out_columns[j]] = sum_p d[b, out_channel[j], p] *
    a_pad[b, in_channel[j], p * stride + kernel_offsets[j] * dilation] (C++/CUDA kernel).

    a_pad: [B, C, *S] (already padded), d: [B, O, *P] with 1-3 spatial dims;
    kernel_offsets: [m, ndim] integer. ``out``/``out_columns`` as in ``sampled_linear_grad``.
    """
    out = _out(out, a_pad.shape[0], out_channel.shape[0], a_pad)
    torch.ops.tangent_kernels.sampled_conv_grad(
        a_pad, d, _index(out_channel), _index(in_channel), _index(kernel_offsets), [int(s) for s in stride],
        [int(s) for s in dilation], out, None if out_columns is None else _index(out_columns))
    return out


def sampled_embedding_grad(tokens: torch.Tensor, d: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                           padding_idx: int | None = None, *, out: torch.Tensor | None = None,
                           out_columns: torch.Tensor | None = None) -> torch.Tensor:
    """out[b, out_columns[j]] = sum_t [tokens[b, t] == rows[j]] * d[b, t, cols[j]], with
    row ``padding_idx`` getting no gradient (C++/CUDA kernel).

    tokens: [B, T] integer, d: [B, T, E]. ``out``/``out_columns`` as in ``sampled_linear_grad``.
    """
    out = _out(out, d.shape[0], rows.shape[0], d)
    torch.ops.tangent_kernels.sampled_embedding_grad(
        _index(tokens), d, _index(rows), _index(cols), padding_idx, out,
        None if out_columns is None else _index(out_columns))
    return out


def _fake_check_out(op: str, out: torch.Tensor, batch: int, m: int, out_columns) -> None:
    """The shape checks the compiled kernels make, for tracing (fake tensors hold no values)."""
    check_out(op, out, batch, m, out_columns)


def _fake_sampled_linear_grad(a, d, rows, cols, out, out_columns):
    if a.dim() != 3 or d.dim() != 3 or a.shape[:2] != d.shape[:2]:
        raise RuntimeError(f"sampled_linear_grad: a and d must be [B, T, in] and [B, T, out], got "
                           f"{list(a.shape)} and {list(d.shape)}")
    _fake_check_out("sampled_linear_grad", out, a.shape[0], rows.shape[0], out_columns)


def _fake_sampled_conv_grad(a_pad, d, out_channel, in_channel, kernel_offsets, stride, dilation, out, out_columns):
    if a_pad.dim() != d.dim() or not 3 <= a_pad.dim() <= 5 or len(stride) != a_pad.dim() - 2:
        raise RuntimeError(f"sampled_conv_grad: a_pad [B, C, *S] and d [B, O, *P] need 1-3 spatial dims and one "
                           f"stride per dim, got {list(a_pad.shape)}, {list(d.shape)}, stride {list(stride)}")
    _fake_check_out("sampled_conv_grad", out, a_pad.shape[0], out_channel.shape[0], out_columns)


def _fake_sampled_embedding_grad(tokens, d, rows, cols, padding_idx, out, out_columns):
    if tokens.dim() != 2 or d.dim() != 3 or tokens.shape != d.shape[:2]:
        raise RuntimeError(f"sampled_embedding_grad: tokens must be [B, T] and d [B, T, E], got "
                           f"{list(tokens.shape)} and {list(d.shape)}")
    _fake_check_out("sampled_embedding_grad", out, d.shape[0], rows.shape[0], out_columns)


def _register_sampled_fakes() -> None:
    """Only for the ops this build has (an older _C may predate them)."""
    fakes = {"sampled_linear_grad": _fake_sampled_linear_grad, "sampled_conv_grad": _fake_sampled_conv_grad,
             "sampled_embedding_grad": _fake_sampled_embedding_grad}
    for name, fake in fakes.items():
        if hasattr(torch.ops.tangent_kernels, name):
            torch.library.register_fake(f"tangent_kernels::{name}")(fake)


def has_sampled_kernels(device_type: str) -> bool:
    """Whether the loaded extension has the sampled-gradient kernels for ``device_type``."""
    if not extension_loaded() or not hasattr(torch.ops.tangent_kernels, "sampled_conv_grad"):
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    try:  # private API, guarded as in _ext._query_kernel
        return all(bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"tangent_kernels::{name}", key))
                   for name in SAMPLED_OPS)
    except Exception:
        return False


if extension_loaded():
    _register_sampled_fakes()
