"""The dense strategy for weight gradients of linear maps and groups=1 convolutions.

Two ways to the sampled entries of such a weight's per-sample gradient: the sparse
sampled-dot kernels (cost ~ sampled entries x positions), or a Triton implicit GEMM over
(output channel x input channel * kernel offset) tiles whose epilogue keeps only the
sampled entries (kernels/dense_conv_grad.py; cost ~ the tiles holding sampled entries,
at matrix-unit speed, never written out in full). ``tuning.settings.dense_strategy``:
  "auto"   on CUDA with backend "cuda" or "triton": on the first batch, time both on
           each use, check they agree, keep the faster; elsewhere sparse only (the dense
           kernel is Triton: on CPU only interpreted).
  "always" dense wherever it applies and agrees with sparse (tests, under the interpreter).
  "never"  sparse only.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict

import torch

from ..precisions import matmul_allows_tf32
from ..tuning import keep_old_names, settings

__all__ = ["DenseStrategy"]

_log = logging.getLogger("tangent_kernels")
keep_old_names(__name__, {"DENSE_STRATEGY": "dense_strategy"})  # deprecated: tuning.settings

# Agreement required of the dense result on the first batch (relative Frobenius): fp32
# sums in another order (<< 1e-4); TF32 products carry ~1e-3.
_DENSE_AGREEMENT = {False: 1e-4, True: 1e-2}
# "auto" does not even compile the dense kernel for a use whose computed tiles hold
# more than this many gradient entries per sampled one: on an H100 (IEEE fp32, resnet50,
# ~50 per sampled entry) dense was 15-40x slower than sparse on every convolution, so
# the break-even lies at a few; 8 leaves room for TF32 and better tiles while sparing
# sparse-sampled models the first batch's compilation and timing.
_DENSE_MAX_WORK_RATIO = 8.0


def check_strategy() -> str:
    """The strategy in force: ``tuning.settings.dense_strategy`` (checked when set)."""
    return settings.dense_strategy


class DenseStrategy:
    """Per-use choice between the sparse and the dense kernels, made on the first batch.

    strategy: use key -> "sparse" or "dense"; measured: use key -> what the choice
    measured (seconds of each, or why dense was not used).
    """

    def __init__(self, backend: str):
        self.policy = check_strategy()
        self.backend = backend
        self.strategy: Dict[str, str] = {}
        self.measured: Dict[str, str] = {}
        self._plans: Dict[str, tuple] = {}

    def applies(self, d: torch.Tensor) -> bool:
        from .. import kernels

        if self.policy == "never" or d.dtype == torch.float64 or not kernels.available():
            return False
        if self.policy == "always":
            return True
        return d.is_cuda and self.backend in ("cuda", "triton") and not kernels.INTERPRETED

    def _dense(self, key: str, operands) -> torch.Tensor:
        from .. import kernels

        plan, m, kernel = self._plans[key]
        a_pad, d, stride, dilation = operands
        return kernels.dense_conv_grad(a_pad, d, plan, m, kernel, stride, dilation, matmul_allows_tf32())

    def values(self, key: str, entries, operands: Callable[[], tuple], sparse: Callable[[], torch.Tensor]):
        """[B, m] sampled gradient entries of one use's weight, by the chosen strategy.

        entries: (out_channel, in_channel, kernel_offsets [m, ndim], kernel_size);
        operands(): (a_pad [B, C, *S], d [B, O, *P], stride, dilation) as a groups=1 convolution.
        """
        choice = self.strategy.get(key)
        if choice == "sparse":
            return sparse()
        if choice == "dense":
            return self._dense(key, operands())
        self.strategy[key], values = self._choose(key, entries, operands, sparse)
        return values

    def _choose(self, key, entries, operands, sparse):
        """(choice, this batch's values)."""
        from .. import kernels

        expected = sparse()
        *indices, kernel = entries
        m = indices[0].shape[0]
        dense_plan = kernels.dense_plan(*indices, kernel)
        ratio = dense_plan.tile_m.shape[0] * dense_plan.block_m * dense_plan.block_n / max(m, 1)
        if self.policy == "auto" and ratio > _DENSE_MAX_WORK_RATIO:
            self.measured[key] = f"dense not tried: its tiles hold {ratio:.0f}x the sampled entries; sparse"
            return "sparse", expected
        self._plans[key] = (dense_plan, m, kernel)
        ops = operands()
        try:
            got = self._dense(key, ops)
        except Exception as error:  # a kernel that cannot compile or launch here must not stop the run
            self.measured[key] = f"dense failed ({type(error).__name__}: {error}); sparse"
            _log.warning("dense strategy failed on %s, using the sparse kernels: %s", key, error)
            return "sparse", expected
        got = got.to(expected.dtype)
        error = float((got - expected).norm() / expected.norm().clamp_min(torch.finfo(got.dtype).tiny))
        if not error <= _DENSE_AGREEMENT[matmul_allows_tf32()]:
            self.measured[key] = f"dense disagrees with sparse ({error:.1e}); sparse"
            _log.warning("dense strategy disagrees with the sparse kernels on %s (%.1e relative); using sparse",
                         key, error)
            return "sparse", expected
        if self.policy == "always":
            self.measured[key] = "dense (always)"
            return "dense", got
        t_sparse = _device_seconds(sparse, got.device)
        t_dense = _device_seconds(lambda: self._dense(key, ops), got.device)
        choice = "dense" if t_dense < t_sparse else "sparse"
        self.measured[key] = f"sparse {t_sparse * 1e3:.3f} ms, dense {t_dense * 1e3:.3f} ms; {choice}"
        _log.debug("strategy for %s: %s", key, self.measured[key])
        return choice, (got if choice == "dense" else expected)


def _device_seconds(fn, device: torch.device, repeats: int = 3) -> float:
    """Median seconds of ``fn`` (already warm) on ``device``: CUDA events there."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]
