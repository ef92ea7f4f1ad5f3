"""The ``precision=`` modes: what each computes in, stores features in and returns K in,
the math context each computes under (``Precision.math``: the one place that sets and
restores TF32), and the rounding of a feature block to its store dtype (fp16 scaled per
row)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

__all__ = ["Precision", "PRECISIONS", "check_precision", "fp32_math", "matmul_allows_tf32", "to_store"]


@dataclass(frozen=True)
class Precision:
    """How one ``precision=`` mode computes.

    Per-sample gradients are always computed in ``compute`` (fp32, or fp64 for "fp64"):
    the 16-bit modes round only the stored features, and the Gram accumulates their
    products in fp32, so their error is the features' rounding alone (docs/precision.md).
    """

    name: str
    compute: torch.dtype  # the model, its per-sample gradients
    store: torch.dtype  # the feature blocks: what ``features`` returns, what the Gram reads
    k: torch.dtype  # K itself: never 16-bit
    allow_tf32: bool = False  # TF32 in the model's matmuls/convolutions and the Gram (CUDA)
    # Power-of-two scale per sample before rounding to fp16, so that neither large
    # gradients overflow (max 65504) nor small ones underflow (normal from 6.1e-5);
    # undone exactly in fp32 on every tile of K.
    scaled: bool = False

    def math(self):
        """The context every computation of this mode runs in: IEEE fp32 matmuls and
        convolutions (TF32 on CUDA for "tf32"), the user's settings restored after."""
        return fp32_math(self.allow_tf32)


PRECISIONS: Dict[str, Precision] = {
    "fp64": Precision("fp64", torch.float64, torch.float64, torch.float64),
    "fp32": Precision("fp32", torch.float32, torch.float32, torch.float32),
    "tf32": Precision("tf32", torch.float32, torch.float32, torch.float32, allow_tf32=True),
    "bf16": Precision("bf16", torch.float32, torch.bfloat16, torch.float32),
    "fp16": Precision("fp16", torch.float32, torch.float16, torch.float32, scaled=True),
}


# fp16 rows are scaled so that their largest magnitude lies in [2**13, 2**14): two such
# entries multiply to < 2**28, far from fp32's limits, and a row keeps 28 binades above
# fp16's smallest normal number.
_FP16_TARGET_EXPONENT = 14


def check_precision(precision) -> Precision:
    if isinstance(precision, Precision):  # already checked: it travels whole
        return precision
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; available: {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def _fp16_scales(block: torch.Tensor) -> torch.Tensor:
    """Per-row powers of two mapping each row's largest magnitude into [2**13, 2**14)."""
    if block.shape[-1] == 0:  # no feature columns (every tensor's Gram from factors): nothing to scale
        return torch.ones(block.shape[:-1], dtype=torch.float32, device=block.device)
    peak = block.abs().amax(dim=-1).to(torch.float32)
    exponent = torch.where(peak > 0, torch.floor(torch.log2(peak)), torch.full_like(peak, _FP16_TARGET_EXPONENT - 1))
    return torch.exp2(_FP16_TARGET_EXPONENT - 1 - exponent)


def to_store(block: torch.Tensor, precision: Precision, scale_rows: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(features in the store dtype, per-row scales or None); ``features = stored / scales``.
    A block [B, k, p] (every logit) is taken as B * k rows."""
    if block.dim() == 3 and scale_rows:
        block = block.reshape(block.shape[0] * block.shape[1], block.shape[-1])  # -1 fails for p = 0
    if not (precision.scaled and scale_rows):
        stored = block.to(precision.store)
        if precision.store == torch.float16 and not bool(torch.isfinite(stored).all()):
            raise ValueError(
                f"a per-sample gradient exceeds fp16's range (largest finite value 65504; the largest "
                f"here is {float(block.abs().max()):.3g}): use precision='bf16' or 'fp32' for features "
                "(gram() scales fp16 features per sample and is not affected)"
            )
        return stored, None
    scales = _fp16_scales(block)
    return (block * scales[:, None].to(block.dtype)).to(precision.store), scales


# Backends whose fp32 matmuls/convolutions torch may run at reduced precision (TF32 on
# CUDA; TF32/bf16 through oneDNN on CPU), each with its own ``fp32_precision`` flag.
_FP32_PRECISION_BACKENDS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")
_TF32_CAPABLE = ("cuda.matmul", "cudnn.conv", "cudnn.rnn")


def _precision_flags() -> Dict[str, Any]:
    flags = {}
    for path in _FP32_PRECISION_BACKENDS:
        holder: Any = torch.backends
        for part in path.split("."):
            holder = getattr(holder, part, None)
        if holder is not None and hasattr(holder, "fp32_precision"):
            flags[path] = holder
    return flags


@contextmanager
def fp32_math(allow_tf32: bool = False):
    """fp32 matmuls and convolutions in IEEE fp32 for the duration (TF32 on CUDA when
    ``allow_tf32``), then the user's settings restored: "fp32" must mean fp32.

    Sets the per-backend ``fp32_precision`` flags where torch has them (2.9+) rather than
    the legacy ``allow_tf32``: reading the legacy flag after a user set the new one
    raises, while restoring the new flag leaves a legacy setting readable.
    """
    flags = _precision_flags()
    if not flags:  # pragma: no cover - torch < 2.9
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow_tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        return
    saved = {path: holder.fp32_precision for path, holder in flags.items()}
    try:
        for path, holder in flags.items():
            holder.fp32_precision = "tf32" if allow_tf32 and path in _TF32_CAPABLE else "ieee"
        yield
    finally:
        for path, holder in flags.items():
            holder.fp32_precision = saved[path]


def matmul_allows_tf32() -> bool:
    """Whether CUDA fp32 matmuls may run in TF32 right now (inside ``fp32_math``: what
    the ``precision=`` mode chose): hand-written kernels follow the same setting."""
    flags = _precision_flags()
    if "cuda.matmul" in flags:
        return flags["cuda.matmul"].fp32_precision == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)  # pragma: no cover - torch < 2.9
