"""The eNTK during training: how far it moved, its spectrum and alignment, step by step.

    tracker = tk.tracking.KernelTracker(model, [probe_x], every=10, targets=probe_y)
    for step, (x, y) in enumerate(loader):
        ...; optimizer.step()
        tracker.step()                      # K of the probe set every 10 steps
    tracker.history()["distance"]           # kernel distance to the first K, per record

The tracker holds a :class:`tangent_kernels.Kernel`, so a record costs the Gram of the
probe set without the per-call setup (docs/kernel.md). For a Hugging Face ``Trainer``:
``Trainer(..., callbacks=[tk.tracking.trainer_callback(tracker)])``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .analysis import alignment, spectrum
from .kernel import Kernel

__all__ = ["KernelRecord", "KernelTracker", "kernel_distance", "summarize", "trainer_callback"]


def _as_kernel(K: Any, name: str) -> torch.Tensor:
    if not isinstance(K, torch.Tensor):
        try:
            K = torch.as_tensor(K)
        except (TypeError, ValueError, RuntimeError) as failure:
            raise TypeError(f"{name} must be a tensor or array (a Gram matrix), got {type(K).__name__}") from failure
    if not K.is_floating_point():
        raise TypeError(f"{name} must hold floating-point values, got {K.dtype}")
    K = K.detach().to(torch.float64)
    if not bool(torch.isfinite(K).all()):
        raise ValueError(f"{name} holds inf or nan")
    return K


def kernel_distance(K1: Any, K2: Any) -> float:
    """1 - <K1, K2>_F / (||K1||_F ||K2||_F) (Fort et al., 2020): 0 for kernels equal up to
    a positive scale, 1 for orthogonal ones (at most 2). Any shape, the same for both (a
    cross kernel, an output axis); computed in float64."""
    K1, K2 = _as_kernel(K1, "K1"), _as_kernel(K2, "K2")
    if K1.shape != K2.shape:
        raise ValueError(f"K1 and K2 must have the same shape (the same samples, in the same order); got "
                         f"{tuple(K1.shape)} and {tuple(K2.shape)}")
    n1, n2 = float(K1.norm()), float(K2.norm())
    if n1 == 0 or n2 == 0:
        raise ValueError(f"the kernel distance is undefined: {'K1' if n1 == 0 else 'K2'} is zero")
    # Cauchy-Schwarz bounds the cosine by 1; rounding can exceed it by an ulp (K1 against
    # itself would give -1e-16), so the distance is kept in its range [0, 2].
    cosine = float((K1 * K2.to(K1.device)).sum()) / (n1 * n2)
    return 1.0 - min(max(cosine, -1.0), 1.0)


@dataclass(frozen=True)
class KernelRecord:
    """Statistics of one K [n, n] of a sequence.

    step: the training step it was taken at (the position in the sequence for ``summarize``).
    trace, effective_dimension: as :func:`tangent_kernels.analysis.spectrum`.
    top_eigenvalues: the largest ``top``, descending (float64).
    alignment: kernel-target alignment with the targets (None without targets).
    distance: :func:`kernel_distance` to the first K of the sequence (0 for the first).
    kernel: K itself when asked to keep it (``keep_kernels=True``), else None.
    """

    step: int
    trace: float
    effective_dimension: float
    top_eigenvalues: torch.Tensor
    alignment: Optional[float]
    distance: float
    kernel: Optional[torch.Tensor] = None


def _record(K: torch.Tensor, step: int, first: torch.Tensor, targets, top: int, centered: bool,
            keep: bool) -> KernelRecord:
    spec = spectrum(K)
    return KernelRecord(
        step=step, trace=spec.trace, effective_dimension=spec.effective_dimension,
        top_eigenvalues=spec.eigenvalues[:top].clone(),
        alignment=None if targets is None else alignment(K, targets, centered=centered),
        distance=kernel_distance(first, K), kernel=K if keep else None)


def summarize(kernels: Iterable[Any], targets=None, *, top: int = 5, centered: bool = False,
              steps: Optional[Sequence[int]] = None) -> List[KernelRecord]:
    """The statistics of a sequence of Gram matrices [n, n] of the same samples (e.g. K
    at successive checkpoints): spectrum, alignment with ``targets`` (labels [n] or
    targets [n, m]) and the kernel distance to the first. ``steps`` labels them."""
    records: List[KernelRecord] = []
    first = None
    for position, K in enumerate(kernels):
        K = _as_kernel(K, f"kernel {position}")
        first = K if first is None else first
        step = position if steps is None else int(steps[position])
        records.append(_record(K, step, first, targets, top, centered, keep=False))
    return records


class KernelTracker:
    """Records K of a fixed probe set (or its statistics) every ``every`` calls of
    :meth:`step`, for a plain PyTorch training loop.

    Args:
        model: the model being trained, or a :class:`tangent_kernels.Kernel` of it.
        probe: the probe set, any loader ``tk.gram`` takes (e.g. ``[x]``); the same
            samples, in the same order, at every record.
        idx, **options: of ``tk.Kernel`` (output, precision, ...), for a model.
        every: record on step 0, every, 2 * every, ... (steps counted by :meth:`step`).
        targets: the probe set's labels [n] or targets [n, m], for the alignment.
        top: how many of the largest eigenvalues each record keeps.
        keep_kernels: keep every K (n x n each) in its record, not only the statistics.
    """

    def __init__(self, model, probe, idx=None, *, every: int = 1, targets=None, top: int = 5,
                 centered: bool = False, keep_kernels: bool = False, **options):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int (record every that many steps); got {every!r}")
        if not isinstance(top, int) or isinstance(top, bool) or top < 1:
            raise ValueError(f"top must be a positive int (how many eigenvalues to keep); got {top!r}")
        if isinstance(model, Kernel):
            if idx is not None or options:
                raise TypeError("a Kernel fixes idx and its options already: pass them to tk.Kernel, or pass the model")
            self.kernel = model
        elif isinstance(model, nn.Module):
            self.kernel = Kernel(model, idx, **options)
        else:
            raise TypeError(f"model must be a torch.nn.Module or a tk.Kernel, got {type(model).__name__}")
        self.probe, self.every, self.targets, self.top = probe, every, targets, top
        self.centered, self.keep_kernels = centered, keep_kernels
        self.steps = 0  # calls of step() so far
        self.first: Optional[torch.Tensor] = None  # K at the first record, float64
        self.records: List[KernelRecord] = []

    def step(self) -> Optional[KernelRecord]:
        """Count one training step; record K when the count is a multiple of ``every``
        (the record, else None). Call it after ``optimizer.step()``."""
        step, self.steps = self.steps, self.steps + 1
        return self.record(step) if step % self.every == 0 else None

    def record(self, step: Optional[int] = None) -> KernelRecord:
        """Compute K of the probe set now and record its statistics (``step``: the label,
        by default the number of steps counted)."""
        K = self.kernel.gram(self.probe, progress=False)
        if K.dim() != 2:
            raise ValueError(f"the tracker summarizes a K [n, n]; this output gives {tuple(K.shape)}: use an output "
                             "with one scalar per sample ('first', 'sum', 'trace', an index)")
        wide = K.detach().to(torch.float64)
        self.first = wide if self.first is None else self.first
        record = _record(wide, self.steps if step is None else step, self.first, self.targets, self.top,
                         self.centered, self.keep_kernels)
        self.records.append(record)
        return record

    def history(self) -> Dict[str, list]:
        """The records as columns: step, trace, effective_dimension, alignment, distance,
        top_eigenvalues (a [records, top] tensor)."""
        columns: Dict[str, Any] = {name: [getattr(r, name) for r in self.records]
                                   for name in ("step", "trace", "effective_dimension", "alignment", "distance")}
        columns["top_eigenvalues"] = (torch.stack([r.top_eigenvalues for r in self.records]) if self.records
                                      else torch.empty(0, self.top, dtype=torch.float64))
        return columns


def trainer_callback(tracker: KernelTracker):
    """A Hugging Face ``transformers.TrainerCallback`` that records ``tracker`` during
    ``Trainer.train()``: K of its probe set when training begins and after every
    ``tracker.every``-th optimizer step, each record labelled with ``state.global_step``
    (optimizer steps, so gradient accumulation counts once per update). Only the main
    process records (``state.is_world_process_zero``). The tracker's model must be the
    one the Trainer trains (the same object; the Trainer moving it to a device is a
    structure change the Kernel follows). transformers is imported here, not with this
    module: it stays an optional dependency.

        tracker = tk.tracking.KernelTracker(model, [probe_batch], every=50, output="sum")
        trainer = Trainer(model=model, ..., callbacks=[tk.tracking.trainer_callback(tracker)])
        trainer.train()
        tracker.history()
    """
    if not isinstance(tracker, KernelTracker):
        raise TypeError(f"trainer_callback takes a tk.tracking.KernelTracker, got {type(tracker).__name__}")
    try:
        from transformers import TrainerCallback
    except ImportError as failure:
        raise ImportError("trainer_callback needs Hugging Face transformers: pip install transformers") from failure

    class KernelTrackerCallback(TrainerCallback):
        """Records the tracker's K at the start of training and every ``every`` optimizer steps."""

        def __init__(self):
            self.tracker = tracker

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.tracker.record(step=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero and state.global_step % self.tracker.every == 0:
                self.tracker.record(step=state.global_step)

    return KernelTrackerCallback()
