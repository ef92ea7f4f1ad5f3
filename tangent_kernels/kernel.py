"""tk.Kernel: the eNTK of one model, idx and output, computed again and again (during
training) without redoing what depends on the model's structure only.

What a call of tk.gram derives before its first feature (the structured plan and its
probe pass, the rules' decisions, which tensors take the generic path, the check's
per-sample evaluators) is kept here across calls; the weights are read again on every
call. docs/kernel.md has the why.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from . import feature_phase, pipeline
from .kept import KeptFeatures, computation_tokens
from .outputs import OutputProbes, OutputSpec
from .params import ParamIndex, resolve_idx
from .persample.extractor import PlanCommitted
from .request import Request
from .sketch import check_projection
from .store import recycled_buffers
from .structured.plan import check_structured

__all__ = ["Kernel"]

# The options fixed when the Kernel is made: a call that wants other ones wants another Kernel.
_FIXED = ("idx", "output", "precision", "device", "backend", "structured", "inputs", "projection")
# The distributed path splits the work over ranks, each with an extractor of its own.
_DISTRIBUTED = ("group", "shard", "gather")


def _structure(model: nn.Module) -> tuple:
    """What the kept decisions depend on: the module tree and each parameter's identity,
    shape, dtype, device and trainability (a module or parameter replaced, requires_grad
    toggled). Values are not in it: those are read again on every call."""
    modules = tuple((name, id(module), type(module)) for name, module in model.named_modules(remove_duplicate=False))
    parameters = tuple((name, id(p), p.requires_grad, tuple(p.shape), p.dtype, p.device)
                       for name, p in model.named_parameters(remove_duplicate=False))
    buffers = tuple((name, tuple(b.shape), b.dtype, b.device) for name, b in model.named_buffers(remove_duplicate=False))
    return modules, parameters, buffers


class Kernel:
    """The eNTK of ``model`` at ``idx`` for ``output``, callable again after the weights change.

    ``tk.Kernel(model, idx).gram(loader)`` equals ``tk.gram(model, loader, idx)`` with the
    same options, at the model's weights at the time of the call: weights are read again
    on every call (in-place optimizer steps, ``load_state_dict``, writes through
    ``.data``); what depends on the model's structure only (the structured plan, the
    rules' and the generic path's decisions, the check's evaluators) is kept, and derived
    again when the structure changes (a module or parameter replaced, requires_grad
    toggled). The per-batch check (docs/trust.md) runs on every call.

    The features (and structured factors) of the loaders evaluated last are kept: a
    ``.gram`` or ``.cross`` of a loader that is the same object, yielding the same data, at
    the same weights (values and version counters of every parameter and buffer) and the
    same computation (modules' classes, forwards and plain attributes) reuses them instead
    of computing that side again (kept.py; docs/kernel.md).

    Args: those of :func:`tangent_kernels.gram` that fix the computation (``idx``,
    ``output``, ``precision``, ``device``, ``backend``, ``structured``, ``inputs``,
    ``projection``: a :class:`tk.Projection`, the same R on every call, so that the
    sketched kernels of successive weights are comparable).
    ``idx=None`` means the trainable parameters at the time of each call.
    ``keep``: keep the features of the last loaders (default True); ``max_memory``: bytes
    the kept features and the copy of the weights they need may hold together (default
    1 GiB; what does not fit is not kept). ``.clear()`` drops them.
    """

    def __init__(self, model: nn.Module, idx=None, *, output: OutputSpec = "first", precision: str = "fp32",
                 device=None, backend: str = "auto", structured: str = "auto",
                 inputs: Optional[Callable[[Any], Any]] = None, projection=None, keep: bool = True,
                 max_memory: int = 2**30):
        # Every fixed argument checked now, where the user wrote it, by the check every call makes
        # again (OutputProbes are evaluated per call, by tk.gram and tk.features).
        Request.of(model, idx, output="full" if isinstance(output, OutputProbes) else output, precision=precision,
                   device=device, backend=backend, inputs=inputs)
        self.model = model
        self.idx = idx
        self.options: Dict[str, Any] = dict(output=output, precision=precision, device=device,
                                            backend=backend, structured=check_structured(structured), inputs=inputs,
                                            projection=check_projection(projection))
        self._index: Optional[ParamIndex] = None
        self._structure: Optional[tuple] = None
        self._extractors: Dict[str, Any] = {}  # structured mode -> FeatureExtractor (feature_phase.reused_extractors)
        self.calls = 0
        self._computation: Optional[list] = None
        self.rebuilds = 0  # how often the structure changed (and everything kept was derived again)
        if not isinstance(keep, bool):
            raise TypeError(f"keep must be True or False, got {type(keep).__name__}")
        if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float)) or not 0 <= max_memory < float("inf"):
            raise ValueError(f"max_memory must be a finite number of bytes >= 0 (what the kept features may hold, "
                             f"e.g. 4 * 2**30), got {max_memory!r}")
        self.keep = keep
        self.kept = KeptFeatures(model, max_memory)
        self._prepare()  # a wrong idx is said now, not at the first call

    @property
    def index(self) -> ParamIndex:
        """The ParamIndex of the current structure (idx resolved against the model)."""
        self._prepare()
        return self._index

    def clear(self) -> None:
        """Drop everything kept (features of the last loaders, decisions): the next call derives it again."""
        self.kept.clear()
        self._extractors = {}
        self._index, self._structure = None, None

    def _prepare(self) -> None:
        """Everything kept is dropped when the structure changed; the weights are read again."""
        structure = _structure(self.model)
        if structure != self._structure:
            if self._structure is not None:
                self.rebuilds += 1
            self._extractors = {}
            self.kept.clear()
            self._index = resolve_idx(self.model, self.idx)
            self._structure = structure
        # Calls after the first check one batch per loader, rotating, while the modules'
        # classes, forwards and plain attributes stay as they were (docs/trust.md).
        computation = computation_tokens(self.model)
        rotation = self.calls if computation == self._computation else None
        self._computation = computation
        for extractor in self._extractors.values():
            extractor.refresh()
            # The structured plan may still be dropped on this call's first batch (engine
            # commits it once that batch is in): a new call starts uncommitted.
            extractor.committed = False
            extractor.rotation = rotation
        self.calls += 1
        self.kept.validate(computation)

    def _run(self, compute: Callable[..., torch.Tensor], run_options: Dict[str, Any], *args):
        fixed = sorted(set(run_options) & set(_FIXED))
        if fixed:
            raise TypeError(f"{', '.join(fixed)} is fixed when the Kernel is made (tk.Kernel(model, idx, ...)); make "
                            "another Kernel for other values")
        distributed = sorted(set(run_options) & set(_DISTRIBUTED))
        if distributed:
            raise TypeError(f"tk.Kernel computes in this process ({', '.join(distributed)} given): call tk.gram for "
                            "the distributed path")
        self._prepare()
        options = dict(self.options, **run_options)
        if compute is pipeline.gram:
            options["group"] = False
        else:
            options.pop("structured")  # features are features: nothing structured
        if run_options.get("checkpoint") is not None:
            # A resumed checkpoint forces the plan it was made with: a fresh extractor takes it.
            return compute(self.model, *args[:1], self._index, *args[1:], **options)
        # Kept sides are unsketched only: reuse of a sketched side is not built (nor tested).
        keep = self.keep and compute is pipeline.gram and options.get("projection") is None
        token = feature_phase.reused_extractors.set(self._extractors)
        kept = feature_phase.kept_features.set(self.kept if keep else None)
        recycled = recycled_buffers.set(self.kept.recycled)
        try:
            counts = self._counts()
            try:
                result = compute(self.model, *args[:1], self._index, *args[1:], **options)
            except PlanCommitted:
                # A check failed on a later batch of a call whose first batches went
                # unchecked: had they been checked, the plan would have changed on the first.
                if not self._spared_since(counts):
                    raise
                result = None
            if result is None or self._spared_since(counts, failed=True):
                # A check failed in a call that left batches unchecked: those may be wrong
                # too. The whole call again, every batch checked (as a one-shot call).
                self.kept.clear()
                for extractor in self._extractors.values():
                    extractor.rotation, extractor.committed = None, False
                result = compute(self.model, *args[:1], self._index, *args[1:], **options)
            return result
        finally:
            recycled_buffers.reset(recycled)
            self.kept.recycled.clear()  # what this call did not take is freed now
            feature_phase.kept_features.reset(kept)
            feature_phase.reused_extractors.reset(token)

    def _counts(self) -> dict:
        return {id(e): (e.spared, e.failures) for e in self._extractors.values()}

    def _spared_since(self, counts: dict, failed: bool = False) -> bool:
        """Whether batches went unchecked since ``counts`` (and, with ``failed``, a check failed)."""
        return any(e.spared > counts.get(id(e), (0, 0))[0] and (not failed or e.failures > counts.get(id(e), (0, 0))[1])
                   for e in self._extractors.values())

    def gram(self, loader, **run_options) -> torch.Tensor:
        """K(X, X) [n, n] at the model's current weights; ``run_options``: those of
        :func:`tangent_kernels.gram` that do not change what is computed (progress,
        out, callback, checkpoint, store, max_memory, cache_dir, checkpoint_key)."""
        return self._run(pipeline.gram, run_options, loader)

    def cross(self, loader1, loader2, **run_options) -> torch.Tensor:
        """K(X1, X2) [n1, n2] at the model's current weights; a side kept from an earlier
        call (the same loader, data, weights and computation) is not computed again."""
        return self._run(pipeline.gram, run_options, loader1, loader2)

    def features(self, loader, **run_options) -> torch.Tensor:
        """Per-sample gradient features [n, p] at the model's current weights."""
        return self._run(pipeline.features, run_options, loader)

    def __repr__(self) -> str:
        p = len(self._index) if self._index is not None else "?"
        return f"Kernel({type(self.model).__name__}, p={p}, {', '.join(f'{k}={v!r}' for k, v in self.options.items() if k != 'inputs')})"
