"""Triton kernels: the sampled per-sample gradient ops (the "triton" backend of persample)
and the Gram tile update (``ops.gram_tile_update(..., backend="triton")``).

One file per op; each defines its ``@triton.jit`` kernel, a launcher, and registers a
``torch.library.custom_op`` named ``tangent_kernels::triton_<op>`` with a fake kernel:

    torch.ops.tangent_kernels.triton_sampled_linear_grad(a, d, rows, cols)
    torch.ops.tangent_kernels.triton_sampled_conv_grad(a_pad, d, out_channel, in_channel,
                                                       kernel_offsets, stride, dilation)
    torch.ops.tangent_kernels.triton_sampled_embedding_grad(tokens, d, rows, cols, padding_idx)
    torch.ops.tangent_kernels.triton_gram_tile_update(K, A, B, row_offset, col_offset, lower, allow_tf32)
    torch.ops.tangent_kernels.triton_dense_conv_grad(...)   # via dense_conv_grad(a_pad, d, dense_plan(...), ...)

The plain-torch references are in ``tangent_kernels.sampled``.

Triton runs on CUDA tensors on a GPU, or on CPU tensors through its interpreter when
``TRITON_INTERPRET=1`` is set *before* this package is imported (Triton reads it when
a kernel is decorated). Importing this module never raises: without Triton the ops
are simply not registered and ``available()`` says why.

Dtype rule (all ops): the floating inputs share one dtype among fp16, bf16, fp32,
fp64; products are accumulated in fp32 (fp64 for fp64 inputs) and the [B, m] output
is stored in the input dtype. Index tensors may be any integer dtype.
"""

from __future__ import annotations

from .launch import INTERPRETED, IMPORT_ERROR, available, unavailable_reason

__all__ = ["INTERPRETED", "available", "unavailable_reason"]

if IMPORT_ERROR is None:
    from .dense_conv_grad import DensePlan, dense_conv_grad, dense_plan, triton_dense_conv_grad  # noqa: E402
    from .gram_tile_update import triton_gram_tile_update  # noqa: E402
    from .sampled_conv_grad import triton_sampled_conv_grad  # noqa: E402
    from .sampled_embedding_grad import triton_sampled_embedding_grad  # noqa: E402
    from .sampled_linear_grad import triton_sampled_linear_grad  # noqa: E402

    __all__ += ["DensePlan", "dense_conv_grad", "dense_plan", "triton_dense_conv_grad", "triton_gram_tile_update", "triton_sampled_conv_grad", "triton_sampled_embedding_grad", "triton_sampled_linear_grad"]
